"""Text corpus → token file → `tf.data` pipelines of `(inputs, targets)` windows.

The corpus is read once, streaming, in UTF-8 chunks; its tokens are written to a flat binary file
(nanoGPT's `train.bin` idea) that training reads through a memory map, so a corpus larger than
memory works and the batch of any step can be recomputed from `(seed, step)` alone: that is what
makes resuming exact (no data-iterator state to save).
"""

import codecs
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import tempfile

import numpy as np
import tensorflow as tf

from gpt_keras import checkpoints

CHUNK_BYTES = 1 << 20  # text is read and tokenized in chunks of about this many bytes
TOKENS_FILE = "tokens.bin"
META_FILE = "tokens.json"


def resolve_text_files(paths):
    """Expands files, globs and directories (recursively, hidden entries skipped) into a sorted,
    de-duplicated list of files. Raises `ValueError` naming the path that matched nothing."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(str, paths):
        if glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"{path}: the pattern matches no file. Check the --data pattern.")
            files.extend(matches)
        elif os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.extend(os.path.join(root, n) for n in names if not n.startswith("."))
            found.sort()
            if not found:
                raise ValueError(f"{path}: the directory holds no text file. Point --data at text files.")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory. Check the --data path.")
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def read_text(path, chunk_bytes=CHUNK_BYTES):
    """Yields the text of the UTF-8 file `path`, read `chunk_bytes` at a time, in chunks each
    ending at a line break where the file has one (so no word is cut). An empty file or invalid
    UTF-8 raises `ValueError` with the file and the byte offset of the first invalid byte:
    gpt_keras never guesses an encoding or silently replaces characters."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty. Remove it from --data.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file fed to the decoder so far
    carry = ""
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the read
            try:
                text = carry + decoder.decode(data, final=not data)
            except UnicodeDecodeError as error:  # `error.start` counts from the pending bytes
                position = offset - pending + error.start
                raise ValueError(
                    f"{path}: invalid UTF-8 at byte offset {position}. Convert the file to UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`) or leave it out of --data."
                ) from None
            offset += len(data)
            if not data:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            carry = text[cut:] if cut else text
            if cut:
                yield text[:cut]


def fingerprint(files):
    """A short hash of the files' paths, sizes and modification times (detects a changed corpus)."""
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TokenFile:
    """A prepared corpus: `tokens.bin` (all tokens, train part first) and its metadata.

    `num_train` tokens are for training, the next `num_validation` for validation;
    `validation_chars`/`validation_bytes` convert a per-token loss to bits per char/byte.
    """

    directory: str
    dtype: str
    num_train: int
    num_validation: int
    validation_chars: int
    validation_bytes: int
    fingerprint: str

    @property
    def path(self):
        return os.path.join(self.directory, TOKENS_FILE)

    def tokens(self):
        """The token ids as a read-only NumPy memory map (nothing is read until indexed)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r")

    @classmethod
    def load(cls, directory):
        with open(os.path.join(directory, META_FILE)) as f:
            return cls(directory=directory, **json.load(f))


def _tokenized_chunks(files, tokenizer):
    """Yields the int32 ids of each text chunk of `files` (see `read_text`), and `None` between
    files (where the end-of-text token goes)."""
    for index, path in enumerate(files):
        if index:
            yield None
        for text in read_text(path):
            yield tokenizer.tokenize(text).numpy()


def token_dtype(tokenizer, validation_fraction):
    """The smallest unsigned dtype that holds the tokenizer's ids, after checking
    `validation_fraction` (in (0, 1]) for the preparing functions."""
    if not 0.0 < validation_fraction <= 1.0:
        raise ValueError(
            f"`validation_fraction` must be in (0, 1]. Received: {validation_fraction!r}"
        )
    return "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"


@contextlib.contextmanager
def prepared_directory(directory):
    """Yields a temporary directory beside `directory` (`checkpoints.temporary_prefix("tokens")`,
    which `training.train` removes when its writer was killed) to write prepared data into; it is
    renamed to `directory` when the block ends (refused if `directory` exists), and removed if
    the block raises."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=checkpoints.temporary_prefix("tokens"))
    os.chmod(temporary, 0o755)
    try:
        yield temporary
        if os.path.exists(directory):
            raise ValueError(f"{directory} already exists; refusing to write over it.")
        os.rename(temporary, directory)
    except BaseException:
        for name in os.listdir(temporary):
            os.unlink(os.path.join(temporary, name))
        os.rmdir(temporary)
        raise


def write_meta(path, prepared):
    """Writes the fields of `prepared` (a `TokenFile`-like dataclass) but its `directory` to the
    JSON file `path`."""
    meta = {k: v for k, v in dataclasses.asdict(prepared).items() if k != "directory"}
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)


