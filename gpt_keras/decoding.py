"""The decoding core: one definition of the decode loop and of its settings, used by every engine.

In-process generation (`gpt_keras.generation`, XLA or not), the SavedModel's `generate`
signatures (`gpt_keras.serving`, run by TF Serving with XLA disabled) and the TFLite `generate`
signature (`gpt_keras.tflite`) all call `start` and `decode` below, and validate their settings
with the rules in `RULES`. Everything here is a core TensorFlow op that also converts to a TFLite
builtin (but the in-place cache write, which the TFLite signature turns off with
`in_place=False`), so one graph runs in all three places and gives the same tokens for a seed.

Shapes: B prompts, P the prefill width (≥ the longest prompt), S the KV-cache length
(≤ C = `context_length`), W = S + 1 slots of token buffer, V the vocabulary, N the width of a
call's output buffer.

How a batch is decoded. Prompts are **right-padded**: token j of every row sits at slot j, which is
also its position, so the model's scalar `cache_index` is right for every row. `start` prefills
the cache with the prompts and decides slot `min(lengths)` from the prefill; each step of `decode`
then feeds token `cursor - 1` and decides slot `cursor` for the whole batch. A row whose prompt is
longer than the cursor keeps its own prompt token (keras-hub's scheme): its keys/values at that
slot are written from the right token before any query can see them. The cost of a ragged batch is
`max n_b - min n_b` extra single-token steps.

The context is used in full: slot S is predicted from the S tokens in the cache. When a sequence
needs a token after a full context (S = C), the window slides: its last `C // 2` tokens move to
slots `0 ..` (positions restart there), are prefilled, and decoding continues, so every token is
predicted from at least half a context and at most a full one (nanoGPT's crop, applied every
C // 2 tokens instead of every token).

Settings (one convention everywhere; `RULES` states the bounds):
- `max_new_tokens` ≥ 0: new ids per row, fewer if a stop token comes first (it counts as one).
- `temperature` ≥ 0, finite; 0 = greedy. `top_k` ≥ 0, 0 (or None in Python) = no cut.
  `top_p` in (0, 1], 1 (or None) = no cut. See `gpt_keras.sampling` for how they combine.
- `seed`: an int (taken modulo 2**62; None in Python draws one from Python's `random`, which
  `keras.utils.set_random_seed` seeds). The random number for slot i of row b is a hash of
  (seed, i + offset, b), so a seed gives the same tokens whatever the chunking or the engine.
- `stop_token_ids`: ids in [0, V) that end a row. In tensor form (signatures) -1 entries are
  padding and ignored. `include_stop_token`: whether the stop id is returned (default not).
- `repetition_penalty` > 0, 1 = off (Hugging Face's `RepetitionPenaltyLogitsProcessor`): the logit
  of every token already in the row's window (prompt and new tokens; the whole sequence until the
  window first slides) is divided by it if positive, multiplied by it if not.
- `min_new_tokens` ≥ 0: stop ids cannot be chosen before a row has that many new tokens (Hugging
  Face's `MinNewTokensLengthLogitsProcessor`; a stop string can still end it).
- `banned_token_ids` (never chosen) and a logit bias (`{id: value}` in Python; `bias_token_ids`
  and `bias_values` in tensor form) are added to the logits.
- `stop_strings`: a row ends when its new text contains one of them (bytes compared in the graph,
  through the tokenizer's per-token bytes: `token_bytes`); the text is then cut just before it.
  At most `MAX_STOP_STRINGS` of at most `MAX_STOP_BYTES` UTF-8 bytes each.

The penalty, `min_new_tokens` and the bias apply in that order (Hugging Face's), before
temperature, top-k and top-p. Each new token's log-probability under the model (log-softmax of
the raw logits, before any knob) is recorded beside it (`state["logprobs"]`).
"""

import math
import numbers
import random
import warnings

import numpy as np
import tensorflow as tf

from gpt_keras.layers.multi_head_attention import in_place_cache_writes
from gpt_keras.sampling import sample
from gpt_keras.tokenizers import raw_token_bytes

__all__ = [
    "MAX_STOP_BYTES", "MAX_STOP_STRINGS", "RULES", "check_arguments", "check_in_graph",
    "check_int", "check_knobs", "check_knobs_in_graph", "check_prompts", "check_stop_strings", "crop_prompts",
    "decode", "generate_in_graph", "knobs", "knobs_in_graph", "resume_window", "seed_pair",
    "slide_keep", "start", "stop_string_bytes", "tail_width", "token_byte_table",
]

