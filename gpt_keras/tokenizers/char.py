"""`CharTokenizer`: one token per Unicode character, in-graph with core TensorFlow ops."""

import tensorflow as tf

from gpt_keras.tokenizers import _common


class CharTokenizer(_common.Tokenizer):
    """Character-level tokenizer (nanoGPT's `shakespeare_char` convention), in the TF graph.

    Ids: `0 .. C-1` are the corpus characters in the order of `chars` (sorted by code point when
    trained, so Tiny Shakespeare's 65 characters get nanoGPT's ids), then `end_of_text_id = C`
    (`<|endoftext|>`) and `unknown_id = C + 1`; `vocab_size = C + 2`. A character is one Unicode
    code point of the UTF-8 input (an emoji is one, a ZWJ emoji sequence or a letter with a
    combining mark several); invalid UTF-8 bytes and characters outside `chars` become
    `unknown_id`, which decodes to U+FFFD. `<|endoftext|>` in input text is read as characters.

    `tokenize`: scalar string → int32 `[n]`, `[B]` strings → int32 ragged `[B, None]`.
    `detokenize`: the inverse (`[n]` → scalar, `[B, T]`/ragged `[B, None]` → `[B]`), exact for
    text whose characters are all in `chars`.

    Args:
        chars: the vocabulary, a sequence of distinct one-code-point strings.
        name: `tf.Module` name.
    """

    kind = "char"

    def __init__(self, chars, name=None):
        super().__init__(name=name)
        chars = tuple(chars)
        problems = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if not chars or problems or len(set(chars)) != len(chars):
            raise ValueError(
                "`chars` must be a non-empty sequence of distinct one-character strings, e.g. "
                "`sorted(set(text))`. Received "
                + (f"invalid entries {problems[:5]!r}." if problems else
                   f"{len(chars)} entries, {len(set(chars))} distinct.")
            )
        self._chars = chars
        self.vocab_size = len(chars) + 2
        self.end_of_text_id = len(chars)
        self.unknown_id = len(chars) + 1
        self._ids = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant([ord(c) for c in chars], tf.int32),
                tf.range(len(chars), dtype=tf.int32),
            ),
            default_value=self.unknown_id,
        )  # code point → id
        self._token_strings = tf.constant(
            list(chars) + [_common.END_OF_TEXT] + 2 * [_common.REPLACEMENT_CHARACTER]
        )  # [vocab_size + 1]: id → string, then the string for out-of-range ids

    @property
    def chars(self):
        """The corpus characters; `chars[i]` has id `i`."""
        return self._chars

    @classmethod
    def train(cls, texts, name=None):
        """A tokenizer over the sorted set of characters of `texts`: a `str` or an iterable of `str`
        chunks (e.g. an open text file), read one chunk at a time."""
        chars = set()
        for chunk in _common.text_chunks(texts):
            chars.update(chunk)
        if not chars:
            raise _common.empty_corpus_error(cls)
        return cls(sorted(chars), name=name)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def _tokenize_batch(self, strings):
        code_points = tf.strings.unicode_decode(strings, "UTF-8")  # [B, None] int32
        return tf.ragged.map_flat_values(self._ids.lookup, code_points)

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int32, 1, tf.int64)])
    def _detokenize_batch(self, ids):
        return _common.join_tokens(self._token_strings, ids)

    def _payload(self):
        return {"chars": list(self._chars)}

    @classmethod
    def _from_payload(cls, payload, path):
        try:
            return cls(payload["chars"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path} holds an invalid character vocabulary ({error}). Re-create it with "
                "`CharTokenizer.train(text).save(directory)`."
            ) from None
