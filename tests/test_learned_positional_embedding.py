import keras
import numpy as np
import pytest

from gpt_keras.layers import LearnedPositionalEmbedding
from tests.layer_checks import assert_config_round_trip, assert_keras_round_trip


def test_returns_rows_of_the_table_from_the_start_index():
    layer = LearnedPositionalEmbedding(10)
    inputs = np.zeros((2, 3, 4), "float32")
    layer.build(inputs.shape)
    table = layer.position_embeddings.numpy()
    assert table.shape == (10, 4)
    np.testing.assert_array_equal(layer(inputs)[1], table[0:3])
    np.testing.assert_array_equal(layer(inputs, start_index=6)[0], table[6:9])
    per_row = layer(inputs, start_index=np.array([1, 7], "int32"))
    np.testing.assert_array_equal(per_row[0], table[1:4])
    np.testing.assert_array_equal(per_row[1], table[7:10])


def test_is_trainable_and_follows_dtype_policy():
    layer = LearnedPositionalEmbedding(8, dtype="mixed_float16")
    out = layer(np.zeros((1, 4, 6), "float32"))
    assert [w.path for w in layer.trainable_weights] == [layer.position_embeddings.path]
    assert layer.position_embeddings.dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == "float16"


def test_config_and_keras_round_trip(tmp_path):
    layer = LearnedPositionalEmbedding(12, initializer=keras.initializers.RandomNormal(stddev=0.5))
    assert_config_round_trip(layer)
    assert_keras_round_trip(layer, np.zeros((2, 5, 8), "float32"), tmp_path)


@pytest.mark.parametrize("bad", [0, -1, 2.5, None])
def test_rejects_bad_sequence_length(bad):
    with pytest.raises(ValueError, match="sequence_length.*Received: sequence_length="):
        LearnedPositionalEmbedding(bad)
