"""Where a decoded token's time goes: the profiles behind BENCHMARKS.md's missed decoding targets.

Run from the repository root (about 3 minutes on 2 cores):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/decode_profile.py

1. `--part kernels`: the matrix-vector products of batch-1 decoding, per weight format and
   engine. A chain of 8 `Dense(768 → 12288)` layers applied to one token, 20 times in a
   `tf.while_loop` (each input depends on the previous output, so nothing is hoisted): float32
   with `keras.layers.Dense` (whose bias add XLA fuses into a one-thread matrix-vector kernel)
   and with gpt_keras' `Dense` (which keeps the add apart under XLA), bfloat16, and Keras
   weight-only int8 (`Int8QuantizationConfig(activation_quantizer=None)`), in a plain graph and
   under XLA. Reported: wall and process CPU ms per chain, and the bytes of weights per wall
   second. Then GPT-2 small's own 48 projections (gpt_keras' `Dense`, float32 and bfloat16), whose
   smaller matrices stream at a lower rate, against the same products with each kernel stored
   transposed (`[units, in]`, multiplied with `transpose_b`).
2. `--part ops [--preset gpt2-small] [--weights bfloat16|int8]`: op executions per decoded token of the served `generate`
   signature: the `shakespeare-char` preset (or `--preset`'s shape) with random weights and a character tokenizer, exported with
   `gpt_keras.serving`, loaded with the TF1 Session loader (XLA disabled, as TF Serving runs it),
   128 greedy tokens traced with `RunOptions(trace_level=FULL_TRACE)`; the most frequent op types
   and those with the most op time (tracing slows each op, so op times are relative).

3. `--part attention`: the attention of one decoding step (one query per row against a
   144-slot cache, mask, softmax, weighted values) as `MultiHeadAttention` computes it with einsum
   and softmax, and elementwise (products and sums in float32, the single-query path), at the
   `shakespeare-char` head shape (4 × 32), nanoGPT's GPU model's (6 × 64) and GPT-2 small's
   (12 × 64), batch 1 and 8; plain graph, 200 steps in a `tf.while_loop`. `--intra-op-threads 1`
   reruns it with one intra-op thread (run with `TF_ENABLE_ONEDNN_OPTS=0` for TensorFlow's own
   kernels).
4. `--part xla [--preset gpt2-small]`: where in-process XLA decoding spends a token. Random
   weights (the preset's vocabulary: GPT-2's 50,257 for `gpt2-small`), batch 1, a 16-token
   prompt, 128 greedy tokens with `generate(..., jit_compile=True)`, traced with
   `tf.profiler.experimental`: the time of each XLA thunk (`dot.12` → `dot`, one per compiled
   kernel or library call), summed by kind, per token. Wall time per token is measured in a
   separate untraced call.

Each part runs in its own process (`--part all` starts each in turn).
"""

import argparse
import collections
import itertools
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's gpt_keras

INPUTS, UNITS, LAYERS, CALLS = 768, 12288, 8, 20
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
# Profiler events that enclose XLA's thunks rather than being one (`--part xla`).
RUNTIME_SCOPES = ("Eager", "TFE_", "BlockUntilReady", "__inference", "function", "cond")


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_call(function, x):
    """Wall and process CPU seconds per chain of `function(x)` (`CALLS` chains a call), after
    one call that traces and compiles it."""
    function(x)
    wall, cpu = time.perf_counter(), cpu_seconds()
    function(x).numpy()
    return (time.perf_counter() - wall) / CALLS, (cpu_seconds() - cpu) / CALLS


