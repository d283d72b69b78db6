"""keras-hub GPT-2 models: import into a `GPT`, with their tokenizer as gpt_keras' `GPT2Tokenizer`.

keras-hub saves a GPT-2 in two forms, both read here (nothing is downloaded):
- a preset directory, written by `save_to_preset(directory)`: of a `GPT2Backbone` (`config.json`,
  `model.weights.h5`, `metadata.json`) or of a `GPT2CausalLM` (also `task.json`,
  `preprocessor.json`, `tokenizer.json`, `assets/tokenizer/vocabulary.json` + `merges.txt`);
- a `.keras` file, written by `model.save(path)` of either.

    model, tokenizer = gpt_keras.keras_hub_import.load_keras_hub_gpt2("path/to/preset")

keras-hub itself reads the files (it knows its own formats, sharded weights, and the LoRA
weights that Keras merges into the kernels when saving), so it is needed here and only here:
`pip install "gpt-keras[keras-hub]"`; it is imported when a keras-hub model is converted.

Why the mapping is a reshape: `GPT2Backbone` is GPT-2's architecture, as `GPT` with
`position_embedding="learned"`: pre-LayerNorm blocks with epsilon 1e-5, the tanh-approximated GELU
(`gelu_approximate`, Hugging Face's "gelu_new"), a learned position table of
`max_sequence_length` rows, one dropout rate, and an output layer tied to the token embedding
(`GPT2CausalLM` has no weights of its own). Its attention keeps separate query, key and value
kernels `[D, H, K]` where `GPT` has one fused `[D, 3D]` kernel (query | key | value, head-major,
as Hugging Face's `c_attn`), and the output kernel as `[H, K, D]`. The weights are mapped onto
Hugging Face GPT-2 names, the names `gpt_keras.hf` already maps onto `GPT`'s variables.
"""

import dataclasses
import json
import os
import zipfile

import keras
import numpy as np

from gpt_keras.config import GPTConfig
from gpt_keras.hf import (
    CONFIG_FILE, PYTORCH_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, gpt2_variables,
)

KERAS_HUB = "keras-hub"
HUGGING_FACE = "huggingface"
INSTALL = 'pip install "gpt-keras[keras-hub]"'
SUPPORTED = ("a keras-hub GPT2Backbone or GPT2CausalLM, saved with save_to_preset (a directory) "
             "or model.save (a .keras file)")

_TASK_FILE = "task.json"
_TASK_WEIGHTS_FILE = "task.weights.h5"
_TOKENIZER_FILE = "tokenizer.json"
# Names only keras-hub presets have (Hugging Face directories have config.json too).
_KERAS_HUB_FILES = ("model.weights.h5", "model.weights.json", "metadata.json", _TASK_FILE)
_HUGGING_FACE_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE, PYTORCH_FILE)
END_OF_TEXT = "<|endoftext|>"


