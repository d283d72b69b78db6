"""gpt_keras: a GPT language model built from Keras 3 layers on TensorFlow."""

from gpt_keras import layers
from gpt_keras.config import PRESETS, GPTConfig, num_parameters
from gpt_keras.model import GPT

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "PRESETS", "layers", "num_parameters"]
