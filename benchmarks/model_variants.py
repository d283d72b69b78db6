"""Training-step throughput of candidate changes to gpt_keras, without editing gpt_keras.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/model_variants.py

Options: `--rounds 5 --steps 60 --jit-compile auto,true` (as in `train_step.py`),
`--preset shakespeare-char`, `--context-length` (overrides the preset's), `--batch-size 12`,
`--variants` (a comma-separated subset). The
default run takes about 2.5 minutes on an idle 2-core CPU (8 models: 4 variants x 2 jit modes).

Trains `GPT.from_preset(--preset)` like `benchmarks/train_step.py` (AdamW, `fit`, random tokens),
in these variants, alternated round by round in one process:

- `baseline`: gpt_keras as it is.
- `head=matmul`: the tied output head as `ops.matmul(x, ops.transpose(E))` instead of
  `ops.einsum("btd,vd->btv", x, E)` (model.py). Done by giving `gpt_keras.model` an `ops` whose
  `einsum` rewrites that one subscript while the model is traced.
- `attn=dpa`: each block's attention core as `ops.dot_product_attention(is_causal=True)` (the class
  of the attention layers is swapped for `DotProductAttentionMHA` from `attention.py`).
- `head=matmul+attn=dpa`: both.

Reports, as `train_step.py` does, tokens/s at each variant's fastest-decile step time and its
speed relative to `baseline` (same jit_compile), both from those and as the median of per-round
ratios.
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
    timed_fit,
    traces,
    warm_up_runtime,
)

VARIANTS = ["baseline", "head=matmul", "attn=dpa", "head=matmul+attn=dpa"]


class MatmulHeadOps:
    """`keras.ops`, except that the tied head's einsum becomes `matmul(x, transpose(E))` while
    `enabled` is true (it is read at trace time only)."""

    enabled = False

    def __getattr__(self, name):
        return getattr(keras_ops, name)

    def einsum(self, subscripts, *operands):
        if self.enabled and subscripts == "btd,vd->btv":
            x, embeddings = operands
            return keras_ops.matmul(x, keras_ops.transpose(embeddings))
        return keras_ops.einsum(subscripts, *operands)


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

    patched_ops = MatmulHeadOps()
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
            patched_ops.enabled = "head=matmul" in variant
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
    print(f"\n{quiet_rounds} of {len(results)} rounds quiet. Speed vs baseline (same jit_compile):"
          " fastest-decile step times; median of per-round ratios")
    print(f"{'jit_compile':11s} {'variant':22s} {'first step s':>12s} {'tokens/s fast':>13s} "
          f"{'vs baseline':>11s} {'per-round':>9s}")
    for key in models:
        baseline = (key[0], variants[0])
        fast = summary[key]["fast"] / summary[baseline]["fast"]
        per_round = statistics.median(round_ratios(results, key, baseline))
        print(f"{key[0]:11s} {key[1]:22s} {first_step[key]:12.1f} {summary[key]['fast']:13,.0f} "
              f"{fast:11.3f} {per_round:9.3f}")


if __name__ == "__main__":
    main()
