"""Checks every gpt_keras layer must pass: config round trip and `.keras` save/load."""

import os

import keras
import numpy as np


def assert_config_round_trip(layer):
    """`from_config(get_config())` rebuilds a layer with the same config."""
    config = layer.get_config()
    rebuilt = type(layer).from_config(config)
    assert rebuilt.get_config() == config


def assert_keras_round_trip(layer, inputs, tmp_path, input_dtype="float32"):
    """A functional model around `layer` gives identical outputs after `.keras` save and load."""
    model_input = keras.Input(shape=inputs.shape[1:], dtype=input_dtype)
    model = keras.Model(model_input, layer(model_input))
    expected = model(inputs)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(inputs)),
                                  keras.ops.convert_to_numpy(expected))
    return restored