def prepare_tokens(train_files, tokenizer, directory, validation_files=None,
                   validation_fraction=0.1):
    """Tokenizes the corpus into `directory/tokens.bin` and returns its `TokenFile`.

    Files are joined with the tokenizer's end-of-text token. Without `validation_files`, the last
    `validation_fraction` of the tokens is the validation split (nanoGPT: first 90% train; 1.0
    makes everything validation text, for evaluation). Written to a temporary directory beside
    `directory` (`checkpoints.temporary_prefix("tokens")`) and renamed into place; an interrupted
    call removes it, and `training.train` removes one whose writer was killed. Memory does not
    grow with the corpus.
    """
    dtype = token_dtype(tokenizer, validation_fraction)
    with prepared_directory(directory) as temporary:
        end_of_text = np.array([tokenizer.end_of_text_id], dtype)
        counts = []
        with open(os.path.join(temporary, TOKENS_FILE), "wb") as out:
            for files in [train_files] + ([validation_files] if validation_files else []):
                count = 0
                for ids in _tokenized_chunks(files, tokenizer):
                    ids = end_of_text if ids is None else ids.astype(dtype)
                    out.write(ids.tobytes())
                    count += len(ids)
                counts.append(count)
        total = sum(counts)
        num_train = counts[0] if validation_files else int(total * (1 - validation_fraction))
        tokens = np.memmap(os.path.join(temporary, TOKENS_FILE), dtype=dtype, mode="r")
        validation_chars, validation_bytes = _count_text(tokenizer, tokens[num_train:])
        token_file = TokenFile(
            directory=directory,
            dtype=dtype,
            num_train=num_train,
            num_validation=total - num_train,
            validation_chars=validation_chars,
            validation_bytes=validation_bytes,
            fingerprint=fingerprint(list(train_files) + list(validation_files or [])),
        )
        del tokens
        write_meta(os.path.join(temporary, META_FILE), token_file)
    return token_file


def _count_text(tokenizer, ids, chunk=1 << 18):
    """`(characters, UTF-8 bytes)` of the text of token ids `[n]` (e.g. a memory map; end-of-text
    tokens dropped), decoded `chunk` ids at a time: memory is bounded by the chunk."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a byte token may end
    characters = size = 0  # mid-character: the decoder holds it until the next chunk
    for start in range(0, len(ids), chunk):
        part = np.asarray(ids[start : start + chunk])
        part = part[part != tokenizer.end_of_text_id].astype(np.int32)
        text = decoder.decode(tokenizer.detokenize(part).numpy() if len(part) else b"")
        characters, size = characters + len(text), size + len(text.encode("utf-8"))
    text = decoder.decode(b"", final=True)
    return characters + len(text), size + len(text.encode("utf-8"))


def check_windows(token_file, context_length):
    """Raises `ValueError` unless both splits hold at least one window of `context_length + 1`."""
    _check_length("training", token_file.num_train, context_length)
    _check_length("validation", token_file.num_validation, context_length)


def _check_length(name, available, context_length):
    if available < context_length + 1:
        raise ValueError(
            f"The {name} split has {available} tokens, fewer than one window of "
            f"context_length + 1 = {context_length + 1}. Use more text, a smaller context "
            "(--context-length) or a different validation split."
        )


def consecutive_windows(tokens, context_length, batch_size):
    """Yields batches `(inputs, targets)`, int32 `[n, context_length]` with n ≤ `batch_size`, of
    the `(len(tokens) - 1) // context_length` non-overlapping windows of `tokens` (e.g. a memory
    map) in order, targets shifted by one token; reads one batch of tokens at a time, so memory
    is bounded by the batch, not by `tokens`."""
    count = (len(tokens) - 1) // context_length
    for first in range(0, count, batch_size):
        n = min(batch_size, count - first)
        start = first * context_length
        ids = np.asarray(tokens[start : start + n * context_length + 1], dtype=np.int32)
        yield ids[:-1].reshape(n, context_length), ids[1:].reshape(n, context_length)


def training_dataset(token_file, context_length, global_batch_size, seed, start_step, num_steps):
    """`tf.data` of `num_steps` batches `(inputs, targets)`, each int32 `[global_batch_size,
    context_length]`, targets shifted by one token. Batch `k` holds windows at offsets drawn
    uniformly from the training split by a generator seeded with `(seed, k)` (nanoGPT's sampling),
    so the pipeline started at `start_step` continues an interrupted run exactly."""
    _check_length("training", token_file.num_train, context_length)
    tokens = token_file.tokens()
    window = np.arange(context_length + 1)

    def batch_at(step):
        rng = np.random.default_rng([seed, 0, int(step)])
        starts = rng.integers(0, token_file.num_train - context_length, size=global_batch_size)
        windows = tokens[starts[:, None] + window].astype(np.int32)  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]

    return batches(tf.data.Dataset.range(start_step, start_step + num_steps), batch_at,
                    global_batch_size, context_length)


def validation_dataset(token_file, context_length, global_batch_size, seed, num_batches):
    """The fixed validation set: `num_batches` batches of windows drawn from the validation split
    with generators seeded by `(seed, 1, i)`, identical at every evaluation."""
    _check_length("validation", token_file.num_validation, context_length)
    tokens = token_file.tokens()
    window = np.arange(context_length + 1)

    def batch_at(index):
        rng = np.random.default_rng([seed, 1, int(index)])
        starts = token_file.num_train + rng.integers(
            0, token_file.num_validation - context_length, size=global_batch_size
        )
        windows = tokens[starts[:, None] + window].astype(np.int32)
        return windows[:, :-1], windows[:, 1:]

    return batches(tf.data.Dataset.range(num_batches), batch_at, global_batch_size, context_length)


def batches(indices, batch_at, batch_size, context_length, dtypes=(tf.int32, tf.int32)):
    """`tf.data` of `batch_at(index)` for each of `indices`: a tuple of NumPy arrays `[batch_size,
    context_length]` of `dtypes`, computed in parallel, in order, every worker the same batches."""
    def load(index):
        parts = tf.numpy_function(batch_at, [index], dtypes, stateful=False)
        for part in parts:
            part.set_shape((batch_size, context_length))
        return tuple(parts)

    dataset = indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    # Every worker builds the same global batches; each keeps its own slice of them.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def bits_per_unit(loss, token_file, unit="char"):
    """Converts a mean per-token loss (nats) on the validation split to bits per char or byte."""
    units = token_file.validation_chars if unit == "char" else token_file.validation_bytes
    return loss * token_file.num_validation / max(units, 1) / math.log(2)
