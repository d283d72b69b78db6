"""TFLite exports of a trained run: file sizes, validation loss of float32/float16/int8 files vs
Keras, and per-token latency of the LiteRT `generate` signature (batch 1, greedy).

Run from the repository root, on a trained run (e.g. `gpt-keras train --run-dir /tmp/tfl_run
--max-steps 500`, the `shakespeare-char` preset on Tiny Shakespeare):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/tflite_quality.py /tmp/tfl_run

Options: `--out-dir DIR` (where the three exports go; default a temporary directory),
`--batches 20`, `--threads N` (interpreter threads; default LiteRT's), `--rounds 15`.

Validation loss: mean cross-entropy (nats/token, float64 log-softmax of each model's float32
logits) over the run's fixed validation batches (`data.validation_dataset` with the run's batch
size and seed: the batches training reports), computed from the `logits` signature and from the
Keras model.
Latency: a 16-token prompt from the validation split; one `generate` call making 1 new token and
one making 48 (both fit the context, so each is one call); per-token latency = (t48 - t1) / 47,
medians over `--rounds` alternating rounds, in wall-clock and process CPU time, next to the
same for in-Python `gpt_keras.generation.generate` (XLA) on the Keras model. Rounds in which
other processes used more than 0.1 CPU-s per second are counted as not quiet.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Import the checkout's gpt_keras (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from gpt_keras import data, generation  # noqa: E402
from gpt_keras.tflite import LOGITS_SIGNATURE, TFLiteGenerator, export_tflite  # noqa: E402
from gpt_keras.training import load_model, read_run_config  # noqa: E402
from other_load import OtherLoad  # noqa: E402

PROMPT_LENGTH = 16
NEW_TOKENS = 48
QUIET_SHARE = 0.1


def cross_entropy(logits, targets):
    """Mean -log softmax(logits)[target] in float64; logits `[B, T, V]`, targets `[B, T]`."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, targets[..., None], -1).mean())


def validation_losses(model, paths, batches, threads):
    """`{name: mean loss}` for Keras and each `.tflite` path over the fixed validation batches."""
    runners = {
        name: Interpreter(model_path=path, num_threads=threads).get_signature_runner(
            LOGITS_SIGNATURE
        )
        for name, path in paths.items()
    }
    losses = {name: [] for name in ["keras", *paths]}
    for inputs, targets in batches:
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        losses["keras"].append(cross_entropy(np.asarray(model(inputs)), targets))
        for name, runner in runners.items():
            losses[name].append(cross_entropy(runner(token_ids=inputs)["logits"], targets))
    return {name: float(np.mean(values)) for name, values in losses.items()}


def tflite_generate(path, threads):
    """`call(prompt, count)` → new ids, through `TFLiteGenerator` (greedy, one interpreter call of
    the `generate` signature)."""
    generator = TFLiteGenerator(path, num_threads=threads)

    def call(prompt, count):
        return [i for chunk in generator.stream_ids(prompt, count, temperature=0) for i in chunk]

    return call


def latencies(engines, prompt, rounds):
    """`{(engine, rounds label, clock): (ms for 1 new token, ms per extra token)}` (medians;
    rounds "all" or "quiet", clock "wall" or "cpu" = this process's CPU time, which other
    processes' load inflates less), and the number of quiet rounds."""
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(name, clock, count): [] for name in engines for clock in clocks
             for count in (1, NEW_TOKENS)}
    quiet = []
    other_load = OtherLoad()
    for index in range(rounds):
        start = time.perf_counter()
        order = list(engines.items())
        for name, call in order if index % 2 == 0 else order[::-1]:
            for count in (1, NEW_TOKENS):
                begin = {clock: read() for clock, read in clocks.items()}
                call(prompt, count)
                for clock, read in clocks.items():
                    times[name, clock, count].append(read() - begin[clock])
        quiet.append(other_load.seconds() < QUIET_SHARE * (time.perf_counter() - start))
    results = {}
    for name in engines:
        for label, keep in [("all", [True] * rounds), ("quiet", quiet)]:
            for clock in clocks:
                first, full = (
                    [t for t, q in zip(times[name, clock, count], keep) if q]
                    for count in (1, NEW_TOKENS)
                )
                if first:
                    results[name, label, clock] = (
                        1000 * statistics.median(first),
                        1000 * (statistics.median(full) - statistics.median(first))
                        / (NEW_TOKENS - 1),
                    )
    return results, sum(quiet)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out-dir", help="where the exports go (default: a temporary directory)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    settings = read_run_config(args.run_dir)["train"]
    model = load_model(args.run_dir)
    context = model.config.context_length
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="tflite-quality-")
    paths = {}
    for quantize in [None, "float16", "int8"]:
        name = quantize or "float32"
        paths[name] = export_tflite(args.run_dir, os.path.join(out_dir, name), quantize=quantize,
                                    force=True)
    token_file = data.TokenFile.load(os.path.join(args.run_dir, "data"))
    batches = data.validation_dataset(token_file, context, settings["batch_size"],
                                      settings["seed"], args.batches)
    losses = validation_losses(model, paths, batches, args.threads)

    print(f"run {args.run_dir}: {model.config}")
    print(f"validation: {args.batches} batches of {settings['batch_size']} x {context} tokens")
    print(f"{'model':9} {'bytes':>11} {'val loss':>9} {'vs keras':>9} {'vs float32':>10}")
    print(f"{'keras':9} {'':>11} {losses['keras']:9.5f}")
    for name, path in paths.items():
        print(f"{name:9} {os.path.getsize(path):11,} {losses[name]:9.5f} "
              f"{losses[name] / losses['keras'] - 1:+9.4%} "
              f"{losses[name] / losses['float32'] - 1:+10.4%}")

    tokens = token_file.tokens()
    prompt = tokens[token_file.num_train : token_file.num_train + PROMPT_LENGTH].tolist()
    engines = {
        name: tflite_generate(path, args.threads) for name, path in paths.items()
    }
    engines["keras (XLA)"] = lambda prompt, count: generation.generate(
        model, prompt, count, temperature=0, cache_length=context
    )
    reference = engines["keras (XLA)"](prompt, NEW_TOKENS)  # compiles
    for name, call in engines.items():
        same = call(prompt, NEW_TOKENS) == reference
        print(f"{name}: greedy {NEW_TOKENS} tokens {'equal' if same else 'differ from'} Keras'")
    results, quiet = latencies(engines, prompt, args.rounds)
    print(f"\nlatency, batch 1, greedy, {PROMPT_LENGTH}-token prompt, threads {args.threads} "
          f"({quiet} of {args.rounds} rounds quiet):")
    for (name, label, clock), (first, per_token) in sorted(results.items()):
        print(f"  {name:12} {label:5} {clock:4} prefill + 1 token {first:7.2f} ms, "
              f"then {per_token:6.3f} ms/token")


if __name__ == "__main__":
    main()
