"""What both tokenizers share: the tokenize/detokenize input contract, vocabulary files, manifests.

Shapes: B strings in a batch, n tokens of one string. `tokenize` maps a scalar string to int32 `[n]`
and a `[B]` string tensor to an int32 `tf.RaggedTensor` `[B, None]`; `detokenize` inverts it.
"""

import hashlib
import json
import os
import tempfile

import tensorflow as tf

from gpt_keras import backends

FILE_NAME = "tokenizer.json"  # the one file `save(directory)` writes
FORMAT_VERSION = 1
END_OF_TEXT = "<|endoftext|>"  # GPT-2's document separator; never produced from input text
REPLACEMENT_CHARACTER = "\ufffd"  # what unknown characters and out-of-range ids decode to


def text_chunks(texts):
    """Yields the chunks of `texts`: a `str`, or an iterable of `str` chunks of one text."""
    if isinstance(texts, str):
        yield texts
        return
    for chunk in texts:
        if not isinstance(chunk, str):
            raise ValueError(
                "Tokenizer training expects `str` chunks (decode bytes with "
                f"`.decode('utf-8')` first). Received a chunk of type {type(chunk).__name__}."
            )
        yield chunk


def empty_corpus_error(cls):
    """The `ValueError` for training `cls` on no text."""
    return ValueError(
        f"Cannot train a {cls.__name__} on an empty corpus: the text (or every chunk of the "
        "iterator) was empty. Pass the training text as a `str` or an iterable of `str` chunks, "
        "e.g. `open(path, encoding='utf-8')`."
    )


def join_tokens(token_strings, ids):
    """Int32 ragged `[B, None]` ids → `[B]` strings: the concatenated `token_strings` of each row.

    `token_strings` is `[V + 1]`: the string of each id, then the one for ids outside `[0, V)`.
    """
    vocab_size = token_strings.shape[0] - 1
    flat = ids.flat_values
    flat = tf.where(tf.logical_and(flat >= 0, flat < vocab_size), flat, vocab_size)
    return tf.strings.reduce_join(tf.gather(token_strings, ids.with_flat_values(flat)), axis=-1)


class Tokenizer(tf.Module):
    """Base of the in-graph tokenizers. Subclasses define `kind`, `vocab_size`, `end_of_text_id`,
    `_payload()` (the JSON-able vocabulary), `_from_payload(payload, path)`, and the two batch
    functions `_tokenize_batch` (`[B]` string → int32 ragged `[B, None]`) and `_detokenize_batch`
    (the inverse), both `tf.function`s with an input signature so that eager calls trace once.

    Being a `tf.Module`, a tokenizer held by another `tf.Module` is tracked with its lookup tables,
    so functions that call it are exported by `tf.saved_model.save`.

    In `tf.data`, tokenize batches (`dataset.batch(1024).map(tokenizer.tokenize)`): each call has a
    fixed cost (about 1 ms for BPE on 2 CPU cores), so mapping over single lines is ~50× slower.
    """

    kind = None

    def tokenize(self, strings):
        """Scalar string → int32 `[n]`; `[B]` strings → int32 `tf.RaggedTensor` `[B, None]`."""
        backends.require_tensorflow("gpt_keras' in-graph tokenizers", backends.TOKENIZE_ELSEWHERE)
        strings = tf.convert_to_tensor(strings, dtype=tf.string)
        if strings.shape.rank == 0:
            return self._tokenize_batch(tf.expand_dims(strings, 0))[0]
        if strings.shape.rank == 1:
            return self._tokenize_batch(strings)
        raise ValueError(
            "`tokenize` expects a scalar string or a 1-D `[B]` string tensor (reshape or "
            f"`tf.reshape(strings, [-1])` first). Received shape {strings.shape}."
        )

    def detokenize(self, ids):
        """Int ids `[n]` → a scalar string; `[B, T]` or ragged `[B, None]` → `[B]` strings.

        Ids outside `[0, vocab_size)` (e.g. from a model whose vocabulary was padded) decode to
        U+FFFD; `end_of_text_id` decodes to `<|endoftext|>`.
        """
        backends.require_tensorflow("gpt_keras' in-graph tokenizers", backends.TOKENIZE_ELSEWHERE)
        if isinstance(ids, (list, tuple)):
            ids = tf.ragged.constant(ids)
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids)
            if ids.shape.rank == 1:
                return self.detokenize(tf.expand_dims(ids, 0))[0]
            if ids.shape.rank != 2:
                raise ValueError(
                    "`detokenize` expects ids of shape `[n]`, `[B, T]` or ragged `[B, None]`. "
                    f"Received shape {ids.shape}."
                )
            ids = tf.RaggedTensor.from_tensor(ids)
        if ids.ragged_rank != 1 or ids.shape.rank != 2:
            raise ValueError(
                "`detokenize` expects a ragged tensor of shape `[B, None]`. "
                f"Received shape {ids.shape}."
            )
        ids = ids.with_row_splits_dtype(tf.int64)
        return self._detokenize_batch(ids.with_flat_values(tf.cast(ids.flat_values, tf.int32)))

    def token_bytes(self):
        """Every id's own bytes, a list of `vocab_size` `bytes` (raw: a byte-level piece of a
        multi-byte character is not replaced by U+FFFD, unlike in `detokenize`)."""
        return [bytes(b) for b in self._token_strings.numpy()[: self.vocab_size]]

    def to_json(self):
        """The bytes `save` writes: canonical JSON, so equal vocabularies hash equally."""
        payload = {"kind": self.kind, "version": FORMAT_VERSION, **self._payload()}
        return json.dumps(
            payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")
        ).encode("utf-8")

    def describe(self):
        """A manifest entry: `kind`, `vocab_size`, `end_of_text_id` and the `sha256` of the file
        `save` writes (computed without writing it)."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "end_of_text_id": self.end_of_text_id,
            "sha256": hashlib.sha256(self.to_json()).hexdigest(),
        }

    def save(self, directory):
        """Writes `directory/tokenizer.json` atomically (temporary file + `os.replace`); returns
        its path. Creates `directory` if needed."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE_NAME)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{FILE_NAME}.")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return path

    @classmethod
    def load(cls, directory):
        """The tokenizer saved in `directory` by `save`. Raises `ValueError` for a missing,
        unreadable or invalid file, or one written by another tokenizer kind."""
        path = os.path.join(directory, FILE_NAME)
        return cls._from_payload(read_payload(path, cls), path)


def read_payload(path, cls):
    """The JSON object in `path`, after checking that `cls` (a `Tokenizer` subclass, or None for
    any kind) and this version of gpt_keras can read it."""
    name = cls.__name__ if cls else "Tokenizer"
    fix = f"Write it with `{name}.save(directory)` (or train a new one)."
    try:
        with open(path, "rb") as f:
            payload = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"No tokenizer file at {path}. {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read the tokenizer file {path}: {error}. {fix}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} does not hold a JSON object. {fix}")
    if cls is not None and payload.get("kind") != cls.kind:
        raise ValueError(
            f"{path} is not a {cls.__name__} file: expected kind {cls.kind!r}, found "
            f"{payload.get('kind')!r}. Load it with the class that saved it, or with "
            "`gpt_keras.tokenizers.load_tokenizer`."
        )
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {payload.get('version')!r}; this gpt_keras reads version "
            f"{FORMAT_VERSION}. {fix}"
        )
    return payload
