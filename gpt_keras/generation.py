"""Autoregressive generation for `GPT`: a compiled KV-cache decoding loop, samplers and streaming.

Shapes: B prompts in a batch, n_b tokens in prompt b, P the prefill width (a bucket ≥ max n_b),
S the KV-cache length (a bucket ≥ max n_b + max_new_tokens, at most `context_length`), V the
vocabulary.

How a batch is decoded. Prompts are **right-padded**: token j of every row sits at cache slot j,
which is also its position, so the model's scalar `cache_index` is right for every row and no
padding mask is needed. One pass writes the first P slots of a fixed-size `[B, L, 2, H, S, K]`
cache (prefill); then a `tf.while_loop` decides one slot per step for the whole batch, starting
at the shortest prompt's length. A row whose prompt is longer than the current slot is fed its own
prompt token instead of the sample (keras-hub's scheme), so its keys/values at that slot are
rewritten from the right token before any later query can see them: every slot a query attends
to holds a real token of its row. The cost of a ragged batch is `max n_b - min n_b` extra
single-token steps. Everything in the loop is a core TensorFlow op (tokens are written into the
`[B, S]` buffer with a one-hot `where`, random numbers come from an integer hash), so the same
function runs under XLA (`jit_compile=True`, the default) or without it, for a SavedModel that
TF Serving can load with XLA disabled. `generate_in_graph` is the whole of `generate` (sliding
window included) as one such graph, for export (`gpt_keras.serving`).

Compiled functions are cached per model and per shape bucket `(B, P, S)`; prompt contents,
`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed` and stop tokens are tensors, so calls
that differ only in those reuse the compiled function (`tracing_count(model)` counts traces).

Sampling (float32): `temperature == 0` is greedy (argmax). Otherwise logits are divided by
`temperature`, then restricted to the `top_k` largest, then to the nucleus (the fewest tokens,
most likely first, whose probability reaches `top_p`; renormalised after the top-k cut, as in
Hugging Face transformers), and a token is drawn by inverting the cumulative distribution with one
uniform number per row. Logits tied exactly at a cut-off are all kept. The uniform number for
slot `i` of row `b` is an integer hash of `(seed, i, b)`, so a fixed `seed` gives the same tokens
whatever the chunk size, and with or without XLA (up to float rounding in the cumulative sums).

Long generations (`sliding_window=True`, the default): when a sequence fills the context, the
cache is rebuilt by prefilling its last `context_length // 2` tokens at positions
`0 .. context_length // 2 - 1` (nanoGPT's crop, applied every `context_length // 2` tokens
instead of every token), and decoding continues. Every token is thus predicted from at least half
a context and at most a full one. With `sliding_window=False`, `max_new_tokens` must be below
`context_length` and prompts are cut so that prompt + new tokens fit.

A prompt keeps at most its last `context_length - 1` tokens (with `sliding_window=False`, its
last `context_length - max_new_tokens`); longer ones are cut with a `UserWarning`.

Example:

    model = gpt_keras.GPT.from_preset("tiny")
    generation.generate(model, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0)
    for chunk in generation.stream(model, [1, 2, 3], max_new_tokens=64, chunk_size=8):
        print(chunk)  # the next ≤ 8 new ids
"""

import math
import numbers
import random
import warnings
import weakref

import numpy as np
import tensorflow as tf

__all__ = [
    "Stream", "TextGenerator", "generate", "generate_in_graph", "sample", "stream",
    "tracing_count",
]

# Cache and prefill lengths are rounded up (see `_bucket`) to at least this, so that nearby
# prompt/generation lengths share one compiled function.
_MIN_BUCKET = 16

# `top_k`/`top_p` sampling looks at this many most likely tokens first (see `sample`).
_CANDIDATES = 256

