"""Supervised fine-tuning on prompt → completion pairs: reading JSONL, the prepared examples of a
run directory, the step-indexed batches with their loss weights, and the evaluation (completion
loss and exact match of greedy answers).

Conventions (the README's "Supervised fine-tuning" section says the same):

- **Input.** JSONL files, one JSON object per line with a string prompt and a string completion
  (fields `prompt`/`completion` unless named otherwise); blank lines are skipped. A malformed
  line, a missing field or a value that is not a string raises `ValueError` naming `file:line`.
- **Tokens of an example.** The prompt and the completion are tokenized separately (no token
  spans the boundary; end the prompt with the separator you want, e.g. "=" or "\\nA:") and
  joined, and the tokenizer's end-of-text id is appended: `s = prompt + completion + [eot]`, so
  the model learns where an answer ends and greedy decoding stops there. Every gpt_keras
  tokenizer has an end-of-text id (the character tokenizer reserves one after its characters;
  GPT-2's is `<|endoftext|>`). An empty prompt is the end-of-text token alone, as an empty prompt
  is in `generation.TextGenerator`. Nothing is prepended to a non-empty prompt, so
  `gpt-keras generate RUN --prompt PROMPT --temperature 0` continues it as trained.
- **Length.** An example must fit the context: `len(prompt) + len(completion) <= context_length`
  tokens (inputs are `s[:-1]`). A longer one is refused with its `file:line`, not truncated:
  cutting the prompt silently changes the question. Shorten or drop it, or use a longer context.
- **One example per row, right-padded.** Row `i` holds `inputs = s[:-1]`, `targets = s[1:]`,
  then padding (the end-of-text id) to `context_length`. Attention is causal, so padding after an
  example cannot change its positions, and no row holds two examples: no attention crosses
  examples (no packing).
- **The loss weights.** Per target position, weight 1 on the completion tokens and the final
  end-of-text token (the positions from `len(prompt) - 1` to `len(s) - 2`), 0 on the prompt and
  on padding. The loss of an update is `sum(weight * token_loss) / sum(weight)` over its whole
  global batch: all replicas and all accumulation micro-batches. The model computes each
  replica's `mean(weight * token_loss)` over its `[B_r, T]` slice (Keras' "sum over batch size"
  reduction of per-token sample weights; `distribute.GlobalBatchSteps`) and averages replicas
  and micro-batches, so the batches here carry the weights pre-scaled by
  `B * A * T / W` (B global rows, A micro-batches per update, T the context, W the number of
  weight-1 positions of the update): the average is then exactly the formula above, for any
  replica count. The validation set is scaled the same way as one group of batches, so the
  validation loss is the completion loss (nats/token) over every held-out completion token.
- **Batches.** Training batch `k` is `batch_size` examples drawn uniformly (with replacement) from
  the training examples by a generator seeded with `(seed, k)`, like `data.training_dataset`:
  a batch depends only on `(seed, k)` (resuming is exact, any replica count sees the same global
  batches). Validation scores every held-out example once, in order (the last batch is filled
  with all-padding rows of weight 0); `--eval-batches` does not apply.
- **Split.** The last 10% of the examples (at least one), or the pairs of `validation_files`.
"""

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from gpt_keras import data, generation
from gpt_keras.config import PAIR_FIELDS as FIELDS  # default field names

TOKENS_FILE = "pairs.bin"  # prompt + completion ids of every example, one after another
INDEX_FILE = "pairs-index.bin"  # int64 [N, 5]: start, prompt tokens, completion tokens,
INDEX_COLUMNS = 5  # completion characters, completion UTF-8 bytes
META_FILE = "pairs.json"
_TOKENIZE_BATCH = 1024  # pairs tokenized per tokenizer call
_DTYPES = (tf.int32, tf.int32, tf.float32)  # a batch: inputs, targets, loss weights


