"""`gpt-keras serve`: TF Serving's REST API under real HTTP, against small hand-made SavedModels
(fast, every format and error case) and a real `gpt_keras.serving` export of a tiny model."""

import base64
import concurrent.futures
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from gpt_keras.server import VERSIONS, BackgroundServer, make_app
from gpt_keras.warmup import write_warmup_requests

VOCAB = 5  # rows of the toy `logits` table: ids >= 5 are out of range


class _Toy(tf.Module):
    """Signatures shaped like the exported GPT's, with outputs easy to predict: completions are
    prompt + suffix, so a test can tell versions apart."""

    def __init__(self, suffix):
        super().__init__()
        self.suffix = suffix
        self.table = tf.Variable(tf.reshape(tf.range(VOCAB * 3, dtype=tf.float32) / 7, [VOCAB, 3]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    def serving_default(self, prompts):
        tf.debugging.assert_greater(tf.strings.length(prompts), 0,
                                    message="prompts must not be empty")
        return {"completions": prompts + self.suffix}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompts"),
        tf.TensorSpec([], tf.int32, name="max_new_tokens"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int64, name="seed"),
    ])
    def generate(self, prompts, max_new_tokens, temperature, seed):
        check = tf.debugging.assert_non_negative(max_new_tokens,
                                                 message="max_new_tokens must be >= 0")
        fill = tf.cast(seed % 7, tf.int32) + tf.cast(temperature * 10, tf.int32)
        with tf.control_dependencies([check]):
            token_ids = tf.fill([tf.size(prompts), max_new_tokens], fill)
        return {"completions": prompts + self.suffix, "token_ids": token_ids}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
    def logits(self, token_ids):
        return {"logits": tf.gather(self.table, token_ids)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    def rows(self, prompts):
        """Each prompt, and how many rows the call had: the batch a request was merged into."""
        return {"rows": tf.fill(tf.shape(prompts), tf.size(prompts)), "echo": prompts}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    def first_byte(self, prompts):
        head = tf.strings.substr(prompts, 0, 1)  # half of a 2-byte character: not UTF-8
        return {"head": head, "head_bytes": head}


    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="path")])
    def wait_for(self, path):
        """Writes `path`.started, then polls until a file `path` exists: a prediction that lasts
        as long as a test wants."""
        with tf.control_dependencies([tf.io.write_file(path + ".started", "")]):
            polls = tf.while_loop(lambda n: tf.equal(tf.size(tf.io.matching_files(path)), 0),
                                  lambda n: n + 1, [0])[0]
        return {"polls": polls}


def _save_toy(path, suffix):
    toy = _Toy(suffix)
    signatures = {name: getattr(toy, name)
                  for name in ("serving_default", "generate", "logits", "rows", "first_byte",
                               "wait_for")}
    tf.saved_model.save(toy, str(path), signatures=signatures)


@pytest.fixture(scope="module")
def toy_versions(tmp_path_factory):
    """Two saved versions of the toy model, copied into base directories by the tests."""
    root = tmp_path_factory.mktemp("toy_exports")
    for version in (1, 2):
        _save_toy(root / str(version), f"!v{version}")
    return root


