"""gpt_keras: a GPT language model built from Keras 3 layers on TensorFlow.

The public names below are imported on first use, so `gpt-keras -h` answers without loading
TensorFlow.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "gpt_keras.model",
    "GPTConfig": "gpt_keras.config",
    "PRESETS": "gpt_keras.config",
    "num_parameters": "gpt_keras.config",
    "layers": "gpt_keras.layers",
    "load_gpt2": "gpt_keras.hf",
    "save_gpt2": "gpt_keras.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt_keras' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "layers" else getattr(module, name)
