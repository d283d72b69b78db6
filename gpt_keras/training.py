"""Training a `GPT` on a text corpus with `model.fit` under a `tf.distribute` strategy, in a run
directory that holds everything needed to resume, evaluate, generate and export."""

import dataclasses
import functools
import json
import math
import os
import random
import shutil
import tempfile
import time
import zipfile
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from gpt_keras import backends
from gpt_keras import callbacks as run_callbacks
from gpt_keras import checkpoints, data, distribute, lora, sft
from gpt_keras.config import (  # noqa: F401 (TrainConfig: public here too)
    CADENCE_FIELDS, DATA_FORMATS, MIXED_PRECISION, TOKENIZERS, GPTConfig, TrainConfig,
)
from gpt_keras.model import GPT, OldSinusoidalModelError
from gpt_keras.tokenizers import ByteLevelBPETokenizer, CharTokenizer, load_tokenizer

def decay_groups(model):
    """Splits `model.trainable_variables` into `(decayed, not_decayed)`: AdamW's weight decay
    applies to the weight matrices of attention, MLP and an untied output head; biases, LayerNorm
    scales/offsets and the token/position embeddings are not decayed (GPT-2/minGPT practice)."""
    embeddings = {id(v) for v in model.token_embedding.trainable_variables}
    if model.position_embedding is not None:  # None with rotary positions
        embeddings |= {id(v) for v in model.position_embedding.trainable_variables}
    decayed, not_decayed = [], []
    for variable in model.trainable_variables:
        matrix = len(variable.shape) >= 2 and id(variable) not in embeddings
        (decayed if matrix else not_decayed).append(variable)
    return decayed, not_decayed


