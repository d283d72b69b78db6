"""`GPT`, its layers and `generation.generate_eager` on every Keras backend (issue 15).

The backend is fixed when Keras is imported, so the TensorFlow run starts this module again in a
pytest process of its own with `KERAS_BACKEND=jax` and with `KERAS_BACKEND=torch`
(`test_this_module_passes_on_jax_and_torch`), and the cross-backend `.keras` round trip runs one
subprocess per backend.
"""

import dataclasses
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from gpt_keras import GPT, GPTConfig, backends, generation
from gpt_keras.layers.multi_head_attention import write_cache
from tests import numpy_reference as ref

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = GPTConfig.from_preset("tiny")  # vocab 64, context 16, 2 layers, 2 heads, 32 dims
POSITIONS = ["sinusoidal", "learned", "rotary"]


def tiny_model(**overrides):
    model = GPT(**dataclasses.asdict(TINY.replace(**overrides)))
    model.build()
    return model


def random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, shape).astype("int32")


def numpy(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("position_embedding", POSITIONS)
def test_logits_match_numpy_forward_pass(position_embedding):
    """Every layer (positions, attention with a padding mask, blocks, the tied head) against the
    float64 NumPy reference."""
    model = tiny_model(position_embedding=position_embedding)
    ref.randomize_weights(model)
    ids = random_ids((3, 11))
    mask = np.ones((3, 11), "int32")
    mask[1, 7:] = 0
    np.testing.assert_allclose(numpy(model(ids)), ref.gpt_logits(model, ids),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(numpy(model(ids, padding_mask=mask)),
                               ref.gpt_logits(model, ids, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position_embedding", POSITIONS)
def test_cached_decoding_equals_full_pass(position_embedding):
    model = tiny_model(position_embedding=position_embedding)
    ref.randomize_weights(model)
    ids = random_ids((2, 14))
    full = numpy(model(ids))
    logits, cache = model.call_with_cache(ids[:, :5], model.init_cache(2), 0)  # prefill
    steps = [numpy(logits)]
    for t in range(5, 14):
        logits, cache = model.call_with_cache(ids[:, t : t + 1], cache, t)
        steps.append(numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
    _, one_pass_cache = model.call_with_cache(ids, model.init_cache(2), 0)
    np.testing.assert_allclose(numpy(cache), numpy(one_pass_cache), atol=1e-5)


def test_cache_writes_equal_numpy_on_every_path():
    """`write_cache` writes rows `index ..` of the cache. On TensorFlow the eager/graph path
    (`gather` + `where`) and the XLA path (`slice_update`, the other backends' path) agree."""
    rng = np.random.default_rng(0)
    cache = rng.normal(size=(2, 2, 3, 8, 4)).astype("float32")  # [2, B, H, S, K]
    update = rng.normal(size=(2, 2, 3, 3, 4)).astype("float32")  # T = 3 new rows
    expected = cache.copy()
    expected[..., 5:8, :] = update
    paths = {"eager": write_cache}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        paths["graph"] = tf.function(write_cache, jit_compile=False)
        paths["xla"] = tf.function(write_cache, jit_compile=True)
    for name, write in paths.items():
        written = write(ops.convert_to_tensor(cache), ops.convert_to_tensor(update), 5)
        np.testing.assert_array_equal(numpy(written), expected, err_msg=name)


def test_fit_lowers_the_loss_and_predict_equals_call():
    """`fit` on NumPy arrays and on a `tf.data` dataset (the README's quickstart; Keras feeds
    it to every backend)."""
    import tensorflow as tf

    model = tiny_model(position_embedding="rotary")
    ids = random_ids((4, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(inputs, targets, batch_size=4, epochs=4, verbose=0).history["loss"]
    dataset = tf.data.Dataset.from_tensors((inputs, targets)).repeat(4)
    losses += model.fit(dataset, epochs=1, verbose=0, shuffle=False).history["loss"]
    assert losses[0] > 3.5  # about ln(64) at initialisation
    assert losses[-1] < losses[0] - 1.0
    np.testing.assert_allclose(model.predict(inputs, verbose=0), numpy(model(inputs)),
                               atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_the_argmax_of_the_full_pass():
    model = tiny_model(position_embedding="rotary")
    ref.randomize_weights(model)
    prompt = random_ids((2, 4))
    new = generation.generate_eager(model, prompt, 6)
    assert new.shape == (2, 6) and new.dtype == np.int32
    logits = numpy(model(np.concatenate([prompt, new[:, :-1]], axis=1)))
    np.testing.assert_array_equal(new, logits[:, 3:].argmax(-1))


def test_top_k_sampling_stays_in_the_top_k_and_repeats_with_a_seed():
    model = tiny_model()
    ref.randomize_weights(model)
    prompt = random_ids((2, 2))

    def sample(seed):  # a high temperature: nearly uniform among the top 3
        return generation.generate_eager(model, prompt, 8, temperature=5.0, top_k=3, seed=seed)

    new = sample(7)
    np.testing.assert_array_equal(sample(7), new)
    assert not np.array_equal(sample(8), new)
    logits = numpy(model(np.concatenate([prompt, new[:, :-1]], axis=1)))[:, 1:]  # [B, 8, V]
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    assert (new[..., None] == top3).any(-1).all()
    assert (new != top3[..., 0]).any()  # it samples rather than taking the argmax


def test_generation_arguments_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="need 20 positions, more than context_length=16"):
        generation.generate_eager(model, random_ids((1, 5)), 16)
    with pytest.raises(ValueError, match="`top_k` must be"):
        generation.generate_eager(model, random_ids((1, 5)), 2, top_k=-1)
    with pytest.raises(ValueError, match=r"integer ids `\[batch, time\]`"):
        generation.generate_eager(model, [1, 2, 3], 2)


def test_eager_inputs_are_checked():
    model = tiny_model()
    bad = ops.convert_to_tensor(np.array([[1, 64]], "int32"))  # a tensor of this backend
    with pytest.raises(ValueError, match=r"Token id 64 is outside the vocabulary \[0, 64\)"):
        model(bad)
    with pytest.raises(ValueError, match="3 tokens, more than cache length - cache_index=2"):
        model.call_with_cache(random_ids((1, 3)), model.init_cache(1), 14)
    with pytest.raises(ValueError, match="17 tokens, more than context_length=16"):
        model(random_ids((1, 17)))


def test_host_values_reads_eager_cpu_arrays_only():
    """Ids are read for the range check only where that costs no trace and no device copy."""
    ids = random_ids((2, 3))
    np.testing.assert_array_equal(backends.host_values(ops.convert_to_tensor(ids)), ids)
    assert backends.host_values(keras.KerasTensor((2, 3), "int32")) is None
    seen = []
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.function(lambda x: seen.append(backends.host_values(x)) or x)(ids)
    elif BACKEND == "jax":
        import jax

        jax.jit(lambda x: seen.append(backends.host_values(x)) or x)(ids)
    else:  # a tensor off the CPU (torch.compile's fake tensors are not on the CPU either)
        import torch

        seen.append(backends.host_values(torch.zeros((2, 3), device="meta")))
    assert seen == [None]


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the TensorFlow-only features run there")
def test_tensorflow_only_features_say_so():
    from gpt_keras import serving, tflite, training
    from gpt_keras.tokenizers import CharTokenizer

    model = tiny_model()
    calls = {
        "gpt_keras.training.train": lambda: training.train("run", ["data.txt"], TINY, None),
        "compiled decoding loop": lambda: generation.generate(model, [[1, 2]], 2),
        "in-graph tokenizers": lambda: CharTokenizer.train("abc").tokenize("abc"),
        "SavedModel export": lambda: serving.export_model(model, None, "models"),
        "TFLite export": lambda: tflite.convert_to_tflite(model),
    }
    for feature, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{feature}.* needs the TensorFlow backend "
                                               rf"\(KERAS_BACKEND=tensorflow\); Keras is "
                                               f"running on {BACKEND}"):
            call()


# One process per backend: load the previous backend's `.keras` file, compare its logits with
# TensorFlow's, save it again for the next one.
_ROUND_TRIP = """
import sys, keras, numpy as np, gpt_keras
from tests import numpy_reference as ref
directory, source, target = sys.argv[1:]
ids = np.load(directory + "/ids.npy")
if source == "-":  # the first process (TensorFlow) makes the model and the expected logits
    model = gpt_keras.GPT(**vars(gpt_keras.GPTConfig.from_preset(
        "tiny", position_embedding="rotary", tie_embeddings=False)))
    model.build()
    ref.randomize_weights(model)
    np.save(directory + "/expected.npy", keras.ops.convert_to_numpy(model(ids)))
else:
    model = keras.saving.load_model(directory + "/" + source)
logits = keras.ops.convert_to_numpy(model(ids))
difference = np.abs(logits - np.load(directory + "/expected.npy")).max()
model.save(directory + "/" + target)
print(keras.backend.backend(), difference)
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="runs once, in the TensorFlow run: it "
                                                    "starts a process per backend")
def test_keras_files_move_between_backends_with_equal_logits(tmp_path):
    """TensorFlow → JAX → PyTorch → TensorFlow through `.keras` files: same weights, logits
    within 1e-5 of TensorFlow's."""
    np.save(tmp_path / "ids.npy", random_ids((2, 12)))
    chain = [("tensorflow", "-"), ("jax", "tensorflow.keras"), ("torch", "jax.keras"),
             ("tensorflow", "torch.keras")]
    for backend, source in chain:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = subprocess.run(
            [sys.executable, "-c", _ROUND_TRIP, str(tmp_path), source, f"{backend}.keras"],
            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        name, difference = result.stdout.split()[-2:]
        assert name == backend
        assert float(difference) <= 1e-5, (backend, difference)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="runs once, in the TensorFlow run: it "
                                                    "starts a pytest process per backend")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_this_module_passes_on_jax_and_torch(backend):
    """Every test above, in a pytest process whose Keras runs on `backend` (`make test` runs the
    suite once, on TensorFlow; this keeps the other backends in it)."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.relpath(__file__, ROOT)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
