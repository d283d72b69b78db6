"""Convert a trained run's model to a TFLite file that runs in the plain LiteRT interpreter:

    python export/tflite.py runs/shakespeare runs/shakespeare/model.tflite

Signatures (builtin ops only, float32): `logits(token_ids [B, T])` and
`decode_step(token_ids [B, T], cache [B, L, 2, S, H, K], cache_index [])` — see
`gpt_keras.tflite`. Tokenization stays outside the file (the run's `tokenizer/`).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gpt_keras.checkpoints import atomic_write  # noqa: E402
from gpt_keras.tflite import convert_to_tflite  # noqa: E402
from gpt_keras.training import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("output", help="the .tflite file to write (atomically)")
    args = parser.parse_args()
    content = convert_to_tflite(load_model(args.run_dir))
    atomic_write(args.output, lambda f: f.write(content))
    print(f"{args.output}: {len(content):,} bytes")


if __name__ == "__main__":
    main()
