"""Per-token generation latency of the three ways to run a trained model: the exported SavedModel's
`generate` as TF Serving runs it (XLA disabled), in-Python `gpt_keras` generation (XLA), and the
TFLite `generate` signature in the LiteRT interpreter.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/export_latency.py

Options: `--rounds 9`, `--new-tokens 48`. Under a minute on a 2-core CPU (mostly the exports and
their verification).

Setting: the `shakespeare-char` preset (4 layers, 4 heads, 128 dims, context 64) with random
weights and a `CharTokenizer` over Tiny Shakespeare (67 ids), batch 1, greedy, a 16-character
prompt (a line of Tiny Shakespeare whose greedy continuation does not stop at end-of-text, so
every engine does the same work; the three produce the same text). Each engine is called with
text in and text out, making 1 new token and `--new-tokens` new tokens in alternation; per-token
latency = (t_N - t_1) / (N - 1), the medians over `--rounds` rounds, in wall-clock time and in the
process's CPU time (which other processes' load inflates less). The SavedModel runs in a fresh
process that cannot import Keras or gpt_keras, with `tensorflow::DisableXlaCompilation()` called
and the TF1 Session loader (`gpt_keras.serving.run_like_tf_serving`); the other two run in this
process, rounds alternating between them.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Import the checkout's gpt_keras (the package need not be installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

from gpt_keras import GPT  # noqa: E402
from gpt_keras.cli import default_corpus  # noqa: E402
from gpt_keras.generation import TextGenerator  # noqa: E402
from gpt_keras.serving import export_saved_model, run_like_tf_serving  # noqa: E402
from gpt_keras.tflite import TFLiteGenerator, export_tflite  # noqa: E402
from gpt_keras.tokenizers import CharTokenizer  # noqa: E402
from gpt_keras.training import create_run  # noqa: E402

PROMPT_CHARS = 16

# Times the exported `generate` in the server-like process (see gpt_keras.serving).
SAVED_MODEL_TIMING = r"""
import time
request = json.load(sys.stdin)
run = load(sys.argv[1])
prompts = np.array([request["prompt"].encode("utf-8")], object)

def call(count):
    return run("generate", {"prompts": prompts, "max_new_tokens": np.int32(count),
                            "temperature": np.float32(0), "top_k": np.int32(1),
                            "top_p": np.float32(1), "seed": np.int64(0)})

call(request["new_tokens"])  # warm-up
times = {clock: {1: [], request["new_tokens"]: []} for clock in ("wall", "cpu")}
for _ in range(request["rounds"]):
    for count in (1, request["new_tokens"]):
        wall, cpu = time.perf_counter(), time.process_time()
        text = call(count)["completions"][0].decode("utf-8")
        times["wall"][count].append(time.perf_counter() - wall)
        times["cpu"][count].append(time.process_time() - cpu)
print(json.dumps({"times": {clock: {str(k): v for k, v in t.items()}
                            for clock, t in times.items()}, "text": text}))
"""


def per_token(times, new_tokens):
    """(ms for 1 new token, ms per further token) from {count: [seconds]} medians."""
    first, full = statistics.median(times[1]), statistics.median(times[new_tokens])
    return 1000 * first, 1000 * (full - first) / (new_tokens - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    with open(default_corpus(), encoding="utf-8") as f:
        text = f.read()
    tokenizer = CharTokenizer.train(text)
    model = GPT.from_preset("shakespeare-char", vocab_size=tokenizer.vocab_size)
    model.build()
    python_engine = TextGenerator(model, tokenizer)

    def python_call(prompt, count):
        return python_engine.generate(prompt, count, temperature=0)

    prompt = next(
        line[:PROMPT_CHARS] for line in text.splitlines()
        if len(line) >= PROMPT_CHARS
        and len(tokenizer.tokenize(python_call(line[:PROMPT_CHARS], args.new_tokens)))
        == args.new_tokens
    )

    with tempfile.TemporaryDirectory() as directory:
        run_dir = os.path.join(directory, "run")
        create_run(run_dir, model, tokenizer, {"benchmark": "export_latency"})
        version_dir = export_saved_model(run_dir, os.path.join(directory, "models"))
        tflite_engine = TFLiteGenerator(export_tflite(run_dir, os.path.join(directory, "tflite")))

        def tflite_call(prompt, count):
            return tflite_engine.generate(prompt, count, temperature=0)

        engines = {"in-Python generation (XLA)": python_call, "TFLite (LiteRT)": tflite_call}
        expected = python_call(prompt, args.new_tokens)
        assert tflite_call(prompt, args.new_tokens) == expected, "TFLite text differs"
        times = {name: {"wall": {1: [], args.new_tokens: []}, "cpu": {1: [], args.new_tokens: []}}
                 for name in engines}
        for index in range(args.rounds):
            order = list(engines.items())
            for name, call in order if index % 2 == 0 else order[::-1]:
                for count in (1, args.new_tokens):
                    wall, cpu = time.perf_counter(), time.process_time()
                    call(prompt, count)
                    times[name]["wall"][count].append(time.perf_counter() - wall)
                    times[name]["cpu"][count].append(time.process_time() - cpu)
        served = run_like_tf_serving(
            [version_dir], SAVED_MODEL_TIMING,
            {"prompt": prompt, "new_tokens": args.new_tokens, "rounds": args.rounds},
        )
        assert served["text"] == expected, "the SavedModel's text differs"
        times["SavedModel `generate`, XLA disabled (as TF Serving)"] = {
            clock: {int(k): v for k, v in t.items()} for clock, t in served["times"].items()
        }

    print(f"\nBatch 1, greedy, {PROMPT_CHARS}-character prompt {prompt!r}, 1 and "
          f"{args.new_tokens} new tokens, medians of {args.rounds} rounds; load average "
          f"{os.getloadavg()[0]:.1f}.\n")
    print("| engine | 1 new token, wall ms | per further token, wall ms | per further token, "
          "CPU ms |")
    print("|---|---:|---:|---:|")
    for name, clocks in times.items():
        first, step = per_token(clocks["wall"], args.new_tokens)
        _, cpu_step = per_token(clocks["cpu"], args.new_tokens)
        print(f"| {name} | {first:.2f} | {step:.3f} | {cpu_step:.3f} |")


if __name__ == "__main__":
    main()
