"""`GPTConfig` (the model's hyper-parameters) with its named presets, and `TrainConfig` (the
optimisation and bookkeeping settings of a run). TensorFlow-free, so `gpt-keras -h` stays fast."""

import dataclasses
from typing import Optional

POSITION_EMBEDDINGS = ("sinusoidal", "learned", "rotary")
# Formats of `gpt_keras.precision.with_weights` (here so that the CLI needs no TensorFlow).
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")
# Groups of `Dense` layers that LoRA can adapt (`gpt_keras.lora.TARGET_LAYERS`).
LORA_TARGETS = ("attention", "mlp")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a `GPT`; the fields are exactly `GPT`'s constructor arguments, so
    `GPT(**dataclasses.asdict(config))` builds the model. Values are checked by `GPT`."""

    vocab_size: int  # number of token ids; inputs must lie in [0, vocab_size)
    context_length: int  # longest sequence the model accepts (and the KV cache length)
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads; must divide hidden_dim
    hidden_dim: int = 128  # width of the residual stream (D)
    mlp_dim: Optional[int] = None  # MLP hidden width; None means 4 * hidden_dim (GPT-2)
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    # "sinusoidal" (fixed, added), "learned" (added; GPT-2 checkpoints) or "rotary" (RoPE: queries
    # and keys rotated by position in attention, no weights)
    position_embedding: str = "sinusoidal"
    tie_embeddings: bool = True  # output projection reuses the token embedding (GPT-2)
    layer_norm_epsilon: float = 1e-5  # GPT-2's value

    def replace(self, **changes):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset `name` (see `PRESETS`) with `overrides` applied, e.g. `vocab_size=65`."""
        if name not in PRESETS:
            raise ValueError(
                f"Unknown preset {name!r}. Choose one of: {', '.join(sorted(PRESETS))}."
            )
        return PRESETS[name].replace(**overrides)


PRESETS = {
    # A few thousand parameters: for tests and smoke runs (the paper's sinusoidal positions,
    # `GPT`'s default).
    "tiny": GPTConfig(
        vocab_size=64, context_length=16, num_layers=2, num_heads=2, hidden_dim=32
    ),
    # nanoGPT's CPU "baby" Shakespeare model (config/train_shakespeare_char.py, CPU settings),
    # with rotary positions, the best of the three: after 2000 steps at `TrainConfig`'s defaults,
    # validation loss 1.725 (3 seeds) against 1.769 with GPT-2's learned table and 1.787 with the
    # paper's sinusoidal encoding; at nanoGPT's learning rate 1e-3: 1.781, 1.881 and 1.885
    # (BENCHMARKS.md, "Position embeddings").
    "shakespeare-char": GPTConfig(
        vocab_size=65, context_length=64, num_layers=4, num_heads=4, hidden_dim=128,
        position_embedding="rotary",
    ),
    # The shape of OpenAI's GPT-2 small (124M parameters), with its learned position table so
    # that GPT-2 checkpoints load into it.
    "gpt2-small": GPTConfig(
        vocab_size=50257,
        context_length=1024,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        dropout=0.1,
        position_embedding="learned",
    ),
}


def num_parameters(config):
    """Closed-form parameter count of a `GPT` built from `config` (GPT-2 small: 124,439,808)."""
    d, v = config.hidden_dim, config.vocab_size
    m = config.mlp_dim or 4 * d
    per_block = (
        2 * d  # attention LayerNorm
        + 3 * d * d + 3 * d  # fused query/key/value projection
        + d * d + d  # attention output projection
        + 2 * d  # MLP LayerNorm
        + d * m + m + m * d + d  # MLP
    )
    total = v * d + config.num_layers * per_block + 2 * d  # embeddings, blocks, final LayerNorm
    if config.position_embedding == "learned":
        total += config.context_length * d
    if not config.tie_embeddings:
        total += d * v  # output projection, no bias
    return total


