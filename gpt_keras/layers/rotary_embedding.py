"""Rotary position embedding (RoPE) of queries and keys."""

import math

import keras
from keras import ops

from gpt_keras.layers._positions import check_max_wavelength, positions_for


@keras.saving.register_keras_serializable(package="gpt_keras")
class RotaryEmbedding(keras.layers.Layer):
    """Rotary position embedding (Su et al., 2021, "RoFormer"), GPT-NeoX/LLaMA's half-split form.

    Each head vector is rotated by its position: with `K` features, `h = K / 2`, the pair
    `(x[i], x[i + h])` of a token at position `p` is rotated by the angle `p * w**(-2i / K)`
    (`w = max_wavelength`). A query at `p` dotted with a key at `s` then depends on the offset
    `p - s` only, so attention sees relative positions; nothing is added to the residual stream.
    Identical to `keras_hub.layers.RotaryEmbedding` with its defaults.

    Shapes: `inputs` `[B, T, ..., K]` (K even; e.g. `[B, T, H, K]`, or `[B, T, 2, H, K]` for
    queries and keys rotated together); `start_index` a scalar or `[B]` int, the position of the
    first of the T tokens; returns the inputs' shape and dtype. The angles are
    computed in float32. A decoding step at position `p` (`T = 1`, `start_index = p`) gets exactly
    the rotation of row `p` of a full pass.

    Args:
        max_wavelength: the base `w` of the geometric progression of wavelengths (10000, as in
            RoFormer, GPT-NeoX and LLaMA).
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = check_max_wavelength(max_wavelength)
        self.built = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        dim = inputs.shape[-1]
        if dim is None or dim % 2:
            raise ValueError(
                "The last dimension of the inputs (the head size) must be even for rotary "
                f"embeddings. Received: inputs.shape={inputs.shape}"
            )
        half = dim // 2
        positions = ops.cast(positions_for(start_index, shape[1]), "float32")  # [T] or [B, T]
        exponents = ops.cast(ops.arange(half, dtype="int32"), "float32") * (2.0 / dim)
        inverse_frequencies = ops.exp(-exponents * math.log(self.max_wavelength))  # [K/2]
        angles = ops.expand_dims(positions, -1) * inverse_frequencies  # [..., T, K/2]
        # [1 or B, T, 1, ..., K/2]: broadcast over the batch (scalar start) and the axes between
        # T and K. reshape, not `[None]` indexing: a new-axis StridedSlice is not a TFLite builtin.
        angles = ops.reshape(angles, (-1, shape[1]) + (1,) * (len(shape) - 3) + (half,))
        cos = ops.cos(angles)
        sin = ops.sin(angles)
        x = ops.cast(inputs, "float32")
        x1, x2 = ops.split(x, 2, axis=-1)  # 2 × [B, T, H, K/2]
        # [x1 cos - x2 sin, x2 cos + x1 sin] (bit for bit) as x · [cos, cos] + [x2, x1] · [-sin,
        # sin]: 5 ops per call where the tables, the same for every layer, are computed once.
        rotated = (x * ops.concatenate([cos, cos], axis=-1)
                   + ops.concatenate([x2, x1], axis=-1) * ops.concatenate([-sin, sin], axis=-1))
        return ops.cast(rotated, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"max_wavelength": self.max_wavelength})
        return config
