"""Attention core and tied output head: gpt_keras vs `keras.ops` alternatives (TensorFlow, CPU).

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/attention.py

Options: `--rounds 5` (alternating timing rounds), `--min-time 0.2` (seconds per measurement),
`--no-head` (skip the tied-head comparison). The default run takes about 1.5 minutes on a 2-core
CPU; see BENCHMARKS.md for results.

1. Attention core. gpt_keras' `MultiHeadAttention` is run with its two projections replaced by the
   identity (its input is then the concatenated `[q | k | v]`, `[B, T, 3D]`), so what is measured is
   exactly its own code from the split to the final reshape: einsum -> scale -> causal `where` ->
   float32 softmax -> einsum. It is compared with the same split/reshape around
   `keras.ops.dot_product_attention`, once with the same boolean causal mask and once with
   `is_causal=True`. Reported: max |difference| of the outputs and of the input gradients, and the
   time of forward + backward (gradient with respect to q, k, v) under `tf.function` with
   `jit_compile=True` and `False`.
2. Full layer (projections included), gpt_keras' layer vs a subclass whose core is
   `dot_product_attention(is_causal=True)`, same weights: what the core difference is worth in
   context.
3. Tied output head: `ops.einsum("btd,vd->btv", x, E)` vs `ops.matmul(x, ops.transpose(E))`
   (keras-hub's `ReversibleEmbedding(reverse=True)`) vs gpt_keras' `backends.matmul(x, E, transpose_b=True)`
   (one 2-D `tf.matmul(..., transpose_b=True)`), forward + backward with respect to x and E.

Every comparison alternates its variants for `--rounds` rounds in one process, each round timing
single calls for `--min-time` seconds per variant, and reports the fastest-decile (10th-percentile)
time per call, the speed ratio of those, and the median of per-round ratios (both robust to load
from other processes on a shared machine).
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Import the checkout's gpt_keras (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

tf.get_logger().setLevel("ERROR")  # one tf.function per variant: retracing warnings are expected

from gpt_keras import backends  # noqa: E402
from gpt_keras.layers import MultiHeadAttention  # noqa: E402
from gpt_keras.layers.multi_head_attention import causal_mask  # noqa: E402
from other_load import OtherLoad  # noqa: E402

# (B, T, H, K): the shakespeare-char training shape and a larger one.
ATTENTION_SHAPES = [(12, 64, 4, 32), (8, 256, 8, 64)]
# (B, T, D, V): shakespeare-char, and GPT-2 small's width and vocabulary on 256 tokens.
HEAD_SHAPES = [(12, 64, 128, 65), (2, 128, 768, 50257)]


def identity(x):
    return x


def gpt_keras_core(num_heads, hidden_dim):
    """gpt_keras' own attention code with identity projections: `[B, T, 3D]` -> `[B, T, D]`."""
    layer = MultiHeadAttention(num_heads)
    layer.build((None, None, hidden_dim))
    # Bypass Keras' attribute tracking: plain functions in place of the two Dense layers.
    object.__setattr__(layer, "query_key_value", identity)
    object.__setattr__(layer, "output_dense", identity)
    return lambda qkv: layer.call(qkv)


def dot_product_core(num_heads, hidden_dim, is_causal):
    """The same split/reshape around `keras.ops.dot_product_attention`."""
    head_dim = hidden_dim // num_heads

    def core(qkv):
        batch_size, length = ops.shape(qkv)[0], ops.shape(qkv)[1]
        heads_shape = (batch_size, length, num_heads, head_dim)
        query, key, value = (ops.reshape(t, heads_shape) for t in ops.split(qkv, 3, axis=-1))
        mask = None if is_causal else causal_mask(length, length)
        attended = ops.dot_product_attention(
            query, key, value, mask=mask, scale=1.0 / head_dim**0.5, is_causal=is_causal
        )
        return ops.reshape(attended, (batch_size, length, hidden_dim))

    return core


