"""In-process generation for `GPT`: `generate`, `stream` and text in/text out (`TextGenerator`).

This is the Python driver of the decoding core (`gpt_keras.decoding`, which documents the decode
loop, the sliding window and the settings); sampling is `gpt_keras.sampling`. Shapes: B prompts,
n_b tokens in prompt b, S the KV-cache length, V the vocabulary.

The core runs as compiled `tf.function`s (XLA with `jit_compile=True`, a plain TensorFlow graph
with `False`, the faster of the two for the model's size with "auto", the default), cached per
model and per shape bucket (B, prefill width, S); prompt contents, `max_new_tokens`,
`temperature`, `top_k`, `top_p`, `seed`, stop tokens and the chunk size are tensors, so calls
that differ only in those reuse the compiled function
(`tracing_count(model)` counts traces). Each compiled call decides up to S + 1 slots (or
`chunk_size`) and returns its new ids; the KV cache stays in memory between calls. When one call
cannot decide them all, the first call only prefills the cache and decides the first new slot,
and the later calls hold the decode loop (traced and compiled once).

A prompt keeps at most its last `context_length` tokens (with `sliding_window=False`, its last
`context_length + 1 - max_new_tokens`); longer ones are cut with a `UserWarning`.

Example:

    model = gpt_keras.GPT.from_preset("tiny")
    generation.generate(model, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0)
    for chunk in generation.stream(model, [1, 2, 3], max_new_tokens=64, chunk_size=8):
        print(chunk)  # the next ≤ 8 new ids
"""

import numbers
import weakref
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from gpt_keras import backends, decoding, scoring

__all__ = [
    "Completion", "IncrementalText", "Score", "Stream",
    "TextGenerator", "bucket",
    "generate", "generate_eager", "resolve_jit_compile", "stream", "tracing_count",
]

# Cache and prefill lengths are rounded up (see `bucket`) to at least this, so that nearby
# prompt/generation lengths share one compiled function.
_MIN_BUCKET = 16

# model -> {(kind, batch, prefill width, cache length, jit_compile): tf.function}
_COMPILED = weakref.WeakKeyDictionary()

# ----------------------------------------------------------------------------------------------
# Public API


