"""Where gpt_keras' training step spends its time: TensorFlow profiler op times per step.

Run from the repository root:

    python benchmarks/train_profile.py --shape 6l --mixed-precision bfloat16 --xla off
    python benchmarks/train_profile.py --shape baby --xla on

The product's training step (`distribute.TrainingGPT`, `TrainConfig` defaults otherwise) at the
shapes of `benchmarks/train_throughput.py`, on one fixed random batch: 3 warm-up steps, then
`--steps` profiled ones. Prints the op types by total time per step (events of TensorFlow's
compute threads, from the profiler's XSpace; XLA runs appear as their executable's events).
"""

import argparse
import collections
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from gpt_keras import distribute  # noqa: E402
from gpt_keras.config import MIXED_PRECISION, TrainConfig  # noqa: E402
from gpt_keras.training import build_optimizer, uses_xla  # noqa: E402
from train_throughput import SHAPES, VOCAB  # noqa: E402

# Wrapper events that contain the ops (counted by their ops instead).
WRAPPERS = {"Process", "Start", "ExecuteAsyncOnStream", "BlockUntilReady", "Execute", "Done"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="6l")
    parser.add_argument("--mixed-precision", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--xla", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    config = TrainConfig(mixed_precision=args.mixed_precision, xla=args.xla)
    keras.utils.set_random_seed(0)
    model = distribute.TrainingGPT(vocab_size=VOCAB, position_embedding="learned",
                                   **{k: v for k, v in shape.items() if k != "batch_size"},
                                   dtype=MIXED_PRECISION[config.mixed_precision])
    model.build()
    model.compile(optimizer=build_optimizer(model, config), jit_compile=uses_xla(config))
    windows = np.random.default_rng(0).integers(
        0, VOCAB, size=(shape["batch_size"], shape["context_length"] + 1)).astype("int32")
    dataset = distribute.stack_pairs(
        tf.data.Dataset.from_tensors((windows[:, :-1], windows[:, 1:])).repeat())
    model.fit(dataset, steps_per_epoch=3, verbose=0)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=args.steps, verbose=0)
        wall = (time.perf_counter() - start) / args.steps
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(logdir + "/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                op = plane.event_metadata[event.metadata_id].name.split(":")[-1]
                seconds[op] += event.duration_ps / 1e12 / args.steps
                calls[op] += 1 / args.steps
    ops = {op: s for op, s in seconds.items() if op not in WRAPPERS}
    total = sum(ops.values())
    print(f"{args.shape}, {config.mixed_precision or 'float32'}, XLA {uses_xla(config)}: "
          f"{wall * 1000:.0f} ms per step (wall), {total * 1000:.0f} ms of op time per step")
    print("wrapper events per step (containing the ops; an XLA step's executable is "
          "ExecuteAsyncOnStream): " + ", ".join(f"{op} {seconds[op] * 1000:.1f} ms"
                                                for op in sorted(WRAPPERS) if op in seconds))
    print("| op | ms per step | calls per step | share of op time |")
    print("|---|---:|---:|---:|")
    for op, s in sorted(ops.items(), key=lambda item: -item[1])[: args.top]:
        print(f"| {op} | {s * 1000:.1f} | {calls[op]:.0f} | {100 * s / total:.1f}% |")


if __name__ == "__main__":
    main()
