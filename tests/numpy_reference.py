"""An independent NumPy (float64) forward pass of GPT-2, reading weights from a `GPT`, used as the
reference in the numeric tests. Written from the GPT-2 paper/code, not from gpt_keras."""

import math

import numpy as np


def sinusoidal_table(positions, dim, max_wavelength=10000.0):
    """`[len(positions), dim]`: sin on even features, cos on odd, angle p / w**(2*(j//2)/dim)."""
    table = np.zeros((len(positions), dim))
    for row, p in enumerate(positions):
        for j in range(dim):
            angle = p / max_wavelength ** (2 * (j // 2) / dim)
            table[row, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


def rotary(x, positions, max_wavelength=10000.0):
    """RoFormer's rotation of `x` `[B, T, H, K]` at `positions` `[T]`, GPT-NeoX/LLaMA pairing:
    feature `i` and `i + K/2` form a 2-D vector rotated by `p / max_wavelength**(2i/K)`."""
    k = x.shape[-1]
    half = k // 2
    out = np.empty(x.shape, np.float64)
    for row, p in enumerate(positions):
        for i in range(half):
            angle = p / max_wavelength ** (2 * i / k)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[:, row, :, i], x[:, row, :, i + half]
            out[:, row, :, i] = a * c - b * s
            out[:, row, :, i + half] = a * s + b * c
    return out


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention(x, qkv_kernel, qkv_bias, out_kernel, out_bias, num_heads, padding_mask=None,
              rotary_max_wavelength=None, scores_out=None):
    """Causal self-attention of `x` `[B, T, D]`; `padding_mask` `[B, T]` hides keys; with
    `rotary_max_wavelength`, queries and keys are rotated by position (`rotary`). The attention
    probabilities `[B, H, T, T]` are appended to the list `scores_out` when one is given."""
    b, t, d = x.shape
    k_dim = d // num_heads
    q, k, v = np.split(x @ qkv_kernel + qkv_bias, 3, axis=-1)

    def heads(a, rotate=False):
        a = a.reshape(b, t, num_heads, k_dim)  # [B, T, H, K]
        if rotate and rotary_max_wavelength is not None:
            a = rotary(a, range(t), rotary_max_wavelength)
        return a.transpose(0, 2, 1, 3)  # [B, H, T, K]

    q, k, v = heads(q, rotate=True), heads(k, rotate=True), heads(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(k_dim)  # [B, H, T, T]
    visible = np.tril(np.ones((t, t), bool))[None, None]
    if padding_mask is not None:
        visible = visible & padding_mask.astype(bool)[:, None, None, :]
    scores = np.where(visible, scores, -1e9)
    probabilities = softmax(scores)
    if scores_out is not None:
        scores_out.append(probabilities)
    out = (probabilities @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return out @ out_kernel + out_bias


def block_weights(block):
    """The NumPy weights of a `TransformerBlock`."""
    w = lambda var: np.asarray(var.numpy(), np.float64)  # noqa: E731
    return {
        "ln1": (w(block.attention_norm.gamma), w(block.attention_norm.beta)),
        "qkv": (w(block.attention.query_key_value.kernel), w(block.attention.query_key_value.bias)),
        "out": (w(block.attention.output_dense.kernel), w(block.attention.output_dense.bias)),
        "ln2": (w(block.mlp_norm.gamma), w(block.mlp_norm.beta)),
        "fc": (w(block.mlp_in.kernel), w(block.mlp_in.bias)),
        "proj": (w(block.mlp_out.kernel), w(block.mlp_out.bias)),
    }


def block(x, weights, num_heads, eps, padding_mask=None, rotary_max_wavelength=None,
          scores_out=None):
    h = layer_norm(x, *weights["ln1"], eps)
    x = x + attention(h, *weights["qkv"], *weights["out"], num_heads, padding_mask,
                      rotary_max_wavelength, scores_out)
    h = layer_norm(x, *weights["ln2"], eps)
    fc_kernel, fc_bias = weights["fc"]
    proj_kernel, proj_bias = weights["proj"]
    return x + gelu_tanh(h @ fc_kernel + fc_bias) @ proj_kernel + proj_bias


def gpt_logits(model, token_ids, padding_mask=None, scores_out=None):
    """Logits `[B, T, V]` of a `gpt_keras.GPT` computed in NumPy float64; each layer's attention
    probabilities `[B, H, T, T]` are appended to the list `scores_out` when one is given."""
    cfg = model.config
    token_table = np.asarray(model.token_embedding.embeddings.numpy(), np.float64)
    t = token_ids.shape[1]
    rotary_max_wavelength = None
    if cfg.position_embedding == "learned":
        positions = np.asarray(model.position_embedding.position_embeddings.numpy(), np.float64)[:t]
        x = token_table[token_ids] + positions[None]
    elif cfg.position_embedding == "rotary":  # nothing added; attention rotates queries and keys
        x = token_table[token_ids]
        rotary_max_wavelength = 10000.0
    else:  # the paper's sqrt(D) * embedding + encoding, divided by sqrt(D)
        x = token_table[token_ids] + sinusoidal_table(range(t), cfg.hidden_dim)[None] / math.sqrt(
            cfg.hidden_dim)
    for keras_block in model.blocks:
        x = block(x, block_weights(keras_block), cfg.num_heads, cfg.layer_norm_epsilon, padding_mask,
                  rotary_max_wavelength, scores_out)
    x = layer_norm(
        x,
        np.asarray(model.final_norm.gamma.numpy(), np.float64),
        np.asarray(model.final_norm.beta.numpy(), np.float64),
        cfg.layer_norm_epsilon,
    )
    if cfg.tie_embeddings:
        return x @ token_table.T
    return x @ np.asarray(model.lm_head.kernel.numpy(), np.float64)


def randomize_weights(model, seed=0, scale=0.2):
    """Replaces every weight with random values (LayerNorm gammas around 1) so numeric tests see
    activations of order one instead of GPT-2's tiny initial values."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        values = rng.normal(0.0, scale, variable.shape)
        if variable.path.endswith("gamma"):
            values += 1.0
        variable.assign(values.astype(variable.dtype))
