"""Where a decoded token's time goes: the profiles behind BENCHMARKS.md's missed decoding targets.

Run from the repository root (about 2 minutes on 2 cores):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/decode_profile.py

1. `--part kernels`: the matrix-vector products of batch-1 decoding, per weight format and
   engine. A chain of 8 `keras.layers.Dense(768 → 12288)` applied to one token, 20 times in a
   `tf.while_loop` (each input depends on the previous output, so nothing is hoisted), float32,
   bfloat16 and Keras weight-only int8 (`Int8QuantizationConfig(activation_quantizer=None)`),
   in a plain graph and under XLA. Reported: wall and process CPU ms per chain, and the bytes of
   weights per wall second.
2. `--part ops`: op executions per decoded token of the served `generate` signature: the
   `shakespeare-char` preset with random weights and a character tokenizer, exported with
   `gpt_keras.serving`, loaded with the TF1 Session loader (XLA disabled, as TF Serving runs it),
   128 greedy tokens traced with `RunOptions(trace_level=FULL_TRACE)`; the most frequent op types.

Each part runs in its own process (`--part all` starts both in turn).
"""

import argparse
import collections
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


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kernels():
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    x = tf.random.normal([1, 1, INPUTS])
    print(f"{LAYERS} x Dense({INPUTS} -> {UNITS}) on one token, {CALLS} chains per call")
    print("| weights | engine | wall ms per chain | CPU ms per chain | weight GB/s |")
    print("|---|---|---:|---:|---:|")
    for weights in ("float32", "bfloat16", "int8"):
        layers = []
        for _ in range(LAYERS):
            layer = keras.layers.Dense(UNITS, dtype="bfloat16" if weights == "bfloat16" else None)
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

            chains(x)
            wall, cpu = time.perf_counter(), cpu_seconds()
            chains(x).numpy()
            wall, cpu = (time.perf_counter() - wall) / CALLS, (cpu_seconds() - cpu) / CALLS
            gigabytes = LAYERS * INPUTS * UNITS * BYTES[weights] / 1e9
            print(f"| {weights} | {'XLA' if jit_compile else 'plain graph'} | "
                  f"{1000 * wall:.1f} | {1000 * cpu:.1f} | {gigabytes / wall:.1f} |", flush=True)


def ops():
    import dataclasses

    import numpy as np
    import tensorflow as tf

    from gpt_keras import GPT, GPTConfig, serving
    from gpt_keras.tokenizers import CharTokenizer

    corpus = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train(corpus)
    config = GPTConfig.from_preset("shakespeare-char", vocab_size=tokenizer.vocab_size)
    model = GPT(**dataclasses.asdict(config))
    model.build()
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
    counts = collections.Counter(
        node.timeline_label.split("=", 1)[1].split("(", 1)[0].strip()
        if "=" in node.timeline_label else node.node_name
        for device in metadata.step_stats.dev_stats for node in device.node_stats
    )
    total = sum(counts.values())
    print(f"served `generate`, {tokens} new tokens: {total} op executions, "
          f"{total / tokens:.0f} per token")
    print("| op | executions per token |")
    print("|---|---:|")
    for op, count in counts.most_common(15):
        print(f"| {op} | {count / tokens:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["kernels", "ops", "all"], default="all")
    args = parser.parse_args()
    if args.part == "all":
        for part in ("kernels", "ops"):
            print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
            subprocess.run([sys.executable, __file__, "--part", part], check=True)
        return
    {"kernels": kernels, "ops": ops}[args.part]()


if __name__ == "__main__":
    main()
