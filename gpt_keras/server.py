"""A development server that speaks TF Serving's REST API over exported SavedModels.

    gpt-keras serve MODELS/NAME [--host 127.0.0.1] [--port 8501] [--max-rows 64 ...]
        [--enable-batching [--batching-parameters-file export/batching_parameters.txt]]
    curl -d '{"instances": ["To be, or not"]}' http://127.0.0.1:8501/v1/models/NAME:predict

`MODELS/NAME` holds numeric version directories (`gpt-keras export ... --out MODELS/NAME`). Like
TF Serving's default policy it serves the highest version, polls the directory for new ones,
loads a new version and replays its warm-up records (`assets.extra/tf_serving_warmup_requests`;
a version whose warm-up fails is not served) before switching to it, and then unloads the old
one; a version that fails to load is tried again once its files change (a copy still in
progress). `--enable-batching` merges concurrent requests into batched calls with TF Serving's
rules and parameters file (`gpt_keras.batching`); warm-up requests go through the batching too,
as in TF Serving. Endpoints, JSON formats and error bodies follow TF Serving's REST API
(https://www.tensorflow.org/tfx/serving/api_rest):

    GET  /v1/models/NAME[/versions/N]             model status
    GET  /v1/models/NAME[/versions/N]/metadata    signature defs
    POST /v1/models/NAME[/versions/N]:predict     {"instances": ...} or {"inputs": ...}

Every request and connection is bounded (`Limits`: rows, tokens, response size, time-outs,
connections), each refusal naming the flag that raises it; predictions run cheapest first, with
a thread kept for short requests (`_Scheduler`).

Differences from TF Serving, on purpose: inputs are checked against the signature (unknown input
names are refused; TF Serving ignores them), a version that fails to load leaves the previous one
serving, and a string output that is not valid UTF-8 comes back as {"b64": ...} (TF Serving does
that only for outputs named `*_bytes`, and writes invalid JSON otherwise). Production serving is
TF Serving itself; this server is for development, tests and demos.
"""

import asyncio
import base64
import concurrent.futures
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import math
import os
import re
import resource
import threading
import time

import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2

from gpt_keras.batching import Batcher, BatchingParameters, read_batching_parameters
from gpt_keras.warmup import replay_warmup

DEFAULT_PORT = 8501
DEFAULT_SIGNATURE = "serving_default"

_LOG = logging.getLogger(__name__)

# TF Serving's URL patterns (http_rest_api_handler.cc), case-insensitive like its own.
_PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:(classify|regress|predict)",
                           re.IGNORECASE)
_STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+))?", re.IGNORECASE)
_METADATA_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?/metadata", re.IGNORECASE)

