"""What TF Serving's warm-up records and request batching do for an export, measured the way the
tests reproduce TF Serving (a fresh process per measurement: XLA disabled, TF1 Session loader, no
Keras; `gpt_keras.serving.run_like_tf_serving`).

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/serving_warmup_batching.py

Options: `--rounds 5`, `--repeats 5`, `--train-steps 150`, `--new-tokens 32`; `--part warmup`,
`batching`, `http` or `buckets` runs one part (default: all four); `--batching 2:2000,1:50000`
gives the HTTP part one batching server per `num_batch_threads:batch_timeout_micros`, each with
export/batching_parameters.txt changed in those two lines (default: the file as it is). About
20 minutes on a 2-core CPU.

Setting: the `shakespeare-char` preset (4 layers, 4 heads, 128 dims, context 64) with a
`CharTokenizer` over Tiny Shakespeare, trained for `--train-steps` Adam steps (batch 16) so that
it stops sampling end-of-text and every `serving_default` completion runs its 200 tokens (with
random weights, completions stop at random lengths), exported with `gpt_keras.serving`
(`--train-steps 0`: random weights). Prompts: 16-character lines of Tiny Shakespeare.

1. Warm-up. Each round starts, in alternating order, one process per (signature, replay): it
   loads the version, replays its `tf_serving_warmup_requests` or not, then sends the same
   batch-1 request `1 + --repeats` times: `serving_default` (200 new tokens, sampled) or
   `generate` (`--new-tokens` greedy). Reported: load and replay seconds, the first request,
   the median of the others (steady state) and their ratio, medians over rounds.
2. Batching. Each round starts, in alternating order, one process per mode, both after the
   warm-up replay: 8 concurrent batch-1 `serving_default` requests (8 threads, each its own
   `Session.run`, as TF Serving runs them without batching), or the same 8 prompts as one
   batch-8 `Session.run` (what `--enable_batching` with export/batching_parameters.txt merges
   8 simultaneous requests into; the batching queue's own wait, at most
   `batch_timeout_micros` (50 ms in the file), is not included). Each mode is repeated
   `--repeats` times per process. Reported: requests/s, generated characters/s (one token per
   character) and per-request latency (p50, max), over all rounds.
3. Batching through HTTP. Each round starts, in alternating order, `gpt-keras serve` without and
   with `--enable-batching --batching-parameters-file export/batching_parameters.txt`, and 8
   closed-loop clients (threads) send batch-1 `serving_default` requests, one untimed and then
   `--repeats` timed each. Both serve a copy of the version whose warm-up file lacks the
   `generate` records: under batching those fail (scalar inputs), and the version would not be
   served, as in TF Serving (export/README.md). Reported as in 2, over all rounds.
4. Which shape buckets need warm-up records. As 1, for `generate` at batch 8 with prompts of
   `context_length - 1` characters, after replaying no record, only the first record of each
   signature (batch 1, short prompt), or all of them.
The 1-minute load average is printed with every round: other processes on the machine inflate
the figures, so compare modes within this run only.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's gpt_keras

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_log_pb2  # noqa: E402

from gpt_keras import GPT  # noqa: E402
from gpt_keras.cli import default_corpus  # noqa: E402
from gpt_keras.serving import export_model, run_like_tf_serving  # noqa: E402
from gpt_keras.tokenizers import CharTokenizer  # noqa: E402
from gpt_keras.warmup import WARMUP_FILE  # noqa: E402

PROMPT_CHARS = 16
CONCURRENCY = 8

# Appended to `SERVER_LIKE_PROLOGUE`: the warm-up measurement of one process.
FIRST_REQUEST = r"""
import time
request = json.load(sys.stdin)
start = time.perf_counter()
run = load(sys.argv[1])
loaded = time.perf_counter() - start
start = time.perf_counter()
if request["replay"] == "all":
    replayed = replay_warmup(sys.argv[1], run)
else:  # none, or the first record of each signature (batch 1, short prompt)
    records = read_warmup_requests(sys.argv[1]) if request["replay"] != "none" else []
    records = [r for i, r in enumerate(records) if r[0] not in {s for s, _ in records[:i]}]
    for signature, feeds in records:
        run(signature, feeds)
    replayed = len(records)
