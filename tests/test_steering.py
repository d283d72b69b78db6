"""Controllable generation in the decoding core: repetition penalty, min_new_tokens, banned ids and
logit bias, stop strings in the graph, log-probabilities; each against a reference."""

import numpy as np
import pytest
import tensorflow as tf
import torch
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from gpt_keras import decoding, generation
from tests.test_generation import (
    RAGGED, oracle_logits, random_model, scripted_model,
)


@pytest.fixture(scope="module")
def model():
    return random_model(position_embedding="learned")


def oracle(model, prompt, max_new_tokens, processors=(), bias=None):
    """Greedy decoding by re-running the full model, the logits passed through Hugging Face's
    processors (and `bias` added) before the argmax."""
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        logits = torch.tensor(oracle_logits(model, sequence))[None]
        for processor in processors:
            logits = processor(torch.tensor([sequence]), logits)
        logits = logits[0].numpy() + (0 if bias is None else bias)
        top_two = np.sort(logits)[-2:]
        assert top_two[1] - top_two[0] > 1e-3, "near-tie: pick other weights"
        sequence.append(int(np.argmax(logits)))
    return sequence[len(prompt):]


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_is_hugging_faces(model, penalty):
    expected = [oracle(model, prompt, 10, [RepetitionPenaltyLogitsProcessor(penalty)])
                for prompt in RAGGED]
    assert generation.generate(model, RAGGED, 10, temperature=0,
                               repetition_penalty=penalty) == expected
    assert expected != generation.generate(model, RAGGED, 10, temperature=0)  # it did something


def test_min_new_tokens_is_hugging_faces():
    """The scripted model wants to stop (id 0) at every position; the second choice is 7 + p."""
    base = np.zeros([32, 256], np.float32)
    base[np.arange(32), 7 + np.arange(32)] = 20.0
    model = scripted_model([0] * 32, base=base)
    ids = generation.generate(model, [1], 10, temperature=0, stop_token_ids=[0],
                              min_new_tokens=3)
    assert ids == [7, 8, 9]  # from positions 0, 1, 2; then the stop id ends the row
    processor = MinNewTokensLengthLogitsProcessor(1, 3, eos_token_id=0)
    logits = torch.tensor(base[:1] + np.eye(256, dtype=np.float32)[0] * 30)
    assert int(processor(torch.tensor([[1]]), logits).argmax()) == ids[0]


def test_banned_ids_and_logit_bias(model):
    vocab_size = model.config.vocab_size
    unsteered = generation.generate(model, RAGGED, 8, temperature=0)
    banned = sorted({row[0] for row in unsteered})
    logit_bias = {5: 2.5, 9: -1.0, 17: 4.0}
    bias = np.zeros(vocab_size, np.float32)
    bias[list(logit_bias)] = list(logit_bias.values())
    bias[banned] = -np.inf
    expected = [oracle(model, prompt, 8, bias=bias) for prompt in RAGGED]
    ids = generation.generate(model, RAGGED, 8, temperature=0, banned_token_ids=banned,
                              logit_bias=logit_bias)
    assert ids == expected and not set(banned) & {i for row in ids for i in row}
    # Sampled too: banned ids are never drawn.
    sampled = generation.generate(model, RAGGED * 4, 16, temperature=2.0, seed=3,
                                  banned_token_ids=banned)
    assert not set(banned) & {i for row in sampled for i in row}


def test_logprobs_are_the_models_log_softmax_of_the_chosen_tokens(model):
    ids, logprobs = generation.generate(model, RAGGED, 6, temperature=1.3, seed=11, top_k=20,
                                        return_logprobs=True)
    for prompt, row, row_logprobs in zip(RAGGED, ids, logprobs):
        assert len(row_logprobs) == len(row) == 6
        for n, token in enumerate(row):
            logits = oracle_logits(model, prompt + row[:n]).astype(np.float64)
            expected = logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            np.testing.assert_allclose(row_logprobs[n], expected, atol=1e-4)


