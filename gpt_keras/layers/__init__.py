"""Keras layers that make up a GPT."""

from gpt_keras.layers.learned_positional_embedding import LearnedPositionalEmbedding
from gpt_keras.layers.multi_head_attention import MultiHeadAttention
from gpt_keras.layers.rotary_embedding import RotaryEmbedding
from gpt_keras.layers.sinusoidal_positional_encoding import SinusoidalPositionalEncoding
from gpt_keras.layers.transformer_block import TransformerBlock

__all__ = [
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "TransformerBlock",
]