MIXED_PRECISION = {None: "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
TOKENIZERS = ("char", "bpe")
# `--format` of training data: plain text, or JSONL prompt → completion pairs (`gpt_keras.sft`).
DATA_FORMATS = ("text", "prompt-completion")
PAIR_FIELDS = ("prompt", "completion")  # default JSON fields of prompt-completion pairs
XLA_SETTINGS = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (defaults: nanoGPT's CPU Shakespeare run, with a
    higher learning rate: see `learning_rate`).

    Any `max_steps` works: the last step always validates and writes a checkpoint. The fields in
    `CADENCE_FIELDS` only say when things happen, so a resumed run may change them (e.g. a larger
    `max_steps` trains further); the others fix the trajectory and must stay the same."""

    batch_size: int = 12  # global batch: split over all replicas, the same for any replica count
    max_steps: int = 2000  # optimizer updates
    # peak, after warmup. From scratch 3e-3, the best of 1e-3, 2e-3, 3e-3 and 5e-3 for the
    # `shakespeare-char` preset (validation loss 1.725 against nanoGPT's 1e-3's 1.781, 3 seeds;
    # BENCHMARKS.md); fine-tuning wants less (`gpt-keras train --init-from` takes
    # `FINE_TUNING_LEARNING_RATE`), and so do large models (GPT-3's paper: 6e-4 at GPT-2 small's size)
    learning_rate: float = 3e-3
    min_learning_rate: float = 1e-4  # end of the cosine decay, kept after `decay_steps`
    warmup_steps: int = 100  # linear warmup from 0
    # updates until the cosine decay reaches `min_learning_rate` (nanoGPT's lr_decay_iters);
    # None: `max_steps` of the run's first start, kept when a resumed run trains further
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1  # AdamW decay on weight matrices only (see `decay_groups`)
    beta_1: float = 0.9
    beta_2: float = 0.99
    clip_norm: float = 1.0  # global gradient-norm clipping (0 disables)
    gradient_accumulation_steps: int = 1  # micro-batches of `batch_size` per update
    mixed_precision: Optional[str] = None  # None, "float16" or "bfloat16"
    seed: int = 1337  # data order, initialisation and dropout
    log_every: int = 10  # steps between training-loss rows of metrics.csv and the loss plot
    eval_every: int = 250  # steps between validations (and at the last step)
    eval_batches: int = 20  # fixed validation batches per evaluation
    checkpoint_every: int = 250  # steps between checkpoints (and at the last step)
    keep_checkpoints: int = 3  # newest step checkpoints kept (plus the best one)
    sample_every: int = 250  # steps between printed text samples, and the last step (0: never)
    sample_tokens: int = 200  # tokens per sample
    freeze_blocks: int = 0  # fine-tuning: keep the first k transformer blocks fixed
    # "on": compile training steps with XLA; "off": plain TensorFlow graphs (oneDNN kernels on
    # CPU); "auto": XLA except for bfloat16 on a machine without a GPU, where XLA's CPU matmul
    # ignores the CPU's bfloat16 units and oneDNN's uses them (`training.uses_xla`;
    # BENCHMARKS.md, "Training throughput"). A string, so that `--xla off` works on the command line.
    xla: str = "auto"
    # LoRA fine-tuning (`gpt_keras.lora`; needs --init-from): rank r of the adapters (0: off, all
    # weights train); scale alpha/r (None: alpha = r, Keras' default); comma-separated groups of
    # adapted layers ("attention": query/key/value + output projections, "mlp": both MLP layers)
    lora_rank: int = 0
    lora_alpha: Optional[int] = None
    lora_targets: str = "attention"

    def __post_init__(self):
        positive = ["batch_size", "max_steps", "log_every", "eval_every", "eval_batches",
                    "checkpoint_every", "gradient_accumulation_steps", "keep_checkpoints"]
        if self.decay_steps is not None:
            positive.append("decay_steps")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "sample_every", "sample_tokens", "freeze_blocks",
                     "lora_rank"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.lora_alpha is not None:
            _check_int("lora_alpha", self.lora_alpha, minimum=1)
        parse_lora_targets(self.lora_targets)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                "mixed_precision must be None, 'float16' or 'bfloat16'. "
                f"Received: mixed_precision={self.mixed_precision!r}"
            )
        if self.xla not in XLA_SETTINGS:
            raise ValueError(f"xla must be 'auto', 'on' or 'off'. Received: xla={self.xla!r}")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                "Need 0 < min_learning_rate <= learning_rate. Received: "
                f"learning_rate={self.learning_rate}, min_learning_rate={self.min_learning_rate}"
            )


# Peak learning rate of `gpt-keras train --init-from` without `--learning-rate`: trained weights
# need smaller steps than `TrainConfig`'s from-scratch default.
FINE_TUNING_LEARNING_RATE = 1e-3

# Settings that only say when things happen (not what is computed): a resumed run may change them.
CADENCE_FIELDS = ("max_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "sample_every", "sample_tokens")


def parse_lora_targets(targets):
    """The `LORA_TARGETS` groups named by `targets` ("attention,mlp", or a sequence of names),
    as a tuple without repeats; `ValueError` for an unknown or empty choice."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [name.strip() for name in names]
    unknown = [name for name in names if name not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(
            f"lora_targets must be a comma-separated choice of {', '.join(LORA_TARGETS)}. "
            f"Received: lora_targets={targets!r}"
        )
    return tuple(dict.fromkeys(names))


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}. Received: {name}={value!r}")
