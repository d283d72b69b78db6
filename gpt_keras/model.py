"""The `GPT` Keras model."""

import dataclasses
import math

import keras
from keras import ops

from gpt_keras import backends
from gpt_keras.backends import host_values
from gpt_keras.config import POSITION_EMBEDDINGS, GPTConfig
from gpt_keras.layers._initializers import fresh
from gpt_keras.layers.transformer_block import layer_norm
from gpt_keras.layers.multi_head_attention import cache_slots, causal_mask, zero_cache
from gpt_keras.layers import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerBlock,
)

# GPT-2 initialises every weight matrix from N(0, 0.02), and the two projections that write into
# the residual stream from N(0, 0.02 / sqrt(2 * num_layers)) so the stream's variance does not
# grow with depth.
_INIT_STDDEV = 0.02
# Version of `GPT.get_config`: 2 since sinusoidal positions are added at 1/sqrt(D) (gpt_keras
# 0.2); configs without it (version 1) scaled the token embeddings by sqrt(D) instead.
CONFIG_VERSION = 2
# Base of the rotary embedding's wavelengths (RoFormer, GPT-NeoX, LLaMA).
_ROTARY_MAX_WAVELENGTH = 10000


class OldSinusoidalModelError(ValueError):
    """A sinusoidal-position `GPT` saved before `CONFIG_VERSION` 2, whose weights do not fit."""


