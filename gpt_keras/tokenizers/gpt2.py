"""`GPT2Tokenizer`: OpenAI GPT-2's byte-level BPE vocabulary, applied in the TF graph."""

import json
import os
import types

import tensorflow as tf

from gpt_keras.tokenizers import _bpe, _common

# GPT-2's pre-tokenization regex, as Hugging Face's tokenizers run it (Oniguruma):
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# written for RE2 (TensorFlow's regex engine). Three differences are handled here:
# 1. `\s` is Oniguruma's Unicode White_Space (25 characters; no \x1c-\x1f), spelled out.
# 2. TensorFlow's RE2 tables predate Unicode 16; the letters and digits Unicode 16 added (which
#    Oniguruma knows) are listed explicitly. Checked against Hugging Face on every code point.
# 3. RE2 has no lookahead: `\s+(?!\S)` is emulated by `_LOOKAHEAD` (see `_tokenize_batch`).
_WHITESPACE = (
    r"\t\n\v\f\r \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
)
_UNICODE_16_LETTERS = (
    r"\x{1c89}-\x{1c8a}\x{a7cb}-\x{a7cd}\x{a7da}-\x{a7dc}\x{105c0}-\x{105f3}\x{10d4a}-\x{10d65}"
    r"\x{10d6f}-\x{10d85}\x{10ec2}-\x{10ec4}\x{11380}-\x{11389}\x{1138b}\x{1138e}"
    r"\x{11390}-\x{113b5}\x{113b7}\x{113d1}\x{113d3}\x{11bc0}-\x{11be0}\x{13460}-\x{143fa}"
    r"\x{16100}-\x{1611d}\x{16d40}-\x{16d6c}\x{18cff}\x{1e5d0}-\x{1e5ed}\x{1e5f0}"
    r"\x{2ebf0}-\x{2ee5d}"
)
_UNICODE_16_DIGITS = (
    r"\x{10d40}-\x{10d49}\x{116d0}-\x{116e3}\x{11bf0}-\x{11bf9}\x{16130}-\x{16139}"
    r"\x{16d70}-\x{16d79}\x{1ccf0}-\x{1ccf9}\x{1e5f1}-\x{1e5fa}"
)
_LETTER = rf"\p{{L}}{_UNICODE_16_LETTERS}"
_DIGIT = rf"\p{{N}}{_UNICODE_16_DIGITS}"
PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d"
    rf"| ?[{_LETTER}]+| ?[{_DIGIT}]+| ?[^{_WHITESPACE}{_LETTER}{_DIGIT}]+"
    rf"|[{_WHITESPACE}]+"
)
# A whitespace run of two or more characters followed by a non-space: `\s+(?!\S)` stops one short
# of the non-space, and the run's last character starts the next word (" x" if it is a space).
# Matches never overlap, so one global replace marks every such run.
_LOOKAHEAD = rf"([{_WHITESPACE}])([{_WHITESPACE}][^{_WHITESPACE}])"

_MARK = b"\xff"  # never occurs in valid UTF-8