def generate(
    model,
    prompts,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    seed=None,
    stop_token_ids=(),
    include_stop_token=False,
    repetition_penalty=1.0,
    min_new_tokens=0,
    banned_token_ids=(),
    logit_bias=None,
    stop_strings=(),
    token_bytes=None,
    return_logprobs=False,
    lengths=None,
    sliding_window=True,
    cache_length=None,
    jit_compile="auto",
):
    """Generates up to `max_new_tokens` token ids after each prompt.

    Args:
        model: a built `GPT` (or any model with its `init_layer_caches`/`call_with_layer_caches`
            and `config`).
        prompts: a batch of token-id prompts of any lengths (a list of int sequences, or a
            `tf.RaggedTensor`), a `[B, T]` int array (with `lengths` `[B]` if rows are
            right-padded), or a single 1-D sequence of ids. Every prompt needs at least one token.
        max_new_tokens: how many tokens to generate per row (fewer if a stop token comes first).
        temperature: ≥ 0; 0 means greedy decoding (`top_k`, `top_p` and `seed` are then unused).
        top_k: None or 0 (no cut), or sample only among the `top_k` most likely tokens.
        top_p: None or 1 (no cut), or nucleus sampling with mass `top_p` in (0, 1].
        seed: None (draw one from Python's `random`, which `keras.utils.set_random_seed` seeds)
            or an int: the same seed, prompts and knobs give the same tokens.
        stop_token_ids: ids that end a row. A row stops after emitting one.
        include_stop_token: whether a row that stopped keeps its stop token as its last id
            (default: dropped).
        repetition_penalty: > 0, 1 = off: Hugging Face's, over the tokens in each row's window.
        min_new_tokens: stop ids cannot end a row before it has this many new tokens.
        banned_token_ids: ids never generated. logit_bias: `{id: value}` added to the logits.
        stop_strings: a row ends when its new text contains one of them (it keeps the token
            that completed it; `TextGenerator` cuts the text). Needs `token_bytes`, the
            tokenizer's `decoding.token_byte_table` (`TextGenerator` passes it).
        return_logprobs: also return each new token's log-probability under the model.
        lengths: `[B]` prompt lengths when `prompts` is a right-padded `[B, T]` array.
        sliding_window: allow generating past the context (`gpt_keras.decoding`); if False,
            `max_new_tokens > context_length` raises `ValueError`.
        cache_length: the KV-cache length S (default: the smallest of 16, 24, 32, 48, 64, 96, ...
            that holds the longest prompt and the new tokens but the last, at most
            `context_length`). Fixing it lets calls with different lengths share one compiled
            function.
        jit_compile: compile with XLA (True), as a plain TensorFlow graph (False), or "auto":
            XLA, except for bfloat16 models decoding more than one row (oneDNN's bfloat16
            matrix products use the CPU's bfloat16 units, XLA's do not: GPT-2 small at batch 8,
            1.4× XLA's tokens/s) and float16 ones; at batch 1 XLA is faster for every format
            (its one-row products run as library calls on all cores; GPT-2 small 1.2× the plain
            graph's tokens/s, BENCHMARKS.md).

    Returns:
        A list (one per prompt) of lists of new token ids; a single list for a single 1-D prompt.
        With `return_logprobs`: `(ids, logprobs)`, the log-probabilities shaped as the ids.
    """
    driver = _Driver(
        model, prompts, max_new_tokens, _knob_arguments(locals()), lengths, sliding_window,
        cache_length, jit_compile, chunk_size=None,
    )
    rows = [[] for _ in range(driver.batch_size)]
    for chunk in driver.chunks():
        for row, ids in zip(rows, chunk):
            row.extend(ids)
    if driver.single:
        rows, logprobs = rows[0], driver.logprobs[0]
    else:
        logprobs = driver.logprobs
    return (rows, logprobs) if return_logprobs else rows


_KNOBS = ("temperature", "top_k", "top_p", "seed", "stop_token_ids", "include_stop_token",
          "repetition_penalty", "min_new_tokens", "banned_token_ids", "logit_bias",
          "stop_strings", "token_bytes")


def _knob_arguments(arguments):
    """The arguments of `generate`/`stream` that `decoding.knobs` takes."""
    return {name: arguments[name] for name in _KNOBS}


def stream(
    model,
    prompts,
    max_new_tokens,
    *,
    chunk_size=8,
    temperature=1.0,
    top_k=None,
    top_p=None,
    seed=None,
    stop_token_ids=(),
    include_stop_token=False,
    repetition_penalty=1.0,
    min_new_tokens=0,
    banned_token_ids=(),
    logit_bias=None,
    stop_strings=(),
    token_bytes=None,
    lengths=None,
    sliding_window=True,
    cache_length=None,
    jit_compile="auto",
):
    """Like `generate`, but yields the new ids after each compiled call, each of which decides
    `chunk_size` slots; when there is more than one chunk, the first call decides one slot only
    (the first new token comes as soon as the prompt is read). The KV cache stays in memory
    between calls. `chunk_size=None` decodes everything in one call (or, where the window slides
    beyond S + 1 slots, the first token and then the rest). Arguments are checked here, before
    iteration starts.

    Returns a `Stream`: iterate it to get, per chunk, a list (one per prompt) of lists of new ids
    (a single list for a single 1-D prompt); chunks where no row got a new token are skipped.
    Joining the chunks gives exactly `generate`'s output for the same arguments. `Stream.stop(b)`
    ends row b before the next chunk; `Stream.logprobs` holds the log-probabilities of the
    ids yielded so far.
    """
    return Stream(
        _Driver(
            model, prompts, max_new_tokens, _knob_arguments(locals()), lengths, sliding_window,
            cache_length, jit_compile, chunk_size,
        )
    )


