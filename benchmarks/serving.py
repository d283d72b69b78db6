"""Serving throughput and latency through `gpt-keras serve` (TF Serving's REST API), CPU.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/serving.py

Options: `--requests 24,64` (per round at concurrency 1 and 8), `--concurrency 1,8`,
`--new-tokens 64`, `--keep DIR` (keep the export there). About 2 minutes on a 2-core CPU.

Setting: the `shakespeare-char` preset (4 layers, 4 heads, 128 dims, context 64) with random
weights and a `CharTokenizer` over Tiny Shakespeare (67 ids), exported with
`gpt_keras.serving.export_model` (the graph TF Serving runs: no XLA) and served by
`gpt-keras serve --quiet` in its own process (8 prediction threads). Clients are threads in this
process, each sending one prompt per request and waiting for the answer (a closed loop), at each
concurrency in turn. Prompts are 16-character lines of Tiny Shakespeare. Requests:
  - `generate` (columnar `inputs`): `--new-tokens` new tokens, greedy (temperature 0), with the
    prompts whose greedy continuation does not stop at end-of-text (found with one batched
    request first), so every request does the same work;
  - `serving_default` (row `instances`): the export's default sampling (200 new tokens at most,
    temperature 0.8, top-k 200), which stops at end-of-text: with random weights, lengths vary.
Reported per signature and concurrency: requests/s, new tokens/s (counted from `token_ids`, or
characters of the completion for `serving_default`: one token per character), and p50/p99
latency (nearest rank; with few requests p99 is close to the maximum), after 2 warm-up requests
per client. The 1-minute load average before and after is printed: other processes on the
machine inflate the figures.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's gpt_keras (the package need not be installed)

import numpy as np  # noqa: E402

from gpt_keras import GPT  # noqa: E402
from gpt_keras.cli import default_corpus  # noqa: E402
from gpt_keras.serving import export_model  # noqa: E402
from gpt_keras.tokenizers import CharTokenizer  # noqa: E402

MODEL_NAME = "shakespeare"
PROMPT_CHARS = 16
WARMUP_PER_CLIENT = 2


def export(directory):
    """The `shakespeare-char` preset, random weights, exported as version 1 under `directory`."""
    with open(default_corpus(), encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.train(text)
    model = GPT.from_preset("shakespeare-char", vocab_size=tokenizer.vocab_size)
    model.build()
    export_model(model, tokenizer, directory)
    lines = [line for line in text.splitlines() if len(line) >= PROMPT_CHARS]
    return [line[:PROMPT_CHARS] for line in lines[:64]]


def start_server(base_dir):
    """`gpt-keras serve` on a free port; returns (process, model URL)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt_keras.cli", "serve", base_dir, "--port", "0", "--quiet",
         "--poll-seconds", "0", "--model-name", MODEL_NAME],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "Serving NAME (version 1) from DIR at URL"
    if " at http" not in line:
        process.kill()
        raise RuntimeError(f"The server did not start: {line!r}")
    return process, line.rsplit(" at ", 1)[1].strip()


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def generate_request(prompt, new_tokens):
    body = {"signature_name": "generate", "inputs": {
        "prompts": [prompt], "max_new_tokens": new_tokens, "temperature": 0.0, "top_k": 200,
        "top_p": 1.0, "seed": 0, "repetition_penalty": 1.0, "min_new_tokens": 0,
        "banned_token_ids": [], "bias_token_ids": [], "bias_values": [], "stop_strings": []}}

    def tokens(answer):
        return int((np.array(answer["outputs"]["token_ids"]) >= 0).sum())

    return body, tokens


def full_length(url, prompts, new_tokens):
    """The prompts whose greedy continuation runs all `new_tokens` (a random model can pick
    end-of-text), from one batched `generate` request."""
    body, _ = generate_request(prompts[0], new_tokens)
    body["inputs"]["prompts"] = prompts
    token_ids = np.array(post(url, body)["outputs"]["token_ids"])
    kept = [prompt for prompt, row in zip(prompts, token_ids) if (row >= 0).all()]
    if len(kept) < 8:
        raise RuntimeError(f"Only {len(kept)} of {len(prompts)} prompts run {new_tokens} greedy "
                           "tokens without end-of-text; pass fewer --new-tokens.")
    return kept


def default_request(prompt, _):
    return {"instances": [prompt]}, lambda answer: len(answer["predictions"][0])


def run(url, make_request, prompts, new_tokens, concurrency, requests):
    """`concurrency` closed-loop clients: warm-up requests, then `requests` timed ones in all.
    Returns (wall seconds of the timed phase, [latency seconds], total new tokens)."""
    def client(index, count):
        results = []
        for i in range(count):
            body, tokens = make_request(prompts[(index + i * concurrency) % len(prompts)],
                                        new_tokens)
            start = time.perf_counter()
            answer = post(url, body)
            results.append((time.perf_counter() - start, tokens(answer)))
        return results

    clients = range(concurrency)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, clients, [WARMUP_PER_CLIENT] * concurrency))
        start = time.perf_counter()
        timed = [result for results in pool.map(client, clients, [requests // concurrency] *
                                                concurrency) for result in results]
        wall = time.perf_counter() - start
    return wall, [latency for latency, _ in timed], sum(tokens for _, tokens in timed)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q / 100 * len(ordered))) - 1))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", default="24,64",
                        help="timed requests at each concurrency (comma-separated)")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--keep", help="export into this directory and keep it")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    request_counts = [int(n) for n in args.requests.split(",")]
    if len(request_counts) != len(concurrencies):
        parser.error("--requests needs one count per --concurrency value")

    directory = args.keep or tempfile.mkdtemp(prefix="gpt-keras-serving-bench-")
    base_dir = os.path.join(directory, MODEL_NAME)
    start = time.perf_counter()
    prompts = export(base_dir)
    print(f"export: {time.perf_counter() - start:.1f} s -> {base_dir}")
    process, url = start_server(base_dir)
    print(f"server: {url}   load average before: {os.getloadavg()[0]:.2f}   cores: "
          f"{os.cpu_count()}")
    print(f"{'signature':16} {'conc.':>5} {'requests':>8} {'req/s':>7} {'tokens/s':>9} "
          f"{'tok/req':>7} {'p50 ms':>8} {'p99 ms':>8}")
    try:
        greedy_prompts = full_length(url + ":predict", prompts, args.new_tokens)
        for name, make_request, chosen in [("generate", generate_request, greedy_prompts),
                                           ("serving_default", default_request, prompts)]:
            for concurrency, requests in zip(concurrencies, request_counts):
                wall, latencies, tokens = run(url + ":predict", make_request, chosen,
                                              args.new_tokens, concurrency, requests)
                n = len(latencies)
                print(f"{name:16} {concurrency:5d} {n:8d} {n / wall:7.2f} {tokens / wall:9.1f} "
                      f"{tokens / n:7.1f} {1000 * percentile(latencies, 50):8.1f} "
                      f"{1000 * percentile(latencies, 99):8.1f}", flush=True)
    finally:
        process.terminate()
        process.wait()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