class DotProductAttentionMHA(MultiHeadAttention):
    """gpt_keras' layer with its core replaced by `dot_product_attention(is_causal=True)` (no
    cache, no padding mask, no attention dropout: enough for this benchmark)."""

    def call(self, inputs, padding_mask=None, cache=None, cache_index=None, training=None):
        batch_size, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
        heads_shape = (batch_size, length, self.num_heads, self.head_dim)
        query, key, value = (
            ops.reshape(t, heads_shape) for t in ops.split(self.query_key_value(inputs), 3, axis=-1)
        )
        attended = ops.dot_product_attention(
            query, key, value, scale=1.0 / self.head_dim**0.5, is_causal=True
        )
        return self.output_dense(ops.reshape(attended, (batch_size, length, self.hidden_dim)))


def forward_backward(function, num_inputs, jit_compile, variables=()):
    """A `tf.function` returning (outputs, gradients w.r.t. the inputs and `variables`) of
    `sum(function(*inputs) * cotangent)`, a fixed random cotangent making the backward pass
    non-trivial."""

    @tf.function(jit_compile=jit_compile)
    def step(*args):
        inputs, cotangent = args[:num_inputs], args[num_inputs]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = function(*inputs)
            loss = tf.reduce_sum(outputs * cotangent)
        return outputs, tape.gradient(loss, list(inputs) + [v.value for v in variables])

    return step


def call_times(step, args, min_time):
    """Seconds of each of as many single calls as fit in `min_time` (at least 3)."""
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time:
        begin = time.perf_counter()
        result = step(*args)
        float(tf.reduce_sum(result[0]))  # make sure the work is done
        times.append(time.perf_counter() - begin)
    return times


def alternate(steps, args, rounds, min_time, quiet_share=0.1):
    """Times each of `steps` (name -> function) in `rounds` rounds, alternating the order. Returns
    name -> all single-call times, name -> per-round median call time, and per round whether it
    was quiet (other processes used less than `quiet_share` CPU-s per second of it)."""
    for step in steps.values():  # trace + compile outside the timing
        step(*args)
    samples = {name: [] for name in steps}
    per_round = {name: [] for name in steps}
    quiet = []
    order = list(steps)
    other_load = OtherLoad()
    for _ in range(rounds):
        start = time.perf_counter()
        for name in order:
            times = call_times(steps[name], args, min_time)
            samples[name] += times
            per_round[name].append(statistics.median(times))
        order.reverse()
        quiet.append(other_load.seconds() < quiet_share * (time.perf_counter() - start))
    return samples, per_round, quiet


