"""The Transformer paper's fixed sinusoidal positional encoding."""

import math

import keras
from keras import ops

from gpt_keras.layers._positions import check_max_wavelength, positions_for


@keras.saving.register_keras_serializable(package="gpt_keras")
class SinusoidalPositionalEncoding(keras.layers.Layer):
    """Fixed sinusoidal positional encoding (Vaswani et al., 2017, section 3.5).

    For position `p` and feature `j` of `D`, with `w = max_wavelength`:
    `PE[p, j] = sin(p / w**(2*(j//2)/D))` for even `j` and `cos(...)` of the same angle for odd `j`
    (the paper's interleaved form). There are no weights, so any position can be encoded.

    Shapes: `inputs` `[B, T, D]` (only its shape is read); `start_index` a scalar or `[B]` int;
    returns the encoding of positions `start_index .. start_index + T - 1` broadcast to `[B, T, D]`
    in the layer's compute dtype. A decoding step at position `p` (`T = 1`, `start_index = p`) gets
    exactly row `p` of the full table: every element is computed from its own position alone.

    Args:
        max_wavelength: the base `w` of the geometric progression of wavelengths (10000 in the paper).
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = check_max_wavelength(max_wavelength)
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        dim = inputs.shape[-1]
        positions = ops.cast(positions_for(start_index, shape[1]), "float32")  # [T] or [B, T]
        features = ops.arange(dim, dtype="int32")  # [D]
        exponents = ops.cast(2 * (features // 2), "float32") / float(dim)
        inverse_frequencies = ops.exp(-exponents * math.log(self.max_wavelength))  # [D]
        angles = ops.expand_dims(positions, -1) * inverse_frequencies  # [..., T, D]
        is_even = ops.equal(features % 2, 0)
        encoding = ops.where(is_even, ops.sin(angles), ops.cos(angles))
        return ops.broadcast_to(ops.cast(encoding, self.compute_dtype), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"max_wavelength": self.max_wavelength})
        return config
