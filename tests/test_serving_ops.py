"""The server-like process of `gpt_keras.serving.run_like_tf_serving` (where the export is
verified and tests/test_export.py runs it) behaves as TF Serving where it matters: graphs with
`Xla*` ops fail there, and Keras cannot be imported."""

import keras
import numpy as np
import tensorflow as tf

from gpt_keras import serving

PROBE = r"""
try:
    import keras
    keras_blocked = False
except ImportError:
    keras_blocked = True
run = load(sys.argv[1])
try:
    run("update", {"x": np.zeros(4, np.float32)})
    error = None
except tf.errors.OpError as failure:
    error = failure.message
print(json.dumps({"keras_blocked": keras_blocked, "error": error}))
"""


def test_server_like_process_refuses_xla_ops_and_keras(tmp_path):
    """`keras.ops.slice_update` becomes `XlaDynamicUpdateSlice`, which runs in this process
    but is refused with XLA disabled, as in TF Serving."""

    class SliceUpdate(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((4,), tf.float32)])
        def update(self, x):
            return {"y": keras.ops.slice_update(x, [1], tf.ones((1,)))}

    module = SliceUpdate()
    np.testing.assert_array_equal(module.update(tf.zeros(4))["y"], [0, 1, 0, 0])
    tf.saved_model.save(module, str(tmp_path), signatures={"update": module.update})
    probe = serving.run_like_tf_serving([str(tmp_path)], PROBE)
    assert probe["keras_blocked"] is True
    assert "XLA compilation disabled" in probe["error"]