def read_pairs(files, prompt_field="prompt", completion_field="completion"):
    """Yields `(location, prompt, completion)` for each non-blank line of the JSONL `files`, read
    one line at a time; `location` is `file:line`. Raises `ValueError` naming `file:line` for
    invalid UTF-8, a line that is not a JSON object, a missing field or a non-string value, and
    naming the file for a file without pairs."""
    for path in files:
        found = False
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                location = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{location}: invalid UTF-8. Write the pairs file as "
                                     "UTF-8 JSON lines.") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{location}: not valid JSON ({error.msg} at column {error.colno}). "
                        f'Each line must be one JSON object, e.g. {{"{prompt_field}": "2+2=", '
                        f'"{completion_field}": "4"}}.'
                    ) from None
                if not isinstance(record, dict):
                    raise ValueError(f"{location}: a JSON {type(record).__name__}, not an object "
                                     f'with "{prompt_field}" and "{completion_field}" fields.')
                values = []
                for field, flag in ((prompt_field, "--prompt-field"),
                                    (completion_field, "--completion-field")):
                    if field not in record:
                        raise ValueError(
                            f'{location}: no "{field}" field (the line has: '
                            f"{', '.join(sorted(record)) or 'no fields'}). Name the field with "
                            f"{flag}."
                        )
                    if not isinstance(record[field], str):
                        raise ValueError(f'{location}: "{field}" is a JSON '
                                         f"{_json_type(record[field])}, not a string.")
                    values.append(record[field])
                found = True
                yield location, values[0], values[1]
        if not found:
            raise ValueError(f"{path}: no prompt-completion pairs (the file is empty or blank). "
                             "Remove it from --data.")


def _json_type(value):
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def pair_texts(files, prompt_field="prompt", completion_field="completion"):
    """Yields the prompt and completion strings of the pairs (to train a tokenizer on)."""
    for _, prompt, completion in read_pairs(files, prompt_field, completion_field):
        yield prompt
        yield completion


@dataclasses.dataclass(frozen=True)
class PairFile:
    """Prepared examples: `pairs.bin` (prompt and completion ids, example after example),
    `pairs-index.bin` (int64 `[num_train + num_validation_examples, 5]`: start offset, prompt
    tokens, completion tokens, completion characters and UTF-8 bytes) and their metadata.

    The first `num_train` examples are for training, the rest for validation. `num_validation`,
    `validation_chars` and `validation_bytes` count the held-out completions' weighted tokens
    (completion + end of text), characters and bytes: the units of the validation loss and of
    bits per char/byte (the attributes `callbacks.validation_metrics` reads, as on a
    `data.TokenFile`).
    """

    directory: str
    dtype: str
    num_train: int
    num_validation_examples: int
    num_validation: int
    validation_chars: int
    validation_bytes: int
    end_of_text_id: int
    fingerprint: str

    def tokens(self):
        """The token ids, a read-only memory map."""
        return np.memmap(os.path.join(self.directory, TOKENS_FILE), dtype=self.dtype, mode="r")

    def index(self):
        """The int64 `[examples, 5]` index, a read-only memory map."""
        return np.memmap(os.path.join(self.directory, INDEX_FILE), dtype=np.int64,
                         mode="r").reshape(-1, INDEX_COLUMNS)

    @classmethod
    def load(cls, directory):
        with open(os.path.join(directory, META_FILE)) as f:
            return cls(directory=directory, **json.load(f))


def is_prepared(directory):
    """Whether `directory` holds prepared pairs (`prepare_pairs`)."""
    return os.path.isfile(os.path.join(directory, META_FILE))


def prepare_pairs(train_files, tokenizer, directory, context_length, fields=FIELDS,
                  validation_files=None, validation_fraction=0.1):
    """Tokenizes the pairs of `train_files` (and `validation_files`) into `directory` and
    returns its `PairFile`; memory is bounded by `_TOKENIZE_BATCH` pairs, not by the files.

    Without `validation_files`, the last `validation_fraction` of the examples (at least one) is
    the validation split; 1.0 makes every example a validation example (for evaluation). Raises
    `ValueError` (see `read_pairs`) and for an example longer than the context. Written
    through `data.prepared_directory`: renamed into place when complete.
    """
    dtype = data.token_dtype(tokenizer, validation_fraction)
    with data.prepared_directory(directory) as temporary:
        counts, start = [], 0
        with open(os.path.join(temporary, TOKENS_FILE), "wb") as tokens_out, \
                open(os.path.join(temporary, INDEX_FILE), "wb") as index_out:
            for files in [train_files] + ([validation_files] if validation_files else []):
                count = 0
                for batch in _batched(read_pairs(files, *fields), _TOKENIZE_BATCH):
                    ids, rows = _tokenize_pairs(batch, tokenizer, context_length, start)
                    tokens_out.write(ids.astype(dtype).tobytes())
                    index_out.write(rows.tobytes())
                    start += len(ids)
                    count += len(rows)
                counts.append(count)
        total = sum(counts)
        if validation_files:
            num_train = counts[0]
        elif validation_fraction == 1.0:
            num_train = 0
        else:
            num_train = min(int(total * (1 - validation_fraction)), total - 1)
            if num_train < 1:
                raise ValueError(f"{total} pair(s) are too few to hold out validation pairs; "
                                 "use more pairs or pass --validation-data.")
        index = np.fromfile(os.path.join(temporary, INDEX_FILE), np.int64).reshape(-1, 5)
        held_out = index[num_train:]
        pair_file = PairFile(
            directory=directory, dtype=dtype, num_train=num_train,
            num_validation_examples=total - num_train,
            num_validation=int(held_out[:, 2].sum() + len(held_out)),
            validation_chars=int(held_out[:, 3].sum()),
            validation_bytes=int(held_out[:, 4].sum()),
            end_of_text_id=int(tokenizer.end_of_text_id),
            fingerprint=data.fingerprint(list(train_files) + list(validation_files or [])),
        )
        del index, held_out
        data.write_meta(os.path.join(temporary, META_FILE), pair_file)
    return pair_file