def bytes_to_unicode():
    """GPT-2's reversible byte → character map (OpenAI's `encoder.py`): printable Latin-1 bytes
    map to themselves, the other 68 bytes to U+0100.. in order, so every token is printable."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class GPT2Tokenizer(_common.Tokenizer):
    """OpenAI GPT-2's byte-level BPE tokenizer, on core TensorFlow ops (no TF Text).

    Reads GPT-2's `encoder.json` (Hugging Face: `vocab.json`) and `vocab.bpe` (`merges.txt`) and
    gives the ids of Hugging Face's `GPT2TokenizerFast` (checked on Tiny Shakespeare and on
    Unicode, whitespace and contraction edge cases): the text is split into words with GPT-2's
    regex (RE2 here, see `PATTERN`), each word's UTF-8 bytes become GPT-2's byte tokens, and merges
    are applied lowest rank first (`_bpe.apply_merges`). Only core TensorFlow ops are used, so
    `tokenize` runs in `tf.data` and in SavedModels served by a stock TF Serving.

    `<|endoftext|>` (`end_of_text_id`, 50256 for GPT-2): with `special_tokens_in_text=True` (the
    default, as Hugging Face's tokenizers) the literal string `<|endoftext|>` in the text becomes
    that one id, and the text on each side is tokenized separately; with `False` it is read as
    ordinary text (`<`, `|`, `endo`, ... as OpenAI's `encoder.py` does), so no input text can
    produce the id. `detokenize` writes `<|endoftext|>` for the id either way.

    `tokenize`: scalar string → int32 `[n]`, `[B]` strings → int32 ragged `[B, None]`.
    `detokenize`: the inverse (`[n]` → scalar, `[B, T]`/ragged `[B, None]` → `[B]`), exact for any
    valid UTF-8 text; invalid input bytes become U+FFFD first, and byte sequences cut between
    tokens or ids outside `[0, vocab_size)` decode to U+FFFD.

    Args:
        vocabulary: `{token string: id}`, or the path of `encoder.json`/`vocab.json`.
        merges: merges in rank order, as `"left right"` strings or `(left, right)` pairs, or the
            path of `vocab.bpe`/`merges.txt` (a `#version` first line is skipped).
        special_tokens_in_text: whether `<|endoftext|>` in the text maps to `end_of_text_id`.
        name: `tf.Module` name.
    """

    kind = "gpt2"

    def __init__(self, vocabulary, merges, special_tokens_in_text=True, name=None):
        super().__init__(name=name)
        # A read-only view: tf.Module would otherwise wrap the 50k-entry dict for tracking.
        self._vocabulary = types.MappingProxyType(
            _checked_vocabulary(_read_vocabulary(vocabulary))
        )
        self._merges = _checked_merges(_read_merges(merges), self._vocabulary)
        if not isinstance(special_tokens_in_text, bool):
            raise ValueError(
                "`special_tokens_in_text` must be True or False. "
                f"Received: special_tokens_in_text={special_tokens_in_text!r}"
            )
        self.special_tokens_in_text = special_tokens_in_text
        vocabulary = self._vocabulary
        self.vocab_size = max(vocabulary.values()) + 1
        self.end_of_text_id = vocabulary[_common.END_OF_TEXT]

        byte_chars = bytes_to_unicode()
        char_bytes = {char: byte for byte, char in byte_chars.items()}
        token_bytes = [_common.REPLACEMENT_CHARACTER.encode()] * (self.vocab_size + 1)
        for token, index in vocabulary.items():
            token_bytes[index] = bytes(char_bytes[char] for char in token)
        # [V + 1]: the bytes of each id, then U+FFFD for ids outside [0, V) (and unused ids).
        self._token_strings = tf.constant(token_bytes)
        # [256]: the id of each byte's one-byte token.
        self._byte_ids = tf.constant([vocabulary[byte_chars[b]] for b in range(256)], tf.int32)
        keys = [-1]  # a lookup table cannot be empty; -1 is never a pair
        merged_ids = []
        for left, right in self._merges:
            keys.append(vocabulary[left] * self.vocab_size + vocabulary[right])
            merged_ids.append(vocabulary[left + right])
        self._ranks = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.int64),
                tf.constant([_bpe.NO_MERGE] + list(range(len(self._merges))), tf.int32),
            ),
            default_value=_bpe.NO_MERGE,
        )  # pair key left * V + right → merge rank
        self._merged_ids = tf.constant(merged_ids, tf.int32)  # [M]: rank → id of the merged token

    @classmethod
    def from_directory(cls, directory, **kwargs):
        """The tokenizer of a directory holding `encoder.json` + `vocab.bpe` (OpenAI's names) or
        `vocab.json` + `merges.txt` (Hugging Face's), e.g. a Hugging Face GPT-2 checkpoint."""
        for names in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            vocabulary, merges = (os.path.join(directory, name) for name in names)
            if os.path.exists(vocabulary) and os.path.exists(merges):
                return cls(vocabulary, merges, **kwargs)
        raise ValueError(
            f"{directory} holds neither encoder.json + vocab.bpe nor vocab.json + merges.txt."
        )

    @property
    def vocabulary(self):
        """`{token string: id}` in GPT-2's byte-to-character spelling (" the" is "Ġthe")."""
        return dict(self._vocabulary)

    @property
    def merges(self):
        """The `(left, right)` token-string pairs in rank order."""
        return self._merges

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def _tokenize_batch(self, strings):
        strings = tf.strings.unicode_transcode(strings, "UTF-8", "UTF-8", errors="replace")
        if self.special_tokens_in_text:
            # Hugging Face cuts the text at special tokens first and pre-tokenizes each segment
            # on its own (a segment's end is an end of text for the regex).
            segments = tf.strings.split(strings, sep=_common.END_OF_TEXT)  # [B, G]
        else:
            segments = tf.RaggedTensor.from_tensor(tf.expand_dims(strings, 1))  # [B, 1]
        # `\s+(?!\S)`: cut before the last character of each whitespace run that is followed by
        # a non-space. Each piece then splits with the lookahead-free `PATTERN` as GPT-2's
        # regex splits it: runs that end a piece are taken whole, as `\s+(?!\S)` takes them.
        marked = tf.strings.regex_replace(segments.flat_values, _LOOKAHEAD, b"\\1" + _MARK + b"\\2")
        pieces = tf.strings.split(marked, _MARK)  # [G, P]
        marked = tf.strings.regex_replace(pieces.flat_values, PATTERN, _MARK + b"\\0")
        words = tf.strings.split(marked, _MARK)[:, 1:]  # [P, W]; drop the "" before the first
        unique_words, word_index = tf.unique(words.flat_values)  # BPE each distinct word once
        byte_tokens = tf.gather(self._byte_ids, _bpe.string_bytes(unique_words))  # [U, None]
        tokens = _bpe.apply_merges(byte_tokens, self._ranks, self._merged_ids, self.vocab_size)
        tokens = tf.gather(tokens, word_index)  # [W total, None]
        tokens = tf.RaggedTensor.from_row_splits(tokens, words.row_splits).merge_dims(1, 2)
        tokens = tf.RaggedTensor.from_row_splits(tokens, pieces.row_splits).merge_dims(1, 2)
        if not self.special_tokens_in_text:
            return tokens  # one segment per string
        # [G, None] per segment → append end_of_text_id to each → [B, None] → drop each row's last.
        end_of_text = tf.fill([tokens.nrows(), 1], tf.constant(self.end_of_text_id, tf.int32))
        tokens = tf.concat([tokens, tf.RaggedTensor.from_tensor(end_of_text)], axis=1)
        tokens = tf.RaggedTensor.from_row_splits(tokens, segments.row_splits).merge_dims(1, 2)
        values, limits = tokens.flat_values, tokens.row_limits()
        keep = tf.tensor_scatter_nd_update(
            tf.ones_like(values, tf.bool), tf.expand_dims(limits - 1, 1),
            tf.zeros_like(limits, tf.bool),
        )
        return tf.RaggedTensor.from_row_lengths(
            tf.boolean_mask(values, keep), tokens.row_lengths() - 1
        )

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int32, 1, tf.int64)])
    def _detokenize_batch(self, ids):
        text = _common.join_tokens(self._token_strings, ids)
        return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")

    def _payload(self):
        return {
            "vocabulary": dict(self._vocabulary),
            "merges": [f"{left} {right}" for left, right in self._merges],
            "special_tokens_in_text": self.special_tokens_in_text,
        }

    @classmethod
    def _from_payload(cls, payload, path):
        try:
            return cls(
                payload["vocabulary"], payload["merges"], payload["special_tokens_in_text"]
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path} holds an invalid GPT-2 vocabulary ({error}). Re-create it with "
                "`GPT2Tokenizer(vocabulary_path, merges_path).save(directory)`."
            ) from None


