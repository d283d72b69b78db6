"""Learned absolute positional embedding (GPT-2's `wpe`)."""

import keras
from keras import ops

from gpt_keras.layers._initializers import fresh
from gpt_keras.layers._positions import positions_for


@keras.saving.register_keras_serializable(package="gpt_keras")
class LearnedPositionalEmbedding(keras.layers.Layer):
    """A trainable `[sequence_length, D]` table of position vectors, as in GPT-2.

    Shapes: `inputs` `[B, T, D]` (only its shape is read); `start_index` a scalar or `[B]` int;
    returns rows `start_index .. start_index + T - 1` of the table broadcast to `[B, T, D]`.
    Positions must lie in `[0, sequence_length)`: the model checks this before calling.

    Args:
        sequence_length: number of positions (the model's context length).
        initializer: initializer of the table (GPT-2: normal with stddev 0.02 or 0.01).
    """

    def __init__(self, sequence_length, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(sequence_length, int) or sequence_length < 1:
            raise ValueError(
                "`sequence_length` must be a positive integer. "
                f"Received: sequence_length={sequence_length!r}"
            )
        self.sequence_length = sequence_length
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.position_embeddings = self.add_weight(
            name="embeddings",
            shape=(self.sequence_length, input_shape[-1]),
            initializer=fresh(self.initializer),
        )
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        positions = positions_for(start_index, shape[1])  # [T] or [B, T]
        table = ops.cast(self.position_embeddings, self.compute_dtype)
        return ops.broadcast_to(ops.take(table, positions, axis=0), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "initializer": keras.initializers.serialize(self.initializer),
            }
        )
        return config
