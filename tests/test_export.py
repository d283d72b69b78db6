"""`gpt_keras.serving` and `gpt-keras export`: the SavedModel runs as TF Serving runs it.

One small run (character tokenizer, random weights with varied greedy output, context 16 so that
generation slides its window) and one converted GPT-2 run are exported once; one fresh process,
set up as the model server (no Keras or gpt_keras, XLA disabled, TF1 Session loader, requests as
`PredictRequest` protos), answers every request the tests check against the in-process model.
"""

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from gpt_keras import generation, serving, warmup
from gpt_keras.batching import read_batching_parameters
from gpt_keras.cli import main
from gpt_keras.tokenizers import load_tokenizer
from gpt_keras.training import load_model
from tests.conftest import SHAKESPEARE, printed
from tests.numpy_reference import gpt_logits as reference_logits

GPT2_VOCAB = os.path.join(os.path.dirname(SHAKESPEARE), "gpt2")
GRPC_CLIENT = os.path.join(os.path.dirname(__file__), "..", "export", "grpc_client.py")
BATCHING_PARAMETERS = os.path.join(os.path.dirname(__file__), "..", "export",
                                   "batching_parameters.txt")
PROMPTS = ["To be, or not", "", "First Citizen:\nBefore we proceed any further", "ROMEO: I"]
NEW_TOKENS = 40  # > context_length 16: the window slides twice
SAMPLING = dict(temperature=1.0, top_k=10, top_p=0.9, seed=7)

# Appended to `serving.SERVER_LIKE_PROLOGUE`: answers the requests on stdin as the model server
# would (requests and responses go through `PredictRequest`/`PredictResponse` protos), one made by
# export/grpc_client.py, then two through `tf.saved_model.load`.
SERVER_REQUESTS = r"""
import importlib.util

BLOCKED_PACKAGES = ("keras", "keras_hub", "tensorflow_text", "gpt_keras")
try:
    import keras  # noqa: F401  (blocked by the prologue: must fail)
    keras_import = "succeeded"
except ImportError as error:
    keras_import = type(error).__name__
from tensorflow_serving.apis import predict_pb2

runs = [load(path) for path in sys.argv[1:]]


def serve(export, request):
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    feeds = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
    outputs = runs[export](request.model_spec.signature_name, feeds)
    response = predict_pb2.PredictResponse()
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
    return predict_pb2.PredictResponse.FromString(response.SerializeToString())


def predict(export, signature, inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = signature
    for name, (dtype, value) in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    try:
        response = serve(export, request)
    except tf.errors.OpError as error:
        return {"error": type(error).__name__, "message": error.message}
    return {k: _plain(tf.make_ndarray(v)) for k, v in response.outputs.items()}


def _plain(array):
    if array.dtype == object:
        return [text.decode("utf-8") for text in array.tolist()]
    return array.tolist()


payload = json.load(sys.stdin)
results = {name: predict(*request) for name, request in payload["requests"].items()}
spec = importlib.util.spec_from_file_location("grpc_client", payload["grpc_client"])
client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(client)
request = client.generate_request("shakespeare", **payload["grpc_request"])
signatures = tf.saved_model.load(sys.argv[1]).signatures
print(json.dumps({
    "warmup_records": [replay_warmup(path, run) for path, run in zip(sys.argv[1:], runs)],
    "results": results,
    "grpc_client": client.completions(serve(0, request)),
    "tf2_logits": signatures["logits"](token_ids=tf.constant([[1, 2, 3]]))["logits"].numpy()
    .tolist(),
    "tf2_completions": _plain(
        signatures["serving_default"](prompts=tf.constant(["To be"]))["completions"].numpy()),
    # Modules of the blocked packages that got loaded anyway (the SavedModel needs none).
    "keras_import": keras_import,
    "keras_modules": sorted(name for name, module in sys.modules.items() if module is not None
                            and name.split(".")[0] in BLOCKED_PACKAGES),
}))
"""


