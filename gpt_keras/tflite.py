"""Conversion of a `GPT` to TFLite with builtin ops only (runs in the plain LiteRT interpreter)."""

import tempfile

import keras
import tensorflow as tf

LOGITS_SIGNATURE = "logits"
DECODE_SIGNATURE = "decode_step"


def export_saved_model(model, directory):
    """Writes a SavedModel with two signatures and no Keras dependency:

    - `logits`: `token_ids` int32 `[B, T]` → `logits` float32 `[B, T, V]`;
    - `decode_step`: `token_ids` int32 `[B, T]`, `cache` `[B, L, 2, S, H, K]` (S = context length),
      `cache_index` int32 scalar → `logits` `[B, T, V]` and the updated `cache`.
    """
    config = model.config
    heads = config.num_heads
    cache_shape = (
        None, config.num_layers, 2, config.context_length, heads, config.hidden_dim // heads
    )

    def logits(token_ids):
        return {"logits": model(token_ids, training=False)}

    def decode_step(token_ids, cache, cache_index):
        step_logits, cache = model.call_with_cache(token_ids, cache, cache_index)
        return {"logits": step_logits, "cache": cache}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        LOGITS_SIGNATURE,
        logits,
        input_signature=[tf.TensorSpec((None, None), tf.int32, name="token_ids")],
    )
    archive.add_endpoint(
        DECODE_SIGNATURE,
        decode_step,
        input_signature=[
            tf.TensorSpec((None, None), tf.int32, name="token_ids"),
            tf.TensorSpec(cache_shape, model.compute_dtype, name="cache"),
            tf.TensorSpec((), tf.int32, name="cache_index"),
        ],
    )
    archive.write_out(directory, verbose=False)


def convert_to_tflite(model):
    """Returns the bytes of a `.tflite` file with the `logits` and `decode_step` signatures of
    `export_saved_model`, converted through a SavedModel with `TFLITE_BUILTINS` only (no Flex
    delegate needed). Conversion fails loudly if the model needs a non-builtin op."""
    with tempfile.TemporaryDirectory() as directory:
        export_saved_model(model, directory)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            directory, signature_keys=[LOGITS_SIGNATURE, DECODE_SIGNATURE]
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return converter.convert()
