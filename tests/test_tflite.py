"""The model's logits function and cached decoding step convert to builtin-only TFLite and run in
the plain LiteRT interpreter (no Flex delegate) with the same numbers as Keras."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from gpt_keras import GPT
from gpt_keras.tflite import DECODE_SIGNATURE, LOGITS_SIGNATURE, convert_to_tflite
from tests import numpy_reference as ref


@pytest.fixture(scope="module", params=["sinusoidal", "learned"])
def converted(request):
    model = GPT.from_preset("tiny", position_embedding=request.param)
    model.build()
    ref.randomize_weights(model)
    return model, Interpreter(model_content=convert_to_tflite(model))


def test_logits_match_keras_for_any_batch_and_length(converted):
    model, interpreter = converted
    runner = interpreter.get_signature_runner(LOGITS_SIGNATURE)
    for shape in [(1, 16), (3, 5)]:
        ids = np.random.default_rng(sum(shape)).integers(0, 64, shape).astype("int32")
        np.testing.assert_allclose(runner(token_ids=ids)["logits"], model(ids), atol=1e-4)


def test_cached_decoding_matches_keras(converted):
    model, interpreter = converted
    runner = interpreter.get_signature_runner(DECODE_SIGNATURE)
    ids = np.random.default_rng(0).integers(0, 64, (2, 12)).astype("int32")
    expected = np.asarray(model(ids))
    out = runner(token_ids=ids[:, :4], cache=np.asarray(model.init_cache(2)),
                 cache_index=np.array(0, "int32"))
    np.testing.assert_allclose(out["logits"], expected[:, :4], atol=1e-4)
    cache = out["cache"]
    for t in range(4, 12):
        out = runner(token_ids=ids[:, t : t + 1], cache=cache, cache_index=np.array(t, "int32"))
        cache = out["cache"]
        np.testing.assert_allclose(out["logits"][:, 0], expected[:, t], atol=1e-4)
    _, keras_cache = model.call_with_cache(ids, model.init_cache(2), 0)
    np.testing.assert_allclose(cache[:, :, :, :12], np.asarray(keras_cache)[:, :, :, :12], atol=1e-4)