def knobs(max_new_tokens, temperature=0.0, top_k=1, top_p=1.0, seed=0, repetition_penalty=1.0,
          min_new_tokens=0, banned_token_ids=(), logit_bias=None, stop_strings=()):
    logit_bias = logit_bias or {}
    return {"max_new_tokens": ("int32", max_new_tokens), "temperature": ("float32", temperature),
            "top_k": ("int32", top_k), "top_p": ("float32", top_p), "seed": ("int64", seed),
            "repetition_penalty": ("float32", repetition_penalty),
            "min_new_tokens": ("int32", min_new_tokens),
            "banned_token_ids": ("int32", list(banned_token_ids)),
            "bias_token_ids": ("int32", list(logit_bias)),
            "bias_values": ("float32", list(logit_bias.values())),
            "stop_strings": ("string", list(stop_strings))}


def strings(texts):
    return ("string", texts)


LOGITS_IDS = [np.random.default_rng(1).integers(0, 60, (3, 16)).tolist(), [[5, 0, 59, 7, 1]]]
TO_BE = {"prompts": strings(["To be"])}
ERRORS = [  # (signature, inputs, the message TF Serving returns)
    ("generate", {**TO_BE, **knobs(5, top_k=-1)},
     "`top_k` must be an integer ≥ 0 (0 = no cut). Received: top_k=-1"),
    ("generate", {**TO_BE, **knobs(5, top_p=1.5, temperature=1.0)},
     "`top_p` must be a number in (0, 1] (1 = no cut). Received: top_p=1.5"),
    ("generate", {**TO_BE, **knobs(5, temperature=-1.0)},
     "`temperature` must be a finite number ≥ 0 (0 = greedy). Received: temperature=-1"),
    ("generate", {**TO_BE, **knobs(-1)},
     "`max_new_tokens` must be an integer ≥ 0. Received: max_new_tokens=-1"),
    ("generate", {**TO_BE, **knobs(serving.MAX_NEW_TOKENS + 1)},
     f"at most {serving.MAX_NEW_TOKENS}. Received: max_new_tokens={serving.MAX_NEW_TOKENS + 1}"),
    ("generate", {"prompts": strings([]), **knobs(5)}, "Pass at least one prompt. Received none."),
    ("logits", {"token_ids": ("int32", [[1, 60]])},
     "`token_ids` must lie in [0, 60). Received: [[1 60]]"),
    ("logits", {"token_ids": ("int32", [list(range(17))])},
     "`token_ids` has 17 tokens per row, more than the context length 16"),
    ("score", {"texts": strings(["a" * 16, "b" * 17])},
     "A text to score has 17 tokens, more than the context length 16"),
]
SCORE_TEXTS = ["To be, or not", "", "ROMEO: I", "sixteen letters."]  # 16 tokens: a full context
# Every steering knob at once (char ids: 1 " ", 2 "!", 7 ":", 43 "l"), sampled.
STEERING = dict(repetition_penalty=1.3, min_new_tokens=12, banned_token_ids=[1, 43],
                logit_bias={2: 1.5, 7: -0.5}, stop_strings=["th", "."], **SAMPLING)
# name: (export index, signature, inputs), sent to the server-like process.
REQUESTS = {
    "logits": (0, "logits", {"token_ids": ("int32", LOGITS_IDS[0])}),
    "logits_short": (0, "logits", {"token_ids": ("int32", LOGITS_IDS[1])}),
    "greedy": (0, "generate", {"prompts": strings(PROMPTS), **knobs(NEW_TOKENS)}),
    "sampled": (0, "generate", {"prompts": strings(PROMPTS), **knobs(NEW_TOKENS, **SAMPLING)}),
    "sampled_again": (0, "generate", {"prompts": strings(PROMPTS),
                                      **knobs(NEW_TOKENS, **SAMPLING)}),
    "no_new_tokens": (0, "generate", {"prompts": strings(PROMPTS[:2]), **knobs(0)}),
    "steered": (0, "generate", {"prompts": strings(PROMPTS), **knobs(NEW_TOKENS, **STEERING)}),
    **{f"default_{i}": (0, "serving_default", {"prompts": strings(PROMPTS[:2])})
       for i in range(4)},
    "score": (0, "score", {"texts": strings(SCORE_TEXTS)}),
    "tokenize": (0, "tokenize", {"prompts": strings(PROMPTS)}),
    "detokenize": (0, "detokenize", {"token_ids": ("int32", [[20, 47, -1, -1], [-1, 0, 1, 2]])}),
    "gpt2": (1, "generate", {"prompts": strings(["To be, or not to be", ""]), **knobs(8)}),
    **{f"error_{index}": (0, signature, inputs)
       for index, (signature, inputs, _) in enumerate(ERRORS)},
}