def kernels():
    import keras
    import tensorflow as tf

    from gpt_keras.layers._dense import Dense, _optimization_barrier

    tf.get_logger().setLevel("ERROR")  # one trace per table row is intended, not retracing
    keras.utils.set_random_seed(0)
    x = tf.random.normal([1, 1, INPUTS])
    print(f"{LAYERS} x Dense({INPUTS} -> {UNITS}) on one token, {CALLS} chains per call")
    print("| weights | engine | wall ms per chain | CPU ms per chain | weight GB/s |")
    print("|---|---|---:|---:|---:|")
    for weights in ("float32, keras.layers.Dense", "float32", "bfloat16", "int8"):
        layers = []
        for _ in range(LAYERS):
            dense = keras.layers.Dense if weights.endswith("keras.layers.Dense") else Dense
            layer = dense(UNITS, dtype="bfloat16" if weights == "bfloat16" else None)
            layer.build((None, None, INPUTS))
            if weights == "int8":
                layer.quantize("int8", config=keras.quantizers.Int8QuantizationConfig(
                    activation_quantizer=None))
            layers.append(layer)
        for jit_compile in (False, True):

            @tf.function(jit_compile=jit_compile)
            def chains(x):
                def body(i, y):
                    for layer in layers:
                        out = layer(x + tf.cast(y, x.dtype))
                        y = y + tf.cast(tf.reduce_sum(out), tf.float32) * 1e-9
                    return i + 1, y

                return tf.while_loop(lambda i, y: i < CALLS, body, (0, tf.constant(0.0)))[1]

            wall, cpu = per_call(chains, x)
            gigabytes = LAYERS * INPUTS * UNITS * BYTES[weights.split(",")[0]] / 1e9
            print(f"| {weights} | {'XLA' if jit_compile else 'plain graph'} | "
                  f"{1000 * wall:.1f} | {1000 * cpu:.1f} | {gigabytes / wall:.1f} |", flush=True)

    # GPT-2 small's own projections: smaller matrices than above, streamed at a lower rate; and
    # the same products with each kernel stored transposed, `[units, in]`, as `transpose_b`.
    print("\nGPT-2 small's 48 projections (12 x Dense 768->2304, 768->768, 768->3072, 3072->768), "
          "one token; kernels as stored ([in, units], gpt_keras' Dense) or transposed "
          "([units, in], the same bias add)")
    print("| weights | kernels | engine | wall ms per token | CPU ms per token | weight GB/s |")
    print("|---|---|---|---:|---:|---:|")
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    wide = tf.random.normal([1, 1, 3072])
    for weights, layout, jit_compile in itertools.product(
        ("float32", "bfloat16"), ("[in, units]", "[units, in]"), (False, True)
    ):
        blocks = []
        for _ in range(12):
            for inputs, units in shapes:
                layer = Dense(units, dtype=weights)
                layer.build((None, None, inputs))
                blocks.append((layer, tf.Variable(tf.transpose(layer.kernel))))

        def project(layer, transposed, x):
            if layout == "[in, units]":
                return layer(x)
            y = tf.matmul(tf.reshape(x, [1, -1]), transposed, transpose_b=True)
            if jit_compile:
                y = _optimization_barrier(y)  # as `Dense` does: the add stays apart
            return tf.reshape(y + layer.bias, [1, 1, -1])

        @tf.function(jit_compile=jit_compile)
        def projections(x):
            def body(i, y):
                for layer, transposed in blocks:
                    inputs = tf.cast(x[:, :, :layer.kernel.shape[0]] + y, weights)
                    out = project(layer, transposed, inputs)
                    y = y + tf.cast(tf.reduce_sum(out), tf.float32) * 1e-9
                return i + 1, y

            return tf.while_loop(lambda i, y: i < CALLS, body, (0, tf.constant(0.0)))[1]

        wall, cpu = per_call(projections, wide)
        gigabytes = 12 * sum(i * u for i, u in shapes) * BYTES[weights] / 1e9
        print(f"| {weights} | {layout} | {'XLA' if jit_compile else 'plain graph'} | "
              f"{1000 * wall:.1f} | {1000 * cpu:.1f} | {gigabytes / wall:.1f} |", flush=True)