def _read_vocabulary(vocabulary):
    if isinstance(vocabulary, (str, os.PathLike)):
        try:
            with open(vocabulary, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read the GPT-2 vocabulary {vocabulary}: {error}") from None
    return vocabulary


def _read_merges(merges):
    if isinstance(merges, (str, os.PathLike)):
        try:
            with open(merges, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"Cannot read the GPT-2 merges {merges}: {error}") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        return [line for line in lines if line]
    return merges


def _checked_vocabulary(vocabulary):
    """`vocabulary` as a `{str: int}` dict with distinct non-negative ids, every byte token and
    `<|endoftext|>`, and only tokens spelled with GPT-2's byte characters."""
    if not isinstance(vocabulary, dict) or not vocabulary:
        raise ValueError(
            "`vocabulary` must be a non-empty {token: id} dict or the path of encoder.json / "
            f"vocab.json. Received: {type(vocabulary).__name__}"
        )
    byte_chars = set(bytes_to_unicode().values())
    checked = {}
    for token, index in vocabulary.items():
        if (
            not isinstance(token, str) or not token
            or not isinstance(index, int) or isinstance(index, bool) or index < 0
        ):
            raise ValueError(f"Invalid vocabulary entry {token!r}: {index!r}.")
        if not set(token) <= byte_chars:
            raise ValueError(
                f"Vocabulary token {token!r} has characters outside GPT-2's byte alphabet; it is "
                "not a byte-level BPE vocabulary."
            )
        checked[token] = index
    if len(set(checked.values())) != len(checked):
        raise ValueError("The vocabulary gives the same id to more than one token.")
    missing = [char for char in sorted(byte_chars) if char not in checked]
    if missing:
        raise ValueError(f"The vocabulary lacks the byte tokens {missing[:8]!r}.")
    if _common.END_OF_TEXT not in checked:
        raise ValueError(f"The vocabulary lacks {_common.END_OF_TEXT!r}.")
    return checked


def _checked_merges(merges, vocabulary):
    """`merges` as a tuple of `(left, right)` strings whose parts and result are all tokens."""
    checked = []
    for rank, merge in enumerate(merges):
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2 or not all(isinstance(part, str) for part in pair):
            raise ValueError(f"merge {rank} must be 'left right'. Received: {merge!r}.")
        unknown = [token for token in (*pair, pair[0] + pair[1]) if token not in vocabulary]
        if unknown:
            raise ValueError(
                f"merge {rank} ({merge!r}) uses tokens missing from the vocabulary: {unknown!r}. "
                "The merges file does not belong to this vocabulary."
            )
        checked.append(pair)
    if len(set(checked)) != len(checked):
        raise ValueError("`merges` lists a pair more than once; each pair may merge only once.")
    return tuple(checked)
