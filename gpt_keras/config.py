"""`GPTConfig`, the model's hyper-parameters, and the named presets."""

import dataclasses
from typing import Optional

POSITION_EMBEDDINGS = ("sinusoidal", "learned", "rotary")
# Formats of `gpt_keras.precision.with_weights` (here so that the CLI needs no TensorFlow).
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


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
    # A few thousand parameters: for tests and smoke runs.
    "tiny": GPTConfig(
        vocab_size=64, context_length=16, num_layers=2, num_heads=2, hidden_dim=32
    ),
    # nanoGPT's CPU "baby" Shakespeare model (config/train_shakespeare_char.py, CPU settings),
    # with rotary positions: after nanoGPT's 2000-step CPU run, validation loss 1.783 (3 seeds,
    # 1.781-1.784) against 1.882 with GPT-2's learned table and 1.933 with sinusoidal positions
    # (benchmarks/train_shakespeare.py).
    "shakespeare-char": GPTConfig(
        vocab_size=65, context_length=64, num_layers=4, num_heads=4, hidden_dim=128,
        position_embedding="rotary",
    ),
    # The shape of OpenAI's GPT-2 small (124M parameters).
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