@pytest.fixture(scope="module")
def char_run(char_export):
    run_dir, version_dir, _ = char_export
    assert serving.read_manifest(version_dir)["model"]["vocab_size"] == 60  # LOGITS_IDS and
    return run_dir  # the error messages assume it


@pytest.fixture(scope="module")
def exported(char_export):
    """`gpt-keras export` into an empty base path: `(version directory, printed text)`."""
    _, version_dir, text = char_export
    return version_dir, text


@pytest.fixture(scope="module")
def gpt2_exported(tmp_path_factory):
    """A random Hugging Face GPT-2 (GPT-2's vocabulary) → `gpt-keras convert` → export."""
    from tests.test_hf_conversion import random_hf_model

    root = tmp_path_factory.mktemp("gpt2")
    random_hf_model(vocab_size=50257, n_positions=64).save_pretrained(str(root / "hf"))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(GPT2_VOCAB, name), root / "hf")
    printed(main, ["convert", str(root / "hf"), str(root / "run")])
    return str(root / "run"), serving.export_saved_model(str(root / "run"), str(root / "models"))


@pytest.fixture(scope="module")
def served(exported, gpt2_exported):
    return serving.run_like_tf_serving([exported[0], gpt2_exported[1]], SERVER_REQUESTS, {
        "requests": REQUESTS, "grpc_client": GRPC_CLIENT,
        "grpc_request": {"prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, **SAMPLING},
    })


@pytest.fixture(scope="module")
def local(char_run):
    """The run's model and tokenizer, in this process."""
    return load_model(char_run), load_tokenizer(os.path.join(char_run, "tokenizer"))


def prompt_ids(tokenizer, prompts):
    """Token ids as the export feeds them: an empty prompt starts from end of text."""
    return [tokenizer.tokenize(p).numpy().tolist() or [tokenizer.end_of_text_id] for p in prompts]


def unpadded(rows):
    """Rows of ids padded at the end with `PAD_ID` → lists of ids."""
    ids = [[i for i in row if i != serving.PAD_ID] for row in rows]
    assert all(row[: len(kept)] == kept for row, kept in zip(rows, ids))
    return ids


# -- What the server returns --------------------------------------------------------------------


def test_served_by_a_process_without_keras(served):
    """The process could not import Keras and, after serving every request, holds no module of
    Keras, keras-hub, TF Text or gpt_keras (TensorFlow imports Keras by itself when it can)."""
    assert served["keras_import"] == "ModuleNotFoundError"
    assert served["keras_modules"] == []


def test_logits_equal_keras_for_any_batch_and_length(served, local):
    model, _ = local
    for name, ids in zip(["logits", "logits_short"], LOGITS_IDS):
        expected = np.asarray(model(np.array(ids, np.int32)))
        np.testing.assert_allclose(served["results"][name]["logits"], expected,
                                   atol=serving.LOGITS_TOLERANCE, rtol=0)
    np.testing.assert_allclose(served["tf2_logits"], np.asarray(model(np.array([[1, 2, 3]]))),
                               atol=serving.LOGITS_TOLERANCE, rtol=0)


def test_greedy_generation_equals_text_generator(served, local):
    """Ragged prompts, an empty one (unconditional), one longer than the context (its last
    tokens are kept) and 40 new tokens (two window slides) give `TextGenerator`'s text."""
    model, tokenizer = local
    with pytest.warns(UserWarning, match="keeping its last 16"):
        expected = generation.TextGenerator(model, tokenizer).generate(
            PROMPTS, NEW_TOKENS, temperature=0
        )
    result = served["results"]["greedy"]
    assert result["completions"] == expected
    assert any(len(text) == NEW_TOKENS for text in expected)  # ran through both slides
    assert any(len(text) < NEW_TOKENS for text in expected)  # stopped at end of text
    assert len(set(expected[0])) > 3  # not one repeated character
    ids = unpadded(result["token_ids"])
    assert [tokenizer.detokenize(np.array(row, np.int32)).numpy().decode() for row in ids] == (
        expected)
    assert np.array(result["token_ids"]).shape == (len(PROMPTS), NEW_TOKENS)


def test_sampling_equals_in_process_generation_for_a_seed(served, local):
    model, tokenizer = local
    first, second = served["results"]["sampled"], served["results"]["sampled_again"]
    assert first == second
    with pytest.warns(UserWarning):
        expected = generation.generate(
            model, prompt_ids(tokenizer, PROMPTS), NEW_TOKENS,
            stop_token_ids=[tokenizer.end_of_text_id], **SAMPLING,
        )
    assert unpadded(first["token_ids"]) == expected
    greedy = served["results"]["greedy"]["token_ids"]
    assert first["token_ids"] != greedy


def test_zero_new_tokens(served):
    assert served["results"]["no_new_tokens"] == {"completions": ["", ""], "token_ids": [[], []],
                                                  "logprobs": [[], []]}


def test_steering_knobs_equal_in_process_generation(served, local):
    """Repetition penalty, min_new_tokens, banned ids, logit bias and stop strings in the
    served graph: `TextGenerator`'s tokens, log-probabilities and text cut at the stop string."""
    model, tokenizer = local
    result = served["results"]["steered"]
    with pytest.warns(UserWarning, match="keeping its last 16"):
        expected = generation.TextGenerator(model, tokenizer).generate(
            PROMPTS, NEW_TOKENS, return_logprobs=True, **STEERING)
    assert result["completions"] == [completion.text for completion in expected]
    assert unpadded(result["token_ids"]) == [completion.token_ids for completion in expected]
    for row, completion in zip(result["logprobs"], expected):
        # log p = logit - logsumexp(logits): each term within the logits' tolerance.
        np.testing.assert_allclose(row[: len(completion.logprobs)], completion.logprobs,
                                   atol=2 * serving.LOGITS_TOLERANCE)
    cut = [c for c in expected if c.text != tokenizer.detokenize(
        np.array(c.token_ids, np.int32)).numpy().decode()]
    assert cut and all(len(c.token_ids) < NEW_TOKENS for c in cut)  # stopped at a stop string
    assert not {1, 43} & {i for c in expected for i in c.token_ids}


def test_grpc_client_example_builds_and_reads_generate_calls(served):
    """export/grpc_client.py's request, answered as the server does, gives the sampled
    `generate` answer for the same knobs."""
    texts, ids = served["grpc_client"]
    assert texts == served["results"]["sampled"]["completions"]
    assert ids == unpadded(served["results"]["sampled"]["token_ids"])


def test_serving_default_samples_a_new_completion_per_request(served):
    """Each request draws its own seed: 4 identical requests do not all get the same texts (a
    row can end at once on end-of-text, so two requests alone may coincide by chance)."""
    answers = [served["results"][f"default_{i}"]["completions"] for i in range(4)]
    assert all(len(texts) == 2 for texts in answers)
    assert len({tuple(texts) for texts in answers}) > 1
    assert len(served["tf2_completions"]) == 1 and isinstance(served["tf2_completions"][0], str)


def test_score_equals_text_generator_and_the_numpy_reference(served, local):
    model, tokenizer = local
    result = served["results"]["score"]
    scores = generation.TextGenerator(model, tokenizer).score(SCORE_TEXTS)
    counts = [len(tokenizer.tokenize(text).numpy()) for text in SCORE_TEXTS]
    assert result["token_count"] == counts and counts[-1] == model.config.context_length
    for b, (score, count) in enumerate(zip(scores, counts)):
        ids = [tokenizer.end_of_text_id] + tokenizer.tokenize(SCORE_TEXTS[b]).numpy().tolist()
        logits = reference_logits(model, np.array([ids[:-1]]))[0] if count else np.zeros((0, 60))
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
            -1, keepdims=True)) - logits.max(-1, keepdims=True)
        expected = log_probs[np.arange(count), ids[1:]]
        np.testing.assert_allclose(score.token_log_probs, expected, atol=1e-4)
        np.testing.assert_allclose(result["token_log_probs"][b][:count], expected, atol=1e-4)
        assert result["token_log_probs"][b][count:] == [0.0] * (max(counts) - count)
        np.testing.assert_allclose([score.log_prob, result["log_prob"][b]], expected.sum(),
                                   atol=1e-3)


