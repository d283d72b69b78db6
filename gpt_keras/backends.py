"""What differs between Keras backends, in one place.

`GPT`, its layers and `generation.generate_eager` run on every Keras 3 backend (TensorFlow, JAX,
PyTorch). The rest of gpt_keras (training runs, `tf.data` pipelines, the in-graph tokenizers,
the compiled decoding loop, SavedModel and TFLite export) is TensorFlow code and calls
`require_tensorflow` first. Backend-specific calls in the portable code go through the helpers
here.
"""

import functools
import numbers
import sys

import keras
import numpy as np


# What to do instead, on JAX or PyTorch, for each TensorFlow-only feature.
USE_FIT = ("Use `model.compile(...)` with `model.fit(...)`/`model.evaluate(...)` directly "
           "(README, 'Other backends').")
USE_GENERATE_EAGER = ("Use `gpt_keras.generation.generate_eager(model, prompt_ids, "
                      "max_new_tokens, temperature=..., top_k=...)` (greedy or top-k sampling "
                      "with the KV cache).")
EXPORT_ELSEWHERE = ("Save the model with `model.save('model.keras')` and export it from a "
                    "process with KERAS_BACKEND=tensorflow.")
TOKENIZE_ELSEWHERE = ("Tokenize in a process with KERAS_BACKEND=tensorflow (e.g. write the ids "
                      "to a file), or use any Python tokenizer and pass the model token ids.")


def is_tensorflow():
    """True when Keras runs on TensorFlow (`KERAS_BACKEND=tensorflow`, the default)."""
    return keras.backend.backend() == "tensorflow"


def in_xla_compilation():
    """True while TensorFlow traces a function that XLA will compile (inside
    `tf.function(jit_compile=True)`, its loops included); False on the other backends."""
    if not is_tensorflow():
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util  # TensorFlow's own test (tf.while_loop)

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


# 16-bit float dtype → its significand's fraction bits (the spacing of values in [1, 2) is 2^-bits).
_FRACTION_BITS = {"bfloat16": 7, "float16": 10}


def fused_bias_add_rounds_once(dtype):
    """Whether this TensorFlow build runs a plain graph's `MatMul` + `BiasAdd` of `dtype` as one
    kernel that rounds `product + bias` once: oneDNN's fusion, which TensorFlow turns on by
    default on Linux x86 CPUs with AVX-512 VNNI/BF16, AVX-VNNI or AMX; other CPUs, and
    `TF_ENABLE_ONEDNN_OPTS=0`, round the product and then the sum. Found once per dtype by
    running a sum that the two tell apart. True for other dtypes and on the other backends."""
    dtype = keras.backend.standardize_dtype(dtype)
    return dtype not in _FRACTION_BITS or not is_tensorflow() or _probe_bias_add_rounding(dtype)


@functools.cache
def _probe_bias_add_rounding(dtype):
    import tensorflow as tf

    spacing = 2.0 ** -_FRACTION_BITS[dtype]
    # 1 + (spacing/2 + spacing/8) + spacing/2 is 1 + spacing rounded once; rounding the product
    # first gives 1 + spacing, then a tie that rounds to even: 1 + 2 * spacing.
    with tf.init_scope():  # run now, also while a graph is being traced
        fused = tf.function(lambda x, y, b: tf.nn.bias_add(tf.matmul(x, y), b))
        total = fused(tf.ones([1, 2], dtype),
                      tf.constant([[1.0], [spacing / 2 + spacing / 8]], dtype),
                      tf.constant([spacing / 2], dtype))
        return float(total[0, 0]) == 1 + spacing


def needs_float32_products(dtype):
    """True while TensorFlow traces a plain graph (not XLA) whose `dtype` products this build
    would not round once (`fused_bias_add_rounds_once`: its own products round towards zero, and
    the bias is added after a rounding). Such products are taken in float32 and cast once, as
    XLA and oneDNN round them, so that every engine decodes the same tokens."""
    return not in_xla_compilation() and not fused_bias_add_rounds_once(dtype)


