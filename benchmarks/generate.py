"""Decoding speed, each system in its own process, rounds alternating between them.

Run from the repository root (GPT-2-small shape, batch 1 and 8, about 15 minutes on 2 cores):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/generate.py --model gpt2-small --batch-sizes 1,8

and for the small model's served-vs-in-process figure (about 3 minutes):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/generate.py --model shakespeare-char --batch-sizes 1 \
        --systems gpt_keras,served

Like for like: every system decodes the same shape with random weights (seeded), a 16-token
prompt (for `served`, the text of Tiny Shakespeare's first 16 tokens), 128 new tokens, greedy, batch B. `gpt2-small` is GPT-2 small's shape (124M parameters,
learned positions, tied embeddings, context 1024), `gpt2-medium` GPT-2 medium's (355M: 24 layers,
16 heads, 1024 dims); `shakespeare-char` is that preset with context
256 (rotary positions). Systems (`--systems`, comma-separated):
  gpt_keras          `generation.generate` in-process, `jit_compile="auto"` (the default)
  gpt_keras-xla      the same with `jit_compile=True`
  gpt_keras-graph    the same with `jit_compile=False` (a plain TensorFlow graph, oneDNN)
  gpt_keras-bf16     `precision.with_weights(model, "bfloat16")`, default `jit_compile`
  gpt_keras-bf16-xla, gpt_keras-bf16-graph   the same with `jit_compile=True` / `False`
  gpt_keras-int8     `precision.with_weights(model, "int8")`, default `jit_compile`
  hf                 Hugging Face transformers' `GPT2LMHeadModel.generate` (torch CPU, its
                     default threads, KV cache, exactly 128 new tokens); GPT-2 shapes only
  served             the model exported with `gpt_keras.serving` (GPT-2's BPE or a character
                     tokenizer in the graph) and run as TF Serving runs it: a fresh process
                     without Keras, XLA disabled, the TF1 Session loader, its `generate`
                     signature (text in; the new-token count is read from its `token_ids`, as
                     the served graph stops at end-of-text)
  served-1thread     the same with one intra-op and one inter-op thread (TF Serving's
                     `--tensorflow_intra_op_parallelism=1 --tensorflow_inter_op_parallelism=1`)

Each system runs in its own worker process: it builds its model, makes one timed first call
(trace + compile + run), then waits; the driver then asks the workers in turn (the order rotates
each round) for one timed call each, `--rounds` times, so only one system runs at a time. Each
round records wall time, the worker's process CPU time (all its threads) and the 1-minute load
average before it. Reported: median and best tokens/s (new tokens / wall time of the call,
prefill included), CPU ms per token, the median of per-round ratios to `hf` (or, without it, to
the first system), the first call, and the load range.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's gpt_keras (the package need not be installed)

PROMPT_LENGTH = 16
NEW_TOKENS = 128
SYSTEMS = ("gpt_keras", "gpt_keras-xla", "gpt_keras-graph", "gpt_keras-bf16",
           "gpt_keras-bf16-xla", "gpt_keras-bf16-graph", "gpt_keras-int8", "hf", "served",
           "served-1thread")
GPT2_VOCABULARY = ROOT.parent / "shared" / "data" / "gpt2"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def model_config(name):
    from gpt_keras import GPTConfig

    if name == "gpt2-small":
        return GPTConfig.from_preset("gpt2-small", dropout=0.0)
    if name == "gpt2-medium":  # OpenAI's GPT-2 medium shape (355M parameters)
        return GPTConfig.from_preset("gpt2-small", num_layers=24, num_heads=16, hidden_dim=1024,
                                     dropout=0.0)
    return GPTConfig.from_preset(name, context_length=256, dropout=0.0)


def prompt_ids(batch_size, vocab_size):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, (batch_size, PROMPT_LENGTH)).astype(
        "int32"
    )


# -- Workers: one system each -------------------------------------------------------------------


def gpt_keras_worker(spec):
    import dataclasses

    import keras

    from gpt_keras import GPT, generation
    from gpt_keras.precision import with_weights

    keras.utils.set_random_seed(0)
    config = model_config(spec["model"])
    model = GPT(**dataclasses.asdict(config))
    model.build()
    variant = spec["system"].split("-")[1:]  # e.g. ["bf16", "graph"]
    weights = next((w for v, w in (("bf16", "bfloat16"), ("int8", "int8")) if v in variant),
                   "float32")
    model = with_weights(model, weights)
    jit_compile = True if "xla" in variant else False if "graph" in variant else "auto"
    ids = prompt_ids(spec["batch_size"], config.vocab_size)

    def call():
        out = generation.generate(model, ids, NEW_TOKENS, temperature=0, jit_compile=jit_compile)
        return sum(len(row) for row in out)

    return call


def hf_worker(spec):
    import torch
    import transformers

    config = model_config(spec["model"])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length,
        n_embd=config.hidden_dim, n_layer=config.num_layers, n_head=config.num_heads,
    )).eval()
    ids = torch.tensor(prompt_ids(spec["batch_size"], config.vocab_size), dtype=torch.long)

    def call():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=0)
        return (out.shape[1] - PROMPT_LENGTH) * out.shape[0]

    return call


def served_worker(spec):
    """Sets this process up as `serving.SERVER_LIKE_PROLOGUE` does (Keras and gpt_keras
    unimportable, XLA disabled, the TF1 Session loader `load`), then loads the export."""
    import numpy as np

    namespace = {}
    exec(spec["prologue"], namespace)  # the driver passes gpt_keras' own prologue
    run = namespace["load"](spec["export"], threads=int(spec["system"] == "served-1thread"))
    prompts = np.array([spec["prompt"].encode("utf-8")] * spec["batch_size"], object)
    feeds = {"prompts": prompts, "max_new_tokens": np.int32(NEW_TOKENS),
             "temperature": np.float32(0), "top_k": np.int32(0), "top_p": np.float32(1),
             "seed": np.int64(0), "repetition_penalty": np.float32(1),
             "min_new_tokens": np.int32(0), "banned_token_ids": np.zeros([0], np.int32),
             "bias_token_ids": np.zeros([0], np.int32), "bias_values": np.zeros([0], np.float32),
             "stop_strings": np.zeros([0], object)}  # steering off

    def call():
        return int((run("generate", feeds)["token_ids"] >= 0).sum())

    return call


def serve_worker(make_call):
    """The worker's loop: one timed first call, then one timed call per "run" line on stdin."""
    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = call()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                "tokens": tokens}

    start = time.perf_counter()
    call = make_call()
    setup = time.perf_counter() - start
    first = timed()
    print(json.dumps({"setup": setup, "first": first}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(json.dumps(timed()), flush=True)


# -- The driver --------------------------------------------------------------------------------


class Worker:
    def __init__(self, spec):
        self.name = spec["system"]
        if spec["system"].startswith("served"):
            from gpt_keras.serving import SERVER_LIKE_PROLOGUE

            spec = dict(spec, prologue=SERVER_LIKE_PROLOGUE)
        command = [sys.executable, __file__, "--worker", json.dumps(spec)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.started = json.loads(self._line())
        self.rounds = []

    def _line(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit {self.process.wait()})")
        return line

    def run(self):
        load = os.getloadavg()[0]
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        result = json.loads(self._line())
        result["load"] = load
        self.rounds.append(result)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def export_for_serving(model_name, directory):
    """A SavedModel of the benchmark's model (random weights, seed 0; the vocabulary of its
    tokenizer), and a text prompt of about 16 tokens for the tokenizer."""
    import dataclasses

    import keras

    from gpt_keras import GPT, serving
    from gpt_keras.tokenizers import CharTokenizer, GPT2Tokenizer

    keras.utils.set_random_seed(0)
    corpus = CORPUS.read_text(encoding="utf-8")
    if model_name.startswith("gpt2"):
        tokenizer = GPT2Tokenizer.from_directory(str(GPT2_VOCABULARY))
    else:
        tokenizer = CharTokenizer.train(corpus)
    # The text of the corpus' first PROMPT_LENGTH tokens.
    prompt = tokenizer.detokenize(tokenizer.tokenize(corpus[:1000])[:PROMPT_LENGTH])
    prompt = prompt.numpy().decode("utf-8")
    config = model_config(model_name)
    model = GPT(**dataclasses.asdict(config.replace(vocab_size=tokenizer.vocab_size)))
    model.build()
    tokenizer_length = len(tokenizer.tokenize(prompt).numpy())
    path = serving.export_model(model, tokenizer, directory)
    return path, prompt, tokenizer_length


def report(workers, batch_size, model_name):
    baseline = next((w for w in workers if w.name == "hf"), workers[0])
    print(f"\n{model_name}, batch {batch_size}, {len(baseline.rounds)} rounds "
          f"(ratios: per-round tokens/s over {baseline.name}'s in the same round)")
    print("| system | tokens/s median (best) | CPU ms/token | ratio vs "
          f"{baseline.name} | first call s | load |")
    print("|---|---:|---:|---:|---:|---|")
    for worker in workers:
        speeds = [r["tokens"] / r["wall"] for r in worker.rounds]
        cpu = [1000 * r["cpu"] / r["tokens"] for r in worker.rounds]
        ratios = [s / (b["tokens"] / b["wall"]) for s, b in zip(speeds, baseline.rounds)]
        loads = [r["load"] for r in worker.rounds]
        print(f"| {worker.name} | {statistics.median(speeds):.1f} ({max(speeds):.1f}) | "
              f"{statistics.median(cpu):.1f} | {statistics.median(ratios):.2f} | "
              f"{worker.started['first']['wall']:.1f} | {min(loads):.1f}-{max(loads):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt2-small", "gpt2-medium", "shakespeare-char"],
                        default="gpt2-small")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--systems", default=None,
                        help=f"comma-separated, of {', '.join(SYSTEMS)} (default: all that apply)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        make = {"hf": hf_worker, "served": served_worker,
                "served-1thread": served_worker}.get(spec["system"], gpt_keras_worker)
        return serve_worker(lambda: make(spec))
    systems = (args.systems or ",".join(SYSTEMS)).split(",")
    if not args.model.startswith("gpt2") and "hf" in systems and not args.systems:
        systems.remove("hf")  # Hugging Face's GPT-2 has learned positions only
    with tempfile.TemporaryDirectory() as directory:
        served = None
        if any(system.startswith("served") for system in systems):
            served = export_for_serving(args.model, os.path.join(directory, "model"))
            print(f"exported {served[0]}; prompt of {served[2]} tokens", flush=True)
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            workers = []
            for system in systems:
                spec = {"system": system, "model": args.model, "batch_size": batch_size}
                if system.startswith("served"):
                    spec.update(export=served[0], prompt=served[1])
                workers.append(Worker(spec))
                print(f"{system}: first call {workers[-1].started['first']['wall']:.1f} s",
                      flush=True)
            for round_index in range(args.rounds):
                shift = round_index % len(workers)
                for worker in workers[shift:] + workers[:shift]:
                    worker.run()
            for worker in workers:
                worker.close()
            report(workers, batch_size, args.model)


if __name__ == "__main__":
    main()
