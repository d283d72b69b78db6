import keras
import numpy as np
import pytest
import tensorflow as tf

from gpt_keras.layers import MultiHeadAttention
from gpt_keras.layers.multi_head_attention import in_place_cache_writes, write_cache
from tests import numpy_reference as ref
from tests.layer_checks import assert_config_round_trip, assert_keras_round_trip

B, T, D, H = 2, 7, 12, 3
INIT = keras.initializers.RandomNormal(stddev=0.3)


def make_layer(**kwargs):
    layer = MultiHeadAttention(H, kernel_initializer=INIT, bias_initializer=INIT, **kwargs)
    layer.build((None, None, D))
    return layer


def numpy_attention(layer, x, padding_mask=None):
    w = lambda v: np.asarray(v.numpy(), np.float64)  # noqa: E731
    return ref.attention(
        x.astype(np.float64),
        w(layer.query_key_value.kernel), w(layer.query_key_value.bias),
        w(layer.output_dense.kernel), w(layer.output_dense.bias),
        layer.num_heads, padding_mask, layer.rotary_max_wavelength,
    )


@pytest.mark.parametrize("rotary_max_wavelength", [None, 10000, 50])
def test_matches_numpy_reference(rotary_max_wavelength):
    layer = MultiHeadAttention(4, kernel_initializer=INIT, bias_initializer=INIT,
                               rotary_max_wavelength=rotary_max_wavelength)
    layer.build((None, None, 16))  # rotary needs an even head size
    x = np.random.default_rng(0).normal(size=(B, T, 16)).astype("float32")
    np.testing.assert_allclose(layer(x), numpy_attention(layer, x), atol=1e-5)


def test_attention_scores_with_and_without_a_cache():
    """Scores are the probabilities before dropout, as Keras' MultiHeadAttention returns them;
    a cached call returns them over the cache's S slots."""
    layer = make_layer(dropout=0.5)
    x = np.random.default_rng(8).normal(size=(B, T, D)).astype("float32")
    expected = []
    ref_out = ref.attention(x.astype(np.float64), *(np.asarray(w.numpy(), np.float64) for w in (
        layer.query_key_value.kernel, layer.query_key_value.bias,
        layer.output_dense.kernel, layer.output_dense.bias)), H, scores_out=expected)
    out, scores = layer(x, training=True, return_attention_scores=True)
    np.testing.assert_allclose(scores, expected[0], atol=1e-6)
    out, scores = layer(x, return_attention_scores=True)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    cache = np.zeros((2, B, H, T + 3, D // H), "float32")
    out, cache, cached_scores = layer(x, cache=cache, cache_index=0, return_attention_scores=True)
    assert cached_scores.shape == (B, H, T, T + 3)
    np.testing.assert_allclose(cached_scores[..., :T], expected[0], atol=1e-6)
    np.testing.assert_array_equal(cached_scores[..., T:], 0)


def test_padding_mask_matches_numpy_reference_and_hides_keys():
    layer = make_layer()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, T, D)).astype("float32")
    mask = np.ones((B, T), "int32")
    mask[0, :2] = 0  # left padding
    mask[1, 3] = 0  # a hole
    out = np.asarray(layer(x, padding_mask=mask))
    np.testing.assert_allclose(out, numpy_attention(layer, x, mask), atol=1e-5)
    # Changing the hidden key's input changes nothing at the other positions.
    x2 = x.copy()
    x2[1, 3] += 5.0
    out2 = np.asarray(layer(x2, padding_mask=mask))
    keep = np.arange(T) != 3
    np.testing.assert_allclose(out2[1, keep], out[1, keep], atol=1e-6)
    assert np.isfinite(out).all()  # fully masked rows (left padding) give no NaN


def test_is_causal():
    layer = make_layer()
    x = np.random.default_rng(2).normal(size=(1, T, D)).astype("float32")
    out = layer(x)
    for t in range(T - 1):
        changed = x.copy()
        changed[:, t + 1 :] = 0.0
        np.testing.assert_allclose(layer(changed)[:, : t + 1], out[:, : t + 1], atol=1e-6)
        assert not np.allclose(layer(changed)[:, t + 1 :], out[:, t + 1 :])