# TensorFlow error codes -> HTTP status, as TF Serving's http_server.cc maps them.
_HTTP_STATUS = {
    tf.errors.CANCELLED: 499, tf.errors.INVALID_ARGUMENT: 400, tf.errors.DEADLINE_EXCEEDED: 504,
    tf.errors.NOT_FOUND: 404, tf.errors.ALREADY_EXISTS: 409, tf.errors.PERMISSION_DENIED: 403,
    tf.errors.RESOURCE_EXHAUSTED: 429, tf.errors.FAILED_PRECONDITION: 400,
    tf.errors.ABORTED: 409, tf.errors.OUT_OF_RANGE: 400, tf.errors.UNIMPLEMENTED: 501,
    tf.errors.UNAVAILABLE: 503, tf.errors.UNAUTHENTICATED: 401,
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request or connection may cost. Each field is the `gpt-keras serve` flag of the
    same name (`max_rows`: `--max-rows`), which a refusal names. Checked before a prediction runs:

    - `max_request_bytes`: body size (HTTP 413);
    - `max_rows`: rows (dimension 0 of the inputs) per request;
    - `max_new_tokens`: the value of an input named `max_new_tokens`;
    - `max_tokens`: rows × (positions of integer `[B, T]` inputs + new tokens);
    - `max_response_bytes`: the JSON answer, bounded from the signature's output shapes
      (`_response_bytes`): a `logits` answer is rows × positions × vocabulary numbers.

    Per connection: `idle_timeout` seconds without a complete request head (an idle keep-alive
    connection, or headers sent slowly) closes it; `read_timeout` seconds to receive a body (HTTP
    408); beyond `max_connections` open connections, a new one gets HTTP 503 and is closed."""

    max_request_bytes: int = 4 * 1024 * 1024
    max_rows: int = 64
    max_new_tokens: int = 1024
    max_tokens: int = 16384
    max_response_bytes: int = 64 * 1024 * 1024
    idle_timeout: float = 30.0
    read_timeout: float = 30.0
    max_connections: int = 256

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kinds = (int, float) if field.type is float else int
            if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
                raise ValueError(f"{field.name} must be a positive {field.type.__name__}. "
                                 f"Received: {field.name}={value!r}; pass another "
                                 f"{_flag(field.name)}.")


def _flag(limit):
    return "--" + limit.replace("_", "-")


class RequestError(Exception):
    """A request the server answers with `status` and `{"error": message}`."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# JSON <-> tensors


def _describe(value):
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _shape_text(shape):
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _json_shape(value):
    """The shape a nested JSON list claims, read along its first elements."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _flatten(value, shape, level, out, where):
    if level == len(shape):
        if isinstance(value, list):
            raise RequestError(f"{where}: a list nested deeper than the shape "
                               f"{_shape_text(shape)} given by the first elements.")
        out.append(value)
        return
    if not isinstance(value, list) or len(value) != shape[level]:
        raise RequestError(f"{where}: ragged nested lists; expected a list of {shape[level]} "
                           f"items at depth {level + 1} (shape {_shape_text(shape)}), got "
                           f"{_describe(value)}.")
    for item in value:
        _flatten(item, shape, level + 1, out, where)


def _element(value, dtype, where):
    """One JSON leaf as a value of `dtype`, or a `RequestError` naming the expected type."""
    if dtype == tf.string:
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate such as "\ud800"
                raise RequestError(f"{where}: character {error.start} of a string is a lone "
                                   f"surrogate ({error.object[error.start]!r}), not Unicode "
                                   "text; send text as UTF-8, or bytes as {\"b64\": ...}.")
        if _is_b64(value):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise RequestError(f"{where}: unable to base64-decode {_describe(value)}.")
    elif dtype == tf.bool:
        if isinstance(value, bool):
            return value
    elif dtype.is_integer:
        if isinstance(value, int) and not isinstance(value, bool):
            if not dtype.min <= value <= dtype.max:
                raise RequestError(f"{where}: {_describe(value)} is out of range for {dtype.name} "
                                   f"[{dtype.min}, {dtype.max}].")
            return value
    elif dtype.is_floating:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # float(): a Python int compares exactly with a float, not with a numpy float32.
            if abs(value) > float(dtype.max) and not (isinstance(value, float)
                                                      and math.isinf(value)):
                raise RequestError(f"{where}: {_describe(value)} does not fit in {dtype.name}.")
            return value
    else:
        raise RequestError(f"{where}: inputs of type {dtype.name} are not supported by this "
                           "server.")
    kind = "a string or {\"b64\": ...}" if dtype == tf.string else (
        "true or false" if dtype == tf.bool else "an integer" if dtype.is_integer else "a number")
    raise RequestError(f"{where}: expected {kind} ({dtype.name}), got {_describe(value)}.")


def _to_tensor(value, spec, where):
    """A JSON value as a tensor matching `spec` (dtype, rank and fixed dimensions)."""
    shape = _json_shape(value)
    expected = spec.shape.as_list()
    if len(shape) != len(expected) or any(e is not None and e != s
                                          for e, s in zip(expected, shape)):
        raise RequestError(f"{where}: expected shape {_shape_text(expected)} "
                           f"({spec.dtype.name}), got a value of shape {_shape_text(shape)}.")
    flat = []
    _flatten(value, shape, 0, flat, where)
    values = [_element(item, spec.dtype, where) for item in flat]
    array = np.array(values, dtype=object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
    return tf.constant(array.reshape(shape), dtype=spec.dtype)


def _row_columns(instances, specs, signature):
    """Row format (`instances`) regrouped as one batched JSON value per input name."""
    scalars = [name for name, spec in specs.items() if spec.shape.rank == 0]
    if scalars:
        raise RequestError(
            f"Signature '{signature}' has scalar inputs ({', '.join(sorted(scalars))}), which the "
            "row format ('instances') cannot express: it batches every input. Send the columnar "
            "format instead: {\"inputs\": {" + ", ".join(f'"{n}": ...' for n in sorted(specs))
            + "}}.")
    if not isinstance(instances, list):
        raise RequestError("Expecting 'instances' to be a list, got " + _describe(instances))
    if not instances:
        raise RequestError("No values in 'instances' array.")
    if not isinstance(instances[0], dict) or _is_b64(instances[0]):
        if len(specs) > 1:
            raise RequestError(
                f"'instances' is a plain list, but signature '{signature}' has several inputs "
                f"({', '.join(sorted(specs))}): send a list of objects with one key per input.")
        for index, instance in enumerate(instances):
            if isinstance(instance, dict) and not _is_b64(instance):
                raise RequestError(f"Expecting a value or list but got an object at item {index} "
                                   "of 'instances'.")
        return {next(iter(specs)): instances}
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict) or _is_b64(instance):
            raise RequestError(f"Expecting an object but got {_describe(instance)} at item "
                               f"{index} of 'instances'.")
        _check_names(instance, specs, signature, f"item {index} of 'instances'")
    return {name: [instance[name] for instance in instances] for name in specs}


def _columns(inputs, specs, signature):
    """Columnar format (`inputs`): a map by input name, or the value of the only input."""
    if isinstance(inputs, dict) and not _is_b64(inputs):
        _check_names(inputs, specs, signature, "'inputs'")
        return inputs
    if len(specs) > 1:
        raise RequestError(
            f"'inputs' is a plain value, but signature '{signature}' has several inputs "
            f"({', '.join(sorted(specs))}): send an object with one key per input.")
    return {next(iter(specs)): inputs}


def _check_names(given, specs, signature, where):
    missing, unknown = sorted(set(specs) - set(given)), sorted(set(given) - set(specs))
    if missing or unknown:
        problems = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown input(s) {', '.join(unknown)}"] if unknown else [])
        raise RequestError(f"{where}: {' and '.join(problems)}; signature '{signature}' takes "
                           f"exactly: {', '.join(sorted(specs))}.")


def _json_string(data, force_b64):
    if not force_b64:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(data).decode("ascii")}


def _to_json(array, name):
    """A numpy output as nested JSON lists; strings as text, or {"b64": ...} for outputs named
    `*_bytes` and for bytes that are not UTF-8."""
    values = array.tolist()
    if array.dtype != object:
        return values
    force_b64 = name.endswith("_bytes")

    def convert(item):
        return [convert(x) for x in item] if isinstance(item, list) else _json_string(
            item, force_b64)

    return convert(values)


def _rows(outputs):
    """Outputs in row format: one entry per batch item (an object when there are several)."""
    batch = {name: array.shape[0] if array.ndim else None for name, array in outputs.items()}
    if None in batch.values() or len(set(batch.values())) > 1:
        raise RequestError(
            f"The outputs cannot be split into rows (batch sizes {batch}); send the request in the "
            "columnar format ({\"inputs\": ...}).")
    columns = {name: _to_json(array, name) for name, array in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: column[i] for name, column in columns.items()}
            for i in range(next(iter(batch.values())))]


def _op_error_message(error):
    """A TensorFlow op error's message without Python's graph-execution preamble and node tags."""
    lines = [line for line in error.message.splitlines()
             if line.strip() and not line.startswith(
                 ("Graph execution error", "Detected at node", "<stack traces", " ", "\t"))]
    return " ".join(lines) or error.message


def _json_width(dtype):
    """The most bytes one element of `dtype` takes in a JSON answer, separator included; strings
    count their quotes only (their text is bounded by the request's size and tokens)."""
    if dtype.is_floating:
        return 25  # "-1.2345678901234567e-38, ": a float32 printed as a Python float
    if dtype.is_integer:
        return len(str(dtype.min)) + 2
    return 7 if dtype == tf.bool else 4


def _response_bytes(outputs, rows, length):
    """A bound on the JSON answer for output specs `outputs`: unknown dimensions are `rows` (the
    first) and `length` (the others: positions + new tokens), so `logits` [B, T, V] counts
    B × T × V numbers."""
    total = 0
    for spec in tf.nest.flatten(outputs):
        dims = spec.shape.as_list() if spec.shape.rank is not None else [None]
        total += math.prod(d if d is not None else rows if i == 0 else max(length, 1)
                           for i, d in enumerate(dims)) * _json_width(spec.dtype)
    return total


_ROW_INPUTS = ("prompts", "texts", "token_ids")


def _check_limits(limits, function, tensors):
    """Refuses (HTTP 400) a request that asks for more than `limits` allow, before it runs;
    returns its cost for scheduling: its tokens, rows × (positions + new tokens), at least one per
    row (a prompt's tokens are not known before the graph runs)."""
    batched = {name: value for name, value in tensors.items() if value.shape.rank}
    # gpt_keras' signatures: the batch is their prompts/texts/ids; other lists (banned ids, stop
    # strings) are per-request settings. Other SavedModels: the longest dimension 0.
    batched = {name: batched[name] for name in _ROW_INPUTS if name in batched} or batched
    rows = max((value.shape[0] for value in batched.values()), default=1)
    positions = max((value.shape[1] for value in tensors.values()
                     if value.dtype.is_integer and value.shape.rank == 2), default=0)
    knob = tensors.get("max_new_tokens")
    new_tokens = (int(np.max(knob.numpy(), initial=0))
                  if knob is not None and knob.dtype.is_integer else 0)
    tokens = rows * (positions + new_tokens)
    for limit, value, what in (
        ("max_rows", rows, "rows"),
        ("max_new_tokens", new_tokens, "new tokens per row"),
        ("max_tokens", tokens, "tokens (rows × (positions + new tokens))"),
        ("max_response_bytes", _response_bytes(function.structured_outputs, rows,
                                               positions + new_tokens), "bytes of answer"),
    ):
        if value > getattr(limits, limit):
            raise RequestError(f"The request asks for {value} {what}, over this server's limit of "
                               f"{getattr(limits, limit)}; send a smaller request, or start the "
                               f"server with a higher {_flag(limit)}.")
    return max(tokens, rows)


# ---------------------------------------------------------------------------------------------
# Versions


class Servable:
    """One loaded version of a SavedModel: its signatures, callable from any thread, through
    `batcher` (a `gpt_keras.batching.Batcher`) if given. Loading replays the version's warm-up
    records (`warmup_records` of them) the same way; `ValueError` if one fails."""

    def __init__(self, version, path, batcher=None):
        self.version = version
        self.path = path
        self._model = tf.saved_model.load(path, tags=["serve"])  # owns the signatures' variables
        self.signatures = dict(self._model.signatures)
        self._batcher = batcher
        self.warmup_records = replay_warmup(path, self._run)

    def _run(self, signature, inputs):
        """Runs `signature` on `{input name: np.ndarray or tensor}`; numpy outputs."""
        if signature not in self.signatures:
            raise ValueError(f"no signature '{signature}' (the model has "
                             f"{', '.join(sorted(self.signatures))})")
        function = self.signatures[signature]
        if self._batcher is not None:
            return self._batcher.run(function, {name: np.asarray(value)
                                                for name, value in inputs.items()})
        return {name: value.numpy() for name, value in function(
            **{name: tf.constant(value) for name, value in inputs.items()}).items()}

    def prepare(self, body, limits):
        """A `:predict` request body (bytes), checked against the signature and `limits`, as
        `(cost, answer)`: its cost (`_check_limits`) and a function giving the JSON answer
        (bytes). `RequestError` if the request does not fit; `answer` raises it if the graph
        rejects the request."""
        try:
            request = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise RequestError(f"JSON Parse error: {error}")
        if not isinstance(request, dict):
            raise RequestError("The request body must be a JSON object such as "
                               '{"instances": [...]} or {"inputs": {...}}; got '
                               + _describe(request))
        name = request.get("signature_name") or DEFAULT_SIGNATURE
        if not isinstance(name, str):
            raise RequestError("'signature_name' must be a string.")
        function = self.signatures.get(name)
        if function is None:
            raise RequestError(f"Serving signature name: \"{name}\" not found in signature def; "
                               f"this model has: {', '.join(sorted(self.signatures))}.")
        if ("instances" in request) == ("inputs" in request):
            raise RequestError("Send exactly one of 'instances' (row format) or 'inputs' "
                               "(columnar format)." if "inputs" in request
                               else "Missing 'inputs' or 'instances' key.")
        specs = function.structured_input_signature[1]
        if not specs:
            raise RequestError(f"Signature '{name}' takes no inputs; :predict cannot call it.")
        row_format = "instances" in request
        values = (_row_columns(request["instances"], specs, name) if row_format
                  else _columns(request["inputs"], specs, name))
        tensors = {key: _to_tensor(values[key], spec, f"Input '{key}' of signature '{name}'")
                   for key, spec in specs.items()}
        cost = _check_limits(limits, function, tensors)
        return cost, functools.partial(self._answer, name, tensors, row_format)

    def _answer(self, name, tensors, row_format):
        try:
            outputs = self._run(name, tensors)
        except tf.errors.OpError as error:
            raise RequestError(_op_error_message(error), _HTTP_STATUS.get(error.error_code, 500))
        if row_format:
            return _json_bytes({"predictions": _rows(outputs)})
        columns = {key: _to_json(array, key) for key, array in outputs.items()}
        return _json_bytes({"outputs": next(iter(columns.values())) if len(columns) == 1
                            else columns})

    @functools.cached_property
    def metadata(self):
        """The signature defs as TF Serving's metadata endpoint writes them (read once)."""
        with open(os.path.join(self.path, "saved_model.pb"), "rb") as f:
            saved_model = saved_model_pb2.SavedModel.FromString(f.read())
        graph = next(g for g in saved_model.meta_graphs if "serve" in g.meta_info_def.tags)
        return {name: json_format.MessageToDict(
                    signature, always_print_fields_with_no_presence=True,
                    preserving_proto_field_name=True)
                for name, signature in graph.signature_def.items()}


class ModelVersions:
    """The versions of one model directory that are loaded, kept in step with its numeric
    subdirectories: the `num_versions` highest that load are served, through `batcher` if given.
    A version that failed to load is tried again once its files change. Safe to read from any
    thread while `refresh` runs (both maps are replaced, never changed in place)."""

    def __init__(self, base_dir, num_versions=1, batcher=None):
        if not os.path.isdir(base_dir):
            raise ValueError(f"{base_dir} is not a directory; pass the --out directory of "
                             "`gpt-keras export` (it holds numeric version directories).")
        if num_versions < 1:
            raise ValueError(f"num_versions must be at least 1. Received: {num_versions}")
        self.base_dir = base_dir
        self.num_versions = num_versions
        self.batcher = batcher
        self.loaded = {}  # version -> Servable
        self.states = {}  # version -> (state, error message), as the status endpoint reports
        self._failed = {}  # version -> `_files(path)` when it last failed to load
        self._refresh_lock = threading.Lock()

    def on_disk(self):
        """Version numbers of the numeric subdirectories (`.tmp-*` and other names ignored)."""
        return sorted(int(entry.name) for entry in os.scandir(self.base_dir)
                      if entry.is_dir() and entry.name.isascii() and entry.name.isdigit())

    def refresh(self):
        """Loads new versions, then switches to them, then drops the versions no longer served."""
        with self._refresh_lock:
            try:
                candidates = self.on_disk()
            except OSError as error:
                _LOG.warning("Cannot list %s (%s); still serving versions %s.", self.base_dir,
                             error, sorted(self.loaded))
                return
            states = dict(self.states)
            serving = {}
            for version in reversed(candidates):
                if len(serving) == self.num_versions:
                    break
                path = os.path.join(self.base_dir, str(version))
                if version in self._failed and self._failed[version] == _files(path):
                    continue  # failed, and unchanged since
                servable = self.loaded.get(version) or self._load(version, path, states)
                if servable is not None:
                    serving[version] = servable
                    states[version] = ("AVAILABLE", "")
            for version in sorted(set(self.loaded) - set(serving)):
                states[version] = ("END", "")
                _LOG.info("Unloaded version %d of %s.", version, self.base_dir)
            self.loaded, self.states = serving, states

    def _load(self, version, path, states):
        start = time.perf_counter()
        files = _files(path)  # before loading: a copy that goes on meanwhile is a change
        try:
            servable = Servable(version, path, self.batcher)
        except Exception as error:  # a broken export must not stop the server
            states[version] = ("END", f"Failed to load {path}: {error}")
            self._failed[version] = files
            _LOG.error("Failed to load version %d from %s: %s", version, path, error)
            return None
        self._failed.pop(version, None)
        _LOG.info("Loaded version %d from %s in %.1f s (%d warm-up records replayed).", version,
                  path, time.perf_counter() - start, servable.warmup_records)
        return servable


def _files(path):
    """(name, size, mtime) of every file under `path`, sorted: changes while a copy goes on."""
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:  # removed meanwhile
                continue
            found.append((os.path.relpath(os.path.join(root, name), path), stat.st_size,
                          stat.st_mtime_ns))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Scheduling


class _Scheduler:
    """Runs blocking calls on `workers` threads, cheapest first. With `keep_one`, one thread is
    kept for a call cheaper than every running one, so a short request does not wait behind
    long ones; without it (batching, where requests wait in the batcher to be merged), every
    thread takes any call."""

    def __init__(self, workers, keep_one):
        self._workers = workers
        self._keep_one = keep_one and workers > 1
        self._pending = []  # heap of (cost, arrival, function, concurrent.futures.Future)
        self._running = []  # costs of the calls running
        self._arrivals = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"predict-{i}", daemon=True).start()

    def submit(self, cost, function):
        """A future of `function()`, run when its turn comes (lower `cost` first)."""
        future = concurrent.futures.Future()
        with self._condition:
            heapq.heappush(self._pending, (cost, next(self._arrivals), function, future))
            self._condition.notify_all()
        return future

    def close(self):
        """Cancels the calls not started; running ones finish on their (daemon) threads."""
        with self._condition:
            self._closed = True
            for *_, future in self._pending:
                future.cancel()
            self._condition.notify_all()

    def _startable(self):
        if not self._pending:
            return False
        if not self._keep_one or len(self._running) < self._workers - 1:
            return True
        return self._pending[0][0] < min(self._running)  # the kept thread: a shorter call

    def _work(self):
        while True:
            with self._condition:
                while not (self._closed or self._startable()):
                    self._condition.wait()
                if self._closed:
                    return
                cost, _, function, future = heapq.heappop(self._pending)
                self._running.append(cost)
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as error:  # handed to the waiting request
                        future.set_exception(error)
            finally:
                with self._condition:
                    self._running.remove(cost)
                    self._condition.notify_all()


# ---------------------------------------------------------------------------------------------
# HTTP

VERSIONS = web.AppKey("versions", ModelVersions)  # app[VERSIONS]: the served versions
MODEL_NAME = web.AppKey("model_name", str)  # app[MODEL_NAME]: the model's name in URLs
LIMITS = web.AppKey("limits", Limits)  # app[LIMITS]: the bounds it enforces


def make_app(base_dir, model_name=None, *, poll_seconds=2.0, num_versions=1, limits=None,
             workers=8, log_requests=True, enable_batching=False, batching_parameters_file=None):
    """The aiohttp application serving the SavedModel versions under `base_dir` as `model_name`
    (default: the directory's name). Loads the served version(s) before returning; polls for new
    ones every `poll_seconds` (0: never). Requests are bounded by `limits` (default `Limits()`).
    Predictions run on `workers` threads (`_Scheduler`), so the event loop keeps answering.
    `enable_batching` batches concurrent requests as TF Serving's `--enable_batching` does
    (`gpt_keras.batching`), with the `BatchingParameters` text file `batching_parameters_file`
    (default: TF Serving's defaults)."""
    model_name = model_name or os.path.basename(os.path.normpath(base_dir))
    limits = limits or Limits()
    if not re.fullmatch(r"[^/:]+", model_name):
        raise ValueError(f"A model name cannot contain '/' or ':' (they delimit URLs). Received: "
                         f"{model_name!r}; pass another name.")
    if workers < 1:
        raise ValueError(f"workers must be a positive integer. Received: workers={workers}")
    if batching_parameters_file and not enable_batching:
        raise ValueError("A batching parameters file is read only with batching enabled "
                         "(--enable-batching).")
    _reserve_inter_op_threads(workers + 2)  # the workers, loading versions, and one spare
    batcher = None
    if enable_batching:
        batcher = Batcher(read_batching_parameters(batching_parameters_file)
                          if batching_parameters_file else BatchingParameters())
    versions = ModelVersions(base_dir, num_versions, batcher)
    versions.refresh()
    if not versions.loaded:
        if batcher is not None:
            batcher.close()
        problems = "; ".join(error for _, error in versions.states.values() if error)
        raise ValueError(f"No loadable version under {base_dir}"
                         + (f" ({problems})" if problems else " (no numeric version directory)")
                         + ". Export one with `gpt-keras export RUN_DIR --out "
                         + f"{base_dir}`.")
    scheduler = _Scheduler(workers, keep_one=batcher is None)

    def servable(name, version):
        served = versions.loaded if name == model_name else {}
        found = served.get(max(served, default=None) if version is None else version)
        if found is None:
            request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
            raise RequestError(f"Servable not found for request: {request}" + (
                "" if name == model_name else f"; this server serves model '{model_name}'"), 404)
        return found

    async def dispatch(request):
        path, method = request.path, request.method
        if method == "POST" and (match := _PREDICT_PATH.fullmatch(path)):
            name, version, verb = match.groups()
            if verb.lower() != "predict":
                raise RequestError(f"{verb} is not implemented by this development server; use "
                                   ":predict.", 501)
            target = servable(name, _version(version))
            body = await _read_body(request, limits.read_timeout)
            cost, answer = await asyncio.to_thread(target.prepare, body, limits)
            # Encoding runs on the worker too: a large `logits` answer must not stall the loop.
            answer = await asyncio.wrap_future(scheduler.submit(cost, answer))
            return web.Response(body=answer, content_type="application/json")
        if method == "GET" and (match := _METADATA_PATH.fullmatch(path)):
            name, version = match.groups()
            target = servable(name, _version(version))
            signature_defs = await asyncio.to_thread(lambda: target.metadata)
            return _json_response({
                "model_spec": {"name": name, "signature_name": "", "version": str(target.version)},
                "metadata": {"signature_def": {"signature_def": signature_defs}},
            })
        if method == "GET" and (match := _STATUS_PATH.fullmatch(path)):
            name, version = match.groups()
            return _json_response(_status(versions, model_name, name, _version(version)))
        if not path.lower().startswith("/v1/"):
            raise RequestError(f"Not found: {path}; the REST API lives under /v1/models/.", 404)
        raise RequestError(f"Malformed request: {method} {path}")

    @web.middleware
    async def errors_and_log(request, handler):
        start = time.perf_counter()
        try:
            response = await handler(request)
        except RequestError as error:
            response = _json_response({"error": str(error)}, error.status)
        except web.HTTPRequestEntityTooLarge as error:
            response = _json_response({"error": f"{error.text} Send smaller requests, or raise "
                                                "the limit (--max-request-bytes)."}, error.status)
        except Exception as error:  # a bug here must not stop the server
            _LOG.exception("Error answering %s %s", request.method, request.path)
            response = _json_response({"error": f"Internal error: {error!r}"}, 500)
        if log_requests:
            _LOG.info("%s %s %d %.1f ms", request.method, request.path, response.status,
                      1000 * (time.perf_counter() - start))
        return response

    async def poll_versions(app):
        async def poll_forever():
            while True:
                await asyncio.sleep(poll_seconds)
                try:
                    await asyncio.to_thread(versions.refresh)
                except Exception:  # keep polling, and serving what is loaded
                    _LOG.exception("Checking %s for new versions failed", base_dir)

        task = asyncio.create_task(poll_forever()) if poll_seconds > 0 else None
        yield
        if task is not None:
            task.cancel()
        scheduler.close()
        if batcher is not None:
            batcher.close()

    app = web.Application(client_max_size=limits.max_request_bytes,
                          middlewares=[errors_and_log])
    app.router.add_route("*", "/{path:.*}", dispatch)
    app.cleanup_ctx.append(poll_versions)
    app[VERSIONS] = versions
    app[MODEL_NAME] = model_name
    app[LIMITS] = limits
    return app


def _reserve_inter_op_threads(count):
    """Gives TensorFlow `count` inter-op threads (default: one per core) if it has not started.
    A graph's loop holds one while it runs: with fewer threads than running predictions, long
    ones hold them all and a short one waits until they end."""
    try:
        tf.config.threading.set_inter_op_parallelism_threads(count)
    except RuntimeError:  # TensorFlow already runs in this process (e.g. a BackgroundServer)
        _LOG.warning("TensorFlow has started already, so its inter-op threads stay as they are; "
                     "set TF_NUM_INTEROP_THREADS=%d before it starts, or a short request can "
                     "wait behind long ones.", count)


def _version(text):
    """A version number from a URL (None if absent); like TF Serving's, an int64."""
    if text is None:
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) >= 2 ** 63:
        raise RequestError(f"Version {_describe(text)} is not a valid version number (an int64).")
    return int(digits)