@pytest.fixture(scope="module")
def server(toy_versions, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0, max_request_bytes=64 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def toy_model(toy_versions):
    return tf.saved_model.load(str(toy_versions / "1"))


def call(url, body=None):
    """(HTTP status, decoded JSON body) of a GET, or of a POST of `body` (JSON unless bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def predict(server, body, path="/v1/models/toy"):
    return call(server.url + path + ":predict", body)


def wait_until(condition, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_serving(server):
    """The server still answers a good request correctly."""
    assert predict(server, {"instances": ["ok"]}) == (200, {"predictions": ["ok!v1"]})


def direct(model, signature, **inputs):
    outputs = model.signatures[signature](**inputs)
    return {name: value.numpy() for name, value in outputs.items()}


# --- Status and metadata ---------------------------------------------------------------------


def test_status_is_tf_serving_model_status(server):
    expected = {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]}
    assert call(server.url + "/v1/models/toy") == (200, expected)
    assert call(server.url + "/v1/models/toy/versions/1") == (200, expected)


def test_metadata_lists_signature_defs(server):
    status, body = call(server.url + "/v1/models/toy/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "toy", "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "generate", "logits", "first_byte"} <= set(signatures)
    generate = signatures["generate"]
    assert generate["method_name"] == "tensorflow/serving/predict"
    assert generate["inputs"]["max_new_tokens"]["dtype"] == "DT_INT32"
    assert generate["inputs"]["max_new_tokens"]["tensor_shape"]["dim"] == []
    assert generate["inputs"]["prompts"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert set(generate["outputs"]) == {"completions", "token_ids"}
    assert call(server.url + "/v1/models/toy/versions/1/metadata")[1] == body


# --- Predict: formats equal calling the SavedModel directly ----------------------------------


def test_row_format_single_input(server, toy_model):
    prompts = ["To be, or not", "héllo wörld"]
    expected = [text.decode() for text in direct(toy_model, "serving_default",
                                                 prompts=tf.constant(prompts))["completions"]]
    assert expected == ["To be, or not!v1", "héllo wörld!v1"]
    assert predict(server, {"instances": prompts}) == (200, {"predictions": expected})
    # The same rows as objects, and the signature named explicitly.
    rows = {"signature_name": "serving_default", "instances": [{"prompts": p} for p in prompts]}
    assert predict(server, rows) == (200, {"predictions": expected})


def test_columnar_format_with_scalar_knobs(server, toy_model):
    inputs = {"prompts": ["a", "bc"], "max_new_tokens": 4, "temperature": 0.5, "seed": 9}
    status, body = predict(server, {"signature_name": "generate", "inputs": inputs})
    assert status == 200
    expected = direct(toy_model, "generate", prompts=tf.constant(["a", "bc"]),
                      max_new_tokens=tf.constant(4), temperature=tf.constant(0.5),
                      seed=tf.constant(9, tf.int64))
    assert body["outputs"]["completions"] == [c.decode() for c in expected["completions"]]
    assert body["outputs"]["token_ids"] == expected["token_ids"].tolist() == [[7] * 4] * 2


def test_logits_in_both_formats_equal_the_savedmodel(server, toy_model):
    ids = [[0, 1, 2], [4, 3, 0]]
    expected = direct(toy_model, "logits", token_ids=tf.constant(ids))["logits"]
    status, rows = predict(server, {"signature_name": "logits", "instances": ids})
    assert status == 200
    np.testing.assert_array_equal(np.array(rows["predictions"], np.float32), expected)
    status, columns = predict(server, {"signature_name": "logits", "inputs": {"token_ids": ids}})
    assert status == 200
    np.testing.assert_array_equal(np.array(columns["outputs"], np.float32), expected)
    # A single-input signature also takes the bare value as `inputs`.
    assert predict(server, {"signature_name": "logits", "inputs": ids})[1] == columns


def test_row_format_with_several_outputs_gives_objects(server):
    status, body = predict(server, {"signature_name": "first_byte", "instances": ["ab", "cd"]})
    assert status == 200
    assert body["predictions"] == [
        {"head": "a", "head_bytes": {"b64": base64.b64encode(b"a").decode()}},
        {"head": "c", "head_bytes": {"b64": base64.b64encode(b"c").decode()}},
    ]


def test_b64_inputs_and_non_utf8_outputs(server):
    encoded = {"b64": base64.b64encode("é!".encode()).decode()}
    assert predict(server, {"instances": [encoded]}) == (200, {"predictions": ["é!!v1"]})
    # "é" is 2 bytes; its first byte alone is not UTF-8, so it comes back as base64.
    status, body = predict(server, {"signature_name": "first_byte", "inputs": ["é"]})
    assert status == 200
    assert body["outputs"] == {"head": [{"b64": base64.b64encode(b"\xc3").decode()}],
                               "head_bytes": [{"b64": base64.b64encode(b"\xc3").decode()}]}


def test_fifty_concurrent_requests_all_answered_correctly(server):
    def one(i):
        if i % 2:
            return predict(server, {"instances": [f"prompt {i}"]}), {"predictions": [
                f"prompt {i}!v1"]}
        inputs = {"prompts": [f"p{i}"], "max_new_tokens": i % 5, "temperature": 0.0, "seed": i}
        return (predict(server, {"signature_name": "generate", "inputs": inputs}),
                {"outputs": {"completions": [f"p{i}!v1"], "token_ids": [[i % 7] * (i % 5)]}})

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for (status, body), expected in results:
        assert status == 200
        assert body == expected


def test_a_slow_prediction_does_not_hold_up_other_requests(server, tmp_path):
    flag = tmp_path / "flag"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(predict, server, {"signature_name": "wait_for",
                                                "inputs": str(flag)})
        try:
            wait_until(lambda: os.path.exists(f"{flag}.started"))  # the prediction is running
            assert call(server.url + "/v1/models/toy")[0] == 200
            assert_serving(server)
            assert not pending.done()  # it cannot finish before the flag exists
        finally:
            flag.touch()
        assert pending.result(timeout=60)[0] == 200


def test_one_log_line_per_request(server, caplog):
    with caplog.at_level(logging.INFO, logger="gpt_keras.server"):
        assert_serving(server)
        call(server.url + "/v1/models/nope")
    lines = [r.getMessage() for r in caplog.records if r.name == "gpt_keras.server"]
    assert len(lines) == 2
    assert lines[0].startswith("POST /v1/models/toy:predict 200 ") and lines[0].endswith(" ms")
    assert lines[1].startswith("GET /v1/models/nope 404 ")


# --- Errors: TF Serving's status codes and {"error": ...}, and the server keeps serving -------

PREDICT = "/v1/models/toy:predict"
GENERATE = {"prompts": ["a"], "max_new_tokens": 2, "temperature": 1.0, "seed": 1}
ERRORS = {
    "malformed JSON": (PREDICT, b'{"instances": [', 400, "JSON Parse error"),
    "not an object": (PREDICT, b"[1, 2]", 400, "must be a JSON object"),
    "no instances or inputs": (PREDICT, {"signature_name": "logits"}, 400,
                               "Missing 'inputs' or 'instances' key"),
    "both formats": (PREDICT, {"instances": ["a"], "inputs": ["a"]}, 400, "exactly one of"),
    "unknown signature": (PREDICT, {"signature_name": "nope", "instances": ["a"]}, 400,
                          'Serving signature name: "nope" not found'),
    "signature name not a string": (PREDICT, {"signature_name": 3, "instances": ["a"]}, 400,
                                    "'signature_name' must be a string"),
    "unknown input name": (PREDICT, {"inputs": {"prompt": ["a"]}}, 400,
                           "missing input(s) prompts and unknown input(s) prompt"),
    "missing input": (PREDICT, {"signature_name": "generate", "inputs": {
        k: v for k, v in GENERATE.items() if k != "seed"}}, 400, "missing input(s) seed"),
    "extra key in a row": (PREDICT, {"instances": [{"prompts": "a", "x": 1}]}, 400,
                           "unknown input(s) x"),
    "string for int": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, max_new_tokens="abc")}, 400, "expected an integer (int32), got \"abc\""),
    "float for int": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, seed=1.5)}, 400, "expected an integer (int64), got 1.5"),
    "bool for float": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, temperature=True)}, 400, "expected a number (float32), got true"),
    "number for string": (PREDICT, {"instances": [3]}, 400, "expected a string"),
    "int32 overflow": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, max_new_tokens=2 ** 40)}, 400, "out of range for int32"),
    "list for scalar": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, max_new_tokens=[2])}, 400, "expected shape [] (int32), got a value of shape [1]"),
    "wrong rank": (PREDICT, {"signature_name": "logits", "instances": [1, 2]}, 400,
                   "expected shape [?, ?] (int32), got a value of shape [2]"),
    "ragged rows": (PREDICT, {"signature_name": "logits", "inputs": [[1, 2], [3]]}, 400,
                    "ragged nested lists"),
    "scalar inputs in row format": (PREDICT, {"signature_name": "generate", "instances": [
        GENERATE]}, 400, "has scalar inputs (max_new_tokens, seed, temperature)"),
    "plain value for several inputs": (PREDICT, {"signature_name": "generate", "inputs": ["a"]},
                                       400, "'inputs' is a plain value, but signature 'generate'"),
    "empty instances": (PREDICT, {"instances": []}, 400, "No values in 'instances'"),
    "bad base64": (PREDICT, {"instances": [{"b64": "%%%"}]}, 400, "unable to base64-decode"),
    "ids out of range (graph error)": (PREDICT, {"signature_name": "logits", "instances": [
        [1, 7]]}, 400, "indices[0,1] = 7 is not in [0, 5)"),
    "empty prompt (graph assertion)": (PREDICT, {"instances": ["a", ""]}, 400,
                                       "prompts must not be empty"),
    "negative max_new_tokens (graph assertion)": (PREDICT, {"signature_name": "generate",
        "inputs": dict(GENERATE, max_new_tokens=-1)}, 400, "max_new_tokens must be >= 0"),
    "unknown model": ("/v1/models/other:predict", {"instances": ["a"]}, 404,
                      "Servable not found for request: Latest(other)"),
    "unknown version": ("/v1/models/toy/versions/7:predict", {"instances": ["a"]}, 404,
                        "Servable not found for request: Specific(toy, 7)"),
    "status of unknown model": ("/v1/models/other", None, 404,
                                "Could not find any versions of model other"),
    "status of unknown version": ("/v1/models/toy/versions/7", None, 404,
                                  "Could not find version 7 of model toy"),
    "metadata of unknown version": ("/v1/models/toy/versions/7/metadata", None, 404,
                                    "Specific(toy, 7)"),
    "GET on :predict": ("/v1/models/toy:predict", None, 400, "Malformed request: GET"),
    "classify": ("/v1/models/toy:classify", {"examples": []}, 501, "classify is not implemented"),
    "outside /v1": ("/index.html", None, 404, "Not found: /index.html"),
    "body over the size limit": (PREDICT, json.dumps(
        {"instances": ["x" * 100_000]}).encode(), 413, "Maximum request body size 65536"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_json_and_the_server_keeps_serving(server, case):
    path, body, expected_status, fragment = ERRORS[case]  # no body: a GET
    status, answer = call(server.url + path, body)
    assert status == expected_status
    assert list(answer) == ["error"]
    assert fragment in answer["error"]
    assert_serving(server)


def test_request_just_under_the_size_limit_is_served(server):
    prompt = "x" * 60_000
    assert predict(server, {"instances": [prompt]}) == (200, {"predictions": [prompt + "!v1"]})


# --- Versions ---------------------------------------------------------------------------------


def test_new_versions_are_picked_up_and_old_ones_unloaded(toy_versions, tmp_path):
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0.1) as running:
        latest = running.url + "/v1/models/toy"
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v1"]})
        # A half-written export (temporary name) is ignored...
        shutil.copytree(toy_versions / "2", base / ".tmp-2")
        time.sleep(0.5)
        assert [s["version"] for s in call(latest)[1]["model_version_status"]] == ["1"]
        # ...until it is renamed into place.
        os.rename(base / ".tmp-2", base / "2")
        wait_until(lambda: call(latest)[1]["model_version_status"][0]["version"] == "2")
        assert call(latest)[1]["model_version_status"] == [
            {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                               "error_message": ""}},
            {"version": "1", "state": "END", "status": {"error_code": "OK", "error_message": ""}},
        ]
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v2"]})
        assert predict(running, {"instances": ["a"]}, "/v1/models/toy/versions/2")[1] == {
            "predictions": ["a!v2"]}
        assert predict(running, {"instances": ["a"]}, "/v1/models/toy/versions/1")[0] == 404
        # A version that fails to load is reported and leaves version 2 serving.
        (base / "3").mkdir()
        wait_until(lambda: call(latest + "/versions/3")[0] == 200)
        status = call(latest + "/versions/3")[1]["model_version_status"][0]
        assert status["state"] == "END" and status["status"]["error_code"] == "UNKNOWN"
        assert "Failed to load" in status["status"]["error_message"]
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v2"]})


def copy_with_warmup(source, target, requests):
    """Copies a saved toy version to `target`, with TF Serving's warm-up file holding `requests`:
    `(signature name, {input name: value})` pairs."""
    shutil.copytree(source, target)
    protos = []
    for signature, inputs in requests:
        protos.append(predict_pb2.PredictRequest())
        protos[-1].model_spec.signature_name = signature
        for name, value in inputs.items():
            protos[-1].inputs[name].CopyFrom(tf.make_tensor_proto(value))
    os.makedirs(target / "assets.extra", exist_ok=True)
    write_warmup_requests(protos, str(target / "assets.extra"))


def test_warmup_records_are_replayed_before_a_version_is_served(toy_versions, tmp_path):
    """While version 2's last warm-up record (`wait_for`, held by a file) runs, version 2 is
    neither reported nor served; once it returns, version 2 is AVAILABLE and serves."""
    base, flag = tmp_path / "toy", tmp_path / "flag"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0) as running:
        copy_with_warmup(toy_versions / "2", base / "2", [
            ("serving_default", {"prompts": ["warm"]}), ("wait_for", {"path": str(flag)})])
        versions = running.app[VERSIONS]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            refreshed = pool.submit(versions.refresh)
            try:
                wait_until(lambda: os.path.exists(f"{flag}.started"))  # warming up version 2
                assert call(running.url + "/v1/models/toy/versions/2")[0] == 404
                assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v1"]})
                assert not refreshed.done()
            finally:
                flag.touch()
            refreshed.result(timeout=60)
        assert versions.states[2] == ("AVAILABLE", "") and versions.loaded[2].warmup_records == 2
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v2"]})


def test_a_version_whose_warmup_fails_is_not_served(toy_versions, tmp_path, caplog):
    """A warm-up record the model rejects (the toy refuses an empty prompt) keeps the version
    out of service, with one log line, as in TF Serving; the previous version keeps serving."""
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0) as running:
        copy_with_warmup(toy_versions / "2", base / "2", [
            ("serving_default", {"prompts": ["fine"]}), ("serving_default", {"prompts": [""]})])
        with caplog.at_level(logging.INFO, logger="gpt_keras.server"):
            running.app[VERSIONS].refresh()
        status = call(running.url + "/v1/models/toy/versions/2")[1]["model_version_status"][0]
        assert status["state"] == "END" and status["status"]["error_code"] == "UNKNOWN"
        assert "Warm-up record 1 of" in status["status"]["error_message"]
        assert "prompts must not be empty" in status["status"]["error_message"]
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v1"]})
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "Warm-up record 1" in errors[0]


# --- Batching: TF Serving's --enable_batching rules ----------------------------------------------


def batched(toy_versions, tmp_path, parameters):
    """A server of toy version 1 with batching, `parameters` a `BatchingParameters` text proto."""
    shutil.copytree(toy_versions / "1", tmp_path / "toy" / "1")
    (tmp_path / "batching.txt").write_text(parameters)
    return BackgroundServer(str(tmp_path / "toy"), poll_seconds=0, enable_batching=True,
                            batching_parameters_file=str(tmp_path / "batching.txt"))


def concurrently(server, bodies):
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: predict(server, body), bodies))


def test_batching_merges_concurrent_requests_into_one_call(toy_versions, tmp_path):
    """8 concurrent one-row requests, batches of up to 8 and a 60 s timeout: the batch runs when
    the 8th request arrives, so each request sees 8 rows (1 without batching) and gets its own."""
    with batched(toy_versions, tmp_path, "max_batch_size { value: 8 }\n"
                                         "batch_timeout_micros { value: 60000000 }\n") as running:
        answers = concurrently(running, [{"signature_name": "rows", "instances": [f"p{i}"]}
                                         for i in range(8)])
    assert answers == [(200, {"predictions": [{"rows": 8, "echo": f"p{i}"}]}) for i in range(8)]


def test_batches_are_padded_to_an_allowed_batch_size(toy_versions, tmp_path):
    with batched(toy_versions, tmp_path, "max_batch_size { value: 4 }\n"
                                         "allowed_batch_sizes: [1, 4]\n") as running:
        status, body = predict(running, {"signature_name": "rows", "instances": ["a", "b", "c"]})
        assert (status, body) == (200, {"predictions": [{"rows": 4, "echo": text}
                                                        for text in "abc"]})
        # TF Serving's refusals: scalar inputs, and more rows than a batch holds.
        status, body = predict(running, {"signature_name": "generate", "inputs": GENERATE})
        assert status == 400 and "input tensors must have at least one dimension" in body["error"]
        status, body = predict(running, {"instances": list("abcde")})
        assert status == 400 and "Task size 5 is larger than maximum input batch size 4" in (
            body["error"])
        assert_serving(running)


@pytest.mark.parametrize("pad", [False, True])
def test_inputs_of_different_lengths_in_one_batch(toy_versions, tmp_path, pad, toy_model):
    """Two `logits` requests of 2 and 1 ids in one batch: refused unless
    `pad_variable_length_inputs`, which pads the short one with its first id."""
    parameters = ("max_batch_size { value: 2 }\nbatch_timeout_micros { value: 60000000 }\n"
                  f"pad_variable_length_inputs: {str(pad).lower()}\n")
    with batched(toy_versions, tmp_path, parameters) as running:
        answers = concurrently(running, [{"signature_name": "logits", "instances": ids}
                                         for ids in ([[1, 2]], [[3]])])
    if not pad:
        assert [status for status, _ in answers] == [400, 400]
        assert "different shapes and padding is turned off" in answers[0][1]["error"]
        return
    for (status, body), ids in zip(answers, ([[1, 2]], [[3, 3]])):
        assert status == 200
        np.testing.assert_allclose(body["predictions"], direct(
            toy_model, "logits", token_ids=tf.constant(ids))["logits"], rtol=1e-6)


def test_warmup_runs_through_the_batcher_as_in_tf_serving(toy_versions, tmp_path):
    """A warm-up record with scalar inputs fails under batching, so the version is not served:
    what TF Serving does with an export whose `generate` has scalar knobs."""
    copy_with_warmup(toy_versions / "1", tmp_path / "toy" / "1", [("generate", {
        "prompts": ["a"], "max_new_tokens": np.int32(2), "temperature": np.float32(0),
        "seed": np.int64(1)})])
    (tmp_path / "batching.txt").write_text("max_batch_size { value: 8 }\n")
    with pytest.raises(ValueError, match=r"No loadable version .*Warm-up record 0 .*'generate'.*"
                                         "input tensors must have at least one dimension"):
        make_app(str(tmp_path / "toy"), enable_batching=True,
                 batching_parameters_file=str(tmp_path / "batching.txt"))


@pytest.mark.parametrize("text, message", [
    ("max_batch_size { value: 8 }\nbatch_size: 3\n", "Cannot read the batching parameters"),
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: [2, 4]\n",
     r"allowed_batch_sizes \[2, 4\] must increase and end with max_batch_size \(8\)"),
])
def test_bad_batching_parameters_are_refused(toy_versions, tmp_path, text, message):
    shutil.copytree(toy_versions / "1", tmp_path / "toy" / "1")
    (tmp_path / "batching.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        make_app(str(tmp_path / "toy"), enable_batching=True,
                 batching_parameters_file=str(tmp_path / "batching.txt"))
    with pytest.raises(ValueError, match="only with batching enabled"):
        make_app(str(tmp_path / "toy"), batching_parameters_file=str(tmp_path / "batching.txt"))


def test_num_versions_keeps_older_versions_addressable(toy_versions, tmp_path):
    base = tmp_path / "toy"
    for version in ("1", "2"):
        shutil.copytree(toy_versions / version, base / version)
    with BackgroundServer(str(base), poll_seconds=0, num_versions=2) as running:
        for path, suffix in [("/v1/models/toy", "!v2"), ("/v1/models/toy/versions/2", "!v2"),
                             ("/v1/models/toy/versions/1", "!v1")]:
            assert predict(running, {"instances": ["a"]}, path) == (
                200, {"predictions": ["a" + suffix]})


def test_a_directory_without_versions_is_refused(tmp_path):
    (tmp_path / ".tmp-1").mkdir()
    with pytest.raises(ValueError, match="No loadable version under .*gpt-keras export"):
        make_app(str(tmp_path))
    with pytest.raises(ValueError, match="is not a directory"):
        make_app(str(tmp_path / "missing"))


def test_bad_server_settings_are_refused(toy_versions, tmp_path):
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with pytest.raises(ValueError, match="cannot contain '/' or ':'"):
        make_app(str(base), model_name="a:b")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        make_app(str(base), workers=0)
    with pytest.raises(ValueError, match="num_versions must be at least 1"):
        make_app(str(base), num_versions=0)


BATCHING_PARAMETERS = os.path.join(os.path.dirname(__file__), "..", "export",
                                   "batching_parameters.txt")


@pytest.mark.parametrize("batching", [False, True])
def test_cli_serves_on_localhost_and_stops_on_interrupt(toy_versions, tmp_path, batching):
    """With `--enable-batching --batching-parameters-file`, `generate` (scalar inputs) is
    refused as TF Serving's batching refuses it."""
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    options = ["--enable-batching", "--batching-parameters-file", BATCHING_PARAMETERS]
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt_keras.cli", "serve", str(base), "--port", "0",
         "--poll-seconds", "0", *(options if batching else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"Serving toy (version 1) from {base} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].strip()
        assert call(url + ":predict", {"instances": ["a"]}) == (200, {"predictions": ["a!v1"]})
        status, _ = call(url + ":predict", {"signature_name": "generate", "inputs": GENERATE})
        assert status == (400 if batching else 200)
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    assert "POST /v1/models/toy:predict 200" in errors


# --- A real export of a tiny run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny random GPT with a character tokenizer, exported by `gpt_keras.serving` and served;
    yields (server, the SavedModel loaded directly, vocabulary size)."""
    from gpt_keras import GPT
    from gpt_keras.serving import export_model
    from gpt_keras.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train("To be, or not to be: that is the question.\n")
    model = GPT.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    model.build()
    root = tmp_path_factory.mktemp("real")
    version_dir = export_model(model, tokenizer, str(root / "tiny"))
    with BackgroundServer(str(root / "tiny"), poll_seconds=0) as running:
        yield running, tf.saved_model.load(version_dir), tokenizer.vocab_size


def assert_real_serving(server):
    status, body = predict(server, {"signature_name": "tokenize", "instances": ["to be"]},
                           "/v1/models/tiny")
    assert status == 200 and body["predictions"][0]["lengths"] == 5


def test_real_export_generate_and_logits_equal_the_savedmodel(real):
    server, model, vocab_size = real
    knobs = {"max_new_tokens": 6, "temperature": 0.0, "top_k": 5, "top_p": 1.0, "seed": 3}
    status, body = predict(server, {"signature_name": "generate", "inputs": dict(
        knobs, prompts=["To be", "or not"])}, "/v1/models/tiny")
    assert status == 200
    expected = direct(model, "generate", prompts=tf.constant(["To be", "or not"]),
                      max_new_tokens=tf.constant(6), temperature=tf.constant(0.0),
                      top_k=tf.constant(5), top_p=tf.constant(1.0), seed=tf.constant(3, tf.int64))
    assert body["outputs"] == {"completions": [c.decode() for c in expected["completions"]],
                               "token_ids": expected["token_ids"].tolist()}
    ids = [[0, 1, 2, 3], [vocab_size - 1, 0, 0, 1]]
    status, body = predict(server, {"signature_name": "logits", "instances": ids},
                           "/v1/models/tiny")
    assert status == 200
    np.testing.assert_array_equal(np.array(body["predictions"], np.float32),
                                  direct(model, "logits", token_ids=tf.constant(ids))["logits"])


def test_real_export_default_signature_and_tokenizer_round_trip(real):
    server, _, _ = real
    status, body = predict(server, {"instances": ["To be", "that is"]}, "/v1/models/tiny")
    assert status == 200 and len(body["predictions"]) == 2
    assert all(isinstance(text, str) for text in body["predictions"])
    status, tokens = predict(server, {"signature_name": "tokenize", "instances": ["to be"]},
                             "/v1/models/tiny")
    assert status == 200
    status, texts = predict(server, {"signature_name": "detokenize", "inputs": {
        "token_ids": [tokens["predictions"][0]["token_ids"]]}}, "/v1/models/tiny")
    assert (status, texts) == (200, {"outputs": ["to be"]})


@pytest.mark.parametrize("inputs, fragment", [
    ({"max_new_tokens": 2, "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": 1}, "top_k"),
    ({"max_new_tokens": 10 ** 6, "temperature": 1.0, "top_k": 5, "top_p": 1.0, "seed": 1},
     "max_new_tokens"),
    ({"max_new_tokens": 2, "temperature": -1.0, "top_k": 5, "top_p": 1.0, "seed": 1},
     "temperature"),
    ({"max_new_tokens": "2", "temperature": 1.0, "top_k": 5, "top_p": 1.0, "seed": 1},
     "expected an integer (int32)"),
])
def test_real_export_rejects_bad_knobs_with_400(real, inputs, fragment):
    server, _, _ = real
    status, body = predict(server, {"signature_name": "generate", "inputs": dict(
        inputs, prompts=["To be"])}, "/v1/models/tiny")
    assert status == 400 and fragment in body["error"]
    assert_real_serving(server)


def test_real_export_warmup_records_are_replayed_at_load(real):
    from gpt_keras.serving import read_manifest

    server, _, _ = real
    servable = server.app[VERSIONS].loaded[1]
    assert servable.warmup_records == read_manifest(servable.path)["warmup"]["records"] > 0


def test_real_export_ids_out_of_range_give_400(real):
    server, _, vocab_size = real
    status, body = predict(server, {"signature_name": "logits", "inputs": {
        "token_ids": [[0, vocab_size]]}}, "/v1/models/tiny")
    assert status == 400
    assert f"must lie in [0, {vocab_size})" in body["error"]
    assert_real_serving(server)
