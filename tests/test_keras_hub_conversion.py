"""keras-hub GPT-2 → gpt_keras (`gpt_keras.keras_hub_import`, `gpt-keras convert`), with keras-hub
as the oracle: its forward pass (logits), its `GPT2Tokenizer` (ids) and its greedy `generate`.

One small random `GPT2CausalLM` (2 layers, 2 heads, 32 dims, GPT-2's vocabulary) is saved the four
ways keras-hub saves it: `save_to_preset` of the backbone and of the task, and `.keras` files of
both. Nothing is downloaded.
"""

import json
import os
import shutil
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from gpt_keras import GPT, GPTConfig
from gpt_keras.cli import main
from gpt_keras.keras_hub_import import INSTALL, load_keras_hub_gpt2, source_format
from gpt_keras.tokenizers import GPT2Tokenizer
from gpt_keras.training import load_model, read_run_config
from tests.conftest import GPT2_VOCAB
from tests.numpy_reference import randomize_weights

keras_hub = pytest.importorskip("keras_hub")

ENCODER = os.path.join(GPT2_VOCAB, "encoder.json")
MERGES = os.path.join(GPT2_VOCAB, "vocab.bpe")
CONTEXT = 24
CONFIG = GPTConfig(vocab_size=50257, context_length=CONTEXT, num_layers=2, num_heads=2,
                   hidden_dim=32, mlp_dim=48, dropout=0.1, position_embedding="learned",
                   tie_embeddings=True, layer_norm_epsilon=1e-5)
# The bound. On logits of magnitude ~10 the two float32 forward passes agreed exactly on
# the 2-core AVX2 CPU; the bound leaves room for other kernels' rounding (~1e-6 relative).
LOGITS_TOLERANCE = 1e-4
SOURCES = ["backbone preset", "causal_lm preset", "backbone .keras", "causal_lm .keras"]
TEXTS = [
    "Hello world", "To be, or not to be, that is the question:", "  leading spaces",
    "trailing   ", "a  b   c\n\n\nd\t\te", "ab\r\n\r\ncd", "x\n  y", "",
    " ", "\n", "I'm you're it's we'll they've I'd HELLO'S", "don't DON'T",
    "héllo wörld 中文 日本語 🙂👍🏽", "Ünïcödé",
    "year 2018 and 1234567, 3.14 $$$ !!!",
    "<|endoftext|>", "before<|endoftext|>after", "x <|endoftext|> y",
    "<|endoftext|><|endoftext|>", "...!! a, b; c",
    # keras-hub's eager (Python) path splits these two unlike GPT-2 (" ", "'t", "is" and
    # "a", " \xa0", "b"); its tf.data path, gpt_keras and Hugging Face agree (README).
    " 'tis", "a \u00a0b",
]
KERAS_HUB_EAGER_DIFFERS = {" 'tis", "a \u00a0b"}


def keras_hub_logits(causal_lm, ids):
    """keras-hub's logits `[B, T, V]` of int ids `[B, T]` (no padding)."""
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return np.asarray(causal_lm(inputs))


