"""What reduced-precision weights cost in quality: validation loss of a trained run with float32,
bfloat16 and int8 weights (`gpt_keras.precision`), and how much greedy text they share.

Run from the repository root, on a trained run (e.g. `gpt-keras train --run-dir /tmp/wq_run
--max-steps 2000`, the `shakespeare-char` preset on Tiny Shakespeare):

    TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/weights_quality.py /tmp/wq_run

Validation loss: mean cross-entropy (nats/token, float64 log-softmax of each model's float32
logits) over the run's fixed validation batches (`data.validation_dataset` with the run's batch
size and seed: the batches training reports; `--batches`, default 50). Greedy text: 200 new
tokens after a 16-token prompt from the validation split; reported is the length of the prefix
each format shares with float32.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's gpt_keras
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from gpt_keras import data, generation  # noqa: E402
from gpt_keras.precision import with_weights  # noqa: E402
from gpt_keras.training import load_model, read_run_config  # noqa: E402
from tflite_quality import cross_entropy  # noqa: E402

PROMPT_LENGTH = 16
NEW_TOKENS = 200


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()

    settings = read_run_config(args.run_dir)["train"]
    base = load_model(args.run_dir)
    context = base.config.context_length
    token_file = data.TokenFile.load(os.path.join(args.run_dir, "data"))
    batches = [
        (np.asarray(inputs), np.asarray(targets))
        for inputs, targets in data.validation_dataset(
            token_file, context, settings["batch_size"], settings["seed"], args.batches
        )
    ]
    tokens = token_file.tokens()
    prompt = tokens[token_file.num_train : token_file.num_train + PROMPT_LENGTH].tolist()
    results = {}
    for weights in ("float32", "bfloat16", "int8"):
        model = with_weights(base, weights)
        loss = float(np.mean([
            cross_entropy(np.asarray(model(inputs), np.float32), targets)
            for inputs, targets in batches
        ]))
        text = generation.generate(model, prompt, NEW_TOKENS, temperature=0)
        results[weights] = (loss, text)
    print(f"run {args.run_dir}: {base.config}")
    print(f"validation: {args.batches} batches of {settings['batch_size']} x {context} tokens")
    print("| weights | val loss | vs float32 | greedy tokens shared with float32 |")
    print("|---|---:|---:|---:|")
    reference_loss, reference_text = results["float32"]
    for weights, (loss, text) in results.items():
        shared = next((i for i, (a, b) in enumerate(zip(text, reference_text)) if a != b),
                      len(text))
        print(f"| {weights} | {loss:.5f} | {loss / reference_loss - 1:+.3%} | "
              f"{shared}/{NEW_TOKENS} |")


if __name__ == "__main__":
    main()