async def _read_body(request, seconds):
    """The request's body; HTTP 408 if it takes over `seconds`, and a short 499 (not a
    traceback) if the client goes away meanwhile."""
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise RequestError(f"The request body did not arrive within {seconds:g} s; send it "
                           "faster, or start the server with a higher --read-timeout.", 408)
    except ConnectionError:
        raise RequestError("The client disconnected before sending the whole body.", 499)


def _status(versions, model_name, name, version):
    if not name:
        raise RequestError("Missing model name in request.")
    states = versions.states if name == model_name else {}
    if version is not None:
        if version not in states:
            raise RequestError(f"Could not find version {version} of model {name}", 404)
        chosen = [version]
    else:
        if not states:
            raise RequestError(f"Could not find any versions of model {name}", 404)
        chosen = sorted(states, reverse=True)
    return {"model_version_status": [
        {"version": str(v), "state": states[v][0],
         "status": {"error_code": "UNKNOWN" if states[v][1] else "OK",
                    "error_message": states[v][1]}}
        for v in chosen]}


def _json_bytes(value):
    return json.dumps(value).encode("utf-8")


def _json_response(value, status=200):
    return web.Response(body=_json_bytes(value), status=status, content_type="application/json")


_FILE_DESCRIPTORS_SPARE = 256  # beyond the connections: model files, logs, a burst of accepts


