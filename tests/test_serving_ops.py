"""The exported SavedModel runs the way stock TF Serving runs it: through the TF1 Session loader,
with XLA compilation disabled process-wide, in a process that never imports Keras or gpt_keras."""

import json
import subprocess
import sys

import numpy as np
import tensorflow as tf

from gpt_keras import GPT
from gpt_keras.tflite import export_saved_model
from tests import numpy_reference as ref

# Runs in a fresh interpreter: blocks keras/gpt_keras imports, disables XLA as the model server
# does, loads argv[1] with the Session loader; `run(signature, feeds)` runs a signature by its
# tensor names.
SERVER_LIKE_SESSION = r"""
import ctypes, json, os, sys
import numpy as np

for blocked in ("keras", "keras_hub", "tensorflow_text", "gpt_keras"):
    sys.modules[blocked] = None  # `import keras` now raises ModuleNotFoundError
import tensorflow as tf

lib = os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2")
ctypes.CDLL(lib)._ZN10tensorflow21DisableXlaCompilationEv()
session = tf.compat.v1.Session(graph=tf.Graph())
meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], sys.argv[1])

def run(name, feeds):
    sig = meta.signature_def[name]
    fetches = {k: v.name for k, v in sig.outputs.items()}
    return session.run(fetches, {sig.inputs[k].name: v for k, v in feeds.items()})
"""

SERVER_LIKE_RUN = SERVER_LIKE_SESSION + r"""
ids = np.array(json.loads(sys.argv[2]), np.int32)
logits = run("logits", {"token_ids": ids})["logits"]
cache = np.zeros(json.loads(sys.argv[3]), np.float32)
step = run("decode_step", {"token_ids": ids[:, :-1], "cache": cache, "cache_index": 0})
step = run("decode_step", {"token_ids": ids[:, -1:], "cache": step["cache"],
                           "cache_index": ids.shape[1] - 1})
print(json.dumps({"logits": logits.tolist(), "last_step": step["logits"].tolist(),
                  "keras_loaded": sys.modules["keras"] is not None}))
"""


def test_savedmodel_runs_with_xla_disabled_and_no_keras(tmp_path):
    model = GPT.from_preset("tiny", position_embedding="learned")
    model.build()
    ref.randomize_weights(model)
    export_dir = str(tmp_path / "1")
    export_saved_model(model, export_dir)
    graph_ops = {
        node.op
        for function in tf.saved_model.load(export_dir).signatures["decode_step"]
        .graph.as_graph_def().library.function
        for node in function.node_def
    }
    assert graph_ops and not any(op.startswith("Xla") for op in graph_ops), graph_ops

    ids = np.random.default_rng(0).integers(0, 64, (2, 9)).astype("int32")
    cache_shape = list(model.init_cache(2).shape)
    result = subprocess.run(
        [sys.executable, "-c", SERVER_LIKE_RUN, export_dir, json.dumps(ids.tolist()),
         json.dumps(cache_shape)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["keras_loaded"] is False
    expected = np.asarray(model(ids))
    np.testing.assert_allclose(served["logits"], expected, atol=1e-5)
    np.testing.assert_allclose(np.array(served["last_step"])[:, 0], expected[:, -1], atol=1e-5)


def test_control_the_server_like_process_refuses_xla_ops(tmp_path):
    """Shows the check above can fail: `keras.ops.slice_update` (`XlaDynamicUpdateSlice`) is
    refused in the same process setup."""
    import keras

    class SliceUpdate(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((4,), tf.float32)])
        def update(self, x):
            return {"y": keras.ops.slice_update(x, [1], tf.ones((1,)))}

    module = SliceUpdate()
    tf.saved_model.save(module, str(tmp_path), signatures={"update": module.update})
    script = SERVER_LIKE_SESSION + 'run("update", {"x": np.zeros(4, np.float32)})'
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "XLA compilation disabled" in result.stderr
