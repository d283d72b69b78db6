"""Training throughput: gpt_keras' training step against nanoGPT's, each system in its own process.

Run from the repository root (nanoGPT's `model.py` from a checkout of karpathy/nanoGPT; it is not
part of this project):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/train_throughput.py --nanogpt PATH/TO/nanoGPT \\
        [--shape baby|6l] [--systems gpt_keras,gpt_keras-bf16,nanogpt,...] [--rounds 6 --steps 30]

Shapes (nanoGPT's Shakespeare-char models, dropout 0, vocabulary 65): `baby` = its CPU config
(4 layers, 4 heads, 128 dims, context 64, batch 12); `6l` = its GPU config's model (6 layers,
6 heads, 384 dims, context 256) at batch 4 so that it fits a CPU round.

Systems:
- `gpt_keras`: the product's training step (`training.py`'s path: `distribute.TrainingGPT` under
  the default strategy, AdamW with weight-decay groups and global-norm clipping 1.0,
  `TrainConfig`'s defaults, so `--xla auto`), float32. `-bf16`: `--mixed-precision bfloat16`.
  A final `-xla` / `-noxla`: `--xla on` / `--xla off` (plain TensorFlow graphs, oneDNN kernels).
  Positions: learned (like nanoGPT).
- `keras_hub`: keras-hub's `GPT2Backbone` of the same shape (learned positions, GPT-2's biases)
  with its tied output head (`token_embedding(h, reverse=True)`) in a `keras.Model`, trained with
  `compile(keras.optimizers.AdamW(1e-3, weight_decay=0.1, beta_2=0.99, global_clipnorm=1.0),
  SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)` + `fit`, float32: what a
  keras-hub user would write (Keras' `jit_compile="auto"` means no XLA on a CPU-only machine).
- `nanogpt`: nanoGPT's `model.py` `GPT` with `configure_optimizers` (AdamW, decay groups), the
  loop of its `train.py` (forward + loss, backward, `clip_grad_norm_(1.0)`, `step`,
  `zero_grad(set_to_none=True)`), torch eager, default threads; `-bf16`: under
  `torch.autocast("cpu", torch.bfloat16)` as its train.py does with `dtype='bfloat16'`;
  `-1t`: one thread.
nanoGPT has no biases (its train.py default `bias=False`); gpt_keras has GPT-2's biases (0.4% of
the parameters at `baby`).

Method: every system runs in its own child process, built once and warmed up (the first step,
trace and compile included, is reported as "first step"); then the parent runs rounds, each
system in turn (the order rotates every round), each turn `--steps` steps on the same fixed random
batch (speed only: the data is not read). A turn's time is from the start of its second step to
the start of its last (gpt_keras: `on_train_batch_begin` of a `fit` call, so the first step's
iterator start-up is not counted), wall and process CPU time; the load average is recorded before
each round. Reported per system: the median tokens/s over rounds, CPU-seconds per wall-second,
and the median of per-round ratios to the first system.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "baby": dict(num_layers=4, num_heads=4, hidden_dim=128, context_length=64, batch_size=12),
    "6l": dict(num_layers=6, num_heads=6, hidden_dim=384, context_length=256, batch_size=4),
}
VOCAB = 65


def _batch(shape, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    windows = rng.integers(0, VOCAB, size=(shape["batch_size"], shape["context_length"] + 1))
    return windows[:, :-1].astype("int32"), windows[:, 1:].astype("int32")


def gpt_keras_child(system, shape, steps):
    """`(first step seconds, run)` for gpt_keras' training step (see `_fit_runner`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import keras
    import tensorflow as tf

    from gpt_keras import distribute
    from gpt_keras.config import MIXED_PRECISION, TrainConfig
    from gpt_keras.training import build_optimizer, uses_xla

    xla = "off" if system.endswith("-noxla") else "on" if system.endswith("-xla") else "auto"
    config = TrainConfig(mixed_precision="bfloat16" if "-bf16" in system else None, xla=xla)
    strategy = distribute.make_strategy(None)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = distribute.TrainingGPT(
            vocab_size=VOCAB, position_embedding="learned",
            **{k: v for k, v in shape.items() if k != "batch_size"},
            dtype=MIXED_PRECISION[config.mixed_precision])
        model.build()
        model.compile(optimizer=build_optimizer(model, config), jit_compile=uses_xla(config))
    inputs, targets = _batch(shape)
    dataset = distribute.stack_pairs(tf.data.Dataset.from_tensors((inputs, targets)).repeat())
    return _fit_runner(model, dataset)