def generate_eager(model, prompt_ids, max_new_tokens, *, temperature=0.0, top_k=None,
                   seed=None):
    """Greedy or top-k sampling with the KV cache on any Keras backend (TensorFlow, JAX,
    PyTorch): a Python loop of eager `model.call_with_cache` calls, a prefill and then one call
    per new token, nothing compiled. `generate` is the compiled TensorFlow loop with every other
    feature (ragged prompts, stop tokens, top-p, steering, the sliding window).

    Args:
        model: a built `GPT`.
        prompt_ids: int `[B, T]`, T ≥ 1, every row a whole prompt (no padding), with
            `T + max_new_tokens - 1 <= context_length`.
        max_new_tokens: how many ids to generate per row (≥ 1).
        temperature: ≥ 0; 0 is greedy (the argmax of each step's logits), otherwise samples from
            `softmax(logits / temperature)`.
        top_k: None or 0 (no cut), or sample only among the `top_k` most likely tokens (logits
            tied with the `top_k`-th are kept, as in `generate`).
        seed: None or an int: the same seed gives the same tokens on the same backend
            (`keras.random`; the backends draw different numbers).

    Returns:
        int32 NumPy `[B, max_new_tokens]`.
    """
    checked = decoding.check_knobs(model.config.vocab_size, temperature=temperature,
                                   top_k=top_k, seed=seed)
    max_new_tokens = decoding.check_int("max_new_tokens", max_new_tokens, minimum=1)
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or prompt_ids.dtype.kind not in "iu":
        raise ValueError("`prompt_ids` must be integer ids `[batch, time]` with time ≥ 1. "
                         f"Received: shape {prompt_ids.shape}, dtype {prompt_ids.dtype}")
    batch_size, length = prompt_ids.shape
    last_position = length + max_new_tokens - 1  # the last new token is never fed back
    if last_position > model.config.context_length:
        raise ValueError(
            f"The prompt ({length} tokens) and max_new_tokens={max_new_tokens} need "
            f"{last_position} positions, more than context_length={model.config.context_length}. "
            "Shorten the prompt or generate fewer tokens (`generate` on TensorFlow slides the "
            "window instead)."
        )
    seeds = keras.random.SeedGenerator(checked["seed"] % (1 << 31))

    def next_ids(logits):  # [B, V] float32 → int32 [B, 1]
        if checked["temperature"] == 0:
            return ops.expand_dims(ops.cast(ops.argmax(logits, axis=-1), "int32"), -1)
        logits = logits / checked["temperature"]
        if checked["top_k"]:
            kth = ops.top_k(logits, checked["top_k"], sorted=True)[0][:, -1:]  # [B, 1]
            logits = ops.where(logits >= kth, logits, float("-inf"))
        return ops.cast(keras.random.categorical(logits, 1, seed=seeds), "int32")

    # A full-length cache: every step has the same shapes, whatever the prompt's length.
    cache = model.init_cache(batch_size)
    logits, cache = model.call_with_cache(prompt_ids.astype("int32"), cache, 0)
    new_ids = [next_ids(logits[:, -1])]
    for position in range(length, last_position):
        logits, cache = model.call_with_cache(new_ids[-1], cache, position)
        new_ids.append(next_ids(logits[:, -1]))
    return ops.convert_to_numpy(ops.concatenate(new_ids, axis=1))


def tracing_count(model):
    """How many times the generation functions of `model` have been traced (all buckets)."""
    return sum(fn.experimental_get_tracing_count() for fn in _COMPILED.get(model, {}).values())


class Stream:
    """An iterator over the chunks of a streamed generation (see `stream`)."""

    def __init__(self, driver):
        self._driver = driver
        self._chunks = driver.chunks()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._chunks)

    @property
    def batch_size(self):
        return self._driver.batch_size

    @property
    def logprobs(self):
        """Per row, the log-probabilities of the ids yielded so far (a list of float lists)."""
        return self._driver.logprobs

    def stop(self, row):
        """Ends row `row` (0-based) before the next chunk is decoded."""
        if not isinstance(row, numbers.Integral) or not 0 <= row < self.batch_size:
            raise ValueError(
                f"`row` must be an int in [0, {self.batch_size}). Received: row={row!r}"
            )
        self._driver.stop_requests.add(int(row))


