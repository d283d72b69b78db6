"""In-graph tokenizers built from core TensorFlow ops: usable in `tf.data`, in `tf.function`s and in
SavedModels served by a stock TF Serving (no TF Text ops)."""

import os

import numpy as np

from gpt_keras.tokenizers import _common
from gpt_keras.tokenizers.byte_bpe import ByteLevelBPETokenizer
from gpt_keras.tokenizers.char import CharTokenizer
from gpt_keras.tokenizers.gpt2 import GPT2Tokenizer

_KINDS = {cls.kind: cls for cls in (CharTokenizer, ByteLevelBPETokenizer, GPT2Tokenizer)}


def raw_token_bytes(tokenizer, ids):
    """The bytes of each token id in `ids`, raw: from `tokenizer.token_bytes()` (gpt_keras'
    tokenizers, where a byte-level piece of a multi-byte character stays as it is), else from one
    `detokenize` call per id (any tokenizer with `detokenize(int [n]) -> bytes`). Ids beyond
    `token_bytes()` (a padded model vocabulary) have no bytes."""
    if hasattr(tokenizer, "token_bytes"):
        table = tokenizer.token_bytes()
        return [table[i] if i < len(table) else b"" for i in ids]
    texts = []
    for i in ids:
        text = tokenizer.detokenize(np.array([i], np.int32))
        texts.append(bytes(text.numpy() if hasattr(text, "numpy") else text))
    return texts


def load_tokenizer(directory):
    """The tokenizer saved in `directory`, whatever its kind."""
    path = os.path.join(directory, _common.FILE_NAME)
    kind = _common.read_payload(path, None).get("kind")
    if kind not in _KINDS:
        raise ValueError(
            f"{path} has unknown tokenizer kind {kind!r}; expected one of {sorted(_KINDS)}."
        )
    return _KINDS[kind].load(directory)


__all__ = ["ByteLevelBPETokenizer", "CharTokenizer", "GPT2Tokenizer", "load_tokenizer",
           "raw_token_bytes"]