# When a sequence fills the context, it continues from its last `context_length // _SLIDE_DIVISOR`
# tokens.
_SLIDE_DIVISOR = 2

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
    lengths=None,
    sliding_window=True,
    cache_length=None,
    jit_compile=True,
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
        top_k: None, or sample only among the `top_k` (≥ 1) most likely tokens.
        top_p: None, or nucleus sampling with mass `top_p` in (0, 1].
        seed: None (draw one from Python's `random`, which `keras.utils.set_random_seed` seeds)
            or an int: the same seed, prompts and knobs give the same tokens.
        stop_token_ids: ids that end a row. A row stops after emitting one.
        include_stop_token: whether a row that stopped keeps its stop token as its last id
            (default: dropped).
        lengths: `[B]` prompt lengths when `prompts` is a right-padded `[B, T]` array.
        sliding_window: allow generating past the context (see the module docstring); if False,
            `max_new_tokens ≥ context_length` raises `ValueError`.
        cache_length: the KV-cache length S (default: the smallest of 16, 24, 32, 48, 64, 96, ...
            that holds prompt + new tokens, at most `context_length`). Fixing it lets calls with
            different lengths share one compiled function.
        jit_compile: compile with XLA (True) or as a plain TensorFlow graph (False).

    Returns:
        A list (one per prompt) of lists of new token ids; a single list for a single 1-D prompt.
    """
    decoding = _Decoding(
        model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
        include_stop_token, lengths, sliding_window, cache_length, jit_compile, chunk_size=None,
    )
    rows = [[] for _ in range(decoding.batch_size)]
    for chunk in decoding.chunks():
        for row, ids in zip(rows, chunk):
            row.extend(ids)
    return rows[0] if decoding.single else rows


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
    lengths=None,
    sliding_window=True,
    cache_length=None,
    jit_compile=True,
):
    """Like `generate`, but decodes `chunk_size` slots per compiled call and yields the new ids
    after each call; the KV cache stays in memory between calls. `chunk_size=None` decodes
    everything in one call. Arguments are checked here, before iteration starts.

    Returns a `Stream`: iterate it to get, per chunk, a list (one per prompt) of lists of new ids
    (a single list for a single 1-D prompt); chunks where no row got a new token are skipped.
    Joining the chunks gives exactly `generate`'s output for the same arguments. `Stream.stop(b)`
    ends row b before the next chunk (e.g. when its text reached a stop string).
    """
    return Stream(
        _Decoding(
            model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
            include_stop_token, lengths, sliding_window, cache_length, jit_compile, chunk_size,
        )
    )


def tracing_count(model):
    """How many times the generation functions of `model` have been traced (all buckets)."""
    return sum(fn.experimental_get_tracing_count() for fn in _COMPILED.get(model, {}).values())


class Stream:
    """An iterator over the chunks of a streamed generation (see `stream`)."""

    def __init__(self, decoding):
        self._decoding = decoding
        self._chunks = decoding.chunks()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._chunks)

    @property
    def batch_size(self):
        return self._decoding.batch_size

    def stop(self, row):
        """Ends row `row` (0-based) before the next chunk is decoded."""
        if not isinstance(row, numbers.Integral) or not 0 <= row < self.batch_size:
            raise ValueError(
                f"`row` must be an int in [0, {self.batch_size}). Received: row={row!r}"
            )
        self._decoding.stop_requests.add(int(row))


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

    def __init__(self, model, tokenizer, jit_compile=True):
        self.model = model
        self.tokenizer = tokenizer
        self.jit_compile = jit_compile

    def generate(self, prompts, max_new_tokens, *, stop_strings=(), **kwargs):
        """The generated text (without the prompt) for a `str` prompt, or a list of texts for a
        list of prompts. `stop_strings`: a row's text ends just before the first of them (checked
        between chunks of `chunk_size`, default 16, so that decoding stops soon after). Other
        keyword arguments are those of `generate` (`stop_token_ids` defaults to the tokenizer's
        end-of-text id)."""
        if stop_strings:
            kwargs.setdefault("chunk_size", 16)
        else:
            kwargs.setdefault("chunk_size", None)
        pieces = None
        for chunk in self.stream(prompts, max_new_tokens, stop_strings=stop_strings, **kwargs):
            if isinstance(chunk, str):
                pieces = (pieces or "") + chunk
            else:
                pieces = chunk if pieces is None else [a + b for a, b in zip(pieces, chunk)]
        if pieces is None:  # nothing was generated
            return "" if isinstance(prompts, str) else [""] * len(prompts)
        return pieces

    def stream(self, prompts, max_new_tokens, *, chunk_size=8, stop_strings=(), **kwargs):
        """An iterator over the new text as it is decoded: a `str` per chunk for a `str` prompt,
        a list of `str` (one per prompt, possibly empty) for a list. Never yields half a
        character, nor text that may turn out to be the start of a stop string. Arguments are
        checked here, before iteration starts."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                "`prompts` must be a `str` or a non-empty list of `str`. "
                f"Received: prompts={prompts!r}"
            )
        stop_strings = _check_stop_strings(stop_strings)
        end_of_text = getattr(self.tokenizer, "end_of_text_id", None)
        if end_of_text is not None:
            kwargs.setdefault("stop_token_ids", (end_of_text,))
        ids = []
        for text in texts:
            row = [int(i) for i in np.asarray(self.tokenizer.tokenize(text)).reshape(-1)]
            if not row and end_of_text is not None:
                row = [int(end_of_text)]
            ids.append(row)
        kwargs.setdefault("jit_compile", self.jit_compile)
        decoded = stream(self.model, ids, max_new_tokens, chunk_size=chunk_size, **kwargs)
        rows = [_TextRow(self._bytes, stop_strings) for _ in texts]
        return self._texts(decoded, rows, single)

    def _texts(self, decoded, rows, single):
        for chunk in decoded:
            pieces = []
            for b, (row, new_ids) in enumerate(zip(rows, chunk)):
                piece = row.feed(new_ids) if new_ids else ""
                if row.stopped:
                    decoded.stop(b)
                pieces.append(piece)
            if any(pieces):
                yield pieces[0] if single else pieces
            if all(row.stopped for row in rows):
                break
        pieces = [row.finish() for row in rows]
        if any(pieces):
            yield pieces[0] if single else pieces

    def _bytes(self, ids):
        text = self.tokenizer.detokenize(tf.constant(ids, tf.int32))
        return text.numpy() if hasattr(text, "numpy") else bytes(text)