def test_score_refuses_what_it_cannot_score(local):
    scorer = generation.TextGenerator(*local)
    with pytest.raises(ValueError, match="has 17 tokens, more than the context length 16"):
        scorer.score(["ok", "b" * 17])
    with pytest.raises(ValueError, match="non-empty list of `str`"):
        scorer.score([])
    assert scorer.score("").log_prob == 0.0 and scorer.score("").token_log_probs.shape == (0,)


def test_tokenize_and_detokenize(served, local):
    _, tokenizer = local
    tokenized = served["results"]["tokenize"]
    assert unpadded(tokenized["token_ids"]) == [tokenizer.tokenize(p).numpy().tolist()
                                                for p in PROMPTS]
    assert tokenized["lengths"] == [len(p) for p in PROMPTS]
    texts = served["results"]["detokenize"]["texts"]
    assert texts == [tokenizer.detokenize(np.array(ids, np.int32)).numpy().decode()
                     for ids in ([20, 47], [0, 1, 2])]


@pytest.mark.parametrize("index", range(len(ERRORS)))
def test_invalid_inputs_are_invalid_argument_naming_the_value(served, index):
    result = served["results"][f"error_{index}"]
    assert result.get("error") == "InvalidArgumentError", result
    assert ERRORS[index][2] in result["message"]


