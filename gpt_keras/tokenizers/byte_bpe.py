"""`ByteLevelBPETokenizer`: GPT-2-style byte-level BPE, trained here, applied in the TF graph."""

import numbers
import warnings

import regex
import tensorflow as tf

from gpt_keras.tokenizers import _bpe, _common


class ByteLevelBPETokenizer(_common.Tokenizer):
    """Byte-level byte-pair encoding (GPT-2's scheme) with a vocabulary learned by `train`.

    Ids: `0 .. 255` are the bytes of the UTF-8 text, `256 + r` is the token made by merge `r`, and
    `end_of_text_id = 256 + len(merges)` is `<|endoftext|>`; `vocab_size = 257 + len(merges)`.
    Every byte has a token, so `detokenize(tokenize(text)) == text` for any valid UTF-8 text
    (invalid input bytes become U+FFFD first). `<|endoftext|>` in input text is read as bytes.

    Tokenizing splits the text into words with `pattern` (RE2 in the graph, Python's `regex` when
    training: the same rule, see `_bpe.PATTERN`), then merges each word's bytes by merge rank.
    Only core TensorFlow ops are used, so the functions load in a stock TF Serving.

    `tokenize`: scalar string → int32 `[n]`, `[B]` strings → int32 ragged `[B, None]`.
    `detokenize`: the inverse (`[n]` → scalar, `[B, T]`/ragged `[B, None]` → `[B]`); byte
    sequences that are not valid UTF-8 (a character cut between tokens) decode to U+FFFD.

    Args:
        merges: sequence of `(left, right)` id pairs in rank order; merge `r` may use ids below
            `256 + r`.
        pattern: the word-splitting regex; it must mean the same in RE2 and Python's `regex` and
            match every character.
        name: `tf.Module` name.
    """

    kind = "byte_level_bpe"

    def __init__(self, merges, pattern=_bpe.PATTERN, name=None):
        super().__init__(name=name)
        self._merges = _checked_merges(merges)
        self._pattern = _checked_pattern(pattern)
        num_merges = len(self._merges)
        self.end_of_text_id = 256 + num_merges
        self.vocab_size = 257 + num_merges
        token_bytes = [bytes([byte]) for byte in range(256)]
        for left, right in self._merges:
            token_bytes.append(token_bytes[left] + token_bytes[right])
        self._token_strings = tf.constant(
            token_bytes
            + [_common.END_OF_TEXT.encode(), _common.REPLACEMENT_CHARACTER.encode()]
        )  # [vocab_size + 1]: id → bytes, then the bytes for out-of-range ids
        # Key -1 is never a pair; it is there because a lookup table cannot be empty (no merges).
        keys = [-1] + [left * self.vocab_size + right for left, right in self._merges]
        self._ranks = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.int64),
                tf.constant([_bpe.NO_MERGE] + list(range(num_merges)), tf.int32),
            ),
            default_value=_bpe.NO_MERGE,
        )  # pair key → merge rank
        self._merged_ids = tf.range(256, 256 + num_merges, dtype=tf.int32)  # rank → new id

    @property
    def merges(self):
        """The `(left, right)` id pairs in rank order; merge `r` makes id `256 + r`."""
        return self._merges

    @property
    def pattern(self):
        """The word-splitting regex."""
        return self._pattern

    @classmethod
    def train(cls, texts, vocab_size, name=None):
        """Learns `vocab_size - 257` merges from `texts`: a `str` or an iterable of `str` chunks
        (e.g. an open text file) read as one text, one chunk at a time. Fewer merges (with a
        warning) when the corpus runs out of pairs that occur at least twice."""
        if not isinstance(vocab_size, numbers.Integral) or vocab_size < 257:
            raise ValueError(
                "`vocab_size` must be an int of at least 257 (256 byte tokens + "
                f"`<|endoftext|>`), e.g. 1024 or 4096. Received: vocab_size={vocab_size!r}."
            )
        word_counts = _bpe.count_words(_common.text_chunks(texts), _bpe.PATTERN)
        if not word_counts:
            raise _common.empty_corpus_error(cls)
        merges = _bpe.train_merges(word_counts, vocab_size - 257)
        if len(merges) < vocab_size - 257:
            warnings.warn(
                f"The corpus supports only {len(merges)} merges (no pair occurs twice after "
                f"that): vocab_size is {257 + len(merges)}, not {vocab_size}. Train on more text "
                "for a larger vocabulary.",
                stacklevel=2,
            )
        return cls(merges, name=name)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def _tokenize_batch(self, strings):
        words = _bpe.split_words(strings, self._pattern)  # [B, None] strings
        unique_words, word_index = tf.unique(words.flat_values)  # BPE each distinct word once
        tokens = _bpe.apply_merges(
            _bpe.string_bytes(unique_words), self._ranks, self._merged_ids, self.vocab_size
        )  # [U, None]: the bytes of each distinct word are its base token ids
        tokens = tf.gather(tokens, word_index)  # [W, None], W words in the batch
        return tf.RaggedTensor.from_row_splits(tokens, words.row_splits).merge_dims(1, 2)

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int32, 1, tf.int64)])
    def _detokenize_batch(self, ids):
        text = _common.join_tokens(self._token_strings, ids)
        return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")

    def _payload(self):
        return {"merges": [list(pair) for pair in self._merges], "pattern": self._pattern}

    @classmethod
    def _from_payload(cls, payload, path):
        try:
            return cls(payload["merges"], payload["pattern"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path} holds an invalid byte-level BPE vocabulary ({error}). Re-create it with "
                "`ByteLevelBPETokenizer.train(text, vocab_size).save(directory)`."
            ) from None


def _checked_merges(merges):
    """`merges` as a tuple of int pairs, each using only ids that exist before it."""
    checked = []
    for rank, pair in enumerate(merges):
        valid = (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(i, numbers.Integral) and 0 <= i < 256 + rank for i in pair)
        )
        if not valid:
            raise ValueError(
                f"merge {rank} must be a pair of ids below {256 + rank}. Received: {pair!r}."
            )
        checked.append((int(pair[0]), int(pair[1])))
    if len(set(checked)) != len(checked):
        raise ValueError("`merges` lists a pair more than once; each pair may merge only once.")
    return tuple(checked)


def _checked_pattern(pattern):
    """`pattern` after checking that both Python's `regex` and RE2 compile it."""
    try:
        regex.compile(pattern)
        tf.strings.regex_full_match("", pattern)
    except (TypeError, regex.error, tf.errors.InvalidArgumentError) as error:
        raise ValueError(
            f"`pattern` must be a regex valid in Python's `regex` and in RE2 ({error})."
        ) from None
    return pattern
