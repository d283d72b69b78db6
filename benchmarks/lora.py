"""LoRA vs full fine-tuning on the GPT-2 small shape: trainable parameters, training-step time and
peak memory.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/lora.py

Options: `--rounds 2 --steps 8` (rounds; timed steps per process), `--batch-size 2 --context 128`,
`--rank 8`, `--configs full,attention,attention+mlp` (which to measure: full fine-tuning, LoRA on
the attention projections, LoRA on attention and MLP). The default run takes about 10 minutes on
a quiet 2-core CPU.

The model is `GPTConfig.from_preset("gpt2-small")` (124M parameters, dropout 0.1) with random
weights (nothing is downloaded), trained as `gpt-keras train` trains it: `TrainingGPT`, AdamW with
the run's decay groups (`training.build_optimizer`, default `TrainConfig`), XLA on, on random
tokens. LoRA: `lora.enable(model,
rank, targets=...)` after the weights are in place, as `training._fit` does.

Method: every configuration runs in its own process (`--worker CONFIG`), so that its peak memory
is its own; the processes of a round run one after another, the order flipping every round, and
the load average (1 minute) is recorded before each. In a process: one step to trace and compile
(reported as "first step"), two warm-up steps, then `--steps` timed `train_on_batch` calls
(each returns the loss as a number, so the step has finished); the median wall time is reported,
and the median CPU time (all threads, `time.process_time`), which other processes on a shared
machine disturb less: it is the work a step costs. Peak
memory is the process's peak resident set (`ru_maxrss`), which includes TensorFlow's own
footprint and the XLA compilation; "RSS after" is the resident set after the last step.

To measure the loss reached on real data, replace `random_batches` with batches of a tokenized
corpus (e.g. `data.training_dataset(token_file, context, batch_size, seed)`) and report the mean
loss of the last steps.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Import the checkout's gpt_keras (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {"full": None, "attention": "attention", "attention+mlp": "attention,mlp"}


def random_batches(vocab_size, batch_size, context, seed=0):
    """Endless `(inputs, targets)` int32 `[B, T]` batches of random tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        tokens = rng.integers(0, vocab_size, (batch_size, context + 1), dtype=np.int32)
        yield tokens[:, :-1], tokens[:, 1:]


def resident_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args):
    """Measures one configuration in this process; prints one JSON line."""
    import dataclasses

    import keras

    from gpt_keras import GPTConfig, lora
    from gpt_keras.distribute import TrainingGPT
    from gpt_keras.training import TrainConfig, build_optimizer

    keras.utils.set_random_seed(0)
    config = GPTConfig.from_preset("gpt2-small")
    model = TrainingGPT(**dataclasses.asdict(config))
    model.build()
    targets = CONFIGS[args.worker]
    if targets:
        lora.enable(model, args.rank, targets=targets)
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    model.compile(optimizer=build_optimizer(model, TrainConfig()), jit_compile=True)
    batches = random_batches(config.vocab_size, args.batch_size, args.context)
    started = time.perf_counter()
    model.train_on_batch(*next(batches))
    first = time.perf_counter() - started
    for _ in range(2):
        model.train_on_batch(*next(batches))
    times, cpu_times = [], []
    for _ in range(args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        model.train_on_batch(*next(batches))
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    print(json.dumps({
        "config": args.worker, "trainable": trainable,
        "optimizer_scalars": sum(int(keras.ops.size(v)) for v in model.optimizer.variables),
        "first_step_s": first, "step_s": statistics.median(times),
        "cpu_step_s": statistics.median(cpu_times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_mib": resident_mib(),
    }), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = args.configs.split(",")
    results = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for name in configs if round_index % 2 == 0 else configs[::-1]:
            load = os.getloadavg()[0]
            command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--context", str(args.context),
                       "--rank", str(args.rank)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            result["load"] = load
            results[name].append(result)
            print(f"round {round_index + 1} {name}: step {result['step_s']:.3f} s, peak RSS "
                  f"{result['peak_rss_mib']:,.0f} MiB, load {load:.2f}", flush=True)
    tokens = args.batch_size * args.context
    full = results.get("full")
    print(f"\nGPT-2 small shape, batch {args.batch_size} x {args.context} tokens, rank "
          f"{args.rank}, XLA; medians over {args.rounds} processes each")
    print("| fine-tuning | trainable parameters | optimizer state (scalars) | step (s) | "
          "tokens/s | CPU s/step | first step (s) | peak RSS (MiB) | RSS after (MiB) | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, rows in results.items():
        step = statistics.median(r["step_s"] for r in rows)
        cpu = statistics.median(r["cpu_step_s"] for r in rows)
        label = "full" if name == "full" else f"LoRA r={args.rank}, {name}"
        speed = f" ({statistics.median(f['step_s'] for f in full) / step:.2f}x)" if (
            full and name != "full") else ""
        loads = ", ".join(f"{r['load']:.1f}" for r in rows)
        print(f"| {label} | {rows[0]['trainable']:,} | {rows[0]['optimizer_scalars']:,} | "
              f"{step:.3f}{speed} | {tokens / step:,.0f} | {cpu:.2f} | "
              f"{statistics.median(r['first_step_s'] for r in rows):.1f} | "
              f"{statistics.median(r['peak_rss_mib'] for r in rows):,.0f} | "
              f"{statistics.median(r['rss_after_mib'] for r in rows):,.0f} | "
              f"{loads} |")


if __name__ == "__main__":
    main()
