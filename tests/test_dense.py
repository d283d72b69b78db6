"""gpt_keras' `Dense` and the tied output projection under XLA: a decoding step's matrix-vector
products stay library calls (Eigen, both cores) instead of kernels fused with their neighbours
(one thread, BENCHMARKS.md "Generation")."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from gpt_keras import GPT, backends
from gpt_keras.layers._dense import Dense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fused_dots(hlo):
    """Names of the `dot` instructions that XLA placed inside fused computations."""
    names, computation = [], ""
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # `%name (params) -> shape {` or `ENTRY ...`
            computation = line.split()[0]
        match = re.match(r"\s*(?:ROOT )?(%\S+) = \S+ dot\(", line)
        if match and computation.startswith("%fused"):
            names.append(match.group(1))
    return names


def optimized_hlo(function, *args):
    return tf.function(function, jit_compile=True).experimental_get_compiler_ir(*args)(
        stage="optimized_hlo")


def dense_pair(**kwargs):
    """Keras' `Dense` and gpt_keras' with the same weights."""
    keras.utils.set_random_seed(0)
    theirs, ours = keras.layers.Dense(24, **kwargs), Dense(24, **kwargs)
    for layer in (theirs, ours):
        layer.build((None, None, 16))
    ours.set_weights([np.random.default_rng(1).normal(size=w.shape).astype("float32")
                      for w in theirs.get_weights()])
    theirs.set_weights(ours.get_weights())
    return theirs, ours


def test_one_row_keeps_the_bias_add_out_of_the_matrix_vector_product():
    theirs, ours = dense_pair()
    row = tf.constant(np.random.default_rng(2).normal(size=(1, 1, 16)), tf.float32)
    # Keras' Dense: XLA fuses product and add (what this layer avoids).
    assert fused_dots(optimized_hlo(theirs, row))
    assert not fused_dots(optimized_hlo(ours, row))
    x, kernel, bias = row.numpy().reshape(1, 16), ours.kernel.numpy(), ours.bias.numpy()
    expected = x @ kernel + bias
    # A float32 sum of 17 terms: rounding within 17 eps of the sum of their magnitudes.
    tolerance = 17 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(kernel) + np.abs(bias)).max()
    for jit_compile in (True, False):
        out = tf.function(ours, jit_compile=jit_compile)(row).numpy().reshape(1, 24)
        np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance)


def test_one_row_gradients_under_xla_equal_keras_dense():
    theirs, ours = dense_pair()
    row = tf.constant(np.random.default_rng(3).normal(size=(1, 1, 16)), tf.float32)

    def gradients(layer):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.sin(layer(x)))
            return tape.gradient(loss, [x] + layer.trainable_variables)
        return [g.numpy() for g in tf.function(step, jit_compile=True)(row)]

    for mine, reference in zip(gradients(ours), gradients(theirs)):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8"])
def test_quantizes_like_keras_dense(mode):
    theirs, ours = dense_pair()
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    for layer in (theirs, ours):
        layer.quantize(mode, config=config)
    rows = np.random.default_rng(4).normal(size=(2, 3, 16)).astype("float32")
    assert ours.kernel.dtype == "int8"
    np.testing.assert_array_equal(np.asarray(ours(rows)), np.asarray(theirs(rows)))


def test_xla_decoding_step_has_no_fused_matrix_products():
    """The step of a tied-embedding GPT at batch 1: projections and the output projection (which
    reads the embedding as stored, without a transposed copy) are all unfused products."""
    keras.utils.set_random_seed(0)
    model = GPT.from_preset("tiny")
    model.build()
    caches = model.init_layer_caches(1, 16)

    def step(token, caches):
        return model.call_with_layer_caches(token, caches, 3)[0]

    hlo = optimized_hlo(step, tf.constant([[5]], tf.int32), caches)
    assert re.search(r" dot\(", hlo)  # the products are there...
    assert not fused_dots(hlo)  # ...and none is fused


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (2, 1, 3, 16)])
@pytest.mark.parametrize("unknown", [0, 1, 2], ids=["static", "one unknown", "two unknown"])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_matches_numpy_with_one_2d_product(shape, unknown, transpose_b, with_bias):
    """`backends.matmul`: `[..., 16]` times `[16, 24]` (or `[24, 16]` transposed), plus a bias
    `[24]` → `[..., 24]`, one `MatMul` (and `BiasAdd`) and no `tensordot` shape arithmetic
    (`GatherV2`, `Prod`), whatever is unknown."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=(24, 16) if transpose_b else (16, 24)).astype("float32")
    bias = rng.normal(size=24).astype("float32") if with_bias else None
    known = [None if i < min(unknown, len(shape) - 1) else size for i, size in enumerate(shape)]
    function = tf.function(
        lambda x: backends.matmul(x, tf.constant(y), transpose_b=transpose_b,
                                  bias=None if bias is None else tf.constant(bias)),
        input_signature=[tf.TensorSpec(known, tf.float32)])
    expected = x @ (y.T if transpose_b else y) + (0 if bias is None else bias)
    # float32 sums of 16 products (and the bias): rounding within 17 eps of the sum of their
    # magnitudes.
    tolerance = 17 * np.finfo(np.float32).eps * (
        np.abs(x) @ np.abs(y.T if transpose_b else y) + (0 if bias is None else np.abs(bias)))
    out = function(x).numpy()
    assert out.shape == expected.shape
    np.testing.assert_array_less(np.abs(out - expected), tolerance + 1e-30)
    ops = [op.type for op in function.get_concrete_function().graph.get_operations()]
    assert ops.count("BiasAdd") == with_bias
    assert ops.count("MatMul") == 1 and not {"GatherV2", "Prod", "Transpose"} & set(ops)


