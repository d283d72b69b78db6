"""In-graph tokenizers built from core TensorFlow ops: usable in `tf.data`, in `tf.function`s and in
SavedModels served by a stock TF Serving (no TF Text ops)."""

import os

from gpt_keras.tokenizers import _common
from gpt_keras.tokenizers.byte_bpe import ByteLevelBPETokenizer
from gpt_keras.tokenizers.char import CharTokenizer
from gpt_keras.tokenizers.gpt2 import GPT2Tokenizer

_KINDS = {cls.kind: cls for cls in (CharTokenizer, ByteLevelBPETokenizer, GPT2Tokenizer)}


def load_tokenizer(directory):
    """The tokenizer saved in `directory`, whatever its kind."""
    path = os.path.join(directory, _common.FILE_NAME)
    kind = _common.read_payload(path, None).get("kind")
    if kind not in _KINDS:
        raise ValueError(
            f"{path} has unknown tokenizer kind {kind!r}; expected one of {sorted(_KINDS)}."
        )
    return _KINDS[kind].load(directory)


__all__ = ["ByteLevelBPETokenizer", "CharTokenizer", "GPT2Tokenizer", "load_tokenizer"]
