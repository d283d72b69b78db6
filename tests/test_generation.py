import dataclasses
import warnings

import numpy as np
import pytest
import tensorflow as tf

from gpt_keras import GPT, GPTConfig, decoding, generation
from gpt_keras.precision import with_weights
from tests import numpy_reference as ref

TINY = GPTConfig.from_preset("tiny")  # vocab 64, context 16, 2 layers, 2 heads, 32 dims
RAGGED = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [20, 30, 40, 50]]  # lengths 3, 7, 1, 4


def random_model(**overrides):
    """A tiny GPT with weights of scale 0.3, so that greedy decisions are not near-ties.
    Untied embeddings: with tied ones, random models mostly repeat one token."""
    model = GPT(**dataclasses.asdict(TINY.replace(tie_embeddings=False, **overrides)))
    model.build()
    ref.randomize_weights(model, scale=0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return random_model(position_embedding="learned")


class ScriptedGPT(GPT):
    """A test-only GPT whose cached forward pass ignores the tokens: the logits at position p are
    row p of `table` `[context_length, V]`. Forces exactly the tokens (or distribution) a test
    needs."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self._table = np.asarray(table, np.float32)

    def call_with_layer_caches(self, token_ids, cache, cache_index, padding_mask=None,
                               training=False, return_hidden_states=False):
        batch, length = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        positions = cache_index + tf.range(length)
        logits = tf.gather(tf.constant(self._table), positions)  # [T, V]
        # The "hidden states" are the logits themselves: `project_logits` is the identity.
        return tf.broadcast_to(logits, [batch, length, self._table.shape[1]]), cache

    def project_logits(self, hidden_states):
        return tf.cast(hidden_states, tf.float32)


def scripted_model(script, vocab_size=256, context_length=32, base=None):
    """Emits `script[p]` after position p (greedy, or any temperature: its logit leads by 30)."""
    table = np.zeros([context_length, vocab_size], np.float32) if base is None else base
    for position, token in enumerate(script):
        table[position, token] = 30.0
    return ScriptedGPT(
        table,
        vocab_size=vocab_size,
        context_length=context_length,
        num_layers=1,
        num_heads=1,
        hidden_dim=4,
    )


def oracle_logits(model, sequence):
    """Logits predicting the token after `sequence`, re-running the full model (no cache)."""
    return np.asarray(model(np.array([sequence], np.int32)))[0, -1]


def oracle_greedy(model, prompt, max_new_tokens, window=None, keep=None):
    """nanoGPT-style greedy decoding: the whole visible sequence through `model` every step.
    With `window`, a token is predicted from up to `window` tokens; when the visible part would
    exceed that, it restarts from the last `keep` tokens (the documented sliding window)."""
    sequence, start = list(prompt), 0
    for _ in range(max_new_tokens):
        if window is not None and len(sequence) - start > window:
            start = len(sequence) - keep
        logits = oracle_logits(model, sequence[start:])
        top_two = np.sort(logits)[-2:]
        assert top_two[1] - top_two[0] > 1e-3, "near-tie: pick other weights"
        sequence.append(int(np.argmax(logits)))
    return sequence[len(prompt) :]


# -- Correctness against the oracle ---------------------------------------------------------


@pytest.mark.parametrize("position_embedding", ["learned", "sinusoidal", "rotary"])
def test_greedy_ragged_batch_matches_full_model_oracle(position_embedding, model):
    if position_embedding != "learned":
        model = random_model(position_embedding=position_embedding)
    out = generation.generate(model, RAGGED, max_new_tokens=9, temperature=0)
    assert out == [oracle_greedy(model, p, 9) for p in RAGGED]
    assert len({tuple(row) for row in out}) == len(RAGGED)  # not one degenerate answer


def test_without_xla_gives_the_same_tokens(model):
    fast = generation.generate(model, RAGGED, max_new_tokens=9, temperature=0)
    graph = generation.generate(model, RAGGED, max_new_tokens=9, temperature=0, jit_compile=False)
    assert graph == fast
    sampled = dict(max_new_tokens=9, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert generation.generate(model, RAGGED, jit_compile=False, **sampled) == (
        generation.generate(model, RAGGED, **sampled)
    )


def in_graph_generator(model, stop_token_ids=()):
    """`decoding.generate_in_graph` as a signature would trace it: a plain graph (no XLA) with a
    dynamic batch, prompt width and cache length. Returns (concrete function, knob values)."""
    vocab_size = model.config.vocab_size

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int64),
    ])
    def run(prompt, lengths, max_new_tokens, temperature, top_k, top_p, seed):
        knobs = decoding.knobs_in_graph(
            vocab_size, temperature, top_k, top_p, decoding.seed_pair(seed),
            tf.constant(stop_token_ids, tf.int32, shape=[len(stop_token_ids)]),
        )
        state = decoding.generate_in_graph(model, prompt, lengths, max_new_tokens, knobs)
        return state["out"], state["emitted"]

    return run.get_concrete_function()


def padded_batch(prompts, width=None):
    padded = np.zeros([len(prompts), width or max(map(len, prompts))], np.int32)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = p
    return padded, np.array([len(p) for p in prompts], np.int32)


def test_graph_without_xla_uses_no_xla_ops_and_takes_any_batch(model):
    """The loop as it is exported for TF Serving (XLA disabled): no `Xla*` op anywhere (while
    bodies and cond branches included), one graph for every batch size, prompt width and
    length, and the tokens of in-process generation, past the context too."""
    concrete = in_graph_generator(model)
    graph = concrete.graph.as_graph_def()
    op_types = {node.op for node in graph.node}
    op_types |= {node.op for function in graph.library.function for node in function.node_def}
    assert "While" in op_types or "StatelessWhile" in op_types
    assert not [op for op in op_types if op.startswith("Xla")]
    kwargs = dict(temperature=1.0, top_k=5, top_p=0.9, seed=3)
    for prompts, max_new_tokens in [(RAGGED[:3], 6), (RAGGED[3:], 2), (RAGGED, 40)]:
        padded, lengths = padded_batch(prompts, width=9)
        out, emitted = concrete(padded, lengths, max_new_tokens, 1.0, 5, 0.9, 3)
        rows = [out[b, :n].numpy().tolist() for b, n in enumerate(emitted.numpy())]
        # The same tokens as the XLA-compiled loop: the random numbers are bit-exact.
        assert rows == generation.generate(model, prompts, max_new_tokens, **kwargs)


def test_negative_stop_ids_are_padding_in_graph():
    """-1 in a signature's stop ids means "none": it never marks token V - 1 as a stop."""
    vocab_size = 64
    model = scripted_model([vocab_size - 1] * 8, vocab_size=vocab_size, context_length=16)
    padded, lengths = padded_batch([[0, 0]])
    out, emitted = in_graph_generator(model, stop_token_ids=(-1,))(padded, lengths, 4, 0.0, 0,
                                                                     1.0, 0)
    assert emitted.numpy().tolist() == [4]
    assert out.numpy().tolist() == [[vocab_size - 1] * 4]


def test_knob_rules_are_the_same_in_python_and_in_the_graph():
    """One definition of the rules: a bad value gets the same message from `generate` (ValueError)
    and from an exported graph (InvalidArgumentError)."""
    vocab_size = 64
    model = scripted_model([], vocab_size=vocab_size, context_length=16)

    @tf.function(autograph=False)
    def check(max_new_tokens, temperature, top_k, top_p):
        checks = decoding.check_knobs_in_graph(
            vocab_size, max_new_tokens, temperature, top_k, top_p, tf.constant([-1, 3])
        )
        with tf.control_dependencies(checks):
            return tf.constant(0)

    for name, bad in [("temperature", -1.0), ("temperature", float("inf")), ("top_k", -2),
                      ("top_p", 1.5), ("max_new_tokens", -3)]:
        values = dict(max_new_tokens=1, temperature=1.0, top_k=0, top_p=1.0)
        values[name] = bad
        with pytest.raises(ValueError) as python_error:
            generation.generate(model, [[1]], **values)
        with pytest.raises(tf.errors.InvalidArgumentError) as graph_error:
            check(tf.constant(values["max_new_tokens"]),
                  tf.constant(values["temperature"], tf.float32), tf.constant(values["top_k"]),
                  tf.constant(values["top_p"], tf.float32))
        rule = str(python_error.value).split(" Received")[0]
        assert rule.startswith(f"`{name}` must be") and rule in graph_error.value.message
    # The defaults pass.
    assert check(tf.constant(4), tf.constant(0.0), tf.constant(0), tf.constant(1.0)) == 0


def test_array_prompts_with_lengths_and_single_prompt(model):
    padded = np.zeros([4, 7], np.int32)
    for b, p in enumerate(RAGGED):
        padded[b, : len(p)] = p
    lengths = [len(p) for p in RAGGED]
    expected = generation.generate(model, RAGGED, max_new_tokens=4, temperature=0)
    assert generation.generate(model, padded, 4, temperature=0, lengths=lengths) == expected
    assert generation.generate(model, tf.ragged.constant(RAGGED), 4, temperature=0) == expected
    assert generation.generate(model, RAGGED[1], 4, temperature=0) == oracle_greedy(
        model, RAGGED[1], 4
    )


def test_sliding_window_matches_oracle(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
    out = generation.generate(model, prompts, max_new_tokens=30, temperature=0)
    keep = TINY.context_length // 2
    window = TINY.context_length
    assert out == [oracle_greedy(model, p, 30, window=window, keep=keep) for p in prompts]


def test_long_prompt_keeps_its_last_tokens_and_warns(model):
    prompt = list(np.random.default_rng(0).integers(0, TINY.vocab_size, 20))
    with pytest.warns(UserWarning, match="Prompt 0 has 20 tokens; keeping its last 16"):
        out = generation.generate(model, [prompt], max_new_tokens=3, temperature=0)
    keep = TINY.context_length // 2
    assert out == [oracle_greedy(model, prompt[-16:], 3, window=TINY.context_length, keep=keep)]
    with pytest.warns(UserWarning, match="keeping its last 13"):
        out = generation.generate(model, [prompt], 4, temperature=0, sliding_window=False)
    assert out == [oracle_greedy(model, prompt[-13:], 4)]


def test_a_full_context_is_used(model):
    """A prompt of exactly `context_length` tokens is kept whole, and the token after it is
    predicted from all of them; without a sliding window, prompt + new tokens may reach
    `context_length + 1`."""
    context = TINY.context_length
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, TINY.vocab_size, context)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = generation.generate(model, [prompt], 1, temperature=0)
        assert first == [oracle_greedy(model, prompt, 1)]  # oracle_greedy refuses near-ties
        short = prompt[: context + 1 - 5]
        out = generation.generate(model, [short], 5, temperature=0, sliding_window=False)
    assert out == [oracle_greedy(model, short, 5)]


# -- Sampling ------------------------------------------------------------------------------


def test_same_seed_same_sample_and_different_seeds_differ(model):
    def run(seed):
        return generation.generate(model, RAGGED, max_new_tokens=9, temperature=1.5, seed=seed)

    assert run(1) == run(1)
    assert len({str(run(seed)) for seed in range(4)}) == 4


def test_seed_none_follows_keras_random_seed(model):
    import keras

    keras.utils.set_random_seed(5)
    first = generation.generate(model, RAGGED, max_new_tokens=6, temperature=1.5)
    keras.utils.set_random_seed(5)
    assert generation.generate(model, RAGGED, max_new_tokens=6, temperature=1.5) == first


def test_top_k_one_is_greedy(model):
    greedy = generation.generate(model, RAGGED, max_new_tokens=9, temperature=0)
    assert generation.generate(model, RAGGED, 9, temperature=3.0, top_k=1, seed=3) == greedy


def test_top_k_and_top_p_stay_inside_the_oracle_sets(model):
    temperature = 2.0
    for seed in range(3):
        top_k_out = generation.generate(
            model, RAGGED, max_new_tokens=9, temperature=temperature, top_k=3, seed=seed
        )
        top_p_out = generation.generate(
            model, RAGGED, max_new_tokens=9, temperature=temperature, top_p=0.5, seed=seed
        )
        for prompt, k_row, p_row in zip(RAGGED, top_k_out, top_p_out):
            for j, token in enumerate(k_row):
                logits = oracle_logits(model, prompt + k_row[:j])
                assert token in np.argsort(logits)[-3:]
            for j, token in enumerate(p_row):
                logits = oracle_logits(model, prompt + p_row[:j]) / temperature
                probabilities = np.exp(logits - logits.max())
                probabilities /= probabilities.sum()
                order = np.argsort(-probabilities)
                mass_before = np.cumsum(probabilities[order]) - probabilities[order]
                nucleus = order[mass_before < 0.5 + 1e-5]
                assert token in nucleus


def test_sampled_frequencies_follow_the_restricted_distribution():
    """Frequencies of 2048 draws against the exact restricted distributions, on a vocabulary of
    512 > `sampling.CANDIDATES`, so that both the candidate path and the whole-vocabulary path run."""
    vocab_size, draws = 512, 2048
    table = np.full([32, vocab_size], -1e4, np.float32)
    peaked = np.array([0.5, 0.3, 0.15, 0.05])
    table[0, :4] = np.log(peaked)  # after a 1-token prompt
    broad = np.arange(400, 0, -1) / np.arange(400, 0, -1).sum()  # p_i ∝ 400 - i
    table[1, :400] = np.log(broad)  # after a 2-token prompt
    table[2, :4] = [2.0, 1.0, 1.0, 1.0]  # after a 3-token prompt: a tie at the 2nd place
    table[3, 0], table[3, 1:301] = 2.0, 1.0  # the tie reaches past the 256 candidates
    model = scripted_model([], vocab_size=vocab_size, base=table)

    def expect(probabilities):
        return np.pad(probabilities, (0, vocab_size - len(probabilities))) / probabilities.sum()

    cases = [
        (1, {}, expect(peaked)),
        (1, {"top_k": 3}, expect(peaked[:3])),  # candidates
        (1, {"top_p": 0.7}, expect(peaked[:2])),  # candidates: the first two reach 0.8
        (1, {"temperature": 0.5}, expect(peaked**2)),
        (1, {"top_k": 3, "top_p": 0.6}, expect(peaked[:2])),  # 0.5 / 0.95 < 0.6
        (2, {"top_k": 300}, expect(broad[:300])),  # k > 256: whole vocabulary
        # The top 256 hold 0.87 < 0.99: whole vocabulary; the nucleus is the first 361.
        (2, {"top_p": 0.99}, expect(broad[:361])),
        # Logits tied with the top_k-th are all kept (as in Hugging Face), on both paths.
        (3, {"top_k": 2}, expect(np.exp(table[2, :4]))),
        (4, {"top_k": 2}, expect(np.exp(table[3, :301]))),
    ]
    for prompt_length, kwargs, expected in cases:
        kwargs = {"temperature": 1.0, **kwargs}
        out = generation.generate(model, [[0] * prompt_length] * draws, 1, seed=11, **kwargs)
        tokens = np.array([row[0] for row in out])
        assert expected[tokens].min() > 0, (kwargs, sorted(set(tokens[expected[tokens] == 0])))
        # Compare 8 bins of equal expected mass... or single tokens when there are few.
        edges = np.searchsorted(np.cumsum(expected), np.linspace(0, 1, 9)[1:-1])
        bins = np.split(np.arange(vocab_size), np.unique(edges))
        observed = np.array([np.isin(tokens, b).mean() for b in bins])
        wanted = np.array([expected[b].sum() for b in bins])
        tolerance = 4 * np.sqrt(0.25 / draws)  # 4 standard deviations at worst
        np.testing.assert_allclose(observed, wanted, atol=tolerance, err_msg=str(kwargs))


# -- Stop tokens ---------------------------------------------------------------------------


def test_stop_token_ends_each_row_of_a_ragged_batch():
    stop = 7
    model = scripted_model([1, 2, 3, 4, stop, 5, 6, 8, 9])  # token after position p
    prompts = [[0, 0], [0, 0, 0, 0], [0] * 6]
    # Row b's first new token is the one after position len(prompt) - 1; all-zero logits after
    # the script give token 0.
    out = generation.generate(model, prompts, 10, temperature=0, stop_token_ids=[stop])
    assert out == [[2, 3, 4], [4], [5, 6, 8, 9, 0, 0, 0, 0, 0, 0]]
    out = generation.generate(
        model, prompts, 10, temperature=0, stop_token_ids=[stop, 9], include_stop_token=True
    )
    assert out == [[2, 3, 4, stop], [4, stop], [5, 6, 8, 9]]
    out = generation.generate(model, prompts, 2, temperature=0, stop_token_ids=stop)
    assert out == [[2, 3], [4], [5, 6]]


# -- Compiled-function reuse ---------------------------------------------------------------


def test_compiled_function_is_reused_across_prompts_knobs_and_seeds(model):
    generation.generate(model, RAGGED, max_new_tokens=6, temperature=0)
    traced = generation.tracing_count(model)
    assert traced >= 1
    other_prompts = [[9, 9, 9, 9, 9, 9], [1], [2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    for kwargs in [
        dict(temperature=0.7, seed=1),
        dict(temperature=1.3, top_k=5, seed=2),
        dict(temperature=0.9, top_p=0.8, seed=3, stop_token_ids=[4, 5]),
        dict(temperature=1.0, top_k=2, top_p=0.5, include_stop_token=True),
    ]:
        generation.generate(model, other_prompts, max_new_tokens=3, **kwargs)
        generation.generate(model, RAGGED, max_new_tokens=6, **kwargs)
    assert generation.tracing_count(model) == traced
    list(generation.stream(model, RAGGED, max_new_tokens=6, chunk_size=2, temperature=0))
    traced = generation.tracing_count(model)
    for chunk_size, seed in [(3, 1), (1, 2), (5, 3)]:
        list(generation.stream(model, other_prompts, 4, chunk_size=chunk_size, seed=seed))
    assert generation.tracing_count(model) == traced


# -- Streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0),
    dict(temperature=1.2, top_k=8, top_p=0.9, seed=4),
])
def test_streaming_joins_to_the_non_streaming_tokens(model, kwargs):
    expected = generation.generate(model, RAGGED, max_new_tokens=30, **kwargs)
    chunks = list(generation.stream(model, RAGGED, max_new_tokens=30, chunk_size=4, **kwargs))
    assert len(chunks) > 3
    assert all(len(ids) <= 4 for chunk in chunks for ids in chunk)
    joined = [sum((chunk[b] for chunk in chunks), []) for b in range(len(RAGGED))]
    assert joined == expected


def test_the_first_streamed_chunk_is_the_token_after_the_prefill(model):
    # The first compiled call prefills and decides one slot (the decode loop lives in the later
    # calls only); then chunks of `chunk_size`.
    prompts = [[1, 2, 3], [4, 5, 6]]
    chunks = list(generation.stream(model, prompts, max_new_tokens=9, chunk_size=4,
                                    temperature=0))
    assert [[len(ids) for ids in chunk] for chunk in chunks] == [[1, 1], [4, 4], [4, 4]]
    assert [sum((chunk[b] for chunk in chunks), []) for b in range(2)] == generation.generate(
        model, prompts, max_new_tokens=9, temperature=0)


class ByteTokenizer:
    """Ids 0..255 are bytes (test-only). `sanitize=True` replaces invalid UTF-8 in `detokenize`'s
    output by U+FFFD, as gpt_keras' byte-level BPE does; otherwise it returns the raw bytes."""

    def __init__(self, sanitize=False):
        self.sanitize = sanitize

    def tokenize(self, text):
        return tf.constant(list(text.encode("utf-8")), tf.int32)

    def detokenize(self, ids):
        data = bytes(np.asarray(ids, np.uint8).tolist())
        if self.sanitize:
            data = data.decode("utf-8", errors="replace").encode("utf-8")
        return tf.constant(data)


def byte_script(text):
    return list(text.encode("utf-8"))


@pytest.mark.parametrize("sanitize", [False, True])
def test_text_streaming_never_splits_a_character(sanitize):
    text = "aé€😀b ü中"
    model = scripted_model(byte_script(text + "!"))  # a 1-token prompt continues from position 0
    generator = generation.TextGenerator(model, ByteTokenizer(sanitize))
    n = len(text.encode("utf-8"))
    assert generator.generate("x", max_new_tokens=n) == text
    pieces = list(generator.stream("x", max_new_tokens=n, chunk_size=1))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "😀" in pieces and "€" in pieces  # whole, in one piece each
    batch = list(generator.stream(["x", "yz"], max_new_tokens=n, chunk_size=3))
    assert "".join(chunk[0] for chunk in batch) == text
    assert "".join(chunk[1] for chunk in batch) == text[1:] + "!"  # one position later


def test_text_generation_incomplete_bytes_become_replacement_at_the_end():
    model = scripted_model(byte_script("ok") + [0xE2, 0x82])  # "€" cut short
    generator = generation.TextGenerator(model, ByteTokenizer())
    assert generator.generate("x", max_new_tokens=4) == "ok\ufffd"


def test_text_stop_strings_end_the_text_and_are_never_streamed():
    text = "hello STOP world"
    model = scripted_model(byte_script(text))
    generator = generation.TextGenerator(model, ByteTokenizer())
    assert generator.generate("x", max_new_tokens=len(text), stop_strings=["STOP"]) == "hello "
    pieces = list(generator.stream("x", len(text), chunk_size=2, stop_strings="STOP"))
    assert "".join(pieces) == "hello " and all("S" not in piece for piece in pieces)
    assert generator.generate("x", max_new_tokens=len(text), stop_strings=["STOPS"]) == text


@pytest.mark.parametrize("sanitize", [False, True])
def test_incremental_text_matches_decoding_everything_at_once(sanitize):
    data = "añ€😀".encode("utf-8") + b"\xff" + "z€".encode("utf-8") + b"\xe2\x82"
    tokenizer = ByteTokenizer(sanitize)
    row = generation.IncrementalText(lambda ids: tokenizer.detokenize(ids).numpy(), ())
    pieces = [row.feed([byte]) for byte in data] + [row.finish()]
    assert "".join(pieces) == data.decode("utf-8", errors="replace")
    # Fed one byte at a time, each multi-byte character still comes out whole, in one piece.
    assert {"ñ", "€", "😀"} <= {character for piece in pieces for character in [piece[-1:]]}


# -- Errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-1), r"`top_k` must be an integer ≥ 0 \(0 = no cut\). Received: top_k=-1"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_p=0.0), r"`top_p` must be a number in \(0, 1\] \(1 = no cut\). Received: top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-0.1), "`temperature` must be a finite number ≥ 0 .* temperature=-0.1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(prompts=[]), "`prompts` is empty"),
    (dict(prompts=[[1, 2], []]), "Prompt 1 is empty"),
    (dict(prompts=[[1, 64]]), r"Prompt 0 has token id 64 outside the vocabulary \[0, 64\)"),
    (dict(prompts=[[1.5]]), "Prompt 0 must be a 1-D sequence of int token ids"),
    (dict(max_new_tokens=-1), "`max_new_tokens` must be an integer ≥ 0. .* max_new_tokens=-1"),
    (
        dict(max_new_tokens=17, sliding_window=False),
        "must be at most context_length=16 .* max_new_tokens=17",
    ),
    (dict(stop_token_ids=[64]), r"`stop_token_ids` must be ids in \[0, 64\)"),
    (dict(seed="a"), "`seed` must be an int or None"),
    (dict(cache_length=4), r"`cache_length` must lie in \[6, context_length=16\]"),
    (dict(chunk_size=0), "`chunk_size` must be an integer ≥ 1. Received: chunk_size=0"),
])
def test_invalid_arguments_raise(kwargs, message):
    model = scripted_model([], vocab_size=64, context_length=16)
    arguments = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generation.stream(model, **arguments)
    if "chunk_size" not in kwargs:
        with pytest.raises(ValueError, match=message):
            generation.generate(model, **arguments)


