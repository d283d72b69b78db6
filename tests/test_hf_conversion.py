"""Tests for `gpt_keras.hf`: Hugging Face GPT-2 checkpoints in and out, checked against a randomly
initialised `transformers.GPT2LMHeadModel` built here (nothing is downloaded)."""

import json
import os
import sys

import numpy as np
import pytest

from gpt_keras import GPT
from gpt_keras.hf import load_gpt2, read_safetensors, save_gpt2, write_safetensors
from tests.numpy_reference import randomize_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100)
TOKENS = np.random.default_rng(0).integers(0, 100, (3, 16))


def random_hf_model(seed=0, **overrides):
    """A GPT2LMHeadModel with weights large enough (std 0.3, LayerNorm gains around 1) that logits
    are far from uniform and greedy decoding has no near-ties."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **{**CONFIG, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 0.3)
            if ".ln_" in name and name.endswith("weight"):
                parameter.add_(1.0)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def hf_greedy(model, prompt, steps):
    """Greedy decoding in PyTorch by re-running the whole context (no cache)."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(hf_logits(model, [tokens])[0, -1].argmax()))
    return tokens[len(prompt):]


def keras_greedy(model, prompt, steps):
    """Greedy decoding with `GPT.call_with_cache`: prefill, then one token per step."""
    cache = model.init_cache(1)
    logits, cache = model.call_with_cache(np.array([prompt]), cache, 0)
    generated = []
    for step in range(steps):
        generated.append(int(np.argmax(logits[0, -1])))
        logits, cache = model.call_with_cache(
            np.array([[generated[-1]]]), cache, len(prompt) + step
        )
    return generated


def assert_parity(hf_model, model):
    np.testing.assert_allclose(np.asarray(model(TOKENS)), hf_logits(hf_model, TOKENS), atol=1e-4)
    prompt = TOKENS[0, :8].tolist()
    assert keras_greedy(model, prompt, 20) == hf_greedy(hf_model, prompt, 20)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(directory)
    assert (directory / "model.safetensors").exists()
    return directory


def rewrite(hf_dir, tmp_path, config_changes=None, tensors_change=None):
    """A copy of `hf_dir` in `tmp_path` with config keys changed and tensors edited."""
    with open(hf_dir / "config.json") as f:
        config = json.load(f)
    config.update(config_changes or {})
    tensors = {name: np.array(value) for name, value in
               read_safetensors(hf_dir / "model.safetensors").items()}
    if tensors_change:
        tensors_change(tensors)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    return tmp_path


# --- import ----------------------------------------------------------------------------------


def test_import_safetensors_matches_hf(hf_model, hf_dir):
    model = load_gpt2(hf_dir)
    config = model.config
    assert (config.position_embedding, config.tie_embeddings) == ("learned", True)
    assert (config.vocab_size, config.context_length, config.num_layers) == (100, 32, 2)
    assert (config.num_heads, config.hidden_dim, config.mlp_dim) == (2, 32, None)
    assert (config.dropout, config.layer_norm_epsilon) == (0.1, 1e-5)
    assert_parity(hf_model, model)


