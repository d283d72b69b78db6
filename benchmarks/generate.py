"""Greedy generation speed: `gpt_keras.generation` vs keras-hub's `GPT2CausalLM.generate` (CPU).

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/generate.py

Options: `--models a,b`, `--batch-sizes 1,8`, `--repeats 3` (interleaved timed rounds),
`--no-keras-hub`, `--no-hf`, `--no-positions`. The default run takes about 5 minutes on a 2-core CPU.

Setting (both libraries, random weights, float32, XLA): a batch of 16-token prompts, 128 new
tokens, greedy, no stop token. Models:
  (a) the `shakespeare-char` preset with context 256 (4 layers, 4 heads, 128 dims, vocab 65;
      sinusoidal positions in gpt_keras, learned in keras-hub);
  (b) GPT-2 small's shape (12 layers, 12 heads, 768 dims, vocab 50,257, context 1024, learned
      positions, tied embeddings).
keras-hub: a `GPT2CausalLM` on a `GPT2Backbone` of the same shape, `preprocessor=None`,
`compile(sampler="greedy", jit_compile=True)` (the default "auto" resolves to no XLA on a
machine without a GPU), called with padded `{"token_ids", "padding_mask"}` of length 144
(its cache length), `stop_token_ids=None`. gpt_keras: `generation.generate(..., temperature=0)`
(its cache length is 192, the size bucket holding 144). Model (b) also runs Hugging Face
transformers' PyTorch `GPT2LMHeadModel.generate` (random weights, KV cache, greedy, exactly 128 new
tokens) when transformers and torch are installed (the test extra).

Reported per model and batch size: the first call (trace + XLA compile + run), then
`--repeats` rounds calling the two libraries in turn: new tokens/s over the whole call (prefill
included; median and best round), this process's CPU time per new token, and the median
per-round speed ratio in wall-clock and in CPU time (the latter holds on a shared machine). The machine may be shared,
so rounds are interleaved and the best round is shown next to the median.
Per-position cost (batch 1, gpt_keras only, cache as long as the context): ms/token of a 32-token
compiled chunk (`generation.stream`) at positions 48-79 (after a 16-token prompt) and at the end of
the context (992-1023 for model b, after a 960-token prompt), alternating, in wall-clock and in
process CPU time (which other processes' load does not inflate). Flat means the cache works.
Memory bandwidth (model b, batch 1): (fp32 weight bytes read per step + KV-cache bytes read per
step) / wall time per step (best round), next to this machine's read bandwidth measured with a
NumPy sum.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Import the checkout's gpt_keras (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from gpt_keras import GPT, GPTConfig, generation, num_parameters  # noqa: E402

PROMPT_LENGTH = 16
NEW_TOKENS = 128
CHUNK = 32
# The cache length `generate` picks for 16 + 128 tokens (its size bucket).
GENERATE_CACHE = generation._bucket(PROMPT_LENGTH + NEW_TOKENS)

MODELS = {
    "a": GPTConfig.from_preset("shakespeare-char", context_length=256),
    "b": GPTConfig.from_preset("gpt2-small", dropout=0.0),
}


def prompts(batch_size, vocab_size):
    shape = (batch_size, PROMPT_LENGTH)
    return np.random.default_rng(0).integers(0, vocab_size, shape).astype("int32")


def interleaved(functions, repeats):
    """Times each zero-argument function once (the first call: trace + compile + run), then
    `repeats` rounds calling them in turn (robust to load from other processes), in wall-clock
    and in this process's CPU time (all threads; not inflated by other processes' load).
    Returns {name: (first seconds, [round wall seconds], [round CPU seconds])}."""
    results = {}
    for name, function in functions.items():
        start = time.perf_counter()
        function()
        results[name] = (time.perf_counter() - start, [], [])
    for _ in range(repeats):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            results[name][1].append(time.perf_counter() - wall)
            results[name][2].append(time.process_time() - cpu)
    return results


def gpt_keras_model(config):
    model = GPT(**dataclasses.asdict(config))
    model.build()
    return model


def keras_hub_model(config):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=config.vocab_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        hidden_dim=config.hidden_dim,
        intermediate_dim=config.mlp_dim or 4 * config.hidden_dim,
        dropout=0.0,
        max_sequence_length=config.context_length,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy", jit_compile=True)
    assert causal_lm.jit_compile, "keras-hub generate must run with XLA"
    return causal_lm


def gpt_keras_call(model, batch_size):
    ids = prompts(batch_size, model.config.vocab_size)

    def call():
        out = generation.generate(model, ids, NEW_TOKENS, temperature=0)
        assert all(len(row) == NEW_TOKENS for row in out)

    return call


def keras_hub_call(causal_lm, batch_size, vocab_size):
    length = PROMPT_LENGTH + NEW_TOKENS
    token_ids = np.zeros((batch_size, length), "int32")
    token_ids[:, :PROMPT_LENGTH] = prompts(batch_size, vocab_size)
    padding_mask = np.zeros((batch_size, length), bool)
    padding_mask[:, :PROMPT_LENGTH] = True
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}

    def call():
        out = causal_lm.generate(inputs, stop_token_ids=None)
        assert np.asarray(out["padding_mask"]).all()

    return call


def hugging_face_call(config, batch_size):
    """Hugging Face transformers' PyTorch `GPT2LMHeadModel.generate` of the same shape (random
    weights, KV cache, greedy), or None without transformers/torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.hidden_dim,
        n_layer=config.num_layers, n_head=config.num_heads,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    ids = torch.tensor(prompts(batch_size, config.vocab_size), dtype=torch.long)

    def call():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 pad_token_id=0)
        assert out.shape[1] == PROMPT_LENGTH + NEW_TOKENS

    return call


