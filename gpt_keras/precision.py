"""Reduced-precision weights for decoding and export: `with_weights(model, "bfloat16" | "int8")`.

- `float32`: the model as trained.
- `bfloat16`: every weight and activation in bfloat16 (dtype policy "bfloat16"); attention
  softmax, layer norms and logits stay float32 (as under any policy, see `GPT`). Half the bytes.
- `int8`: weight-only int8 with Keras' own quantization: each `Dense` kernel as int8 with one
  float32 scale per output unit (`Int8QuantizationConfig(activation_quantizer=None)`: inputs
  stay float), the token embedding as int8 with one scale per token (also used by the tied
  output projection). A quarter of the bytes of the quantized matrices.

The converted model is a new `GPT` for inference (the original is left as it is); it generates,
exports to a SavedModel and (float32, int8) to TFLite like any other. Quality cost on a trained
model: BENCHMARKS.md (benchmarks/weights_quality.py).
"""

import contextlib
import dataclasses
import gc
import warnings

import keras
import numpy as np

from gpt_keras.config import WEIGHT_FORMATS

__all__ = ["WEIGHT_FORMATS", "with_weights", "weight_format"]



def with_weights(model, weights):
    """`model` (a built float32 `GPT`) with its weights in format `weights` (see the module
    docstring): the same model for "float32", else a new `GPT`."""
    from gpt_keras.model import GPT

    if weights not in WEIGHT_FORMATS:
        raise ValueError(
            f"`weights` must be one of {', '.join(WEIGHT_FORMATS)}. Received: weights={weights!r}"
        )
    current = weight_format(model)
    if current == weights:
        return model
    if current != "float32":
        raise ValueError(
            f"Convert from float32 weights: this model already has {current} weights."
        )
    dtype = "bfloat16" if weights == "bfloat16" else "float32"
    converted = GPT(**dataclasses.asdict(model.config), dtype=dtype, name=model.name)
    converted.build()
    converted.set_weights([np.asarray(w) for w in model.get_weights()])
    if weights == "int8":
        with warnings.catch_warnings(), _one_garbage_collection():
            # "Layer LayerNormalization does not have a `quantize` method": it is not meant to.
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            converted.quantize(
                "int8", config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
            )
    return converted


@contextlib.contextmanager
def _one_garbage_collection():
    """Runs `gc.collect()` once on exit instead of at each call inside: Keras'
    `Layer.__delattr__` collects for every variable it drops, and quantizing drops every kernel
    (0.2 to 0.5 s each in a process holding TensorFlow: 10 of GPT-2 small's 22 s). Keras gives
    no switch for it, so `gc.collect` itself is swapped for the duration: another thread's
    explicit collection in that time is skipped (the automatic one still runs)."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        collect()


def weight_format(model):
    """The `WEIGHT_FORMATS` entry that describes `model`'s weights."""
    if getattr(model.token_embedding, "quantization_mode", None) == "int8":
        return "int8"
    return "bfloat16" if model.token_embedding.embeddings.dtype == "bfloat16" else "float32"
