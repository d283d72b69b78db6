import keras
import keras_hub
import numpy as np
import pytest

from gpt_keras.layers import RotaryEmbedding
from tests.layer_checks import assert_config_round_trip, assert_keras_round_trip
from tests.numpy_reference import rotary


def random_heads(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")  # [B, T, H, K]


@pytest.mark.parametrize("head_dim", [2, 8, 32])
@pytest.mark.parametrize("start", [0, 5, 1000])
def test_matches_numpy_closed_form_at_any_offset(head_dim, start):
    x = random_heads((2, 7, 3, head_dim))
    rotated = RotaryEmbedding()(x, start_index=start)
    assert rotated.shape == x.shape
    # float32 sin/cos of angles up to ~1000 rad carry ~1e-4 absolute rounding.
    np.testing.assert_allclose(rotated, rotary(x, range(start, start + 7)),
                               atol=1e-5 if start < 10 else 5e-4)


def test_matches_keras_hub_rotary_embedding():
    x = random_heads((2, 9, 4, 16), seed=1)
    for start in (0, 6):
        expected = keras_hub.layers.RotaryEmbedding()(x, start_index=start)
        np.testing.assert_allclose(RotaryEmbedding()(x, start_index=start), expected, atol=1e-6)


def test_query_key_products_depend_only_on_the_offset():
    layer = RotaryEmbedding()
    rng = np.random.default_rng(2)
    q = np.broadcast_to(rng.normal(size=(1, 1, 1, 8)), (1, 30, 1, 8)).astype("float32")
    k = np.broadcast_to(rng.normal(size=(1, 1, 1, 8)), (1, 30, 1, 8)).astype("float32")
    q, k = np.asarray(layer(q))[0, :, 0], np.asarray(layer(k))[0, :, 0]  # [T, K]
    scores = q @ k.T  # scores[p, s]: query at p, key at s
    for offset in (0, 3, 11):
        diagonal = np.diagonal(scores, offset=-offset)  # all (p, p - offset)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-5)
    assert not np.allclose(scores[5, 5], scores[5, 2])


def test_keeps_norms_and_position_zero_is_the_identity():
    x = random_heads((1, 6, 2, 8), seed=3)
    rotated = np.asarray(RotaryEmbedding()(x))
    np.testing.assert_allclose(rotated[:, 0], x[:, 0], atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-6)


def test_decoding_step_gets_exactly_the_rotation_of_the_full_pass():
    layer = RotaryEmbedding()
    x = random_heads((1, 40, 2, 16), seed=4)
    full = layer(x)
    for position in [0, 1, 17, 39]:
        step = layer(x[:, position : position + 1], start_index=position)
        np.testing.assert_array_equal(step[0, 0], full[0, position])


def test_per_row_start_index():
    layer = RotaryEmbedding()
    x = random_heads((2, 4, 2, 8), seed=5)
    rotated = layer(x, start_index=np.array([0, 3], "int32"))
    np.testing.assert_array_equal(rotated[0], layer(x[:1], start_index=0)[0])
    np.testing.assert_array_equal(rotated[1], layer(x[1:], start_index=3)[0])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_has_no_weights_and_follows_the_input_dtype(policy):
    layer = RotaryEmbedding(dtype=policy)
    compute_dtype = keras.mixed_precision.DTypePolicy(policy).compute_dtype
    x = keras.ops.cast(random_heads((1, 4, 2, 8)), compute_dtype)
    rotated = layer(x, start_index=2)
    assert layer.weights == []
    assert keras.backend.standardize_dtype(rotated.dtype) == compute_dtype
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(rotated, "float32")),
                               rotary(np.asarray(keras.ops.cast(x, "float32")), range(2, 6)),
                               atol=2e-2)


def test_config_and_keras_round_trip(tmp_path):
    layer = RotaryEmbedding(max_wavelength=500)
    assert_config_round_trip(layer)
    restored = assert_keras_round_trip(layer, random_heads((2, 5, 2, 8)), tmp_path)
    assert restored.layers[-1].max_wavelength == 500


@pytest.mark.parametrize("bad", [0, 1, -3, "10000", True])
def test_rejects_bad_max_wavelength(bad):
    with pytest.raises(ValueError, match="max_wavelength.*Received: max_wavelength="):
        RotaryEmbedding(max_wavelength=bad)


def test_rejects_an_odd_head_size():
    with pytest.raises(ValueError, match="head size.*must be even.*Received: inputs.shape="):
        RotaryEmbedding()(random_heads((1, 3, 2, 5)))
