"""`gpt-keras serve`: TF Serving's REST API under real HTTP, against small hand-made SavedModels
(fast, every format and error case) and a real `gpt_keras.serving` export of a tiny model."""

import base64
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from gpt_keras.server import VERSIONS, BackgroundServer, Limits, make_app
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


    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="started"),
                                  tf.TensorSpec([], tf.string, name="release")])
    def hold(self, started, release):
        """Writes to `started` (a FIFO from `fifos`: the test's event that the call runs), then
        polls until a file `release` exists: a prediction as long as a test wants. (It keeps one
        of TensorFlow's inter-op threads busy: on 2 cores, hold one at a time.)"""
        with tf.control_dependencies([tf.io.write_file(started, "")]):
            polls = tf.while_loop(lambda n: tf.equal(tf.size(tf.io.matching_files(release)), 0),
                                  lambda n: n + 1, [0])[0]
        return {"polls": polls}


def _save_toy(path, suffix):
    toy = _Toy(suffix)
    signatures = {name: getattr(toy, name)
                  for name in ("serving_default", "generate", "logits", "rows", "first_byte",
                               "hold")}
    tf.saved_model.save(toy, str(path), signatures=signatures)


@pytest.fixture(scope="module")
def toy_versions(tmp_path_factory):
    """Two saved versions of the toy model, copied into base directories by the tests."""
    root = tmp_path_factory.mktemp("toy_exports")
    for version in (1, 2):
        _save_toy(root / str(version), f"!v{version}")
    return root


# Small bounds the error cases reach with small requests (`Limits` is the server's contract).
LIMITS = Limits(max_request_bytes=64 * 1024, max_rows=4, max_new_tokens=8, max_tokens=32,
                max_response_bytes=2000)


@pytest.fixture(scope="module")
def server(toy_versions, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0, limits=LIMITS) as running:
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


@pytest.fixture
def fifos(tmp_path):
    """`fifos(n)`: n FIFO paths for the toy's `hold` to write to when it starts, and their read
    ends for `started` (open before the call: a writer blocks until a reader has opened)."""
    opened = []

    def make(count):
        paths = [str(tmp_path / f"started-{len(opened) + i}") for i in range(count)]
        for path in paths:
            os.mkfifo(path)
            opened.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        return paths, opened[-count:]

    yield make
    for fd in opened:
        os.close(fd)


