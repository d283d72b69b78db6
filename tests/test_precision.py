"""Reduced-precision weights (`gpt_keras.precision`): stored in their format, close to float32,
and decoded to the same greedy text by in-process generation, the exported SavedModel and
(int8) TFLite."""

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import gpt_keras
from gpt_keras import GPT, backends, generation, serving
from gpt_keras.cli import main
from gpt_keras.precision import weight_format, with_weights
from gpt_keras.tflite import TFLiteGenerator, export_tflite
from gpt_keras.tokenizers import CharTokenizer, load_tokenizer
from gpt_keras.training import create_run, load_model
from tests import numpy_reference as ref

PROMPTS = ["To be, or not", "KING"]
NEW_TOKENS = 24  # > the tiny preset's context 16: the window slides


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    with open(corpus, encoding="utf-8") as f:
        tokenizer = CharTokenizer.train(f.read(50_000))
    model = GPT.from_preset("tiny", vocab_size=tokenizer.vocab_size, hidden_dim=64)
    model.build()
    ref.randomize_weights(model, scale=0.3)
    run_dir = str(tmp_path_factory.mktemp("precision") / "run")
    create_run(run_dir, model, tokenizer, {"test": "random weights"})
    return run_dir


@pytest.mark.parametrize("weights, dtype, relative_error", [
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 per value): a few roundings
    # per layer stay within a few percent of the logits' scale.
    ("bfloat16", "bfloat16", 2**-4),
    # int8 rows scaled by their largest entry: rounding of up to 1/254 of it per weight.
    ("int8", "int8", 2**-4),
])
def test_weights_are_stored_in_their_format_and_stay_close(run, weights, dtype, relative_error):
    model = load_model(run)
    collect = gc.collect
    converted = with_weights(model, weights)
    assert gc.collect is collect  # put back after the one collection of an int8 conversion
    assert weight_format(model) == "float32" and weight_format(converted) == weights
    kernel = converted.blocks[0].attention.query_key_value.kernel
    assert converted.token_embedding.embeddings.dtype == kernel.dtype == dtype
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16))
    expected = np.asarray(model(ids))
    error = np.abs(np.asarray(converted(ids), np.float32) - expected).max()
    assert 0 < error <= relative_error * np.abs(expected).max()
    assert with_weights(converted, weights) is converted
    assert weight_format(model) == "float32"  # the original is left as it was


def test_weight_errors_name_the_formats(run):
    model = load_model(run)
    with pytest.raises(ValueError, match="`weights` must be one of float32, bfloat16, int8. "
                                         "Received: weights='int4'"):
        with_weights(model, "int4")
    with pytest.raises(ValueError, match="Convert from float32 weights: this model already "
                                         "has int8 weights"):
        with_weights(with_weights(model, "int8"), "bfloat16")


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_every_engine_decodes_the_same_greedy_text(run, weights, tmp_path, capsys):
    """In-process (plain graph and XLA), the exported SavedModel (its export checks
    the served greedy text against in-process generation and records it) and the CLI; TFLite for
    int8 (it has no bfloat16 kernels, and says so).

    bfloat16 in a plain graph rounds as XLA does where TensorFlow runs oneDNN's kernels (its
    default on x86 CPUs with AVX-512 VNNI/BF16, AVX-VNNI or AMX). Elsewhere TensorFlow's own bfloat16
    kernels round some results differently, so near-ties can part the two texts, and each engine
    is compared with its own kind: the export with the plain graph, the CLI (XLA) with XLA."""
    model = with_weights(load_model(run), weights)
    tokenizer = load_tokenizer(os.path.join(run, "tokenizer"))
    expected = generation.TextGenerator(model, tokenizer, jit_compile=False).generate(
        PROMPTS, NEW_TOKENS, temperature=0
    )
    assert len(set(expected[0])) > 3  # not one repeated character
    expected_xla = generation.TextGenerator(model, tokenizer, jit_compile=True).generate(
        PROMPTS, NEW_TOKENS, temperature=0
    )
    if backends.fused_bias_add_rounds_once(model.compute_dtype):  # float32 compute for int8
        assert expected_xla == expected
    # The CLI below decodes one prompt with the default engine: XLA for both formats at batch 1.
    assert generation.resolve_jit_compile(model, "auto", batch_size=1) is True
    version = serving.export_saved_model(run, str(tmp_path / "models"), weights=weights)
    manifest = serving.read_manifest(version)
    assert manifest["weights"] == weights
    golden = manifest["golden"]
    assert golden["completions"] == generation.TextGenerator(
        model, tokenizer, jit_compile=False
    ).generate(golden["prompts"], golden["max_new_tokens"], temperature=0)
    main(["generate", run, "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS),
          "--temperature", "0", "--weights", weights, "--no-stream"])
    assert capsys.readouterr().out.strip() == (PROMPTS[0] + expected_xla[0]).strip()
    if weights == "bfloat16":
        with pytest.raises(ValueError, match="no bfloat16.*--quantize float16"):
            export_tflite(run, str(tmp_path / "tflite"), weights=weights)
        return
    path = export_tflite(run, str(tmp_path / "tflite"), weights=weights)
    generator = TFLiteGenerator(path)
    assert [generator.generate(p, NEW_TOKENS, temperature=0) for p in PROMPTS] == expected


def test_import_makes_xla_round_16_bit_floats():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", "import os, gpt_keras; print(os.environ['XLA_FLAGS'])"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert out.strip() == "--xla_allow_excess_precision=false"


@pytest.mark.parametrize("user_flags, expected", [
    ("--xla_cpu_use_thunk_runtime=true", "--xla_cpu_use_thunk_runtime=true "
                                         "--xla_allow_excess_precision=false"),
    ("--xla_allow_excess_precision=true", "--xla_allow_excess_precision=true"),  # theirs wins
])
def test_xla_flags_of_the_user_are_kept(monkeypatch, user_flags, expected):
    """What the import above does (`gpt_keras._round_16_bit_floats_under_xla`), where `XLA_FLAGS`
    already holds flags."""
    monkeypatch.setenv("XLA_FLAGS", user_flags)
    gpt_keras._round_16_bit_floats_under_xla()
    assert os.environ["XLA_FLAGS"] == expected
