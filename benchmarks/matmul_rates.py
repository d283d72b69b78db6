"""Matmul rate of XLA and of TensorFlow's plain graph (oneDNN), float32 and bfloat16, on this CPU.

Run from the repository root, one process per setting (XLA flags are read at start-up):

    for dtype in float32 bfloat16; do for jit in 1 0; do
        python benchmarks/matmul_rates.py --dtype $dtype --jit $jit; done; done
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/matmul_rates.py --dtype bfloat16

A chain of 16 matmuls of the 6-layer/384-dim training step's shape ([1024, 384] x [384, 1536]
and back), 20 timed calls after one warm-up; prints GFLOP/s and CPU seconds per wall second.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--jit", type=int, choices=[0, 1], default=1, help="1: XLA (default)")
    args = parser.parse_args()
    tf.random.set_seed(0)
    a = tf.cast(tf.random.normal([1024, 384]), args.dtype)
    b = tf.cast(tf.random.normal([384, 1536]), args.dtype)

    @tf.function(jit_compile=bool(args.jit))
    def chain(x, b):
        for _ in range(8):
            x = tf.matmul(tf.matmul(x, b), b, transpose_b=True) * 0.01
        return x

    chain(a, b)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(20):
        chain(a, b).numpy()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    flops = 20 * 8 * 2 * 2 * 1024 * 384 * 1536
    print(f"{args.dtype} {'XLA' if args.jit else 'plain graph'} {os.environ.get('XLA_FLAGS', '')}: "
          f"{flops / wall / 1e9:.1f} GFLOP/s, CPU s per wall s {cpu / wall:.2f}")


if __name__ == "__main__":
    main()