# ----------------------------------------------------------------------------------------------
# Text streaming helpers


class _TextRow:
    """One row's token ids → text that can no longer change: holds back an unfinished character
    (see `TextGenerator`) and any tail that could be the start of a stop string."""

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


def _check_stop_strings(stop_strings):
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stop_strings = tuple(stop_strings)
    if not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(
            "`stop_strings` must be non-empty strings. Received: "
            f"stop_strings={stop_strings!r}"
        )
    return stop_strings


# ----------------------------------------------------------------------------------------------
# The Python driver: validation, buckets, chunks and the sliding window


class _Decoding:
    """Validated arguments of one `generate`/`stream` call and the loop that drives the compiled
    functions, chunk by chunk."""

    def __init__(
        self, model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
        include_stop_token, lengths, sliding_window, cache_length, jit_compile, chunk_size,
    ):
        config = model.config
        self.model = model
        self.context = config.context_length
        self.vocab_size = config.vocab_size
        self.rows, self.single = _normalize_prompts(prompts, lengths, self.vocab_size)
        self.batch_size = len(self.rows)
        self.max_new_tokens = _check_int("max_new_tokens", max_new_tokens, minimum=0)
        if chunk_size is not None:
            chunk_size = _check_int("chunk_size", chunk_size, minimum=1)
        self.chunk_size = chunk_size
        self.include_stop_token = bool(include_stop_token)
        self.jit_compile = bool(jit_compile)
        self.sliding_window = bool(sliding_window)
        self.knobs, self.stop_ids = _knobs(
            temperature, top_k, top_p, seed, stop_token_ids, self.vocab_size
        )
        self.stop_requests = set()

        if not self.sliding_window and self.max_new_tokens >= self.context:
            raise ValueError(
                f"`max_new_tokens` must be below context_length={self.context} when "
                f"`sliding_window=False`. Received: max_new_tokens={self.max_new_tokens}. "
                "Generate fewer tokens or pass `sliding_window=True`."
            )
        keep = self.context - 1 if self.sliding_window else self.context - self.max_new_tokens
        for b, row in enumerate(self.rows):
            if len(row) > keep:
                warnings.warn(
                    f"Prompt {b} has {len(row)} tokens; keeping its last {keep} so that "
                    f"{'new tokens fit' if not self.sliding_window else 'a new token fits'} in "
                    f"context_length={self.context}.",
                    stacklevel=3,
                )
                self.rows[b] = row[-keep:]
        longest = max(len(row) for row in self.rows)
        needed = min(self.context, longest + self.max_new_tokens)
        if cache_length is None:
            cache_length = min(self.context, _bucket(needed))
        else:
            cache_length = _check_int("cache_length", cache_length, minimum=1)
            if not needed <= cache_length <= self.context:
                raise ValueError(
                    f"`cache_length` must lie in [{needed}, context_length={self.context}] to "
                    f"hold the longest prompt ({longest} tokens) and the new tokens. "
                    f"Received: cache_length={cache_length}"
                )
        self.cache_length = cache_length

    def chunks(self):
        """Yields, after each compiled call, the new ids of every row (list of lists)."""
        if self.max_new_tokens == 0:
            return
        batch, cache_length = self.batch_size, self.cache_length
        remaining = np.full([batch], self.max_new_tokens, np.int64)  # new tokens still allowed
        finished = np.zeros([batch], bool)
        prompts = self.rows
        offset = 0  # absolute position of slot 0 (grows when the window slides)
        state = None
        steps = tf.constant(self.chunk_size or cache_length, tf.int32)
        while True:
            if state is None:  # prefill `prompts` (at the start, and after a slide)
                width = min(cache_length, _bucket(max(len(p) for p in prompts)))
                padded = np.zeros([batch, width], np.int32)
                for b, p in enumerate(prompts):
                    padded[b, : len(p)] = p
                starts = np.array([len(p) for p in prompts], np.int64)
                limits = np.minimum(starts + remaining, cache_length)
                start = self._function("start", width)
                state = start(
                    tf.constant(padded),
                    tf.constant(starts, tf.int32),
                    tf.constant(limits, tf.int32),
                    tf.constant(finished),
                    tf.constant(offset, tf.int32),
                    steps,
                    self.knobs,
                )
            else:
                if self.stop_requests:
                    finished[list(self.stop_requests)] = True
                    state = dict(state, done=tf.constant(state["done"].numpy() | finished))
                state = self._function("resume")(state, steps, self.knobs)
            tokens = state["tokens"].numpy()
            ends = state["ends"].numpy()
            done = state["done"].numpy()
            cursor = int(state["cursor"])
            chunk = []
            for b in range(batch):
                new = [] if finished[b] else tokens[b, starts[b] : ends[b]].tolist()
                starts[b] = max(starts[b], ends[b])
                remaining[b] -= len(new)
                if new and new[-1] in self.stop_ids:
                    finished[b] = True
                    if not self.include_stop_token:
                        new.pop()
                if remaining[b] == 0 or b in self.stop_requests:
                    finished[b] = True
                chunk.append(new)
            if any(chunk):
                yield chunk
            finished[list(self.stop_requests)] = True
            if finished.all():
                return
            if done.all() or cursor >= cache_length:
                # Every unfinished row has filled the cache: continue from its last tokens.
                if not self.sliding_window or cursor != cache_length:
                    raise RuntimeError(  # cannot happen: limits never exceed the cache
                        "gpt_keras internal error: decoding stopped before its rows finished."
                    )
                keep = max(1, self.context // _SLIDE_DIVISOR)
                prompts = [row[cache_length - keep : cache_length] for row in tokens]
                offset += cache_length - keep
                state = None

    def _function(self, kind, width=None):
        key = (kind, self.batch_size, width, self.cache_length, self.jit_compile)
        functions = _COMPILED.setdefault(self.model, {})
        if key not in functions:
            functions[key] = _compile(
                self.model, kind, self.batch_size, self.cache_length, self.jit_compile
            )
        return functions[key]


def _bucket(n):
    """The smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them) that is
    ≥ `n`: at most a third of a cache is wasted, and few shapes need compiling."""
    size = _MIN_BUCKET
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _normalize_prompts(prompts, lengths, vocab_size):
    """→ (list of int64 arrays, whether a single 1-D prompt was given)."""
    if isinstance(prompts, tf.RaggedTensor):
        prompts = prompts.to_list()
    elif isinstance(prompts, tf.Tensor):
        prompts = prompts.numpy()
    single = False
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 1:
            prompts, single = prompts[None], True
        if prompts.ndim != 2:
            raise ValueError(
                "`prompts` must be a list of token-id sequences, a 2-D [batch, time] array or one "
                f"1-D sequence. Received an array of shape {prompts.shape}."
            )
        rows = list(prompts)
        if lengths is not None:
            lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
            if len(lengths) != len(rows) or any(not 0 <= n <= prompts.shape[1] for n in lengths):
                raise ValueError(
                    f"`lengths` must hold one length in [0, {prompts.shape[1]}] per prompt row "
                    f"({len(rows)} rows). Received: lengths={lengths}"
                )
            rows = [row[:n] for row, n in zip(rows, lengths)]
    else:
        if lengths is not None:
            raise ValueError("`lengths` is only used with a 2-D array of padded prompts.")
        prompts = list(prompts)
        if prompts and all(isinstance(t, numbers.Integral) for t in prompts):
            prompts, single = [prompts], True
        rows = prompts
    if not rows:
        raise ValueError(
            "`prompts` is empty: pass at least one prompt (a list of token-id lists). "
            f"Received: prompts={prompts!r}"
        )
    checked = []
    for b, row in enumerate(rows):
        try:
            array = np.asarray(row)
        except ValueError:
            array = None
        if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(
                f"Prompt {b} must be a 1-D sequence of int token ids. Received: {row!r}"
            )
        if array.size == 0:
            raise ValueError(
                f"Prompt {b} is empty; every prompt needs at least one token (e.g. start from "
                "the tokenizer's end-of-text id)."
            )
        bad = array[(array < 0) | (array >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"Prompt {b} has token id {int(bad[0])} outside the vocabulary [0, {vocab_size})."
            )
        checked.append(array.astype(np.int64))
    return checked, single


def _check_int(name, value, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}. Received: {name}={value!r}")
    return int(value)


def _knobs(temperature, top_k, top_p, seed, stop_token_ids, vocab_size):
    """Validated sampling settings as tensors with fixed shapes and dtypes (so they never cause a
    retrace), and the stop ids as a Python set."""
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(
            "`temperature` must be a finite number ≥ 0 (0 = greedy). "
            f"Received: temperature={temperature!r}"
        )
    if top_k is not None:
        top_k = _check_int("top_k", top_k, minimum=1)
    if top_p is not None and (
        not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0 < top_p <= 1
    ):
        raise ValueError(f"`top_p` must be a number in (0, 1]. Received: top_p={top_p!r}")
    if seed is None:
        seed = random.getrandbits(62)
    elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
    seed = int(seed) % (1 << 62)
    if isinstance(stop_token_ids, numbers.Integral):
        stop_token_ids = (stop_token_ids,)
    stop_ids = set()
    for token in stop_token_ids:
        if not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            raise ValueError(
                f"`stop_token_ids` must be ids in [0, {vocab_size}). "
                f"Received: stop_token_ids={stop_token_ids!r}"
            )
        stop_ids.add(int(token))
    stop_mask = np.zeros([vocab_size], bool)
    stop_mask[list(stop_ids)] = True
    knobs = {
        "temperature": tf.constant(float(temperature), tf.float32),
        "top_k": tf.constant(min(top_k or vocab_size, vocab_size), tf.int32),
        "top_p": tf.constant(1.0 if top_p is None else float(top_p), tf.float32),
        "seed": tf.constant([seed >> 31, seed & ((1 << 31) - 1)], tf.int32),
        "stop_mask": tf.constant(stop_mask),
    }
    return knobs, stop_ids


# ----------------------------------------------------------------------------------------------
# The compiled graph: prefill, per-slot sampling, and the decoding loop
#
# `state` is a dict of tensors:
#   tokens  int32 [B, S]  prompts (right-padded) and the tokens decided so far
#   lengths int32 [B]     prompt lengths: slots < lengths[b] are prompt tokens of row b
#   limits  int32 [B]     a row stops once slot limits[b] - 1 is decided
#   ends    int32 [B]     one past the last decided token of each row
#   done    bool  [B]     rows that stopped (stop token, limit, or told to)
#   cursor  int32 []      the next slot to decide; token `cursor - 1` is not in the cache yet
#   offset  int32 []      absolute position of slot 0 (for random numbers after a slide)
#   cache   [B, L, 2, H, S, K] the model's KV cache; slots < cursor - 1 are filled


def _compile(model, kind, batch_size, cache_length, jit_compile):
    """A `tf.function` for one shape bucket. It refers to `model` weakly so that the registry
    entry disappears with the model."""
    model_ref = weakref.ref(model)
    if kind == "start":

        def function(prompt, lengths, limits, done, offset, num_steps, knobs):
            return _start(
                model_ref(), batch_size, cache_length, prompt, lengths, limits, done, offset,
                num_steps, knobs,
            )

    else:

        def function(state, num_steps, knobs):
            return _decode_loop(model_ref(), state, num_steps, knobs)

    return tf.function(function, jit_compile=jit_compile, autograph=False)


def _start(
    model, batch_size, cache_length, prompt, lengths, limits, done, offset, num_steps, knobs
):
    """Prefills the cache with `prompt` `[B, P]`, decides the first slot from the prefill's
    logits, then runs `num_steps - 1` more decoding steps. `batch_size` None: read from `prompt`
    (a graph with a dynamic batch, e.g. for export)."""
    width = tf.shape(prompt)[1]
    tokens = tf.pad(prompt, [[0, 0], [0, cache_length - width]])  # [B, S]
    tokens = tf.ensure_shape(tokens, [batch_size, cache_length])
    cache = model.init_layer_caches(batch_size or tf.shape(prompt)[0], cache_length)
    logits, cache = model.call_with_layer_caches(prompt, cache, 0)  # [B, P, V]
    cursor = tf.reduce_min(lengths)  # the shortest prompt's first new slot
    state = {
        "tokens": tokens,
        "lengths": lengths,
        "limits": limits,
        "ends": lengths,
        "done": done,
        "cursor": cursor,
        "offset": offset,
        "cache": cache,
    }
    state = _decide(state, tf.gather(logits, cursor - 1, axis=1), knobs)  # logits [B, V]
    return _decode_loop(model, state, num_steps - 1, knobs)


def _decode_loop(model, state, num_steps, knobs):
    """Up to `num_steps` steps, each feeding token `cursor - 1` to the model and deciding slot
    `cursor`; stops early when every row is done or the cache is full."""
    cache_length = state["tokens"].shape[1]
    last = state["cursor"] + num_steps

    def keep_going(state):
        cursor = state["cursor"]
        return tf.logical_and(
            tf.logical_and(cursor < last, cursor < cache_length),
            tf.logical_not(tf.reduce_all(state["done"])),
        )

    def step(state):
        index = state["cursor"] - 1
        token = tf.gather(state["tokens"], index, axis=1)  # [B]
        logits, cache = model.call_with_layer_caches(
            tf.expand_dims(token, 1), state["cache"], index
        )
        state = dict(state, cache=cache)
        return (_decide(state, logits[:, 0], knobs),)  # logits [B, V]

    return tf.while_loop(keep_going, step, (state,))[0]


def _decide(state, logits, knobs):
    """Decides slot `cursor` of every row from `logits` `[B, V]` (predicting that slot): a sample
    for rows past their prompt, the prompt token otherwise; then updates `ends` and `done`."""
    index = state["cursor"]
    tokens, done = state["tokens"], state["done"]
    sampled = sample(  # [B]
        logits,
        knobs["temperature"],
        knobs["top_k"],
        knobs["top_p"],
        knobs["seed"],
        index + state["offset"],
    )
    writes = tf.logical_and(tf.logical_not(done), index >= state["lengths"])  # [B]
    column = tf.equal(tf.range(tokens.shape[1]), index)  # [S]: one-hot write, core ops only
    tokens = tf.where(
        tf.logical_and(tf.expand_dims(writes, 1), tf.expand_dims(column, 0)),
        tf.expand_dims(sampled, 1),
        tokens,
    )
    stops = tf.logical_or(tf.gather(knobs["stop_mask"], sampled), index + 1 >= state["limits"])
    return dict(
        state,
        tokens=tokens,
        ends=tf.where(writes, index + 1, state["ends"]),
        done=tf.logical_or(done, tf.logical_and(writes, stops)),
        cursor=index + 1,
    )


def generate_in_graph(
    model, prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids
):
    """`generate` as one TensorFlow graph, for export (TF Serving runs it with XLA disabled):
    the same tokens as `generate(..., include_stop_token=False, sliding_window=True)` for the
    same prompts, knobs and `seed`, with core TensorFlow ops only and a dynamic batch.

    `prompt` int32 `[B, P]` right-padded, `lengths` int32 `[B]` (each ≥ 1; a prompt keeps its
    last `context_length - 1` tokens), `max_new_tokens` int32 `[]`, `temperature`/`top_p`
    float32 `[]`, `top_k` int32 `[]`, `seed` int64 `[]`, `stop_token_ids` a Python sequence of
    ids. Invalid knobs raise `InvalidArgumentError` naming the value (the rules of `generate`).
    Returns `(new_ids, counts)`: int32 `[B, max_new_tokens]` padded with -1, and int32 `[B]`.

    Decoding prefills a full-context cache (S = `context_length`) and slides it as the Python
    driver does (module docstring), in an outer `tf.while_loop`.
    """
    config = model.config
    context, vocab_size = config.context_length, config.vocab_size
    if context < 2:
        raise ValueError(
            f"In-graph generation needs context_length ≥ 2. Received: context_length={context}"
        )
    checks = [
        check_in_graph(
            max_new_tokens >= 0,
            "`max_new_tokens` must be an integer >= 0. Received: max_new_tokens={}",
            max_new_tokens,
        ),
        check_in_graph(
            tf.logical_and(tf.math.is_finite(temperature), temperature >= 0.0),
            "`temperature` must be a finite number >= 0 (0 = greedy). Received: temperature={}",
            temperature,
        ),
        check_in_graph(top_k >= 1, "`top_k` must be an integer >= 1. Received: top_k={}", top_k),
        check_in_graph(
            tf.logical_and(top_p > 0.0, top_p <= 1.0),
            "`top_p` must be a number in (0, 1]. Received: top_p={}", top_p,
        ),
        check_in_graph(tf.size(lengths) > 0, "Pass at least one prompt. Received none."),
        check_in_graph(
            tf.reduce_all(lengths >= 1),
            "Every prompt needs at least one token. Received lengths {}", lengths,
        ),
        check_in_graph(
            tf.reduce_all(tf.logical_and(prompt >= 0, prompt < vocab_size)),
            f"Prompt token ids must lie in [0, {vocab_size}). Received: {{}}", prompt,
        ),
    ]
    with tf.control_dependencies(checks):  # every later op runs after the checks
        inputs = (prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed)
        prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed = map(tf.identity, inputs)
    prompt, lengths = _keep_last(prompt, lengths, context - 1)
    seed = tf.math.floormod(seed, tf.constant(1 << 62, tf.int64))  # as `_knobs`
    stop_mask = np.zeros([vocab_size], bool)
    stop_mask[list(stop_token_ids)] = True
    knobs = {
        "temperature": temperature,
        "top_k": tf.minimum(top_k, vocab_size),
        "top_p": top_p,
        "seed": tf.cast(tf.stack([seed // (1 << 31), seed % (1 << 31)]), tf.int32),
        "stop_mask": tf.constant(stop_mask),
    }
    batch = tf.shape(prompt)[0]
    keep = max(1, context // _SLIDE_DIVISOR)
    columns = tf.expand_dims(tf.range(max_new_tokens), 0)  # [1, N]

    def window(prompt, lengths, offset, new_ids, counts, finished, stopped):
        """Decodes one cache's worth (as `_Decoding.chunks` with `chunk_size=None`), appends the
        new ids of every row to `new_ids` `[B, N]`, then slides."""
        limits = tf.minimum(lengths + max_new_tokens - counts, context)
        state = _start(
            model, None, context, prompt, lengths, limits, finished, offset, context, knobs
        )
        tokens = state["tokens"]  # [B, S]
        fresh = tf.where(finished, 0, state["ends"] - lengths)  # [B] new ids in this window
        source = tf.expand_dims(lengths - counts, 1) + columns  # [B, N]: slot of column n
        inside = tf.logical_and(
            columns >= tf.expand_dims(counts, 1), columns < tf.expand_dims(counts + fresh, 1)
        )
        picked = tf.gather(tokens, tf.clip_by_value(source, 0, context - 1), batch_dims=1)
        new_ids = tf.where(inside, picked, new_ids)
        last = tf.gather(tokens, tf.maximum(state["ends"] - 1, 0), batch_dims=1)  # [B]
        hit_stop = tf.logical_and(fresh > 0, tf.gather(knobs["stop_mask"], last))
        counts += fresh
        finished = tf.logical_or(finished, tf.logical_or(hit_stop, counts >= max_new_tokens))
        # Unfinished rows filled the cache: continue from their last `keep` tokens.
        return (
            tokens[:, context - keep :], tf.fill([batch], keep), offset + context - keep,
            new_ids, counts, finished, tf.logical_or(stopped, hit_stop),
        )

    loop_vars = (
        prompt, lengths, tf.constant(0), tf.fill([batch, max_new_tokens], -1),
        tf.zeros([batch], tf.int32), tf.fill([batch], max_new_tokens <= 0),
        tf.zeros([batch], tf.bool),
    )
    row, matrix = tf.TensorShape([None]), tf.TensorShape([None, None])
    invariants = (matrix, row, tf.TensorShape([]), matrix, row, row, row)
    *_, new_ids, counts, _, stopped = tf.while_loop(
        lambda *state: tf.logical_not(tf.reduce_all(state[5])), window, loop_vars,
        shape_invariants=invariants,
    )
    counts -= tf.cast(stopped, tf.int32)  # the stop token is not returned
    return tf.where(columns < tf.expand_dims(counts, 1), new_ids, -1), counts


def _keep_last(prompt, lengths, keep):
    """Right-padded `prompt` `[B, P]` → its rows' last `keep` tokens `[B, min(P, keep)]`, and
    the new lengths `[B]`."""
    width = tf.minimum(tf.shape(prompt)[1], keep)
    start = tf.maximum(lengths - keep, 0)  # [B]
    source = tf.expand_dims(start, 1) + tf.expand_dims(tf.range(width), 0)  # [B, W]
    lengths = tf.minimum(lengths, keep)
    kept = tf.gather(prompt, tf.minimum(source, tf.shape(prompt)[1] - 1), batch_dims=1)
    return tf.where(source < tf.expand_dims(start + lengths, 1), kept, 0), lengths


def check_in_graph(condition, message, *values):
    """An assertion op that fails with `InvalidArgumentError: <message>`, its `{}` filled with
    `values` (TF Serving answers it with HTTP 400 and the message)."""
    return tf.debugging.Assert(condition, [tf.strings.format(message, values, summarize=8)])


def sample(logits, temperature, top_k, top_p, seed, position=0):
    """One token id per row of float logits `[B, V]`, in float32, with core TensorFlow ops.

    `temperature` (scalar, 0 = argmax), `top_k` (int32 scalar in [1, V]; V = off), `top_p`
    (scalar in (0, 1]; 1 = off), `seed` (int32 `[2]`, each in [0, 2**31)) and `position` (int32
    scalar, mixed into the random numbers) are tensors, so one graph serves every setting.
    Returns int32 `[B]`.

    A token is drawn by inverting the cumulative distribution with one uniform number per row.
    `top_k`/`top_p` work on the `_CANDIDATES` most likely tokens (`tf.math.top_k` with a static
    k, fast under XLA) when the kept set is known to lie among them (`top_k ≤ _CANDIDATES`, or a
    nucleus whose mass they reach); otherwise on the whole vocabulary, with cut-offs found by
    bisection (a full sort of 50k logits costs ~8 ms per row on CPU, under XLA or not).
    """
    logits = tf.cast(logits, tf.float32)
    vocab_size = logits.shape[-1]

    def greedy():
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    def draw():
        # Shifted so the maximum is 0: a tiny temperature sends the others to -inf, never NaN.
        scaled = (logits - tf.reduce_max(logits, axis=-1, keepdims=True)) / temperature
        uniform = _uniform(tf.shape(scaled)[:1], seed, position)  # [B]
        return tf.cond(
            tf.logical_or(top_k < vocab_size, top_p < 1.0),
            lambda: _sample_restricted(scaled, top_k, top_p, uniform),
            lambda: _inverse_cdf(tf.nn.softmax(scaled, axis=-1), uniform),
        )

    return tf.cond(temperature > 0.0, draw, greedy)


def _sample_restricted(logits, top_k, top_p, uniform):
    """A sample from softmax(`logits` `[B, V]`) restricted to the `top_k` largest, then to the
    nucleus of mass `top_p` (probabilities renormalised after the top-k cut, as in Hugging Face
    transformers)."""
    vocab_size = logits.shape[-1]
    count = min(vocab_size, _CANDIDATES)
    values, ids = tf.math.top_k(logits, k=count)  # [B, C], descending
    # Probabilities of the candidates under the full softmax.
    probabilities = tf.exp(values - tf.reduce_logsumexp(logits, axis=-1, keepdims=True))
    top_k_fits = top_k <= count
    nucleus_fits = tf.logical_and(
        tf.logical_and(top_k >= vocab_size, top_p < 1.0),
        tf.reduce_all(tf.reduce_sum(probabilities, axis=-1) >= top_p),
    )

    def among_candidates():
        in_top_k = tf.expand_dims(tf.range(count) < top_k, 0)  # [1, C]
        kept = tf.where(in_top_k, probabilities, 0.0)
        if_cut = tf.reduce_sum(kept, axis=-1, keepdims=True)
        kept = kept / tf.where(top_k_fits, if_cut, 1.0)  # renormalised after a top-k cut
        mass_before = tf.cumsum(kept, axis=-1, exclusive=True)
        # The most likely token always stays: its mass_before is 0 < top_p.
        kept = tf.where(mass_before < top_p, kept, 0.0)
        return tf.gather(ids, _inverse_cdf(kept, uniform), axis=1, batch_dims=1)

    def whole_vocabulary():
        restricted = tf.cond(
            top_k < vocab_size,
            lambda: tf.where(
                logits >= tf.expand_dims(_top_k_floor(logits, top_k), 1), logits, -np.inf
            ),
            lambda: logits,
        )
        kept = tf.nn.softmax(restricted, axis=-1)
        kept = tf.cond(
            top_p < 1.0,
            lambda: tf.where(kept >= tf.expand_dims(_nucleus_floor(kept, top_p), 1), kept, 0.0),
            lambda: kept,
        )
        return _inverse_cdf(kept, uniform)

    return tf.cond(tf.logical_or(top_k_fits, nucleus_fits), among_candidates, whole_vocabulary)


def _inverse_cdf(weights, uniform):
    """Per row of non-negative `weights` `[B, n]` (not all zero), the index j with
    `cumsum[j-1] ≤ uniform · total < cumsum[j]`: a draw from `weights / total`. int32 `[B]`."""
    size = weights.shape[-1]
    cumulative = tf.cumsum(weights, axis=-1)  # [B, n]
    target = tf.expand_dims(uniform * cumulative[:, -1], 1)
    index = tf.reduce_sum(tf.cast(cumulative <= target, tf.int32), axis=-1)
    # Rounding can put the target at the total: fall back to the last token of non-zero weight.
    last = tf.reduce_max(tf.where(weights > 0, tf.range(size), 0), axis=-1)
    return tf.minimum(index, last)


def _top_k_floor(logits, top_k):
    """Per row `[B]`, a value t with at least `top_k` logits ≥ t and within float rounding of the
    `top_k`-th largest: bisection on the value (no sort)."""
    finite = tf.where(tf.math.is_finite(logits), logits, 0.0)
    return _bisect(
        tf.reduce_min(finite, axis=-1),  # at least top_k logits are ≥ this (all the finite ones)
        tf.reduce_max(logits, axis=-1),
        lambda floor: tf.reduce_sum(
            tf.cast(logits >= tf.expand_dims(floor, 1), tf.int32), axis=-1
        ) >= top_k,
    )


def _nucleus_floor(probabilities, top_p):
    """Per row `[B]`, the largest probability t (up to bisection precision) such that the
    tokens with probability ≥ t hold mass ≥ `top_p`: those tokens are the nucleus."""
    return _bisect(
        tf.zeros_like(probabilities[:, 0]),  # all tokens: mass 1 ≥ top_p
        tf.reduce_max(probabilities, axis=-1),
        lambda floor: tf.reduce_sum(
            tf.where(probabilities >= tf.expand_dims(floor, 1), probabilities, 0.0), axis=-1
        ) >= top_p,
    )


def _bisect(low, high, holds, iterations=32):
    """Moves `low` `[B]` up towards `high` while `holds(low)` stays true (it must hold at the
    start and be monotone); returns `low`."""

    def step(i, low, high):
        middle = (low + high) / 2
        ok = holds(middle)
        return i + 1, tf.where(ok, middle, low), tf.where(ok, high, middle)

    _, low, _ = tf.while_loop(
        lambda i, low, high: i < iterations, step, (tf.constant(0), low, high)
    )
    return low


def _uniform(shape, seed, position):
    """Uniform float32 numbers in (0, 1) of `shape`, a function of `seed` `[2]`, `position`
    and the element's index only: a counter-based hash in uint32 arithmetic.

    TensorFlow's stateless random ops would do, but their XLA kernels lay the Philox stream out
    differently from the plain-TensorFlow ones (measured: different numbers for one seed), so
    the same seed would sample different tokens with and without `jit_compile`. Integer
    multiply/xor/shift are bit-exact everywhere.
    """
    seed = tf.cast(seed, tf.uint32)
    key = _mix(tf.bitwise.bitwise_xor(seed[0], _mix(tf.cast(position, tf.uint32))))
    key2 = _mix(tf.bitwise.bitwise_xor(seed[1], key))
    counter = tf.reshape(tf.cast(tf.range(tf.reduce_prod(shape)), tf.uint32), shape)
    bits = _mix(tf.bitwise.bitwise_xor(_mix(tf.bitwise.bitwise_xor(counter, key)), key2))
    top24 = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.int32)
    return (tf.cast(top24, tf.float32) + 0.5) * (1.0 / (1 << 24))


def _mix(x):
    """A 32-bit integer hash with good avalanche (Chris Wellons' "lowbias32"); a bijection."""
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(shift, tf.uint32)))
        x = x * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
