"""LoRA fine-tuning (Hu et al. 2021) with Keras' own `Dense.enable_lora`: each adapted `Dense`
of kernel `W [D_in, D_out]` computes `x·(W + (alpha/r)·A·B)`, with `A [D_in, r]` (He-uniform)
and `B [r, D_out]` (zeros, so training starts from the base model) as float32 variables.

- `enable(model, rank, alpha, targets)`: adapters on the `Dense` layers of the target groups
  (`TARGET_LAYERS`: "attention" = `query_key_value` + `output_dense` of every block, "mlp" =
  `mlp_in` + `mlp_out`); every other weight is frozen, so only the adapters train:
  `sum over adapted layers of r·(D_in + D_out)` parameters.
- `merge(model)`: a plain float32 `GPT` (no adapter variables) whose kernels are
  `W + (alpha/r)·A·B` in float32, what Keras' `Dense.kernel` computes before casting it to the
  compute dtype: the merged model gives the adapted model's logits up to float32 rounding.
- `frozen_weights(model)`: the base weights of an adapted model, which a LoRA run's checkpoints
  leave out (`checkpoints.model_variables`): the run re-reads them from its `--init-from`.

Only `Dense` layers are adapted. Keras' `Embedding.enable_lora` would work too (its `embeddings`
property adds the adapter, and `GPT.project_logits` reads that property for the tied output
projection), but it forms the whole merged `[V, D]` table every step and adapts the input and
the output projection as one; it is not offered. The untied `lm_head` is not a target either
(GPT-2 has none).
"""

import dataclasses

from keras import ops

from gpt_keras.config import parse_lora_targets

# Attribute names of the `Dense` layers of each target group, per transformer block.
TARGET_LAYERS = {
    "attention": (("attention", "query_key_value"), ("attention", "output_dense")),
    "mlp": (("mlp_in",), ("mlp_out",)),
}


def target_layers(model, targets):
    """The `Dense` layers of `model` (a built `GPT`) in the target groups `targets` (a string
    such as "attention,mlp", or a sequence of group names), block by block."""
    groups = parse_lora_targets(targets)
    layers = []
    for block in model.blocks:
        for group in groups:
            for names in TARGET_LAYERS[group]:
                layer = block
                for name in names:
                    layer = getattr(layer, name)
                layers.append(layer)
    return layers


def enable(model, rank, alpha=None, targets="attention"):
    """Adds rank-`rank` adapters to the target layers of `model` (a built `GPT`, see the module
    docstring), scaled by `alpha / rank` (`alpha` None: `rank`, scale 1, Keras' default), and
    freezes every other weight. The adapters' initial values come from Keras' global seed."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer. Received: rank={rank!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number (or None for alpha = rank). "
                         f"Received: alpha={alpha!r}")
    if not model.built:
        raise ValueError("Build the model (`model.build()`) before enabling LoRA on it.")
    if adapted_layers(model):
        raise ValueError("LoRA is already enabled on this model; enable it once, on the base.")
    layers = target_layers(model, targets)
    for layer in layers:
        if layer.quantization_mode is not None:
            raise ValueError(f"{layer.path} is {layer.quantization_mode}-quantized; enable LoRA "
                             "on the float model (quantize the merged model instead).")
    for layer in layers:
        layer.enable_lora(rank, lora_alpha=alpha)
    for weight in frozen_weights(model):
        weight.trainable = False
    return layers


def adapted_layers(model):
    """The layers of `model` with LoRA enabled, block by block."""
    return [layer for layer in target_layers(model, tuple(TARGET_LAYERS))
            if getattr(layer, "lora_enabled", False)]


def adapter_variables(model):
    """The adapter matrices `A, B` of every adapted layer, in order."""
    return [v for layer in adapted_layers(model)
            for v in (layer.lora_kernel_a, layer.lora_kernel_b)]


def frozen_weights(model):
    """`model.weights` less the adapters if LoRA is enabled (the frozen base), else `[]`."""
    adapters = {id(v) for v in adapter_variables(model)}
    return [w for w in model.weights if id(w) not in adapters] if adapters else []


def merged_kernel(layer):
    """`W + (alpha/r)·A·B` `[D_in, D_out]` in float32 for an adapted `Dense` layer (Keras'
    `Dense.kernel` before its cast to the compute dtype)."""
    kernel = next(w for w in layer.weights if w.name == "kernel")
    delta = (layer.lora_alpha / layer.lora_rank) * ops.matmul(layer.lora_kernel_a,
                                                              layer.lora_kernel_b)
    return ops.add(kernel, delta)


def merge(model):
    """A plain float32 `GPT` with `model`'s config and weights, each adapter merged into its
    kernel (`merged_kernel`): no adapter variables, no optimizer. For a model without LoRA, a
    float32 copy."""
    from gpt_keras.model import GPT

    merged = {}
    for layer in adapted_layers(model):
        kernel = next(w for w in layer.weights if w.name == "kernel")
        merged[id(kernel)] = merged_kernel(layer)
    adapters = {id(v) for v in adapter_variables(model)}
    plain = GPT(**dataclasses.asdict(model.config), dtype="float32")
    plain.build()
    plain.set_weights([ops.convert_to_numpy(merged.get(id(w), w))
                       for w in model.weights if id(w) not in adapters])
    return plain