def _batched(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_pairs(batch, tokenizer, context_length, start):
    """`(ids [n], index int64 [len(batch), 5])` of `(location, prompt, completion)` triples: the
    concatenated prompt + completion ids (an empty prompt is the end-of-text id) and their index
    rows, offsets counted from `start`. Raises `ValueError` for an example over the context."""
    prompts = tokenizer.tokenize(tf.constant([p for _, p, _ in batch])).to_list()
    completions = tokenizer.tokenize(tf.constant([c for _, _, c in batch])).to_list()
    ids, rows = [], []
    for (location, _, completion), prompt_ids, completion_ids in zip(batch, prompts, completions):
        prompt_ids = prompt_ids or [tokenizer.end_of_text_id]
        length = len(prompt_ids) + len(completion_ids)
        if length > context_length:
            raise ValueError(
                f"{location}: the example has {len(prompt_ids)} prompt + {len(completion_ids)} "
                f"completion tokens = {length}, more than the context length {context_length} "
                "(the end-of-text token is the last target). Shorten or remove it, or train a "
                "model with a longer context."
            )
        rows.append([start, len(prompt_ids), len(completion_ids), len(completion),
                     len(completion.encode("utf-8"))])
        ids.extend(prompt_ids)
        ids.extend(completion_ids)
        start += length
    return np.asarray(ids, np.int64), np.asarray(rows, np.int64).reshape(-1, INDEX_COLUMNS)


def example_rows(pair_file, examples, context_length, tokens=None, index=None):
    """The rows of the examples numbered `examples` (int `[n]`; -1: an all-padding row):
    `(inputs, targets)` int32 `[n, T]` and the 0/1 `weights` float32 `[n, T]` (1 on the completion
    and end-of-text targets), right-padded with the end-of-text id (see the module docstring)."""
    tokens = pair_file.tokens() if tokens is None else tokens
    index = pair_file.index() if index is None else index
    eot = pair_file.end_of_text_id
    n = len(examples)
    inputs = np.full((n, context_length), eot, np.int32)
    targets = np.full((n, context_length), eot, np.int32)
    weights = np.zeros((n, context_length), np.float32)
    for row, example in enumerate(examples):
        if example < 0:
            continue
        start, prompt, completion = (int(v) for v in index[example, :3])
        length = prompt + completion  # positions used: inputs s[:-1], targets s[1:]
        sequence = np.append(np.asarray(tokens[start : start + length], np.int32), eot)
        inputs[row, :length] = sequence[:-1]
        targets[row, :length] = sequence[1:]
        weights[row, prompt - 1 : length] = 1.0
    return inputs, targets, weights


def training_dataset(pair_file, context_length, global_batch_size, seed, start_step, num_steps,
                     accumulation_steps=1):
    """`tf.data` of `num_steps` batches `(inputs, targets, weights)`, `[global_batch_size,
    context_length]` (int32, int32, float32): fit batch `k` holds the examples drawn by a generator
    seeded with `(seed, 0, k)`, its weights scaled by `B * A * T / W` over the
    `accumulation_steps` (A) batches of its update (see the module docstring)."""
    if pair_file.num_train < 1:
        raise ValueError("The training split holds no pairs; pass more pairs with --data.")
    tokens, index = pair_file.tokens(), pair_file.index()
    per_update = global_batch_size * accumulation_steps * context_length

    def examples_at(step):
        rng = np.random.default_rng([seed, 0, int(step)])
        return rng.integers(0, pair_file.num_train, size=global_batch_size)

    def batch_at(step):
        first = int(step) - int(step) % accumulation_steps
        weighted = sum(int(index[examples_at(k), 2].sum()) + global_batch_size
                       for k in range(first, first + accumulation_steps))
        inputs, targets, weights = example_rows(pair_file, examples_at(step), context_length,
                                                tokens, index)
        return inputs, targets, weights * np.float32(per_update / weighted)

    return data.batches(tf.data.Dataset.range(start_step, start_step + num_steps), batch_at,
                    global_batch_size, context_length, _DTYPES)


def validation_batches(pair_file, global_batch_size):
    """Batches needed to score every held-out example once."""
    return -(-pair_file.num_validation_examples // global_batch_size)


def validation_dataset(pair_file, context_length, global_batch_size):
    """Every held-out example once, in order, as `validation_batches` batches `(inputs, targets,
    weights)`; the weights are scaled as one group (see the module docstring), so the mean of the
    batches' losses is the completion loss over all held-out completion tokens."""
    if pair_file.num_validation_examples < 1:
        raise ValueError("The validation split holds no pairs; pass --validation-data.")
    tokens, index = pair_file.tokens(), pair_file.index()
    count = validation_batches(pair_file, global_batch_size)
    scale = np.float32(global_batch_size * count * context_length / pair_file.num_validation)

    def batch_at(batch):
        examples = pair_file.num_train + int(batch) * global_batch_size + np.arange(
            global_batch_size)
        examples[examples >= pair_file.num_train + pair_file.num_validation_examples] = -1
        inputs, targets, weights = example_rows(pair_file, examples, context_length, tokens, index)
        return inputs, targets, weights * scale

    return data.batches(tf.data.Dataset.range(count), batch_at, global_batch_size, context_length,
                        _DTYPES)


def evaluate_pairs(model, pair_file, examples, batch_size=32, progress=None):
    """Completion loss and exact match of `model` on the examples numbered `examples` of
    `pair_file`: `{"examples": n, "completion_tokens": W, "completion_loss": nats per completion
    token (end of text included), "exact_match": fraction}`.

    An answer matches when greedy decoding from the prompt gives exactly the completion's tokens
    followed by the end-of-text token (a row may decode at most that many tokens; decoding stops
    at the end-of-text id). `progress(batches_done, batches)` is called after each batch."""
    context = model.config.context_length
    tokens, index = pair_file.tokens(), pair_file.index()
    eot = pair_file.end_of_text_id
    examples = np.asarray(examples, np.int64)
    total_loss = weighted = matches = 0
    batches = -(-len(examples) // batch_size)
    for number in range(batches):
        chosen = examples[number * batch_size : (number + 1) * batch_size]
        inputs, targets, weights = example_rows(pair_file, chosen, context, tokens, index)
        logits = model(inputs, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        total_loss += float(np.sum(keras.ops.convert_to_numpy(losses) * weights, dtype=np.float64))
        weighted += int(weights.sum())
        prompts, answers = [], []
        for example in chosen:
            start, prompt, completion = (int(v) for v in index[example, :3])
            prompts.append(np.asarray(tokens[start : start + prompt], np.int32).tolist())
            answers.append(np.asarray(tokens[start + prompt : start + prompt + completion],
                                      np.int32).tolist() + [eot])
        padding = batch_size - len(prompts)  # full batches: one compiled decoding function
        decoded = generation.generate(
            model, prompts + [[eot]] * padding, max(len(a) for a in answers), temperature=0,
            stop_token_ids=[eot], include_stop_token=True,
        )
        matches += sum(row[: len(answer)] == answer for row, answer in zip(decoded, answers))
        if progress is not None:
            progress(number + 1, batches)
    return {"examples": len(examples), "completion_tokens": weighted,
            "completion_loss": total_loss / max(weighted, 1),
            "exact_match": matches / max(len(examples), 1)}


__all__ = ["FIELDS", "PairFile", "evaluate_pairs", "example_rows", "pair_texts", "prepare_pairs",
           "read_pairs", "training_dataset", "validation_dataset"]
