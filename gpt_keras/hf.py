"""Hugging Face GPT-2 checkpoints: import into a `GPT` and export back.

A Hugging Face GPT-2 directory holds `config.json` and the weights in `model.safetensors` (or an
older `pytorch_model.bin`). Nothing is downloaded: point `load_gpt2` at files you have.

    model = gpt_keras.hf.load_gpt2("path/to/gpt2")        # any GPT-2 size
    gpt_keras.hf.save_gpt2(model, "path/to/exported")     # transformers.GPT2LMHeadModel reads it

Why the mapping is a plain copy: Hugging Face's GPT-2 keeps OpenAI's `Conv1D` layers, whose
weights are `[in, out]` like a Keras `Dense` kernel; `c_attn` is the fused `[D, 3D]` query|key|value
projection exactly like `MultiHeadAttention.query_key_value`; both use the tanh-approximated GELU
("gelu_new"), learned positions and an output layer tied to the token embedding.

Safetensors files are read and written here with NumPy (the format is an 8-byte header length, a
JSON header, then raw little-endian tensors), so neither torch nor the `safetensors` package is
needed. `pytorch_model.bin` needs torch.
"""

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile

import numpy as np

from gpt_keras.config import GPTConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"

# `config.json` keys that change the computation, with the only values `GPT` reproduces.
# "gelu_pytorch_tanh" is the same tanh approximation as "gelu_new", computed by a fused kernel.
_REQUIRED_VALUES = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),  # attention logits divided by sqrt(head size)
    "scale_attn_by_inverse_layer_idx": (False,),  # ...and by the layer index (Mistral/CRFM)
    "add_cross_attention": (False,),  # encoder-decoder attention layers
    "tie_word_embeddings": (True,),  # lm_head is wte; GPT-2 always ties
    "model_type": ("gpt2",),
    "pruned_heads": ({},),
    "is_encoder_decoder": (False,),
}
# Keys that do not change the forward pass: metadata, token ids, generation defaults, heads of
# other architectures (the `summary_*` of GPT2DoubleHeadsModel), initialisation.
# `reorder_and_upcast_attn` only makes PyTorch compute attention logits in float32, which `GPT`
# always does; the dropout rates are read (see `config_from_hf`).
_IGNORED_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "n_ctx", "n_special", "predict_special_tokens", "use_cache", "output_past",
    "gradient_checkpointing", "reorder_and_upcast_attn", "attn_pdrop", "embd_pdrop",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "task_specific_params", "id2label", "label2id", "num_labels",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "is_decoder",
    "chunk_size_feed_forward", "tie_encoder_decoder", "cross_attention_hidden_size",
    "tf_legacy_loss", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
}
_SIZE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_READ_KEYS = set(_SIZE_KEYS) | {"n_inner", "layer_norm_epsilon", "resid_pdrop"}

# Tensors Hugging Face stores that are not weights: the causal-mask buffers of old checkpoints.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."  # GPT2LMHeadModel's names; GPT2Model's have none

# safetensors dtype name → NumPy dtype. BF16 has no NumPy dtype and is widened by hand.
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U8": "u1", "BOOL": "?",
}


# --- config.json ------------------------------------------------------------------------------


