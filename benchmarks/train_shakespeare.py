"""Quality and speed of a full training run: nanoGPT's CPU "baby" Shakespeare-char settings,
gpt_keras (`gpt_keras.training.train`) vs keras-hub's `GPT2Backbone` + tied head, same data.

Run from the repository root (about 7 minutes on a 2-core CPU):

    python benchmarks/train_shakespeare.py [--steps 2000] [--out /tmp/bench-shakespeare]
        [--position-embedding sinusoidal|learned]

Settings (nanoGPT config/train_shakespeare_char.py, CPU variant): 4 layers, 4 heads, 128 dims,
context 64, batch 12, dropout 0, AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4 at
2000 steps, betas (0.9, 0.99), weight decay 0.1, gradient clipping 1.0. Both models train on the
same batches (gpt_keras' data pipeline: random windows of the first 90% of Tiny Shakespeare,
batch k drawn from seed (1337, k)) and are scored on the same 50 fixed validation batches from
the last 10%. Each model runs in its own process, so peak RSS is its own. Tokens/s is the median
over 250-step intervals, excluding the first (compilation).
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SETTINGS = dict(batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                weight_decay=0.1, beta_1=0.9, beta_2=0.99, clip_norm=1.0, eval_batches=50,
                checkpoint_every=250, sample_every=0, seed=1337)


def run_gpt_keras(out, steps, position_embedding):
    from gpt_keras import GPTConfig
    from gpt_keras.training import TrainConfig, train

    config = TrainConfig(max_steps=steps, eval_every=steps, **SETTINGS)
    train(os.path.join(out, "gpt_keras"), [str(SHAKESPEARE)],
          GPTConfig.from_preset("shakespeare-char", position_embedding=position_embedding),
          config, verbose=False)
    import csv

    with open(os.path.join(out, "gpt_keras", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    speeds = sorted(float(r["tokens_per_second"]) for r in rows[1:]) or [0.0]
    return {"val_loss": float(rows[-1]["val_loss"]), "tokens_per_second": speeds[len(speeds) // 2]}


def run_keras_hub(out, steps, position_embedding):
    import keras
    import keras_hub
    import numpy as np

    from gpt_keras import data
    from gpt_keras.training import TrainConfig, learning_rate_schedule

    token_file = data.TokenFile.load(os.path.join(out, "gpt_keras", "data"))
    vocab = json.load(open(os.path.join(out, "gpt_keras", "run.json")))["model"]["vocab_size"]
    config = TrainConfig(max_steps=steps, eval_every=steps, **SETTINGS)
    keras.utils.set_random_seed(config.seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab, num_layers=4, num_heads=4, hidden_dim=128, intermediate_dim=512,
        dropout=0.0, max_sequence_length=64,
    )
    token_ids = keras.Input((None,), dtype="int32")
    hidden = backbone({"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids)})
    model = keras.Model(token_ids, backbone.token_embedding(hidden, reverse=True))
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(config), weight_decay=config.weight_decay,
        beta_1=config.beta_1, beta_2=config.beta_2, global_clipnorm=config.clip_norm,
    )
    optimizer.exclude_from_weight_decay(var_list=[
        v for v in model.trainable_variables if len(v.shape) < 2 or "embedding" in v.path
    ])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class IntervalTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.marks = []

        def on_epoch_end(self, epoch, logs=None):
            self.marks.append(time.perf_counter())

    timer = IntervalTimer()
    start = time.perf_counter()
    model.fit(
        data.training_dataset(token_file, 64, config.batch_size, config.seed, 0, steps),
        epochs=steps // 250, steps_per_epoch=250, callbacks=[timer], verbose=0, shuffle=False,
    )
    marks = [start] + timer.marks
    speeds = sorted(250 * 12 * 64 / (b - a) for a, b in zip(marks[1:], marks[2:])) or [0.0]
    val_loss = model.evaluate(
        data.validation_dataset(token_file, 64, config.batch_size, config.seed, 50), verbose=0
    )
    return {"val_loss": float(val_loss), "tokens_per_second": speeds[len(speeds) // 2]}


def child(name, out, steps, position_embedding):
    runner = {"gpt_keras": run_gpt_keras, "keras_hub": run_keras_hub}[name]
    result = runner(out, steps, position_embedding)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/bench-shakespeare")
    parser.add_argument("--position-embedding", choices=["sinusoidal", "learned"],
                        default="sinusoidal", help="gpt_keras' positions (keras-hub: learned)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.out, args.steps, args.position_embedding)
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; pass a new --out.")
    results = {}
    for name in ("gpt_keras", "keras_hub"):  # keras_hub reuses gpt_keras' token file
        began = time.perf_counter()
        output = subprocess.run(
            [sys.executable, __file__, "--child", name, "--out", args.out, "--steps",
             str(args.steps), "--position-embedding", args.position_embedding],
            check=True, capture_output=True, text=True,
        ).stdout
        results[name] = json.loads(output.split("RESULT ", 1)[1])
        results[name]["wall_seconds"] = time.perf_counter() - began
    print(f"| model | val loss @ {args.steps} | val bits/char | tokens/s | peak RSS MiB | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['val_loss']:.4f} | {r['val_loss'] / math.log(2):.4f} | "
              f"{r['tokens_per_second']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['wall_seconds']:.0f} |")
    ratio = results["gpt_keras"]["tokens_per_second"] / results["keras_hub"]["tokens_per_second"]
    print(f"\nspeed ratio gpt_keras / keras-hub: {ratio:.2f}x")


if __name__ == "__main__":
    main()