def source_format(path):
    """`"keras-hub"` or `"huggingface"`: what kind of GPT-2 `path` holds, told from its names.

    A `.keras` file (or any zip archive) is keras-hub's; a directory is keras-hub's when it has
    `model.weights.h5`/`metadata.json`/`task.json` or a `config.json` with keras' key
    `registered_name`, and Hugging Face's when it has `model.safetensors`/`pytorch_model.bin` or a
    `config.json` with transformers' key `model_type` (a directory with neither is treated as
    Hugging Face's, whose loader names what is missing). Raises `ValueError` for a directory
    with marks of both, another file, or a missing path.
    """
    if os.path.isfile(path):
        if path.endswith(".keras") or zipfile.is_zipfile(path):
            return KERAS_HUB
        raise ValueError(f"{path} is a file but not a .keras archive. Convert reads a Hugging "
                         f"Face GPT-2 directory or {SUPPORTED}.")
    if not os.path.isdir(path):
        raise ValueError(f"{path} does not exist. Convert reads a Hugging Face GPT-2 directory "
                         f"or {SUPPORTED}.")
    config = _json_object_or_empty(os.path.join(path, CONFIG_FILE))
    marks = {
        KERAS_HUB: [name for name in _KERAS_HUB_FILES if os.path.exists(os.path.join(path, name))]
        + ([f"{CONFIG_FILE} with registered_name"] if "registered_name" in config else []),
        HUGGING_FACE: [name for name in _HUGGING_FACE_FILES
                       if os.path.exists(os.path.join(path, name))]
        + ([f"{CONFIG_FILE} with model_type"] if "model_type" in config else []),
    }
    if marks[KERAS_HUB] and marks[HUGGING_FACE]:
        raise ValueError(
            f"{path} holds both a keras-hub preset ({', '.join(marks[KERAS_HUB])}) and a Hugging "
            f"Face checkpoint ({', '.join(marks[HUGGING_FACE])}). Say which to read: "
            "`gpt-keras convert --from keras-hub` or `--from huggingface`."
        )
    return KERAS_HUB if marks[KERAS_HUB] else HUGGING_FACE


def load_keras_hub_gpt2(path):
    """`(model, tokenizer)` of a keras-hub GPT-2 at `path` (a preset directory or a `.keras` file).

    `model` is a built float32 `gpt_keras.GPT` with `position_embedding="learned"` whose logits
    equal keras-hub's (`GPT2CausalLM`; a `GPT2Backbone`'s hidden states times the transposed
    token embedding); `vocab_size`, `context_length`, `num_layers`, `num_heads`, `hidden_dim`,
    `mlp_dim`, `dropout` and `layer_norm_epsilon` come from the backbone (`vocabulary_size`,
    `max_sequence_length`, ..., `intermediate_dim`). bfloat16/float16 weights are widened.
    `tokenizer` is gpt_keras' `GPT2Tokenizer` with the keras-hub tokenizer's vocabulary and
    merges (the same ids as keras-hub's `tf.data` path, see README "From keras-hub"), or None
    when the source has none (a `GPT2Backbone` saves no tokenizer).

    Raises `ValueError` naming the file for anything else: another keras-hub model or task, a
    missing or unreadable config, weights keras-hub cannot load (wrong shapes, a truncated file),
    variables a GPT-2 does not have (a quantized backbone), non-finite weights, a tokenizer
    gpt_keras' cannot reproduce (`add_prefix_space`, other unsplittable tokens), or keras-hub
    not installed.
    """
    if os.path.isdir(path):
        _check_class(_read_json(os.path.join(path, CONFIG_FILE)), ("GPT2Backbone",),
                     os.path.join(path, CONFIG_FILE))
        task_path = os.path.join(path, _TASK_FILE)
        if os.path.exists(task_path):
            _check_class(_read_json(task_path), ("GPT2CausalLM",), task_path)
        if os.path.exists(os.path.join(path, _TASK_WEIGHTS_FILE)):
            raise ValueError(f"{path} has {_TASK_WEIGHTS_FILE}: its task has weights of its own, "
                             f"which a GPT2CausalLM does not. gpt_keras converts {SUPPORTED}.")
        tokenizer_path = os.path.join(path, _TOKENIZER_FILE)
        has_tokenizer = os.path.exists(tokenizer_path)
        if has_tokenizer:
            _check_class(_read_json(tokenizer_path), ("GPT2Tokenizer",), tokenizer_path)
    else:
        _check_class(_read_keras_archive_config(path), ("GPT2Backbone", "GPT2CausalLM"), path)
    keras_hub = _import_keras_hub(path)
    try:  # keras-hub and Keras raise many types for a damaged preset: one message for all
        if os.path.isdir(path):
            backbone = keras_hub.models.GPT2Backbone.from_preset(path)
            source_tokenizer = (keras_hub.models.GPT2Tokenizer.from_preset(path)
                                if has_tokenizer else None)
        else:
            loaded = keras.saving.load_model(path, compile=False)  # no optimizer needed
            backbone = getattr(loaded, "backbone", loaded)
            preprocessor = getattr(loaded, "preprocessor", None)
            source_tokenizer = getattr(preprocessor, "tokenizer", None)
    except Exception as error:
        # Keras' first line may end in ":" with the cause on the next one.
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        reason = reason[:300] + ("..." if len(reason) > 300 else "")
        raise ValueError(
            f"keras-hub cannot load {path} ({type(error).__name__}: {reason}). The preset or file "
            "is damaged (e.g. weights whose shapes differ from its config.json) or was not "
            "written by save_to_preset / model.save."
        ) from None
    model = _gpt_from_backbone(backbone, path)
    tokenizer = None if source_tokenizer is None else _gpt2_tokenizer(source_tokenizer, path)
    return model, tokenizer


