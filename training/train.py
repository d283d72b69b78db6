"""Train (or resume) a GPT on text files. The same as `gpt-keras train`:

    python training/train.py --data ../shared/data/tinyshakespeare.txt --run-dir runs/shakespeare

`python training/train.py -h` lists every option.
"""

import sys

from gpt_keras.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