def config_from_hf(hf_config):
    """The `GPTConfig` of a Hugging Face GPT-2 `config.json` (a dict).

    `context_length` = `n_positions`, `mlp_dim` = `n_inner` (None: 4 × `n_embd`), `dropout` =
    `resid_pdrop` (GPT-2 uses one rate everywhere; `GPT` has a single rate),
    `position_embedding="learned"`, `tie_embeddings=True`. Raises `ValueError` for a missing size,
    a key whose value `GPT` cannot reproduce (another activation, `scale_attn_by_inverse_layer_idx`,
    cross-attention, untied embeddings, ...) and keys this converter does not know.
    """
    if not isinstance(hf_config, dict):
        raise ValueError(
            f"A GPT-2 config must be a JSON object. Received: {type(hf_config).__name__}"
        )
    missing = [key for key in _SIZE_KEYS if key not in hf_config]
    if missing:
        raise ValueError(
            f"The GPT-2 config lacks {', '.join(map(repr, missing))}: a Hugging Face GPT-2 "
            "config.json names all of vocab_size, n_positions, n_embd, n_layer and n_head."
        )
    for key, value in hf_config.items():
        if key in _REQUIRED_VALUES:
            allowed = _REQUIRED_VALUES[key]
            if value not in allowed:
                raise ValueError(
                    f"Unsupported GPT-2 config: {key}={value!r}; gpt_keras.GPT implements only "
                    f"{key}={' or '.join(map(repr, allowed))}. This checkpoint computes something "
                    "else, so its weights would give different outputs here."
                )
        elif key not in _READ_KEYS and key not in _IGNORED_KEYS and not key.startswith("_"):
            raise ValueError(
                f"Unknown GPT-2 config key {key!r} (value {hf_config[key]!r}): gpt_keras cannot "
                "tell whether it changes the model. If it is harmless metadata, remove it from "
                "config.json and load again."
            )
    sizes = {key: hf_config[key] for key in _SIZE_KEYS}
    for key, value in sizes.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"GPT-2 config {key} must be a positive integer. Received: {value!r}")
    if sizes["n_embd"] % sizes["n_head"]:
        raise ValueError(f"GPT-2 config n_head={sizes['n_head']} does not divide "
                         f"n_embd={sizes['n_embd']}: the heads split the embedding evenly.")
    mlp_dim = hf_config.get("n_inner")
    if mlp_dim is not None and (not _is_int(mlp_dim) or mlp_dim < 1):
        raise ValueError(f"GPT-2 config n_inner must be a positive integer or null (4 × n_embd). "
                         f"Received: {mlp_dim!r}")
    epsilon = hf_config.get("layer_norm_epsilon", 1e-5)
    if not _is_number(epsilon) or not 0 < epsilon < math.inf:
        raise ValueError(f"GPT-2 config layer_norm_epsilon must be a positive number. "
                         f"Received: {epsilon!r}")
    dropout = hf_config.get("resid_pdrop", 0.1)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"GPT-2 config resid_pdrop must be a number in [0, 1). "
                         f"Received: {dropout!r}")
    return GPTConfig(
        vocab_size=sizes["vocab_size"],
        context_length=sizes["n_positions"],
        num_layers=sizes["n_layer"],
        num_heads=sizes["n_head"],
        hidden_dim=sizes["n_embd"],
        mlp_dim=mlp_dim,
        dropout=float(dropout),
        position_embedding="learned",
        tie_embeddings=True,
        layer_norm_epsilon=float(epsilon),
    )


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_to_hf(config, end_of_text_id=None):
    """The Hugging Face `config.json` dict (for `GPT2LMHeadModel`) of a `GPTConfig`.

    Raises `ValueError` unless the config has learned positions and tied embeddings (the only
    GPT-2 architecture). `end_of_text_id` sets `bos_token_id`/`eos_token_id`; by default 50256
    (GPT-2's `<|endoftext|>`) when the vocabulary has GPT-2's size or more, otherwise unset.
    """
    if config.position_embedding != "learned" or not config.tie_embeddings:
        raise ValueError(
            "Only GPT-2-architecture models (position_embedding='learned', tie_embeddings=True) "
            "can be exported to Hugging Face GPT-2. Received: "
            f"position_embedding={config.position_embedding!r}, "
            f"tie_embeddings={config.tie_embeddings!r}."
        )
    if end_of_text_id is None and config.vocab_size > 50256:
        end_of_text_id = 50256
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.hidden_dim,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.mlp_dim,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": end_of_text_id,
        "eos_token_id": end_of_text_id,
        "torch_dtype": "float32",
    }


# --- safetensors ------------------------------------------------------------------------------


