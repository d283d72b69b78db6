"""Writes a small question → answer set as JSON lines for supervised fine-tuning: sums of two
numbers, `{"prompt": "12+7=", "completion": "19"}`, every pair `a + b` with `0 <= a, b < N` once,
in an order fixed by `--seed`.

    python examples/make_qa_pairs.py --out sums.jsonl [--max-operand 30] [--seed 0]

`gpt-keras train --format prompt-completion --data sums.jsonl` holds out the last 10% of the
lines, so the held-out sums were never seen in training: exact match on them measures whether
the model learned to add, not to recall (the README's "Supervised fine-tuning" section has the
commands and the figures).
"""

import argparse
import json
import random


def sum_pairs(max_operand=30, seed=0):
    """Every `{"prompt": "a+b=", "completion": "a+b's value"}` with `0 <= a, b < max_operand`, in
    the order of a `random.Random(seed)` shuffle."""
    pairs = [{"prompt": f"{a}+{b}=", "completion": str(a + b)}
             for a in range(max_operand) for b in range(max_operand)]
    random.Random(seed).shuffle(pairs)
    return pairs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--max-operand", type=int, default=30,
                        help="operands run from 0 to this minus one (default 30: 900 pairs)")
    parser.add_argument("--seed", type=int, default=0, help="order of the lines (default 0)")
    args = parser.parse_args(argv)
    pairs = sum_pairs(args.max_operand, args.seed)
    write_jsonl(args.out, pairs)
    print(f"{len(pairs)} pairs written to {args.out}")


if __name__ == "__main__":
    main()
