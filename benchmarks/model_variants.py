"""Training-step throughput of candidate changes to gpt_keras, without editing gpt_keras.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/model_variants.py

Options: `--rounds 5 --steps 60 --jit-compile auto,true` (as in `train_step.py`),
`--preset shakespeare-char`, `--context-length` (overrides the preset's), `--batch-size 12`,
`--variants` (a comma-separated subset). The default run takes about 2 minutes on an idle 2-core
CPU (6 models: 3 variants x 2 jit modes).

Trains `GPT.from_preset(--preset)` like `benchmarks/train_step.py` (AdamW, `fit`, random tokens),
in these variants, alternated round by round in one process:

- `baseline`: gpt_keras as it is (tied head `ops.matmul(x, ops.transpose(E))`).
- `head=einsum`: the tied head as `ops.einsum("btd,vd->btv", x, E)`, as before commit dcafeed.
  Done by giving `gpt_keras.model` an `ops` that rewrites that one matmul while the model is traced.
- `attn=dpa`: each block's attention core as `ops.dot_product_attention(is_causal=True)` (the class
  of the attention layers is swapped for `DotProductAttentionMHA` from `attention.py`).

Reports, as `train_step.py` does, tokens/s at the median step time over quiet rounds and at the
fastest-decile step time, and the speed relative to `baseline` (same jit_compile) as the median
of per-round ratios over quiet rounds (the robust figure) and over all rounds, and as the ratio of
fastest-decile step times.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
from keras import ops as keras_ops  # noqa: E402

import gpt_keras  # noqa: E402
import gpt_keras.model  # noqa: E402
from attention import DotProductAttentionMHA  # noqa: E402
from train_step import (  # noqa: E402
    compile_model,
    make_dataset,
    parse_jit_modes,
    round_ratios,
    run_rounds,
    summarize,
    traces,
    warm_up_runtime,
)

VARIANTS = ["baseline", "head=einsum", "attn=dpa"]


class _Transposed:
    """`ops.transpose(E)` as seen by `EinsumHeadOps`: the untransposed matrix, tagged."""

    def __init__(self, value):
        self.value = value


class EinsumHeadOps:
    """`keras.ops` for `gpt_keras.model`, except that while `enabled` (read at trace time only) the
    tied head `ops.matmul(x, ops.transpose(E))` runs as `ops.einsum("btd,vd->btv", x, E)`, the
    model's code before the change to matmul."""

    enabled = False

    def __getattr__(self, name):
        return getattr(keras_ops, name)

    def transpose(self, x, *args, **kwargs):
        if self.enabled and not args and not kwargs and len(x.shape) == 2:
            return _Transposed(x)
        return keras_ops.transpose(x, *args, **kwargs)

    def matmul(self, x, y):
        if isinstance(y, _Transposed):
            return keras_ops.einsum("btd,vd->btv", x, y.value)
        return keras_ops.matmul(x, y)


def build(preset, variant, context):
    model = gpt_keras.GPT.from_preset(preset, context_length=context)
    model.build((None, context))
    if "attn=dpa" in variant:
        for block in model.blocks:
            block.attention.__class__ = DotProductAttentionMHA
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--preset", default="shakespeare-char")
    parser.add_argument("--context-length", type=int, default=None,
                        help="override the preset's context length (and the sequence length)")
    parser.add_argument("--jit-compile", type=parse_jit_modes, default=["auto", True])
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {VARIANTS}")
    args = parser.parse_args()
    overrides = {"context_length": args.context_length} if args.context_length else {}
    config = gpt_keras.GPTConfig.from_preset(args.preset, **overrides)
    context, vocab = config.context_length, config.vocab_size
    tokens_per_step = args.batch_size * context
    variants = args.variants.split(",")

    patched_ops = EinsumHeadOps()
    gpt_keras.model.ops = patched_ops
    warm_up_runtime()
    keras.utils.set_random_seed(0)
    dataset = make_dataset(args.batch_size, context=context, vocab_size=vocab)
    print(f"preset {args.preset}, batch {args.batch_size} x {context}")

    models, first_step = {}, {}
    for jit in args.jit_compile:
        for variant in variants:
            key = (str(jit).lower(), variant)
            model = build(args.preset, variant, context)
            compile_model(model, jit)
            patched_ops.enabled = "head=einsum" in variant
            start = time.perf_counter()
            model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
            first_step[key] = time.perf_counter() - start
            patched_ops.enabled = False
            model.fit(dataset, epochs=1, steps_per_epoch=args.warmup_steps, verbose=0)
            models[key] = model
            print(f"jit={key[0]:5s} {variant:22s} first step {first_step[key]:.1f} s", flush=True)
    trace_counts = {key: traces(model) for key, model in models.items()}

    results = run_rounds(models, dataset, args.steps, args.rounds)
    for key, model in models.items():
        if traces(model) != trace_counts[key]:
            print(f"WARNING: {key} was re-traced during the timed rounds")

    summary = summarize(results, models, tokens_per_step)
    quiet_rounds = sum(quiet for quiet, _ in results)
    print(f"\n{quiet_rounds} of {len(results)} rounds quiet. tokens/s at the median step time over"
          " quiet rounds and at the fastest-decile step time; speed vs baseline (same jit_compile):"
          " median of per-round ratios over quiet rounds and over all rounds, ratio of"
          " fastest-decile step times")
    print(f"{'jit_compile':11s} {'variant':22s} {'first step s':>12s} {'tok/s quiet':>11s} "
          f"{'tok/s fast':>10s} {'vs baseline: quiet':>18s} {'all':>6s} {'fast':>6s}")
    for key in models:
        baseline = (key[0], variants[0])
        ratios = round_ratios(results, key, baseline)
        quiet = [r for r, (q, _) in zip(ratios, results) if q]
        quiet_ratio = f"{statistics.median(quiet):18.3f}" if quiet else f"{'-':>18s}"
        quiet_rate = f"{summary[key]['quiet']:11,.0f}" if summary[key]["quiet"] else f"{'-':>11s}"
        print(f"{key[0]:11s} {key[1]:22s} {first_step[key]:12.1f} {quiet_rate} "
              f"{summary[key]['fast']:10,.0f} {quiet_ratio} {statistics.median(ratios):6.3f} "
              f"{summary[key]['fast'] / summary[baseline]['fast']:6.3f}")


if __name__ == "__main__":
    main()