def read_safetensors(path):
    """`{name: np.ndarray}` of a safetensors file, memory-mapped (nothing is copied until used).
    BF16 tensors are widened to float32. Raises `ValueError` for a malformed file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file: a safetensors checkpoint is one file.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {header_size}).")
        try:
            header = json.loads(f.read(header_size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has an unreadable safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object: the file is "
                         "corrupt or not safetensors.")
    data_size = size - 8 - header_size
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size, shape=(data_size,))
        if data_size
        else np.zeros(0, np.uint8)
    )
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(info, dict) and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(_is_int(n) and n >= 0 for n in info["shape"])
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
            and all(_is_int(n) for n in info["data_offsets"])
        ):
            raise ValueError(
                f"{path}: malformed header entry for tensor {name!r}: {info!r} (expected "
                '{"dtype": str, "shape": [non-negative ints], "data_offsets": [begin, end]}).'
            )
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype != "BF16" and dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}.")
        itemsize = 2 if dtype == "BF16" else np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * itemsize:
            raise ValueError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) has byte range "
                f"[{begin}, {end}) that does not fit the file: the file is truncated or corrupt."
            )
        raw = data[begin:end]
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            array = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = raw.view(_SAFETENSORS_DTYPES[dtype])
        tensors[name] = array.reshape(shape)
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Writes `{name: array}` to `path` in the safetensors format (C order, little endian)."""
    dtype_names = {np.dtype(v).str: k for k, v in _SAFETENSORS_DTYPES.items()}
    header, arrays, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if array.dtype.str not in dtype_names:
            raise ValueError(f"Cannot write tensor {name!r} of dtype {array.dtype} to safetensors.")
        header[name] = {
            "dtype": dtype_names[array.dtype.str],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())


# --- checkpoint files ---------------------------------------------------------------------------


def _read_pytorch(path):
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} is a PyTorch pickle, which needs torch to read. Install torch, or convert "
            "the checkpoint to model.safetensors (transformers: "
            "`model.save_pretrained(directory)`), which gpt_keras reads without torch."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{path} cannot be read by torch.load ({type(error).__name__}: {reason[:200]}): the "
            "file is truncated or not a PyTorch state dict."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors: save "
                         "the model's state_dict().")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {name!r} is a {type(tensor).__name__}, not a tensor.")
    return {
        name: tensor.detach().to(torch.float32).numpy()
        if tensor.is_floating_point()
        else tensor.numpy()
        for name, tensor in state.items()
    }


def read_config(directory):
    """The `config.json` dict of a Hugging Face model directory."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory: pass a Hugging Face GPT-2 directory.")
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"No {CONFIG_FILE} in {directory}: it is not a Hugging Face model directory."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from None


def read_weights(directory):
    """`({tensor name: np.ndarray}, weights file)` of a Hugging Face model directory. Prefers
    `model.safetensors` (memory-mapped), then a sharded `model.safetensors.index.json`, then
    `pytorch_model.bin`. Raises `ValueError` for a damaged file or index."""
    safetensors = os.path.join(directory, SAFETENSORS_FILE)
    index = os.path.join(directory, SAFETENSORS_INDEX_FILE)
    pytorch = os.path.join(directory, PYTORCH_FILE)
    if os.path.exists(safetensors):
        return read_safetensors(safetensors), safetensors
    if os.path.exists(index):
        return _read_shards(directory, index), index
    if os.path.exists(pytorch):
        return _read_pytorch(pytorch), pytorch
    raise ValueError(
        f"No weights in {directory}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE} or "
        f"{PYTORCH_FILE}."
    )


def _read_shards(directory, index):
    """`{tensor name: np.ndarray}` of the shards that the sharded checkpoint's `index` names."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {index}: {error}") from None
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f'{index} must be a JSON object with a "weight_map" from tensor names '
                         "to shard file names, as transformers' save_pretrained writes it.")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".."):
            raise ValueError(f"{index}: weight_map maps {name!r} to {shard!r}, not to a file "
                             "name in the directory.")
    for shard in set(weight_map.values()):
        if not os.path.isfile(os.path.join(directory, shard)):
            raise ValueError(f"{index} names {shard}, which is missing from {directory}: copy "
                             "every shard of the checkpoint.")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        stored = read_safetensors(os.path.join(directory, shard))
        twice = sorted(set(stored) & set(tensors))
        if twice:
            raise ValueError(f"{index}: tensor {twice[0]!r} is stored twice (again in {shard}).")
        tensors.update(stored)
    for name, shard in weight_map.items():
        if name not in tensors:
            raise ValueError(f"{index} puts {name!r} in {shard}, which lacks it: the index does "
                             "not belong to these shards.")
    return tensors


