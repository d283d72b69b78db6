"""Causal multi-head self-attention with an optional fixed-size key/value cache."""

import contextlib
import threading

import keras
import tensorflow as tf
from keras import ops

from gpt_keras import backends
from gpt_keras.layers._dense import Dense
from gpt_keras.layers._initializers import fresh
from gpt_keras.layers.rotary_embedding import RotaryEmbedding

# Added to masked attention logits (in float32). Finite, so a fully masked row (a left-padding
# query) softmaxes to a uniform row instead of NaN.
_MASKED_LOGIT = -1e9
# Up to this hidden size, attention for a single query is computed elementwise (see `call`).
_ELEMENTWISE_MAX_DIM = 512


def write_cache(cache, update, index, slots=None):
    """Writes `update` `[..., T, K]` into `cache` `[..., S, K]` (same leading dimensions) at
    slots `index .. index+T-1` of the second-to-last axis; returns the new cache.

    - Inside an XLA-compiled function (`jit_compile=True`), and on the JAX and PyTorch backends,
      this is `keras.ops.slice_update` (a dynamic-update-slice, which XLA performs in place).
    - In other graphs, within `in_place_cache_writes()` (the decoding core, whose caches no one
      else holds), an `InplaceUpdate` of the written rows: O(T) work instead of a copy of the
      whole cache per step, a core op that TF Serving runs with XLA disabled. It changes the
      input cache's buffer, which is why it is opt-in. `slots`: the rows it writes,
      `cache_slots(cache, index, T)` computed once for caches of one shape (a model's layers);
      computed here when not given.
    - Everywhere else `gather` + `where`, core ops that also convert to TFLite builtins
      (`keras.ops.slice_update` lowers to `XlaDynamicUpdateSlice`, which neither TF Serving
      without XLA nor TFLite can run).

    A write that does not fit (`index < 0` or `index + T > S`) raises `InvalidArgumentError`;
    under XLA (and on the other backends), which cannot raise at run time, it writes NaN (so the
    logits are NaN) rather than clamping a valid-looking write into other slots. (`GPT` checks
    a concrete `cache_index` before calling, with a `ValueError`.)
    """
    index = ops.convert_to_tensor(index, dtype="int32")
    length = ops.shape(cache)[-2]
    new_length = ops.shape(update)[-2]
    if not backends.is_tensorflow() or backends.in_xla_compilation():
        # XLA clamps the start of a dynamic-update-slice so that the update fits, and cannot
        # raise at run time: a write that does not fit writes NaN instead, which every later
        # attention read (all S slots enter its einsums) turns into NaN outputs.
        rank = len(cache.shape)
        start = ops.stack([0] * (rank - 2) + [index, 0])
        update = ops.where(_fits(index, new_length, length), update,
                           ops.cast(float("nan"), update.dtype))
        return ops.slice_update(cache, start, update)
    if _writes_in_place():
        if slots is None:
            slots = cache_slots(cache, index, new_length)
        head_dim = ops.shape(cache)[-1]
        flat = tf.raw_ops.InplaceUpdate(  # reshapes share the buffer: nothing is copied
            x=ops.reshape(cache, [-1, head_dim]), i=slots,
            v=ops.cast(ops.reshape(update, [-1, head_dim]), cache.dtype),
        )
        return tf.reshape(flat, tf.shape(cache))  # (`ops.shape` would add a slice and a pack)
    with tf.control_dependencies([_check_fits(index, new_length, length)]):
        cache = tf.identity(cache)
    offsets = ops.arange(length, dtype="int32") - index  # [S]: where each cache slot reads from
    source = ops.take(update, ops.clip(offsets, 0, new_length - 1), axis=-2)  # [..., S, K]
    inside = ops.logical_and(offsets >= 0, offsets < new_length)  # [S]
    return ops.where(ops.expand_dims(inside, -1), source, cache)


