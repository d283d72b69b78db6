"""The log-likelihood of given text under a model (keras-hub's `CausalLM.score`): per token and in
total, so that candidates can be ranked. One definition, used by `TextGenerator.score` in Python
and by the exported SavedModel's `score` signature.

Convention: a text of n tokens t₁..tₙ is scored after the tokenizer's end-of-text id, GPT-2's
document separator (what an unconditional sample starts from): `log p(t₁ | <eot>) + log p(t₂ |
<eot>, t₁) + ... `, so every token of the text counts, the first included. A text may have at most
`context_length` tokens (the end-of-text id and the first n-1 tokens fill the context); an empty
text scores 0 over 0 tokens.
"""

import tensorflow as tf

from gpt_keras import decoding


def token_log_probs(model, token_ids, lengths):
    """Log-probabilities of each row's tokens after its first.

    `token_ids` int32 `[B, T]`: row b is `[start id, t₁, .., t_{n_b}]` followed by any padding,
    `lengths` int32 `[B]` = n_b + 1 (T ≥ 2, T - 1 ≤ `context_length`). Returns float32 `[B, T-1]`:
    entry (b, i) is `log p(t_{i+1} | row b's first i+1 ids)` for i < n_b, and 0 beyond."""
    logits = model(token_ids[:, :-1], training=False)  # [B, T-1, V]; right padding is never seen
    log_probs = tf.nn.log_softmax(logits)
    chosen = tf.gather(log_probs, token_ids[:, 1:], batch_dims=2)  # [B, T-1]
    valid = tf.range(tf.shape(chosen)[1])[None, :] < (lengths - 1)[:, None]
    return tf.where(valid, chosen, 0.0)


def score_texts_in_graph(model, tokenizer, texts):
    """Texts string `[B]` → `{"log_prob": float32 [B] (the sum), "token_count": int32 [B],
    "token_log_probs": float32 [B, N] (N = the longest text's tokens; 0 beyond each row's)}`.
    A text longer than `context_length` tokens fails with `InvalidArgumentError` naming it."""
    context_length = model.config.context_length
    ids = tokenizer.tokenize(texts)  # ragged [B, None]
    counts = tf.cast(ids.row_lengths(), tf.int32)
    check = decoding.check_in_graph(
        tf.reduce_all(counts <= context_length),
        f"A text to score has {{}} tokens, more than the context length {context_length}. "
        "Score shorter texts (or windows of a long one).",
        tf.reduce_max(tf.concat([counts, [0]], 0)),
    )
    start = tf.fill([tf.shape(counts)[0], 1], tf.constant(tokenizer.end_of_text_id, tf.int32))
    rows = tf.concat([start, tf.cast(ids.to_tensor(default_value=0), tf.int32)], axis=1)
    rows = tf.pad(rows, [[0, 0], [0, tf.maximum(2 - tf.shape(rows)[1], 0)]])  # T ≥ 2
    with tf.control_dependencies([check]):
        per_token = token_log_probs(model, tf.identity(rows), counts + 1)
    per_token = per_token[:, : tf.reduce_max(tf.concat([counts, [0]], 0))]
    return {
        "log_prob": tf.reduce_sum(per_token, axis=1),
        "token_count": counts,
        "token_log_probs": per_token,
    }