def test_text_generator_errors():
    generator = generation.TextGenerator(scripted_model([]), ByteTokenizer())
    with pytest.raises(ValueError, match="`stop_strings` must be non-empty strings"):
        generator.stream("x", 2, stop_strings=[""])  # raised before iterating
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        generator.generate("", 2)
    with pytest.raises(ValueError, match="`prompts` must be a `str` or a non-empty list"):
        generator.generate([], 2)
    with pytest.raises(ValueError, match=r"`row` must be an int in \[0, 1\). Received: row=1"):
        generation.stream(generator.model, [[1]], 2).stop(1)


def test_zero_new_tokens_returns_empty_rows(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generation.generate(model, RAGGED, max_new_tokens=0) == [[], [], [], []]


def test_auto_compiles_with_xla_except_bfloat16_beyond_batch_1():
    """`jit_compile="auto"`: XLA for float32 and int8 weights at any batch size and for bfloat16
    at batch 1; a plain graph (oneDNN) for bfloat16 at larger batches and for float16."""
    small = GPT(**dataclasses.asdict(TINY))
    large = GPT(**dataclasses.asdict(GPTConfig.from_preset("gpt2-small")))
    half = GPT(**dataclasses.asdict(TINY), dtype="bfloat16")
    assert generation.resolve_jit_compile(small, "auto") is True
    assert generation.resolve_jit_compile(large, "auto") is True
    assert generation.resolve_jit_compile(large, "auto", batch_size=8) is True
    assert generation.resolve_jit_compile(half, "auto") is True
    assert generation.resolve_jit_compile(half, "auto", batch_size=8) is False
    float16 = GPT(**dataclasses.asdict(TINY), dtype="float16")
    assert generation.resolve_jit_compile(float16, "auto") is False
    assert generation.resolve_jit_compile(large, True) is True
    small.build()
    assert generation.resolve_jit_compile(with_weights(small, "int8"), "auto") is True
    with pytest.raises(ValueError, match="`jit_compile` must be True, False or 'auto'"):
        generation.resolve_jit_compile(small, "yes")