def ops(preset, weights):
    import dataclasses

    import numpy as np
    import tensorflow as tf

    from gpt_keras import GPT, GPTConfig, serving
    from gpt_keras.precision import with_weights
    from gpt_keras.tokenizers import CharTokenizer

    corpus = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train(corpus)
    config = GPTConfig.from_preset(preset, vocab_size=tokenizer.vocab_size)
    model = GPT(**dataclasses.asdict(config))
    model.build()
    model = with_weights(model, weights)
    new_tokens = 128
    with tempfile.TemporaryDirectory() as directory:
        export = serving.export_model(model, tokenizer, os.path.join(directory, "model"))
        session = tf.compat.v1.Session(graph=tf.Graph())
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export)
        spec = meta_graph.signature_def["generate"]
        feeds = {"prompts": np.array([corpus[:16].encode("utf-8")], object),
                 "max_new_tokens": np.int32(new_tokens), "temperature": np.float32(0),
                 "top_k": np.int32(0), "top_p": np.float32(1), "seed": np.int64(0),
                 "repetition_penalty": np.float32(1), "min_new_tokens": np.int32(0),
                 "banned_token_ids": np.zeros([0], np.int32),
                 "bias_token_ids": np.zeros([0], np.int32),
                 "bias_values": np.zeros([0], np.float32), "stop_strings": np.zeros([0], object)}
        feeds = {spec.inputs[name].name: value for name, value in feeds.items()}
        fetch = spec.outputs["token_ids"].name
        session.run(fetch, feeds)
        metadata = tf.compat.v1.RunMetadata()
        out = session.run(fetch, feeds, run_metadata=metadata, options=tf.compat.v1.RunOptions(
            trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
    tokens = int((out >= 0).sum())
    counts, micros = collections.Counter(), collections.Counter()
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            label = node.timeline_label
            op = label.split("=", 1)[1].split("(", 1)[0].strip() if "=" in label else node.node_name
            counts[op] += 1
            micros[op] += node.all_end_rel_micros
    total = sum(counts.values())
    print(f"served `generate`, {tokens} new tokens: {total} op executions, "
          f"{total / tokens:.0f} per token; op time (traced, both threads) "
          f"{sum(micros.values()) / tokens / 1000:.2f} ms per token")
    print("| op | executions per token | traced op ms per token |")
    print("|---|---:|---:|")
    for op, count in counts.most_common(15):
        print(f"| {op} | {count / tokens:.1f} | {micros[op] / tokens / 1000:.3f} |")
    print("\nmost op time:")
    for op, time_ in micros.most_common(8):
        print(f"| {op} | {counts[op] / tokens:.1f} | {time_ / tokens / 1000:.3f} |")


def xla(preset):
    import glob
    import re

    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from gpt_keras import GPT, generation

    keras.utils.set_random_seed(0)
    model = GPT.from_preset(preset)
    model.build()
    prompt = np.random.default_rng(0).integers(0, 65, (1, 16), dtype=np.int32)
    new_tokens = 128

    def decode():
        return generation.generate(model, prompt, new_tokens, temperature=0.0, jit_compile=True)

    decode()
    start = time.perf_counter()
    decode()
    wall = (time.perf_counter() - start) / new_tokens
    with tempfile.TemporaryDirectory() as directory:
        tf.profiler.experimental.start(directory)
        decode()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        path = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)[0]
        space.ParseFromString(Path(path).read_bytes())
    milliseconds, counts = collections.Counter(), collections.Counter()
    for plane in space.planes:
        names = {key: value.name for key, value in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" in name or name.startswith(RUNTIME_SCOPES):
                    continue  # scopes around the thunks (executors, the eager call)
                kind = re.sub(r"[._]\d+$", "", name)
                milliseconds[kind] += event.duration_ps / 1e9 / new_tokens
                counts[kind] += 1 / new_tokens
    print(f"{preset}, batch 1, XLA: {1000 * wall:.1f} ms per token (untraced); thunks "
          f"{sum(milliseconds.values()):.1f} ms per token (traced)")
    print("| thunk kind | per token | ms per token |")
    print("|---|---:|---:|")
    for kind, time_ in milliseconds.most_common(8):
        print(f"| {kind} | {counts[kind]:.0f} | {time_:.2f} |")


def attention(intra_op_threads):
    import tensorflow as tf

    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    slots, steps = 144, 200

    def einsum(query, key, value, mask):  # [B, H, 1, K], [B, H, S, K], [B, H, S, K], [1, 1, 1, S]
        logits = tf.where(mask, tf.einsum("bhsk,bhtk->bhts", key, query) * 0.1, -1e9)
        return tf.einsum("bhts,bhsk->bthk", tf.nn.softmax(logits, -1), value)

    def elementwise(query, key, value, mask):
        logits = tf.where(mask, tf.expand_dims(tf.reduce_sum(key * query, -1), 2) * 0.1, -1e9)
        exponentials = tf.exp(logits - tf.reduce_max(logits, -1, keepdims=True))
        weights = exponentials / tf.reduce_sum(exponentials, -1, keepdims=True)
        return tf.reduce_sum(tf.expand_dims(tf.squeeze(weights, 2), -1) * value, 2)

    print(f"attention of one decoding step, {slots} cache slots, intra-op threads: "
          f"{intra_op_threads or 'default'}")
    print("| heads × head size | batch | einsum + softmax µs | elementwise µs |")
    print("|---|---:|---:|---:|")
    for heads, size in ((4, 32), (6, 64), (12, 64)):
        for batch in (1, 8):
            seeds = iter(range(10))
            key, value = (tf.random.stateless_normal([batch, heads, slots, size], [next(seeds), 0])
                          for _ in range(2))
            query = tf.random.stateless_normal([batch, heads, 1, size], [7, 0])
            mask = tf.ones([1, 1, 1, slots], tf.bool)
            times = []
            for core in (einsum, elementwise):
                @tf.function(jit_compile=False)
                def loop(query, core=core):
                    def body(i, q):
                        out = tf.reshape(core(q, key, value, mask), tf.shape(q))
                        return i + 1, q + 1e-6 * out
                    return tf.while_loop(lambda i, q: i < steps, body, (0, query))[1]
                loop(query)
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    loop(query).numpy()
                    best = min(best, time.perf_counter() - start)
                times.append(1e6 * best / steps)
            print(f"| {heads} × {size} | {batch} | {times[0]:.0f} | {times[1]:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["kernels", "ops", "xla", "attention", "all"], default="all")
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--preset", choices=["shakespeare-char", "gpt2-small"],
                        default="shakespeare-char")
    parser.add_argument("--weights", choices=["float32", "bfloat16", "int8"], default="float32",
                        help="`--part ops`: the exported model's weight format")
    args = parser.parse_args()
    if args.part == "all":
        for part in ("kernels", "ops", "xla", "attention"):
            print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
            subprocess.run([sys.executable, __file__, "--part", part], check=True)
        return
    if args.part == "attention":
        return attention(args.intra_op_threads)
    if args.part == "ops":
        return ops(args.preset, args.weights)
    if args.part == "xla":
        return xla(args.preset)
    kernels()


if __name__ == "__main__":
    main()