def _allow_file_descriptors(max_connections):
    """Raises this process's open-file limit to hold `max_connections` connections, or raises
    `ValueError` if the hard limit is too low."""
    needed = max_connections + _FILE_DESCRIPTORS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"--max-connections {max_connections} needs {needed} open files, "
                             f"over this process's limit of {hard}; lower --max-connections, or "
                             "raise the limit (ulimit -n).")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class _Refusal(asyncio.Protocol):
    """A connection over `max_connections`: HTTP 503 and closed, holding no file for long."""

    ANSWER = _json_bytes({"error": "Too many open connections; try again later, or start the "
                                   "server with a higher --max-connections."})

    def connection_made(self, transport):
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(self.ANSWER), self.ANSWER))
        transport.close()


async def _run_app(app, host, port, started, stop):
    """Serves `app` on host:port until `stop` (an asyncio.Event) is set, with the connection
    bounds of `app[LIMITS]`; calls `started(port)` with the bound port once it accepts
    connections."""
    limits = app[LIMITS]
    _allow_file_descriptors(limits.max_connections)
    # aiohttp's keep-alive timer runs from a connection's start, or its last answer, until a
    # complete request head: it bounds idle connections and slow headers alike.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=limits.idle_timeout)
    await runner.setup()
    handlers, loop = runner.server, asyncio.get_running_loop()
    # asyncio accepts a burst of connections, then sets each up: `starting` counts those not yet
    # in `handlers.connections`, so that the count is exact within a burst too.
    starting, refusing = 0, False

    def registered():
        nonlocal starting
        starting -= 1

    def protocol():
        nonlocal refusing, starting
        over = len(handlers.connections) + starting >= limits.max_connections
        if over and not refusing:  # one log line per episode, not one per refused connection
            _LOG.warning("Refusing connections: %d open (--max-connections).",
                         limits.max_connections)
        refusing = over
        if over:
            return _Refusal()
        starting += 1
        loop.call_soon(registered)  # asyncio queues the handler's connection_made right after
        return handlers()

    listener = None
    try:
        try:
            # A large backlog: a burst of connections waits in the kernel (holding no file of
            # this process) instead of being dropped and retried a second later.
            listener = await loop.create_server(protocol, host, port, backlog=1024)
        except OSError as error:
            raise ValueError(f"Cannot listen on {host}:{port} ({error.strerror or error}); "
                             "choose another port or host.") from None
        started(listener.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()


def _url(host, port):
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(base_dir, host="127.0.0.1", port=DEFAULT_PORT, quiet=False, **options):
    """Serves `base_dir` until interrupted (Ctrl-C); `options` go to `make_app`. Logs one line
    per request (method, path, status, milliseconds) unless `quiet`."""
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    app = make_app(base_dir, log_requests=not quiet, **options)

    def started(bound_port):
        name = app[MODEL_NAME]
        versions = ", ".join(map(str, sorted(app[VERSIONS].loaded)))
        print(f"Serving {name} (version {versions}) from {base_dir} at "
              f"{_url(host, bound_port)}/v1/models/{name}", flush=True)

    async def main():
        await _run_app(app, host, port, started, asyncio.Event())  # never set: until Ctrl-C

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


class BackgroundServer:
    """The server on a background thread, for tests, benchmarks and notebooks:

        with BackgroundServer("models/shakespeare", port=0) as server:
            urllib.request.urlopen(server.url + "/v1/models/shakespeare")

    `port=0` picks a free port; `options` go to `make_app`."""

    def __init__(self, base_dir, host="127.0.0.1", port=0, **options):
        self.app = make_app(base_dir, **options)
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._error = None
        self._loop = self._stop = None
        self._thread = threading.Thread(target=self._main, name="gpt-keras-serve", daemon=True)

    @property
    def url(self):
        return _url(self.host, self.port)

    def _started(self, port):
        self.port = port
        self._ready.set()

    def _main(self):
        async def run():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await _run_app(self.app, self.host, self.port, self._started, self._stop)

        try:
            asyncio.run(run())
        except Exception as error:  # e.g. the port is taken: raised again by __enter__
            self._error = error
            self._ready.set()

    def __enter__(self):
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