def new_backbone(**overrides):
    sizes = dict(vocabulary_size=CONFIG.vocab_size, num_layers=CONFIG.num_layers,
                 num_heads=CONFIG.num_heads, hidden_dim=CONFIG.hidden_dim,
                 intermediate_dim=CONFIG.mlp_dim, max_sequence_length=CONTEXT)
    return keras_hub.models.GPT2Backbone(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`(causal_lm, {source name: path})`: a random keras-hub GPT-2 and its four saved forms."""
    keras.utils.set_random_seed(0)
    backbone = new_backbone()
    randomize_weights(backbone, seed=0, scale=0.3)  # logits of order 10, greedy text varies
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=ENCODER, merges=MERGES)
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=CONTEXT)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    root = tmp_path_factory.mktemp("keras_hub")
    paths = {name: str(root / name.replace(" ", "")) for name in SOURCES}
    backbone.save_to_preset(paths["backbone preset"])
    causal_lm.save_to_preset(paths["causal_lm preset"])
    backbone.save(paths["backbone .keras"])
    causal_lm.save(paths["causal_lm .keras"])
    return causal_lm, paths


@pytest.fixture(scope="module")
def converted(saved):
    """`{source name: (GPT, GPT2Tokenizer or None)}`."""
    return {name: load_keras_hub_gpt2(path) for name, path in saved[1].items()}


@pytest.mark.parametrize("source", SOURCES)
def test_logits_equal_keras_hub(saved, converted, source):
    causal_lm, paths = saved
    model, tokenizer = converted[source]
    assert source_format(paths[source]) == "keras-hub"
    assert model.config == CONFIG
    assert (tokenizer is None) == source.startswith("backbone")  # a backbone saves no tokenizer
    rng = np.random.default_rng(1)
    for shape in [(3, CONTEXT), (1, 5)]:
        ids = rng.integers(0, CONFIG.vocab_size, shape).astype("int32")
        expected = keras_hub_logits(causal_lm, ids)
        assert np.abs(expected).max() > 5  # not the near-zero logits of GPT-2's initialisation
        np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=LOGITS_TOLERANCE,
                                   rtol=0)


def test_lora_fine_tuned_preset_converts_with_the_adapters_merged(tmp_path):
    """keras-hub's GPT-2 fine-tuning recipe uses LoRA: Keras merges the adapters into the kernels
    when saving, so the converted model computes the adapted model's logits."""
    keras.utils.set_random_seed(2)
    backbone = new_backbone()
    randomize_weights(backbone, seed=2, scale=0.3)
    backbone.enable_lora(4)
    lora = [variable for variable in backbone.weights if "lora_kernel" in variable.path]
    assert len(lora) == 8  # a and b of the query and value kernels of 2 layers
    for index, variable in enumerate(lora):  # lora_kernel_b starts at zero: make it matter
        variable.assign(np.random.default_rng(index).normal(0, 0.3, variable.shape))
    backbone.save_to_preset(str(tmp_path / "lora"))
    model, _ = load_keras_hub_gpt2(str(tmp_path / "lora"))
    ids = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (2, 10)).astype("int32")
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    expected = np.asarray(backbone.token_embedding(hidden, reverse=True))
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=LOGITS_TOLERANCE, rtol=0)


def test_tokenizer_ids_equal_keras_hub(saved, converted):
    """Identical ids to keras-hub's `GPT2Tokenizer` on its `tf.data` path (how `fit` and
    keras-hub's own graphs tokenize) for every text, and on its eager path except where that
    path departs from GPT-2's split; identical text back from the ids."""
    causal_lm, _ = saved
    source = causal_lm.preprocessor.tokenizer
    in_graph = [row.numpy().tolist()
                for row in tf.data.Dataset.from_tensor_slices(TEXTS).map(source)]
    for name in ("causal_lm preset", "causal_lm .keras"):
        tokenizer = converted[name][1]
        assert isinstance(tokenizer, GPT2Tokenizer) and tokenizer.special_tokens_in_text
        assert tokenizer.vocabulary == dict(source.vocabulary)
        assert tokenizer.tokenize(TEXTS).to_list() == in_graph
    tokenizer = converted["causal_lm preset"][1]
    for text, ids in zip(TEXTS, in_graph):
        if text not in KERAS_HUB_EAGER_DIFFERS:
            assert np.asarray(source(text)).tolist() == ids, text
        assert tokenizer.detokenize(np.array(ids, np.int32)).numpy().decode() == text
        assert source.detokenize(ids) == text
    assert in_graph[TEXTS.index("before<|endoftext|>after")][1] == 50256