def rounded_sums(rows, dtype="bfloat16"):
    """`Dense(1)` of the constructed sum below in a plain graph and under XLA → float32 arrays.
    1 + (2^-8 + 2^-10) (the product, exact in float32) plus the bias 2^-8: rounded once to
    bfloat16 (8 significant bits) it is 1 + 2^-7; rounding the product first gives 1 + 2^-7,
    and the sum 1 + 2^-7 + 2^-8 is a tie that rounds to even, 1 + 2^-6."""
    layer = Dense(1, dtype=dtype)
    layer.build((None, None, 2))
    layer.kernel.assign([[1.0], [2.0**-8 + 2.0**-10]])
    layer.bias.assign([2.0**-8])
    x = tf.ones([rows, 1, 2], dtype)
    outputs = [tf.function(layer, jit_compile=jit_compile)(x) for jit_compile in (False, True)]
    assert all(out.dtype == dtype for out in outputs)
    return [tf.cast(out, tf.float32).numpy() for out in outputs]


@pytest.mark.parametrize("rows", [1, 3])
def test_bfloat16_product_plus_bias_is_rounded_once_in_every_engine(rows):
    """The plain graph's fused oneDNN kernel rounds once, so XLA must too, or the engines decode
    different tokens."""
    for out in rounded_sums(rows):
        np.testing.assert_array_equal(out, 1 + 2.0**-7)


def test_a_build_without_the_fused_kernel_rounds_once_too():
    """With oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`, as on x86 CPUs without AVX-512 VNNI/BF16 or
    AMX), a plain graph rounds `MatMul` and `BiasAdd` apart; `Dense` notices and adds the bias
    to a float32 product, so every engine still rounds once."""
    script = ("from tests.test_dense import rounded_sums; from gpt_keras import backends; "
              "print(backends.fused_bias_add_rounds_once('bfloat16'), "
              "*[float(out.max()) for out in rounded_sums(3)])")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout.split()
    assert out == ["False", str(1 + 2.0**-7), str(1 + 2.0**-7)]


def test_bfloat16_gradients_under_xla_are_the_16_bit_products():
    """The float32 product XLA computes for `Dense` has the gradients of the bfloat16 product
    (the upstream gradient rounded to bfloat16), not TensorFlow's mixed-dtype ones."""
    rng = np.random.default_rng(3)
    for transpose_b in (False, True):
        x = tf.constant(rng.normal(size=(5, 16)), tf.bfloat16)
        y = tf.constant(rng.normal(size=(24, 16) if transpose_b else (16, 24)), tf.bfloat16)
        weights = tf.constant(rng.normal(size=(5, 24)), tf.float32)

        @tf.function(jit_compile=True)
        def gradients(x, y):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch([x, y])
                product = backends.matmul(x, y, transpose_b=transpose_b, float32_product=True)
                reference = tf.cast(tf.matmul(x, y, transpose_b=transpose_b), tf.float32)
                loss, reference_loss = (tf.reduce_sum(p * weights) for p in (product, reference))
            return tape.gradient(loss, [x, y]), tape.gradient(reference_loss, [x, y])

        for got, expected in zip(*gradients(x, y)):
            assert got.dtype == tf.bfloat16
            np.testing.assert_array_equal(got.numpy(), expected.numpy())