class Completion(NamedTuple):
    """A generated text with its new token ids and their log-probabilities under the model (the
    ids include any that completed a stop string, whose text is cut)."""

    text: str
    token_ids: list
    logprobs: list


class Score(NamedTuple):
    """A text's log-likelihood: `log_prob` (natural log, the sum) and `token_log_probs` `[n]`, one
    per token of the text."""

    log_prob: float
    token_log_probs: np.ndarray


_SCORE_FUNCTIONS = weakref.WeakKeyDictionary()


def _score_function(model):
    """`scoring.token_log_probs` as one graph per model for any batch and length."""
    backends.require_tensorflow("TextGenerator.score", backends.USE_GENERATE_EAGER)
    if model not in _SCORE_FUNCTIONS:
        if not model.built:  # variables cannot be created inside the traced function
            model.build()
        _SCORE_FUNCTIONS[model] = tf.function(
            lambda ids, lengths: scoring.token_log_probs(model, ids, lengths),
            input_signature=[tf.TensorSpec([None, None], tf.int32),
                             tf.TensorSpec([None], tf.int32)],
        )
    return _SCORE_FUNCTIONS[model]


class TextGenerator:
    """Text in, text out: tokenizes prompts, generates with `generate`/`stream`, detokenizes.

    `tokenizer` needs `tokenize(str) -> int [n]` and `detokenize(int [n]) -> scalar string`
    (bytes); gpt_keras' tokenizers qualify. Streaming never emits half a character: a row's new ids
    are detokenized together with those since the text last ended on a whole character, and up to
    3 trailing U+FFFD (an incomplete UTF-8 sequence, whether the tokenizer returns its raw bytes or
    already replaced them) are held back until the next chunk completes them or generation ends.
    This is exact for tokenizers whose text is the concatenation of per-token bytes (byte,
    character and byte-level BPE tokenizers); invalid bytes become U+FFFD.

    Args:
        model: a built `GPT` whose vocabulary matches the tokenizer.
        tokenizer: see above. If it has an `end_of_text_id`, that id is the default stop token and
            an empty prompt starts from it (unconditional sampling); otherwise an empty prompt
            raises `ValueError`.
        jit_compile: passed to `generate`/`stream`.
    """

    def __init__(self, model, tokenizer, jit_compile="auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.jit_compile = jit_compile
        self._token_bytes = None

    def generate(self, prompts, max_new_tokens, *, stop_strings=(), return_logprobs=False,
                 **kwargs):
        """The generated text (without the prompt) for a `str` prompt, or a list of texts for a
        list of prompts. `stop_strings`: a row ends when its text contains one of them (checked
        in the decoding graph after every token), and its text is cut just before it. With
        `return_logprobs`, a `Completion` (text, new token ids, their log-probabilities) per
        prompt instead. Other keyword arguments are those of `generate` (`stop_token_ids`
        defaults to the tokenizer's end-of-text id)."""
        kwargs.setdefault("chunk_size", None)
        texts, decoded = self._stream(prompts, max_new_tokens, stop_strings, kwargs)
        pieces = ["" for _ in range(decoded.batch_size)]
        ids = [[] for _ in range(decoded.batch_size)]
        for chunk_texts, chunk_ids in texts:
            pieces = [a + b for a, b in zip(pieces, chunk_texts)]
            ids = [a + b for a, b in zip(ids, chunk_ids)]
        if return_logprobs:
            pieces = [Completion(text, row, decoded.logprobs[b][: len(row)])
                      for b, (text, row) in enumerate(zip(pieces, ids))]
        return pieces[0] if isinstance(prompts, str) else pieces

    def stream(self, prompts, max_new_tokens, *, chunk_size=8, stop_strings=(), **kwargs):
        """An iterator over the new text as it is decoded: a `str` per chunk for a `str` prompt,
        a list of `str` (one per prompt, possibly empty) for a list. Never yields half a
        character, nor text that may turn out to be the start of a stop string. Arguments are
        checked here, before iteration starts."""
        texts, _ = self._stream(prompts, max_new_tokens, stop_strings,
                                dict(kwargs, chunk_size=chunk_size))
        single = isinstance(prompts, str)
        return (pieces[0] if single else pieces for pieces, _ in texts if any(pieces))

    def _stream(self, prompts, max_new_tokens, stop_strings, kwargs):
        """`(iterator over (texts, ids) per chunk, the Stream)`, arguments checked now."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                "`prompts` must be a `str` or a non-empty list of `str`. "
                f"Received: prompts={prompts!r}"
            )
        stop_strings = decoding.check_stop_strings(stop_strings)
        end_of_text = getattr(self.tokenizer, "end_of_text_id", None)
        if end_of_text is not None:
            kwargs.setdefault("stop_token_ids", (end_of_text,))
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, token_bytes=self.token_bytes())
        ids = []
        for text in texts:
            row = [int(i) for i in np.asarray(self.tokenizer.tokenize(text)).reshape(-1)]
            if not row and end_of_text is not None:
                row = [int(end_of_text)]
            ids.append(row)
        kwargs.setdefault("jit_compile", self.jit_compile)
        decoded = stream(self.model, ids, max_new_tokens, **kwargs)
        rows = [IncrementalText(self._bytes, stop_strings) for _ in texts]
        return self._texts(decoded, rows), decoded

    def token_bytes(self):
        """The tokenizer's `decoding.token_byte_table`, computed once."""
        if self._token_bytes is None:
            self._token_bytes = decoding.token_byte_table(
                self.tokenizer, self.model.config.vocab_size)
        return self._token_bytes

    def score(self, texts):
        """The log-likelihood of a text under the model (`gpt_keras.scoring`'s convention: after
        the end-of-text id, every token counted): a `Score` for a `str`, a list for a list.
        `ValueError` for a text longer than `context_length` tokens."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`texts` must be a `str` or a non-empty list of `str`. "
                             f"Received: texts={texts!r}")
        start = getattr(self.tokenizer, "end_of_text_id", None)
        if start is None:
            raise ValueError("Scoring needs a tokenizer with an `end_of_text_id` to start from.")
        rows = [[int(i) for i in np.asarray(self.tokenizer.tokenize(t)).reshape(-1)] for t in texts]
        context_length = self.model.config.context_length
        for text, row in zip(texts, rows):
            if len(row) > context_length:
                raise ValueError(
                    f"A text to score has {len(row)} tokens, more than the context length "
                    f"{context_length}: {text[:40]!r}... Score shorter texts (or windows of it)."
                )
        width = max(2, 1 + max(len(row) for row in rows))
        ids = np.zeros((len(rows), width), np.int32)
        for b, row in enumerate(rows):
            ids[b, : len(row) + 1] = [start] + row
        lengths = np.array([len(row) + 1 for row in rows], np.int32)
        per_token = _score_function(self.model)(ids, lengths).numpy()
        scores = [Score(float(per_token[b, : len(row)].sum()), per_token[b, : len(row)])
                  for b, row in enumerate(rows)]
        return scores[0] if single else scores

    def _texts(self, decoded, rows):
        for chunk in decoded:
            pieces = []
            for b, (row, new_ids) in enumerate(zip(rows, chunk)):
                piece = row.feed(new_ids) if new_ids else ""
                if row.stopped:
                    decoded.stop(b)
                pieces.append(piece)
            yield pieces, chunk
            if all(row.stopped for row in rows):
                break
        yield [row.finish() for row in rows], [[] for _ in rows]

    def _bytes(self, ids):
        text = self.tokenizer.detokenize(tf.constant(ids, tf.int32))
        return text.numpy() if hasattr(text, "numpy") else bytes(text)


# ----------------------------------------------------------------------------------------------
# Text streaming helpers


class IncrementalText:
    """One row's token ids → text that can no longer change: holds back an unfinished character
    (see `TextGenerator`) and any tail that could be the start of a stop string.

    `detokenize`: ids → bytes. `feed(ids)` returns the new text that is final; `finish()` the
    rest; `stopped` turns true once a stop string was seen (the text ends before it)."""

    def __init__(self, detokenize, stop_strings):
        self.detokenize = detokenize  # ids -> bytes
        self.stop_strings = stop_strings
        self.block = []  # ids since the text last ended on a whole character
        self.block_emitted = 0  # characters of the block's text already decoded
        self.pending = ""  # decoded, not yet emitted (may start a stop string)
        self.stopped = False

    def feed(self, ids, final=False):
        if self.stopped:
            return ""
        self.block.extend(ids)
        text = self.detokenize(self.block).decode("utf-8", errors="replace") if self.block else ""
        held = 0 if final else _unfinished_length(text)
        self.pending += text[self.block_emitted : len(text) - held]
        if held:
            self.block_emitted = max(self.block_emitted, len(text) - held)
        else:
            self.block, self.block_emitted = [], 0
        found = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if found:
            self.stopped = True
            piece, self.pending = self.pending[: min(found)], ""
            return piece
        keep = 0 if final else _stop_prefix_length(self.pending, self.stop_strings)
        cut = len(self.pending) - keep
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        return piece

    def finish(self):
        return self.feed([], final=True)


def _unfinished_length(text):
    """Trailing U+FFFD characters (at most 3) that may be an incomplete UTF-8 sequence."""
    count = 0
    while count < 3 and count < len(text) and text[len(text) - 1 - count] == "\ufffd":
        count += 1
    return count


def _stop_prefix_length(text, stop_strings):
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


# ----------------------------------------------------------------------------------------------
# The Python driver: validation, buckets and chunks


class _Driver:
    """Validated arguments of one `generate`/`stream` call and the loop that calls the compiled
    core, chunk by chunk."""

    def __init__(self, model, prompts, max_new_tokens, knob_arguments, lengths, sliding_window,
                 cache_length, jit_compile, chunk_size):
        backends.require_tensorflow("gpt_keras.generation's compiled decoding loop (generate, "
                                    "stream, TextGenerator)", backends.USE_GENERATE_EAGER)
        config = model.config
        self.model = model
        context = config.context_length
        rows, self.single, self.max_new_tokens, chunk_size = decoding.check_arguments(
            prompts, lengths, max_new_tokens, chunk_size, config.vocab_size
        )
        self.batch_size = len(rows)
        self.jit_compile = resolve_jit_compile(model, jit_compile, self.batch_size)
        self.knobs, _ = decoding.knobs(config.vocab_size, **knob_arguments)
        self.stop_requests = set()
        self.logprobs = [[] for _ in range(self.batch_size)]
        if not sliding_window and self.max_new_tokens > context:
            raise ValueError(
                f"`max_new_tokens` must be at most context_length={context} when "
                f"`sliding_window=False`. Received: max_new_tokens={self.max_new_tokens}. "
                "Generate fewer tokens or pass `sliding_window=True`."
            )
        keep = context if sliding_window else context + 1 - max(self.max_new_tokens, 1)
        self.rows = decoding.crop_prompts(rows, keep, context, stacklevel=4)
        longest = max(len(row) for row in self.rows)
        needed = min(context, longest + max(self.max_new_tokens, 1) - 1)
        if cache_length is None:
            cache_length = min(context, bucket(needed))
        else:
            cache_length = decoding.check_int("cache_length", cache_length, minimum=1)
            if not needed <= cache_length <= context:
                raise ValueError(
                    f"`cache_length` must lie in [{needed}, context_length={context}] to "
                    f"hold the longest prompt ({longest} tokens) and the new tokens. "
                    f"Received: cache_length={cache_length}"
                )
        self.cache_length = cache_length
        # Each compiled call decides at most this many slots (its output holds as many).
        self.steps = min(chunk_size or cache_length + 1, cache_length + 1)

    def chunks(self):
        """Yields, after each compiled call, the new ids of every row (list of lists)."""
        if self.max_new_tokens == 0:
            return
        batch = self.batch_size
        width = min(self.cache_length, bucket(max(len(p) for p in self.rows)))
        padded = np.zeros([batch, width], np.int32)
        for b, p in enumerate(self.rows):
            padded[b, : len(p)] = p
        steps = tf.constant(self.steps, tf.int32)
        lengths = [len(p) for p in self.rows]
        # Slots to decide: each row's new tokens, the ragged rows' prompt tokens past the shortest.
        decisions = self.max_new_tokens + max(lengths) - min(lengths)
        state = self._function("whole" if decisions <= self.steps else "start", width)(
            tf.constant(padded), tf.constant(lengths, tf.int32),
            tf.constant(self.max_new_tokens, tf.int32), steps, self.knobs,
        )
        while True:
            out, emitted = state["out"].numpy(), state["emitted"].numpy()
            chunk = [out[b, : emitted[b]].tolist() for b in range(batch)]
            logprobs = state["logprobs"].numpy()
            for b in range(batch):
                self.logprobs[b].extend(logprobs[b, : emitted[b]].tolist())
            if any(chunk):
                yield chunk
            done = state["done"].numpy()
            if self.stop_requests:
                done[list(self.stop_requests)] = True
                state = dict(state, done=tf.constant(done))
            if done.all():
                return
            state = self._function("resume")(state, steps, self.knobs)

    def _function(self, kind, width=None):
        key = (kind, self.batch_size, width, self.cache_length, self.jit_compile)
        functions = _COMPILED.setdefault(self.model, {})
        if key not in functions:
            functions[key] = _compile(
                self.model, kind, self.batch_size, self.cache_length, self.jit_compile
            )
        return functions[key]


def _compile(model, kind, batch_size, cache_length, jit_compile):
    """A `tf.function` for one shape bucket: "whole" (the prefill, then up to `num_steps` - 1 more
    decisions: a generation that one call finishes), "start" (the prefill and the first decision
    only) or "resume" (up to `num_steps` more decisions). A generation of several calls runs
    "start" and then "resume", so that its decode loop is traced and compiled once, not in two
    functions. It refers to `model` weakly so that the registry entry disappears with the model."""
    model_ref = weakref.ref(model)
    out_width = cache_length + 1
    if kind != "resume":

        def function(prompt, lengths, max_new_tokens, num_steps, knobs):
            model = model_ref()
            state = decoding.start(
                model, prompt, lengths, knobs, max_new_tokens, cache_length, out_width,
                batch_size=batch_size,
            )
            return state if kind == "start" else decoding.decode(model, state, knobs,
                                                                 num_steps - 1)

    else:

        def function(state, num_steps, knobs):
            state = dict(state, out=tf.fill([batch_size, out_width], -1),
                         logprobs=tf.zeros([batch_size, out_width], tf.float32),
                         emitted=tf.zeros_like(state["emitted"]))
            return decoding.decode(model_ref(), state, knobs, num_steps)

    return tf.function(function, jit_compile=jit_compile, autograph=False)


def resolve_jit_compile(model, jit_compile, batch_size=1):
    """`jit_compile` of `generate` for `batch_size` rows → True or False (see there)."""
    if isinstance(jit_compile, bool):
        return jit_compile
    if jit_compile != "auto":
        raise ValueError(
            f"`jit_compile` must be True, False or 'auto'. Received: jit_compile={jit_compile!r}"
        )
    if getattr(model.token_embedding, "quantization_mode", None) == "int8":
        return True  # a plain graph casts each int8 kernel to float per call (BENCHMARKS.md)
    if model.compute_dtype == "bfloat16":
        return batch_size == 1
    return model.compute_dtype == "float32"


def bucket(n):
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them) that is
    ≥ `n`: at most a third of a cache is wasted, and few shapes need compiling."""
    size = _MIN_BUCKET
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size