def test_cached_steps_equal_full_pass_and_fill_the_cache():
    layer = make_layer()
    x = np.random.default_rng(3).normal(size=(B, T, D)).astype("float32")
    full = layer(x)
    cache_length = 10
    cache = np.zeros((2, B, H, cache_length, D // H), "float32")
    prefill, cache = layer(x[:, :3], cache=cache, cache_index=0)  # a 3-token chunk
    outputs = [prefill]
    for t in range(3, T):
        step, cache = layer(x[:, t : t + 1], cache=cache, cache_index=t)
        outputs.append(step)
    np.testing.assert_allclose(np.concatenate(outputs, 1), full, atol=1e-5)
    # The cache holds every position's key/value, and zeros beyond the last written one.
    _, full_cache = layer(x, cache=np.zeros_like(cache), cache_index=0)
    np.testing.assert_allclose(cache, full_cache, atol=1e-6)
    assert not np.any(np.asarray(cache)[:, :, :, T:])
    projected = np.split(layer.query_key_value(x), 3, axis=-1)
    keys = np.reshape(projected[1], (B, T, H, D // H)).transpose(0, 2, 1, 3)  # [B, H, T, K]
    np.testing.assert_allclose(cache[0, :, :, :T], keys, atol=1e-6)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("hidden_dim", [12, 768])  # single queries elementwise up to 512
def test_single_query_steps_match_numpy_with_padding_and_scores(policy, hidden_dim):
    """Decoding steps (one query per row) under every policy, with a padding hole and the
    scores: the full pass's rows, from the NumPy reference."""
    layer = MultiHeadAttention(3 if hidden_dim == 12 else 12, kernel_initializer=INIT,
                               bias_initializer=INIT, dtype=policy)
    layer.build((None, None, hidden_dim))
    x = np.random.default_rng(11).normal(size=(B, 5, hidden_dim)).astype("float32") / 4
    padding = np.ones((B, 5), "int32")
    padding[1, 1] = 0
    scores = []
    expected = ref.attention(x.astype(np.float64), *(np.asarray(w.numpy(), np.float64) for w in (
        layer.query_key_value.kernel, layer.query_key_value.bias, layer.output_dense.kernel,
        layer.output_dense.bias)), layer.num_heads, padding, scores_out=scores)
    cache = np.zeros((2, B, layer.num_heads, 5, layer.head_dim), "float32")
    for t in range(5):
        out, cache, step_scores = layer(x[:, t : t + 1], cache=cache, cache_index=t,
                                        padding_mask=padding, return_attention_scores=True)
        # float32: a dot product of D terms rounds by up to ~D·eps of its magnitude.
        tolerance = np.abs(expected).max() * (
            4 * hidden_dim * np.finfo(np.float32).eps if policy == "float32" else 0.05)
        np.testing.assert_allclose(np.asarray(out, "float32")[:, 0], expected[:, t],
                                   atol=tolerance)
        np.testing.assert_allclose(step_scores[:, :, 0, : t + 1], scores[0][:, :, t, : t + 1],
                                   atol=4 * hidden_dim * np.finfo(np.float32).eps
                                   if policy == "float32" else 0.02)
        np.testing.assert_array_equal(step_scores[:, :, 0, t + 1 :], 0)


def test_rotary_cached_steps_equal_full_pass_and_cache_rotated_keys():
    layer = MultiHeadAttention(2, kernel_initializer=INIT, bias_initializer=INIT,
                               rotary_max_wavelength=10000)
    layer.build((None, None, 8))
    x = np.random.default_rng(7).normal(size=(B, T, 8)).astype("float32")
    full = layer(x)
    cache = np.zeros((2, B, 2, 9, 4), "float32")  # [2, B, H, S, K]
    prefill, cache = layer(x[:, :2], cache=cache, cache_index=0)
    outputs = [prefill]
    for t in range(2, T):
        step, cache = layer(x[:, t : t + 1], cache=cache, cache_index=t)
        outputs.append(step)
    np.testing.assert_allclose(np.concatenate(outputs, 1), full, atol=1e-5)
    keys = np.reshape(np.split(layer.query_key_value(x), 3, axis=-1)[1], (B, T, 2, 4))
    rotated = ref.rotary(keys, range(T)).transpose(0, 2, 1, 3)  # [B, H, T, K]
    np.testing.assert_allclose(cache[0, :, :, :T], rotated, atol=1e-5)


def test_rejects_rotary_with_an_odd_head_size():
    with pytest.raises(ValueError, match="even head size.*hidden size=6, num_heads=2"):
        MultiHeadAttention(2, rotary_max_wavelength=10000).build((None, None, 6))


WRITES = {  # how `write_cache` is traced: (jit_compile, in place)
    "gather+where": (False, False), "InplaceUpdate": (False, True), "XLA": (True, False),
}


def traced_write(kind):
    jit_compile, in_place = WRITES[kind]

    def write(cache, update, index):
        with in_place_cache_writes(in_place):
            return write_cache(cache, update, index)

    return tf.function(write, jit_compile=jit_compile, autograph=False)


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_write_cache_writes_only_the_target_slots(kind):
    cache = np.full((2, 6, 1), -1.0, "float32")
    update = np.array([[10.0, 20.0], [30.0, 40.0]], "float32").reshape(2, 2, 1)
    written = np.asarray(traced_write(kind)(tf.constant(cache), update, tf.constant(3)))
    np.testing.assert_array_equal(written[..., 0], [[-1, -1, -1, 10, 20, -1],
                                                    [-1, -1, -1, 30, 40, -1]])


@pytest.mark.parametrize("kind", sorted(WRITES))
@pytest.mark.parametrize("index", [-1, 5])
def test_a_write_that_does_not_fit_is_refused(kind, index):
    """Slots index, index + 1 of a 6-slot cache: never clamped into other slots. Plain graphs
    raise; XLA, which cannot raise at run time, returns NaN where the write went."""
    cache = tf.zeros((1, 6, 1))
    update = tf.ones((1, 2, 1))
    write = traced_write(kind)
    if kind == "XLA":
        written = np.asarray(write(cache, update, tf.constant(index)))
        assert np.isnan(written).any() and not (written == 1).any()
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="cache write does not fit"):
            write(cache, update, tf.constant(index))


def test_in_place_writes_leave_eager_callers_alone():
    """`in_place_cache_writes` only applies to graphs: an eager cache is never changed."""
    cache = tf.zeros((1, 4, 1))
    with in_place_cache_writes():
        written = write_cache(cache, tf.ones((1, 1, 1)), 2)
    assert np.asarray(cache).sum() == 0 and np.asarray(written).sum() == 1


def test_cache_write_is_in_place_under_xla_only():
    layer = make_layer()

    def op_types(jit_compile):
        fn = tf.function(lambda x, c, i: layer(x, cache=c, cache_index=i),
                         jit_compile=jit_compile)
        graph = fn.get_concrete_function(
            tf.TensorSpec((1, 1, D)), tf.TensorSpec((2, 1, H, 8, D // H)),
            tf.TensorSpec((), tf.int32),
        ).graph
        return {op.type for op in graph.get_operations()}

    assert "XlaDynamicUpdateSlice" in op_types(jit_compile=True)
    assert "XlaDynamicUpdateSlice" not in op_types(jit_compile=False)


def test_cache_write_has_no_xla_ops():
    """TF Serving runs with XLA disabled: the cached step must not lower to `Xla*` ops."""
    layer = make_layer()
    fn = tf.function(lambda x, c, i: layer(x, cache=c, cache_index=i))
    graph = fn.get_concrete_function(
        tf.TensorSpec((None, 1, D)), tf.TensorSpec((2, None, H, 8, D // H)),
        tf.TensorSpec((), tf.int32),
    ).graph
    op_types = {op.type for op in graph.get_operations()}
    assert not [t for t in op_types if t.startswith("Xla")], op_types


def test_cached_step_splits_keys_and_values_along_the_first_axis():
    """The per-step graph TF Serving runs reads the cache without copying it: keys and values are
    split along the first axis of `[2, B, H, S, K]`, where TensorFlow's `Unpack` shares the
    buffer (along any other axis it copies the whole cache, every layer, every step)."""
    layer = make_layer()

    def step(x, cache, index):
        with in_place_cache_writes():
            return layer(x, cache=cache, cache_index=index)

    graph = tf.function(step).get_concrete_function(
        tf.TensorSpec((None, 1, D)), tf.TensorSpec((2, None, H, 8, D // H)),
        tf.TensorSpec((), tf.int32),
    ).graph
    unpacks = [op for op in graph.get_operations() if op.type == "Unpack"]
    assert unpacks and all(op.get_attr("axis") == 0 for op in unpacks)
    assert [op.inputs[0].shape.as_list() for op in unpacks] == [[2, None, H, 8, D // H]]
    assert "InplaceUpdate" in {op.type for op in graph.get_operations()}


def test_attention_dropout_only_in_training():
    layer = make_layer(dropout=0.5)
    x = np.random.default_rng(4).normal(size=(B, T, D)).astype("float32")
    np.testing.assert_allclose(layer(x, training=False), numpy_attention(layer, x), atol=1e-5)
    assert not np.allclose(layer(x, training=True), layer(x, training=False))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    layer = MultiHeadAttention(H, dtype=policy)
    layer.build((None, None, D))
    x = np.random.default_rng(5).normal(size=(B, T, D)).astype("float32")
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    assert all(w.dtype == "float32" for w in layer.weights)
    np.testing.assert_allclose(np.asarray(out, "float32"), numpy_attention(layer, x), atol=0.05)


def test_mixed_float16_attention_logits_do_not_overflow():
    """Q·Kᵀ beyond float16's largest value (65504) stays finite: the product is taken in float32."""
    layer = MultiHeadAttention(H, dtype="mixed_float16",
                               kernel_initializer=keras.initializers.RandomNormal(stddev=100.0, seed=1),
                               output_kernel_initializer=keras.initializers.RandomNormal(
                                   stddev=0.01, seed=2))
    layer.build((None, None, D))
    x = np.random.default_rng(7).normal(size=(B, T, D)).astype("float32")
    expected = numpy_attention(layer, x)
    query, key = (q.reshape(B, T, H, D // H) for q in
                  np.split(x @ layer.query_key_value.kernel.numpy(), 3, axis=-1)[:2])
    assert np.abs(np.einsum("bthk,bshk->bhts", query, key)).max() > 65504  # overflows float16
    out = np.asarray(layer(x), "float32")
    assert np.isfinite(out).all()
    # float16 rounding of Q, K, V and the output projection: a few units in its last place (2^-11)
    # relative to the output's scale.
    np.testing.assert_allclose(out, expected, atol=16 * 2.0**-11 * np.abs(expected).max())


@pytest.mark.parametrize("rotary_max_wavelength", [None, 500])
def test_config_and_keras_round_trip(tmp_path, rotary_max_wavelength):
    layer = MultiHeadAttention(4, dropout=0.1, output_kernel_initializer="zeros",
                               rotary_max_wavelength=rotary_max_wavelength)
    assert_config_round_trip(layer)
    x = np.random.default_rng(6).normal(size=(2, 5, 16)).astype("float32")
    restored = assert_keras_round_trip(layer, x, tmp_path)
    assert restored.layers[-1].get_config() == layer.get_config()


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_rejects_bad_num_heads(bad):
    with pytest.raises(ValueError, match="num_heads.*Received: num_heads="):
        MultiHeadAttention(bad)


def test_rejects_hidden_size_not_divisible_by_heads():
    with pytest.raises(ValueError, match="hidden size=10, num_heads=4"):
        MultiHeadAttention(4).build((None, None, 10))


def test_rejects_bad_dropout():
    with pytest.raises(ValueError, match="dropout.*Received: dropout=1.0"):
        MultiHeadAttention(2, dropout=1.0)


def test_rejects_padding_mask_with_attention_mask():
    layer = make_layer()
    x = np.zeros((1, 2, D), "float32")
    with pytest.raises(ValueError, match="`padding_mask` or `attention_mask`.*not both"):
        layer(x, padding_mask=np.ones((1, 2)), attention_mask=np.ones((1, 1, 2, 2), bool))


def test_cache_requires_cache_index():
    layer = make_layer()
    with pytest.raises(ValueError, match="cache_index"):
        layer(np.zeros((1, 1, D), "float32"), cache=np.zeros((2, 1, H, 4, D // H), "float32"))