@pytest.mark.slow  # the export's checks in a fresh process: ~35 s of CPU
def test_converted_run_is_served_like_keras_hub(saved, tmp_path, capsys):
    """`gpt-keras convert FILE.keras RUN` then `gpt-keras export RUN`: the SavedModel's `logits`
    equal keras-hub's, and its greedy `generate` writes keras-hub's greedy text."""
    causal_lm, paths = saved
    run_dir, base = str(tmp_path / "run"), str(tmp_path / "models" / "gpt2")
    main(["convert", paths["causal_lm .keras"], run_dir])
    assert read_run_config(run_dir)["source"] == {
        "keras_hub": os.path.abspath(paths["causal_lm .keras"])}
    main(["export", run_dir, "--out", base])
    assert "verified as TF Serving loads it" in capsys.readouterr().out
    signatures = tf.saved_model.load(os.path.join(base, "1")).signatures

    ids = np.random.default_rng(4).integers(0, CONFIG.vocab_size, (2, CONTEXT)).astype("int32")
    served = signatures["logits"](token_ids=tf.constant(ids))["logits"].numpy()
    np.testing.assert_allclose(served, keras_hub_logits(causal_lm, ids), atol=LOGITS_TOLERANCE,
                               rtol=0)

    prompt = "To be, or not"
    causal_lm.compile(sampler="greedy")
    # keras-hub starts the prompt with <|endoftext|> and fills its sequence_length in total.
    expected = causal_lm.generate(prompt, max_length=CONTEXT)
    prompt_ids = [50256] + GPT2Tokenizer(ENCODER, MERGES).tokenize(prompt).numpy().tolist()
    served = signatures["generate"](
        prompts=tf.constant(["<|endoftext|>" + prompt]),
        max_new_tokens=tf.constant(CONTEXT - len(prompt_ids)), temperature=tf.constant(0.0),
        top_k=tf.constant(0), top_p=tf.constant(1.0), seed=tf.constant(0, tf.int64),
        repetition_penalty=tf.constant(1.0), min_new_tokens=tf.constant(0),
        banned_token_ids=tf.zeros([0], tf.int32), bias_token_ids=tf.zeros([0], tf.int32),
        bias_values=tf.zeros([0], tf.float32), stop_strings=tf.zeros([0], tf.string),
    )
    completion = served["completions"].numpy()[0].decode("utf-8")
    assert len(completion) > 10  # a continuation, not an immediate end of text
    assert prompt + completion == expected


def test_backbone_preset_needs_vocab_files(saved, tmp_path, capsys):
    """A `GPT2Backbone` preset has no tokenizer: `convert` asks for `--vocab`, then uses it."""
    causal_lm, paths = saved
    run_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", paths["backbone preset"], run_dir])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "holds no tokenizer (a GPT2Backbone saves none): pass --vocab DIR" in error
    assert not os.path.exists(run_dir)
    main(["convert", paths["backbone preset"], run_dir, "--vocab", GPT2_VOCAB])
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, (1, 7)).astype("int32")
    np.testing.assert_allclose(np.asarray(load_model(run_dir)(ids)),
                               keras_hub_logits(causal_lm, ids), atol=LOGITS_TOLERANCE, rtol=0)


# -- Errors -------------------------------------------------------------------------------------


def _edit_json(name, edit):
    def change(directory):
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        edit(value)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f)
    return change


def _set(section, **values):
    return lambda value: value[section].update(values)


def _write(name, content):
    def change(directory):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)
    return change


def _truncate(directory):
    path = os.path.join(directory, "model.weights.h5")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# name: (the causal_lm preset's change, the error's text)
