"""A run as a SavedModel that a stock TF Serving runs text-in/text-out: atomic, verified versions.

    gpt-keras export runs/shakespeare --out models/shakespeare        # -> models/shakespeare/1
    gpt_keras.serving.export_saved_model("runs/shakespeare", "models/shakespeare")

Layout (TF Serving's): `BASE/<version>/` holds `saved_model.pb`, `variables/` and `assets.extra/`
with `gpt_keras.json` (the manifest, see `MANIFEST_FILE`), the run's `tokenizer.json` and TF
Serving's warm-up records `tf_serving_warmup_requests` (see `gpt_keras.warmup`).

Signatures (tag `serve`; B is a dynamic batch, every string is UTF-8):

- `serving_default`: `prompts` string `[B]` → `completions` string `[B]`, sampled with
  `DEFAULT_SAMPLING` and a fresh seed per request (REST row format: `{"instances": ["To be"]}`);
- `generate`: `prompts` string `[B]`, scalars `max_new_tokens` int32, `temperature` float32
  (0 = greedy), `top_k` int32 (0 = off), `top_p` float32 (1 = off), `seed` int64 →
  `completions` string `[B]` and `token_ids` int32 `[B, max_new_tokens]`, the new ids padded
  with `PAD_ID` (REST columnar format: scalars cannot be batched in rows);
- `logits`: `token_ids` int32 `[B, T]` (T ≤ context length) → `logits` float32 `[B, T, V]`;
- `score`: `texts` string `[B]` → `log_prob` float32 `[B]` (natural log), `token_count` int32
  `[B]` and `token_log_probs` float32 `[B, N]` (0 beyond a row's count): the log-likelihood of
  each text after the end-of-text id (`gpt_keras.scoring`; `TextGenerator.score` in Python), to
  rank candidates; a text may have at most `context_length` tokens;
- `tokenize`: `prompts` string `[B]` → `token_ids` int32 `[B, N]` padded with `PAD_ID`, and
  `lengths` int32 `[B]`;
- `detokenize`: `token_ids` int32 `[B, N]` (negative ids are padding and skipped) → `texts`
  string `[B]`.

Generation is the decoding core, `gpt_keras.decoding.generate_in_graph`: the tokens of
`generation.generate` for the same settings (greedy: identical text to
`TextGenerator.generate(prompt, n, temperature=0)`), with its conventions. A row stops at the
tokenizer's end-of-text id (not returned); an empty prompt starts from that id (unconditional
sampling); a prompt keeps its last `context_length` tokens; `max_new_tokens` beyond the context
slides the window in the graph. Invalid inputs (the rules of `decoding.RULES`, `max_new_tokens`
above `MAX_NEW_TOKENS`, `logits` ids outside the vocabulary or longer than the context, texts to
`score` longer than the context) fail
with `InvalidArgument` naming the value: HTTP 400 from TF Serving. Generated text that is
not valid UTF-8 (a byte-level token cut mid-character) has U+FFFD in its place, so every output
string can be written into JSON.

Everything is core TensorFlow (no TF Text, no `Xla*` op), so the graph runs with XLA disabled, as
TF Serving runs it, in any TF Serving image, and in a Python process without Keras or gpt_keras.
The KV cache of a request holds its longest prompt and new tokens (at most the context): short
generations do not pay for a full-context cache.
"""

import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

import gpt_keras
from gpt_keras import backends, checkpoints, decoding, scoring, warmup
from gpt_keras.precision import weight_format

SIGNATURES = ("serving_default", "generate", "logits", "score", "tokenize", "detokenize")
MANIFEST_FILE = "gpt_keras.json"  # in `assets.extra/`, which TF Serving does not read
PAD_ID = -1  # pads `token_ids` outputs; `detokenize` skips negative ids
# `serving_default`'s sampling: the run's sample settings (`training.text_sampler`, nanoGPT's).
DEFAULT_SAMPLING = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 200, "top_p": 1.0}
MAX_NEW_TOKENS = 8192  # per request: bounds the `[B, max_new_tokens]` buffer a request allocates
GOLDEN_PROMPTS = ("To be, or not", "")  # the export's check; "" = unconditional
GOLDEN_NEW_TOKENS = 32
LOGITS_TOLERANCE = 1e-5

