"""TF Serving's warm-up records for an exported version: written at export, replayed at load.

TF Serving (https://www.tensorflow.org/tfx/serving/saved_model_warmup) reads
`<version>/assets.extra/tf_serving_warmup_requests`, a TFRecord file of at most 1000
`tensorflow.serving.PredictionLog` protos, and runs each one's request against the freshly loaded
version before it serves it: the first real request then finds the graph's functions instantiated
and its kernels created. If a record fails, TF Serving does not serve the version.

`gpt_keras.serving.export_model` writes one `predict_log` record per signature and batch size in
`BATCH_SIZES`, with a `PROMPT_TOKENS`-token prompt and the inputs of `EXAMPLE_INPUTS`; its verification replays them as TF Serving does (`replay_warmup`), and so does
`gpt-keras serve` before it serves a version.
"""

import inspect

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

WARMUP_FILE = "tf_serving_warmup_requests"  # in `assets.extra/`: WarmupConsts::kRequestsFileName
MAX_RECORDS = 1000  # TF Serving refuses a file with more (WarmupConsts::kMaxNumRecords)
# The batch sizes warmed up: the `allowed_batch_sizes` of export/batching_parameters.txt, to which
# TF Serving's batching pads every merged batch (tests/test_export.py checks they agree).
BATCH_SIZES = (1, 2, 4, 8)
# The prompt of every record. One length is enough: the graph has no per-shape compilation, and on
# shakespeare-char a second, context-long prompt took the first request from 1.15x to 1.08x of
# steady state, while on GPT-2 small each context-long record costs a 1,024-token prefill per row
# (minutes of export verification and load for the whole grid).
PROMPT_TOKENS = 4

# The inputs of each signature's warm-up requests, given a batch of prompts (bytes `[B]`) and
# token ids (int32 `[B, T]`, T = `PROMPT_TOKENS`; the prompts are their text). The one place to change when a signature's inputs
# change: `warmup_requests` refuses an export whose signatures take other inputs.
EXAMPLE_INPUTS = {
    "serving_default": lambda prompts, ids: {"prompts": prompts},
    # Sampling with top-k, top-p and every steering knob on.
    "generate": lambda prompts, ids: {"prompts": prompts, "max_new_tokens": 4,
                                      "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 0,
                                      "repetition_penalty": 1.2, "min_new_tokens": 1,
                                      "banned_token_ids": [0], "bias_token_ids": [1],
                                      "bias_values": [0.5], "stop_strings": ["\n\n"]},
    "logits": lambda prompts, ids: {"token_ids": ids},
    "score": lambda prompts, ids: {"texts": prompts},
    "tokenize": lambda prompts, ids: {"prompts": prompts},
    "detokenize": lambda prompts, ids: {"token_ids": ids},
}


def warmup_requests(signature_inputs, tokenizer, context_length):
    """`PredictRequest`s warming up every signature for each batch size in `BATCH_SIZES`.

    `signature_inputs` maps each signature name to its inputs, `{name: tf.TensorSpec}`; the
    table's values are cast to their dtypes. Raises `ValueError` if the table's signatures,
    input names or shapes differ from them."""
    if set(signature_inputs) != set(EXAMPLE_INPUTS):
        raise ValueError(
            f"The warm-up table gpt_keras.warmup.EXAMPLE_INPUTS covers signatures "
            f"{sorted(EXAMPLE_INPUTS)}, but the export has {sorted(signature_inputs)}; add or "
            "remove their entries."
        )
    requests = []
    for signature, specs in signature_inputs.items():
        for batch_size in BATCH_SIZES:
            length = min(PROMPT_TOKENS, context_length)
            ids = np.tile(np.arange(length) % tokenizer.end_of_text_id, [batch_size, 1])
            text = tokenizer.detokenize(tf.constant(ids[0], tf.int32))
            prompts = [text.numpy()] * batch_size
            feeds = EXAMPLE_INPUTS[signature](prompts, ids)
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for name, value in _checked(signature, feeds, specs).items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            requests.append(request)
    if len(requests) > MAX_RECORDS:
        raise ValueError(f"{len(requests)} warm-up requests, more than TF Serving's limit of "
                         f"{MAX_RECORDS}; warm up fewer BATCH_SIZES.")
    return requests


def _checked(signature, feeds, specs):
    """`feeds` as arrays of the dtypes of `specs`; `ValueError` if names or shapes differ."""
    if set(feeds) != set(specs):
        raise ValueError(
            f"The warm-up inputs of '{signature}' in gpt_keras.warmup.EXAMPLE_INPUTS are "
            f"{sorted(feeds)}, but the signature takes {sorted(specs)}; update the table."
        )
    arrays = {}
    for name, spec in specs.items():
        array = np.asarray(feeds[name], object if spec.dtype == tf.string
                           else spec.dtype.as_numpy_dtype)
        if not spec.shape.is_compatible_with(array.shape):
            raise ValueError(
                f"The warm-up input '{name}' of '{signature}' in gpt_keras.warmup.EXAMPLE_INPUTS "
                f"has shape {list(array.shape)}; the signature takes {spec.shape}. Update the "
                "table."
            )
        arrays[name] = array
    return arrays


def write_warmup_requests(requests, extra_dir):
    """Writes `requests` (`PredictRequest`s) as `extra_dir/tf_serving_warmup_requests`, one
    `PredictionLog` record each."""
    with tf.io.TFRecordWriter(f"{extra_dir}/{WARMUP_FILE}") as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def read_warmup_requests(version_dir):
    """The warm-up requests of a SavedModel version, `[(signature name, {input: np.ndarray})]` in
    file order; `[]` if it has no warm-up file. Raises `ValueError` for a record that is not a
    `PredictionLog` with a `predict_log`, or for more than `MAX_RECORDS` records."""
    import os

    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, "assets.extra", WARMUP_FILE)
    if not os.path.exists(path):
        return []
    requests = []
    for index, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        if index == MAX_RECORDS:
            raise ValueError(f"{path} has more than {MAX_RECORDS} records, TF Serving's limit.")
        try:
            log = prediction_log_pb2.PredictionLog.FromString(record)
        except DecodeError:
            raise ValueError(f"Record {index} of {path} is not a PredictionLog.") from None
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"Record {index} of {path} is a {log.WhichOneof('log_type')}; "
                             "gpt_keras replays predict_log records only.")
        request = log.predict_log.request
        requests.append((request.model_spec.signature_name or "serving_default",
                         {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}))
    return requests


def replay_warmup(version_dir, run):
    """Runs the version's warm-up requests in order, as TF Serving does before it serves a version:
    `run(signature name, {input: np.ndarray})` answers one. Returns how many ran; raises
    `ValueError` naming the first record that fails."""
    requests = read_warmup_requests(version_dir)
    for index, (signature, feeds) in enumerate(requests):
        try:
            run(signature, feeds)
        except Exception as error:  # an op error, or inputs the signature does not take
            message = " ".join((getattr(error, "message", None) or str(error) or repr(error))
                               .split())
            raise ValueError(f"Warm-up record {index} of {version_dir} ('{signature}') failed: "
                             f"{message[:500]}") from None
    return len(requests)


# `read_warmup_requests` and `replay_warmup` as source, for the server-like process of
# `gpt_keras.serving.run_like_tf_serving`, which cannot import gpt_keras.
SOURCE = (f"WARMUP_FILE = {WARMUP_FILE!r}\nMAX_RECORDS = {MAX_RECORDS}\n"
          + inspect.getsource(read_warmup_requests) + inspect.getsource(replay_warmup))