def _gpt_from_backbone(backbone, path):
    """A `GPT` with the weights of a keras-hub `GPT2Backbone`."""
    from gpt_keras.model import GPT

    config = GPTConfig(
        vocab_size=backbone.vocabulary_size,
        context_length=backbone.max_sequence_length,
        num_layers=backbone.num_layers,
        num_heads=backbone.num_heads,
        hidden_dim=backbone.hidden_dim,
        mlp_dim=backbone.intermediate_dim,
        dropout=float(backbone.dropout),
        position_embedding="learned",
        tie_embeddings=True,
        layer_norm_epsilon=float(backbone.layer_norm.epsilon),
    )
    tensors = _gpt2_tensors(backbone, config, path)
    model = GPT(**dataclasses.asdict(config))
    model.build()
    for name, variable in gpt2_variables(model).items():
        variable.assign(tensors[name])
    return model


def _gpt2_tensors(backbone, config, path):
    """`{Hugging Face GPT-2 name: float32 array}` of a `GPT2Backbone`'s variables (keyed by their
    Keras paths, e.g. `transformer_layer_0/self_attention/query/kernel`)."""
    stored = {variable.path: variable for variable in backbone.weights}
    d = config.hidden_dim

    def take(name, shape=None):
        if name not in stored:
            raise ValueError(f"{path}: the GPT2Backbone has no variable {name!r}. gpt_keras "
                             f"converts {SUPPORTED}.")
        value = np.asarray(keras.ops.convert_to_numpy(stored.pop(name)), np.float32)
        return value if shape is None else value.reshape(shape)

    tensors = {"wte.weight": take("token_embedding/embeddings"),
               "wpe.weight": take("position_embedding/embeddings")}
    for i in range(config.num_layers):
        layer, hf = f"transformer_layer_{i}", f"h.{i}"
        attention = f"{layer}/self_attention"
        # [D, H, K] (and bias [H, K]) each → [D, D]; fused as query | key | value → [D, 3D].
        tensors[f"{hf}.attn.c_attn.weight"] = np.concatenate(
            [take(f"{attention}/{part}/kernel", (d, d)) for part in ("query", "key", "value")], 1)
        tensors[f"{hf}.attn.c_attn.bias"] = np.concatenate(
            [take(f"{attention}/{part}/bias", (d,)) for part in ("query", "key", "value")])
        tensors[f"{hf}.attn.c_proj.weight"] = take(f"{attention}/attention_output/kernel", (d, d))
        tensors[f"{hf}.attn.c_proj.bias"] = take(f"{attention}/attention_output/bias")
        for hf_name, name in [("ln_1", "self_attention_layer_norm"),
                              ("ln_2", "feedforward_layer_norm")]:
            tensors[f"{hf}.{hf_name}.weight"] = take(f"{layer}/{name}/gamma")
            tensors[f"{hf}.{hf_name}.bias"] = take(f"{layer}/{name}/beta")
        for hf_name, name in [("mlp.c_fc", "feedforward_intermediate_dense"),
                              ("mlp.c_proj", "feedforward_output_dense")]:
            tensors[f"{hf}.{hf_name}.weight"] = take(f"{layer}/{name}/kernel")
            tensors[f"{hf}.{hf_name}.bias"] = take(f"{layer}/{name}/bias")
    tensors["ln_f.weight"] = take("layer_norm/gamma")
    tensors["ln_f.bias"] = take("layer_norm/beta")
    if stored:
        raise ValueError(
            f"{path}: the GPT2Backbone has variables a float GPT-2 does not have: "
            f"{', '.join(sorted(stored)[:5])}{' ...' if len(stored) > 5 else ''} (a quantized "
            "model?). Convert the float model it was made from."
        )
    for name, value in tensors.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: the weights of {name} (gpt_keras' Hugging Face name) hold "
                             "NaN or infinity: the model was saved after training diverged.")
    return tensors