_TEMPORARY_KIND = "tmp-export"  # `checkpoints.temporary_prefix`: not digits, TF Serving skips it
_REPLACED = re.compile(r"-replaced-(\d+)$")  # a version moved aside by `_install`


def export_saved_model(run_dir, base_dir, version=None, force=False, weights="float32"):
    """Exports the model and tokenizer of the run in `run_dir` as `base_dir/<version>/` (see
    `export_model`), with its weights in format `weights` (`gpt_keras.precision`), and returns
    that path."""
    backends.require_tensorflow("SavedModel export", backends.EXPORT_ELSEWHERE)
    from gpt_keras.precision import with_weights
    from gpt_keras.tokenizers import load_tokenizer
    from gpt_keras.training import load_model, read_run_config

    read_run_config(run_dir)  # a clear error for a directory that is not a run
    _version_directory(base_dir, version, force)  # an error for an existing version comes first
    model = with_weights(load_model(run_dir), weights)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    return export_model(model, tokenizer, base_dir, version, force, source=os.path.abspath(run_dir))


def export_model(model, tokenizer, base_dir, version=None, force=False, source=None):
    """Writes `model` (a built `GPT`) and `tokenizer` (a gpt_keras tokenizer) as version
    `version` (default: one above the highest, 1 if none) of the TF Serving model at `base_dir`,
    and returns the version directory.

    Atomic: everything, TF Serving's warm-up records included, is written into a temporary
    directory beside the versions (a name TF Serving ignores), reloaded in a fresh process the
    way TF Serving loads it (XLA disabled, Keras and gpt_keras unimportable), warmed up with its
    records (each must succeed, as in TF Serving) and compared with `model` (logits within
    `LOGITS_TOLERANCE`; greedy completions of `GOLDEN_PROMPTS` identical to those of the traced
    `generate` run in this process), then renamed into
    place. An existing version raises `ValueError` unless `force=True`, which swaps the new one
    in. Temporary directories left by killed exports on this host are removed. `source` (e.g.
    the run directory) is recorded in the manifest.
    """
    backends.require_tensorflow("SavedModel export", backends.EXPORT_ELSEWHERE)
    vocab_size = model.config.vocab_size
    end_of_text = tokenizer.end_of_text_id
    if tokenizer.vocab_size > vocab_size or not 0 <= end_of_text < vocab_size:
        raise ValueError(
            f"The tokenizer ({tokenizer.vocab_size} ids, end of text {end_of_text}) does not fit "
            f"the model's vocabulary of {vocab_size}; export the tokenizer trained with it."
        )
    target = _version_directory(base_dir, version, force)
    temporary = tempfile.mkdtemp(dir=base_dir,
                                 prefix=checkpoints.temporary_prefix(_TEMPORARY_KIND))
    try:
        signatures = _signatures(model, tokenizer)
        warmup_requests = warmup.warmup_requests(
            {name: _inputs(function) for name, function in signatures.items()}, tokenizer,
            model.config.context_length,
        )
        save_signatures(temporary, signatures, resources=[
            resource for resource in tf.train.TrackableView(tokenizer).descendants()
            if isinstance(resource, tf.saved_model.experimental.TrackableResource)
        ])  # the lookup tables, not the tokenizer: its own tf.functions would be saved too
        graph_ops = op_types(temporary)
        _check_core_ops(graph_ops)
        manifest = _manifest(model, tokenizer, signatures, graph_ops, source,
                             len(warmup_requests))
        extra = os.path.join(temporary, "assets.extra")
        os.makedirs(extra)
        tokenizer.save(extra)
        warmup.write_warmup_requests(warmup_requests, extra)
        with open(os.path.join(extra, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
        _verify(temporary, model, tokenizer, manifest)
        os.chmod(temporary, 0o755)
        _install(temporary, target, force)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def read_manifest(version_dir):
    """The manifest (`assets.extra/gpt_keras.json`) of an exported version, as a dict."""
    path = os.path.join(version_dir, "assets.extra", MANIFEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{version_dir} is not a gpt_keras export (no {path}).")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# The exported functions


def _signatures(model, tokenizer):
    """`{name: concrete function}` of the exported functions, traced."""
    functions = _Signatures(model, tokenizer)
    return {name: getattr(functions, name).get_concrete_function() for name in SIGNATURES}


def save_signatures(directory, signatures, resources=()):
    """Writes the concrete functions `signatures` (`{name: function}`) as the signatures of a
    SavedModel in `directory`. The loaded graph restores only what the saved object tracks, so a
    `tf.Module` tracks the variables the functions capture (Keras variables wrap them, as
    `keras.export.ExportArchive` does) and `resources` (e.g. a tokenizer's lookup tables).
    Unlike `ExportArchive`, nothing is traced again: each function is traced once."""
    captured = {id(v): v for function in signatures.values() for v in function.variables}
    root = tf.Module(name="gpt_keras_export")
    root.captured_variables = list(captured.values())
    root.resources = list(resources)
    tf.saved_model.save(root, directory, signatures=signatures)


def _steering_off():
    """`generate`'s steering inputs, each at its "off" value (the signature has no defaults)."""
    return dict(repetition_penalty=tf.constant(1.0), min_new_tokens=tf.constant(0),
                banned_token_ids=tf.zeros([0], tf.int32), bias_token_ids=tf.zeros([0], tf.int32),
                bias_values=tf.zeros([0]), stop_strings=tf.zeros([0], tf.string))


class _Signatures:
    """The exported functions (see the module docstring)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # Every token's bytes, for stop strings (constants of the graph).
        self.token_bytes = decoding.token_byte_table(tokenizer, model.config.vocab_size)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")],
                 autograph=False)
    def serving_default(self, prompts):
        # A fresh seed per request: the clock, plus a random number for requests in the same µs.
        seed = tf.cast(tf.timestamp() * 1e6, tf.int64) + tf.random.uniform(
            [], maxval=1 << 40, dtype=tf.int64
        )
        # A call of `generate`'s traced function, not a second copy of the decoding graph.
        settings = DEFAULT_SAMPLING
        outputs = self.generate(
            prompts, tf.constant(settings["max_new_tokens"]), tf.constant(settings["temperature"]),
            tf.constant(settings["top_k"]), tf.constant(settings["top_p"]), seed,
            **_steering_off(),
        )
        return {"completions": outputs["completions"]}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompts"),
        tf.TensorSpec([], tf.int32, name="max_new_tokens"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="top_p"),
        tf.TensorSpec([], tf.int64, name="seed"),
        tf.TensorSpec([], tf.float32, name="repetition_penalty"),
        tf.TensorSpec([], tf.int32, name="min_new_tokens"),
        tf.TensorSpec([None], tf.int32, name="banned_token_ids"),
        tf.TensorSpec([None], tf.int32, name="bias_token_ids"),
        tf.TensorSpec([None], tf.float32, name="bias_values"),
        tf.TensorSpec([None], tf.string, name="stop_strings"),
    ], autograph=False)
    def generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed,
                 repetition_penalty, min_new_tokens, banned_token_ids, bias_token_ids,
                 bias_values, stop_strings):
        steering = dict(repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                        banned_token_ids=banned_token_ids, bias_token_ids=bias_token_ids,
                        bias_values=bias_values, stop_strings=stop_strings)
        state = self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed,
                               **steering)
        return {"completions": _cut_at_stop_strings(self._texts(state["out"]), stop_strings),
                "token_ids": state["out"], "logprobs": state["logprobs"]}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")],
                 autograph=False)
    def logits(self, token_ids):
        config = self.model.config
        checks = [
            decoding.check_in_graph(
                tf.shape(token_ids)[1] <= config.context_length,
                f"`token_ids` has {{}} tokens per row, more than the context length "
                f"{config.context_length}. Pass the last {config.context_length} at most.",
                tf.shape(token_ids)[1],
            ),
            decoding.check_in_graph(
                tf.reduce_all(tf.logical_and(token_ids >= 0, token_ids < config.vocab_size)),
                f"`token_ids` must lie in [0, {config.vocab_size}). Received: {{}}", token_ids,
            ),
        ]
        with tf.control_dependencies(checks):
            token_ids = tf.identity(token_ids)
        return {"logits": self.model(token_ids, training=False)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
                 autograph=False)
    def score(self, texts):
        return scoring.score_texts_in_graph(self.model, self.tokenizer, texts)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")],
                 autograph=False)
    def tokenize(self, prompts):
        ids = self.tokenizer.tokenize(prompts)  # ragged [B, None]
        return {
            "token_ids": ids.to_tensor(default_value=PAD_ID),
            "lengths": tf.cast(ids.row_lengths(), tf.int32),
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")],
                 autograph=False)
    def detokenize(self, token_ids):
        return {"texts": self._texts(token_ids)}

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, **steering):
        """The decoding core's final state after each prompt: `out` holds the new ids
        `[B, max_new_tokens]` (padded with `PAD_ID`), `logprobs` theirs. `steering`: the
        knobs of `generate` beyond sampling, every one given."""
        vocab_size = self.model.config.vocab_size
        end_of_text = self.tokenizer.end_of_text_id
        stop_token_ids = tf.constant([end_of_text], tf.int32)
        checks = decoding.check_knobs_in_graph(
            vocab_size, max_new_tokens, temperature, top_k, top_p, stop_token_ids, **steering
        ) + [
            decoding.check_in_graph(
                max_new_tokens <= MAX_NEW_TOKENS,
                f"`max_new_tokens` must be at most {MAX_NEW_TOKENS}. Received: max_new_tokens={{}}",
                max_new_tokens,
            ),
            decoding.check_in_graph(
                tf.size(prompts) > 0, "Pass at least one prompt. Received none."
            ),
        ]
        ids = self.tokenizer.tokenize(prompts)  # ragged [B, None]
        padded = ids.to_tensor(default_value=end_of_text)  # [B, P]
        # An empty prompt becomes [end_of_text] (unconditional), as in `TextGenerator`.
        padded = tf.pad(padded, [[0, 0], [0, tf.maximum(1 - tf.shape(padded)[1], 0)]],
                        constant_values=end_of_text)
        lengths = tf.maximum(tf.cast(ids.row_lengths(), tf.int32), 1)
        with tf.control_dependencies(checks):  # every later op runs after the checks
            steering["stop_strings"] = decoding.stop_string_bytes(steering["stop_strings"])
            steering["token_bytes"] = self.token_bytes
            knobs = decoding.knobs_in_graph(
                vocab_size, temperature, top_k, top_p, decoding.seed_pair(seed), stop_token_ids,
                **steering,
            )
            return decoding.generate_in_graph(
                self.model, tf.identity(padded), lengths, max_new_tokens, knobs
            )

    def _texts(self, token_ids):
        """Int ids `[B, N]` (negative ones skipped) → `[B]` valid UTF-8 strings."""
        texts = self.tokenizer.detokenize(tf.ragged.boolean_mask(token_ids, token_ids >= 0))
        return tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace")


def _cut_at_stop_strings(texts, stop_strings):
    """Each text `[B]` cut just before the first occurrence of any non-empty `stop_strings`."""
    stop_strings = tf.boolean_mask(stop_strings, tf.strings.length(stop_strings) > 0)
    literal = tf.strings.regex_replace(stop_strings, r"[\\^$.|?*+()\[\]{}]", r"\\\0")
    pattern = tf.strings.join(["(?s)(?:", tf.strings.reduce_join(literal, separator="|"), ").*"])
    return tf.cond(tf.size(stop_strings) > 0,
                   lambda: tf.strings.regex_replace(texts, pattern, "", replace_global=False),
                   lambda: texts)


# ----------------------------------------------------------------------------------------------
# Versions and atomic installation


def _version_directory(base_dir, version, force):
    """The path of the version to write; raises `ValueError` for a bad or existing version."""
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ValueError(f"{base_dir} is a file; pass a directory for the model's versions.")
    if os.path.isfile(os.path.join(base_dir, "manifest.json")):  # `export --format tflite`
        raise ValueError(f"{base_dir} holds a TFLite export; choose another --out for "
                         "SavedModel versions.")
    os.makedirs(base_dir, exist_ok=True)
    _remove_abandoned_temporaries(base_dir)  # first: it may put a version back
    if version is None:
        return os.path.join(base_dir, str(max(_versions(base_dir), default=0) + 1))
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"The version must be a positive integer. Received: version={version!r}")
    target = os.path.join(base_dir, str(version))
    if os.path.exists(target) and not force:
        raise ValueError(
            f"{target} already exists; pass --force (force=True) to replace it, or another "
            "version (default: the next free one)."
        )
    return target


def _versions(base_dir):
    """The versions in `base_dir`: directories whose names are all digits, as TF Serving reads."""
    return [int(name) for name in os.listdir(base_dir)
            if name.isdigit() and os.path.isdir(os.path.join(base_dir, name))]


def _remove_abandoned_temporaries(base_dir):
    """Cleans up after exports on this host whose process is gone (killed before it could clean
    up, see `checkpoints.abandoned_temporaries`): a version that `_install` moved aside is put
    back if its place is still empty, else deleted; other temporary directories are deleted."""
    for path in checkpoints.abandoned_temporaries(base_dir, _TEMPORARY_KIND):
        replaced = _REPLACED.search(path)
        target = os.path.join(base_dir, replaced.group(1)) if replaced else None
        if target and not os.path.exists(target):
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _install(temporary, target, force):
    """Renames the verified `temporary` to `target`. With `force`, an existing `target` is first
    renamed out of the way (TF Serving misses the version only between the two renames; if the
    export is killed there, the next export puts it back) and deleted after; it is put back if
    the second rename fails."""
    replaced = None
    if force and os.path.exists(target):
        replaced = f"{temporary}-replaced-{os.path.basename(target)}"
        os.rename(target, replaced)
    try:
        os.rename(temporary, target)
    except OSError as error:
        if replaced:
            os.rename(replaced, target)
        raise ValueError(
            f"Could not move the export into {target} ({error.strerror}): another export wrote "
            "this version meanwhile? Export again (the next free version by default)."
        ) from None
    if replaced:
        shutil.rmtree(replaced)


# ----------------------------------------------------------------------------------------------
# Manifest and verification


def _check_core_ops(graph_ops):
    """Raises `ValueError` for ops that are not core TensorFlow (custom op libraries such as TF
    Text's) or that need XLA."""
    unknown = sorted(op for op in graph_ops if not hasattr(tf.raw_ops, op))
    xla = sorted(op for op in graph_ops if op.startswith("Xla"))
    if unknown or xla:
        raise ValueError(
            f"The serving graph uses ops that a stock TF Serving with XLA disabled cannot run: "
            f"{unknown + xla}. Export with gpt_keras' core-op tokenizers and generation."
        )


def _manifest(model, tokenizer, signatures, graph_ops, source, warmup_records):
    import keras

    contracts = {
        name: {
            "inputs": {key: _spec(spec) for key, spec in _inputs(function).items()},
            "outputs": {key: _spec(tensor) for key, tensor in function.structured_outputs.items()},
        }
        for name, function in signatures.items()
    }
    # The traced `generate` run here, in-process, on the model's own variables: a second
    # decoding graph traced for the check would double its cost (the decoding core is shared,
    # and tests/test_export.py checks it against `TextGenerator`).
    greedy = signatures["generate"](
        prompts=tf.constant(GOLDEN_PROMPTS), max_new_tokens=tf.constant(GOLDEN_NEW_TOKENS),
        temperature=tf.constant(0.0), top_k=tf.constant(1), top_p=tf.constant(1.0),
        seed=tf.constant(0, tf.int64), **_steering_off(),
    )
    texts = [text.decode("utf-8") for text in greedy["completions"].numpy()]
    return {
        "format": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "model": dataclasses.asdict(model.config),
        "weights": weight_format(model),
        "tokenizer": {**tokenizer.describe(), "file": "assets.extra/tokenizer.json"},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "gpt_keras": gpt_keras.__version__},
        "tag": "serve",
        "signatures": contracts,
        "pad_id": PAD_ID,
        "default_sampling": DEFAULT_SAMPLING,
        "max_new_tokens_limit": MAX_NEW_TOKENS,
        "generation": {
            "stop_token_id": tokenizer.end_of_text_id,
            "empty_prompt": "starts from the end-of-text id (unconditional)",
            "long_prompts": f"keep their last {model.config.context_length} tokens",
            "long_generations": "sliding window: after a full context, decoding continues from "
                                f"the last {decoding.slide_keep(model.config.context_length)} "
                                "tokens",
        },
        "op_libraries": [],
        "ops_note": "Core TensorFlow ops only (every op is in tf.raw_ops; no TF Text, no Xla* "
                    "op): runs in stock TF Serving with XLA disabled, without custom op libraries.",
        "op_types": sorted(graph_ops),
        "golden": {"prompts": list(GOLDEN_PROMPTS), "max_new_tokens": GOLDEN_NEW_TOKENS,
                   "temperature": 0.0, "completions": texts},
        "warmup": {"file": f"assets.extra/{warmup.WARMUP_FILE}", "records": warmup_records,
                   "batch_sizes": list(warmup.BATCH_SIZES)},
    }


def _inputs(function):
    """A signature function's inputs, `{name: tf.TensorSpec}`."""
    return {spec.name: spec for spec in function.structured_input_signature[0]}


def _spec(tensor):
    return {"dtype": tensor.dtype.name, "shape": tensor.shape.as_list()}


def op_types(export_dir):
    """Every op type in the SavedModel's graph and functions (loop bodies and branches too)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    functions = {function.signature.name for function in graph.library.function}
    ops = {node.op for node in graph.node}
    ops |= {node.op for function in graph.library.function for node in function.node_def}
    return ops - functions


# Runs in a fresh interpreter, as TF Serving runs a SavedModel: Keras, keras_hub, TF Text and
# gpt_keras cannot be imported, XLA compilation is disabled process-wide
# (`tensorflow::DisableXlaCompilation`, which the model server calls unless started with
# `--xla_cpu_compilation_enabled=true`), the model is loaded by the TF1 Session loader, and
# `load(dir)` returns `run(signature, feeds)`, which checks the input names and dtypes as the
# server does and runs the signature by its tensor names (`load(dir, threads=1)`: one intra-op
# and one inter-op thread, as `--tensorflow_intra_op_parallelism=1
# --tensorflow_inter_op_parallelism=1` configure the server). `replay_warmup(dir, run)` runs the
# version's warm-up records as the server does at load (`gpt_keras.warmup`).
SERVER_LIKE_PROLOGUE = warmup.SOURCE + r"""
import ctypes, json, os, sys
import numpy as np

for _blocked in ("keras", "keras_hub", "tensorflow_text", "gpt_keras"):
    sys.modules[_blocked] = None  # `import keras` now raises ModuleNotFoundError
import tensorflow as tf

ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2")
            )._ZN10tensorflow21DisableXlaCompilationEv()


def load(export_dir, threads=0):
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                      inter_op_parallelism_threads=threads)
    session = tf.compat.v1.Session(graph=tf.Graph(), config=config)
    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)

    def run(signature, feeds):
        spec = meta_graph.signature_def[signature]
        if set(feeds) != set(spec.inputs):
            raise ValueError(f"{signature} takes {sorted(spec.inputs)}, got {sorted(feeds)}")
        for name, value in feeds.items():
            if tf.as_dtype(value.dtype) != tf.as_dtype(spec.inputs[name].dtype):
                raise ValueError(f"{signature}: {name} must be {spec.inputs[name].dtype}")
        fetches = {key: tensor.name for key, tensor in spec.outputs.items()}
        return session.run(fetches, {spec.inputs[k].name: v for k, v in feeds.items()})

    return run
