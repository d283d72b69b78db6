import keras
import numpy as np
import pytest
import tensorflow as tf

from gpt_keras.layers import TransformerBlock
from tests import numpy_reference as ref
from tests.layer_checks import assert_config_round_trip, assert_keras_round_trip

B, T, D, H, M = 2, 6, 16, 4, 40
INIT = keras.initializers.RandomNormal(stddev=0.3)


def make_block(**kwargs):
    block = TransformerBlock(H, M, kernel_initializer=INIT, **kwargs)
    block.build((None, None, D))
    for norm in (block.attention_norm, block.mlp_norm):  # non-trivial LayerNorm weights
        norm.gamma.assign(np.random.default_rng(0).normal(1.0, 0.2, D))
        norm.beta.assign(np.random.default_rng(1).normal(0.0, 0.2, D))
    return block


@pytest.mark.parametrize("rotary_max_wavelength", [None, 10000])
def test_matches_numpy_pre_layernorm_gpt2_block(rotary_max_wavelength):
    block = make_block(layer_norm_epsilon=1e-5, rotary_max_wavelength=rotary_max_wavelength)
    x = np.random.default_rng(2).normal(size=(B, T, D)).astype("float32")
    mask = np.ones((B, T), "int32")
    mask[1, :2] = 0
    expected = ref.block(x.astype(np.float64), ref.block_weights(block), H, 1e-5, mask,
                         rotary_max_wavelength)
    np.testing.assert_allclose(block(x, padding_mask=mask), expected, atol=1e-5)


@pytest.mark.parametrize("rotary_max_wavelength", [None, 10000])
def test_cached_steps_equal_full_pass(rotary_max_wavelength):
    block = make_block(rotary_max_wavelength=rotary_max_wavelength)
    x = np.random.default_rng(3).normal(size=(B, T, D)).astype("float32")
    cache = np.zeros((2, B, H, 8, D // H), "float32")
    first, cache = block(x[:, :4], cache=cache, cache_index=0)
    second, cache = block(x[:, 4:], cache=cache, cache_index=4)
    np.testing.assert_allclose(np.concatenate([first, second], 1), block(x), atol=1e-5)


def test_residual_dropout_only_in_training():
    block = make_block(dropout=0.3)
    x = np.random.default_rng(4).normal(size=(B, T, D)).astype("float32")
    expected = ref.block(x.astype(np.float64), ref.block_weights(block), H, 1e-5)
    np.testing.assert_allclose(block(x, training=False), expected, atol=1e-5)
    assert not np.allclose(block(x, training=True), expected, atol=1e-3)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    block = TransformerBlock(H, M, dtype=policy)
    block.build((None, None, D))
    out = block(np.random.default_rng(5).normal(size=(B, T, D)).astype("float32"))
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    assert all(w.dtype == "float32" for w in block.weights)
    assert {layer.dtype_policy.name for layer in block._flatten_layers()} == {policy}


def test_config_and_keras_round_trip(tmp_path):
    block = TransformerBlock(2, 24, dropout=0.1, layer_norm_epsilon=1e-6,
                             output_kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                             rotary_max_wavelength=500)
    assert_config_round_trip(block)
    assert block.attention.rotary_max_wavelength == 500
    x = np.random.default_rng(6).normal(size=(2, 5, 8)).astype("float32")
    assert_keras_round_trip(block, x, tmp_path)


def test_stable_weight_paths():
    block = make_block()
    paths = sorted(w.path.split("/", 1)[1] for w in block.weights)
    assert paths == sorted([
        "attention/query_key_value/kernel", "attention/query_key_value/bias",
        "attention/output/kernel", "attention/output/bias",
        "attention_norm/gamma", "attention_norm/beta", "mlp_norm/gamma", "mlp_norm/beta",
        "mlp_in/kernel", "mlp_in/bias", "mlp_out/kernel", "mlp_out/bias",
    ])


@pytest.mark.parametrize("kwargs, match", [
    ({"mlp_dim": 0}, "mlp_dim.*Received: mlp_dim=0"),
    ({"dropout": -0.1}, "dropout.*Received: dropout=-0.1"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon.*Received: layer_norm_epsilon=0"),
    ({"num_heads": 0}, "num_heads.*Received: num_heads=0"),
])
def test_rejects_bad_arguments(kwargs, match):
    args = {"num_heads": 2, "mlp_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        TransformerBlock(**args)


def test_gelu_is_applied_to_the_two_dimensional_product():
    """In a plain graph the MLP's GELU follows `MatMul` + `BiasAdd` on the 2-D product, where
    Grappler fuses the three into one oneDNN kernel (not after the reshape back to 3-D)."""
    block = make_block()
    graph = tf.function(block, jit_compile=False).get_concrete_function(
        tf.TensorSpec((None, 1, D), tf.float32)).graph
    tanh = [op for op in graph.get_operations() if op.type == "Tanh"]
    assert len(tanh) == 1 and tanh[0].inputs[0].shape.rank == 2
