"""Training-step throughput: gpt_keras `shakespeare-char` vs keras-hub `GPT2Backbone`.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/train_step.py

Options: `--rounds 5 --steps 60` (timed rounds, steps per round per model), `--jit-compile
auto,true` (the `jit_compile` values to measure, each for both models), `--batch-size 12`,
`--position-embedding rotary|learned|sinusoidal` (gpt_keras' positions; default the preset's). The
default run takes about 1.5 minutes on an idle 2-core CPU. On a shared machine, use more, shorter
rounds (`--rounds 40 --steps 30`, as for BENCHMARKS.md) so that enough of them are quiet.

Both models have the same shape (nanoGPT's CPU "baby" config: 4 layers, 4 heads, 128 dims, context
64, vocab 65, MLP 512, dropout 0, tied input/output embeddings) and are trained the same way:
`compile(AdamW(1e-3), SparseCategoricalCrossentropy(from_logits=True), jit_compile=...)` + `fit`
on a repeated `tf.data` dataset of random tokens, batch 12 x 64. The differences that remain are
the models' own: gpt_keras' preset uses rotary positions (queries and keys rotated in every
attention layer; keras-hub adds a learned 64 x 128 table, so it has 8,192 more parameters), a
fused query/key/value projection, and its own attention core.

Note: Keras 3.15's `jit_compile="auto"` (the default) resolves to **False** on a machine without a
GPU (`Trainer._resolve_auto_jit_compile`: "Disable XLA on CPU-only machines"), so the default is
no XLA here; `jit_compile=True` is measured beside it.

Method: each model first runs a one-step `fit` (trace, plus the XLA compile when jit_compile is
on: reported as "first step") and a short warm-up `fit`. Then all models alternate in one process,
round by round (the order flips every round), each round one `fit(steps_per_epoch=--steps)` call
per model. A callback timestamps `on_train_batch_begin`; step durations are start-to-start, from
the second step of each `fit` call to the last, so the first step (iterator start-up) and the
end-of-fit bookkeeping are excluded, and nothing is traced in the timed span (checked: the train
functions' tracing counts do not change). The callback defines no `on_train_batch_end`, so Keras'
asynchronous batch-end dispatch stays on. A round is "quiet" when other processes used less than
0.1 CPU-second per second of it (from `/proc/stat`; the load average is no guide, it counts this
process's own threads).

Reported per model: tokens/s at the median step time over the quiet rounds (the headline figure),
at the fastest-decile step time over all rounds, and at the median over all rounds; and speed
ratios gpt_keras / keras-hub (and XLA / no XLA), as the median of per-round ratios over quiet
rounds and over all rounds. Per-round ratios are the robust number: both models of a round see
the same machine.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Import the checkout's gpt_keras (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gpt_keras  # noqa: E402

VOCAB_SIZE = 65
CONTEXT = 64


class StepTimer(keras.callbacks.Callback):
    """Records `time.perf_counter()` at the start of every training step."""

    def __init__(self):
        super().__init__()
        self.begins = []

    def on_train_batch_begin(self, batch, logs=None):
        self.begins.append(time.perf_counter())


def build_gpt_keras(position_embedding=None):
    """The model under test: gpt_keras' `shakespeare-char` preset (`position_embedding`
    overrides its positions)."""
    overrides = {"position_embedding": position_embedding} if position_embedding else {}
    model = gpt_keras.GPT.from_preset("shakespeare-char", **overrides)
    model.build((None, CONTEXT))
    return model


def build_keras_hub():
    """keras-hub's GPT-2 backbone of the same shape with a tied output head."""
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB_SIZE,
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=512,
        max_sequence_length=CONTEXT,
        dropout=0.0,
    )
    token_ids = keras.Input((CONTEXT,), dtype="int32", name="token_ids")
    hidden = backbone({"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids)})
    logits = backbone.token_embedding(hidden, reverse=True)  # hidden @ embeddings^T: tied head
    return keras.Model(token_ids, logits, name="keras_hub_gpt2")


def compile_model(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )


def make_dataset(batch_size, context=CONTEXT, vocab_size=VOCAB_SIZE, seed=0):
    """64 batches of random next-token data `[batch_size, context]`, int32, repeated forever."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(64 * batch_size, context + 1), dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((tokens[:, :-1], tokens[:, 1:]))
    return dataset.batch(batch_size, drop_remainder=True).cache().repeat().prefetch(2)


def timed_fit(model, dataset, steps):
    """One `fit` call of `steps` steps; returns the durations of steps 2 .. steps-1 in seconds
    (start to start, so each includes Keras' per-step loop overhead; the first step, which
    includes the iterator's start-up, and the end-of-fit bookkeeping are left out)."""
    timer = StepTimer()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return list(np.diff(timer.begins[1:]))


class OtherLoad:
    """CPU seconds used by other processes since the last call (Linux): all CPUs' busy time from
    `/proc/stat` minus this process's own CPU time. Near 0 means nobody else competed; the load
    average is no guide, as it counts this process's own threads."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK") - (own.user + own.system)

    def seconds(self):
        now = self._read()
        if now is None or self._last is None:
            return float("nan")
        other, self._last = max(now - self._last, 0.0), now
        return other


def traces(model):
    """Total tracing count of the `tf.function`s behind `model.train_function` (Keras builds it
    as a Python closure over them), so a re-trace during the timed rounds can be detected."""
    closure = getattr(model.train_function, "__closure__", None) or ()
    functions = [cell.cell_contents for cell in closure
                 if hasattr(cell.cell_contents, "experimental_get_tracing_count")]
    return sum(f.experimental_get_tracing_count() for f in functions) if functions else None


def parse_jit_modes(text):
    modes = []
    for item in text.split(","):
        value = {"auto": "auto", "true": True, "false": False}.get(item.strip().lower())
        if value is None:
            raise argparse.ArgumentTypeError(
                f"--jit-compile takes a comma-separated list of auto/true/false. Received: {text!r}"
            )
        modes.append(value)
    return modes


def warm_up_runtime():
    """Runs one small jit-compiled and one plain function, so that TensorFlow's and XLA's one-time
    start-up is not charged to the first model's first step."""
    x = tf.ones((8, 8))
    for jit in (True, False):
        tf.function(tf.autograph.experimental.do_not_convert(lambda a: a @ a), jit_compile=jit)(x)


def run_rounds(models, dataset, steps, rounds, quiet_share=0.1):
    """Alternates one `timed_fit` per model per round, the order flipping every round. A round is
    quiet when other processes used less than `quiet_share` CPU-seconds per second of it.
    Returns a list of rounds, each `(quiet, {key: [step seconds]})`."""
    results = []
    order = list(models)
    other_load = OtherLoad()
    for index in range(rounds):
        start = time.perf_counter()
        durations = {}
        for key in order:
            durations[key] = timed_fit(models[key], dataset, steps)
        order.reverse()
        other, wall = other_load.seconds(), time.perf_counter() - start
        quiet = other < quiet_share * wall
        results.append((quiet, durations))
        print(f"round {index + 1}: median ms/step " + ", ".join(
            f"{1000 * statistics.median(durations[key]):.1f}" for key in models
        ) + f"; other processes used {other:.1f} CPU-s in {wall:.1f} s"
          + (" (quiet)" if quiet else ""), flush=True)
    return results


def summarize(results, keys, tokens_per_step):
    """Per model: tokens/s at the 10th-percentile step time over all rounds (`fast`), at the
    median step time over the quiet rounds (`quiet`, None without quiet rounds) and over all rounds
    (`all`)."""
    summary = {}
    for key in keys:
        every = np.concatenate([durations[key] for _, durations in results])
        quiet = [durations[key] for is_quiet, durations in results if is_quiet]
        summary[key] = {
            "fast": tokens_per_step / np.percentile(every, 10),
            "quiet": tokens_per_step / np.median(np.concatenate(quiet)) if quiet else None,
            "all": tokens_per_step / np.median(every),
        }
    return summary


def round_ratios(results, key_a, key_b):
    """Per round: median step time of `key_b` / median step time of `key_a` (= speed a / b)."""
    return [statistics.median(d[key_b]) / statistics.median(d[key_a]) for _, d in results]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (5)")
    parser.add_argument("--steps", type=int, default=60, help="steps per round per model (60)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps after compile (10)")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--position-embedding", choices=["rotary", "learned", "sinusoidal"],
                        help="gpt_keras' positions (default: the shakespeare-char preset's)")
    parser.add_argument(
        "--jit-compile",
        type=parse_jit_modes,
        default=["auto", True],
        help="comma-separated jit_compile values to measure, each for both models "
        "(default auto,true)",
    )
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps must be at least 3. Received: --steps={args.steps}")
    tokens_per_step = args.batch_size * CONTEXT

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, keras-hub "
          f"{keras_hub.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs")
    print(f"batch {args.batch_size} x {CONTEXT} = {tokens_per_step} tokens/step, "
          f"{args.rounds} rounds x {args.steps} steps per model\n")
    warm_up_runtime()
    keras.utils.set_random_seed(0)
    dataset = make_dataset(args.batch_size)

    # One entry per (model, jit mode), keys like "gpt_keras jit=auto".
    models, first_step = {}, {}
    other_load = OtherLoad()
    for jit in args.jit_compile:
        builders = (("gpt_keras", lambda: build_gpt_keras(args.position_embedding)),
                    ("keras-hub", build_keras_hub))
        for name, build in builders:
            key = f"{name} jit={str(jit).lower()}"
            model = build()
            compile_model(model, jit)
            start = time.perf_counter()
            model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
            first_step[key] = time.perf_counter() - start
            model.fit(dataset, epochs=1, steps_per_epoch=args.warmup_steps, verbose=0)
            models[key] = model
            print(f"{key:20s} params {model.count_params():,}  jit_compile resolved to "
                  f"{model.jit_compile}  first step {first_step[key]:.1f} s", flush=True)
    print(f"(other processes used {other_load.seconds():.1f} CPU-s while compiling)\n")
    trace_counts = {key: traces(model) for key, model in models.items()}

    results = run_rounds(models, dataset, args.steps, args.rounds)
    quiet_rounds = sum(quiet for quiet, _ in results)
    for key, model in models.items():
        if traces(model) != trace_counts[key]:
            print(f"WARNING: {key}'s train function was re-traced during the timed rounds")

    summary = summarize(results, models, tokens_per_step)
    print(f"\n{quiet_rounds} of {len(results)} rounds quiet. tokens/s at: the fastest-decile step "
          "time (all rounds) | the median step time (quiet rounds) | the median (all rounds)")
    print(f"{'model':20s} {'resolved':>8s} {'params':>9s} {'first step s':>12s} "
          f"{'fast':>8s} {'quiet':>8s} {'all':>8s}")
    for key, model in models.items():
        figures = summary[key]
        quiet = f"{figures['quiet']:8,.0f}" if figures["quiet"] else f"{'-':>8s}"
        print(f"{key:20s} {str(model.jit_compile):>8s} {model.count_params():9,d} "
              f"{first_step[key]:12.1f} {figures['fast']:8,.0f} {quiet} {figures['all']:8,.0f}")

    def compare(label, key_a, key_b):
        ratios = round_ratios(results, key_a, key_b)
        fast = summary[key_a]["fast"] / summary[key_b]["fast"]
        quiet = [r for r, (q, _) in zip(ratios, results) if q]
        print(f"{label}: {fast:.3f} fastest-decile, "
              + (f"{statistics.median(quiet):.3f} quiet rounds, " if quiet else "")
              + f"{statistics.median(ratios):.3f} median of per-round ratios "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")

    print()
    for jit in args.jit_compile:
        mode = str(jit).lower()
        compare(f"speed gpt_keras / keras-hub, jit_compile={mode}",
                f"gpt_keras jit={mode}", f"keras-hub jit={mode}")
    base = str(args.jit_compile[0]).lower()
    for jit in args.jit_compile[1:]:
        mode = str(jit).lower()
        for name in ("gpt_keras", "keras-hub"):
            compare(f"speed {name} jit_compile={mode} / {base}",
                    f"{name} jit={mode}", f"{name} jit={base}")


if __name__ == "__main__":
    main()
