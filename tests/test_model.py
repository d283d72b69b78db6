import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gpt_keras
from gpt_keras import GPT, GPTConfig, num_parameters
from gpt_keras.layers.multi_head_attention import in_place_cache_writes
from tests import numpy_reference as ref

TINY = GPTConfig.from_preset("tiny")  # vocab 64, context 16, 2 layers, 2 heads, 32 dims


def tiny_model(**overrides):
    model = GPT(**dataclasses.asdict(TINY.replace(**overrides)))
    model.build()
    return model


def random_ids(shape, vocab=TINY.vocab_size, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype("int32")


@pytest.mark.parametrize("overrides", [
    {},
    {"position_embedding": "learned", "tie_embeddings": False},
    {"position_embedding": "rotary"},
    {"mlp_dim": 20, "num_heads": 4, "layer_norm_epsilon": 1e-3},
])
def test_matches_numpy_forward_pass(overrides):
    model = tiny_model(**overrides)
    ref.randomize_weights(model)
    ids = random_ids((3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, TINY.vocab_size) and logits.dtype == tf.float32
    np.testing.assert_allclose(logits, ref.gpt_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_hidden_states_times_the_embedding_are_the_logits():
    model = tiny_model()
    ref.randomize_weights(model)
    ids = random_ids((2, 6))
    hidden = np.asarray(model(ids, return_hidden_states=True))
    assert hidden.shape == (2, 6, TINY.hidden_dim)
    np.testing.assert_allclose(hidden @ model.token_embedding.embeddings.numpy().T, model(ids),
                               atol=1e-4, rtol=1e-5)


def test_padding_mask_matches_numpy_forward_pass():
    model = tiny_model()
    ref.randomize_weights(model)
    ids = random_ids((2, 9))
    mask = np.ones((2, 9), "int32")
    mask[0, 2] = 0
    mask[1, :3] = 0
    np.testing.assert_allclose(
        model(ids, padding_mask=mask), ref.gpt_logits(model, ids, mask), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("position_embedding", ["sinusoidal", "rotary"])
def test_attention_scores_match_numpy(position_embedding):
    model = tiny_model(position_embedding=position_embedding, num_layers=3)
    ref.randomize_weights(model)
    ids = random_ids((2, 9))
    mask = np.ones((2, 9), "int32")
    mask[1, :3] = 0  # left padding
    logits, scores = model(ids, padding_mask=mask, return_attention_scores=True)
    expected = []
    expected_logits = ref.gpt_logits(model, ids, mask, scores_out=expected)
    assert scores.shape == (2, 3, TINY.num_heads, 9, 9) and scores.dtype == tf.float32
    np.testing.assert_allclose(scores, np.stack(expected, axis=1), atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.triu(scores[0, 0, 0], 1), 0)  # causal
    np.testing.assert_array_equal(model(ids, padding_mask=mask), logits)


def test_is_causal():
    model = tiny_model()
    ref.randomize_weights(model)
    ids = random_ids((2, 12))
    logits = np.asarray(model(ids))
    for t in [0, 5, 10]:
        changed = ids.copy()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % TINY.vocab_size
        changed_logits = np.asarray(model(changed))
        np.testing.assert_array_equal(changed_logits[:, : t + 1], logits[:, : t + 1])
        assert not np.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("position_embedding", ["sinusoidal", "learned", "rotary"])
def test_cached_decoding_equals_full_pass(position_embedding):
    model = tiny_model(position_embedding=position_embedding)
    ref.randomize_weights(model)
    ids = random_ids((2, 14))
    full = np.asarray(model(ids))
    cache = model.init_cache(2)
    assert model.init_cache(3).shape == (2, 2, 3, 2, 16, 16)  # [L, 2, B, H, S, K]
    logits, cache = model.call_with_cache(ids[:, :5], cache, 0)  # prefill
    steps = [logits]
    for t in range(5, 14):
        logits, cache = model.call_with_cache(ids[:, t : t + 1], cache, t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5, rtol=1e-5)
    _, one_pass_cache = model.call_with_cache(ids, model.init_cache(2), 0)
    np.testing.assert_allclose(cache, one_pass_cache, atol=1e-5)


def test_cached_step_compiles_to_one_graph_for_every_position():
    model = tiny_model()
    step = tf.function(model.call_with_cache, jit_compile=False)
    cache = model.init_cache(1)
    for t in range(3):
        _, cache = step(random_ids((1, 1), seed=t), cache, tf.constant(t))
    assert step.experimental_get_tracing_count() == 1


def test_in_place_cached_step_checks_and_places_its_writes_once_for_all_layers():
    """A plain graph of a decoding step with in-place cache writes (the served decoding loop):
    one bounds check (and one computation of the written rows) for all L layers, one write per
    layer, and the logits and caches of the copying writes."""
    model = tiny_model(num_layers=3)
    ref.randomize_weights(model)
    ids = random_ids((2, 6))
    _, caches = model.call_with_layer_caches(ids[:, :5], model.init_layer_caches(2), 0)

    @tf.function(jit_compile=False)
    def step(caches, in_place):
        with in_place_cache_writes(in_place):
            return model.call_with_layer_caches(ids[:, 5:], caches, tf.constant(5))

    expected = step([c + 0 for c in caches], False)
    logits, written = step([c + 0 for c in caches], True)  # fresh buffers: written in place
    np.testing.assert_array_equal(logits, expected[0])
    for cache, expected_cache in zip(written, expected[1]):
        np.testing.assert_array_equal(cache, expected_cache)
    ops = [op.type for op in step.get_concrete_function(caches, True).graph.get_operations()]
    assert ops.count("InplaceUpdate") == 3
    assert ops.count("Assert") == 1


def test_initial_weights_are_independent_and_reproducible():
    """GPT-2's init, drawn separately for every weight: no two matrices share values (an unseeded
    Keras initializer instance shared by several weights repeats its numbers), the residual
    projections are scaled by 1/sqrt(2L), and `set_random_seed` reproduces the model."""
    def build(seed):
        keras.utils.set_random_seed(seed)
        model = GPT.from_preset("tiny", num_layers=4, hidden_dim=64, num_heads=4,
                                position_embedding="learned", tie_embeddings=False)
        model.build()
        return {v.path.split("/", 1)[1]: np.asarray(v) for v in model.weights
                if "kernel" in v.path or "embeddings" in v.path}  # without the model's name

    weights = build(0)
    assert len(weights) == 4 * 4 + 3  # per block: qkv, output, mlp_in, mlp_out; 2 tables, head
    prefixes = {name: tuple(np.round(w.ravel()[:8], 7)) for name, w in weights.items()}
    assert len(set(prefixes.values())) == len(prefixes), "two weights start with the same values"
    for name, w in weights.items():
        residual = name.endswith(("attention/output/kernel", "mlp_out/kernel"))
        expected = 0.02 / np.sqrt(2 * 4) if residual else 0.02
        assert abs(w.std() / expected - 1) < 0.1, (name, w.std(), expected)
    again = build(0)
    assert all(np.array_equal(weights[name], again[name]) for name in weights)
    assert not np.array_equal(weights[next(iter(weights))], build(1)[next(iter(weights))])


def test_parameter_count_matches_closed_form():
    for overrides in [{}, {"position_embedding": "learned"}, {"position_embedding": "rotary"},
                      {"tie_embeddings": False}, {"mlp_dim": 50}]:
        model = tiny_model(**overrides)
        assert model.count_params() == num_parameters(model.config)
    gpt2 = GPT.from_preset("gpt2-small")
    gpt2.build()
    assert gpt2.count_params() == num_parameters(gpt2.config) == 124_439_808  # OpenAI's GPT-2 small


def test_presets():
    baby = GPTConfig.from_preset("shakespeare-char")
    assert (baby.num_layers, baby.num_heads, baby.hidden_dim, baby.context_length) == (4, 4, 128, 64)
    assert baby.position_embedding == "rotary" and baby.tie_embeddings and baby.dropout == 0.0
    assert GPTConfig.from_preset("shakespeare-char", vocab_size=100).vocab_size == 100
    assert set(gpt_keras.PRESETS) >= {"tiny", "shakespeare-char", "gpt2-small"}
    with pytest.raises(ValueError, match="Unknown preset 'gpt5'. Choose one of: .*tiny"):
        GPTConfig.from_preset("gpt5")


def test_config_round_trip():
    model = tiny_model(dropout=0.1, position_embedding="learned")
    config = model.get_config()
    assert {k: config[k] for k in dataclasses.asdict(model.config)} == dataclasses.asdict(model.config)
    assert GPT.from_config(config).get_config() == config
    assert GPT(**dataclasses.asdict(model.config)).config == model.config


def test_sinusoidal_model_of_the_old_embedding_scale_is_refused():
    """Configs without `config_version` (gpt_keras 0.1) scaled the token embeddings by sqrt(D) for
    sinusoidal positions: their weights would give wrong outputs, so loading names the cause.
    Learned and rotary models are unchanged and still load."""
    for position_embedding in ("sinusoidal", "learned"):
        config = tiny_model(position_embedding=position_embedding).get_config()
        assert config.pop("config_version") == 2
        if position_embedding == "learned":
            assert GPT.from_config(config).config.position_embedding == "learned"
            continue
        with pytest.raises(ValueError, match="saved by gpt_keras 0.1 with sinusoidal positions"):
            GPT.from_config(config)


@pytest.mark.parametrize("position_embedding", ["learned", "rotary"])
def test_keras_save_and_load_give_identical_outputs(tmp_path, position_embedding):
    model = tiny_model(position_embedding=position_embedding)
    ids = random_ids((2, 10))
    path = os.path.join(tmp_path, "gpt.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, GPT) and restored.config == model.config
    np.testing.assert_array_equal(restored(ids), model(ids))


def test_usable_as_a_layer_in_a_functional_model(tmp_path):
    gpt = tiny_model()
    token_ids = keras.Input((None,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(gpt(token_ids))
    classifier = keras.Model(token_ids, keras.layers.Dense(3, name="head")(pooled))
    ids = random_ids((4, 8))
    expected = np.asarray(classifier(ids))
    assert expected.shape == (4, 3)
    path = os.path.join(tmp_path, "classifier.keras")
    classifier.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(restored(ids), expected)
    assert sum(isinstance(layer, GPT) for layer in restored.layers) == 1


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    model = tiny_model()
    ids = random_ids((2, 8))
    logits = model(ids)
    assert logits.dtype == tf.float32
    assert all(w.dtype == "float32" for w in model.weights)
    assert model.init_cache(1).dtype == policy.split("_")[1]
    keras.config.set_dtype_policy("float32")
    reference = tiny_model()
    reference.set_weights(model.get_weights())
    np.testing.assert_allclose(logits, reference(ids), atol=0.02)
    _, cache = model.call_with_cache(ids, model.init_cache(2), 0)
    assert cache.dtype == policy.split("_")[1]


def test_overfits_one_batch_with_fit():
    model = tiny_model()
    ids = random_ids((4, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    initial_loss = model.evaluate(inputs, targets, verbose=0)
    dataset = tf.data.Dataset.from_tensors((inputs, targets)).repeat(150)
    model.fit(dataset, epochs=1, verbose=0)
    assert initial_loss > 3.5  # about ln(64) at initialisation
    assert model.evaluate(inputs, targets, verbose=0) < 0.05


def test_out_of_range_token_ids_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Token id 64 is outside the vocabulary \[0, 64\)"):
        model(np.array([[1, 64]], "int32"))
    with pytest.raises(ValueError, match=r"Token id -1 is outside the vocabulary \[0, 64\)"):
        model(np.array([[-1, 3]], "int32"))
    with pytest.raises(ValueError, match="Token id 99"):
        model.call_with_cache(np.array([[99]], "int32"), model.init_cache(1), 0)


def test_too_long_sequences_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="17 tokens, more than context_length=16"):
        model(random_ids((1, 17)))
    with pytest.raises(ValueError, match="3 tokens, more than cache length - cache_index=2"):
        model.call_with_cache(random_ids((1, 3)), model.init_cache(1), 14)
    with pytest.raises(ValueError, match="17 tokens, more than context_length=16"):
        tf.function(model).get_concrete_function(tf.TensorSpec((None, 17), tf.int32))
    with pytest.raises(ValueError, match="cache length must be at most context_length=16"):
        model.init_cache(1, 32)
    with pytest.raises(ValueError, match="cache_index` must be >= 0. Received: cache_index=-1"):
        model.call_with_cache(random_ids((1, 1)), model.init_cache(1), -1)
    with pytest.raises(ValueError, match=r"2-D \[batch, time\]"):
        model(np.array([1, 2, 3], "int32"))


@pytest.mark.parametrize("overrides, match", [
    ({"num_layers": 0}, "num_layers` must be a positive integer. Received: num_layers=0"),
    ({"vocab_size": 1.5}, "vocab_size` must be a positive integer. Received: vocab_size=1.5"),
    ({"hidden_dim": 30, "num_heads": 4}, "Received: hidden_dim=30, num_heads=4"),
    ({"position_embedding": "alibi"}, "position_embedding` must be one of .*'rotary'"),
    ({"position_embedding": "rotary", "hidden_dim": 12, "num_heads": 4},
     "Rotary .* even head size .*Received: hidden_dim=12, num_heads=4"),
    ({"dropout": 1.5}, "dropout` must be in \\[0, 1\\). Received: dropout=1.5"),
])
def test_bad_config_is_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPT(**dataclasses.asdict(TINY.replace(**overrides)))