MALFORMED = {
    "config.json missing": (lambda d: os.remove(os.path.join(d, "config.json")),
                            r"config.json is missing: save_to_preset writes it"),
    "config.json garbled": (_write("config.json", b'{"class_name": "GPT2Back'),
                            r"Cannot read .*config.json: "),
    "weights of another shape": (_edit_json("config.json", _set("config", hidden_dim=48)),
                                 r"keras-hub cannot load .*could not be loaded.*shapes differ"),
    "config lacks a size": (_edit_json("config.json", lambda v: v["config"].pop("num_heads")),
                            r"keras-hub cannot load .*TypeError"),
    "weights truncated": (_truncate, r"keras-hub cannot load .*OSError.*truncated"),
    "task of another class": (_edit_json("task.json",
                                         lambda v: v.update(class_name="GPT2Classifier")),
                              r"task.json holds a GPT2Classifier; gpt_keras converts a keras-hub "
                              r"GPT2Backbone or GPT2CausalLM"),
    "task weights": (_write("task.weights.h5", b""),
                     r"has task.weights.h5: its task has weights of its own"),
    "prefix space": (_edit_json("tokenizer.json", _set("config", add_prefix_space=True)),
                     r"add_prefix_space=True, which gpt_keras' GPT2Tokenizer does not do"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_preset_is_one_clear_error(saved, tmp_path, case):
    change, message = MALFORMED[case]
    directory = str(tmp_path / "preset")
    shutil.copytree(saved[1]["causal_lm preset"], directory)
    change(directory)
    with pytest.raises(ValueError, match=message):
        load_keras_hub_gpt2(directory)


def test_other_models_are_refused_naming_what_is_supported(tmp_path):
    supported = "gpt_keras converts a keras-hub GPT2Backbone or GPT2CausalLM"
    keras_hub.models.GPTNeoXBackbone(vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                     intermediate_dim=16, max_sequence_length=8,
                                     ).save_to_preset(str(tmp_path / "neox"))
    with pytest.raises(ValueError, match=f"config.json holds a GPTNeoXBackbone; {supported}"):
        load_keras_hub_gpt2(str(tmp_path / "neox"))
    gpt = GPT(**vars(GPTConfig.from_preset("tiny")))
    gpt.build()
    gpt.save(str(tmp_path / "gpt.keras"))
    with pytest.raises(ValueError, match=f"gpt.keras holds a GPT; {supported}"):
        load_keras_hub_gpt2(str(tmp_path / "gpt.keras"))
    (tmp_path / "text.keras").write_text("not a zip archive")
    with pytest.raises(ValueError, match="text.keras is not a readable .keras archive"):
        load_keras_hub_gpt2(str(tmp_path / "text.keras"))


def test_quantized_and_diverged_models_are_refused(tmp_path):
    quantized = new_backbone(vocabulary_size=64)  # the vocabulary does not matter here
    quantized.quantize("int8")
    quantized.save(str(tmp_path / "int8.keras"))
    with pytest.raises(ValueError, match="variables a float GPT-2 does not have: "
                       r"token_embedding/embeddings_scale.* Convert the float model"):
        load_keras_hub_gpt2(str(tmp_path / "int8.keras"))
    diverged = new_backbone(vocabulary_size=64)
    diverged.layer_norm.gamma.assign(np.full(CONFIG.hidden_dim, np.nan, np.float32))
    diverged.save_to_preset(str(tmp_path / "nan"))
    with pytest.raises(ValueError, match=r"ln_f.weight .* hold NaN or infinity"):
        load_keras_hub_gpt2(str(tmp_path / "nan"))


def test_half_precision_weights_are_widened(tmp_path):
    """A backbone kept in bfloat16 converts to float32 variables holding the same values."""
    backbone = new_backbone(vocabulary_size=64, dtype="bfloat16")
    randomize_weights(backbone, seed=5, scale=0.3)
    backbone.save_to_preset(str(tmp_path / "bfloat16"))
    model, _ = load_keras_hub_gpt2(str(tmp_path / "bfloat16"))
    assert model.token_embedding.embeddings.dtype == "float32"
    stored = keras.ops.convert_to_numpy(backbone.token_embedding.embeddings)
    assert stored.dtype.name == "bfloat16"
    np.testing.assert_array_equal(model.token_embedding.embeddings.numpy(),
                                  stored.astype(np.float32))


def test_missing_keras_hub_names_the_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` raises ImportError
    with pytest.raises(ValueError, match=f"is a keras-hub model; reading it needs keras-hub: "
                       f"{INSTALL}".replace("[", r"\[").replace("]", r"\]")):
        load_keras_hub_gpt2(saved[1]["causal_lm .keras"])


def test_source_format_and_its_errors(saved, tmp_path, capsys):
    from tests.test_hf_conversion import random_hf_model

    hf_dir = tmp_path / "hf"
    random_hf_model().save_pretrained(str(hf_dir))
    assert source_format(str(hf_dir)) == "huggingface"
    both = tmp_path / "both"
    shutil.copytree(saved[1]["backbone preset"], both)
    shutil.copy(hf_dir / "model.safetensors", both)
    with pytest.raises(ValueError, match=r"holds both a keras-hub preset \(model.weights.h5, "
                       r"metadata.json, config.json with registered_name\) and a Hugging Face "
                       r"checkpoint \(model.safetensors\)\. Say which to read"):
        source_format(str(both))
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.h5 is a file but not a .keras archive"):
        source_format(str(tmp_path / "weights.h5"))
    with pytest.raises(ValueError, match="missing does not exist"):
        source_format(str(tmp_path / "missing"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one line, exit status 2
        main(["convert", str(both), str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith("gpt-keras: error: ") and "--from keras-hub" in error
    main(["convert", str(both), str(tmp_path / "run"), "--from", "keras-hub", "--vocab",
          GPT2_VOCAB])
    assert read_run_config(str(tmp_path / "run"))["source"] == {"keras_hub": str(both)}
    capsys.readouterr()
    with pytest.raises(SystemExit):  # --to hf reads a run directory, whatever --from says
        main(["convert", str(tmp_path / "run"), str(tmp_path / "hf2"), "--to", "hf", "--from",
              "keras-hub"])
    assert "--from names the kind of a source converted to gpt_keras" in capsys.readouterr().err
