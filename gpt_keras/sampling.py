"""Choosing the next token from logits, in float32, with core TensorFlow ops only.

The same function runs under XLA, in a plain TensorFlow graph (TF Serving with XLA disabled) and
in TFLite's builtin ops, and draws the same tokens in all three for a seed: random numbers come
from an integer hash (`uniform`), not from TensorFlow's random ops.

Conventions (the knobs of `gpt_keras.decoding.Settings`):
- `temperature == 0` is greedy (argmax); otherwise logits are divided by `temperature`.
- `top_k`: keep the `top_k` largest logits, and every logit tied with the `top_k`-th (as Hugging
  Face's `TopKLogitsWarper`); `top_k ≥ V` keeps everything.
- `top_p`: then keep the nucleus, the fewest tokens, most likely first, whose probability
  (renormalised after the top-k cut, as in Hugging Face) reaches `top_p`; `top_p == 1` keeps
  everything.
- A token is drawn by inverting the cumulative distribution with one uniform number per row.
"""

import numpy as np
import tensorflow as tf

__all__ = ["sample", "uniform"]

# `top_k`/`top_p` look at this many most likely tokens first (see `sample`).
CANDIDATES = 256


def sample(logits, temperature, top_k, top_p, seed, position=0):
    """One token id per row of float logits `[B, V]`.

    `temperature` float32 `[]` (0 = argmax), `top_k` int32 `[]` in [1, V] (V = no cut), `top_p`
    float32 `[]` in (0, 1] (1 = no cut), `seed` int32 `[2]` (each in [0, 2**31)) and `position`
    int32 `[]` (mixed into the random numbers) are tensors, so one graph serves every setting.
    Returns int32 `[B]`.

    `top_k`/`top_p` work on the `CANDIDATES` most likely tokens (`tf.math.top_k` with a static
    k, fast under XLA) when the kept set is known to lie among them; otherwise on the whole
    vocabulary, with cut-offs found by bisection (a full sort of 50k logits costs ~8 ms per row
    on CPU, under XLA or not).
    """
    logits = tf.cast(logits, tf.float32)
    vocab_size = logits.shape[-1]

    def greedy():
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    def draw():
        # Shifted so the maximum is 0: a tiny temperature sends the others to -inf, never NaN.
        scaled = (logits - tf.reduce_max(logits, axis=-1, keepdims=True)) / temperature
        numbers = uniform(tf.shape(scaled)[:1], seed, position)  # [B]
        return tf.cond(
            tf.logical_or(top_k < vocab_size, top_p < 1.0),
            lambda: _sample_restricted(scaled, top_k, top_p, numbers),
            lambda: _inverse_cdf(tf.nn.softmax(scaled, axis=-1), numbers),
        )

    return tf.cond(temperature > 0.0, draw, greedy)


def _sample_restricted(logits, top_k, top_p, numbers):
    """A draw from softmax(`logits` `[B, V]`) restricted as the module docstring says."""
    vocab_size = logits.shape[-1]
    count = min(vocab_size, CANDIDATES)
    values, ids = tf.math.top_k(logits, k=count)  # [B, C], descending
    # Probabilities of the candidates under the full softmax.
    probabilities = tf.exp(values - tf.reduce_logsumexp(logits, axis=-1, keepdims=True))
    # The top_k-th largest logit [B, 1]; ties with it are kept.
    kth = tf.gather(values, tf.minimum(top_k, count) - 1, axis=1)[:, None]
    # Every kept token is a candidate when the k-th logit is inside the candidates and no tie
    # with it is left outside them.
    ties_inside = count == vocab_size or tf.reduce_all(values[:, -1] < kth[:, 0])
    top_k_fits = tf.logical_and(top_k <= count, ties_inside)
    nucleus_fits = tf.logical_and(
        tf.logical_and(top_k >= vocab_size, top_p < 1.0),
        tf.reduce_all(tf.reduce_sum(probabilities, axis=-1) >= top_p),
    )

    def among_candidates():
        in_top_k = tf.logical_or(top_k >= vocab_size, values >= kth)  # [B, C]
        kept = tf.where(in_top_k, probabilities, 0.0)
        if_cut = tf.reduce_sum(kept, axis=-1, keepdims=True)
        kept = kept / tf.where(top_k < vocab_size, if_cut, 1.0)  # renormalised after a cut
        mass_before = tf.cumsum(kept, axis=-1, exclusive=True)
        # The most likely token always stays: its mass_before is 0 < top_p.
        kept = tf.where(mass_before < top_p, kept, 0.0)
        return tf.gather(ids, _inverse_cdf(kept, numbers), axis=1, batch_dims=1)

    def whole_vocabulary():
        restricted = tf.cond(
            top_k < vocab_size,
            lambda: tf.where(
                logits >= tf.expand_dims(_top_k_floor(logits, top_k), 1), logits, -np.inf
            ),
            lambda: logits,
        )
        kept = tf.nn.softmax(restricted, axis=-1)
        kept = tf.cond(
            top_p < 1.0,
            lambda: tf.where(kept >= tf.expand_dims(_nucleus_floor(kept, top_p), 1), kept, 0.0),
            lambda: kept,
        )
        return _inverse_cdf(kept, numbers)

    return tf.cond(tf.logical_or(top_k_fits, nucleus_fits), among_candidates, whole_vocabulary)


