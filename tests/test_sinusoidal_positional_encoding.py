import keras
import numpy as np
import pytest

from gpt_keras.layers import SinusoidalPositionalEncoding
from tests.layer_checks import assert_config_round_trip, assert_keras_round_trip
from tests.numpy_reference import sinusoidal_table


@pytest.mark.parametrize("dim", [8, 33])
@pytest.mark.parametrize("start", [0, 5, 1000])
def test_matches_numpy_closed_form_at_any_offset(dim, start):
    inputs = np.zeros((2, 7, dim), "float32")
    encoding = SinusoidalPositionalEncoding()(inputs, start_index=start)
    expected = sinusoidal_table(range(start, start + 7), dim)
    assert encoding.shape == (2, 7, dim)
    # float32 sin/cos of angles up to ~1000 rad carry ~1e-4 absolute rounding.
    np.testing.assert_allclose(encoding[0], expected, atol=1e-6 if start < 10 else 2e-4)
    np.testing.assert_array_equal(encoding[0], encoding[1])


def test_even_features_are_sin_and_odd_are_cos():
    encoding = SinusoidalPositionalEncoding()(np.zeros((1, 3, 6), "float32"))
    np.testing.assert_allclose(encoding[0, 0], [0, 1, 0, 1, 0, 1], atol=1e-7)  # position 0
    np.testing.assert_allclose(encoding[0, 1, :2], [np.sin(1.0), np.cos(1.0)], atol=1e-7)


def test_decoding_step_gets_exactly_the_row_of_the_full_table():
    layer = SinusoidalPositionalEncoding()
    full = layer(np.zeros((1, 40, 16), "float32"))
    for position in [0, 1, 17, 39]:
        step = layer(np.zeros((1, 1, 16), "float32"), start_index=position)
        np.testing.assert_array_equal(step[0, 0], full[0, position])


def test_per_row_start_index():
    layer = SinusoidalPositionalEncoding()
    encoding = layer(np.zeros((2, 4, 8), "float32"), start_index=np.array([0, 3], "int32"))
    full = layer(np.zeros((1, 8, 8), "float32"))
    np.testing.assert_array_equal(encoding[0], full[0, 0:4])
    np.testing.assert_array_equal(encoding[1], full[0, 3:7])


def test_has_no_weights_and_follows_dtype_policy():
    layer = SinusoidalPositionalEncoding(dtype="mixed_bfloat16")
    encoding = layer(np.zeros((1, 4, 8), "float32"))
    assert layer.weights == []
    assert keras.backend.standardize_dtype(encoding.dtype) == "bfloat16"


def test_config_and_keras_round_trip(tmp_path):
    layer = SinusoidalPositionalEncoding(max_wavelength=500)
    assert_config_round_trip(layer)
    restored = assert_keras_round_trip(layer, np.zeros((2, 5, 8), "float32"), tmp_path)
    assert restored.layers[-1].max_wavelength == 500


@pytest.mark.parametrize("bad", [0, 1, -3, "10000"])
def test_rejects_bad_max_wavelength(bad):
    with pytest.raises(ValueError, match="max_wavelength.*Received: max_wavelength="):
        SinusoidalPositionalEncoding(max_wavelength=bad)