def per_position(model, rounds):
    """ms/token of a 32-token compiled chunk starting at position 48 and of one ending at the
    context's end (batch 1, cache length = context), measured in alternation `rounds` times, in
    wall-clock and in CPU time of this process (all threads; unlike wall-clock time it is not
    inflated by other processes' load). Returns (early position, late position, {"wall": [early
    ms], ...}, {"wall": [late ms], ...})."""
    context = model.config.context_length
    late_length = context - 2 * CHUNK
    early_ids = prompts(1, model.config.vocab_size)
    late_ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, late_length))

    def chunk_ms(ids):
        chunks = generation.stream(
            model, ids, 2 * CHUNK, chunk_size=CHUNK, temperature=0, cache_length=context
        )
        next(chunks)  # prefill + the first chunk
        wall, cpu = time.perf_counter(), time.process_time()
        assert len(next(chunks)[0]) == CHUNK
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return 1000 * wall / CHUNK, 1000 * cpu / CHUNK

    chunk_ms(early_ids), chunk_ms(late_ids)  # compile
    early, late = {"wall": [], "cpu": []}, {"wall": [], "cpu": []}
    for _ in range(rounds):
        for times, ids in [(early, early_ids), (late, late_ids)]:
            wall, cpu = chunk_ms(ids)
            times["wall"].append(wall)
            times["cpu"].append(cpu)
    return PROMPT_LENGTH + CHUNK, late_length + CHUNK, early, late


def weight_bytes_per_step(config):
    """fp32 bytes of weights a decoding step reads: every parameter once, except the position
    table (one row); the tied embedding counts once, for the output projection."""
    total = num_parameters(config)
    if config.position_embedding == "learned":
        total -= (config.context_length - 1) * config.hidden_dim
    return 4 * total


def cache_bytes_per_step(config, batch_size, cache_length):
    return 4 * batch_size * config.num_layers * 2 * cache_length * config.hidden_dim