def _expected_shapes(config):
    """`{Hugging Face name (no prefix): shape}` of every weight of a GPT-2 with `config`."""
    d, m = config.hidden_dim, config.mlp_dim or 4 * config.hidden_dim
    shapes = {"wte.weight": (config.vocab_size, d), "wpe.weight": (config.context_length, d)}
    for i in range(config.num_layers):
        shapes.update({
            f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
            f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
            f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
            f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
            f"h.{i}.mlp.c_fc.weight": (d, m), f"h.{i}.mlp.c_fc.bias": (m,),
            f"h.{i}.mlp.c_proj.weight": (m, d), f"h.{i}.mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def gpt2_variables(model):
    """`{Hugging Face name (no prefix): Keras variable}` of a GPT-2-architecture `GPT`."""
    variables = {
        "wte.weight": model.token_embedding.embeddings,
        "wpe.weight": model.position_embedding.position_embeddings,
    }
    for i, block in enumerate(model.blocks):
        attention = block.attention
        for hf_name, layer in [
            ("ln_1", block.attention_norm), ("ln_2", block.mlp_norm),
        ]:
            variables[f"h.{i}.{hf_name}.weight"] = layer.gamma
            variables[f"h.{i}.{hf_name}.bias"] = layer.beta
        for hf_name, layer in [
            ("attn.c_attn", attention.query_key_value), ("attn.c_proj", attention.output_dense),
            ("mlp.c_fc", block.mlp_in), ("mlp.c_proj", block.mlp_out),
        ]:
            variables[f"h.{i}.{hf_name}.weight"] = layer.kernel
            variables[f"h.{i}.{hf_name}.bias"] = layer.bias
    variables["ln_f.weight"] = model.final_norm.gamma
    variables["ln_f.bias"] = model.final_norm.beta
    return variables


# --- import / export --------------------------------------------------------------------------


def load_gpt2(path, dtype=None, name=None):
    """A `gpt_keras.GPT` with the weights of the Hugging Face GPT-2 checkpoint in directory `path`.

    Reads `config.json` and `model.safetensors` (no torch needed), a sharded
    `model.safetensors.index.json`, or `pytorch_model.bin` (needs torch). Tensor names with and
    without the `transformer.` prefix (GPT2LMHeadModel / GPT2Model) are accepted; the causal-mask
    buffers `attn.bias`/`attn.masked_bias` are skipped, and `lm_head.weight`, when stored, must
    equal `wte.weight` (GPT-2 ties them). Works for every GPT-2 size (the sizes come from
    `config.json`, see `config_from_hf`).

    Args:
        path: the checkpoint directory.
        dtype: the `GPT`'s dtype policy (e.g. "mixed_bfloat16"); None: the global policy.
            Variables are float32 either way (checkpoints in float16/bfloat16 are widened).
        name: the `GPT`'s Keras name.

    Raises `ValueError` naming the file, tensor or config key for anything malformed: a config
    value of the wrong type or one `GPT` cannot reproduce, sizes the tensors do not have (checked
    before anything is allocated for them), a damaged file or index, a missing, extra,
    duplicated, misshapen, non-float or non-finite tensor.
    """
    from gpt_keras.model import GPT  # imports TensorFlow; keep `config_from_hf` light

    config_path, hf_config = os.path.join(path, CONFIG_FILE), read_config(path)
    try:
        config = config_from_hf(hf_config)  # checked before any weight is read
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    tensors, weights_path = read_weights(path)  # memory-mapped safetensors: nothing copied
    # The config's sizes allocate nothing until every tensor has been checked against them;
    # only the shape table grows with n_layer, bounded here by the tensors the files hold.
    if config.num_layers > len(tensors):
        raise ValueError(
            f"{config_path}: n_layer={config.num_layers} needs {12 * config.num_layers + 4} "
            f"tensors; {weights_path} holds {len(tensors)}: this config.json does not belong to "
            "these weights."
        )
    expected = _expected_shapes(config)
    found, lm_head = {}, None
    unexpected = []
    for stored_name, value in tensors.items():
        key = stored_name[len(_PREFIX):] if stored_name.startswith(_PREFIX) else stored_name
        if key == "lm_head.weight":
            lm_head = value
        elif key in expected:
            if key in found:
                raise ValueError(f"{weights_path} holds both {found[key][0]!r} and "
                                 f"{stored_name!r}: keep one of them.")
            found[key] = (stored_name, value)
        elif not key.endswith(_BUFFER_SUFFIXES):
            unexpected.append(stored_name)
    missing = [key for key in expected if key not in found]
    if missing:
        shown = ", ".join(f"{key!r} (expected shape {expected[key]})" for key in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{weights_path} is missing tensor {shown}{more}, which config.json "
            f"(n_layer={config.num_layers}, n_embd={config.hidden_dim}) requires. The checkpoint "
            "is partial or does not belong to this config.json."
        )
    if unexpected:
        raise ValueError(
            f"{weights_path} has tensors a GPT-2 language model does not have: "
            f"{', '.join(map(repr, sorted(unexpected)[:5]))}"
            f"{' ...' if len(unexpected) > 5 else ''}. Export the plain language model "
            "(GPT2LMHeadModel or GPT2Model) and load that."
        )
    for key, (stored_name, value) in found.items():
        if tuple(value.shape) != expected[key]:
            raise ValueError(
                f"{weights_path}: tensor {stored_name!r} has shape {tuple(value.shape)}; expected "
                f"{expected[key]} from config.json (vocab_size={config.vocab_size}, "
                f"n_positions={config.context_length}, n_embd={config.hidden_dim}, "
                f"n_inner={config.mlp_dim})."
            )
    for key, (stored_name, value) in found.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{weights_path}: tensor {stored_name!r} has dtype {value.dtype}; "
                             "GPT-2 weights are floats (F32, F16 or BF16).")
        # As float32, the variables' dtype: a float64 beyond its range becomes infinite too.
        bad = value.size - np.count_nonzero(np.isfinite(np.asarray(value, np.float32)))
        if bad:
            raise ValueError(
                f"{weights_path}: tensor {stored_name!r} holds {bad} non-finite "
                f"value{'s' if bad > 1 else ''} (NaN or infinity in float32): the checkpoint is "
                "corrupt or was saved after training diverged."
            )
    if lm_head is not None:
        if tuple(lm_head.shape) != expected["wte.weight"] or not np.array_equal(
            np.asarray(lm_head), np.asarray(found["wte.weight"][1])
        ):
            raise ValueError(
                f"{weights_path}: lm_head.weight differs from wte.weight, but GPT-2 ties them "
                "(tie_word_embeddings=True); this checkpoint's output layer cannot be loaded."
            )
    kwargs = {} if name is None else {"name": name}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = GPT(**dataclasses.asdict(config), **kwargs)
    model.build()
    for key, variable in gpt2_variables(model).items():
        variable.assign(np.asarray(found[key][1], dtype=variable.dtype))
    return model


def save_gpt2(model, directory, end_of_text_id=None, overwrite=False):
    """Writes `model` as a Hugging Face GPT-2 checkpoint: `directory/config.json` and
    `directory/model.safetensors`, which `transformers.GPT2LMHeadModel.from_pretrained(directory)`
    loads. Returns `directory`.

    The directory is written complete in a temporary directory beside it and then renamed, so a
    reader never sees a partial checkpoint. Raises `ValueError` for a model that is not GPT-2's
    architecture (sinusoidal positions or an untied output layer), and for an existing non-empty
    `directory` unless `overwrite=True`.

    Args:
        model: a built `gpt_keras.GPT` with `position_embedding="learned"`, `tie_embeddings=True`.
        directory: where to write.
        end_of_text_id: `bos_token_id`/`eos_token_id` in config.json (see `config_to_hf`).
        overwrite: replace an existing non-empty `directory`.
    """
    hf_config = config_to_hf(model.config, end_of_text_id)
    if not model.built:
        raise ValueError(
            "The model is not built, so it has no weights to export. Train it, call it on a "
            "batch, or call `model.build()` (for random weights) first."
        )
    directory = os.path.abspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise ValueError(
            f"{directory} exists and is not empty. Pass overwrite=True to replace it, or choose "
            "another directory."
        )
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
    try:
        tensors = {
            _PREFIX + key: np.asarray(variable.numpy(), np.float32)
            for key, variable in gpt2_variables(model).items()
        }
        write_safetensors(os.path.join(temporary, SAFETENSORS_FILE), tensors, {"format": "pt"})
        with open(os.path.join(temporary, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(temporary, 0o755)
        if os.path.isdir(directory):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.old-")
            os.rename(directory, os.path.join(old, "previous"))
            os.rename(temporary, directory)
            shutil.rmtree(old)
        else:
            os.rename(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return directory
