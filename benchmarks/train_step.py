"""Training-step throughput: gpt_keras `shakespeare-char` vs keras-hub `GPT2Backbone`.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/train_step.py

Options: `--rounds 5 --steps 40` (timed rounds, steps per round per model), `--batch-size 12`,
`--no-xla` (`jit_compile=False` instead of Keras' default "auto", which is XLA on TensorFlow).
The default run takes about 2 minutes on a 2-core CPU; see BENCHMARKS.md for results.

Both models have the same shape (nanoGPT's CPU "baby" config: 4 layers, 4 heads, 128 dims, context
64, vocab 65, MLP 512, dropout 0, tied input/output embeddings) and are trained the same way:
`compile(AdamW(1e-3), SparseCategoricalCrossentropy(from_logits=True))` + `fit` on a repeated
`tf.data` dataset of random tokens, batch 12 x 64. The differences that remain are the models'
own: gpt_keras uses fixed sinusoidal positions (keras-hub learns a 64 x 128 table, so it has 8,192
more parameters), a fused query/key/value projection, and its own attention core.

Method: each model first runs one `fit` step (trace + XLA compile, reported as "first step") and a
short warm-up `fit`. Then, in one process, the models alternate for `--rounds` rounds (the order
flips every round), each round one `fit(steps_per_epoch=--steps)` call per model. A callback
timestamps `on_train_batch_begin`; a round's time is the span from the start of its second step to
the start of its last, so the first step of each `fit` call (iterator start-up) and the end-of-fit
bookkeeping are excluded, and nothing is traced in the timed span (checked: the train function is
traced once). The callback defines no `on_train_batch_end`, so Keras' default (asynchronous) batch-end
dispatch is unchanged. Reported: median tokens/s over rounds per model, and the median over rounds
of the per-round ratio gpt_keras / keras-hub (robust to load from other processes, which hits both
models of a round alike).
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


def build_gpt_keras():
    """The model under test: gpt_keras' `shakespeare-char` preset."""
    model = gpt_keras.GPT.from_preset("shakespeare-char")
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
    """One `fit` call of `steps` steps; returns (seconds from step 2's start to step `steps`'s
    start, i.e. `steps - 2` whole steps; the epoch's mean loss)."""
    timer = StepTimer()
    history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return timer.begins[-1] - timer.begins[1], history.history["loss"][-1]


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


def run_rounds(models, dataset, steps, tokens_per_step, rounds, max_rounds, quiet_share=0.1):
    """Alternates one `timed_fit` per model per round (the order flips every round) until
    `rounds` quiet rounds are collected or `max_rounds` have run. A round is quiet when other
    processes used less than `quiet_share` CPU-seconds per second of it. Returns
    `{key: [tokens/s per kept round]}` (the quiet rounds, or all rounds if none was quiet) and
    the number of quiet rounds."""
    all_rates, quiet = [], []
    order = list(models)
    other_load = OtherLoad()
    while len(quiet) < rounds and len(all_rates) < max_rounds:
        start = time.perf_counter()
        rates = {}
        for key in order:
            seconds, _ = timed_fit(models[key], dataset, steps)
            rates[key] = (steps - 2) * tokens_per_step / seconds
        order.reverse()
        other, wall = other_load.seconds(), time.perf_counter() - start
        is_quiet = other < quiet_share * wall
        all_rates.append(rates)
        if is_quiet:
            quiet.append(rates)
        print(f"round {len(all_rates)}: " + ", ".join(f"{rates[key]:,.0f}" for key in models)
              + f" tokens/s; other processes used {other:.1f} CPU-s in {wall:.1f} s: "
              + ("quiet" if is_quiet else "busy, not counted"), flush=True)
    kept = quiet or all_rates
    if len(quiet) < rounds:
        print(f"WARNING: only {len(quiet)} quiet rounds of {len(all_rates)}; "
              + ("using those" if quiet else "using all rounds") + ". Re-run on an idle machine.")
    return {key: [r[key] for r in kept] for key in models}, len(quiet)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="quiet rounds to collect (5)")
    parser.add_argument("--max-rounds", type=int, default=None,
                        help="give up waiting for quiet rounds after this many (3 x --rounds)")
    parser.add_argument("--steps", type=int, default=100, help="steps per round per model (100)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps after compile (10)")
    parser.add_argument("--batch-size", type=int, default=12)
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
        for name, build in (("gpt_keras", build_gpt_keras), ("keras-hub", build_keras_hub)):
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

    rates, _ = run_rounds(models, dataset, args.steps, tokens_per_step, args.rounds,
                          args.max_rounds or 3 * args.rounds)

    for key, model in models.items():
        if traces(model) != trace_counts[key]:
            print(f"WARNING: {key}'s train function was re-traced during the timed rounds")

    print(f"\n{'model':20s} {'resolved':>8s} {'params':>9s} {'first step s':>12s} "
          f"{'tokens/s median':>15s} {'min':>7s} {'max':>7s} {'ms/step':>8s}")
    for key, model in models.items():
        median = statistics.median(rates[key])
        print(f"{key:20s} {str(model.jit_compile):>8s} {model.count_params():9,d} "
              f"{first_step[key]:12.1f} {median:15,.0f} {min(rates[key]):7,.0f} "
              f"{max(rates[key]):7,.0f} {1000 * tokens_per_step / median:8.1f}")
    for jit in args.jit_compile:
        mode = str(jit).lower()
        ratios = [a / b for a, b in zip(rates[f"gpt_keras jit={mode}"],
                                        rates[f"keras-hub jit={mode}"])]
        print(f"ratio gpt_keras / keras-hub, jit_compile={mode} (median of per-round ratios): "
              f"{statistics.median(ratios):.3f}  (range {min(ratios):.3f}-{max(ratios):.3f})")
    if len(args.jit_compile) > 1:
        base = str(args.jit_compile[0]).lower()
        for jit in args.jit_compile[1:]:
            mode = str(jit).lower()
            for name in ("gpt_keras", "keras-hub"):
                speedup = statistics.median(
                    a / b for a, b in zip(rates[f"{name} jit={mode}"], rates[f"{name} jit={base}"])
                )
                print(f"{name} jit_compile={mode} vs {base}: {speedup:.3f}x")


if __name__ == "__main__":
    main()