class PieceTokenizer:
    """Ids are multi-byte pieces (test-only): a stop string can start and end inside tokens."""

    PIECES = ["hel", "lo S", "TO", "P wor", "ld", "!", "€", "x"]

    def tokenize(self, text):
        return tf.constant([self.PIECES.index(text)], tf.int32)

    def detokenize(self, ids):
        return tf.constant(b"".join(self.PIECES[i].encode("utf-8")
                                    for i in np.asarray(ids).reshape(-1)))


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_stop_strings_end_rows_in_the_graph(chunk_size):
    pieces = PieceTokenizer.PIECES
    script = [0, 1, 2, 3, 4, 5, 5, 5, 5]  # after "x": "hello STOP world!!!!"
    model = scripted_model(script + [5] * 20, vocab_size=len(pieces))
    generator = generation.TextGenerator(model, PieceTokenizer())
    table = generator.token_bytes()
    assert table[1].tolist() == [len(p.encode("utf-8")) for p in pieces]
    chunks = generation.stream(model, [[7]], 12, temperature=0, stop_strings=["STOP"],
                               token_bytes=table, chunk_size=chunk_size)
    ids = [token for chunk in chunks for token in chunk[0]]
    assert ids == [0, 1, 2, 3]  # the row stopped at "P wor", which completed "STOP"
    completion = generator.generate("x", 12, temperature=0, stop_strings=["STOP", "zzz"],
                                    return_logprobs=True)
    assert completion.text == "hello " and completion.token_ids == [0, 1, 2, 3]
    assert generator.generate("x", 12, temperature=0, stop_strings="ld!") == "hello STOP wor"
    assert generator.generate("x", 12, temperature=0, stop_strings="€") == "hello STOP world!!!!!!!"


def test_stop_strings_only_match_new_text():
    """A stop string already in the prompt does not stop the row: only new text is searched."""
    model = scripted_model([1, 2, 3, 5] + [5] * 20, vocab_size=len(PieceTokenizer.PIECES))
    generator = generation.TextGenerator(model, PieceTokenizer())
    assert generator.generate("hel", 4, temperature=0, stop_strings="hel") == "lo STOP wor!"


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=0.0), r"`repetition_penalty` must be a finite number > 0 \(1 = off\)"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty=nan"),
    (dict(min_new_tokens=-1), "`min_new_tokens` must be an integer ≥ 0"),
    (dict(banned_token_ids=[64]), r"`banned_token_ids` must be ids in \[0, 64\)"),
    (dict(banned_token_ids=list(range(64))), "bans the whole vocabulary"),
    (dict(logit_bias={3: float("inf")}), "`logit_bias` values must be finite"),
    (dict(logit_bias={-1: 1.0}), r"`logit_bias` must be ids in \[0, 64\)"),
    (dict(stop_strings=["a"] * 9), "at most 8 `stop_strings` of at most 64 UTF-8 bytes"),
    (dict(stop_strings=["é" * 33]), "at most 64 UTF-8 bytes"),
    (dict(stop_strings=[""]), "`stop_strings` must be non-empty strings"),
    (dict(stop_strings=["a"]), "`stop_strings` need the tokenizer's bytes"),
])
def test_invalid_steering_arguments_raise(kwargs, message):
    model = scripted_model([], vocab_size=64, context_length=16)
    with pytest.raises(ValueError, match=message):
        generation.generate(model, [[1, 2]], 4, **kwargs)


def test_steering_rules_are_the_same_in_the_graph():
    @tf.function(autograph=False)
    def check(penalty, min_new_tokens, banned, bias_ids, bias_values, stop_strings):
        checks = decoding.check_knobs_in_graph(
            64, tf.constant(1), tf.constant(1.0), tf.constant(0), tf.constant(1.0),
            tf.constant([-1]), penalty, min_new_tokens, banned, bias_ids, bias_values,
            stop_strings,
        )
        with tf.control_dependencies(checks):
            return tf.constant(0)

    good = dict(penalty=tf.constant(1.2), min_new_tokens=tf.constant(2),
                banned=tf.constant([3, -1]), bias_ids=tf.constant([4]),
                bias_values=tf.constant([1.5]), stop_strings=tf.constant(["ab", ""]))
    assert check(**good) == 0
    for name, bad, message in [
        ("penalty", tf.constant(-1.0), "`repetition_penalty` must be a finite number > 0"),
        ("min_new_tokens", tf.constant(-2), "`min_new_tokens` must be an integer ≥ 0"),
        ("banned", tf.constant([64]), "`banned_token_ids` must be ids in [0, 64)"),
        ("bias_values", tf.constant([np.inf], tf.float32), "`bias_values` must be finite"),
        ("stop_strings", tf.constant(["x" * 65]), "at most 64 UTF-8 bytes"),
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")
                           .replace(")", r"\)").replace("(", r"\(")):
            check(**dict(good, **{name: bad}))
    np.testing.assert_array_equal(
        decoding.stop_string_bytes(tf.constant(["ab", ""]))[:, :3], [[97, 98, -1], [-1, -1, -1]])