def matmul(x, y, transpose_b=False, bias=None, float32_product=False, activation=None):
    """`x` `[..., D]` times `y` `[D, N]` (`[N, D]` with `transpose_b`), plus `bias` `[N]` if
    given, through `activation` if given → `[..., N]`; with `float32_product` (TensorFlow only)
    the product stays float32 whatever the inputs' dtype (no bias or activation then).

    On TensorFlow one 2-D `MatMul` (and `BiasAdd`) between two reshapes, with the leading shape
    taken from the static shape where at most one dimension is unknown (a decoding step's
    `[B, 1, D]`, a training batch's `[B, T, D]`): 6 ops where `tf.tensordot` (`keras.ops.matmul`
    of a 3-D by a 2-D tensor) runs ~20 to reshape, which a plain graph executes one by one at
    every step (TF Serving's decoding loop). A plain graph runs `MatMul` + `BiasAdd` as one
    oneDNN kernel, which rounds `product + bias` once (bfloat16: twice the rate of the two ops
    at one row). With `transpose_b`, XLA reads `y` as stored (a separate transpose copies all
    of `y` at every call: 3.3 against 4.8 ms for GPT-2's embedding at one row), and TFLite gets
    a `FULLY_CONNECTED` with `y` as its weights. The activation is applied to the 2-D product,
    where a plain graph fuses it with `MatMul` + `BiasAdd` into one oneDNN kernel (GELU: one op
    instead of ten per decoding step and layer).
    """
    if not is_tensorflow():
        product = keras.ops.matmul(x, keras.ops.transpose(y) if transpose_b else y)
        product = product if bias is None else keras.ops.add(product, bias)
        return product if activation is None else activation(product)
    import tensorflow as tf

    def product(rows):
        if float32_product and rows.dtype != tf.float32:
            return _float32_matmul(rows, y, transpose_b)
        rows = tf.matmul(rows, y, transpose_b=transpose_b)
        rows = rows if bias is None else tf.nn.bias_add(rows, bias)
        return rows if activation is None else activation(rows)

    if x.shape.rank == 2:
        return product(x)
    units = y.shape[0 if transpose_b else 1]
    leading = x.shape[:-1].as_list()
    if leading.count(None) > 1:
        output_shape = tf.concat([tf.shape(x)[:-1], [units]], axis=0)
    else:
        output_shape = [-1 if size is None else size for size in leading] + [units]
    return tf.reshape(product(tf.reshape(x, [-1, x.shape[-1] or tf.shape(x)[-1]])), output_shape)


def _float32_matmul(x, y, transpose_b):
    """The float32 product of 2-D `x` and `y` of one 16-bit dtype; the gradients are those of the
    16-bit product (the upstream gradient rounded to that dtype), without the mixed-dtype
    products TensorFlow's own gradient would build."""
    import tensorflow as tf

    @tf.custom_gradient
    def product(x, y):
        def gradient(upstream):
            upstream = tf.cast(upstream, x.dtype)
            grad_x = tf.matmul(upstream, y, transpose_b=not transpose_b)
            grad_y = (tf.matmul(upstream, x, transpose_a=True) if transpose_b
                      else tf.matmul(x, upstream, transpose_a=True))
            return grad_x, grad_y

        if in_xla_compilation():
            return tf.raw_ops.BatchMatMulV3(x=x, y=y, Tout=tf.float32, adj_y=transpose_b), gradient
        # A plain graph has no CPU kernel for 16-bit inputs with a float32 output.
        return tf.matmul(tf.cast(x, tf.float32), tf.cast(y, tf.float32),
                         transpose_b=transpose_b), gradient

    return product(x, tf.convert_to_tensor(y))  # a variable is read here, outside the gradient


def require_tensorflow(feature, alternative):
    """Raises `RuntimeError` unless Keras runs on TensorFlow. `feature` names what needs it
    ("gpt_keras.training"), `alternative` says what to do on the other backends."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{feature} needs the TensorFlow backend (KERAS_BACKEND=tensorflow); Keras is "
            f"running on {backend}. {alternative}"
        )


def host_values(value):
    """`value` as a NumPy array when its contents can be read now without copying it off an
    accelerator, else None.

    Read: Python numbers and lists, NumPy arrays, eager TensorFlow tensors (TensorFlow's
    embedding lookup returns zeros for bad ids on GPU, so those are worth a copy), and eager
    JAX/PyTorch arrays on the CPU (a view, no copy). Not read: symbolic tensors and tracers
    (inside `fit`/`predict`, `jax.jit`, `torch.compile`), anything while a TensorFlow graph is
    traced (`tf.function`, whose shapes may be unknown), and JAX/PyTorch arrays on an
    accelerator, which reading would copy to the host at every call.
    """
    if isinstance(value, keras.KerasTensor):
        return None
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
        if isinstance(value, tf.Tensor):
            return value.numpy()
    if isinstance(value, (np.ndarray, np.generic, numbers.Number, list, tuple)):
        return np.asarray(value)
    # JAX and PyTorch are no dependencies of gpt_keras: a process whose Keras runs on one of
    # them has imported it, so it is taken from `sys.modules`.
    if backend == "jax":
        jax = sys.modules["jax"]
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
            if all(device.platform == "cpu" for device in value.devices()):
                return np.asarray(value)
    elif backend == "torch":
        torch = sys.modules["torch"]
        if (isinstance(value, torch.Tensor) and value.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            return value.detach().numpy()
    return None