# name → (a test that NumPy/Python values and tensors alike pass, what the value must be).
RULES = {
    "max_new_tokens": (lambda v: v >= 0, "an integer ≥ 0"),
    "temperature": (lambda v: (v - v == 0) & (v >= 0), "a finite number ≥ 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer ≥ 0 (0 = no cut)"),
    "top_p": (lambda v: (v > 0) & (v <= 1), "a number in (0, 1] (1 = no cut)"),
    "repetition_penalty": (lambda v: (v - v == 0) & (v > 0), "a finite number > 0 (1 = off)"),
    "min_new_tokens": (lambda v: v >= 0, "an integer ≥ 0"),
}

# Stop strings: at most this many per call, each at most this many UTF-8 bytes.
MAX_STOP_STRINGS = 8
MAX_STOP_BYTES = 64

# When a sequence needs a token after a full context, it continues from its last
# `context_length // SLIDE_DIVISOR` tokens.
SLIDE_DIVISOR = 2

def slide_keep(context_length):
    """How many tokens a full window keeps when it slides (an int, or a tensor for a tensor)."""
    if isinstance(context_length, int):
        return max(1, context_length // SLIDE_DIVISOR)
    return tf.maximum(1, context_length // SLIDE_DIVISOR)


# `decode`'s step budget for "until every row is done".
UNLIMITED = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------------------------
# Settings: checked once, in Python or in the graph, with the same rules


def _rule_message(name, value="{}"):
    return f"`{name}` must be {RULES[name][1]}. Received: {name}={value}"


def check_int(name, value, minimum):
    """`value` as an int; `ValueError` unless it is an integer ≥ `minimum`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}. Received: {name}={value!r}")
    return int(value)


def check_knobs(vocab_size, temperature=1.0, top_k=None, top_p=None, seed=None,
                stop_token_ids=(), include_stop_token=False, repetition_penalty=1.0,
                min_new_tokens=0, banned_token_ids=(), logit_bias=None, stop_strings=()):
    """Python settings → a dict of checked plain values (the knobs in tensor form: `top_k` 0 for
    no cut, a drawn `seed` for None, sorted id lists, `bias_token_ids`/`bias_values`,
    `stop_strings` as int32 bytes `[MAX_STOP_STRINGS, MAX_STOP_BYTES]`, -1 = padding). Raises
    `ValueError` naming the rule and the value."""
    values = {
        "temperature": (numbers.Real, temperature),
        "top_k": (numbers.Integral, 0 if top_k is None else top_k),
        "top_p": (numbers.Real, 1.0 if top_p is None else top_p),
        "repetition_penalty": (numbers.Real, 1.0 if repetition_penalty is None
                               else repetition_penalty),
        "min_new_tokens": (numbers.Integral, min_new_tokens),
    }
    for name, (kind, value) in values.items():
        if not isinstance(value, kind) or isinstance(value, bool) or not RULES[name][0](value):
            raise ValueError(_rule_message(name, repr(value)))
    checked = {name: value for name, (_, value) in values.items()}
    if seed is None:
        seed = random.getrandbits(62)
    elif not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"`seed` must be an int or None. Received: seed={seed!r}")
    banned = _check_ids("banned_token_ids", banned_token_ids, vocab_size)
    if len(banned) >= vocab_size:
        raise ValueError("`banned_token_ids` bans the whole vocabulary: leave some token possible.")
    logit_bias = dict(logit_bias or {})
    bias_ids = _check_ids("logit_bias", list(logit_bias), vocab_size)
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
               for v in logit_bias.values()):
        raise ValueError(f"`logit_bias` values must be finite numbers. Received: {logit_bias!r}")
    stop_bytes = np.full([MAX_STOP_STRINGS, MAX_STOP_BYTES], -1, np.int32)
    for row, text in enumerate(check_stop_strings(stop_strings)):
        encoded = text.encode("utf-8", "surrogatepass")
        stop_bytes[row, : len(encoded)] = np.frombuffer(encoded, np.uint8)
    return dict(
        checked, seed=int(seed) % (1 << 62),
        stop_token_ids=_check_ids("stop_token_ids", stop_token_ids, vocab_size),
        include_stop_token=bool(include_stop_token), banned_token_ids=banned,
        bias_token_ids=bias_ids, bias_values=[float(logit_bias[i]) for i in bias_ids],
        stop_strings=stop_bytes,
    )


def knobs(vocab_size, token_bytes=None, **arguments):
    """Python settings (those of `check_knobs`) → `(knobs, stop_ids)`: the knob tensors `decode`
    takes (fixed shapes and dtypes, so new values never retrace) and the stop ids as a set.
    `token_bytes`: the tokenizer's `token_byte_table`, needed for stop strings."""
    checked = check_knobs(vocab_size, **arguments)
    if (checked["stop_strings"] >= 0).any() and token_bytes is None:
        raise ValueError("`stop_strings` need the tokenizer's bytes: use `TextGenerator` (or pass "
                         "`token_bytes=decoding.token_byte_table(tokenizer, vocab_size)`).")

    def ids(values):
        return tf.constant(values, tf.int32, shape=[len(values)])

    values = knobs_in_graph(
        vocab_size,
        tf.constant(float(checked["temperature"]), tf.float32),
        tf.constant(checked["top_k"], tf.int32),
        tf.constant(float(checked["top_p"]), tf.float32),
        seed_pair(tf.constant(checked["seed"], tf.int64)),
        ids(checked["stop_token_ids"]),
        tf.constant(checked["include_stop_token"]),
        repetition_penalty=tf.constant(float(checked["repetition_penalty"]), tf.float32),
        min_new_tokens=tf.constant(checked["min_new_tokens"], tf.int32),
        banned_token_ids=ids(checked["banned_token_ids"]),
        bias_token_ids=ids(checked["bias_token_ids"]),
        bias_values=tf.constant(checked["bias_values"], tf.float32,
                                shape=[len(checked["bias_values"])]),
        stop_strings=tf.constant(checked["stop_strings"]),
        token_bytes=None if token_bytes is None else tuple(tf.constant(t) for t in token_bytes),
    )
    return values, set(checked["stop_token_ids"])


def _check_ids(name, ids, vocab_size):
    """Token ids (an int or a sequence) → a sorted list of distinct ids; `ValueError` unless each
    lies in [0, V)."""
    if isinstance(ids, numbers.Integral):
        ids = (ids,)
    ids = list(ids)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < vocab_size
               for i in ids):
        raise ValueError(f"`{name}` must be ids in [0, {vocab_size}). Received: {ids!r}")
    return sorted({int(i) for i in ids})


def check_stop_strings(stop_strings):
    """Stop strings (a `str` or a sequence of them) → a tuple of them; `ValueError` unless each
    is a non-empty `str` of at most `MAX_STOP_BYTES` UTF-8 bytes, at most `MAX_STOP_STRINGS`."""
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stop_strings = tuple(stop_strings)
    if not all(isinstance(text, str) and text for text in stop_strings):
        raise ValueError(
            f"`stop_strings` must be non-empty strings. Received: stop_strings={stop_strings!r}"
        )
    encoded = [text.encode("utf-8", "surrogatepass") for text in stop_strings]
    if len(encoded) > MAX_STOP_STRINGS or any(len(b) > MAX_STOP_BYTES for b in encoded):
        raise ValueError(
            f"Pass at most {MAX_STOP_STRINGS} `stop_strings` of at most {MAX_STOP_BYTES} UTF-8 "
            f"bytes each. Received: stop_strings={stop_strings!r}"
        )
    return stop_strings


def token_byte_table(tokenizer, vocab_size):
    """Every token id's bytes, for stop strings in the graph: `(bytes uint8 [V, L], lengths int32
    [V])`, L the longest token's byte count (`tokenizers.raw_token_bytes`)."""
    texts = raw_token_bytes(tokenizer, range(vocab_size))
    lengths = np.array([len(t) for t in texts], np.int32)
    table = np.zeros([vocab_size, max(1, lengths.max())], np.uint8)
    for i, text in enumerate(texts):
        table[i, : len(text)] = np.frombuffer(text, np.uint8)
    return table, lengths


def knobs_in_graph(vocab_size, temperature, top_k, top_p, seed, stop_token_ids,
                   include_stop_token=False, repetition_penalty=1.0, min_new_tokens=0,
                   banned_token_ids=None, bias_token_ids=None, bias_values=None,
                   stop_strings=None, token_bytes=None):
    """Knob tensors (as received by a signature) → the dict `decode` takes: `top_k` 0 becomes V,
    `stop_token_ids` int32 `[n]` (-1 = padding) becomes a `[V]` mask, `seed` is int32 `[2]`,
    `banned_token_ids` `[n]` (-1 = padding) and the logit bias (`bias_token_ids` int32 `[m]`, -1 =
    padding, `bias_values` float32 `[m]`; repeated ids add up) become one float32 `[V]` bias,
    `stop_strings` int32 `[n, MAX_STOP_BYTES]` holds bytes (-1 = padding), `token_bytes` is
    `token_byte_table`'s pair (or None: no stop strings possible)."""
    def mask(ids):  # int32 [n], -1 = padding → bool [V]
        ids = tf.reshape(ids, [1, -1])
        return tf.reduce_any(tf.equal(tf.range(vocab_size)[:, None], ids), axis=1)

    bias = tf.zeros([vocab_size], tf.float32)
    if bias_token_ids is not None:
        valid = bias_token_ids >= 0
        bias = tf.scatter_nd(tf.expand_dims(tf.maximum(bias_token_ids, 0), 1),
                             tf.where(valid, bias_values, 0.0), [vocab_size])
    if banned_token_ids is not None:
        bias = tf.where(mask(banned_token_ids), float("-inf"), bias)
    if stop_strings is None:
        stop_strings = tf.fill([0, MAX_STOP_BYTES], -1)
    if token_bytes is None:
        token_bytes = (tf.zeros([vocab_size, 1], tf.uint8), tf.zeros([vocab_size], tf.int32))
    return {
        "temperature": temperature,
        "top_k": tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size),
        "top_p": top_p,
        "seed": seed,
        "stop_mask": mask(stop_token_ids),  # [V]
        "include_stop_token": tf.convert_to_tensor(include_stop_token, tf.bool),
        "repetition_penalty": tf.convert_to_tensor(repetition_penalty, tf.float32),
        "min_new_tokens": tf.convert_to_tensor(min_new_tokens, tf.int32),
        "bias": bias,  # [V]
        "stop_strings": tf.convert_to_tensor(stop_strings, tf.int32),  # [n, MAX_STOP_BYTES]
        "token_bytes": tf.convert_to_tensor(token_bytes[0], tf.uint8),  # [V, L]
        "token_byte_lengths": tf.convert_to_tensor(token_bytes[1], tf.int32),  # [V]
    }


