"""TFLite export for on-device generation: builtin ops only, so the plain LiteRT interpreter runs
it (the pip interpreters have no Flex delegate), with tokenization left outside the file.

Shapes: B batch, T tokens, V `vocab_size`, S = `context_length` (the KV-cache length of every
signature), N `max_new_tokens`; `cache` has the layout of `GPT.init_cache` (`[L, 2, B, ...]`,
S slots) with B dynamic.

Signatures of the `.tflite` file (ids int32, other floats float32; every input is required):

- `logits`: `token_ids` `[B, T]` (T ≤ S) → `logits` `[B, T, V]`.
- `prefill`: `token_ids` `[B, T]` at positions `0 .. T-1` → `logits` `[B, T, V]` and a fresh
  `cache` holding them.
- `decode`: `token` `[B]` at `position` `[]` (< S), `cache` → `logits` `[B, V]` (for the next
  position) and the `cache` with slot `position` written.
- `generate`: the decoding core (`gpt_keras.decoding`, sliding window included) in one call:
  `token_ids` `[B, P]` (prompts right-padded, P ≤ S), `lengths` `[B]` (each in [1, P]),
  `max_new_tokens` `[]`, `temperature` `[]` (0 = greedy), `top_k` `[]` (0 = no cut), `top_p`
  `[]` (1 = no cut), `seed` `[2]` (a 62-bit seed s as `[s >> 31, s & 0x7FFFFFFF]`: `[0, s]`
  for s < 2**31), `offset` `[]` (absolute position of the prompt's first token; it only moves
  the random numbers), `stop_token_ids` `[n]` (-1 entries ignored), the steering knobs of
  `gpt_keras.decoding` (`repetition_penalty` `[]`, `min_new_tokens` `[]`, `banned_token_ids`
  `[n]` and `bias_token_ids` `[m]` with -1 entries ignored, `bias_values` `[m]`,
  `stop_strings` `[n, MAX_STOP_BYTES]` UTF-8 bytes with -1 after each one's end) and `tail`
  `[B, K]` (the stop-string bytes of the previous call: all -1 at the start) →
  `new_token_ids` `[B, N]` (-1 after a row's last id; a stop token is not returned),
  `new_token_logprobs` `[B, N]`, `num_new_tokens` `[B]`, `tail`, and the window to continue
  from: `window_ids` `[B, W]`, `window_lengths` `[B]`, `window_offset` `[]` (pass them as
  `token_ids`, `lengths` and `offset` of the next call, with `tail`, as `TFLiteGenerator` does
  when it streams). The tokens are those of `gpt_keras.generation.generate` for the same seed.
  The tokenizer's per-token bytes are stored in the file (stop strings are matched on them).

Prefill and decode positions are shared by the batch (one scalar), as in `GPT.call_with_cache`.

`export_tflite(run_dir, out_dir)` writes `out_dir/` = `model[-float16|-int8].tflite`,
`tokenizer.json` (the run's vocabulary file; `gpt_keras.tokenizers.load_tokenizer(out_dir)`)
and `manifest.json` (config, tokenizer with its sha256, quantization, signatures, sizes).
`TFLiteGenerator(path)` runs text generation through the interpreter.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from gpt_keras import backends, decoding, generation, serving
from gpt_keras.config import GPTConfig

LOGITS_SIGNATURE = "logits"
PREFILL_SIGNATURE = "prefill"
DECODE_SIGNATURE = "decode"
GENERATE_SIGNATURE = "generate"
SIGNATURES = (LOGITS_SIGNATURE, PREFILL_SIGNATURE, DECODE_SIGNATURE, GENERATE_SIGNATURE)

# `export_tflite(quantize=...)` → file name.
MODEL_FILES = {None: "model.tflite", "float16": "model-float16.tflite", "int8": "model-int8.tflite"}
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "gpt_keras.tflite/1"

# Largest |TFLite - Keras| logit difference a float32 export may show (`export_tflite` checks).
FLOAT32_TOLERANCE = 1e-4


def convert_to_tflite(model, quantize=None, token_bytes=None):
    """The bytes of a `.tflite` file with the signatures of the module docstring, converted
    through a SavedModel written by `serving.save_signatures` (`from_concrete_functions` on
    Keras 3 functions gave uninitialised weights) with `TFLITE_BUILTINS` only: conversion fails
    if an op would need the Flex delegate.

    `quantize`: None (float32), "float16" (weights stored in float16) or "int8" (dynamic range:
    int8 weights, float activations). `token_bytes`: the tokenizer's
    `decoding.token_byte_table`, stored in the file for stop strings (None: they never match)."""
    backends.require_tensorflow("TFLite export", backends.EXPORT_ELSEWHERE)
    _check_quantize(quantize)
    with tempfile.TemporaryDirectory() as directory:
        serving.save_signatures(directory, {
            name: tf.function(function, input_signature=inputs,
                              autograph=False).get_concrete_function()
            for name, (function, inputs) in _device_endpoints(model, token_bytes).items()
        })
        converter = tf.lite.TFLiteConverter.from_saved_model(
            directory, signature_keys=list(SIGNATURES)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def export_tflite(run_dir, out_dir, quantize=None, force=False, weights="float32"):
    """Converts the model of `run_dir` (see `convert_to_tflite`) and writes `out_dir/` with the
    `.tflite` file, `tokenizer.json` and `manifest.json`; returns the `.tflite` path. `weights`:
    "float32", or "int8" (gpt_keras' weight-only int8, `gpt_keras.precision`: the file then
    decodes with the numerics of the in-process int8 model, unlike `quantize="int8"`).

    The directory is built beside `out_dir` and renamed into place, so `out_dir` is never seen
    half-written. An existing TFLite export in `out_dir` raises `ValueError` unless `force`;
    any other non-empty `out_dir` (e.g. SavedModel versions) always does. Before
    that, the file runs in the LiteRT interpreter and its logits are compared with Keras'
    (float32: at most `FLOAT32_TOLERANCE` apart, else `RuntimeError`; quantized files record the
    difference in the manifest)."""
    backends.require_tensorflow("TFLite export", backends.EXPORT_ELSEWHERE)
    from gpt_keras.tokenizers import load_tokenizer
    from gpt_keras.training import load_model

    from gpt_keras.precision import with_weights

    _check_quantize(quantize)
    if weights == "bfloat16":
        raise ValueError("TFLite's builtin kernels have no bfloat16: export --weights float32 "
                         "with --quantize float16 instead (half the bytes).")
    if weights == "int8" and quantize:
        raise ValueError("--weights int8 already quantizes the weights; drop --quantize.")
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):  # e.g. SavedModel versions
            raise ValueError(f"{out_dir} holds files that are not a TFLite export; --force only "
                             "replaces a TFLite export. Choose another --out.")
        if not force:
            raise ValueError(f"{out_dir} already exists; pass force=True (--force) to replace it.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory; choose another --out.")
    model = with_weights(load_model(run_dir), weights)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    content = convert_to_tflite(
        model, quantize, decoding.token_byte_table(tokenizer, model.config.vocab_size))
    difference = _logit_difference(content, model)
    if quantize is None and difference > FLOAT32_TOLERANCE:
        raise RuntimeError(
            f"gpt_keras internal error: the unquantized TFLite logits differ from Keras by "
            f"{difference:.2e} (more than {FLOAT32_TOLERANCE})."
        )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=".tflite-")
    try:
        name = MODEL_FILES[quantize] if weights == "float32" else "model-weights-int8.tflite"
        _write_file(os.path.join(temporary, name), content)
        tokenizer.save(temporary)
        manifest = {
            "format": MANIFEST_FORMAT,
            "model_file": name,
            "model_bytes": len(content),
            "model_sha256": hashlib.sha256(content).hexdigest(),
            "quantization": quantize,
            "weights": weights,
            "config": dataclasses.asdict(model.config),
            "tokenizer": {"file": "tokenizer.json", **tokenizer.describe()},
            "signatures": _signature_specs(content),
            "max_abs_logit_difference_vs_keras": difference,
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        }
        _write_file(os.path.join(temporary, MANIFEST_FILE),
                    json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        os.chmod(temporary, 0o755)
        _replace_directory(temporary, out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return os.path.join(out_dir, name)


class TFLiteGenerator:
    """Text generation with a file written by `export_tflite`, through the LiteRT interpreter;
    `tokenizer.json` and `manifest.json` are read from beside it.

    With a float32 file, tokens equal those of `gpt_keras.generation.generate` (and
    `TextGenerator`) for the same prompt, settings and seed, past the context too (the window
    slides as there). Streaming calls the `generate` signature once per chunk, re-reading the
    window, so chunking does not change the tokens (up to float rounding).

    Args:
        path: the `.tflite` file.
        num_threads: interpreter threads (None: LiteRT's default).
    """

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        from gpt_keras.tokenizers import load_tokenizer

        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        if not os.path.isfile(self.path):
            raise ValueError(f"No TFLite file at {path}. Write one with `gpt-keras export "
                             "--format tflite` (or `gpt_keras.tflite.export_tflite`).")
        self.manifest = _read_manifest(self.directory)
        if self.manifest["model_file"] != os.path.basename(self.path):
            raise ValueError(
                f"{os.path.join(self.directory, MANIFEST_FILE)} describes "
                f"{self.manifest['model_file']}, not {os.path.basename(self.path)}: keep each "
                "export's files together, as `export_tflite` wrote them."
            )
        self.tokenizer = load_tokenizer(self.directory)
        if self.tokenizer.describe()["sha256"] != self.manifest["tokenizer"]["sha256"]:
            raise ValueError(
                f"{os.path.join(self.directory, 'tokenizer.json')} is not the tokenizer "
                f"{self.path} was exported with (sha256 differs); export again."
            )
        self.config = GPTConfig(**self.manifest["config"])
        self.interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        self._runner = self.interpreter.get_signature_runner(GENERATE_SIGNATURE)
        self._tail_width = self._runner.get_input_details()["tail"]["shape_signature"][1]
        self.token_ids, self.logprobs = [], []

    def check_source(self, directory):
        """Raises `ValueError` unless `directory` holds this file or is a run directory whose
        tokenizer is the one the file was exported with."""
        from gpt_keras.tokenizers import load_tokenizer

        if os.path.isdir(directory) and os.path.samefile(directory, self.directory):
            return
        tokenizer_dir = os.path.join(directory, "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            raise ValueError(
                f"{directory} is neither the directory of {self.path} nor a run directory; "
                "pass either one."
            )
        if load_tokenizer(tokenizer_dir).describe()["sha256"] != self.manifest["tokenizer"][
            "sha256"
        ]:
            raise ValueError(
                f"{self.path} was exported from another run: its tokenizer differs from "
                f"{tokenizer_dir}'s."
            )

    def generate(self, prompt, max_new_tokens, return_logprobs=False, **kwargs):
        """The generated text (without the prompt) for a `str` prompt, or with `return_logprobs`
        a `gpt_keras.generation.Completion`; keyword arguments as `stream`, decoded in as few
        calls as the context allows."""
        kwargs.setdefault("chunk_size", None)
        text = "".join(self.stream(prompt, max_new_tokens, **kwargs))
        if not return_logprobs:
            return text
        return generation.Completion(text, self.token_ids, self.logprobs)

    def stream(self, prompt, max_new_tokens, *, chunk_size=16, **kwargs):
        """An iterator over the new text of `prompt` (a `str`), never half a character. As
        `TextGenerator.stream`: the tokenizer's end-of-text id is the default stop token and
        starts an empty prompt. Other keyword arguments are those of `stream_ids`."""
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` must be a `str`. Received: prompt={prompt!r}")
        end_of_text = self.tokenizer.end_of_text_id
        ids = [int(i) for i in np.asarray(self.tokenizer.tokenize(prompt)).reshape(-1)]
        if not ids and end_of_text is not None:
            ids = [end_of_text]
        if end_of_text is not None:
            kwargs.setdefault("stop_token_ids", (end_of_text,))
        stop_strings = decoding.check_stop_strings(kwargs.get("stop_strings", ()))
        chunks = self.stream_ids(ids, max_new_tokens, chunk_size=chunk_size, **kwargs)
        return self._texts(chunks, generation.IncrementalText(self._bytes, stop_strings))

    def stream_ids(self, prompt_ids, max_new_tokens, *, chunk_size=None, **knobs):
        """An iterator over lists of new ids after one prompt (a sequence of ids), `chunk_size`
        (None: all) per interpreter call. Knobs as `gpt_keras.generation.generate` (checked
        here, before iteration): `temperature`, `top_k`, `top_p`, `seed`, `stop_token_ids`,
        `repetition_penalty`, `min_new_tokens`, `banned_token_ids`, `logit_bias`,
        `stop_strings`; a stop token ends the generation and is dropped, a stop string ends it
        after the token that completed it. `self.token_ids` and `self.logprobs` hold the ids
        yielded so far and their log-probabilities."""
        context, vocab_size = self.config.context_length, self.config.vocab_size
        (prompt,), _, max_new_tokens, chunk_size = decoding.check_arguments(
            [prompt_ids], None, max_new_tokens, chunk_size, vocab_size
        )
        checked = decoding.check_knobs(vocab_size, **knobs)
        feeds = {
            "temperature": np.float32(checked["temperature"]),
            "top_k": np.int32(checked["top_k"]),
            "top_p": np.float32(checked["top_p"]),
            "seed": decoding.seed_pair(tf.constant(checked["seed"], tf.int64)).numpy(),
            "stop_token_ids": np.array(checked["stop_token_ids"] or [-1], np.int32),
            "repetition_penalty": np.float32(checked["repetition_penalty"]),
            "min_new_tokens": np.int32(checked["min_new_tokens"]),
            "banned_token_ids": np.array(checked["banned_token_ids"] or [-1], np.int32),
            "bias_token_ids": np.array(checked["bias_token_ids"] or [-1], np.int32),
            "bias_values": np.array(checked["bias_values"] or [0.0], np.float32),
            "stop_strings": checked["stop_strings"],
        }
        (prompt,) = decoding.crop_prompts([prompt], context, context)
        self.token_ids, self.logprobs = [], []
        return self._calls(prompt, max_new_tokens, chunk_size, feeds)

    def _calls(self, window, remaining, chunk_size, feeds):
        offset = 0  # absolute position of window[0]
        tail = np.full([1, self._tail_width], -1, np.int32)  # no new text yet
        min_new_tokens = int(feeds.pop("min_new_tokens"))
        while remaining > 0:
            count = min(remaining, chunk_size or remaining)
            out = self._runner(
                token_ids=np.asarray([window], np.int32),
                lengths=np.array([len(window)], np.int32),
                max_new_tokens=np.int32(count), offset=np.int32(offset), tail=tail,
                # Each call counts its new tokens from 0: ask for those still missing.
                min_new_tokens=np.int32(max(0, min_new_tokens - len(self.token_ids))), **feeds,
            )
            emitted = out["num_new_tokens"][0]
            new = out["new_token_ids"][0, :emitted].tolist()
            self.token_ids.extend(new)
            self.logprobs.extend(out["new_token_logprobs"][0, :emitted].tolist())
            if new:
                yield new
            if len(new) < count:  # a stop token or string ended the row
                return
            remaining -= count
            window = out["window_ids"][0, : out["window_lengths"][0]]
            offset, tail = int(out["window_offset"]), out["tail"]

    @staticmethod
    def _texts(chunks, row):
        for ids in chunks:
            piece = row.feed(ids)
            if piece:
                yield piece
        piece = row.finish()
        if piece:
            yield piece

    def _bytes(self, ids):
        return self.tokenizer.detokenize(tf.constant(ids, tf.int32)).numpy()


# ----------------------------------------------------------------------------------------------
# Helpers


def _device_endpoints(model, token_bytes=None):
    """`{signature: (function, input specs)}` of the module docstring (`token_bytes`: see
    `convert_to_tflite`)."""
    config = model.config
    context, vocab_size = config.context_length, config.vocab_size
    if token_bytes is None:
        token_bytes = (np.zeros([vocab_size, 1], np.uint8), np.zeros([vocab_size], np.int32))
    tail_width = decoding.tail_width(token_bytes[0].shape[1])

    def logits(token_ids):
        return {"logits": model(token_ids, training=False)}

    def prefill(token_ids):
        step_logits, cache = model.call_with_cache(
            token_ids, model.init_cache(tf.shape(token_ids)[0]), 0
        )
        return {"logits": step_logits, "cache": cache}

    def decode(token, position, cache):
        step_logits, cache = model.call_with_cache(tf.expand_dims(token, 1), cache, position)
        return {"logits": step_logits[:, 0], "cache": cache}

    def generate(token_ids, lengths, max_new_tokens, temperature, top_k, top_p, seed, offset,
                 stop_token_ids, repetition_penalty, min_new_tokens, banned_token_ids,
                 bias_token_ids, bias_values, stop_strings, tail):
        knobs = decoding.knobs_in_graph(
            vocab_size, temperature, top_k, top_p, seed, stop_token_ids,
            repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
            banned_token_ids=banned_token_ids, bias_token_ids=bias_token_ids,
            bias_values=bias_values, stop_strings=stop_strings,
            token_bytes=tuple(tf.constant(table) for table in token_bytes),
        )
        # A static cache length: the loop's shapes stay fixed in the interpreter.
        state = decoding.generate_in_graph(
            model, token_ids, lengths, max_new_tokens, knobs, cache_length=context, offset=offset,
            in_place=False,  # InplaceUpdate is not a TFLite builtin
            tail=tail,
        )
        window_ids, window_lengths, window_offset = decoding.resume_window(state)
        return {
            "new_token_ids": state["out"],
            "new_token_logprobs": state["logprobs"],
            "num_new_tokens": state["emitted"],
            "window_ids": window_ids,
            "window_lengths": window_lengths,
            "window_offset": window_offset,
            "tail": state["tail"],
        }

    return {
        LOGITS_SIGNATURE: (logits, [_ids("token_ids", (None, None))]),
        PREFILL_SIGNATURE: (prefill, [_ids("token_ids", (None, None))]),
        DECODE_SIGNATURE: (
            decode, [_ids("token", (None,)), _ids("position", ()), _cache_spec(model)]
        ),
        GENERATE_SIGNATURE: (generate, [
            _ids("token_ids", (None, None)),
            _ids("lengths", (None,)),
            _ids("max_new_tokens", ()),
            tf.TensorSpec((), tf.float32, name="temperature"),
            _ids("top_k", ()),
            tf.TensorSpec((), tf.float32, name="top_p"),
            _ids("seed", (2,)),
            _ids("offset", ()),
            _ids("stop_token_ids", (None,)),
            tf.TensorSpec((), tf.float32, name="repetition_penalty"),
            _ids("min_new_tokens", ()),
            _ids("banned_token_ids", (None,)),
            _ids("bias_token_ids", (None,)),
            tf.TensorSpec((None,), tf.float32, name="bias_values"),
            _ids("stop_strings", (None, decoding.MAX_STOP_BYTES)),
            _ids("tail", (None, tail_width)),
        ]),
    }


def _ids(name, shape):
    return tf.TensorSpec(shape, tf.int32, name=name)


def _cache_spec(model):
    """`GPT.init_cache`'s shape and dtype with a dynamic batch."""
    shape = list(model.init_cache(1).shape)
    shape[2] = None  # [L, 2, B, H, S, K]
    return tf.TensorSpec(shape, model.compute_dtype, name="cache")


def _check_quantize(quantize):
    if quantize not in MODEL_FILES:
        raise ValueError(
            "`quantize` must be None, 'float16' or 'int8'. Received: "
            f"quantize={quantize!r}"
        )


def _logit_difference(content, model):
    """Max |TFLite - Keras| over the logits of two fixed random sequences."""
    from ai_edge_litert.interpreter import Interpreter

    config = model.config
    ids = np.random.default_rng(0).integers(
        0, config.vocab_size, (2, min(config.context_length, 32))
    ).astype(np.int32)
    runner = Interpreter(model_content=content).get_signature_runner(LOGITS_SIGNATURE)
    return float(np.max(np.abs(runner(token_ids=ids)["logits"] - np.asarray(model(ids)))))


def _signature_specs(content):
    """`{signature: {"inputs"|"outputs": {name: {"dtype", "shape"}}}}` read back from the file
    (-1 marks a dynamic dimension)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    specs = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        specs[name] = {
            kind: {
                tensor: {"dtype": np.dtype(d["dtype"]).name,
                         "shape": [int(n) for n in d["shape_signature"]]}
                for tensor, d in sorted(details.items())
            }
            for kind, details in [("inputs", runner.get_input_details()),
                                  ("outputs", runner.get_output_details())]
        }
    return specs


def _write_file(path, content):
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _replace_directory(source, destination):
    """Renames `source` to `destination`, replacing an existing one (moved aside first, then
    deleted)."""
    if os.path.isdir(destination) and os.listdir(destination):
        aside = tempfile.mkdtemp(dir=os.path.dirname(destination), prefix=".tflite-old-")
        os.rename(destination, os.path.join(aside, "old"))
        os.rename(source, destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, destination)  # also over an empty directory


def _read_manifest(directory):
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot read {path} ({error}): a TFLite file needs the manifest that "
            "`export_tflite` writes beside it."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a gpt_keras TFLite manifest ({MANIFEST_FORMAT}).")
    return manifest
