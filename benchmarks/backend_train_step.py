"""Training-step speed of `GPT` on each Keras backend (TensorFlow, JAX, PyTorch), ratio to TensorFlow.

Run from the repository root (about 3 minutes on an idle 2-core CPU):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/backend_train_step.py [--rounds 6] [--steps 30]

Model: the `shakespeare-char` preset (4 layers, 4 heads, 128 dims, context 64, rotary positions,
tied embeddings), vocab 65, batch 12 x 64 = 768 tokens per step, `compile(AdamW(1e-3),
SparseCategoricalCrossentropy(from_logits=True))` + `fit` on NumPy arrays of random tokens.

Each configuration runs in its own process (the backend is fixed at import) with Keras 3.15's
default `jit_compile="auto"`, which resolves per backend: TensorFlow on a CPU-only machine → no
XLA; JAX → `jax.jit` (XLA); PyTorch → eager (no `torch.compile`). TensorFlow with
`jit_compile=True` (what `gpt-keras train` uses) is measured beside them. Every process first
runs a one-step `fit` (tracing and compiling: "first step") and a warm-up `fit`, then waits; the
parent lets one process at a time run one `fit` of `--steps` steps per round, in an order that
rotates every round, so no two compete for the CPU. Step time: from an
`on_train_batch_begin` callback at the second step to the return of `fit` (JAX dispatches
steps asynchronously; `fit` returns when they are done), divided by `--steps - 1`; the process's
CPU time and the wall time of whole `fit` calls are reported too (CPU / wall > 1 means more than
one busy core). PyTorch runs twice: with its default intra-op threads (one per core) and with
one thread (`torch.set_num_threads(1)`): on a loaded machine its spinning OpenMP threads wait
for each other at every op (a 4-step `fit` took 51 s with 2 threads and 1.8 s with 1 at load
11 on 2 cores). The
load average is read before every round: the machine is shared, so compare ratios (per-round
ratios to TensorFlow, median over rounds), not absolute figures.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name → (KERAS_BACKEND, jit_compile, PyTorch intra-op threads: None = its default)
    "tensorflow": ("tensorflow", "auto", None),
    "tensorflow-xla": ("tensorflow", True, None),
    "jax": ("jax", "auto", None),
    "torch": ("torch", "auto", None),
    "torch-1-thread": ("torch", "auto", 1),
}
BATCH, CONTEXT, VOCAB = 12, 64, 65
READY = "@@ready"


def child(jit_compile, threads, steps):
    """Builds and warms up the model, then runs one `fit` of `steps` steps per line on stdin."""
    import keras
    import numpy as np

    from gpt_keras import GPT

    if threads:
        sys.modules["torch"].set_num_threads(threads)

    keras.utils.set_random_seed(0)
    model = GPT.from_preset("shakespeare-char", vocab_size=VOCAB)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (steps * BATCH, CONTEXT + 1))
    inputs, targets = tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")
    starts, end = [], []
    clock = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: starts.append(time.perf_counter()))

    def run(n):
        starts.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(inputs[: n * BATCH], targets[: n * BATCH], batch_size=BATCH, epochs=1,
                  verbose=0, shuffle=False, callbacks=[clock])
        end[:] = [time.perf_counter()]
        return time.perf_counter() - wall, time.process_time() - cpu

    first_step, _ = run(1)
    run(steps)  # warm-up
    print(json.dumps({"ready": READY, "first_step": first_step,
                      "jit_compile": bool(model.jit_compile), "backend": keras.backend.backend()}),
          flush=True)
    for _ in sys.stdin:
        wall, cpu = run(steps)
        # From the second step's start to the end of `fit` (JAX dispatches steps asynchronously;
        # `fit` returns once the last one is done).
        step_s = (end[0] - starts[1]) / (steps - 1)
        print(json.dumps({"step_s": step_s, "wall": wall, "cpu": cpu}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    processes, started = {}, {}
    for name, (backend, jit_compile, threads) in CONFIGS.items():
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        processes[name] = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(jit_compile), str(threads or 0),
             str(args.steps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        started[name] = _read(processes[name])  # one at a time: compiles do not overlap
    names = list(CONFIGS)
    rounds = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        load = os.getloadavg()[0]
        results = {}
        for name in order:
            processes[name].stdin.write("go\n")
            processes[name].stdin.flush()
            results[name] = _read(processes[name])
        rounds.append({"load": load, "results": results})
        print(f"round {r + 1}: load {load:.2f}, "
              + ", ".join(f"{n} {BATCH * CONTEXT / results[n]['step_s']:,.0f} tok/s"
                          for n in names), flush=True)
    for process in processes.values():
        process.stdin.close()
        process.wait()
    _report(started, rounds, args)


def _read(process):
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"a benchmark process ended early (exit {process.wait()})")
    return json.loads(line)


def _report(started, rounds, args):
    loads = [r["load"] for r in rounds]
    print(f"\n{args.rounds} rounds x {args.steps} steps, batch {BATCH} x {CONTEXT}; load average "
          f"(1 min) before the rounds: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f}\n")
    print("| backend | jit_compile | first step s | tokens/s (median) | ms/step | CPU s / wall s "
          "| speed / TensorFlow's (median of rounds) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in CONFIGS:
        step = statistics.median(r["results"][name]["step_s"] for r in rounds)
        cpu = sum(r["results"][name]["cpu"] for r in rounds)
        wall = sum(r["results"][name]["wall"] for r in rounds)
        ratio = statistics.median(r["results"]["tensorflow"]["step_s"] / r["results"][name]["step_s"]
                                  for r in rounds)
        jit = {("tensorflow", True): "XLA", ("tensorflow", False): "no (tf.function graph)",
               ("jax", True): "jax.jit (XLA)", ("torch", False): "no (eager)"}[
            started[name]["backend"], started[name]["jit_compile"]]
        print(f"| {name} | {jit} | {started[name]['first_step']:.1f} | "
              f"{BATCH * CONTEXT / step:,.0f} | {1000 * step:.1f} | {cpu / wall:.2f} | "
              f"{ratio:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        child(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