@keras.saving.register_keras_serializable(package="gpt_keras")
class GPT(keras.Model):
    """A decoder-only transformer language model (GPT-2 architecture, pre-LayerNorm).

    Shapes: B batch, T tokens, V `vocab_size`, D `hidden_dim`, L `num_layers`, H `num_heads`,
    K = D / H, S = cache length (`context_length` by default).

    - `model(token_ids, padding_mask=None)`: int `[B, T]` (T ≤ `context_length`) → float32 logits
      `[B, T, V]`. `padding_mask` `[B, T]` (1 = real token) hides padded keys from attention.
      With `return_hidden_states=True`: the final LayerNorm's outputs `[B, T, D]` (float32)
      instead of logits, as features for other heads (a classifier's pooling + `Dense`).
      With `return_attention_scores=True`: `(outputs, scores)`, scores being every layer's
      attention probabilities `[B, L, H, T, T]` (float32; row t is what query t attends to).
    - `model.call_with_cache(token_ids, cache, cache_index)`: the same forward pass for T new
      tokens at positions `cache_index ..`, reading and writing a fixed-size KV cache
      `[L, 2, B, H, S, K]` (see `init_cache`); returns `(logits, updated_cache)`.

    In eager calls, token ids outside `[0, V)` and sequences longer than the context (or than the
    cache) raise `ValueError`. Inside `tf.function`/`fit` (or `jax.jit`), a too-long sequence with
    a static shape still raises at trace time; ids are not checked there (TensorFlow's embedding
    lookup raises `InvalidArgumentError` on CPU and returns zeros on GPU), so validate data before
    training. On JAX and PyTorch, ids are checked when they are on the CPU (read in place); on an
    accelerator they are not, which would copy them to the host at every call.

    The model and its layers run on every Keras 3 backend (TensorFlow, JAX, PyTorch); what is
    TensorFlow-only (compiled decoding, tokenizers, training runs, export) is listed in the
    README, "Other backends".

    With `position_embedding="sinusoidal"`, the paper's input `sqrt(D) * embedding + encoding`
    divided by `sqrt(D)` is used: `embedding + encoding / sqrt(D)`. Token and position keep the
    paper's proportions, and the residual stream keeps GPT-2's scale (N(0, 0.02) embeddings), which
    is what the blocks' N(0, 0.02) projections are sized for: Tiny Shakespeare validation loss after
    2,000 steps, mean of 3 seeds, 1.885 against 1.933 at the paper's scale, and 1.881 with learned
    positions (BENCHMARKS.md, "Position embeddings"). With `"learned"` they are added as in GPT-2; with `"rotary"` nothing is added: every attention layer rotates its queries and keys by position
    (`RotaryEmbedding`), and `model.position_embedding` is None.

    Logits and attention softmax are float32 under every dtype policy (`mixed_float16`,
    `mixed_bfloat16`). Only core TensorFlow ops that also convert to TFLite builtins are used, so
    the model exports to TF Serving (XLA disabled) and TFLite without rewrites.

    Args: the fields of `GPTConfig` (see there).
    """

    def __init__(
        self,
        vocab_size,
        context_length,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        mlp_dim=None,
        dropout=0.0,
        position_embedding="sinusoidal",
        tie_embeddings=True,
        layer_norm_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in [
            ("vocab_size", vocab_size),
            ("context_length", context_length),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("hidden_dim", hidden_dim),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"`position_embedding` must be one of {POSITION_EMBEDDINGS}. "
                f"Received: position_embedding={position_embedding!r}"
            )
        if position_embedding == "rotary" and (hidden_dim // num_heads) % 2:
            raise ValueError(
                "Rotary positions rotate pairs of features: they need an even head size "
                "(hidden_dim / num_heads). Change hidden_dim or num_heads. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        self.config = GPTConfig(
            vocab_size=vocab_size,
            context_length=context_length,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
            dropout=dropout,
            position_embedding=position_embedding,
            tie_embeddings=tie_embeddings,
            layer_norm_epsilon=layer_norm_epsilon,
        )
        weights_init = keras.initializers.RandomNormal(stddev=_INIT_STDDEV)
        residual_init = keras.initializers.RandomNormal(
            stddev=_INIT_STDDEV / math.sqrt(2 * num_layers)
        )
        self.token_embedding = keras.layers.Embedding(
            vocab_size,
            hidden_dim,
            embeddings_initializer=fresh(weights_init),
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        if position_embedding == "learned":
            self.position_embedding = LearnedPositionalEmbedding(
                context_length,
                initializer=weights_init,
                dtype=self.dtype_policy,
                name="position_embedding",
            )
        elif position_embedding == "sinusoidal":
            self.position_embedding = SinusoidalPositionalEncoding(
                dtype=self.dtype_policy, name="position_embedding"
            )
        else:  # "rotary": inside attention
            self.position_embedding = None
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.blocks = [
            TransformerBlock(
                num_heads,
                mlp_dim or 4 * hidden_dim,
                dropout=dropout,
                layer_norm_epsilon=layer_norm_epsilon,
                kernel_initializer=weights_init,
                output_kernel_initializer=residual_init,
                rotary_max_wavelength=(
                    _ROTARY_MAX_WAVELENGTH if position_embedding == "rotary" else None
                ),
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = layer_norm(layer_norm_epsilon, self.dtype_policy, "final_norm")
        self.lm_head = None
        if not tie_embeddings:
            self.lm_head = keras.layers.Dense(
                vocab_size,
                use_bias=False,
                kernel_initializer=fresh(weights_init),
                dtype=self.dtype_policy,
                name="lm_head",
            )

    @classmethod
    def from_preset(cls, name, **overrides):
        """A new, randomly initialised model of preset `name` with `overrides` (see `GPTConfig`)."""
        return cls(**dataclasses.asdict(GPTConfig.from_preset(name, **overrides)))

    def build(self, input_shape=None):
        hidden_shape = (None, None, self.config.hidden_dim)
        layers = [(self.token_embedding, (None, None)), (self.position_embedding, hidden_shape),
                  *((block, hidden_shape) for block in self.blocks),
                  (self.final_norm, hidden_shape), (self.lm_head, hidden_shape)]
        for layer, shape in layers:
            # Layers already built by a cached call (`call_with_layer_caches` skips this build).
            if layer is not None and not layer.built:
                layer.build(shape)
        self.built = True

    def call(self, token_ids, padding_mask=None, training=None, return_hidden_states=False,
             return_attention_scores=False):
        self._check_inputs(token_ids, limit=self.config.context_length, limit_name="context_length")
        outputs, _, scores = self._forward(
            token_ids, padding_mask, None, None, training, head=not return_hidden_states,
            return_attention_scores=return_attention_scores,
        )
        return (outputs, scores) if return_attention_scores else outputs

    def call_with_cache(self, token_ids, cache, cache_index, padding_mask=None, training=False):
        """One forward pass over new tokens `[B, T]` at positions `cache_index .. cache_index+T-1`.

        `cache` is `[L, 2, B, H, S, K]` from `init_cache`; `padding_mask` (optional) is `[B, S]`
        over cache positions. Returns float32 logits `[B, T, V]` and the updated cache (same
        shape). Prefill a prompt with `cache_index=0`, then decode one token at a time.
        """
        logits, caches = self.call_with_layer_caches(
            token_ids, ops.unstack(cache, axis=0), cache_index, padding_mask, training
        )
        return logits, ops.stack(caches, axis=0)

    def call_with_layer_caches(self, token_ids, caches, cache_index, padding_mask=None,
                               training=False, return_hidden_states=False):
        """`call_with_cache` with the cache as a list of L per-layer `[2, B, H, S, K]` tensors
        (see `init_layer_caches`); returns `(logits, updated caches)`, or with
        `return_hidden_states=True` `(hidden states [B, T, D], updated caches)` (pass the rows
        you need to `project_logits`). A decoding loop that carries the list does not slice and
        re-stack the whole cache at every step (-30% per decoded token, BENCHMARKS.md)."""
        start = host_values(cache_index)
        if start is not None:
            start = int(start)
            if start < 0:
                raise ValueError(f"`cache_index` must be >= 0. Received: cache_index={start}")
            limit = min(caches[0].shape[3], self.config.context_length) - start
            self._check_inputs(token_ids, limit=limit, limit_name="cache length - cache_index")
        return self._forward(
            token_ids, padding_mask, list(caches), cache_index, training,
            head=not return_hidden_states,
        )[:2]

    def init_cache(self, batch_size, length=None):
        """An all-zero KV cache `[L, 2, batch_size, H, length, K]` in the compute dtype (per
        layer keys and values first: `MultiHeadAttention` splits them without a copy);
        `length` (an int, or a scalar tensor in a graph) defaults to (and may not exceed)
        `context_length`."""
        if length is None:
            length = self.config.context_length
        if isinstance(length, int) and length > self.config.context_length:
            raise ValueError(
                f"The cache length must be at most context_length={self.config.context_length}. "
                f"Received: length={length}"
            )
        heads = self.config.num_heads
        head_dim = self.config.hidden_dim // heads
        shape = (self.config.num_layers, 2, batch_size, heads, length, head_dim)
        return zero_cache(shape, dtype=self.compute_dtype)

    def init_layer_caches(self, batch_size, length=None):
        """`init_cache` as a list of L all-zero per-layer caches `[2, batch_size, H, length, K]`."""
        return ops.unstack(self.init_cache(batch_size, length), axis=0)

    def _forward(self, token_ids, padding_mask, cache, cache_index, training, head=True,
                 return_attention_scores=False):
        """The one forward pass: full sequences (`cache is None`) and cached steps alike (`cache`:
        a list of L per-layer `[2, B, H, S, K]` caches). Returns `(logits, updated caches or None,
        attention probabilities [B, L, H, T, S] or None)`; without the output projection
        (`head=False`) the final hidden states `[B, T, D]` instead of the logits."""
        start = 0 if cache is None else cache_index
        x = self.token_embedding(token_ids)  # [B, T, D]
        if self.position_embedding is not None:  # rotary positions are applied in attention
            positions = self.position_embedding(x, start_index=start)
            if self.config.position_embedding == "sinusoidal":
                positions = positions * ops.cast(self.config.hidden_dim**-0.5, x.dtype)
            x = x + positions
        x = self.embedding_dropout(x, training=training)
        # One mask for every layer: [B|1, 1, T, S] (S = T without a cache).
        length = ops.shape(token_ids)[1]
        keys = length if cache is None else (cache[0].shape[3] or ops.shape(cache[0])[3])
        mask = causal_mask(length, keys, start, padding_mask)
        slots = None if cache is None else cache_slots(cache[0], cache_index, length)  # as mask
        updated_caches, scores = [], []
        for i, block in enumerate(self.blocks):
            if cache is None and not return_attention_scores:
                x = block(x, attention_mask=mask, training=training)
                continue
            x, *extras = block(
                x,
                attention_mask=mask,
                cache=None if cache is None else cache[i],
                cache_index=cache_index,
                cache_slots=slots,
                training=training,
                return_attention_scores=return_attention_scores,
            )
            if cache is not None:
                updated_caches.append(extras.pop(0))  # [2, B, H, S, K]
            if return_attention_scores:
                scores.append(extras.pop(0))  # [B, H, T, S]
        x = self.final_norm(x)  # [B, T, D]
        outputs = self.project_logits(x) if head else ops.cast(x, "float32")
        return (outputs, None if cache is None else updated_caches,
                ops.stack(scores, axis=1) if return_attention_scores else None)

    def project_logits(self, hidden_states):
        """The output projection: final hidden states `[B, T, D]` → float32 logits `[B, T, V]`."""
        x = ops.cast(hidden_states, self.compute_dtype)
        if self.lm_head is None:
            # Tied embeddings (GPT-2): the output projection is the token embedding transposed.
            # A matmul reading the embedding as stored: faster than einsum at GPT-2's vocabulary
            # in a plain graph (benchmarks/attention.py), and under XLA (see there).
            embeddings = ops.cast(self.token_embedding.embeddings, x.dtype)
            logits = backends.matmul(x, embeddings, transpose_b=True)
            if self.token_embedding.quantization_mode == "int8":  # int8 rows, a scale per row
                logits = logits / ops.cast(self.token_embedding.embeddings_scale, x.dtype)
        else:
            logits = self.lm_head(x)
        return ops.cast(logits, "float32")  # [B, T, V]

    def _check_inputs(self, token_ids, limit, limit_name):
        """Raises `ValueError` for sequences longer than `limit` (when the length is known) and,
        when the ids can be read without a trace or a device copy (`backends.host_values`),
        for token ids outside `[0, vocab_size)`."""
        length = token_ids.shape[-1] if len(token_ids.shape) else None
        if len(token_ids.shape) != 2:
            raise ValueError(
                f"`token_ids` must be a 2-D [batch, time] tensor. Received shape: {token_ids.shape}"
            )
        if length is not None and length > limit:
            raise ValueError(
                f"The sequence has {length} tokens, more than {limit_name}={limit}. "
                "Pass at most that many tokens (keep the last ones for generation)."
            )
        ids = host_values(token_ids)
        if ids is not None and ids.size > 0:
            low, high = ids.min(), ids.max()
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"Token id {bad} is outside the vocabulary [0, {self.config.vocab_size}). "
                    "Check that the tokenizer matches the model's vocab_size."
                )

    def get_config(self):
        config = super().get_config()
        config.update(dataclasses.asdict(self.config), config_version=CONFIG_VERSION)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        version = config.pop("config_version", 1)
        if version < 2 and config.get("position_embedding", "sinusoidal") == "sinusoidal":
            raise OldSinusoidalModelError(
                "This GPT was saved by gpt_keras 0.1 with sinusoidal positions, which scaled the "
                "token embeddings by sqrt(hidden_dim); since 0.2 the encoding is added divided by "
                "sqrt(hidden_dim) instead, so these weights would give wrong outputs. Train it "
                "again with gpt_keras >= 0.2 (or load it with gpt_keras 0.1)."
            )
        return cls(**config)
