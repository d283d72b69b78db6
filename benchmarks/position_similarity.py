"""How distinct the positions of trained runs are: the position tables' neighbour similarity.

Run from the repository root, on run directories of `gpt-keras train`:

    python benchmarks/position_similarity.py RUN [RUN ...]

For each run with learned or sinusoidal positions, the `[T, D]` table of positions `0..T-1`
(`T` the context length) is read from the model's position layer. Printed per run: the share of
the table's energy in its mean row (the part every position shares), and the mean cosine between
the position-varying parts (rows minus the mean row) of positions `p` and `p + k`. Both are
scale-free, so the sinusoidal encoding's scale in `GPT._forward` does not change them.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gpt_keras  # noqa: E402,F401  (registers the layers)

OFFSETS = (1, 2, 3, 4, 8, 16, 32)


def position_table(model):
    """The `[T, D]` float64 table the model adds for positions `0..T-1` (up to its scale)."""
    length, dim = model.config.context_length, model.config.hidden_dim
    table = model.position_embedding(np.zeros((1, length, dim), "float32"), start_index=0)
    return np.asarray(keras.ops.convert_to_numpy(table), "float64")[0]


def similarity(table):
    """`(share of energy in the mean row, {k: mean cosine of varying parts p and p + k})`."""
    mean = table.mean(axis=0)
    varying = table - mean
    shared = len(table) * np.sum(mean**2) / np.sum(table**2)
    unit = varying / np.linalg.norm(varying, axis=1, keepdims=True)
    gram = unit @ unit.T
    return shared, {k: float(np.mean(np.diagonal(gram, offset=k))) for k in OFFSETS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (with model.keras)")
    args = parser.parse_args()
    print("| run | positions | mean-row share | " + " | ".join(f"cos(p, p+{k})" for k in OFFSETS) + " |")
    print("|---|---|---:|" + "---:|" * len(OFFSETS))
    for run in args.runs:
        model = keras.saving.load_model(Path(run) / "model.keras")
        if model.position_embedding is None:
            print(f"| {run} | rotary (no table) |" + " |" * (len(OFFSETS) + 1))
            continue
        shared, cosines = similarity(position_table(model))
        cells = " | ".join(f"{cosines[k]:.3f}" for k in OFFSETS)
        print(f"| {run} | {model.config.position_embedding} | {shared:.3f} | {cells} |")


if __name__ == "__main__":
    main()