def _inverse_cdf(weights, numbers):
    """Per row of non-negative `weights` `[B, n]` (not all zero), the index j with
    `cumsum[j-1] ≤ number · total < cumsum[j]`: a draw from `weights / total`. int32 `[B]`."""
    size = weights.shape[-1]
    cumulative = tf.cumsum(weights, axis=-1)  # [B, n]
    target = tf.expand_dims(numbers * cumulative[:, -1], 1)
    index = tf.reduce_sum(tf.cast(cumulative <= target, tf.int32), axis=-1)
    # Rounding can put the target at the total: fall back to the last token of non-zero weight.
    last = tf.reduce_max(tf.where(weights > 0, tf.range(size), 0), axis=-1)
    return tf.minimum(index, last)


def _top_k_floor(logits, top_k):
    """Per row `[B]`, a value t with at least `top_k` logits ≥ t and within float rounding of the
    `top_k`-th largest: bisection on the value (no sort)."""
    finite = tf.where(tf.math.is_finite(logits), logits, 0.0)
    return _bisect(
        tf.reduce_min(finite, axis=-1),  # at least top_k logits are ≥ this (all the finite ones)
        tf.reduce_max(logits, axis=-1),
        lambda floor: tf.reduce_sum(
            tf.cast(logits >= tf.expand_dims(floor, 1), tf.int32), axis=-1
        ) >= top_k,
    )


def _nucleus_floor(probabilities, top_p):
    """Per row `[B]`, the largest probability t (up to bisection precision) such that the
    tokens with probability ≥ t hold mass ≥ `top_p`: those tokens are the nucleus."""
    return _bisect(
        tf.zeros_like(probabilities[:, 0]),  # all tokens: mass 1 ≥ top_p
        tf.reduce_max(probabilities, axis=-1),
        lambda floor: tf.reduce_sum(
            tf.where(probabilities >= tf.expand_dims(floor, 1), probabilities, 0.0), axis=-1
        ) >= top_p,
    )


def _bisect(low, high, holds, iterations=32):
    """Moves `low` `[B]` up towards `high` while `holds(low)` stays true (it must hold at the
    start and be monotone); returns `low`."""

    def step(i, low, high):
        middle = (low + high) / 2
        ok = holds(middle)
        return i + 1, tf.where(ok, middle, low), tf.where(ok, high, middle)

    _, low, _ = tf.while_loop(
        lambda i, low, high: i < iterations, step, (tf.constant(0), low, high)
    )
    return low


def uniform(shape, seed, position):
    """Uniform float32 numbers in (0, 1) of `shape`, a function of `seed` int32 `[2]`,
    `position` and the element's index only: a counter-based hash in uint32 arithmetic.

    TensorFlow's stateless random ops would do, but their XLA kernels lay the Philox stream out
    differently from the plain-TensorFlow ones (measured: different numbers for one seed), so
    the same seed would sample different tokens with and without `jit_compile`. Integer
    multiply/xor/shift are bit-exact everywhere.
    """
    seed = tf.cast(seed, tf.uint32)
    key = _mix(tf.bitwise.bitwise_xor(seed[0], _mix(tf.cast(position, tf.uint32))))
    key2 = _mix(tf.bitwise.bitwise_xor(seed[1], key))
    counter = tf.reshape(tf.cast(tf.range(tf.reduce_prod(shape)), tf.uint32), shape)
    bits = _mix(tf.bitwise.bitwise_xor(_mix(tf.bitwise.bitwise_xor(counter, key)), key2))
    top24 = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.int32)
    return (tf.cast(top24, tf.float32) + 0.5) * (1.0 / (1 << 24))


def _mix(x):
    """A 32-bit integer hash with good avalanche (Chris Wellons' "lowbias32"); a bijection."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(shift, tf.uint32)))
        x = x * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