def keras_hub_child(shape):
    """`(first step seconds, run)` for keras-hub's GPT-2 trained with `fit`."""
    import keras
    import keras_hub
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=shape["num_layers"], num_heads=shape["num_heads"],
        hidden_dim=shape["hidden_dim"], intermediate_dim=4 * shape["hidden_dim"],
        max_sequence_length=shape["context_length"], dropout=0.0)
    token_ids = keras.Input((shape["context_length"],), dtype="int32")
    hidden = backbone({"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids)})
    model = keras.Model(token_ids, backbone.token_embedding(hidden, reverse=True))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.1, beta_2=0.99, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    dataset = tf.data.Dataset.from_tensors(_batch(shape)).repeat()
    return _fit_runner(model, dataset)


def _fit_runner(model, dataset):
    """`(first step seconds, run)`: `run(n)` fits n steps and returns `(wall, cpu, n - 2)`, the
    time from the start of the second step to the start of the last."""
    import keras

    marks = []

    class Marks(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            marks.append((time.perf_counter(), time.process_time()))

    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=1, verbose=0)
    first = time.perf_counter() - start

    def run(n):
        marks.clear()
        model.fit(dataset, steps_per_epoch=n, verbose=0, callbacks=[Marks()])
        (w0, c0), (w1, c1) = marks[1], marks[-1]
        return w1 - w0, c1 - c0, n - 2

    return first, run


def nanogpt_child(system, shape, steps, nanogpt):
    import torch

    if system.endswith("-1t"):
        torch.set_num_threads(1)
    sys.path.insert(0, nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=shape["context_length"], vocab_size=VOCAB,
                          n_layer=shape["num_layers"], n_head=shape["num_heads"],
                          n_embd=shape["hidden_dim"], dropout=0.0, bias=False))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    inputs, targets = (torch.from_numpy(a.astype("int64")) for a in _batch(shape))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="-bf16" in system)

    def step():
        with autocast:
            _, loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start

    def run(n):
        step()
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n - 2):
            step()
        w1, c1 = time.perf_counter(), time.process_time()
        step()
        return w1 - w0, c1 - c0, n - 2

    return first, run


def child(args):
    protocol, sys.stdout = sys.stdout, sys.stderr  # the systems' own prints go to stderr
    shape = SHAPES[args.shape]
    if args.child.startswith("nanogpt"):
        first, run = nanogpt_child(args.child, shape, args.steps, args.nanogpt)
    elif args.child == "keras_hub":
        first, run = keras_hub_child(shape)
    else:
        first, run = gpt_keras_child(args.child, shape, args.steps)
    run(max(args.steps // 2, 4))  # warm-up
    print(json.dumps({"first": first}), file=protocol, flush=True)
    for line in sys.stdin:
        wall, cpu, steps = run(int(line))
        print(json.dumps({"wall": wall, "cpu": cpu, "steps": steps}), file=protocol, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="baby")
    parser.add_argument("--systems", default="gpt_keras,nanogpt")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="steps per turn (30)")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout (its model.py)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    systems = args.systems.split(",")
    if any(s.startswith("nanogpt") for s in systems) and not args.nanogpt:
        parser.error("--nanogpt PATH is needed for the nanogpt systems")
    shape = SHAPES[args.shape]
    tokens = shape["batch_size"] * shape["context_length"]
    children, first = {}, {}
    for system in systems:  # started one at a time: compiles do not overlap
        command = [sys.executable, __file__, "--child", system, "--shape", args.shape,
                   "--steps", str(args.steps)] + (["--nanogpt", args.nanogpt] if args.nanogpt else [])
        children[system] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True)
        first[system] = json.loads(children[system].stdout.readline())["first"]
    results = {s: [] for s in systems}
    loads = []
    for round_index in range(args.rounds):
        loads.append(os.getloadavg()[0])
        shift = round_index % len(systems)
        for system in systems[shift:] + systems[:shift]:
            process = children[system]
            process.stdin.write(f"{args.steps}\n")
            process.stdin.flush()
            results[system].append(json.loads(process.stdout.readline()))
        print(f"round {round_index + 1}/{args.rounds}, load {loads[-1]:.2f}: " + ", ".join(
            f"{s} {r[-1]['steps'] * tokens / r[-1]['wall']:,.0f}" for s, r in results.items()),
            flush=True)
    for process in children.values():
        process.stdin.close()
        process.wait()
    base = systems[0]
    print(f"\nshape {args.shape} ({shape}), {args.rounds} rounds x {args.steps} steps, load "
          f"{min(loads):.2f}-{max(loads):.2f}")
    print(f"| system | tokens/s (median) | CPU s per wall s | vs {base} | first step (s) |")
    print("|---|---:|---:|---:|---:|")
    for system in systems:
        rows = results[system]
        speed = statistics.median(r["steps"] * tokens / r["wall"] for r in rows)
        cores = statistics.median(r["cpu"] / r["wall"] for r in rows)
        ratio = statistics.median(b["wall"] / r["wall"] * r["steps"] / b["steps"]
                                  for r, b in zip(rows, results[base]))
        print(f"| {system} | {speed:,.0f} | {cores:.2f} | {ratio:.2f} | {first[system]:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