replay_seconds = time.perf_counter() - start
prompts = np.array([p.encode("utf-8") for p in request["prompts"]], object)
feeds = {"prompts": prompts} if request["signature"] == "serving_default" else {
    "prompts": prompts, "max_new_tokens": np.int32(request["new_tokens"]),
    "temperature": np.float32(0), "top_k": np.int32(1), "top_p": np.float32(1),
    "seed": np.int64(0), "repetition_penalty": np.float32(1), "min_new_tokens": np.int32(0),
    "banned_token_ids": np.zeros([0], np.int32), "bias_token_ids": np.zeros([0], np.int32),
    "bias_values": np.zeros([0], np.float32), "stop_strings": np.zeros([0], object)}
times, lengths = [], []
for _ in range(1 + request["repeats"]):
    start = time.perf_counter()
    text = run(request["signature"], feeds)["completions"][0]
    times.append(time.perf_counter() - start)
    lengths.append(len(text.decode("utf-8")))
print(json.dumps({"load": loaded, "replay": replay_seconds, "records": replayed,
                  "times": times, "lengths": lengths}))
"""

# Appended to `SERVER_LIKE_PROLOGUE`: 8 prompts, concurrently at batch 1 or as one batch.
BATCHING = r"""
import threading, time
request = json.load(sys.stdin)
run = load(sys.argv[1])
replay_warmup(sys.argv[1], run)
prompts = [p.encode("utf-8") for p in request["prompts"]]
walls, latencies, characters = [], [], 0
for _ in range(request["repeats"]):
    if request["mode"] == "batched":
        start = time.perf_counter()
        texts = run("serving_default", {"prompts": np.array(prompts, object)})["completions"]
        walls.append(time.perf_counter() - start)
        latencies += [walls[-1]] * len(prompts)
        characters += sum(len(t.decode("utf-8")) for t in texts)
        continue
    barrier = threading.Barrier(len(prompts) + 1)
    results = [None] * len(prompts)

    def client(index):
        barrier.wait()
        begin = time.perf_counter()
        text = run("serving_default", {"prompts": np.array([prompts[index]], object)})
        results[index] = (time.perf_counter() - begin, len(text["completions"][0].decode("utf-8")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    walls.append(time.perf_counter() - start)
    latencies += [latency for latency, _ in results]
    characters += sum(length for _, length in results)
print(json.dumps({"walls": walls, "latencies": latencies, "characters": characters}))
"""


def trained_export(directory, steps):
    """The `shakespeare-char` preset after `steps` Adam steps, exported under `directory`;
    returns (version directory, the 8 prompts, a prompt of `context_length - 1` characters)."""
    keras.utils.set_random_seed(0)
    with open(default_corpus(), encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.train(text)
    model = GPT.from_preset("shakespeare-char", vocab_size=tokenizer.vocab_size)
    model.build()
    if steps:
        context = model.config.context_length
        ids = tokenizer.tokenize(text[:200_000]).numpy()
        starts = np.random.default_rng(0).integers(0, len(ids) - context - 1, steps * 16)
        windows = np.stack([ids[s: s + context + 1] for s in starts])  # [N, T + 1]
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(windows[:, :-1], windows[:, 1:], batch_size=16, epochs=1, verbose=0)
    lines = [line for line in text.splitlines() if len(line) >= PROMPT_CHARS]
    return export_model(model, tokenizer, directory), [
        line[:PROMPT_CHARS] for line in lines[:CONCURRENCY]], text[:model.config.context_length - 1]


def alternate(index, items):
    return items if index % 2 == 0 else items[::-1]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q / 100 * len(ordered))) - 1))]


def load_average():
    return f"{os.getloadavg()[0]:.2f}"


def first_request_rounds(version_dir, cases, prompts, args, part):
    """Part 1 (or 4): one fresh process per (signature, replay) case per round."""
    results = {case: [] for case in cases}
    for index in range(args.rounds):
        for signature, replay in alternate(index, cases):
            results[signature, replay].append(run_like_tf_serving([version_dir], FIRST_REQUEST, {
                "signature": signature, "replay": replay, "prompts": prompts,
                "new_tokens": args.new_tokens, "repeats": args.repeats}))
        print(f"{part} round {index + 1}: load average {load_average()}", flush=True)
    print(f"\n| signature, batch {len(prompts)} | warm-up replay | load s | replay s (records) | "
          "first request ms | steady state ms | first / steady | characters |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (signature, replay), runs in results.items():
        first = statistics.median(r["times"][0] for r in runs)
        steady = statistics.median(statistics.median(r["times"][1:]) for r in runs)
        print(f"| `{signature}` | {replay} | "
              f"{statistics.median(r['load'] for r in runs):.2f} | "
              f"{statistics.median(r['replay'] for r in runs):.2f} ({runs[0]['records']}) | "
              f"{1000 * first:.1f} | {1000 * steady:.1f} | {first / steady:.2f} | "
              f"{statistics.median(r['lengths'][0] for r in runs)} |")


def batching_rounds(version_dir, prompts, args):
    modes = ["concurrent", "batched"]
    results = {mode: [] for mode in modes}
    for index in range(args.rounds):
        loads = []
        for mode in alternate(index, modes):
            loads.append(f"{mode} {load_average()}")
            results[mode].append(run_like_tf_serving([version_dir], BATCHING, {
                "mode": mode, "prompts": prompts, "repeats": args.repeats}))
        rates = [CONCURRENCY * args.repeats / sum(results[mode][-1]["walls"]) for mode in modes]
        print(f"batching round {index + 1}: load average before {', '.join(loads)}; "
              + ", ".join(f"{mode} {rate:.2f} req/s" for mode, rate in zip(modes, rates)),
              flush=True)
    print(f"\n| {CONCURRENCY} prompts, `serving_default` | requests/s | characters/s | "
          "characters per request | p50 latency ms | max latency ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, runs in results.items():
        wall = sum(sum(r["walls"]) for r in runs)
        requests = CONCURRENCY * args.repeats * len(runs)
        latencies = [latency for r in runs for latency in r["latencies"]]
        characters = sum(r["characters"] for r in runs)
        name = (f"{CONCURRENCY} concurrent batch-1 requests" if mode == "concurrent"
                else f"one batch-{CONCURRENCY} request")
        print(f"| {name} | {requests / wall:.2f} | {characters / wall:.0f} | "
              f"{characters / requests:.0f} | {1000 * percentile(latencies, 50):.0f} | "
              f"{1000 * max(latencies):.0f} |")


def without_generate_warmup(version_dir, base_dir):
    """A copy of the version as `base_dir/1` whose warm-up file lacks the `generate` records."""
    shutil.copytree(version_dir, os.path.join(base_dir, "1"))
    path = os.path.join(base_dir, "1", "assets.extra", WARMUP_FILE)
    records = [record for record in tf.data.TFRecordDataset(path).as_numpy_iterator()
               if prediction_log_pb2.PredictionLog.FromString(record)
               .predict_log.request.model_spec.signature_name != "generate"]
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def batching_parameters(directory, threads, timeout_micros):
    """export/batching_parameters.txt with `num_batch_threads` and `batch_timeout_micros` set,
    written to `directory`; returns its path."""
    text = (ROOT / "export" / "batching_parameters.txt").read_text()
    values = {"num_batch_threads": threads, "batch_timeout_micros": timeout_micros}
    lines = [next((f"{name} {{ value: {value} }}" for name, value in values.items()
                   if line.startswith(name)), line) for line in text.splitlines()]
    path = os.path.join(directory, f"batching_parameters_{threads}_{timeout_micros}.txt")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def start_server(base_dir, parameters_file):
    """`gpt-keras serve` on a free port, batching with `parameters_file` (None: no batching);
    returns (process, URL)."""
    options = (["--enable-batching", "--batching-parameters-file", parameters_file]
               if parameters_file else [])
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt_keras.cli", "serve", base_dir, "--port", "0", "--quiet",
         "--poll-seconds", "0", "--model-name", "m", *options],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "Serving m (version 1) from DIR at URL"
    if " at http" not in line:
        process.kill()
        raise RuntimeError(f"The server did not start: {line!r}")
    return process, line.rsplit(" at ", 1)[1].strip() + ":predict"


def closed_loop(url, prompts, repeats):
    """Each prompt's client sends it once untimed, then `repeats` times; returns (wall seconds of
    the timed part, [latency seconds], characters generated)."""
    def post(prompt):
        body = json.dumps({"instances": [prompt]}).encode()
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=600) as answer:
            text = json.loads(answer.read())["predictions"][0]
        return time.perf_counter() - start, len(text)

    def client(prompt):
        return [post(prompt) for _ in range(repeats)]

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(post, prompts))
        start = time.perf_counter()
        results = [result for results in pool.map(client, prompts) for result in results]
        wall = time.perf_counter() - start
    return wall, [latency for latency, _ in results], sum(length for _, length in results)


def http_rounds(version_dir, prompts, args, directory):
    base_dir = os.path.join(directory, "http", "m")
    without_generate_warmup(version_dir, base_dir)
    files = {"no batching": None}
    if not args.batching:
        files["batching"] = str(ROOT / "export" / "batching_parameters.txt")
    for threads, timeout in args.batching:
        files[f"batching, {threads} batch threads, timeout {timeout / 1000:g} ms"] = (
            batching_parameters(directory, threads, timeout))
    modes = list(files)
    results = {mode: [] for mode in modes}
    for index in range(args.rounds):
        loads = []
        for mode in alternate(index, modes):
            process, url = start_server(base_dir, files[mode])
            try:
                loads.append(f"{mode} {load_average()}")
                results[mode].append(closed_loop(url, prompts, args.repeats))
            finally:
                process.terminate()
                process.wait()
        print(f"http round {index + 1}: load average before {', '.join(loads)}; "
              + ", ".join(f"{mode} {len(results[mode][-1][1]) / results[mode][-1][0]:.2f} req/s"
                          for mode in modes), flush=True)
    print(f"\n| `gpt-keras serve`, {CONCURRENCY} closed-loop clients, `serving_default` | "
          "requests/s | characters/s | characters per request | p50 latency ms | "
          "p99 latency ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, runs in results.items():
        wall = sum(w for w, _, _ in runs)
        latencies = [latency for _, run_latencies, _ in runs for latency in run_latencies]
        characters = sum(c for _, _, c in runs)
        print(f"| {mode} | {len(latencies) / wall:.2f} | {characters / wall:.0f} | "
              f"{characters / len(latencies):.0f} | {1000 * percentile(latencies, 50):.0f} | "
              f"{1000 * percentile(latencies, 99):.0f} |")


def batching_variants(text):
    """"2:2000,1:50000" -> [(2, 2000), (1, 50000)]; `argparse` reports a `ValueError`."""
    variants = []
    for item in text.split(","):
        threads, _, timeout = item.partition(":")
        if not (threads.isdigit() and timeout.isdigit() and int(threads) >= 1):
            raise ValueError(f"{item!r} is not THREADS:TIMEOUT_MICROS, e.g. 2:50000")
        variants.append((int(threads), int(timeout)))
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--batching", default=[], type=batching_variants, help="HTTP part: one batching server "
        "per THREADS:TIMEOUT_MICROS, comma-separated (default: export/batching_parameters.txt as "
        "is)")
    parser.add_argument("--part", choices=["warmup", "batching", "http", "buckets", "all"],
                        default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        version_dir, prompts, long_prompt = trained_export(os.path.join(directory, "models"),
                                                           args.train_steps)
        print(f"trained {args.train_steps} steps and exported in "
              f"{time.perf_counter() - start:.0f} s; load average {load_average()}; "
              f"{os.cpu_count()} cores", flush=True)
        if args.part in ("warmup", "all"):
            first_request_rounds(version_dir, [
                (signature, replay) for signature in ("serving_default", "generate")
                for replay in ("none", "all")], prompts[:1], args, "warm-up")
        if args.part in ("batching", "all"):
            batching_rounds(version_dir, prompts, args)
        if args.part in ("http", "all"):
            http_rounds(version_dir, prompts, args, directory)
        if args.part in ("buckets", "all"):
            first_request_rounds(version_dir, [("generate", replay) for replay in (
                "none", "one per signature", "all")], [long_prompt] * CONCURRENCY, args,
                "buckets")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