def seed_pair(seed):
    """An int64 seed `[]` → int32 `[2]`: `[s >> 31, s & 0x7FFFFFFF]` of s = seed mod 2**62."""
    seed = tf.math.floormod(seed, tf.constant(1 << 62, tf.int64))
    return tf.cast(tf.stack([seed // (1 << 31), seed % (1 << 31)]), tf.int32)


def check_in_graph(condition, message, *values):
    """An assertion op that fails with `InvalidArgumentError: <message>`, its `{}` filled with
    `values` (TF Serving answers it with HTTP 400 and the message)."""
    return tf.debugging.Assert(condition, [tf.strings.format(message, values, summarize=8)])


def check_knobs_in_graph(vocab_size, max_new_tokens, temperature, top_k, top_p, stop_token_ids,
                         repetition_penalty=None, min_new_tokens=None, banned_token_ids=None,
                         bias_token_ids=None, bias_values=None, stop_strings=None):
    """Assertion ops for knob tensors received by a signature (the rules of `RULES`; ids in
    [0, V) or -1; finite biases; stop strings as `stop_string_bytes` takes them)."""
    values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
              "top_p": top_p, "repetition_penalty": repetition_penalty,
              "min_new_tokens": min_new_tokens}
    checks = [
        check_in_graph(RULES[name][0](value), _rule_message(name), value)
        for name, value in values.items() if value is not None
    ]
    for name, ids in (("stop_token_ids", stop_token_ids), ("banned_token_ids", banned_token_ids),
                      ("bias_token_ids", bias_token_ids)):
        if ids is None:
            continue
        valid = tf.logical_or(tf.equal(ids, -1), tf.logical_and(ids >= 0, ids < vocab_size))
        checks.append(check_in_graph(
            tf.reduce_all(valid),
            f"`{name}` must be ids in [0, {vocab_size}) (-1 = none). Received: {{}}", ids,
        ))
    if bias_token_ids is not None:
        checks.append(check_in_graph(
            tf.logical_and(tf.equal(tf.size(bias_token_ids), tf.size(bias_values)),
                           tf.reduce_all(tf.math.is_finite(bias_values))),
            "`bias_values` must be finite, one per entry of `bias_token_ids`. Received: {}",
            bias_values,
        ))
    if stop_strings is not None:
        lengths = tf.strings.length(stop_strings)
        checks.append(check_in_graph(
            tf.logical_and(tf.size(stop_strings) <= MAX_STOP_STRINGS,
                           tf.reduce_all(lengths <= MAX_STOP_BYTES)),
            f"Pass at most {MAX_STOP_STRINGS} `stop_strings` of at most {MAX_STOP_BYTES} UTF-8 "
            "bytes each (empty ones are ignored). Received: {}", stop_strings,
        ))
    return checks


def stop_string_bytes(stop_strings):
    """Stop strings string `[n]` (empty ones ignored) → int32 `[n, MAX_STOP_BYTES]` bytes, -1
    after each one's end: the `stop_strings` knob."""
    codes = tf.cast(tf.io.decode_raw(stop_strings, tf.uint8, fixed_length=MAX_STOP_BYTES),
                    tf.int32)
    lengths = tf.strings.length(stop_strings)[:, None]
    return tf.where(tf.range(MAX_STOP_BYTES)[None, :] < lengths, codes, -1)


def check_prompts(prompts, lengths, vocab_size):
    """Prompts as `generate` takes them → `(list of int64 [n_b] arrays, whether a single 1-D
    prompt was given)`; `ValueError` for empty prompts or ids outside [0, V)."""
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


def check_arguments(prompts, lengths, max_new_tokens, chunk_size, vocab_size):
    """The prompt and count arguments of every Python engine → `(rows, single, max_new_tokens,
    chunk_size)` (see `check_prompts`; `chunk_size` None or ≥ 1); `ValueError` naming a bad one."""
    rows, single = check_prompts(prompts, lengths, vocab_size)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    return rows, single, max_new_tokens, chunk_size


def crop_prompts(rows, keep, context_length, stacklevel=3):
    """Each prompt's last `keep` tokens, with a `UserWarning` for each one cut."""
    cropped = []
    for b, row in enumerate(rows):
        if len(row) > keep:
            warnings.warn(
                f"Prompt {b} has {len(row)} tokens; keeping its last {keep} so that "
                f"{'the new tokens fit' if keep < context_length else 'it fits'} in "
                f"context_length={context_length}.",
                stacklevel=stacklevel,
            )
            row = row[-keep:]
        cropped.append(row)
    return cropped


# ----------------------------------------------------------------------------------------------
# The decode loop
#
# `state` is a dict of tensors:
#   tokens  int32 [B, W]  the window: prompts (right-padded) and the tokens decided so far
#   lengths int32 [B]     slots < lengths[b] of the window are prompt tokens of row b
#   counts  int32 [B]     new tokens decided per row so far (all calls, stop tokens included)
#   budget  int32 []      `max_new_tokens`
#   done    bool  [B]     rows that stopped (stop token, budget, or told to)
#   cursor  int32 []      the next slot to decide; token `cursor - 1` is not in the cache yet
#   offset  int32 []      absolute position of slot 0 (grows when the window slides)
#   out     int32 [B, N]  this call's new ids per row, -1 after the last
#   logprobs float32 [B, N] their log-probabilities under the model (0 after the last)
#   emitted int32 [B]     how many ids of `out` are set
#   seen    bool  [B, V]  the tokens in each row's window (for `repetition_penalty`; only kept
#                         while the penalty is on)
#   tail    int32 [B, K]  the last K bytes of each row's new text (-1 before its start), K =
#                         MAX_STOP_BYTES - 1 + the longest token's bytes (only kept while there
#                         are stop strings)
#   cache   L × [2, B, H, S, K] the model's per-layer KV caches; slots < cursor - 1 are filled


def start(model, prompt, lengths, knobs, max_new_tokens, cache_length, out_width, offset=0,
          batch_size=None, in_place=True, tail=None):
    """Prefills a cache of `cache_length` slots with `prompt` int32 `[B, P]` (right-padded, every
    row 1 ≤ `lengths[b]` ≤ P ≤ `cache_length`) and decides the first slot; returns the state.

    `cache_length` and `out_width` may be Python ints (static shapes, for XLA) or tensors.
    `batch_size` None: read from `prompt` (a graph with a dynamic batch). `in_place`: write the
    cache in place in graphs without XLA (`write_cache`); False for TFLite (builtin ops only).
    `tail`: the stop-string bytes of an earlier call's state to continue from (default: none)."""
    with in_place_cache_writes(in_place):
        return _start(model, prompt, lengths, knobs, max_new_tokens, cache_length, out_width,
                      offset, batch_size, tail)


def tail_width(longest_token_bytes):
    """K of `state["tail"]`: a stop string ending in a new token's bytes lies in the last K."""
    return MAX_STOP_BYTES - 1 + longest_token_bytes


def _start(model, prompt, lengths, knobs, max_new_tokens, cache_length, out_width, offset,
           batch_size, tail):
    batch = batch_size or tf.shape(prompt)[0]
    if tail is None:
        table = knobs["token_bytes"]
        tail = tf.fill([batch, tail_width(table.shape[1] or tf.shape(table)[1])], -1)
    width = cache_length + 1
    tokens = tf.pad(prompt, [[0, 0], [0, width - tf.shape(prompt)[1]]])  # [B, W]
    if isinstance(width, int):  # a static width (a reshape, not ensure_shape: TFLite builtin)
        tokens = tf.reshape(tokens, [-1, width])
    state = {
        "tokens": tokens,
        "lengths": lengths,
        "counts": tf.zeros_like(lengths),
        "budget": tf.convert_to_tensor(max_new_tokens, tf.int32),
        "done": tf.fill([batch], tf.convert_to_tensor(max_new_tokens, tf.int32) <= 0),
        "cursor": tf.reduce_min(lengths),  # the shortest prompt's first new slot
        "offset": tf.convert_to_tensor(offset, tf.int32),
        "out": tf.fill([batch, out_width], -1),
        "logprobs": tf.zeros([batch, out_width], tf.float32),
        "emitted": tf.zeros_like(lengths),
        "seen": _seen(knobs, prompt, lengths),
        "tail": tail,
        "cache": model.init_layer_caches(batch, cache_length),
    }
    return _prefill(model, state, knobs, prompt)


def _seen(knobs, tokens, lengths):
    """bool `[B, V]`: which ids occur among each row's first `lengths[b]` `tokens` `[B, T]`
    (all False while the repetition penalty is off: nothing reads it then)."""
    vocab_size = knobs["bias"].shape[0]

    def scatter():
        width = tf.shape(tokens)[1]
        rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
        indices = tf.reshape(tf.stack([rows, tokens], axis=-1), [-1, 2])
        inside = tf.cast(tf.range(width)[None, :] < lengths[:, None], tf.float32)
        counts = tf.scatter_nd(indices, tf.reshape(inside, [-1]),
                               tf.stack([tf.shape(tokens)[0], vocab_size]))
        return counts > 0

    return tf.cond(
        tf.not_equal(knobs["repetition_penalty"], 1.0), scatter,
        lambda: tf.zeros(tf.stack([tf.shape(tokens)[0], vocab_size]), tf.bool),
    )


def decode(model, state, knobs, num_steps=UNLIMITED, in_place=True):
    """Up to `num_steps` more decisions (each decides one slot of every row), until every row is
    done; slides the window when a row needs a token after a full context. `in_place`: as in
    `start`."""
    with in_place_cache_writes(in_place):
        return _decode(model, state, knobs, num_steps)


def _decode(model, state, knobs, num_steps):
    cache_length = state["cache"][0].shape[3] or tf.shape(state["cache"][0])[3]
    width = cache_length + 1
    context = model.config.context_length
    keep = slide_keep(context)
    keep = min(keep, cache_length) if isinstance(cache_length, int) else tf.minimum(
        keep, cache_length)  # sliding only happens when the cache holds the whole context
    steps = tf.constant(0)

    def active(state, steps):
        return tf.logical_and(steps < num_steps, tf.logical_not(tf.reduce_all(state["done"])))

    def slide(state):
        """The window is full: continue from its last `keep` tokens."""
        dropped = width - keep
        tokens = state["tokens"]
        tokens = tf.concat([tokens[:, dropped:], tf.zeros_like(tokens[:, :dropped])], axis=1)
        lengths = tf.fill(tf.shape(state["lengths"]), keep)
        state = dict(
            state, tokens=tokens, lengths=lengths, cursor=tf.convert_to_tensor(keep, tf.int32),
            offset=state["offset"] + dropped, seen=_seen(knobs, tokens[:, :keep], lengths),
        )
        return _prefill(model, state, knobs, tokens[:, :keep])

    def step(state, steps):
        index = state["cursor"] - 1
        token = tf.gather(state["tokens"], index, axis=1)  # [B]
        logits, cache = model.call_with_layer_caches(
            tf.expand_dims(token, 1), state["cache"], index
        )
        logits = tf.squeeze(logits, 1)  # [B, V]
        return _decide(dict(state, cache=cache), logits, knobs), steps + 1

    def window(state, steps):
        state, steps = tf.cond(
            state["cursor"] >= width,
            lambda: (slide(state), steps + 1),
            lambda: (state, steps),
        )
        return tf.while_loop(
            lambda state, steps: tf.logical_and(active(state, steps), state["cursor"] < width),
            step, (state, steps),
        )

    if isinstance(cache_length, int) and cache_length < context:
        # A static cache shorter than the context holds every row's last token (the caller
        # sized it so): the window never slides, and its branch is not even compiled.
        return tf.while_loop(active, step, (state, steps))[0]
    state, _ = tf.while_loop(active, window, (state, steps))
    return state


def _prefill(model, state, knobs, prefix):
    """Writes the keys/values of `prefix` `[B, T]` (slots 0 .. T-1) into the cache and decides
    slot `cursor` (≤ T) from the hidden state at `cursor - 1`: only that position goes through
    the output projection."""
    hidden, cache = model.call_with_layer_caches(
        prefix, state["cache"], 0, return_hidden_states=True
    )  # [B, T, D]
    last = tf.gather(hidden, state["cursor"] - 1, axis=1)  # [B, D]
    logits = model.project_logits(tf.expand_dims(last, 1))[:, 0]  # [B, V]
    return _decide(dict(state, cache=cache), logits, knobs)


def _decide(state, logits, knobs):
    """Decides slot `cursor` of every row from `logits` `[B, V]` (predicting that slot): a sample
    of the steered logits (`_steer`) for rows past their prompt, the prompt token otherwise;
    records new ids and their log-probabilities in `out`/`logprobs`, updates `counts`, `seen`,
    `tail` and `done`, and advances the cursor."""
    index = state["cursor"]
    tokens, done = state["tokens"], state["done"]
    sampled = sample(  # [B]
        _steer(logits, state, knobs), knobs["temperature"], knobs["top_k"], knobs["top_p"],
        knobs["seed"], index + state["offset"],
    )
    decides = tf.logical_and(tf.logical_not(done), index >= state["lengths"])  # [B]
    new_ids = tf.expand_dims(sampled, 1)  # [B, 1]
    tokens = tf.where(_cells(tokens, index, decides), new_ids, tokens)
    stops = tf.gather(knobs["stop_mask"], sampled)  # [B]
    new_text = tf.logical_and(decides, tf.logical_not(stops))
    emits = tf.logical_or(new_text, tf.logical_and(decides, knobs["include_stop_token"]))
    logprob = tf.gather(tf.nn.log_softmax(tf.cast(logits, tf.float32)), sampled, batch_dims=1)
    emitted_at = _cells(state["out"], state["emitted"], emits, per_row=True)  # out and logprobs
    out = tf.where(emitted_at, new_ids, state["out"])
    logprobs = tf.where(emitted_at, tf.expand_dims(logprob, 1), state["logprobs"])
    counts = state["counts"] + tf.cast(decides, tf.int32)
    tail, stop_string = _stop_strings(state["tail"], sampled, new_text, knobs)
    finished = tf.logical_or(tf.logical_or(stops, stop_string), counts >= state["budget"])
    seen = tf.cond(
        tf.not_equal(knobs["repetition_penalty"], 1.0),
        lambda: tf.logical_or(state["seen"], tf.logical_and(
            tf.equal(tf.range(tf.shape(logits)[1])[None, :], sampled[:, None]), decides[:, None])),
        lambda: state["seen"],
    )
    return dict(
        state, tokens=tokens, out=out, logprobs=logprobs, counts=counts, seen=seen, tail=tail,
        emitted=state["emitted"] + tf.cast(emits, tf.int32),
        done=tf.logical_or(done, tf.logical_and(decides, finished)), cursor=index + 1,
    )


def _steer(logits, state, knobs):
    """The knobs that change logits `[B, V]`, in Hugging Face's order: repetition penalty,
    `min_new_tokens` (stop ids impossible before), bias (banned ids at -inf)."""
    logits = tf.cast(logits, tf.float32)
    penalty = knobs["repetition_penalty"]
    logits = tf.cond(
        tf.not_equal(penalty, 1.0),
        lambda: tf.where(state["seen"], tf.where(logits > 0, logits / penalty, logits * penalty),
                         logits),
        lambda: logits,
    )
    too_early = tf.logical_and(tf.expand_dims(state["counts"] < knobs["min_new_tokens"], 1),
                               tf.expand_dims(knobs["stop_mask"], 0))
    return tf.where(too_early, float("-inf"), logits) + knobs["bias"]


def _stop_strings(tail, token, appends, knobs):
    """`tail` `[B, K]` with the bytes of `token` `[B]` appended where `appends` `[B]`, and bool
    `[B]`: whether a stop string ends within those new bytes (found in the new tail)."""
    table, lengths = knobs["token_bytes"], knobs["token_byte_lengths"]
    stops = knobs["stop_strings"]  # [n, M]

    def search():
        width = tf.shape(tail)[1]
        added = tf.where(appends, tf.gather(lengths, token), 0)  # [B]
        joined = tf.concat([tail, tf.cast(tf.gather(table, token), tf.int32)], axis=1)  # [B, K+L]
        new_tail = tf.gather(joined, tf.range(width)[None, :] + added[:, None], batch_dims=1)
        # Every window of M bytes of the tail: [B, K, M] (-2 past the end never matches).
        starts = tf.range(width)[:, None] + tf.range(MAX_STOP_BYTES)[None, :]  # [K, M]
        windows = tf.where(starts < width, tf.gather(new_tail, tf.minimum(starts, width - 1),
                                                     axis=1), -2)
        used = stops >= 0  # [n, M]
        equal = tf.logical_or(tf.equal(windows[:, None], stops[None, :, None]),
                              tf.logical_not(used)[None, :, None])  # [B, n, K, M]
        stop_length = tf.reduce_sum(tf.cast(used, tf.int32), axis=1)  # [n]
        ends = tf.range(width)[None, :] + stop_length[:, None]  # [n, K]: end of a match at k
        # A match that ends in the new bytes, by a stop string that is not padding.
        fresh = tf.logical_and(ends[None] > width - added[:, None, None],
                               (stop_length > 0)[None, :, None])
        found = tf.reduce_any(tf.logical_and(tf.reduce_all(equal, axis=3), fresh), axis=[1, 2])
        return new_tail, tf.logical_and(found, appends)

    return tf.cond(
        tf.reduce_any(stops >= 0), search, lambda: (tail, tf.zeros_like(appends)),
    )


def _cells(matrix, column, rows, per_row=False):
    """bool `[B, n]`: the cells of `matrix` `[B, n]` at `column` (`[]`, or `[B]` with `per_row`)
    of the rows where `rows` `[B]` is true, to write with a `where` (core ops only;
    `expand_dims`, not `[:, None]`: fewer ops per decoding step)."""
    columns = tf.expand_dims(tf.range(tf.shape(matrix)[1]), 0)  # [1, n]
    hit = tf.equal(columns, tf.expand_dims(column, 1) if per_row else column)  # [B|1, n]
    return tf.logical_and(hit, tf.expand_dims(rows, 1))


def resume_window(state):
    """The window to pass as the prompt of a later `start` (same `offset` and seed) so that it
    continues this state's rows: `(ids [B, W'], lengths [B], offset [])`, the window already
    slid if it was full. All rows share the cursor; rows that are done are not meaningful."""
    width = tf.shape(state["tokens"])[1]
    keep = slide_keep(width - 1)  # a full window: the cache holds the whole context (`decode`)
    cursor = state["cursor"]
    dropped = tf.where(cursor >= width, width - keep, 0)
    length = cursor - dropped
    ids = state["tokens"][:, dropped:cursor]
    return ids, tf.fill(tf.shape(state["lengths"]), length), state["offset"] + dropped


# ----------------------------------------------------------------------------------------------
# One graph for a whole generation (signatures)


def generate_in_graph(model, prompt, lengths, max_new_tokens, knobs, cache_length=None,
                      offset=0, in_place=True, tail=None):
    """A whole generation as one graph with a dynamic batch, for the SavedModel and TFLite
    signatures: the tokens of `gpt_keras.generation.generate` for the same prompts and knobs.

    `prompt` int32 `[B, P]` right-padded, `lengths` int32 `[B]` (each ≥ 1; a prompt keeps its
    last `context_length` tokens), `max_new_tokens` int32 `[]`, `knobs` from `knobs_in_graph`,
    `cache_length` None (the smallest that holds prompt and new tokens, at most the context) or
    a static int, `offset` int32 `[]` (the absolute position of slot 0: it moves the random
    numbers), `in_place` and `tail` as in `start`. Returns the final state: `state["out"]`
    `[B, max_new_tokens]` holds the new ids (-1 after a row's last), `state["logprobs"]` their
    log-probabilities, `state["emitted"]` `[B]` their count."""
    context = model.config.context_length
    prompt, lengths = _keep_last(prompt, lengths, context)
    if cache_length is None:
        needed = tf.reduce_max(lengths) + tf.maximum(max_new_tokens, 1) - 1
        cache_length = tf.minimum(needed, context)
    state = start(model, prompt, lengths, knobs, max_new_tokens, cache_length,
                  tf.maximum(max_new_tokens, 0), offset, in_place=in_place, tail=tail)
    return decode(model, state, knobs, in_place=in_place)


def _keep_last(prompt, lengths, keep):
    """Right-padded `prompt` `[B, P]` → its rows' last `keep` tokens `[B, min(n, keep)]` (n the
    longest length), and the new lengths `[B]`."""
    width = tf.minimum(tf.reduce_max(lengths), keep)
    first = tf.maximum(lengths - keep, 0)  # [B]
    source = tf.expand_dims(first, 1) + tf.expand_dims(tf.range(width), 0)  # [B, W]
    lengths = tf.minimum(lengths, keep)
    kept = tf.gather(prompt, tf.minimum(source, tf.shape(prompt)[1] - 1), batch_dims=1)
    return tf.where(source < tf.expand_dims(first + lengths, 1), kept, 0), lengths
