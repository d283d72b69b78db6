"""The projection layer of `GPT`'s blocks: `keras.layers.Dense` with XLA's single-row fusion
avoided."""

import math

import keras
from keras import ops

from gpt_keras import backends


class Dense(keras.layers.Dense):
    """`keras.layers.Dense` (same weights, config and quantization), except that the bias is
    added to the product, and the activation applied to that sum, rounded once in every engine
    (a plain graph's fused oneDNN kernel, `MatMul` + `BiasAdd` + GELU; under XLA, and in a plain
    graph of a build without that kernel (`backends.needs_float32_products`), a float32
    product, then one cast), and that under XLA a product with one input row (decoding one
    token at batch 1) keeps its bias add apart.

    XLA's CPU compiler fuses a matrix-vector product with the add that follows it into one
    kernel that it emits itself and runs on one thread; unfused, the product is a call into
    Eigen, which splits it over the cores. For GPT-2 small's projections that is ~17 against
    ~33 GB/s of float32 weights on 2 cores (`benchmarks/decode_profile.py --part kernels`). An
    optimization barrier between the product and the add keeps them apart; it is traced only
    where it helps (TensorFlow, XLA, one row known at trace time), so plain graphs, TFLite,
    training and the other backends see `keras.layers.Dense` unchanged.

    Inputs `[..., in]` → outputs `[..., units]`.
    """

    def call(self, inputs, training=None):
        xla = backends.in_xla_compilation()
        if (xla and self.bias is not None) or backends.needs_float32_products(self.compute_dtype):
            # `product + bias` rounded once, as the plain graph's fused kernel does, so that
            # every engine decodes the same bfloat16 tokens.
            x = backends.matmul(inputs, self.kernel, float32_product=True)
            if xla and _single_row(inputs):
                x = _optimization_barrier(x)
            if self.bias is not None:
                x = ops.add(x, ops.cast(self.bias, x.dtype))
            if self.activation is not None:  # on the float32 sum, as the fused kernel does
                x = self.activation(x)
            return ops.cast(x, self.compute_dtype)
        return backends.matmul(inputs, self.kernel, bias=self.bias, activation=self.activation)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses to quantize subclasses, whose `call` might differ from the quantized one
        # it substitutes; this `call` is `Dense.call`'s computation.
        super().quantize(mode, type_check=False, config=config)


def _optimization_barrier(x):
    """`x`, computed apart from its consumers under XLA (gradient: the identity)."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    @tf.custom_gradient
    def barrier(x):
        return xla.optimization_barrier(x)[0], lambda upstream: upstream

    return barrier(x)


def _single_row(inputs):
    """True when the static shape says `inputs` `[..., in]` holds exactly one row."""
    leading = inputs.shape[:-1]
    return None not in leading and math.prod(leading) == 1