def test_import_safetensors_needs_no_torch(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    model = load_gpt2(hf_dir)
    assert model.config.vocab_size == 100
    torch_only = tmp_path / "bin"
    torch_only.mkdir()
    (torch_only / "config.json").write_text((hf_dir / "config.json").read_text())
    (torch_only / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="PyTorch pickle, which needs torch"):
        load_gpt2(torch_only)


def test_import_pytorch_bin_prefixed_and_legacy_names(hf_model, hf_dir, tmp_path):
    state = hf_model.state_dict()
    # GPT2LMHeadModel names ("transformer.h.0...", lm_head.weight tied to wte).
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(state, tmp_path / "new" / "pytorch_model.bin")
    assert_parity(hf_model, load_gpt2(tmp_path / "new"))
    # OpenAI-era checkpoints: no prefix, causal-mask buffers stored.
    legacy = {
        name.removeprefix("transformer."): tensor
        for name, tensor in state.items() if name != "lm_head.weight"
    }
    for i in range(CONFIG["n_layer"]):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(legacy, tmp_path / "legacy" / "pytorch_model.bin")
    assert_parity(hf_model, load_gpt2(tmp_path / "legacy"))


def test_import_reads_mlp_size_epsilon_and_dropout(tmp_path):
    hf_model = random_hf_model(
        seed=1, n_inner=48, layer_norm_epsilon=1e-3, resid_pdrop=0.0,
        activation_function="gelu_pytorch_tanh",
    )
    hf_model.save_pretrained(tmp_path)
    model = load_gpt2(tmp_path, name="imported")
    config = model.config
    assert (config.mlp_dim, config.layer_norm_epsilon, config.dropout) == (48, 1e-3, 0.0)
    assert model.name == "imported"
    assert_parity(hf_model, model)


def test_import_sharded_safetensors(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_parity(hf_model, load_gpt2(tmp_path))


# The config.json files of OpenAI's four GPT-2 checkpoints as Hugging Face publishes them, and
# their parameter counts (`GPT2LMHeadModel.num_parameters()`, tied head counted once).
_HUB_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}
GPT2_SIZES = {
    "gpt2": (dict(n_embd=768, n_head=12, n_layer=12), 124_439_808),
    "gpt2-medium": (dict(n_embd=1024, n_head=16, n_layer=24, n_special=0,
                         predict_special_tokens=True), 354_823_168),
    "gpt2-large": (dict(n_embd=1280, n_head=20, n_layer=36), 774_030_080),
    "gpt2-xl": (dict(n_embd=1600, n_head=25, n_layer=48, output_past=True), 1_557_611_200),
}


@pytest.mark.parametrize("size", sorted(GPT2_SIZES))
def test_every_gpt2_size_maps_to_a_gpt_config(size):
    from gpt_keras import num_parameters
    from gpt_keras.hf import _expected_shapes, config_from_hf

    sizes, parameters = GPT2_SIZES[size]
    config = config_from_hf({**_HUB_CONFIG, **sizes})
    assert (config.hidden_dim, config.num_heads, config.num_layers) == (
        sizes["n_embd"], sizes["n_head"], sizes["n_layer"]
    )
    assert (config.vocab_size, config.context_length, config.mlp_dim) == (50257, 1024, None)
    assert num_parameters(config) == parameters
    assert sum(np.prod(shape) for shape in _expected_shapes(config).values()) == parameters


def test_read_safetensors_half_precision(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    values = torch.randn(3, 5)
    safetensors_torch.save_file(
        {"bf16": values.to(torch.bfloat16), "f16": values.to(torch.float16),
         "i64": torch.arange(4)},
        str(tmp_path / "half.safetensors"),
    )
    tensors = read_safetensors(tmp_path / "half.safetensors")
    np.testing.assert_array_equal(tensors["bf16"], values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(tensors["f16"], values.to(torch.float16).numpy())
    assert tensors["i64"].tolist() == [0, 1, 2, 3]


# --- export ----------------------------------------------------------------------------------


def test_export_round_trip(hf_model, hf_dir, tmp_path):
    model = load_gpt2(hf_dir)
    directory = tmp_path / "exported"
    assert save_gpt2(model, directory) == str(directory)
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["exported"]  # no temporary directory left behind
    exported = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    np.testing.assert_allclose(hf_logits(exported, TOKENS), np.asarray(model(TOKENS)), atol=1e-4)
    prompt = TOKENS[1, :8].tolist()
    assert hf_greedy(exported, prompt, 20) == keras_greedy(model, prompt, 20)
    # Every weight survives the trip exactly.
    for name, value in hf_model.state_dict().items():
        np.testing.assert_array_equal(exported.state_dict()[name].numpy(), value.numpy())


def test_export_of_a_trained_gpt_keras_model(tmp_path):
    model = GPT(vocab_size=50, context_length=16, num_layers=1, num_heads=2, hidden_dim=16,
                mlp_dim=24, position_embedding="learned", layer_norm_epsilon=1e-6)
    model.build()
    randomize_weights(model, seed=3)
    save_gpt2(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_inner"], config["layer_norm_epsilon"], config["eos_token_id"]) == (
        24, 1e-6, None
    )
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = TOKENS[:, :16] % 50
    np.testing.assert_allclose(hf_logits(exported, tokens), np.asarray(model(tokens)), atol=1e-4)


def test_export_refuses_other_architectures_and_existing_directories(hf_dir, tmp_path):
    for kwargs in ({"position_embedding": "sinusoidal"},
                   {"position_embedding": "learned", "tie_embeddings": False}):
        model = GPT(vocab_size=10, context_length=8, num_layers=1, num_heads=1, hidden_dim=4,
                    **kwargs)
        with pytest.raises(ValueError, match="Only GPT-2-architecture models"):
            save_gpt2(model, tmp_path / "never")
    unbuilt = GPT(vocab_size=10, context_length=8, num_layers=1, num_heads=1, hidden_dim=4,
                  position_embedding="learned")
    with pytest.raises(ValueError, match="not built, so it has no weights"):
        save_gpt2(unbuilt, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    model = load_gpt2(hf_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty.*overwrite=True"):
        save_gpt2(model, tmp_path / "busy")
    save_gpt2(model, tmp_path / "busy", overwrite=True)
    assert sorted(os.listdir(tmp_path / "busy")) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["busy"]


# --- errors ----------------------------------------------------------------------------------


def test_missing_tensor(hf_dir, tmp_path):
    broken = rewrite(hf_dir, tmp_path,
                     tensors_change=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias' "
                                         r"\(expected shape \(128,\)\)"):
        load_gpt2(broken)


def test_wrong_shape(hf_dir, tmp_path):
    def shrink(tensors):
        tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((32, 64), np.float32)

    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape "
                                         r"\(32, 64\); expected \(32, 96\)"):
        load_gpt2(rewrite(hf_dir, tmp_path, tensors_change=shrink))


def test_config_disagreeing_with_weights(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'transformer\.wte\.weight' has shape \(100, 32\); "
                                         r"expected \(200, 32\)"):
        load_gpt2(rewrite(hf_dir, tmp_path, {"vocab_size": 200}))


def test_unexpected_and_untied_tensors(hf_dir, tmp_path):
    def extra(tensors):
        tensors["multiple_choice_head.summary.weight"] = np.zeros((1, 32), np.float32)

    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="does not have: 'multiple_choice_head.summary.weight'"):
        load_gpt2(rewrite(hf_dir, tmp_path / "a", tensors_change=extra))

    def untied(tensors):
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0

    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_gpt2(rewrite(hf_dir, tmp_path / "b", tensors_change=untied))


@pytest.mark.parametrize("key, value, message", [
    ("activation_function", "gelu", "activation_function='gelu'; gpt_keras.GPT implements only "
                                    "activation_function='gelu_new' or 'gelu_pytorch_tanh'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
    ("add_cross_attention", True, "add_cross_attention=True"),
    ("scale_attn_weights", False, "scale_attn_weights=False"),
    ("tie_word_embeddings", False, "tie_word_embeddings=False"),
    ("rotary_dim", 64, "Unknown GPT-2 config key 'rotary_dim'"),
])
def test_unsupported_config(hf_dir, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_gpt2(rewrite(hf_dir, tmp_path, {key: value}))


def test_harmless_config_keys_are_accepted(hf_model, hf_dir, tmp_path):
    extra = {"reorder_and_upcast_attn": True, "n_ctx": 32, "_name_or_path": "x",
             "task_specific_params": {"text-generation": {"max_length": 50}}}
    assert_parity(hf_model, load_gpt2(rewrite(hf_dir, tmp_path, extra)))


def test_missing_files(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_gpt2(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="No config.json in"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="No weights in .*expected model.safetensors"):
        load_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(
        (hf_dir / "model.safetensors").read_bytes()[:-100]
    )
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gpt2(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    del config["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config lacks 'n_embd'"):
        load_gpt2(tmp_path)


# --- malformed checkpoints: one ValueError each, naming the file or field --------------------


def _config(**changes):
    def change(directory):
        with open(directory / "config.json") as f:
            config = json.load(f)
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            else:
                config[key] = value
        (directory / "config.json").write_text(json.dumps(config))
    return change


def _raw(name, content):
    def change(directory):
        (directory / name).write_bytes(content)
    return change


def _tensors(edit):
    def change(directory):
        tensors = {name: np.array(value) for name, value in
                   read_safetensors(directory / "model.safetensors").items()}
        edit(tensors)
        write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    return change


def _header(edit):
    """Rewrites the safetensors header with `edit(header)` (the data bytes stay)."""
    def change(directory):
        data = (directory / "model.safetensors").read_bytes()
        (size,) = np.frombuffer(data[:8], "<u8")
        header = json.loads(data[8:8 + int(size)])
        header = edit(header) or header
        encoded = json.dumps(header).encode()
        (directory / "model.safetensors").write_bytes(
            np.uint64(len(encoded)).tobytes() + encoded + data[8 + int(size):])
    return change


def _entry(name, **fields):
    return _header(lambda header: header[name].update(fields))


def _sharded(index):
    """Replaces model.safetensors by one shard `shard-1.safetensors` and the index `index`
    (a JSON value, or bytes written as they are)."""
    def change(directory):
        os.rename(directory / "model.safetensors", directory / "shard-1.safetensors")
        text = index if isinstance(index, bytes) else json.dumps(index).encode()
        (directory / "model.safetensors.index.json").write_bytes(text)
    return change


def _torch_file(state=None, truncate=None):
    """Replaces model.safetensors by pytorch_model.bin holding `state` (default: the weights),
    cut to `truncate` bytes if given."""
    def change(directory):
        tensors = read_safetensors(directory / "model.safetensors")
        os.unlink(directory / "model.safetensors")
        value = state if state is not None else {
            name: torch.tensor(np.array(v)) for name, v in tensors.items()}
        torch.save(value, directory / "pytorch_model.bin")
        if truncate is not None:
            data = (directory / "pytorch_model.bin").read_bytes()
            (directory / "pytorch_model.bin").write_bytes(data[:truncate])
    return change


def _set(name, value):
    return _tensors(lambda tensors: tensors.__setitem__(name, value))


_DELETE = object()
WTE = "transformer.wte.weight"
MALFORMED = {
    # config.json
    "config-list": (_raw("config.json", b"[1, 2]"), r"config.json: A GPT-2 config must be a "
                                                    r"JSON object\. Received: list"),
    "config-string": (_raw("config.json", b'"gpt2"'), "must be a JSON object"),
    "config-not-json": (_raw("config.json", b"{n_layer: 2"), "Cannot read .*config.json"),
    "config-not-utf8": (_raw("config.json", b"\xff\xfe{}"), "Cannot read .*config.json"),
    "config-directory": (lambda d: (os.unlink(d / "config.json"), os.mkdir(d / "config.json")),
                         "Cannot read .*config.json"),
    "missing-n_embd": (_config(n_embd=_DELETE), "config.json: The GPT-2 config lacks 'n_embd'"),
    "n_embd-string": (_config(n_embd="32"), "n_embd must be a positive integer. Received: '32'"),
    "n_layer-float": (_config(n_layer=2.0), "n_layer must be a positive integer"),
    "n_layer-bool": (_config(n_layer=True), "n_layer must be a positive integer"),
    "n_head-zero": (_config(n_head=0), "n_head must be a positive integer"),
    "n_head-not-dividing": (_config(n_head=3), "n_head=3 does not divide n_embd=32"),
    "n_inner-string": (_config(n_inner="abc"), "n_inner must be a positive integer or null"),
    "n_inner-list": (_config(n_inner=[1]), "n_inner must be a positive integer or null"),
    "epsilon-string": (_config(layer_norm_epsilon="x"),
                       "layer_norm_epsilon must be a positive number"),
    "epsilon-list": (_config(layer_norm_epsilon=[1e-5]),
                     "layer_norm_epsilon must be a positive number"),
    "dropout-null": (_config(resid_pdrop=None), r"resid_pdrop must be a number in \[0, 1\)"),
    "dropout-one": (_config(resid_pdrop=1.0), r"resid_pdrop must be a number in \[0, 1\)"),
    "activation-list": (_config(activation_function=["gelu_new"]),
                        "activation_function=\\['gelu_new'\\]"),
    "n_layer-huge": (_config(n_layer=1_000_000), r"config.json: n_layer=1000000 needs 12000004 "
                                                 r"tensors; .*model.safetensors holds 28"),
    "n_embd-huge": (_config(n_embd=2**40, n_head=1), r"has shape \(96,\); expected "
                                                   r"\(3298534883328,\)"),
    "vocab-huge": (_config(vocab_size=10**12), r"expected \(1000000000000, 32\)"),
    "n_positions-huge": (_config(n_positions=10**12), r"expected \(1000000000000, 32\)"),
    "too-few-tensors": (_config(n_layer=40, n_embd=8, n_head=2),
                        "n_layer=40 needs 484 tensors; .* holds 28"),
    # sharded index
    "index-not-json": (_sharded(b"{weight_map"), "Cannot read .*index.json"),
    "index-list": (_sharded([]), r"index.json must be a JSON object with a \"weight_map\""),
    "index-no-weight_map": (_sharded({"metadata": {}}),
                            r"index.json must be a JSON object with a \"weight_map\""),
    "weight_map-list": (_sharded({"weight_map": ["shard-1.safetensors"]}),
                        r"index.json must be a JSON object with a \"weight_map\""),
    "weight_map-int": (_sharded({"weight_map": {WTE: 3}}),
                       "weight_map maps .*wte.weight' to 3, not to a file name"),
    "weight_map-escape": (_sharded({"weight_map": {WTE: "../shard-1.safetensors"}}),
                          "not to a file name in the directory"),
    "shard-missing": (_sharded({"weight_map": {WTE: "shard-2.safetensors"}}),
                      "names shard-2.safetensors, which is missing"),
    "shard-lacks-tensor": (_sharded({"weight_map": {"transformer.x": "shard-1.safetensors"}}),
                           "puts 'transformer.x' in shard-1.safetensors, which lacks it"),
    # safetensors
    "safetensors-short": (_raw("model.safetensors", b"\x01\x02"), "shorter than 8 bytes"),
    "safetensors-truncated": (
        lambda d: _raw("model.safetensors", (d / "model.safetensors").read_bytes()[:-100])(d),
        "truncated or corrupt"),
    "safetensors-header-list": (_header(lambda header: [1]),
                                "header is not a JSON object"),
    "safetensors-directory": (lambda d: (os.unlink(d / "model.safetensors"),
                                         os.mkdir(d / "model.safetensors")),
                              "model.safetensors is not a file"),
    "entry-not-dict": (_header(lambda header: header.__setitem__(WTE, 3)),
                       "malformed header entry for tensor 'transformer.wte.weight'"),
    "dtype-list": (_entry(WTE, dtype=["F32"]), "malformed header entry"),
    "shape-negative": (_entry(WTE, shape=[-100, -32]), "malformed header entry"),
    "shape-strings": (_entry(WTE, shape=["a"]), "malformed header entry"),
    "offsets-floats": (_entry(WTE, data_offsets=[0.5, 1]), "malformed header entry"),
    "offsets-three": (_entry(WTE, data_offsets=[0, 1, 2]), "malformed header entry"),
    # tensors
    "wrong-shape": (_set("transformer.h.0.attn.c_attn.weight", np.zeros((32, 64), np.float32)),
                    r"has shape \(32, 64\); expected \(32, 96\)"),
    "integer-weights": (_set(WTE, np.zeros((100, 32), np.int32)),
                        "'transformer.wte.weight' has dtype int32; GPT-2 weights are floats"),
    "nan-weight": (_tensors(lambda t: t["transformer.h.1.ln_2.bias"].__setitem__(3, np.nan)),
                   "'transformer.h.1.ln_2.bias' holds 1 non-finite value"),
    "inf-weights": (_tensors(lambda t: t[WTE].fill(np.inf)),
                    "'transformer.wte.weight' holds 3200 non-finite values"),
    "duplicate-names": (_tensors(lambda t: t.__setitem__("wte.weight", t[WTE])),
                        "holds both 'transformer.wte.weight' and 'wte.weight'"),
    # pytorch_model.bin
    "torch-truncated": (_torch_file(truncate=1000), "pytorch_model.bin cannot be read"),
    "torch-garbage": (lambda d: (os.unlink(d / "model.safetensors"),
                                 _raw("pytorch_model.bin", b"not a pickle")(d)),
                      "pytorch_model.bin cannot be read"),
    "torch-list": (_torch_file(state=[torch.zeros(2)]),
                   "pytorch_model.bin holds a list, not a dict of tensors"),
    "torch-non-tensor": (_torch_file(state={WTE: 3}),
                         "pytorch_model.bin: 'transformer.wte.weight' is a int, not a tensor"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_is_one_value_error(hf_dir, tmp_path, case):
    """Every malformed directory gives a `ValueError` (the CLI prints it as one line) naming the
    file or field, raised before the model is built (the sizes are bounded by the files)."""
    change, message = MALFORMED[case]
    directory = tmp_path / "hf"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((hf_dir / name).read_bytes())
    change(directory)
    with pytest.raises(ValueError, match=message):
        load_gpt2(directory)