@keras.saving.register_keras_serializable(package="gpt_keras")
class WarmupCosineSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak` over `warmup_steps` updates, then cosine decay to `minimum`
    at `total_steps`, then `minimum` (nanoGPT's schedule; `total_steps` is its lr_decay_iters)."""

    def __init__(self, peak, minimum, warmup_steps, total_steps):
        self.peak = peak
        self.minimum = minimum
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.peak * step / max(self.warmup_steps, 1)
        progress = ops.clip(
            (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0
        )
        cosine = self.minimum + 0.5 * (self.peak - self.minimum) * (1 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "minimum": self.minimum, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}


def learning_rate_schedule(config):
    """The `WarmupCosineSchedule` of `config`, counted in optimizer updates; it decays over
    `decay_steps` (`max_steps` when None)."""
    return WarmupCosineSchedule(
        config.learning_rate, config.min_learning_rate, config.warmup_steps,
        config.decay_steps or config.max_steps,
    )


class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with the arithmetic of its `update_step` and weight decay, in fewer graph ops:
    each variable's Adam update is one fused op (`ResourceApplyAdam`), and its decay uses the
    step's learning rate instead of evaluating the schedule again. Keras' ~50 ops per variable were
    60% of the training step's graph, and the first step traces and XLA-lowers every one of them.
    Same variables in the same order: checkpoints are unchanged."""

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        if self._use_weight_decay(variable):
            variable.assign_sub(variable * (learning_rate * self.weight_decay))
        step = ops.cast(self.iterations + 1, dtype)
        constant = functools.partial(tf.constant, dtype=dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=ops.power(constant(self.beta_1), step),
            beta2_power=ops.power(constant(self.beta_2), step),
            lr=learning_rate, beta1=constant(self.beta_1), beta2=constant(self.beta_2),
            epsilon=constant(self.epsilon), grad=ops.cast(gradient, dtype),
        )

    def _apply_weight_decay(self, variables):
        """Nothing: `update_step` decays each variable (Keras calls this before the updates)."""


def build_optimizer(model, config):
    """AdamW with the schedule and clipping of `config`, decay groups applied. (Gradient
    accumulation is the model's job: see `distribute.GlobalBatchSteps`.)"""
    optimizer = AdamW(
        learning_rate=learning_rate_schedule(config),
        weight_decay=config.weight_decay,
        beta_1=config.beta_1,
        beta_2=config.beta_2,
        global_clipnorm=config.clip_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_list=decay_groups(model)[1])
    return optimizer


@dataclasses.dataclass
class Run:
    """A run directory and what lives in it."""

    directory: str
    model_config: GPTConfig
    train_config: TrainConfig
    token_file: Optional[data.TokenFile] = None

    def path(self, *names):
        return os.path.join(self.directory, *names)

    config_path = property(lambda self: self.path("run.json"))
    tokenizer_dir = property(lambda self: self.path("tokenizer"))
    data_dir = property(lambda self: self.path("data"))
    checkpoint_dir = property(lambda self: self.path("checkpoints"))
    metrics_path = property(lambda self: self.path("metrics.csv"))
    plot_path = property(lambda self: self.path("loss.png"))
    samples_path = property(lambda self: self.path("samples.txt"))
    model_path = property(lambda self: self.path("model.keras"))
    tensorboard_dir = property(lambda self: self.path("tensorboard"))

    @property
    def tokens_per_step(self):
        config = self.train_config
        return config.batch_size * config.gradient_accumulation_steps * self.model_config.context_length


def read_run_config(directory):
    """The `run.json` of a run directory as a dict; `ValueError` if it is not a run directory."""
    path = os.path.join(directory, "run.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not a gpt_keras run directory (no run.json). "
                         "Pass the --run-dir of a `gpt-keras train` run.")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from a copy of the "
                         "run or train a new run.") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("model"), dict):
        raise ValueError(f"{path} has no \"model\" settings object; it is not a gpt_keras "
                         "run.json.")
    return settings


def load_model(directory):
    """The trained `GPT` of a run directory: `model.keras` if training finished, else the newest
    intact checkpoint's weights (see `checkpoints.load_newest`; a LoRA run's adapters are
    merged into its --init-from base, see `gpt_keras.lora`)."""
    settings = read_run_config(directory)
    model_path = os.path.join(directory, "model.keras")
    if os.path.isfile(model_path):
        try:
            return keras.saving.load_model(model_path, compile=False)
        except OldSinusoidalModelError as error:
            raise ValueError(f"{model_path}: {error}") from None
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{model_path} cannot be read ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}): it is damaged "
                             "or truncated. Delete it to load the newest checkpoint instead, or "
                             "restore it.") from None
    model = GPT(**settings["model"])
    model.build()
    train_settings = settings.get("train") or {}
    if train_settings.get("lora_rank"):
        model.set_weights(load_source(settings["source"]["init_from"])[0].get_weights())
        lora.enable(model, train_settings["lora_rank"], train_settings["lora_alpha"],
                    train_settings["lora_targets"])
    newest, _ = checkpoints.load_newest(os.path.join(directory, "checkpoints"), model)
    if newest is None:
        raise ValueError(f"{directory} has no trained weights yet (no model.keras, no checkpoint).")
    return lora.merge(model) if train_settings.get("lora_rank") else model


def create_run(run_dir, model, tokenizer, source):
    """Makes a run directory for an already trained `model` (e.g. an imported GPT-2): `run.json`
    (model config and `source`), `tokenizer/` and `model.keras`, which `generate`, `evaluate`
    and the exporters read. Written in a temporary directory and renamed into place; refuses an
    existing `run_dir`."""
    if os.path.exists(run_dir):
        raise ValueError(f"{run_dir} already exists; pass a new run directory.")
    parent = os.path.dirname(os.path.abspath(run_dir))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=".run-")
    try:
        run = Run(temporary, model.config, TrainConfig())
        _write_json(run.config_path, {"model": dataclasses.asdict(model.config), "source": source})
        tokenizer.save(run.tokenizer_dir)
        _save_inference_model(model, run.model_path)
        os.chmod(temporary, 0o755)
        os.rename(temporary, run_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return run_dir


def _train_tokenizer(kind, vocab_size, texts):
    """A tokenizer of `kind` trained on `texts`, an iterable of `str` chunks."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return ByteLevelBPETokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"--tokenizer must be one of {TOKENIZERS}. Received: {kind!r}")


def _write_json(path, value):
    text = json.dumps(value, indent=2, sort_keys=True).encode("utf-8")
    checkpoints.atomic_write(path, lambda f: f.write(text))


def load_source(path):
    """`(model, tokenizer)` to fine-tune from: a run directory, or a Hugging Face GPT-2 directory
    (with its `vocab.json`/`merges.txt` or `encoder.json`/`vocab.bpe`)."""
    from gpt_keras.hf import load_gpt2
    from gpt_keras.tokenizers import GPT2Tokenizer

    if os.path.isfile(os.path.join(path, "run.json")):
        return load_model(path), load_tokenizer(os.path.join(path, "tokenizer"))
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_gpt2(path), GPT2Tokenizer.from_directory(path)
    raise ValueError(f"--init-from {path}: neither a run directory (run.json) nor a Hugging Face "
                     "checkpoint (config.json).")


def _restores_random_states(function):
    """Makes `function` leave Python's and NumPy's global random states as it found them (Keras
    draws unseeded initializer seeds from Python's; `keras.utils.set_random_seed` sets both)."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        python_random, numpy_random = random.getstate(), np.random.get_state()
        try:
            return function(*args, **kwargs)
        finally:
            random.setstate(python_random)
            np.random.set_state(numpy_random)

    return wrapped


@_restores_random_states
def train(run_dir, data_paths, model_config, train_config, tokenizer="char",
          tokenizer_vocab_size=None, validation_paths=None, replicas=None, sample=None,
          verbose=True, init_from=None, callbacks=(), data_format="text", fields=sft.FIELDS):
    """Trains (or resumes) the run in `run_dir` and returns its `Run`.

    `model_config.vocab_size` is replaced by the tokenizer's. With `init_from` (see
    `load_source`), the model's config, weights and tokenizer come from there instead (fine-tuning;
    `train_config.freeze_blocks` keeps the first blocks fixed; `train_config.lora_rank` trains
    LoRA adapters only, merged in `model.keras`: `gpt_keras.lora`). Every setting is checked before
    anything is written. Re-running after an interruption continues from the newest checkpoint
    with the same step, learning rate, optimizer state, data position and dropout RNG. A resumed
    run may change the settings of `CADENCE_FIELDS`: a larger `max_steps` trains further (after
    `decay_steps` the learning rate stays at `min_learning_rate`); other changes raise
    `ValueError` naming them. `sample(model) -> str` (default: `text_sampler`) is printed every
    `sample_every` steps and at the last one. `verbose` prints the corpus, a line per phase and
    a progress bar. `callbacks`: extra Keras callbacks for `fit` (one epoch ends at every step
    where something is logged, validated, sampled or saved), called before the run's own.

    `data_format="prompt-completion"`: supervised fine-tuning on the JSONL pairs of `data_paths`
    (and `validation_paths`), their fields named by `fields` (`(prompt, completion)`), with the
    loss on completion tokens only (`gpt_keras.sft`); the format and fields are settings of the
    run, so a resumed run with others is refused.

    Global state: the dtype policy and the Python and NumPy random states are as before the
    call; TensorFlow's and Keras' global seeds are left set to `train_config.seed` (as by
    `keras.utils.set_random_seed`, which makes the initial weights reproducible). A start first
    deletes the temporaries of killed writers and completes a run killed after its newest
    checkpoint (`callbacks.finish_checkpoint`).
    """
    backends.require_tensorflow("gpt_keras.training.train", backends.USE_FIT)
    say = print if verbose else _silent
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}. Received: {data_format!r}")
    pairs = tuple(fields) if data_format == "prompt-completion" else None
    strategy = distribute.make_strategy(replicas)  # splits the CPU: before TF runs any op
    if train_config.batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"The global batch size {train_config.batch_size} does not divide over "
            f"{strategy.num_replicas_in_sync} replicas; use a multiple of "
            f"{strategy.num_replicas_in_sync}."
        )
    train_files = data.resolve_text_files(data_paths)
    validation_files = data.resolve_text_files(validation_paths) if validation_paths else None
    source_model = source_tokenizer = None
    if init_from is not None:
        source_model, source_tokenizer = load_source(init_from)
        model_config, tokenizer = source_model.config, source_tokenizer.kind
    if train_config.lora_rank and init_from is None:
        raise ValueError("--lora-rank adapts a trained model: pass --init-from (a run directory "
                         "or a Hugging Face GPT-2 directory), or --lora-rank 0 to train all "
                         "weights.")
    if train_config.freeze_blocks > model_config.num_layers:
        raise ValueError(f"--freeze-blocks {train_config.freeze_blocks} is more than the model's "
                         f"{model_config.num_layers} blocks.")
    GPT(**dataclasses.asdict(model_config))  # checks the model's settings before any file exists
    run = Run(run_dir, model_config, train_config)
    stored = read_run_config(run_dir) if os.path.isfile(run.config_path) else None
    if train_config.decay_steps is None:  # the first start's max_steps, also when resumed
        stored_train = (stored or {}).get("train", {})
        decay_steps = stored_train.get("decay_steps") or stored_train.get("max_steps")
        train_config = dataclasses.replace(train_config,
                                           decay_steps=decay_steps or train_config.max_steps)
        run.train_config = train_config
    requested = {
        "source": {"init_from": os.path.abspath(init_from) if init_from else None},
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(train_config),
        "tokenizer": {"kind": tokenizer, "vocab_size": tokenizer_vocab_size},
        "data": {"train": train_files, "validation": validation_files,
                 **({"format": data_format, "fields": list(pairs)} if pairs else {})},
    }
    if stored is not None:
        _check_same_settings(run_dir, requested, stored)
    say(f"Corpus: {_describe_files(train_files)}"
        + (f"; validation: {_describe_files(validation_files)}" if validation_files else ""))

    chief = distribute.is_chief(strategy)
    if chief:
        new_run = not os.path.exists(run_dir)
        _remove_abandoned_temporaries(run)
        try:
            text_tokenizer = _prepare(run, tokenizer, tokenizer_vocab_size, train_files,
                                      validation_files, source_tokenizer, say, pairs)
            _write_json(run.config_path,
                        {**requested, "model": dataclasses.asdict(run.model_config)})
        except BaseException:
            if new_run and os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # a failed first start leaves nothing behind
            raise
    distribute.barrier(strategy)  # other workers wait until the chief has prepared the run
    if not chief:
        text_tokenizer = _read_prepared(run, strategy, pairs)
    initial_weights = None if source_model is None else source_model.get_weights()
    return _fit(run, strategy, text_tokenizer, sample, verbose, initial_weights, callbacks)


def _silent(*args, **kwargs):
    pass


def _remove_abandoned_temporaries(run):
    """Deletes what killed writers left in the run directory (see
    `checkpoints.abandoned_temporaries`): atomic writes' `.tmp-*` files (checkpoints, metrics,
    `model.keras`) and `prepare_tokens`' `.tokens-*` directories."""
    for directory, kind in [(run.directory, "tmp"), (run.checkpoint_dir, "tmp"),
                            (run.directory, "tokens")]:
        checkpoints.remove_abandoned_temporaries(directory, kind)


def _check_same_settings(run_dir, requested, stored):
    """Raises `ValueError` naming the settings that differ from the stored run's, except the
    cadence settings (`CADENCE_FIELDS`), which a resumed run may change."""
    stored = {**stored, "model": {**stored["model"],
                                  "vocab_size": requested["model"]["vocab_size"]}}
    # Runs written before `decay_steps` existed decayed over their max_steps.
    stored["train"] = {"decay_steps": stored["train"].get("max_steps"), **stored["train"]}
    # Runs written before the LoRA settings existed trained all weights.
    stored["train"] = {"lora_rank": 0, "lora_alpha": None, "lora_targets": "attention",
                       **stored["train"]}
    # `xla` is compared by what it resolves to: a run started with "on" (the default before
    # "auto") resumes under "auto" wherever "auto" means XLA, and the other way round.
    if _resolved_xla(stored["train"]) == _resolved_xla(requested["train"]):
        stored["train"] = {**stored["train"], "xla": requested["train"].get("xla")}
    changed = sorted(
        f"{section}.{key}"
        for section in requested
        for key in set(requested[section] or {}) | set(stored.get(section) or {})
        if not (section == "train" and key in CADENCE_FIELDS)
        and (requested[section] or {}).get(key) != (stored.get(section) or {}).get(key)
    )
    if changed:
        raise ValueError(
            f"{run_dir} holds a run with other settings ({', '.join(changed)}). Re-run with its "
            "settings to resume it (only --max-steps and the cadence options may change), or "
            "pass a new --run-dir."
        )


def _resolved_xla(train_settings):
    """`uses_xla` of a run.json "train" section."""
    return uses_xla(TrainConfig(xla=train_settings.get("xla", "on"),
                                mixed_precision=train_settings.get("mixed_precision")))


def _describe_files(files):
    """`path (1.1 MB)`, or the first paths and a count for many files."""
    size = sum(os.path.getsize(f) for f in files)
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    return f"{shown} ({size / 1e6:.1f} MB)" if size >= 1e5 else f"{shown} ({size / 1e3:.1f} kB)"


def _prepare(run, kind, vocab_size, train_files, validation_files, source_tokenizer=None,
             say=_silent, pairs=None):
    """Trains (or takes `source_tokenizer`, or loads) the tokenizer and tokenizes the corpus into
    the run directory (or checks that the stored tokens still match the files); sets
    `run.token_file` and the vocabulary size of `run.model_config`. Returns the tokenizer.
    `pairs`: the `(prompt, completion)` field names of JSONL pairs (`sft.prepare_pairs`; then
    `run.token_file` is a `sft.PairFile`), or None for text."""
    if os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer.json")):
        tokenizer = load_tokenizer(run.tokenizer_dir)
    elif source_tokenizer is not None:
        tokenizer = source_tokenizer
    else:
        say(f"Training the {kind} tokenizer...", flush=True)
        texts = (sft.pair_texts(train_files, *pairs) if pairs else
                 (text for path in train_files for text in data.read_text(path)))
        tokenizer = _train_tokenizer(kind, vocab_size, texts)
    if pairs:
        if sft.is_prepared(run.data_dir):
            run.token_file = sft.PairFile.load(run.data_dir)
        else:
            say(f"Tokenizing the pairs into {run.data_dir}...", flush=True)
            run.token_file = sft.prepare_pairs(train_files, tokenizer, run.data_dir,
                                               run.model_config.context_length, pairs,
                                               validation_files)
            say(f"  {run.token_file.num_train:,} training and "
                f"{run.token_file.num_validation_examples:,} validation pairs")
    elif os.path.isfile(os.path.join(run.data_dir, data.META_FILE)):
        run.token_file = data.TokenFile.load(run.data_dir)
    else:
        say(f"Tokenizing the corpus into {run.data_dir}...", flush=True)
        started = time.perf_counter()
        run.token_file = data.prepare_tokens(train_files, tokenizer, run.data_dir, validation_files)
        say(f"  {run.token_file.num_train:,} training and {run.token_file.num_validation:,} "
            f"validation tokens ({tokenizer.vocab_size} ids) in "
            f"{time.perf_counter() - started:.1f} s")
    if run.token_file.fingerprint != data.fingerprint(train_files + (validation_files or [])):
        raise ValueError(
            f"The files under --data changed since {run.directory} was tokenized. "
            "Pass a new --run-dir to train on the new text."
        )
    run.model_config = run.model_config.replace(vocab_size=tokenizer.vocab_size)
    if not pairs:
        data.check_windows(run.token_file, run.model_config.context_length)
    tokenizer.save(run.tokenizer_dir)
    return tokenizer


def _read_prepared(run, strategy, pairs=None):
    """A non-chief worker's `_prepare`: reads the tokenizer and token file that the chief wrote
    into the run directory (it writes nothing itself); sets `run.token_file` and the vocabulary
    size of `run.model_config`. Returns the tokenizer."""
    token_file_type = sft.PairFile if pairs else data.TokenFile
    meta_file = sft.META_FILE if pairs else data.META_FILE
    if not (os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer.json"))
            and os.path.isfile(os.path.join(run.data_dir, meta_file))):
        raise ValueError(
            f"{distribute.worker_name(strategy)} finds no tokenizer or tokens in {run.directory} "
            "after the chief prepared them. Multi-worker training needs --run-dir on a file "
            "system that every worker reads (the chief writes it)."
        )
    tokenizer = load_tokenizer(run.tokenizer_dir)
    run.token_file = token_file_type.load(run.data_dir)
    run.model_config = run.model_config.replace(vocab_size=tokenizer.vocab_size)
    return tokenizer


def uses_xla(config):
    """Whether `config` (a `TrainConfig`) trains with XLA: `xla="auto"` means yes, except under
    bfloat16 on a machine without a GPU, where the plain graph's oneDNN matmuls run on the CPU's
    bfloat16 units (AMX, AVX-512 BF16) and XLA's do not (BENCHMARKS.md, "Training throughput")."""
    if config.xla != "auto":
        return config.xla == "on"
    return config.mixed_precision != "bfloat16" or bool(tf.config.list_physical_devices("GPU"))


def text_sampler(tokenizer, config):
    """The default `sample(model) -> str` of a run: `sample_tokens` tokens after an end-of-text
    token (unconditional), temperature 0.8, top-k 200 (nanoGPT's sampling defaults), fixed seed."""
    from gpt_keras.generation import TextGenerator

    def sample(model):
        return TextGenerator(model, tokenizer).generate(
            "", config.sample_tokens, temperature=0.8, top_k=200, seed=config.seed
        )

    return sample


def epoch_steps(config, start_step=0):
    """Optimizer steps per Keras epoch of `fit`: the largest number that divides every step where
    something happens (a training-loss row, a validation, a checkpoint, a sample, the last step)
    and the step a resumed run starts from."""
    return math.gcd(config.log_every, config.eval_every, config.checkpoint_every,
                    config.sample_every, config.max_steps, start_step)


def _fit(run, strategy, tokenizer, sample, verbose, initial_weights=None, extra_callbacks=()):
    """`model.fit` under `strategy` with `distribute.GlobalBatchSteps` (see `gpt_keras.distribute`
    for how multi-worker training works); only the chief writes into the run directory."""
    say = print if verbose else _silent
    config = run.train_config
    if sample is None and config.sample_every:
        sample = text_sampler(tokenizer, config)
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = distribute.TrainingGPT(**dataclasses.asdict(run.model_config),
                                       dtype=MIXED_PRECISION[config.mixed_precision])
        model.build()
        if initial_weights is not None:  # fine-tuning; a checkpoint, if any, overrides below
            model.set_weights(initial_weights)
        if config.lora_rank:  # only the adapters train (and are checkpointed)
            lora.enable(model, config.lora_rank, config.lora_alpha, config.lora_targets)
        for block in model.blocks[: config.freeze_blocks]:
            block.trainable = False
        # The model computes the loss and accumulates gradients (`distribute.GlobalBatchSteps`),
        # so its optimizer applies every update it gets and counts updates.
        model.compile(optimizer=build_optimizer(model, config),
                      gradient_accumulation_steps=config.gradient_accumulation_steps,
                      jit_compile=uses_xla(config))
        optimizer = model.optimizer  # a LossScaleOptimizer under mixed_float16
    newest, state = checkpoints.load_newest(run.checkpoint_dir, model, optimizer)
    if chief and newest is not None:
        run_callbacks.finish_checkpoint(run, newest, state)  # a kill may have cut it short
    start_step = int(optimizer.iterations.numpy())
    distribute.check_same_on_workers(strategy, "newest checkpoint steps", start_step)
    trained = start_step < config.max_steps
    if not trained:
        say(f"{run.directory} is already trained to step {start_step}; pass a larger "
            "--max-steps to train further.")
    else:
        if start_step:
            say(f"Resuming from the checkpoint of step {start_step}; training to step "
                f"{config.max_steps}.")
        if start_step >= config.decay_steps:
            say(f"The learning rate stays at --min-learning-rate {config.min_learning_rate:g} "
                f"after --decay-steps {config.decay_steps}.")
        if chief and os.path.isfile(run.model_path):
            os.unlink(run.model_path)  # the final weights of a shorter run: stale from now on
        nan_stop = run_callbacks.StopOnNaN()
        timer = run_callbacks.StepTimer()
        callbacks = [
            timer,  # first: it times the training steps only
            *extra_callbacks,  # before the run's own: their epoch hooks run first
            nan_stop,
            run_callbacks.RunState(run, state, nan_stop, sample, timer, is_chief=chief,
                                   start_step=start_step),
        ]
        if chief:  # TensorBoard runs no collective op: other workers can skip it
            callbacks.append(keras.callbacks.TensorBoard(run.tensorboard_dir))
        if verbose:
            callbacks.insert(1, run_callbacks.ProgressBar(
                config.max_steps, start_step, run.tokens_per_step, timer,
                config.gradient_accumulation_steps))
        micro_steps = config.gradient_accumulation_steps
        steps = epoch_steps(config, start_step)
        epochs = config.max_steps // steps
        validate = [e for e in range(start_step // steps + 1, epochs + 1)
                    if e * steps % config.eval_every == 0 or e == epochs]  # 1-based epochs
        say(f"Compiling the training step{' with XLA' if uses_xla(config) else ''} "
            "(the first step takes a while)...", flush=True)
        training_data, validation_data = _datasets(run, start_step)
        model.fit(
            distribute.stack_pairs(training_data),
            epochs=epochs,
            initial_epoch=start_step // steps,
            steps_per_epoch=steps * micro_steps,
            validation_data=distribute.stack_pairs(validation_data),
            validation_freq=validate,
            callbacks=callbacks,
            shuffle=False,  # batches are already drawn at random offsets
            verbose=0,
        )
        if nan_stop.failed_at is not None:
            raise FloatingPointError(
                f"The loss became NaN/inf at step {nan_stop.failed_at}; training stopped. The "
                f"newest checkpoint in {run.checkpoint_dir} is the last good one: lower the "
                "learning rate or raise --clip-norm, then resume from it."
            )
    if chief and not os.path.isfile(run.model_path):
        say(f"Saving the final weights to {run.model_path}...", flush=True)
        _save_inference_model(model, run.model_path)
    distribute.barrier(strategy)  # all workers finish together, after the chief's last write
    return run


def _datasets(run, start_step):
    """The `(training, validation)` datasets of `run` from `start_step`: windows of text
    (`data`), or weighted prompt-completion rows (`sft`) when `run.token_file` is a `PairFile`."""
    config, context = run.train_config, run.model_config.context_length
    micro_steps = config.gradient_accumulation_steps
    first, count = start_step * micro_steps, (config.max_steps - start_step) * micro_steps
    if isinstance(run.token_file, sft.PairFile):
        return (sft.training_dataset(run.token_file, context, config.batch_size, config.seed,
                                     first, count, micro_steps),
                sft.validation_dataset(run.token_file, context, config.batch_size))
    return (data.training_dataset(run.token_file, context, config.batch_size, config.seed,
                                  first, count),
            data.validation_dataset(run.token_file, context, config.batch_size, config.seed,
                                    config.eval_batches))


def _save_inference_model(model, path):
    """Saves the weights in a fresh, uncompiled float32 `GPT` (no optimizer state; LoRA
    adapters merged, `lora.merge`) to `path`, through a temporary file beside it
    (`checkpoints.temporary_prefix`)."""
    clean = lora.merge(model)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                         prefix=checkpoints.temporary_prefix(), suffix=".keras")
    os.close(handle)
    try:
        clean.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def evaluate(run_dir, data_paths=None, batch_size=32, progress=None, data_format=None,
             fields=None):
    """Loss (nats/token), perplexity and bits per char/byte of the run's model over all
    non-overlapping context windows of its validation split, or of the text files `data_paths`.
    `progress(batches_done, batches)` is called after each batch.

    With `data_format="prompt-completion"` (the default for a run trained on pairs), the
    completion loss and exact match of greedy answers (`sft.evaluate_pairs`) on the run's
    held-out pairs, or on the JSONL pairs of `data_paths` with the field names `fields` (default:
    the run's, else `sft.FIELDS`)."""
    backends.require_tensorflow("gpt_keras.training.evaluate", backends.USE_FIT)
    stored_data = read_run_config(run_dir).get("data") or {}
    data_format = data_format or stored_data.get("format", "text")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}. Received: {data_format!r}")
    model = load_model(run_dir)
    if data_format == "prompt-completion":
        return _evaluate_pairs(run_dir, model, data_paths, batch_size, progress,
                               tuple(fields or stored_data.get("fields") or sft.FIELDS))
    if data_paths is None:
        token_file = _validation_split(run_dir)
        return _score(model, token_file, token_file.tokens()[token_file.num_train:], batch_size,
                      progress)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    files = data.resolve_text_files(data_paths)
    with tempfile.TemporaryDirectory() as scratch:
        token_file = data.prepare_tokens(
            files, tokenizer, os.path.join(scratch, "data"), validation_fraction=1.0
        )
        return _score(model, token_file, token_file.tokens(), batch_size, progress)


def _evaluate_pairs(run_dir, model, data_paths, batch_size, progress, fields):
    """`evaluate` of prompt-completion pairs: the run's held-out pairs, or those of `data_paths`."""
    if data_paths is None:
        if not sft.is_prepared(os.path.join(run_dir, "data")):
            raise ValueError(f"{run_dir} was not trained on prompt-completion pairs here, so it "
                             "has no held-out pairs; pass --data PAIRS.jsonl.")
        pair_file = sft.PairFile.load(os.path.join(run_dir, "data"))
        held_out = np.arange(pair_file.num_train, pair_file.num_train
                             + pair_file.num_validation_examples)
        return sft.evaluate_pairs(model, pair_file, held_out, batch_size, progress)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    files = data.resolve_text_files(data_paths)
    with tempfile.TemporaryDirectory() as scratch:
        pair_file = sft.prepare_pairs(files, tokenizer, os.path.join(scratch, "data"),
                                      model.config.context_length, fields,
                                      validation_fraction=1.0)
        return sft.evaluate_pairs(model, pair_file, np.arange(pair_file.num_validation_examples),
                                  batch_size, progress)


def _validation_split(run_dir):
    """The `TokenFile` of a trained run (its validation split follows the training tokens)."""
    directory = os.path.join(run_dir, "data")
    if not os.path.isfile(os.path.join(directory, data.META_FILE)):
        raise ValueError(f"{run_dir} holds no tokenized corpus (it was not trained here), so it "
                         "has no validation split; pass --data PATH to score text files.")
    return data.TokenFile.load(directory)


def _score(model, token_file, tokens, batch_size, progress=None):
    """`evaluate`'s metrics of `model` on the windows of `tokens`, read a batch at a time (bits
    per char/byte from the character and byte counts of `token_file`'s validation split, which
    `tokens` must be)."""
    context = model.config.context_length
    count = (len(tokens) - 1) // context
    if count < 1:
        raise ValueError(f"The text has {len(tokens)} tokens, fewer than {context + 1}; "
                         "nothing to evaluate.")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    total, batches = 0.0, -(-count // batch_size)
    for index, (inputs, targets) in enumerate(
        data.consecutive_windows(tokens, context, batch_size)
    ):
        total += float(loss_fn(targets, model(inputs)))
        if progress is not None:
            progress(index + 1, batches)
    loss = total / (count * context)
    return {"tokens": count * context, **run_callbacks.validation_metrics(loss, token_file)}
