"""Pre-LayerNorm GPT-2 decoder block."""

import keras
from keras import ops

from gpt_keras.layers._dense import Dense
from gpt_keras.layers._initializers import fresh
from gpt_keras.layers.multi_head_attention import MultiHeadAttention


def layer_norm(epsilon, dtype, name):
    """`keras.layers.LayerNormalization` over the last axis of `[B, T, D]` inputs, with the axis
    spelled 2: Keras reshapes gamma and beta to `[1, 1, D]` at every call unless the axis is
    given as the last index (two ops per norm and decoding step in a plain graph)."""
    return keras.layers.LayerNormalization(axis=2, epsilon=epsilon, dtype=dtype, name=name)


@keras.saving.register_keras_serializable(package="gpt_keras")
def gelu_approximate(x):
    """GELU's tanh approximation (GPT-2's "gelu_new")."""
    return ops.gelu(x, approximate=True)


@keras.saving.register_keras_serializable(package="gpt_keras")
class TransformerBlock(keras.layers.Layer):
    """GPT-2's decoder block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, each residual branch
    followed by dropout. The MLP is `Dense(mlp_dim)` → tanh-approximated GELU (GPT-2's "gelu_new")
    → `Dense(D)`.

    Shapes: `inputs` `[B, T, D]` → `[B, T, D]`. `padding_mask` or `attention_mask`, `cache`
    `[2, B, H, S, K]`, `cache_index` and `cache_slots` are passed to `MultiHeadAttention` (see
    there); with a cache the call returns `(outputs, updated_cache)`, and
    `return_attention_scores=True` appends the attention probabilities `[B, H, T, S]` to what it
    returns.

    Args:
        num_heads: attention heads; must divide D.
        mlp_dim: width of the MLP's hidden layer (GPT-2: 4 × D).
        dropout: dropout rate on attention probabilities and on both residual branches.
        layer_norm_epsilon: epsilon of both LayerNorms (GPT-2: 1e-5).
        kernel_initializer: initializer of the projections into attention and the MLP.
        output_kernel_initializer: initializer of the two projections that feed the residual
            stream (GPT-2 scales it by `1/sqrt(2 * num_layers)`); defaults to `kernel_initializer`.
        rotary_max_wavelength: None (GPT-2), or rotary position embeddings in attention with
            this base (see `MultiHeadAttention`).
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer=None,
        rotary_max_wavelength=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(mlp_dim, int) or mlp_dim < 1:
            raise ValueError(f"`mlp_dim` must be a positive integer. Received: mlp_dim={mlp_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
        if not layer_norm_epsilon > 0:
            raise ValueError(
                "`layer_norm_epsilon` must be positive. "
                f"Received: layer_norm_epsilon={layer_norm_epsilon!r}"
            )
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = keras.initializers.get(
            output_kernel_initializer or kernel_initializer
        )
        self.rotary_max_wavelength = rotary_max_wavelength
        # Created here so that a bad `num_heads` fails at construction, not at build.
        self.attention = MultiHeadAttention(
            num_heads,
            dropout=dropout,
            kernel_initializer=self.kernel_initializer,
            output_kernel_initializer=self.output_kernel_initializer,
            rotary_max_wavelength=rotary_max_wavelength,
            dtype=self.dtype_policy,
            name="attention",
        )

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        mlp_shape = tuple(input_shape[:-1]) + (self.mlp_dim,)
        self.attention_norm = layer_norm(self.layer_norm_epsilon, self.dtype_policy,
                                         "attention_norm")
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.mlp_norm = layer_norm(self.layer_norm_epsilon, self.dtype_policy, "mlp_norm")
        self.mlp_norm.build(input_shape)
        self.mlp_in = Dense(  # the activation inside: a plain graph fuses it with the product
            self.mlp_dim,
            activation=gelu_approximate,
            kernel_initializer=fresh(self.kernel_initializer),
            dtype=self.dtype_policy,
            name="mlp_in",
        )
        self.mlp_in.build(input_shape)
        self.mlp_out = Dense(
            hidden_dim,
            kernel_initializer=fresh(self.output_kernel_initializer),
            dtype=self.dtype_policy,
            name="mlp_out",
        )
        self.mlp_out.build(mlp_shape)
        self.residual_dropout = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    def call(self, inputs, padding_mask=None, cache=None, cache_index=None, training=None,
             return_attention_scores=False, attention_mask=None, cache_slots=None):
        attended = self.attention(
            self.attention_norm(inputs),
            padding_mask=padding_mask,
            attention_mask=attention_mask,
            cache=cache,
            cache_index=cache_index,
            cache_slots=cache_slots,
            training=training,
            return_attention_scores=return_attention_scores,
        )
        if cache is None and not return_attention_scores:
            attended = (attended,)
        attended, *extras = attended  # extras: the updated cache and/or the attention scores
        x = inputs + self.residual_dropout(attended, training=training)
        hidden = self.mlp_in(self.mlp_norm(x))  # [B, T, mlp_dim], after GELU
        x = x + self.residual_dropout(self.mlp_out(hidden), training=training)
        return (x, *extras) if extras else x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "output_kernel_initializer": keras.initializers.serialize(
                    self.output_kernel_initializer
                ),
                "rotary_max_wavelength": self.rotary_max_wavelength,
            }
        )
        return config