def cache_slots(cache, index, new_length):
    """The rows that an in-place `write_cache` of `new_length` slots at `index` writes, int32
    `[R·T]` in `cache` `[..., S, K]` seen as `[R·S, K]` (R the product of the leading
    dimensions), once the write is checked to fit (`InvalidArgumentError` if not). The same for
    every cache of that shape: a model computes it once for all its layers, which a plain graph
    would otherwise do per layer at every decoding step. None where writes are not in place
    (`write_cache` then needs none)."""
    if not _writes_in_place() or backends.in_xla_compilation():
        return None
    index = ops.convert_to_tensor(index, dtype="int32")
    length = ops.shape(cache)[-2]
    with tf.control_dependencies([_check_fits(index, new_length, length)]):
        index = tf.identity(index)
    rows = ops.size(cache) // (length * ops.shape(cache)[-1])
    slots = ops.arange(rows, dtype="int32")[:, None] * length + index  # [R, 1]
    return ops.reshape(slots + ops.arange(new_length, dtype="int32")[None], [-1])  # [R·T]


def _fits(index, new_length, length):
    return ops.logical_and(index >= 0, index + new_length <= length)


def _check_fits(index, new_length, length):
    return tf.debugging.Assert(_fits(index, new_length, length), [
        "The cache write does not fit: slots", index, "to", index + new_length - 1,
        "of a cache of length", length,
    ])


_WRITES = threading.local()


def zero_cache(shape, dtype):
    """An all-zero cache. Under `in_place_cache_writes()` in a graph without XLA, an `Empty` op:
    stateful, so never constant-folded into a buffer that in-place writes would then share
    between runs."""
    if _writes_in_place() and not backends.in_xla_compilation():
        return tf.raw_ops.Empty(shape=tf.stack(shape), dtype=dtype, init=True)
    return ops.zeros(shape, dtype=dtype)


def _writes_in_place():
    """True while tracing a TensorFlow graph inside `in_place_cache_writes()` (never for eager
    calls)."""
    return getattr(_WRITES, "in_place", False) and not tf.executing_eagerly()


@contextlib.contextmanager
def in_place_cache_writes(enabled=True):
    """Within this context, `write_cache` calls traced into a graph without XLA update the cache
    in place (see there). For code that owns its caches, like `gpt_keras.decoding`."""
    previous = getattr(_WRITES, "in_place", False)
    _WRITES.in_place = enabled
    try:
        yield
    finally:
        _WRITES.in_place = previous


def causal_mask(query_length, key_length, query_start=0, padding_mask=None):
    """Boolean `[B or 1, 1, T, S]` mask: key `s` is visible to query `t` when `s <= query_start + t`
    and `padding_mask[b, s]` is true. `padding_mask` is `[B, S]` (1/True = real token) or None."""
    query_positions = query_start + ops.arange(query_length, dtype="int32")  # [T]
    key_positions = ops.arange(key_length, dtype="int32")  # [S]
    mask = ops.expand_dims(key_positions, 0) <= ops.expand_dims(query_positions, 1)  # [T, S]
    mask = ops.reshape(mask, (1, 1, query_length, key_length))
    if padding_mask is not None:
        keys_visible = ops.cast(padding_mask, "bool")  # [B, S]
        mask = ops.logical_and(mask, ops.expand_dims(ops.expand_dims(keys_visible, 1), 1))
    return mask