def report(timings, baseline):
    """Prints each variant's fastest-decile time per call and its speed relative to `baseline`:
    from the fastest-decile times, as the median of per-round ratios, and as the median of
    per-round ratios over the quiet rounds."""
    samples, per_round, quiet = timings
    fast = {name: float(np.percentile(values, 10)) for name, values in samples.items()}
    print(f"    ({sum(quiet)} of {len(quiet)} rounds quiet)")
    for name in samples:
        ratios = [b / v for b, v in zip(per_round[baseline], per_round[name])]
        quiet_ratios = [r for r, q in zip(ratios, quiet) if q]
        quiet_text = (f", quiet rounds {statistics.median(quiet_ratios):.3f}x"
                      if quiet_ratios else "")
        print(f"    {name:34s} {1000 * fast[name]:9.3f} ms   speed vs {baseline}: "
              f"{fast[baseline] / fast[name]:.3f}x (per-round {statistics.median(ratios):.3f}x"
              f"{quiet_text})")


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def attention_benchmark(args):
    rng = np.random.default_rng(0)
    for batch, length, heads, head_dim in ATTENTION_SHAPES:
        hidden = heads * head_dim
        print(f"\nAttention core, B={batch} T={length} H={heads} K={head_dim} "
              "(forward + backward w.r.t. q, k, v)")
        qkv = tf.constant(rng.standard_normal((batch, length, 3 * hidden)), tf.float32)
        cotangent = tf.constant(rng.standard_normal((batch, length, hidden)), tf.float32)
        cores = {
            "gpt_keras core": gpt_keras_core(heads, hidden),
            "dot_product_attention(mask)": dot_product_core(heads, hidden, is_causal=False),
            "dot_product_attention(is_causal)": dot_product_core(heads, hidden, is_causal=True),
        }
        for jit in (True, False):
            steps = {name: forward_backward(core, 1, jit) for name, core in cores.items()}
            reference = steps["gpt_keras core"](qkv, cotangent)
            print(f"  jit_compile={jit}")
            for name, step in list(steps.items())[1:]:
                out, grads = step(qkv, cotangent)
                print(f"    max |diff| vs gpt_keras, {name}: outputs "
                      f"{max_abs_diff([out], [reference[0]]):.1e}, gradients "
                      f"{max_abs_diff(grads, reference[1]):.1e}")
            report(alternate(steps, (qkv, cotangent), args.rounds, args.min_time), "gpt_keras core")

        print(f"  Full layer (projections included, D={hidden}, "
              "gradients w.r.t. input and weights)")
        keras.utils.set_random_seed(0)
        layer = MultiHeadAttention(heads)
        layer.build((None, None, hidden))
        swapped = DotProductAttentionMHA(heads)
        swapped.build((None, None, hidden))
        swapped.set_weights(layer.get_weights())
        x = tf.constant(rng.standard_normal((batch, length, hidden)), tf.float32)
        for jit in (True, False):
            steps = {
                "gpt_keras layer": forward_backward(layer, 1, jit, layer.trainable_variables),
                "layer, dot_product_attention core": forward_backward(
                    swapped, 1, jit, swapped.trainable_variables
                ),
            }
            out_a, grads_a = steps["gpt_keras layer"](x, cotangent)
            out_b, grads_b = steps["layer, dot_product_attention core"](x, cotangent)
            print(f"  jit_compile={jit}: max |diff| outputs {max_abs_diff([out_a], [out_b]):.1e}, "
                  f"gradients {max_abs_diff(grads_a, grads_b):.1e}")
            report(alternate(steps, (x, cotangent), args.rounds, args.min_time), "gpt_keras layer")


def head_benchmark(args):
    rng = np.random.default_rng(1)
    heads = {
        'einsum("btd,vd->btv")': lambda x, e: ops.einsum("btd,vd->btv", x, e),
        "matmul(x, transpose(E))": lambda x, e: ops.matmul(x, ops.transpose(e)),
        "gpt_keras matmul(x, E, transpose_b=True)": functools.partial(backends.matmul, transpose_b=True),
    }
    for batch, length, dim, vocab in HEAD_SHAPES:
        print(f"\nTied output head, B={batch} T={length} D={dim} V={vocab} "
              "(forward + backward w.r.t. x and E)")
        x = tf.constant(rng.standard_normal((batch, length, dim)), tf.float32)
        embeddings = tf.constant(0.02 * rng.standard_normal((vocab, dim)), tf.float32)
        cotangent = tf.constant(rng.standard_normal((batch, length, vocab)), tf.float32)
        for jit in (True, False):
            steps = {name: forward_backward(f, 2, jit) for name, f in heads.items()}
            out_a, grads_a = steps['einsum("btd,vd->btv")'](x, embeddings, cotangent)
            for name in list(heads)[1:]:
                out_b, grads_b = steps[name](x, embeddings, cotangent)
                print(f"  jit_compile={jit}, {name}: max |diff| outputs "
                      f"{max_abs_diff([out_a], [out_b]):.1e}, gradients "
                      f"{max_abs_diff(grads_a, grads_b):.1e}")
            report(
                alternate(steps, (x, embeddings, cotangent), args.rounds, args.min_time),
                'einsum("btd,vd->btv")',
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--no-head", action="store_true", help="skip the tied-head comparison")
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    other_load = OtherLoad()
    attention_benchmark(args)
    if not args.no_head:
        head_benchmark(args)
    print(f"\nCPU time used by other processes during the run: {other_load.seconds():.1f} s")


if __name__ == "__main__":
    main()