def started(fds, count, seconds=60):
    """Waits (at most `seconds`) until `count` of the FIFOs `fds` have been written to; returns
    how many have. A FIFO's write end closing wakes `poll`: an event, not a sleep."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLHUP)
    done, deadline = 0, time.monotonic() + seconds
    while done < count:
        remaining = deadline - time.monotonic()
        for fd, _ in poller.poll(max(remaining, 0) * 1000):
            poller.unregister(fd)
            done += 1
        if remaining <= 0:
            break
    return done


@contextlib.contextmanager
def logged(fragment):
    """An event set when `gpt_keras.server` logs a message containing `fragment`."""
    event, logger = threading.Event(), logging.getLogger("gpt_keras.server")

    class Handler(logging.Handler):
        def emit(self, record):
            if fragment in record.getMessage():
                event.set()

    handler, level = Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield event
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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


def test_a_slow_prediction_does_not_hold_up_other_requests(server, tmp_path, fifos):
    release = tmp_path / "release"
    (path,), fds = fifos(1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(predict, server, {"signature_name": "hold", "inputs": {
            "started": path, "release": str(release)}})
        try:
            assert started(fds, 1)  # the prediction is running
            assert call(server.url + "/v1/models/toy")[0] == 200
            assert_serving(server)
            assert not pending.done()  # it cannot finish before `release` exists
        finally:
            release.touch()
        assert pending.result(timeout=60)[0] == 200


def test_a_short_request_is_not_held_up_by_long_ones(toy_versions, tmp_path, monkeypatch):
    """Three 3-row requests held running (on a Python event), on 3 workers: two run, the third
    waits, and the thread kept for cheaper requests answers a 1-row request meanwhile."""
    shutil.copytree(toy_versions / "1", tmp_path / "toy" / "1")
    release, condition, holding = threading.Event(), threading.Condition(), []
    with BackgroundServer(str(tmp_path / "toy"), poll_seconds=0, workers=3) as running, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        servable = running.app[VERSIONS].loaded[1]
        prepare = servable.prepare

        def held_if_long(body, limits):
            cost, answer = prepare(body, limits)
            if b"long" not in body:
                return cost, answer

            def held():
                with condition:
                    holding.append(cost)
                    condition.notify_all()
                assert release.wait(60)
                return answer()

            return cost, held

        monkeypatch.setattr(servable, "prepare", held_if_long)
        longs = [pool.submit(predict, running, {"instances": ["long"] * 3}) for _ in range(3)]
        try:
            with condition:
                assert condition.wait_for(lambda: len(holding) == 2, timeout=60)
            short = pool.submit(predict, running, {"instances": ["short"]})
            assert short.result(timeout=60) == (200, {"predictions": ["short!v1"]})
            assert holding == [3, 3] and not any(future.done() for future in longs)
        finally:
            release.set()
        assert [future.result(timeout=60) for future in longs] == [
            (200, {"predictions": ["long!v1"] * 3})] * 3


def raw_request(server, data):
    """Sends `data` on a new connection to `server` and returns the socket."""
    connection = socket.create_connection((server.host, server.port), timeout=60)
    connection.sendall(data)
    return connection


def test_slow_or_idle_connections_are_closed_and_a_lost_client_is_one_log_line(
        toy_versions, tmp_path, caplog):
    """Headers that never end are closed after `idle_timeout`, a body that never ends gets 408
    after `read_timeout`, and a client that leaves mid-body is one short log line."""
    shutil.copytree(toy_versions / "1", tmp_path / "toy" / "1")
    limits = Limits(idle_timeout=0.5, read_timeout=0.5)
    head = b"POST /v1/models/toy:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
    with BackgroundServer(str(tmp_path / "toy"), poll_seconds=0, limits=limits) as running, \
            caplog.at_level(logging.INFO, logger="gpt_keras.server"):
        slow_head = raw_request(running, head)
        slow_body = raw_request(running, head + b"\r\n{")
        assert slow_head.recv(1000) == b""  # closed, nothing answered
        answer = slow_body.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"--read-timeout" in answer
        with logged(" 499 ") as lost:
            raw_request(running, head + b"\r\n{").close()
            assert lost.wait(60)
        assert_serving(running)
        slow_head.close()
        slow_body.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    [lost_line] = [r.getMessage() for r in caplog.records if " 499 " in r.getMessage()]
    assert lost_line.startswith("POST /v1/models/toy:predict 499 ")


def test_connections_beyond_the_limit_get_503_and_idle_ones_are_closed(toy_versions, tmp_path,
                                                                       caplog):
    shutil.copytree(toy_versions / "1", tmp_path / "toy" / "1")
    limits = Limits(idle_timeout=0.5, max_connections=2)
    with BackgroundServer(str(tmp_path / "toy"), poll_seconds=0, limits=limits) as running, \
            caplog.at_level(logging.INFO, logger="gpt_keras.server"):
        kept = [http.client.HTTPConnection(running.host, running.port, timeout=60)
                for _ in range(2)]
        for connection in kept:  # answered, so open on the server; then idle (keep-alive)
            connection.request("GET", "/v1/models/toy")
            assert connection.getresponse().read()
        refused = raw_request(running, b"")
        answer = refused.makefile("rb").read()  # until the server closes it
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(
            b'{"error": "Too many open connections; try again later, or start the server with a '
            b'higher --max-connections."}')
        for connection in kept:
            assert connection.sock.recv(1) == b""  # closed by the server once idle
            connection.close()
        refused.close()
    assert [r.getMessage() for r in caplog.records if "Refusing" in r.getMessage()] == [
        "Refusing connections: 2 open (--max-connections)."]


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
    # Bounded work: each refusal names its limit's flag (LIMITS: 4 rows, 8 new tokens, 32
    # tokens, a 2000-byte answer; a toy `logits` element is 25 bytes at most, 3 per position).
    "too many rows": (PREDICT, {"instances": ["a"] * 5}, 400,
                      "asks for 5 rows, over this server's limit of 4; send a smaller request, "
                      "or start the server with a higher --max-rows"),
    "too many new tokens": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, max_new_tokens=9)}, 400, "9 new tokens per row, over this server's limit of 8;"
                                           " send a smaller request, or start the server with a "
                                           "higher --max-new-tokens"),
    "too many tokens": (PREDICT, {"signature_name": "logits", "instances": [[0] * 11] * 3}, 400,
                        "33 tokens (rows × (positions + new tokens)), over this server's limit "
                        "of 32"),
    "answer too large": (PREDICT, {"signature_name": "logits", "instances": [[0] * 14] * 2}, 400,
                         f"asks for {2 * 14 * 3 * 25} bytes of answer, over this server's limit "
                         "of 2000; send a smaller request, or start the server with a higher "
                         "--max-response-bytes"),
    # Malformed values: 400 from the parser, never 500.
    "401-digit integer for a float": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, temperature=10 ** 400)}, 400, "does not fit in float32"),
    "401-digit integer for an int64": (PREDICT, {"signature_name": "generate", "inputs": dict(
        GENERATE, seed=-10 ** 400)}, 400, "is out of range for int64"),
    "lone surrogate": (PREDICT, b'{"instances": ["ok\\ud800"]}', 400,
                       "character 2 of a string is a lone surrogate ('\\ud800')"),
    "5000-digit version": (f"/v1/models/toy/versions/{'9' * 5000}:predict", {"instances": ["a"]},
                           400, "is not a valid version number (an int64)"),
    "int64 overflow in a status version": (f"/v1/models/toy/versions/{2 ** 63}", None, 400,
                                           "is not a valid version number"),
    "nested garbage": (PREDICT, {"instances": [{"prompts": {"x": [1, {"y": None}]}}]}, 400,
                       "expected a string or {\"b64\": ...} (string), got {\"x\": [1, {\"y\""),
    "object for int ids": (PREDICT, {"signature_name": "logits", "inputs": [[{"b64": "AA=="}]]},
                           400, "expected an integer (int32), got {\"b64\": \"AA==\"}"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_json_and_the_server_keeps_serving(server, case):
    path, body, expected_status, fragment = ERRORS[case]  # no body: a GET
    status, answer = call(server.url + path, body)
    assert status == expected_status
    assert list(answer) == ["error"]
    assert fragment in answer["error"]
    assert_serving(server)


def test_an_unexpected_server_error_is_a_500_with_json_and_a_logged_traceback(
        server, monkeypatch, caplog):
    def bug(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.app[VERSIONS].loaded[1], "prepare", bug)
    with caplog.at_level(logging.INFO, logger="gpt_keras.server"):
        assert predict(server, {"instances": ["a"]}) == (
            500, {"error": "Internal error: RuntimeError('a bug')"})
    [error] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.exc_info[0] is RuntimeError


def test_request_just_under_the_size_limit_is_served(server):
    prompt = "x" * 60_000
    assert predict(server, {"instances": [prompt]}) == (200, {"predictions": [prompt + "!v1"]})


# --- Versions ---------------------------------------------------------------------------------


def test_new_versions_are_picked_up_and_old_ones_unloaded(toy_versions, tmp_path):
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0.1) as running:
        latest, versions = running.url + "/v1/models/toy", running.app[VERSIONS]
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v1"]})
        # A half-written export (temporary name) is ignored...
        shutil.copytree(toy_versions / "2", base / ".tmp-2")
        versions.refresh()
        assert [s["version"] for s in call(latest)[1]["model_version_status"]] == ["1"]
        # ...until it is renamed into place, when the poll loads it.
        with logged("Loaded version 2") as loaded:
            os.rename(base / ".tmp-2", base / "2")
            assert loaded.wait(60)
        versions.refresh()  # waits for the poll's refresh to finish switching (one lock)
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
        with logged("Failed to load version 3") as failed:
            (base / "3").mkdir()
            assert failed.wait(60)
        versions.refresh()
        status = call(latest + "/versions/3")[1]["model_version_status"][0]
        assert status["state"] == "END" and status["status"]["error_code"] == "UNKNOWN"
        assert "Failed to load" in status["status"]["error_message"]
        assert predict(running, {"instances": ["a"]}) == (200, {"predictions": ["a!v2"]})


def test_a_version_that_failed_to_load_is_retried_once_its_files_change(toy_versions, tmp_path,
                                                                        caplog):
    """Version 2 seen half-copied (no variables yet) fails to load; it is not tried again while
    its files stay the same, and is loaded and served once the copy completes."""
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0) as running:
        versions = running.app[VERSIONS]
        (base / "2").mkdir()
        shutil.copy2(toy_versions / "2" / "saved_model.pb", base / "2")
        with caplog.at_level(logging.INFO, logger="gpt_keras.server"):
            versions.refresh()
            versions.refresh()
        assert versions.states[2][0] == "END" and "Failed to load" in versions.states[2][1]
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # one try
        shutil.copytree(toy_versions / "2", base / "2", dirs_exist_ok=True)
        versions.refresh()
        assert versions.states[2] == ("AVAILABLE", "")
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


def test_warmup_records_are_replayed_before_a_version_is_served(toy_versions, tmp_path, fifos):
    """While version 2's last warm-up record (`hold`, until a file exists) runs, version 2 is
    neither reported nor served; once it returns, version 2 is AVAILABLE and serves."""
    base, flag = tmp_path / "toy", tmp_path / "flag"
    (path,), fds = fifos(1)
    shutil.copytree(toy_versions / "1", base / "1")
    with BackgroundServer(str(base), poll_seconds=0) as running:
        copy_with_warmup(toy_versions / "2", base / "2", [
            ("serving_default", {"prompts": ["warm"]}),
            ("hold", {"started": path, "release": str(flag)})])
        versions = running.app[VERSIONS]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            refreshed = pool.submit(versions.refresh)
            try:
                assert started(fds, 1)  # warming up version 2
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
    with pytest.raises(ValueError, match="max_rows must be a positive int. Received: max_rows=0; "
                                         "pass another --max-rows"):
        Limits(max_rows=0)
    with pytest.raises(ValueError, match="idle_timeout must be a positive float"):
        Limits(idle_timeout=float("nan"))


def test_serve_flags_default_to_the_server_limits():
    from gpt_keras.cli import build_parser

    args = build_parser().parse_args(["serve", "models/x"])
    assert {field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)} == (
        dataclasses.asdict(Limits()))


BATCHING_PARAMETERS = os.path.join(os.path.dirname(__file__), "..", "export",
                                   "batching_parameters.txt")


@pytest.mark.parametrize("batching", [False, True])
def test_cli_serves_on_localhost_and_stops_on_interrupt(toy_versions, tmp_path, batching):
    """With `--enable-batching --batching-parameters-file`, `generate` (scalar inputs) is
    refused as TF Serving's batching refuses it."""
    base = tmp_path / "toy"
    shutil.copytree(toy_versions / "1", base / "1")
    options = ["--enable-batching", "--batching-parameters-file", BATCHING_PARAMETERS]
    # SIGINT at its default in the child: a pytest-xdist worker may ignore SIGINT, and an ignored
    # signal stays ignored across exec (Python then installs no KeyboardInterrupt handler).
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt_keras.cli", "serve", str(base), "--port", "0",
         "--poll-seconds", "0", *(options if batching else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
def real(char_export):
    """The tiny export shared with tests/test_export.py, served; yields (server, the SavedModel
    loaded directly, vocabulary size)."""
    from gpt_keras.serving import read_manifest

    _, version_dir, _ = char_export
    # Loose token limits, so that requests reach the export's own checks of its knobs.
    limits = Limits(max_new_tokens=2 ** 31 - 1, max_tokens=2 ** 31 - 1)
    with BackgroundServer(os.path.dirname(version_dir), poll_seconds=0, limits=limits) as running:
        yield (running, tf.saved_model.load(version_dir),
               read_manifest(version_dir)["model"]["vocab_size"])


# `generate`'s steering knobs, off (every input of a signature is required, as in TF Serving).
STEERING_OFF = {"repetition_penalty": 1.0, "min_new_tokens": 0, "banned_token_ids": [],
                "bias_token_ids": [], "bias_values": [], "stop_strings": []}


def steering_tensors(inputs):
    return dict(repetition_penalty=tf.constant(inputs["repetition_penalty"], tf.float32),
                min_new_tokens=tf.constant(inputs["min_new_tokens"]),
                banned_token_ids=tf.constant(inputs["banned_token_ids"], tf.int32),
                bias_token_ids=tf.constant(inputs["bias_token_ids"], tf.int32),
                bias_values=tf.constant(inputs["bias_values"], tf.float32),
                stop_strings=tf.constant(inputs["stop_strings"], tf.string))


def assert_real_serving(server):
    status, body = predict(server, {"signature_name": "tokenize", "instances": ["to be"]},
                           "/v1/models/shakespeare")
    assert status == 200 and body["predictions"][0]["lengths"] == 5


def test_real_export_generate_and_logits_equal_the_savedmodel(real):
    server, model, vocab_size = real
    knobs = {"max_new_tokens": 6, "temperature": 0.0, "top_k": 5, "top_p": 1.0, "seed": 3}
    # Knob lists longer than --max-rows (64) are settings, not rows.
    steering = dict(STEERING_OFF, banned_token_ids=[3] * 100,
                    stop_strings=["zz"] * 8, repetition_penalty=1.2)
    status, body = predict(server, {"signature_name": "generate", "inputs": dict(
        knobs, prompts=["To be", "or not"], **steering)}, "/v1/models/shakespeare")
    assert status == 200, body
    expected = direct(model, "generate", prompts=tf.constant(["To be", "or not"]),
                      max_new_tokens=tf.constant(6), temperature=tf.constant(0.0),
                      top_k=tf.constant(5), top_p=tf.constant(1.0), seed=tf.constant(3, tf.int64),
                      **steering_tensors(steering))
    assert body["outputs"] == {"completions": [c.decode() for c in expected["completions"]],
                               "token_ids": expected["token_ids"].tolist(),
                               "logprobs": expected["logprobs"].tolist()}
    ids = [[0, 1, 2, 3], [vocab_size - 1, 0, 0, 1]]
    status, body = predict(server, {"signature_name": "logits", "instances": ids},
                           "/v1/models/shakespeare")
    assert status == 200
    np.testing.assert_array_equal(np.array(body["predictions"], np.float32),
                                  direct(model, "logits", token_ids=tf.constant(ids))["logits"])


def test_real_export_default_signature_and_tokenizer_round_trip(real):
    server, _, _ = real
    status, body = predict(server, {"instances": ["To be", "that is"]}, "/v1/models/shakespeare")
    assert status == 200 and len(body["predictions"]) == 2
    assert all(isinstance(text, str) for text in body["predictions"])
    status, tokens = predict(server, {"signature_name": "tokenize", "instances": ["to be"]},
                             "/v1/models/shakespeare")
    assert status == 200
    status, texts = predict(server, {"signature_name": "detokenize", "inputs": {
        "token_ids": [tokens["predictions"][0]["token_ids"]]}}, "/v1/models/shakespeare")
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
        inputs, prompts=["To be"], **STEERING_OFF)}, "/v1/models/shakespeare")
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
        "token_ids": [[0, vocab_size]]}}, "/v1/models/shakespeare")
    assert status == 400
    assert f"must lie in [0, {vocab_size})" in body["error"]
    assert_real_serving(server)