@keras.saving.register_keras_serializable(package="gpt_keras")
class MultiHeadAttention(keras.layers.Layer):
    """Causal multi-head self-attention (GPT-2's `attn`), with an optional key/value cache.

    Shapes: B batch, T new tokens, S cache length, D = hidden size (the last input dimension),
    H = `num_heads`, K = D / H.

    - `inputs` `[B, T, D]` → `[B, T, D]`.
    - `padding_mask` (optional): `[B, T]` without a cache, `[B, S]` over the cache with one;
      1/True marks real tokens. Masked keys receive no attention.
    - `attention_mask` (optional, instead of `padding_mask`): the boolean `[B or 1, 1, T, S]` mask
      of which keys each query sees, e.g. `causal_mask(...)` computed once for all the layers of
      a model (a decoding step in a graph without XLA then runs its ops once, not per layer).
    - `cache` (optional) `[2, B, H, S, K]` (keys, values; keys/values first, so that splitting
      them shares the cache's buffer instead of copying it each step; heads before slots, so
      that attention reads it without a transpose) and `cache_index`, a scalar int: the new
      keys/values are written at positions `cache_index .. cache_index + T - 1`, queries attend to
      cache positions `<= cache_index + t`, and the call returns `(outputs, updated_cache)`. The
      shapes never change, so a decoding loop compiles to one static-shape graph.
    - `cache_slots` (optional, with `cache`): `cache_slots(cache, cache_index, T)` computed once
      for all the layers of a model, whose caches share a shape (see `write_cache`).
    - `return_attention_scores=True` appends the attention probabilities `[B, H, T, S]` (float32,
      before dropout; S = T without a cache) to what the call returns, as Keras'
      `MultiHeadAttention` does: `(outputs, scores)` or `(outputs, updated_cache, scores)`.

    With `rotary_max_wavelength` set, queries and keys are rotated by their positions
    (`RotaryEmbedding`; positions `cache_index ..` with a cache, `0 ..` without) before the keys
    are cached, so attention sees relative positions.

    Masking, scaling and softmax are computed in float32 whatever the dtype policy. The logits
    Q·Kᵀ are taken in float32 under float16 (they could overflow its 65504); under bfloat16
    (float32's range) in bfloat16 and then cast, sparing a float32 copy of the cached keys per
    step. The probabilities are cast back to the compute dtype for the product with V.
    Under float32 this is the same einsum → where → softmax → einsum sequence as
    `keras.ops.dot_product_attention` on the TensorFlow backend (identical outputs and gradients;
    equal speed under XLA and 0.78x of this code's without, see BENCHMARKS.md), written out because
    that op has no attention dropout and computes Q·Kᵀ in the compute dtype.

    Args:
        num_heads: number of attention heads; must divide D.
        dropout: dropout rate on the attention probabilities.
        kernel_initializer: initializer of the fused query/key/value projection.
        output_kernel_initializer: initializer of the output projection (GPT-2 scales it by
            `1/sqrt(2 * num_layers)`); defaults to `kernel_initializer`.
        bias_initializer: initializer of both projections' biases.
        rotary_max_wavelength: None (no rotary embedding, GPT-2) or the base of the rotary
            embedding's wavelengths (10000 in RoFormer/LLaMA).
    """

    def __init__(
        self,
        num_heads,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer=None,
        bias_initializer="zeros",
        rotary_max_wavelength=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(
                f"`num_heads` must be a positive integer. Received: num_heads={num_heads!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = keras.initializers.get(
            output_kernel_initializer or kernel_initializer
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.rotary_max_wavelength = rotary_max_wavelength
        self.rotary_embedding = None
        if rotary_max_wavelength is not None:  # checks the value now
            self.rotary_embedding = RotaryEmbedding(
                rotary_max_wavelength, dtype=self.dtype_policy, name="rotary_embedding"
            )
        self.supports_masking = False

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim is None or hidden_dim % self.num_heads:
            raise ValueError(
                f"The hidden size (last input dimension) must be divisible by `num_heads`. "
                f"Received: hidden size={hidden_dim}, num_heads={self.num_heads}"
            )
        self.hidden_dim = hidden_dim
        self.head_dim = hidden_dim // self.num_heads
        if self.rotary_embedding is not None and self.head_dim % 2:
            raise ValueError(
                "Rotary embeddings need an even head size (hidden size / num_heads). Received: "
                f"hidden size={hidden_dim}, num_heads={self.num_heads}"
            )
        self.query_key_value = Dense(
            3 * hidden_dim,
            kernel_initializer=fresh(self.kernel_initializer),
            bias_initializer=fresh(self.bias_initializer),
            dtype=self.dtype_policy,
            name="query_key_value",
        )
        self.query_key_value.build(input_shape)
        self.output_dense = Dense(
            hidden_dim,
            kernel_initializer=fresh(self.output_kernel_initializer),
            bias_initializer=fresh(self.bias_initializer),
            dtype=self.dtype_policy,
            name="output",
        )
        self.output_dense.build(input_shape)
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def call(self, inputs, padding_mask=None, cache=None, cache_index=None, training=None,
             return_attention_scores=False, attention_mask=None, cache_slots=None):
        if attention_mask is not None and padding_mask is not None:
            raise ValueError("Pass `padding_mask` or `attention_mask` (which includes the "
                             "padding), not both.")
        # Written for few ops in graphs without XLA, where a decoding step is dispatch-bound
        # (BENCHMARKS.md, "Generation"): splits instead of slices, -1 for the batch. (The
        # projections stay 3-D `Dense` calls: 2-D ones saved ~10 ops each, but made GPT-2
        # small's float32 decoding 9% slower in a plain graph, measured A/B.)
        length = ops.shape(inputs)[1]  # an int when static (a decoding step: 1)
        single_query = isinstance(length, int) and length == 1
        qkv = self.query_key_value(inputs)  # [B, T, 3D]
        qkv = ops.reshape(qkv, (-1, length, 3, self.num_heads, self.head_dim))

        query_start = 0
        if cache is not None:
            if cache_index is None:
                raise ValueError("`cache_index` is required when a `cache` is given.")
            query_start = ops.convert_to_tensor(cache_index, dtype="int32")
        if self.rotary_embedding is not None:  # queries and keys in one rotation
            query_key, value = ops.split(qkv, [2], axis=2)
            query_key = self.rotary_embedding(query_key, start_index=query_start)
            qkv = ops.concatenate([query_key, value], axis=2)
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # [3, B, H, T, K]
        query, key_value = ops.split(qkv, [1], axis=0)
        query = ops.squeeze(query, axis=0)  # [B, H, T, K]
        if cache is not None:
            # [2, B, H, S, K]
            cache = key_value = write_cache(cache, key_value, query_start, cache_slots)
        # Along the first axis, TensorFlow's unstack shares the buffer: no copy of the cache.
        key, value = ops.unstack(key_value, 2, axis=0)  # [B, H, S, K] each

        mask = attention_mask  # [B|1, 1, T, S]
        if mask is None:
            mask = causal_mask(length, ops.shape(key)[2], query_start, padding_mask)
        scale = 1.0 / float(self.head_dim) ** 0.5
        # Keys first: XLA then reads the cache as stored, without transposing it (-10% per
        # decoded token on the shakespeare-char shape).
        if self.compute_dtype == "float16":
            # float16's largest value is 65504: Q·Kᵀ could overflow to inf (and softmax to NaN).
            key, query = ops.cast(key, "float32"), ops.cast(query, "float32")
        if single_query and self.hidden_dim <= _ELEMENTWISE_MAX_DIM:
            # One query per row (a decoding step) of a small model: products and sums in float32.
            # In a TensorFlow graph without XLA, oneDNN splits einsum and softmax over the threads
            # even at this size, and the hand-off costs more than the work (attention of a
            # decoding step at batch 1: 33 vs 149 µs at 4 heads × 32, 54 vs 148 at 6 × 64; at
            # batch 8 slower, at 12 × 64 slower: `benchmarks/decode_profile.py --part attention`).
            # Every engine (XLA, TFLite, other backends) takes the same path, so they decode the
            # same tokens; XLA's speed is the same.
            logits = ops.sum(ops.cast(key, "float32") * ops.cast(query, "float32"), axis=-1)
            logits = ops.where(mask, ops.expand_dims(logits, 2) * scale, _MASKED_LOGIT)
            exponentials = ops.exp(logits - ops.max(logits, axis=-1, keepdims=True))
            scores = exponentials / ops.sum(exponentials, axis=-1, keepdims=True)  # [B, H, 1, S]
            probabilities = self.attention_dropout(scores, training=training)  # compute dtype
            weights = ops.expand_dims(ops.squeeze(ops.cast(probabilities, "float32"), 2), -1)
            attended = ops.sum(weights * ops.cast(value, "float32"), axis=2)  # [B, H, K]
            attended = ops.cast(attended, self.compute_dtype)  # = [B, T, H, K] for T = 1
        else:
            logits = ops.einsum("bhsk,bhtk->bhts", key, query)  # [B, H, T, S]
            logits = ops.cast(logits, "float32") * scale
            logits = ops.where(mask, logits, _MASKED_LOGIT)
            scores = ops.softmax(logits, axis=-1)  # [B, H, T, S] float32
            probabilities = ops.cast(scores, self.compute_dtype)
            probabilities = self.attention_dropout(probabilities, training=training)
            attended = ops.einsum("bhts,bhsk->bthk", probabilities, value)  # [B, T, H, K]
        outputs = self.output_dense(ops.reshape(attended, (-1, length, self.hidden_dim)))
        results = (outputs,) if cache is None else (outputs, cache)
        if return_attention_scores:
            results += (scores,)
        return results if len(results) > 1 else outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "output_kernel_initializer": keras.initializers.serialize(
                    self.output_kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "rotary_max_wavelength": self.rotary_max_wavelength,
            }
        )
        return config