"""

_VERIFY = r"""
request = json.load(sys.stdin)
run = load(sys.argv[1])
try:  # first, as TF Serving does before it serves a version
    warmup = {"records": replay_warmup(sys.argv[1], run), "error": None}
except ValueError as error:
    warmup = {"records": 0, "error": str(error)}
prompts = np.array([p.encode("utf-8") for p in request["prompts"]], object)
greedy = {"max_new_tokens": np.int32(request["max_new_tokens"]), "temperature": np.float32(0),
          "top_k": np.int32(1), "top_p": np.float32(1), "seed": np.int64(0),
          "repetition_penalty": np.float32(1), "min_new_tokens": np.int32(0),
          "banned_token_ids": np.zeros([0], np.int32), "bias_token_ids": np.zeros([0], np.int32),
          "bias_values": np.zeros([0], np.float32), "stop_strings": np.zeros([0], object)}
generated = run("generate", {"prompts": prompts, **greedy})
tokenized = run("tokenize", {"prompts": prompts})["token_ids"]
logits = run("logits", {"token_ids": np.array(request["token_ids"], np.int32)})["logits"]
print(json.dumps({
    "logits": logits.tolist(),
    "completions": [text.decode("utf-8") for text in generated["completions"]],
    "tokenized": tokenized.tolist(),
    "texts": [t.decode("utf-8") for t in run("detokenize", {"token_ids": tokenized})["texts"]],
    "sampled": len(run("serving_default", {"prompts": prompts})["completions"]),
    "keras_loaded": sys.modules["keras"] is not None,
    "warmup": warmup,
}))
"""


def run_like_tf_serving(export_dirs, script, payload=None, timeout=600):
    """Runs `SERVER_LIKE_PROLOGUE + script` in a fresh Python process with `export_dirs` as its
    arguments and JSON `payload` on stdin; returns the JSON object on the last line it prints.
    Raises `ValueError` with the end of its stderr if it fails."""
    result = subprocess.run(
        [sys.executable, "-c", SERVER_LIKE_PROLOGUE + script, *export_dirs],
        input=json.dumps(payload), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise ValueError(
            "The exported SavedModel failed when loaded as TF Serving loads it (fresh process, "
            f"XLA disabled, no Keras):\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _verify(export_dir, model, tokenizer, manifest):
    """Raises `ValueError` unless the export, loaded as TF Serving loads it, runs every warm-up
    record of the manifest and gives `model`'s logits, the manifest's golden greedy completions
    and `tokenizer`'s ids and texts."""
    config = model.config
    token_ids = np.random.default_rng(0).integers(
        0, config.vocab_size, [2, min(config.context_length, 12)]
    ).astype(np.int32)
    golden = manifest["golden"]
    served = run_like_tf_serving([export_dir], _VERIFY, {
        "prompts": golden["prompts"], "max_new_tokens": golden["max_new_tokens"],
        "token_ids": token_ids.tolist(),
    })
    problems = []
    if served["warmup"]["error"] or served["warmup"]["records"] != manifest["warmup"]["records"]:
        problems.append(served["warmup"]["error"] or f"{served['warmup']['records']} warm-up "
                        f"records ran, not {manifest['warmup']['records']}")
    expected = np.asarray(model(token_ids))
    difference = np.max(np.abs(np.array(served["logits"]) - expected))
    tolerance = LOGITS_TOLERANCE
    if weight_format(model) == "bfloat16":
        # The served graph's kernels (Grappler fuses ops) round bfloat16 activations at other
        # points than eager Keras: allow a few bfloat16 ulps (2**-8) of the largest logit.
        tolerance = 2**-5 * max(1.0, float(np.max(np.abs(expected))))
    if not difference <= tolerance:
        problems.append(f"logits differ from Keras by {difference:.3g} > {tolerance:.3g}")
    if served["completions"] != golden["completions"]:
        problems.append(f"greedy completions {served['completions']!r} differ from Keras' "
                        f"{golden['completions']!r}")
    ids = [tokenizer.tokenize(prompt).numpy().tolist() for prompt in golden["prompts"]]
    texts = [tokenizer.detokenize(tf.constant(row, tf.int32)).numpy().decode("utf-8", "replace")
             for row in ids]
    if [[i for i in row if i != PAD_ID] for row in served["tokenized"]] != ids or (
        served["texts"] != texts
    ):
        problems.append("tokenize/detokenize differ from the tokenizer's")
    if served["sampled"] != len(golden["prompts"]) or served["keras_loaded"]:
        problems.append("serving_default did not answer every prompt without Keras")
    if problems:
        raise ValueError(f"The export in {export_dir} failed verification: {'; '.join(problems)}.")
