"""GPT-2 tokenizer throughput: gpt_keras' in-graph `GPT2Tokenizer` in `tf.data` vs Hugging Face's
`GPT2TokenizerFast` (Rust) vs keras-hub's `GPT2Tokenizer` (TF Text) in `tf.data`, same input,
same run. Prints a markdown table.

Run from the repository root (about a minute on a 2-core CPU):

    python benchmarks/tokenizer.py [--batch-size 1024] [--repeats 3] [--copies 1]

Input: the lines of Tiny Shakespeare (../shared/data/tinyshakespeare.txt, 40,000 lines, 1.1 MB),
newlines kept, `--copies` times, in batches of `--batch-size` lines. Each tokenizer gets the same
batches; MB/s is UTF-8 input bytes over the best of `--repeats` timed passes, after one untimed
pass (tracing, caches). The TF pipelines are
`Dataset.from_tensor_slices(lines).batch(B).map(tokenize, num_parallel_calls=AUTOTUNE)`, iterated
to the end; Hugging Face encodes each batch with one `tokenizer(batch)` call (Rust threads), and
once more with its Rust core alone (`backend_tokenizer.encode_batch`), without the Python wrapper.
"Same ids as HF" compares every line's ids with Hugging Face's.
"""

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ENCODER, MERGES = DATA / "gpt2" / "encoder.json", DATA / "gpt2" / "vocab.bpe"


def tf_data_runner(tokenize, lines, batch_size):
    """A function that tokenizes `lines` with `tokenize` in a tf.data pipeline and returns the
    ids of every line (as lists when `collect`)."""
    import tensorflow as tf

    def run(collect=False):
        dataset = (
            tf.data.Dataset.from_tensor_slices(lines)
            .batch(batch_size)
            .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )
        ids = []
        for batch in dataset:
            if collect:
                ids.extend(batch.to_list())
        return ids

    return run


def hf_runner(lines, batch_size, backend=False):
    """Hugging Face's tokenizer called as users call it (`tokenizer(batch)`), or its Rust core
    directly (`backend_tokenizer.encode_batch`, no Python wrapper) when `backend`."""
    import transformers

    parameters = inspect.signature(transformers.GPT2TokenizerFast.__init__).parameters
    # transformers 5 takes vocab/merges and builds an EMPTY vocabulary from 4.x's *_file names.
    names = ("vocab_file", "merges_file") if "vocab_file" in parameters else ("vocab", "merges")
    tokenizer = transformers.GPT2TokenizerFast(**dict(zip(names, (str(ENCODER), str(MERGES)))))
    assert len(tokenizer) == 50257

    def encode(batch):
        if backend:
            encodings = tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False)
            return [encoding.ids for encoding in encodings]
        return tokenizer(batch)["input_ids"]

    def run(collect=False):
        ids = []
        for start in range(0, len(lines), batch_size):
            encoded = encode(lines[start:start + batch_size])
            if collect:
                ids.extend(encoded)
        return ids

    return run


def measure(run, repeats):
    start = time.perf_counter()
    ids = run(collect=True)  # untimed for throughput: tracing, caches
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return ids, first, min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args(argv)

    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True) * args.copies
    megabytes = sum(len(line.encode("utf-8")) for line in lines) / 1e6

    from gpt_keras.tokenizers import GPT2Tokenizer

    runners = {"gpt_keras `GPT2Tokenizer` (core TF ops), tf.data": lambda: tf_data_runner(
        GPT2Tokenizer(ENCODER, MERGES).tokenize, lines, args.batch_size)}
    runners["Hugging Face `GPT2TokenizerFast` (Rust)"] = lambda: hf_runner(lines, args.batch_size)
    runners["Hugging Face, Rust core only (`backend_tokenizer.encode_batch`)"] = lambda: hf_runner(
        lines, args.batch_size, backend=True)

    def keras_hub_runner():
        import keras_hub

        tokenizer = keras_hub.tokenizers.GPT2Tokenizer(vocabulary=str(ENCODER),
                                                       merges=str(MERGES))
        return tf_data_runner(tokenizer, lines, args.batch_size)

    runners["keras-hub `GPT2Tokenizer` (TF Text), tf.data"] = keras_hub_runner

    results = {}
    for name, make in runners.items():
        results[name] = measure(make(), args.repeats)
    reference = results["Hugging Face `GPT2TokenizerFast` (Rust)"][0]
    print(f"{len(lines):,} lines, {megabytes:.2f} MB, batches of {args.batch_size} lines, "
          f"best of {args.repeats}, {os.cpu_count()} CPUs\n")
    print("| tokenizer | MB/s | tokens/s | first pass (s) | same ids as HF |")
    print("|---|---:|---:|---:|---|")
    for name, (ids, first, best) in results.items():
        tokens = sum(len(row) for row in ids)
        differing = sum(a != b for a, b in zip(ids, reference))
        same = "yes" if differing == 0 else f"no ({differing:,} lines differ)"
        print(f"| {name} | {megabytes / best:.2f} | {tokens / best:,.0f} | {first:.2f} | {same} |")


if __name__ == "__main__":
    main()