def test_gpt2_converted_run_generates_in_the_served_graph(served, gpt2_exported):
    run_dir, version_dir = gpt2_exported
    model, tokenizer = load_model(run_dir), load_tokenizer(os.path.join(run_dir, "tokenizer"))
    expected = generation.generate(
        model, prompt_ids(tokenizer, ["To be, or not to be", ""]), 8, temperature=0,
        stop_token_ids=[tokenizer.end_of_text_id],
    )
    assert unpadded(served["results"]["gpt2"]["token_ids"]) == expected
    assert served["results"]["gpt2"]["completions"] == [
        tokenizer.detokenize(np.array(ids, np.int32)).numpy().decode("utf-8", "replace")
        for ids in expected
    ]
    manifest = serving.read_manifest(version_dir)
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["op_libraries"] == []


# -- The export's files ---------------------------------------------------------------------------


def test_layout_and_manifest(exported, char_run, local, served):
    version_dir, _ = exported
    assert sorted(os.listdir(os.path.dirname(version_dir))) == ["1"]
    assert {"saved_model.pb", "variables", "assets.extra"} <= set(os.listdir(version_dir))
    manifest = serving.read_manifest(version_dir)
    model, tokenizer = local
    with open(os.path.join(char_run, "tokenizer", "tokenizer.json"), "rb") as f:
        run_hash = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(version_dir, "assets.extra", "tokenizer.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == run_hash
    assert manifest["tokenizer"] == {**tokenizer.describe(), "sha256": run_hash,
                                     "file": "assets.extra/tokenizer.json"}
    assert manifest["model"] == dataclasses.asdict(model.config)
    assert manifest["source"] == os.path.abspath(char_run)
    assert set(manifest["versions"]) == {"tensorflow", "keras", "gpt_keras"}
    assert manifest["op_libraries"] == [] and "StatefulPartitionedCall" in manifest["op_types"]
    assert not [op for op in manifest["op_types"] if op.startswith("Xla")]
    assert manifest["default_sampling"] == serving.DEFAULT_SAMPLING
    assert manifest["signatures"]["generate"] == {
        "inputs": {"prompts": {"dtype": "string", "shape": [None]},
                   "max_new_tokens": {"dtype": "int32", "shape": []},
                   "temperature": {"dtype": "float32", "shape": []},
                   "top_k": {"dtype": "int32", "shape": []},
                   "top_p": {"dtype": "float32", "shape": []},
                   "seed": {"dtype": "int64", "shape": []},
                   "repetition_penalty": {"dtype": "float32", "shape": []},
                   "min_new_tokens": {"dtype": "int32", "shape": []},
                   "banned_token_ids": {"dtype": "int32", "shape": [None]},
                   "bias_token_ids": {"dtype": "int32", "shape": [None]},
                   "bias_values": {"dtype": "float32", "shape": [None]},
                   "stop_strings": {"dtype": "string", "shape": [None]}},
        "outputs": {"completions": {"dtype": "string", "shape": [None]},
                    "token_ids": {"dtype": "int32", "shape": [None, None]},
                    "logprobs": {"dtype": "float32", "shape": [None, None]}},
    }
    assert manifest["signatures"]["logits"]["outputs"] == {
        "logits": {"dtype": "float32", "shape": [None, None, 60]}}
    assert set(manifest["signatures"]) == set(serving.SIGNATURES)
    # The golden prompts are the first two of PROMPTS: their greedy completions are prefixes of
    # the served ones, which equal `TextGenerator`'s.
    golden = manifest["golden"]
    assert golden["prompts"] == PROMPTS[:2] and golden["max_new_tokens"] < NEW_TOKENS
    assert golden["completions"] == [
        text[: golden["max_new_tokens"]] for text in served["results"]["greedy"]["completions"][:2]
    ]


def test_cli_prints_the_version_and_signatures(exported):
    version_dir, text = exported
    assert f"SavedModel written to {version_dir}" in text
    assert "  logits(token_ids int32[?, ?]) -> logits float32[?, ?, 60]" in text
    for name in serving.SIGNATURES:
        assert f"\n  {name}(" in text


def test_saved_model_cli_show_and_run(exported, local, tmp_path):
    version_dir, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", version_dir, "--all"], capture_output=True,
                           text=True, timeout=300, check=True).stdout
    for name in serving.SIGNATURES:
        assert f"signature_def['{name}']" in shown
    assert "inputs['max_new_tokens'] tensor_info:\n        dtype: DT_INT32\n        shape: ()" in (
        shown)
    subprocess.run(
        [cli, "run", "--dir", version_dir, "--tag_set", "serve", "--signature_def", "logits",
         "--input_exprs", "token_ids=[[3, 1, 4, 1, 5]]", "--outdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    model, _ = local
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"),
                               np.asarray(model(np.array([[3, 1, 4, 1, 5]]))), atol=1e-5, rtol=0)


def test_warmup_records_cover_every_signature_batch_size_and_prompt_length(exported):
    """`assets.extra/tf_serving_warmup_requests` is a TFRecord file of `PredictionLog`s, as TF
    Serving reads it: one `predict_log` per signature, batch size and prompt length, each with
    exactly the signature's inputs."""
    version_dir, _ = exported
    manifest = serving.read_manifest(version_dir)
    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    assert manifest["warmup"]["file"] == "assets.extra/tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(record)
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    assert len(logs) == manifest["warmup"]["records"] <= 1000  # TF Serving's limit
    shapes = {}
    for log in logs:
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        signature = manifest["signatures"][request.model_spec.signature_name]
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        assert set(inputs) == set(signature["inputs"])
        for name, value in inputs.items():
            assert tf.as_dtype(value.dtype).name == signature["inputs"][name]["dtype"]
            assert value.ndim == len(signature["inputs"][name]["shape"])
        batched = inputs[next(iter(signature["inputs"]))]  # prompts, texts or token_ids
        width = batched.shape[1] if batched.ndim == 2 else max(len(p) for p in batched)
        shapes.setdefault(request.model_spec.signature_name, set()).add((len(batched), width))
    assert set(shapes) == set(serving.SIGNATURES)
    for signature, seen in shapes.items():
        assert {size for size, _ in seen} == set(warmup.BATCH_SIZES), signature
        assert len(seen) == len(warmup.BATCH_SIZES), signature
    assert len(logs) == len(warmup.BATCH_SIZES) * len(serving.SIGNATURES)


def test_warmup_records_replay_in_the_server_like_process(served, exported, gpt2_exported):
    counts = [serving.read_manifest(path)["warmup"]["records"]
              for path in (exported[0], gpt2_exported[1])]
    assert served["warmup_records"] == counts and counts[0] > 0


@pytest.mark.slow
def test_export_whose_warmup_fails_is_not_installed(char_run, tmp_path, monkeypatch):
    """A warm-up record the graph rejects (`temperature=-1`) fails the export, as it would fail
    TF Serving's load: no version directory, no temporary directory left."""
    bad_generate = warmup.EXAMPLE_INPUTS["generate"]
    monkeypatch.setitem(warmup.EXAMPLE_INPUTS, "generate",
                        lambda prompts, ids: {**bad_generate(prompts, ids), "temperature": -1})
    with pytest.raises(ValueError, match=r"Warm-up record \d+ of .*\('generate'\) failed: .*"
                                         r"`temperature` must be a finite number"):
        serving.export_saved_model(char_run, str(tmp_path / "models"))
    assert os.listdir(tmp_path / "models") == []


@pytest.mark.parametrize("change, message", [
    (lambda table: table.pop("tokenize"), r"covers signatures .* but the export has"),
    (lambda table: table.update(logits=lambda prompts, ids: {"ids": ids}),
     r"inputs of 'logits' .* are \['ids'\], but the signature takes \['token_ids'\]"),
    (lambda table: table.update(logits=lambda prompts, ids: {"token_ids": ids[0]}),
     r"'token_ids' of 'logits' .* has shape \[4\]; the signature takes \(None, None\)"),
])
def test_warmup_table_must_match_the_signatures(exported, local, monkeypatch, change, message):
    """When a signature's inputs change, the export says which entry of the one table to
    update (checked against the exported signatures' inputs, as recorded in the manifest)."""
    _, tokenizer = local
    inputs = {name: {key: tf.TensorSpec(spec["shape"], spec["dtype"])
                     for key, spec in contract["inputs"].items()}
              for name, contract in serving.read_manifest(exported[0])["signatures"].items()}
    assert len(warmup.warmup_requests(inputs, tokenizer, context_length=16)) == (
        len(warmup.BATCH_SIZES) * len(serving.SIGNATURES))
    table = dict(warmup.EXAMPLE_INPUTS)
    change(table)
    monkeypatch.setattr(warmup, "EXAMPLE_INPUTS", table)
    with pytest.raises(ValueError, match=message):
        warmup.warmup_requests(inputs, tokenizer, context_length=16)


def test_batching_parameters_file_is_tf_servings_and_matches_the_warmup():
    """export/batching_parameters.txt parses (strictly: unknown fields fail) as TF Serving's
    `BatchingParameters` text proto (declared in `gpt_keras.batching` as TF Serving declares it);
    its allowed batch sizes are the warmed-up ones, increasing, the last one `max_batch_size`, as
    TF Serving requires."""
    parameters = read_batching_parameters(BATCHING_PARAMETERS)
    assert tuple(parameters.allowed_batch_sizes) == warmup.BATCH_SIZES
    assert list(parameters.allowed_batch_sizes) == sorted(set(parameters.allowed_batch_sizes))
    assert parameters.allowed_batch_sizes[-1] == parameters.max_batch_size.value
    assert parameters.num_batch_threads.value >= 1
    assert parameters.HasField("batch_timeout_micros")
    assert parameters.pad_variable_length_inputs is False  # see export/README.md


# -- Versions, atomicity and errors -----------------------------------------------------------


# `gpt-keras export RUN --out BASE` that says "saved" once the SavedModel is written and then
# waits (on stdin) for the test to kill it.
KILLED_EXPORT = """
import sys
from gpt_keras import serving
from gpt_keras.cli import main

op_types = serving.op_types

def saved(export_dir):
    print("saved", flush=True)
    sys.stdin.read()
    return op_types(export_dir)

serving.op_types = saved
main(["export", sys.argv[1], "--out", sys.argv[2]])
"""


@pytest.mark.slow
def test_killed_export_leaves_no_version_and_rerun_with_force_replaces(char_run, exported,
                                                                       tmp_path):
    base = tmp_path / "models"
    shutil.copytree(exported[0], base / "3")
    (base / "3" / "marker").write_text("the version that --force replaces")
    process = subprocess.Popen(  # its own process group: the kill takes its children too
        [sys.executable, "-c", KILLED_EXPORT, char_run, str(base)],
        start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )
    try:
        # Reads the lines it prints until "saved" (the SavedModel is in its temporary) or exit.
        assert "saved\n" in iter(process.stdout.readline, "")
        assert glob.glob(str(base / ".tmp-export-*" / "saved_model.pb"))
        os.killpg(process.pid, signal.SIGKILL)  # before the verification and the rename
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.stdin.close()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    names = os.listdir(base)
    assert [name for name in names if name.isdigit()] == ["3"] and len(names) == 2
    assert serving.export_saved_model(char_run, str(base), 3, force=True) == str(base / "3")
    assert os.listdir(base) == ["3"]  # the killed export's directory was cleaned up
    assert not (base / "3" / "marker").exists()
    assert serving.read_manifest(str(base / "3"))["source"] == os.path.abspath(char_run)


def test_a_version_moved_aside_by_a_killed_export_is_put_back(tmp_path):
    """`export --force` killed between its two renames leaves version 3 under a temporary name:
    the next export puts it back (and deletes what other killed exports left)."""
    process = subprocess.Popen(["true"])
    process.wait()  # a process that is gone
    owner = f"{process.pid}@{socket.gethostname()}"
    os.makedirs(tmp_path / f".tmp-export-{owner}-abcdefgh-replaced-3")
    (tmp_path / f".tmp-export-{owner}-abcdefgh-replaced-3" / "marker").write_text("version 3")
    os.makedirs(tmp_path / f".tmp-export-{owner}-ijklmnop")  # the new version, never installed
    os.makedirs(tmp_path / "2")
    os.makedirs(tmp_path / f".tmp-export-{owner}-qrstuvwx-replaced-2")  # after both renames
    assert serving._version_directory(str(tmp_path), None, False) == str(tmp_path / "4")
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    assert (tmp_path / "3" / "marker").read_text() == "version 3"


def test_default_version_is_one_above_the_highest(tmp_path):
    for name in ("1", "07", ".tmp-export-1@host-abc", "notes", "12x"):
        os.makedirs(tmp_path / name)
    (tmp_path / "9").write_text("a file, not a version")
    assert serving._version_directory(str(tmp_path), None, False) == str(tmp_path / "8")


@pytest.mark.parametrize("args, message", [
    (["--version", "1"], "/1 already exists; pass --force (force=True) to replace it"),
    (["--version", "0"], "argument --version: expected an integer >= 1, received 0"),
    (["--quantize", "int8"], "--quantize applies to --format tflite"),
    (["--format", "tflite", "--version", "2"], "--version numbers TF Serving's SavedModel"),
])
def test_cli_errors_are_one_line(exported, char_run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", char_run, "--out", os.path.dirname(exported[0]), *args])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error


def test_cli_tflite_format_calls_export_tflite(monkeypatch, tmp_path, capsys):
    calls = []

    def export_tflite(run_dir, out_dir, quantize=None, force=False, weights="float32"):
        calls.append((run_dir, out_dir, quantize, force, weights))
        os.makedirs(out_dir)
        signature = {"inputs": {"token_ids": {"dtype": "int32", "shape": [1, -1]}},
                     "outputs": {"logits": {"dtype": "float32", "shape": [1, -1, 60]}}}
        with open(os.path.join(out_dir, "manifest.json"), "w") as f:
            json.dump({"signatures": {"logits": signature}}, f)
        return os.path.join(out_dir, "model.tflite")

    monkeypatch.setattr("gpt_keras.tflite.export_tflite", export_tflite)
    out = str(tmp_path / "tflite")
    main(["export", "RUN", "--out", out, "--format", "tflite", "--quantize", "int8", "--force"])
    assert calls == [("RUN", out, "int8", True, "float32")]
    assert capsys.readouterr().out == (
        "Converting to TFLite and checking the file in the LiteRT interpreter...\n"
        f"TFLite model written to {out}/model.tflite. Signatures:\n"
        "  logits(token_ids int32[1, ?]) -> logits float32[1, ?, 60]\n"
    )


def test_cli_error_for_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "models")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not a gpt_keras run directory" in error
    assert not (tmp_path / "models").exists()
