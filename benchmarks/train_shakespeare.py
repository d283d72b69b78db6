"""Quality and speed of a full training run: nanoGPT's CPU "baby" Shakespeare-char settings,
gpt_keras (`gpt_keras.training.train`) vs keras-hub's `GPT2Backbone` + tied head (and, with
`--nanogpt`, nanoGPT's `model.py`), same data.

Run from the repository root (about 5 minutes per seed on an idle 2-core CPU, 6.5 with nanoGPT):

    python benchmarks/train_shakespeare.py [--seeds 1337,1,2] [--steps 2000]
        [--out /tmp/bench-shakespeare] [--position-embedding rotary|learned|sinusoidal]
        [--nanogpt PATH/TO/nanoGPT]

Settings (nanoGPT config/train_shakespeare_char.py, CPU variant): 4 layers, 4 heads, 128 dims,
context 64, batch 12, dropout 0, AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4 at
2000 steps, betas (0.9, 0.99), weight decay 0.1, gradient clipping 1.0. gpt_keras runs its
`shakespeare-char` preset (`--position-embedding` overrides the preset's positions) through the
full product path (`train`: one CPU replica under the default strategy, XLA, checkpoints every
250 steps, metrics, plot); keras-hub is `GPT2Backbone` + tied head under plain `fit`, compiled
with `jit_compile=True` (Keras 3.15's default "auto" means no XLA on a CPU-only machine). Both
train on the same batches (gpt_keras' data pipeline: random windows of the first 90% of Tiny
Shakespeare, batch k drawn from `(seed, k)`), with weights initialised from the same seed.
nanoGPT (a checkout of karpathy/nanoGPT, not part of this project; its `model.py` as it is:
learned positions, tied head, exact GELU) is built with `bias=True` (GPT-2's biases, as the two
Keras models have; its train.py defaults to False) and `torch.manual_seed(seed)` (its own
initialisation: the same scheme as gpt_keras', other draws), and trained in torch eager on the
same batches (materialised before training, so TensorFlow, imported to read them, sits idle)
with torch's AdamW at each step's learning rate from gpt_keras' schedule, gpt_keras' decay
groups (matrices decayed; biases, LayerNorm and embeddings not: nanoGPT's own
`configure_optimizers` decays the embeddings too) and Keras' epsilon 1e-7, clipping the global
gradient norm to 1.0. Compare positions like for like: `--position-embedding learned`.

Validation loss, two figures per run, both independent of the training seed: `val` is the mean
over 50 fixed batches of 12 random windows of the last 10% (drawn with seed 1337; for seed 1337
the figure gpt_keras' own run reports), `val (all)` the mean over every non-overlapping
64-token window of the validation split (1,742 windows, 111k predictions: less noisy; 50 random
batches of other seeds moved `val` by ±0.01 for one model).

Speed: the models run in their own processes at the same time but never together: a callback
holds each one at the start of every 250-step interval until the parent lets it go, and the
parent alternates them (order rotated every interval). Tokens/s of an interval is its training
time only (first step of the interval to its last); the first interval (tracing, XLA compile)
is left out. A ratio is the median of per-interval ratios, so a load change from other
processes that spans one round of intervals mostly cancels. Peak RSS is each process's own.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SETTINGS = dict(batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=100,
                weight_decay=0.1, beta_1=0.9, beta_2=0.99, clip_norm=1.0, eval_batches=50,
                checkpoint_every=250, log_every=250, sample_every=0)
INTERVAL = 250  # steps between the parent's hand-overs (= gpt_keras' epochs: see epoch_steps)
VALIDATION_SEED = 1337  # the fixed validation batches, whatever the training seed
READY = "@@ready"


def gate_callback():
    """A Keras callback that blocks at the start of every epoch (one `INTERVAL` of steps) and at
    the end of training until the parent writes a line to stdin (or closes it), announcing
    `READY` on stdout before each wait; it records each interval's training time (first to last
    step)."""
    import keras

    class Gate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.hold()
            self.began = time.perf_counter()

        @staticmethod
        def hold():
            print(READY, flush=True)
            sys.stdin.readline()

        def on_train_batch_end(self, batch, logs=None):
            self.ended = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(self.ended - self.began)

        def on_train_end(self, logs=None):
            self.hold()  # the final evaluation runs alone too

    return Gate()


def fixed_validation(model, token_file):
    """`(val, val_all)`: the mean loss over 50 batches drawn with `VALIDATION_SEED`, and over
    every non-overlapping 64-token window of the validation split."""
    import keras

    from gpt_keras import data

    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = data.validation_dataset(token_file, 64, SETTINGS["batch_size"], VALIDATION_SEED,
                                      SETTINGS["eval_batches"])
    val = model.evaluate(batches, verbose=0)
    windows = validation_windows(token_file).astype("int32")
    val_all = model.evaluate(windows[:, :-1], windows[:, 1:], batch_size=128, verbose=0)
    return float(val), float(val_all)


def validation_windows(token_file):
    """Every non-overlapping 64-token window of the validation split with its next token:
    `[count, 65]`."""
    import numpy as np

    tokens = token_file.tokens()[token_file.num_train:]
    count = (len(tokens) - 1) // 64
    return tokens[np.arange(count)[:, None] * 64 + np.arange(65)]


def peer_setup(out, steps, seed):
    """`(token_file, vocab_size, TrainConfig)` of the gpt_keras run a peer model trains beside."""
    from gpt_keras import data
    from gpt_keras.training import TrainConfig

    token_file = data.TokenFile.load(os.path.join(out, "gpt_keras", "data"))
    vocab = json.load(open(os.path.join(out, "gpt_keras", "run.json")))["model"]["vocab_size"]
    return token_file, vocab, TrainConfig(max_steps=steps, eval_every=steps, seed=seed, **SETTINGS)


def run_gpt_keras(out, steps, seed, position_embedding):
    from gpt_keras import GPTConfig, data
    from gpt_keras.training import TrainConfig, load_model, train

    config = TrainConfig(max_steps=steps, eval_every=steps, seed=seed, **SETTINGS)
    overrides = {"position_embedding": position_embedding} if position_embedding else {}
    gate = gate_callback()
    run = train(os.path.join(out, "gpt_keras"), [str(SHAKESPEARE)],
                GPTConfig.from_preset("shakespeare-char", **overrides), config, verbose=False,
                callbacks=[gate])
    val, val_all = fixed_validation(load_model(run.directory), data.TokenFile.load(run.data_dir))
    return {"val": val, "val_all": val_all, "interval_seconds": gate.seconds,
            "position_embedding": run.model_config.position_embedding}


def run_keras_hub(out, steps, seed, position_embedding):
    import keras
    import keras_hub

    from gpt_keras import data
    from gpt_keras.training import learning_rate_schedule

    token_file, vocab, config = peer_setup(out, steps, seed)
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
    model.compile(optimizer=optimizer, jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gate = gate_callback()
    model.fit(
        data.training_dataset(token_file, 64, config.batch_size, config.seed, 0, steps),
        epochs=steps // INTERVAL, steps_per_epoch=INTERVAL, callbacks=[gate], verbose=0,
        shuffle=False,
    )
    val, val_all = fixed_validation(model, token_file)
    return {"val": val, "val_all": val_all, "interval_seconds": gate.seconds}


def run_nanogpt(out, steps, seed, nanogpt):
    import numpy as np

    from gpt_keras import data
    from gpt_keras.training import learning_rate_schedule

    token_file, vocab, config = peer_setup(out, steps, seed)
    batches = list(data.training_dataset(token_file, 64, config.batch_size, config.seed, 0,
                                         steps).as_numpy_iterator())
    rates = np.asarray(learning_rate_schedule(config)(np.arange(steps)))
    validation = list(data.validation_dataset(token_file, 64, SETTINGS["batch_size"],
                                              VALIDATION_SEED, SETTINGS["eval_batches"])
                      .as_numpy_iterator())
    windows = validation_windows(token_file).astype("int64")
    count = len(windows)

    import torch

    sys.path.insert(0, nanogpt)
    from model import GPT, GPTConfig  # nanoGPT's model.py

    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0, bias=True))
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2 and id(p) not in embeddings],
         "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2 or id(p) in embeddings],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=float(rates[0]), betas=(config.beta_1, config.beta_2),
                                  eps=1e-7)
    gate = gate_callback()
    for step, (inputs, targets) in enumerate(batches):
        if step % INTERVAL == 0:
            gate.on_epoch_begin(step // INTERVAL)
        for group in optimizer.param_groups:
            group["lr"] = float(rates[step])
        _, loss = model(torch.from_numpy(inputs.astype("int64")),
                        torch.from_numpy(targets.astype("int64")))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gate.on_train_batch_end(step)
        if step % INTERVAL == INTERVAL - 1:
            gate.on_epoch_end(step // INTERVAL)
    gate.on_train_end()

    model.eval()
    with torch.no_grad():
        val = statistics.mean(
            float(model(torch.from_numpy(x.astype("int64")), torch.from_numpy(y.astype("int64")))[1])
            for x, y in validation
        )
        total = 0.0
        for start in range(0, count, 128):  # every prediction weighs the same, as in Keras
            chunk = torch.from_numpy(windows[start:start + 128])
            _, loss = model(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())
            total += float(loss) * len(chunk)
    return {"val": val, "val_all": total / count, "interval_seconds": gate.seconds}


def child(name, out, steps, seed, position_embedding, nanogpt):
    if name == "nanogpt":
        result = run_nanogpt(out, steps, seed, nanogpt)
    else:
        runner = {"gpt_keras": run_gpt_keras, "keras_hub": run_keras_hub}[name]
        result = runner(out, steps, seed, position_embedding)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


class Child:
    """One child process; `step()` lets it run one interval and waits until it is held again."""

    def __init__(self, name, out, steps, seed, position_embedding, nanogpt):
        command = [sys.executable, __file__, "--child", name, "--out", out, "--steps", str(steps),
                   "--seeds", str(seed)]
        if position_embedding:
            command += ["--position-embedding", position_embedding]
        if nanogpt:
            command += ["--nanogpt", nanogpt]
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.result = None
        self.wait_until_held()

    def wait_until_held(self):
        for line in self.process.stdout:
            if line.startswith(READY):
                return
            if line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT "):])
        raise RuntimeError(f"the {self.name} child stopped (exit code {self.process.wait()})")

    def step(self):
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        self.wait_until_held()

    def finish(self):
        """Lets the child evaluate and exit; returns its result."""
        self.process.stdin.close()
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT "):])
        if self.process.wait() or self.result is None:
            raise RuntimeError(f"the {self.name} child failed (exit code {self.process.returncode})")
        return self.result


def run_seed(out, steps, seed, position_embedding, names, nanogpt):
    """The models `names` on one seed, intervals alternating; returns `{name: result}`."""
    began = time.perf_counter()
    # gpt_keras first: it tokenizes the corpus into its run directory, which the others read.
    children = {}
    for name in names:
        children[name] = Child(name, out, steps, seed, position_embedding, nanogpt)
    for interval in range(steps // INTERVAL):
        shift = interval % len(names)
        for name in names[shift:] + names[:shift]:
            children[name].step()
    results = {name: c.finish() for name, c in children.items()}
    results["wall_seconds"] = time.perf_counter() - began
    return results


def tokens_per_second(seconds):
    return [INTERVAL * SETTINGS["batch_size"] * 64 / s for s in seconds[1:]]  # first: compile


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", default="1337",
                        help="comma-separated training seeds (data order, initialisation)")
    parser.add_argument("--out", default="/tmp/bench-shakespeare")
    parser.add_argument("--position-embedding", choices=["rotary", "learned", "sinusoidal"],
                        help="override the shakespeare-char preset's positions (keras-hub: learned)")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout: train its model.py too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps % INTERVAL or args.steps < 2 * INTERVAL:
        parser.error(f"--steps must be a multiple of {INTERVAL}, at least {2 * INTERVAL}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.child:
        return child(args.child, args.out, args.steps, seeds[0], args.position_embedding,
                     args.nanogpt)
    names = ["gpt_keras", "keras_hub"] + (["nanogpt"] if args.nanogpt else [])
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; pass a new --out.")
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for seed in seeds:
        results = run_seed(os.path.join(args.out, f"seed-{seed}"), args.steps, seed,
                           args.position_embedding, names, args.nanogpt)
        speeds = {name: tokens_per_second(results[name]["interval_seconds"]) for name in names}
        rows.append((seed, results, speeds))
        print(f"seed {seed} done in {results['wall_seconds']:.0f} s; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)

    position = rows[0][1]["gpt_keras"]["position_embedding"]
    print(f"\ngpt_keras: shakespeare-char preset, {position} positions; {args.steps} steps")
    print("| seed | model | val | val (all) | tokens/s (median interval) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for seed, results, speeds in rows:
        for name in names:
            r = results[name]
            print(f"| {seed} | {name} | {r['val']:.4f} | {r['val_all']:.4f} | "
                  f"{statistics.median(speeds[name]):,.0f} | {r['peak_rss_mib']:,.0f} |")
    print()
    for name in names:
        for key, label in (("val", "val"), ("val_all", "val (all)")):
            values = [results[name][key] for _, results, _ in rows]
            spread = (f", sd {statistics.stdev(values):.4f}" if len(values) > 1 else "")
            print(f"{name} {label}: mean {statistics.mean(values):.4f} over {len(values)} seed(s) "
                  f"(min {min(values):.4f}, max {max(values):.4f}{spread}); "
                  f"bits/char {statistics.mean(values) / math.log(2):.4f}")
    for name in names[1:]:
        ratios = [a / b for _, _, speeds in rows
                  for a, b in zip(speeds["gpt_keras"], speeds[name])]
        print(f"\nspeed gpt_keras / {name}: median of {len(ratios)} per-interval ratios "
              f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