def _gpt2_tokenizer(source, path):
    """gpt_keras' `GPT2Tokenizer` with the vocabulary and merges of keras-hub's `GPT2Tokenizer`
    `source`; `<|endoftext|>` in the text is the special token when keras-hub treats it so."""
    from gpt_keras.tokenizers import GPT2Tokenizer

    if type(source).__name__ != "GPT2Tokenizer":
        raise ValueError(f"{path}: the tokenizer is a {type(source).__name__}; gpt_keras converts "
                         "keras-hub's GPT2Tokenizer.")
    if source.add_prefix_space:
        raise ValueError(f"{path}: the tokenizer has add_prefix_space=True, which gpt_keras' "
                         "GPT2Tokenizer does not do (GPT-2 does not). Save it with "
                         "add_prefix_space=False or pass --vocab.")
    unsplittable = list(source.unsplittable_tokens or [])
    if unsplittable not in ([], [END_OF_TEXT]):
        raise ValueError(f"{path}: the tokenizer keeps {unsplittable!r} whole; gpt_keras' "
                         f"GPT2Tokenizer knows only {END_OF_TEXT!r} as a special token.")
    # keras-hub keeps the merges file's "#version" line in its list and skips it when merging.
    merges = [merge for merge in source.merges if "#version:" not in merge]
    try:
        return GPT2Tokenizer(dict(source.vocabulary), merges,
                             special_tokens_in_text=bool(unsplittable))
    except ValueError as error:
        raise ValueError(f"{path}: the tokenizer is not a GPT-2 byte-level BPE: {error}") from None


def _import_keras_hub(path):
    try:
        import keras_hub
    except ImportError:
        raise ValueError(f"{path} is a keras-hub model; reading it needs keras-hub: {INSTALL}."
                         ) from None
    return keras_hub


def _check_class(config, supported, path):
    """Raises `ValueError` unless the serialized Keras object `config` is of a class in
    `supported` (class names, as keras-hub registers them)."""
    name = config.get("class_name")
    if name not in supported:
        kind = f"a {name}" if isinstance(name, str) else "no keras-hub class (no class_name)"
        raise ValueError(f"{path} holds {kind}; gpt_keras converts {SUPPORTED}.")


def _read_json(path):
    """The JSON object in file `path`; `ValueError` if missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: save_to_preset writes it; the preset is "
                         "incomplete.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a JSON object: it is not a keras-hub config.")
    return value


def _json_object_or_empty(path):
    """The JSON object in `path`, or `{}` when it is missing or not a readable object."""
    try:
        return _read_json(path)
    except ValueError:
        return {}


def _read_keras_archive_config(path):
    """The model config (`config.json`) inside the `.keras` archive `path`."""
    try:
        with zipfile.ZipFile(path) as archive:
            value = json.loads(archive.read(CONFIG_FILE).decode("utf-8"))
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError,
            json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable .keras archive ({error}); save the keras-hub "
                         "model with model.save('model.keras').") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: its {CONFIG_FILE} is not a JSON object.")
    return value
