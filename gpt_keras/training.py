"""Training a `GPT` on a text corpus with `model.fit` under a `tf.distribute` strategy, in a run
directory that holds everything needed to resume, evaluate, generate and export."""

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Optional

import keras
import numpy as np
from keras import ops

from gpt_keras import callbacks as run_callbacks
from gpt_keras import checkpoints, data, distribute
from gpt_keras.config import GPTConfig
from gpt_keras.model import GPT
from gpt_keras.tokenizers import ByteLevelBPETokenizer, CharTokenizer, load_tokenizer

MIXED_PRECISION = {None: "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
TOKENIZERS = ("char", "bpe")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (defaults: nanoGPT's CPU Shakespeare run)."""

    batch_size: int = 12  # global batch: split over all replicas, the same for any replica count
    max_steps: int = 2000  # optimizer updates
    learning_rate: float = 1e-3  # peak, after warmup
    min_learning_rate: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW decay on weight matrices only (see `decay_groups`)
    beta_1: float = 0.9
    beta_2: float = 0.99
    clip_norm: float = 1.0  # global gradient-norm clipping (0 disables)
    gradient_accumulation_steps: int = 1  # micro-batches of `batch_size` per update
    mixed_precision: Optional[str] = None  # None, "float16" or "bfloat16"
    seed: int = 1337  # data order, initialisation and dropout
    eval_every: int = 250  # steps between validations (a multiple of checkpoint_every)
    eval_batches: int = 20  # fixed validation batches per evaluation
    checkpoint_every: int = 250  # steps between checkpoints (divides max_steps)
    keep_checkpoints: int = 3  # newest step checkpoints kept (plus the best one)
    sample_every: int = 250  # steps between printed text samples (0: never)
    sample_tokens: int = 200  # tokens per sample
    freeze_blocks: int = 0  # fine-tuning: keep the first k transformer blocks fixed
    # "on": compile training steps with XLA (1.4x tokens/s on CPU, BENCHMARKS.md); "off": plain
    # TensorFlow graphs. A string, not a bool, so that `--xla off` works on the command line.
    xla: str = "on"

    def __post_init__(self):
        positive = ["batch_size", "max_steps", "eval_every", "eval_batches", "checkpoint_every",
                    "gradient_accumulation_steps"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if self.max_steps % self.checkpoint_every:
            raise ValueError(
                f"max_steps={self.max_steps} must be a multiple of checkpoint_every="
                f"{self.checkpoint_every}; change one of them."
            )
        if self.eval_every % self.checkpoint_every:
            raise ValueError(
                f"eval_every={self.eval_every} must be a multiple of checkpoint_every="
                f"{self.checkpoint_every}; change one of them."
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                "mixed_precision must be None, 'float16' or 'bfloat16'. "
                f"Received: {self.mixed_precision!r}"
            )
        if self.xla not in ("on", "off"):
            raise ValueError(f"xla must be 'on' or 'off'. Received: xla={self.xla!r}")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                "Need 0 < min_learning_rate <= learning_rate. Received: "
                f"learning_rate={self.learning_rate}, min_learning_rate={self.min_learning_rate}"
            )


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
    at `total_steps` (nanoGPT's schedule)."""

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
    """The `WarmupCosineSchedule` of `config`, counted in optimizer updates."""
    return WarmupCosineSchedule(
        config.learning_rate, config.min_learning_rate, config.warmup_steps, config.max_steps
    )


def build_optimizer(model, config):
    """AdamW with the schedule and clipping of `config`, decay groups applied. (Gradient
    accumulation is the model's job: see `distribute.GlobalBatchSteps`.)"""
    optimizer = keras.optimizers.AdamW(
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
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_model(directory):
    """The trained `GPT` of a run directory: `model.keras` if training finished, else the newest
    checkpoint's weights."""
    settings = read_run_config(directory)
    model_path = os.path.join(directory, "model.keras")
    if os.path.isfile(model_path):
        return keras.saving.load_model(model_path, compile=False)
    newest = checkpoints.latest(os.path.join(directory, "checkpoints"))
    if newest is None:
        raise ValueError(f"{directory} has no trained weights yet (no model.keras, no checkpoint).")
    model = GPT(**settings["model"])
    model.build()
    checkpoints.load(newest, model)
    return model


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


def _train_tokenizer(kind, vocab_size, files):
    texts = (text for path in files for text in data.read_text(path))
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


def train(run_dir, data_paths, model_config, train_config, tokenizer="char",
          tokenizer_vocab_size=None, validation_paths=None, replicas=None, sample=None,
          verbose=True, init_from=None, callbacks=()):
    """Trains (or resumes) the run in `run_dir` and returns its `Run`.

    `model_config.vocab_size` is replaced by the tokenizer's. With `init_from` (see
    `load_source`), the model's config, weights and tokenizer come from there instead (fine-tuning;
    `train_config.freeze_blocks` keeps the first blocks fixed). Re-running with the same arguments
    after an interruption continues from the newest checkpoint with the same step, learning
    rate, optimizer state, data position and dropout RNG; different arguments raise `ValueError`
    naming what changed. `sample(model) -> str` (default: `text_sampler`) is printed every
    `sample_every` steps. `callbacks`: extra Keras callbacks for `fit` (one epoch = one checkpoint
    interval), called before the run's own.
    """
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
    if train_config.freeze_blocks > model_config.num_layers:
        raise ValueError(f"--freeze-blocks {train_config.freeze_blocks} is more than the model's "
                         f"{model_config.num_layers} blocks.")
    requested = {
        "source": {"init_from": os.path.abspath(init_from) if init_from else None},
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(train_config),
        "tokenizer": {"kind": tokenizer, "vocab_size": tokenizer_vocab_size},
        "data": {"train": train_files, "validation": validation_files},
    }
    run = Run(run_dir, model_config, train_config)
    if os.path.isfile(run.config_path):
        stored = read_run_config(run_dir)
        stored_request = {**stored, "model": {**stored["model"], "vocab_size": model_config.vocab_size}}
        changed = sorted(
            f"{section}.{key}"
            for section in requested
            for key in set(requested[section] or {}) | set(stored_request.get(section) or {})
            if (requested[section] or {}).get(key) != (stored_request.get(section) or {}).get(key)
        )
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}). Re-run the "
                "same command to resume it, or pass a new --run-dir."
            )

    chief = distribute.is_chief(strategy)
    if chief:
        new_run = not os.path.exists(run_dir)
        try:
            text_tokenizer = _prepare(run, tokenizer, tokenizer_vocab_size, train_files,
                                      validation_files, source_tokenizer)
            _write_json(run.config_path,
                        {**requested, "model": dataclasses.asdict(run.model_config)})
        except BaseException:
            if new_run and os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # a failed first start leaves nothing behind
            raise
    distribute.barrier(strategy)  # other workers wait until the chief has prepared the run
    if not chief:
        text_tokenizer = _read_prepared(run, strategy)
    initial_weights = None if source_model is None else source_model.get_weights()
    return _fit(run, strategy, text_tokenizer, sample, verbose, initial_weights, callbacks)


def _prepare(run, kind, vocab_size, train_files, validation_files, source_tokenizer=None):
    """Trains (or takes `source_tokenizer`, or loads) the tokenizer and tokenizes the corpus into the run directory (or checks
    that the stored tokens still match the files); sets `run.token_file` and the vocabulary size
    of `run.model_config`. Returns the tokenizer."""
    if os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer.json")):
        tokenizer = load_tokenizer(run.tokenizer_dir)
    else:
        tokenizer = source_tokenizer or _train_tokenizer(kind, vocab_size, train_files)
    if os.path.isfile(os.path.join(run.data_dir, data.META_FILE)):
        run.token_file = data.TokenFile.load(run.data_dir)
    else:
        run.token_file = data.prepare_tokens(train_files, tokenizer, run.data_dir, validation_files)
    if run.token_file.fingerprint != data.fingerprint(train_files + (validation_files or [])):
        raise ValueError(
            f"The files under --data changed since {run.directory} was tokenized. "
            "Pass a new --run-dir to train on the new text."
        )
    run.model_config = run.model_config.replace(vocab_size=tokenizer.vocab_size)
    data.check_windows(run.token_file, run.model_config.context_length)
    tokenizer.save(run.tokenizer_dir)
    return tokenizer


def _read_prepared(run, strategy):
    """A non-chief worker's `_prepare`: reads the tokenizer and token file that the chief wrote
    into the run directory (it writes nothing itself); sets `run.token_file` and the vocabulary
    size of `run.model_config`. Returns the tokenizer."""
    if not (os.path.isfile(os.path.join(run.tokenizer_dir, "tokenizer.json"))
            and os.path.isfile(os.path.join(run.data_dir, data.META_FILE))):
        raise ValueError(
            f"{distribute.worker_name(strategy)} finds no tokenizer or tokens in {run.directory} "
            "after the chief prepared them. Multi-worker training needs --run-dir on a file "
            "system that every worker reads (the chief writes it)."
        )
    tokenizer = load_tokenizer(run.tokenizer_dir)
    run.token_file = data.TokenFile.load(run.data_dir)
    run.model_config = run.model_config.replace(vocab_size=tokenizer.vocab_size)
    return tokenizer


def text_sampler(tokenizer, config):
    """The default `sample(model) -> str` of a run: `sample_tokens` tokens after an end-of-text
    token (unconditional), temperature 0.8, top-k 200 (nanoGPT's sampling defaults), fixed seed."""
    from gpt_keras.generation import TextGenerator

    def sample(model):
        return TextGenerator(model, tokenizer).generate(
            "", config.sample_tokens, temperature=0.8, top_k=200, seed=config.seed
        )

    return sample


def _fit(run, strategy, tokenizer, sample, verbose, initial_weights=None, extra_callbacks=()):
    """`model.fit` under `strategy` with `distribute.GlobalBatchSteps` (see `gpt_keras.distribute`
    for how multi-worker training works); only the chief writes into the run directory."""
    config = run.train_config
    if sample is None and config.sample_every:
        sample = text_sampler(tokenizer, config)
    chief = distribute.is_chief(strategy)
    keras.config.set_dtype_policy(MIXED_PRECISION[config.mixed_precision])
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = distribute.TrainingGPT(**dataclasses.asdict(run.model_config))
        model.build()
        if initial_weights is not None:  # fine-tuning; a checkpoint, if any, overrides below
            model.set_weights(initial_weights)
        for block in model.blocks[: config.freeze_blocks]:
            block.trainable = False
        # The model computes the loss and accumulates gradients (`distribute.GlobalBatchSteps`),
        # so its optimizer applies every update it gets and counts updates.
        model.compile(optimizer=build_optimizer(model, config),
                      gradient_accumulation_steps=config.gradient_accumulation_steps,
                      jit_compile=config.xla == "on")
        optimizer = model.optimizer  # a LossScaleOptimizer under mixed_float16
        optimizer.build(model.trainable_variables)
    state = {}
    newest = checkpoints.latest(run.checkpoint_dir)
    if newest is not None:
        state = checkpoints.load(newest, model, optimizer)
    start_step = int(optimizer.iterations.numpy())
    distribute.check_same_on_workers(strategy, "newest checkpoint steps", start_step)
    if start_step >= config.max_steps:
        print(f"{run.directory} is already trained to step {start_step}.")
    else:
        nan_stop = run_callbacks.StopOnNaN()
        callbacks = [
            *extra_callbacks,  # first: their epoch hooks run before the run's own
            nan_stop,
            run_callbacks.RunState(run, state, nan_stop, sample, is_chief=chief),
        ]
        if chief:  # TensorBoard runs no collective op: other workers can skip it
            callbacks.append(keras.callbacks.TensorBoard(run.tensorboard_dir))
        if verbose:
            callbacks.insert(0, run_callbacks.ProgressBar(
                config.max_steps, start_step, run.tokens_per_step,
                config.gradient_accumulation_steps))
        micro_steps = config.gradient_accumulation_steps
        model.fit(
            distribute.stack_pairs(data.training_dataset(
                run.token_file, run.model_config.context_length, config.batch_size, config.seed,
                start_step * micro_steps, (config.max_steps - start_step) * micro_steps,
            )),
            epochs=config.max_steps // config.checkpoint_every,
            initial_epoch=start_step // config.checkpoint_every,
            steps_per_epoch=config.checkpoint_every * micro_steps,
            validation_data=distribute.stack_pairs(data.validation_dataset(
                run.token_file, run.model_config.context_length, config.batch_size, config.seed,
                config.eval_batches,
            )),
            validation_freq=config.eval_every // config.checkpoint_every,
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
        _save_inference_model(model, run.model_path)
    distribute.barrier(strategy)  # all workers finish together, after the chief's last write
    keras.config.set_dtype_policy("float32")
    return run


def _save_inference_model(model, path):
    """Saves the weights in a fresh, uncompiled float32 `GPT` (no optimizer state) to `path`."""
    keras.config.set_dtype_policy("float32")
    clean = GPT(**dataclasses.asdict(model.config))
    clean.build()
    clean.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, ".tmp-model.keras")
    clean.save(temporary)
    os.replace(temporary, path)


def evaluate(run_dir, data_paths, batch_size=32):
    """Loss (nats/token), perplexity and bits per char/byte of the run's model on `data_paths`,
    over all non-overlapping context windows of the text."""
    model = load_model(run_dir)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    files = data.resolve_text_files(data_paths)
    context = model.config.context_length
    with tempfile.TemporaryDirectory() as scratch:
        token_file = data.prepare_tokens(
            files, tokenizer, os.path.join(scratch, "data"), validation_fraction=1.0
        )
        tokens = token_file.tokens()
        count = (len(tokens) - 1) // context
        if count < 1:
            raise ValueError(f"{data_paths}: fewer than {context + 1} tokens; nothing to evaluate.")
        starts = np.arange(count) * context
        windows = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
        total = 0.0
        for begin in range(0, count, batch_size):
            batch = windows[begin : begin + batch_size]
            total += float(loss_fn(batch[:, 1:], model(batch[:, :-1])))
        loss = total / (count * context)
        return {"tokens": count * context, **run_callbacks.validation_metrics(loss, token_file)}