def read_bandwidth():
    """GB/s of a NumPy sum over 1 GiB of float32 (best of 3)."""
    array = np.ones(1 << 28, np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        array.sum()
        best = min(best, time.perf_counter() - start)
    return array.nbytes / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="a,b")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-keras-hub", action="store_true")
    parser.add_argument("--no-positions", action="store_true")
    parser.add_argument("--no-hf", action="store_true",
                        help="skip Hugging Face transformers (PyTorch) on model b")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)

    table, notes = [], []
    for name in args.models.split(","):
        config = MODELS[name]
        label = (f"({name}) {config.num_layers}L {config.hidden_dim}d V={config.vocab_size} "
                 f"ctx {config.context_length}")
        model = gpt_keras_model(config)
        hub = None if args.no_keras_hub else keras_hub_model(config)
        for batch_size in batch_sizes:
            functions = {"gpt_keras": gpt_keras_call(model, batch_size)}
            if hub is not None:
                functions["keras-hub"] = keras_hub_call(hub, batch_size, config.vocab_size)
            hf = None if name != "b" or args.no_hf else hugging_face_call(config, batch_size)
            if hf is not None:
                functions["transformers"] = hf
            results = interleaved(functions, args.repeats)
            for library, (first, rounds, cpu_rounds) in results.items():
                median = statistics.median(rounds)
                new = batch_size * NEW_TOKENS
                table.append((label, batch_size, library, first, new / median, new / min(rounds),
                              1000 * median / NEW_TOKENS,
                              1000 * statistics.median(cpu_rounds) / NEW_TOKENS))
                print(f"{label} B={batch_size} {library}: first call {first:.1f} s, "
                      f"{new / median:.1f} tokens/s", flush=True)
            if hub is not None:
                ratio = {
                    kind: statistics.median(
                        h / g for g, h in zip(results["gpt_keras"][i], results["keras-hub"][i])
                    )
                    for kind, i in (("wall-clock", 1), ("CPU time", 2))
                }
                notes.append(f"{label}, B={batch_size}: gpt_keras is "
                             f"{ratio['wall-clock']:.2f}x keras-hub's speed in wall-clock time, "
                             f"{ratio['CPU time']:.2f}x in CPU time (medians of per-round "
                             "ratios)")
            if hf is not None:
                ratio = statistics.median(
                    h / g for g, h in zip(results["gpt_keras"][1], results["transformers"][1])
                )
                notes.append(f"{label}, B={batch_size}: gpt_keras is {ratio:.2f}x Hugging Face "
                             "transformers' speed in wall-clock time (median of per-round ratios)")
        if not args.no_positions:
            early, late, early_times, late_times = per_position(model, args.repeats)
            medians = {
                kind: (statistics.median(early_times[kind]), statistics.median(late_times[kind]))
                for kind in ("wall", "cpu")
            }
            early_ms = min(early_times["wall"])
            notes.append(
                f"{label}, B=1, cache {config.context_length}, per-position cost (medians of "
                f"{args.repeats} alternating rounds), positions {early}-{early + CHUNK - 1} vs "
                f"{late}-{late + CHUNK - 1}: wall-clock {medians['wall'][0]:.3f} vs "
                f"{medians['wall'][1]:.3f} ms/token, CPU time {medians['cpu'][0]:.3f} vs "
                f"{medians['cpu'][1]:.3f} ms/token (late/early "
                f"{medians['cpu'][1] / medians['cpu'][0]:.2f})"
            )
            print(notes[-1], flush=True)
            row = None
            if name == "b":
                weights = weight_bytes_per_step(config)
                cache = cache_bytes_per_step(config, 1, config.context_length)
                seconds = early_ms / 1000
                notes.append(
                    f"{label}, B=1 decoding step with a {config.context_length}-slot cache (best round): "
                    f"{weights / 1e6:.0f} MB of weights + {cache / 1e6:.0f} MB of KV cache in "
                    f"{early_ms:.1f} ms = {weights / seconds / 1e9:.1f} GB/s of weights, "
                    f"{(weights + cache) / seconds / 1e9:.1f} GB/s in all (NumPy sum on this "
                    f"machine: {read_bandwidth():.1f} GB/s)"
                )
                row = next(
                    (r for r in table if r[0] == label and r[1] == 1 and r[2] == "gpt_keras"), None
                )
            if name == "b" and row is not None:
                milliseconds = 1000 / row[5]  # best round
                seconds = milliseconds / 1000
                cache = cache_bytes_per_step(config, 1, GENERATE_CACHE)
                notes.append(
                    f"{label}, B=1 `generate` ({GENERATE_CACHE}-slot cache, prefill included, "
                    f"best round): {weights / 1e6:.0f} MB + {cache / 1e6:.0f} MB per step in "
                    f"{milliseconds:.1f} ms = "
                    f"{(weights + cache) / seconds / 1e9:.1f} GB/s"
                )
        del model, hub

    print(f"\nBatch of {PROMPT_LENGTH}-token prompts, {NEW_TOKENS} new tokens, greedy, "
          f"random weights, float32, XLA; {args.repeats} interleaved rounds after the first "
          "call.\n")
    print("| model | batch | library | first call (s) | new tokens/s (median) | (best) "
          "| ms per token (call / 128) | CPU ms per token |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for label, batch_size, library, first, rate, best, ms, cpu_ms in table:
        print(f"| {label} | {batch_size} | {library} | {first:.1f} | {rate:,.1f} | {best:,.1f} "
              f"| {ms:.2f} | {cpu_ms:.2f} |")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
