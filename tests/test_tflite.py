"""TFLite export: every signature runs in the plain LiteRT interpreter (builtin ops only, no Flex
delegate) with Keras' numbers; generation through it gives `gpt_keras.generation`'s tokens;
quantized files are smaller and stay close; the export directory is written atomically."""

import json
import os

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from gpt_keras import GPT, generation
from gpt_keras.decoding import MAX_STOP_BYTES
from gpt_keras.cli import main
from gpt_keras.config import num_parameters
from gpt_keras.tflite import (
    DECODE_SIGNATURE,
    GENERATE_SIGNATURE,
    LOGITS_SIGNATURE,
    PREFILL_SIGNATURE,
    SIGNATURES,
    TFLiteGenerator,
    convert_to_tflite,
    export_tflite,
)
from gpt_keras.tokenizers import CharTokenizer
from gpt_keras.training import create_run
from tests import numpy_reference as ref

CONTEXT = 16  # the "tiny" preset's context: generations below slide past it
HIDDEN = 64  # 104k parameters: weights are most of the file, so quantization shows in its size


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A run directory holding a tiny model with random weights of order one and a char
    tokenizer, its float32 export, and the model."""
    with open(corpus, encoding="utf-8") as f:
        tokenizer = CharTokenizer.train(f.read())
    model = GPT.from_preset("tiny", vocab_size=tokenizer.vocab_size, hidden_dim=HIDDEN)
    model.build()
    ref.randomize_weights(model)
    root = tmp_path_factory.mktemp("tflite")
    run_dir = str(root / "run")
    create_run(run_dir, model, tokenizer, {"test": "random weights"})
    path = export_tflite(run_dir, str(root / "float32"))
    return run_dir, path, model, Interpreter(model_path=path)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def ids(shape, seed, vocab_size):
    return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def generate_inputs(runner, token_ids, lengths, max_new_tokens):
    """Greedy inputs of `runner`, a `generate` signature (no stop token, steering off)."""
    tail_width = runner.get_input_details()["tail"]["shape_signature"][1]
    return dict(
        token_ids=token_ids, lengths=np.array(lengths, np.int32),
        max_new_tokens=np.int32(max_new_tokens), temperature=np.float32(0), top_k=np.int32(0),
        top_p=np.float32(1), seed=np.zeros([2], np.int32), offset=np.int32(0),
        stop_token_ids=np.array([-1], np.int32), repetition_penalty=np.float32(1),
        min_new_tokens=np.int32(0), banned_token_ids=np.array([-1], np.int32),
        bias_token_ids=np.array([-1], np.int32), bias_values=np.zeros([1], np.float32),
        stop_strings=np.full([1, MAX_STOP_BYTES], -1, np.int32),
        tail=np.full([len(token_ids), tail_width], -1, np.int32),
    )


def test_export_layout_and_manifest(run):
    run_dir, path, model, interpreter = run
    directory = os.path.dirname(path)
    assert sorted(os.listdir(directory)) == ["manifest.json", "model.tflite", "tokenizer.json"]
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    assert read_bytes(os.path.join(run_dir, "tokenizer", "tokenizer.json")) == read_bytes(
        os.path.join(directory, "tokenizer.json")
    )
    assert manifest["model_bytes"] == os.path.getsize(path)
    assert manifest["quantization"] is None
    assert manifest["config"]["vocab_size"] == model.config.vocab_size
    assert manifest["max_abs_logit_difference_vs_keras"] <= 1e-4
    assert sorted(manifest["signatures"]) == sorted(SIGNATURES) == sorted(
        interpreter.get_signature_list()
    )
    assert manifest["signatures"][GENERATE_SIGNATURE]["inputs"]["token_ids"] == {
        "dtype": "int32", "shape": [-1, -1]  # any prompt width
    }
    cache_shape = list(model.init_cache(1).shape)  # [L, 2, B, H, S, K], B dynamic
    cache_shape[2] = -1
    assert manifest["signatures"][DECODE_SIGNATURE]["outputs"]["cache"]["shape"] == cache_shape


def test_logits_match_keras_for_any_batch_and_length(run):
    _, _, model, interpreter = run
    runner = interpreter.get_signature_runner(LOGITS_SIGNATURE)
    for shape in [(1, CONTEXT), (3, 5)]:
        tokens = ids(shape, sum(shape), model.config.vocab_size)
        np.testing.assert_allclose(runner(token_ids=tokens)["logits"], model(tokens), atol=1e-4)


def test_prefill_then_decode_matches_keras(run):
    _, _, model, interpreter = run
    tokens = ids((2, 12), 0, model.config.vocab_size)
    expected = np.asarray(model(tokens))
    out = interpreter.get_signature_runner(PREFILL_SIGNATURE)(token_ids=tokens[:, :4])
    np.testing.assert_allclose(out["logits"], expected[:, :4], atol=1e-4)
    decode = interpreter.get_signature_runner(DECODE_SIGNATURE)
    cache = out["cache"]
    for t in range(4, 12):
        out = decode(token=tokens[:, t], position=np.int32(t), cache=cache)
        cache = out["cache"]
        np.testing.assert_allclose(out["logits"], expected[:, t], atol=1e-4)
    _, keras_cache = model.call_with_cache(tokens, model.init_cache(2), 0)
    np.testing.assert_allclose(cache, keras_cache, atol=1e-4)  # slots 12-15 empty in both


def test_learned_positions_convert_and_decode_like_keras():
    """GPT-2 checkpoints use learned positions (the run above uses sinusoidal ones)."""
    model = GPT.from_preset("tiny", position_embedding="learned")
    model.build()
    ref.randomize_weights(model)
    interpreter = Interpreter(model_content=convert_to_tflite(model))
    tokens = ids((1, 10), 2, model.config.vocab_size)
    expected = np.asarray(model(tokens))
    out = interpreter.get_signature_runner(PREFILL_SIGNATURE)(token_ids=tokens[:, :6])
    out = interpreter.get_signature_runner(DECODE_SIGNATURE)(
        token=tokens[:, 6], position=np.int32(6), cache=out["cache"]
    )
    np.testing.assert_allclose(out["logits"], expected[:, 6], atol=1e-4)
    padded = np.zeros([1, CONTEXT], np.int32)
    padded[0, :10] = tokens[0]
    runner = interpreter.get_signature_runner(GENERATE_SIGNATURE)
    out = runner(**generate_inputs(runner, padded, [10], 6))
    np.testing.assert_array_equal(
        out["new_token_ids"],
        generation.generate(model, tokens, 6, temperature=0, jit_compile=False),
    )


def test_generate_signature_decodes_a_ragged_batch_in_one_call(run):
    _, _, model, interpreter = run
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    padded = np.zeros([2, 7], np.int32)  # any width up to the context
    for row, prompt in zip(padded, prompts):
        row[: len(prompt)] = prompt
    runner = interpreter.get_signature_runner(GENERATE_SIGNATURE)
    out = runner(**generate_inputs(runner, padded, [5, 2], 9))
    expected = generation.generate(model, prompts, 9, temperature=0, jit_compile=False)
    np.testing.assert_array_equal(out["num_new_tokens"], [9, 9])
    np.testing.assert_array_equal(out["new_token_ids"], expected)


@pytest.mark.parametrize("knobs", [
    dict(temperature=0),
    dict(temperature=1.0, seed=7),
    dict(temperature=0.8, top_k=5, seed=11),
    dict(temperature=1.0, top_p=0.7, seed=3),
])
def test_generated_ids_equal_keras_past_the_context_for_any_chunk_size(run, knobs):
    """40 new tokens after a 6-token prompt slide the 16-token window three times."""
    run_dir, path, model, _ = run
    generator = TFLiteGenerator(path)
    prompt = ids((6,), 1, model.config.vocab_size).tolist()
    expected = generation.generate(model, prompt, 40, jit_compile=False, **knobs)
    for chunk_size in [None, 3]:
        chunks = list(generator.stream_ids(prompt, 40, chunk_size=chunk_size, **knobs))
        assert sum(chunks, []) == expected
        assert chunk_size is None or max(len(c) for c in chunks) <= 3


def test_a_stop_token_ends_generation_as_in_keras(run):
    _, path, model, _ = run
    prompt = ids((4,), 3, model.config.vocab_size).tolist()
    greedy = generation.generate(model, prompt, 20, temperature=0, jit_compile=False)
    stop = greedy[5]
    expected = generation.generate(model, prompt, 20, temperature=0, stop_token_ids=(stop,),
                                   jit_compile=False)
    assert expected == greedy[: greedy.index(stop)]
    for chunk_size in [None, 2]:
        chunks = TFLiteGenerator(path).stream_ids(prompt, 20, chunk_size=chunk_size,
                                                  temperature=0, stop_token_ids=(stop,))
        assert sum(chunks, []) == expected


def test_generator_errors_name_the_problem(run, tmp_path):
    _, path, _, _ = run
    generator = TFLiteGenerator(path)
    with pytest.raises(ValueError, match="`top_k` must be an integer ≥ 0 .* Received: top_k=-1"):
        generator.stream_ids([1, 2], 5, top_k=-1)  # checked before iterating
    with pytest.raises(ValueError, match="Prompt 0 has token id 999 outside the vocabulary"):
        generator.stream_ids([1, 999], 5)
    alone = tmp_path / "model.tflite"
    alone.write_bytes(read_bytes(path))
    with pytest.raises(ValueError, match="needs the manifest that `export_tflite` writes"):
        TFLiteGenerator(str(alone))


def test_generated_text_equals_text_generator(run):
    run_dir, path, model, _ = run
    generator = TFLiteGenerator(path)
    expected = generation.TextGenerator(model, generator.tokenizer, jit_compile=False).generate(
        "ROMEO:", 30, temperature=0
    )
    assert generator.generate("ROMEO:", 30, temperature=0) == expected
    assert "".join(generator.stream("ROMEO:", 30, temperature=0, chunk_size=4)) == expected
    assert len(expected) > 0


STEERING = dict(repetition_penalty=1.4, min_new_tokens=5, banned_token_ids=[1, 2],
                logit_bias={3: 1.0, 4: -2.0}, temperature=0.9, top_k=8, seed=5)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_steering_knobs_and_logprobs_equal_keras(run, chunk_size):
    """Past the context (the penalty's window slides) and across calls (the stop-string bytes
    carry over in `tail`)."""
    _, path, model, _ = run
    generator = TFLiteGenerator(path)
    prompt = ids((6,), 2, model.config.vocab_size).tolist()
    expected, logprobs = generation.generate(model, prompt, 40, jit_compile=False,
                                             return_logprobs=True, **STEERING)
    assert sum(generator.stream_ids(prompt, 40, chunk_size=chunk_size, **STEERING), []) == expected
    np.testing.assert_allclose(generator.logprobs, logprobs, atol=1e-4)
    text_generator = generation.TextGenerator(model, generator.tokenizer, jit_compile=False)
    full = text_generator.generate("ROMEO:", 40, **STEERING)
    assert len(full) >= STEERING["min_new_tokens"]  # one character per token
    stop = full[len(full) // 2 :][:2]  # a stop string the steered text reaches mid-way
    expected = text_generator.generate("ROMEO:", 40, stop_strings=[stop], **STEERING)
    assert expected == full[: full.index(stop)]
    assert generator.generate("ROMEO:", 40, chunk_size=chunk_size, stop_strings=[stop],
                              **STEERING) == expected


def test_cli_generate_with_tflite_prints_the_keras_greedy_text(run, capsys):
    run_dir, path, _, _ = run
    args = ["--prompt", "KING", "--max-new-tokens", "40", "--temperature", "0"]
    main(["generate", run_dir, *args])
    keras_text = capsys.readouterr().out
    for directory in [run_dir, os.path.dirname(path)]:  # the run or the export directory
        main(["generate", directory, "--tflite", path, *args])
        assert capsys.readouterr().out == keras_text
    assert keras_text.startswith("KING") and len(keras_text) > len("KING\n")


def test_cli_refuses_a_tflite_file_from_another_run(run, tmp_path, capsys):
    _, path, _, _ = run
    other = str(tmp_path / "other")
    model = GPT.from_preset("tiny", vocab_size=6)
    model.build()
    create_run(other, model, CharTokenizer("abcd"), {"test": "other"})
    with pytest.raises(SystemExit) as raised:
        main(["generate", other, "--tflite", path, "--prompt", "a"])
    assert raised.value.code == 2
    assert "was exported from another run" in capsys.readouterr().err


def test_export_refuses_to_overwrite_without_force(run):
    run_dir, path, _, _ = run
    before = os.path.getmtime(path)
    with pytest.raises(ValueError, match="already exists; pass force=True"):
        export_tflite(run_dir, os.path.dirname(path))
    with pytest.raises(ValueError, match="`quantize` must be None, 'float16' or 'int8'"):
        export_tflite(run_dir, os.path.dirname(path), quantize="int4", force=True)
    assert os.path.getmtime(path) == before


@pytest.mark.parametrize("quantize, saved_bytes_per_weight, tolerance", [
    ("float16", 1.5, 0.01), ("int8", 2.0, 0.25),
])
def test_quantized_files_are_smaller_and_close(run, tmp_path, quantize, saved_bytes_per_weight,
                                               tolerance):
    """`tolerance`: the largest logit difference from Keras, in standard deviations of the
    logits (random weights of scale 0.2 are harder to quantize than trained ones; the
    validation-loss cost on a trained model is measured by benchmarks/tflite_quality.py)."""
    run_dir, float32_path, model, _ = run
    out_dir = tmp_path / "export"
    out_dir.mkdir()  # an earlier TFLite export, which force=True replaces
    (out_dir / "manifest.json").write_text("{}")
    (out_dir / "model.tflite").write_text("replaced by force=True")
    path = export_tflite(run_dir, str(out_dir), quantize=quantize, force=True)
    assert sorted(os.listdir(out_dir)) == sorted(
        ["manifest.json", f"model-{quantize}.tflite", "tokenizer.json"]
    )
    saved = os.path.getsize(float32_path) - os.path.getsize(path)
    assert saved >= saved_bytes_per_weight * num_parameters(model.config)
    runner = Interpreter(model_path=path).get_signature_runner(LOGITS_SIGNATURE)
    tokens = ids((2, CONTEXT), 5, model.config.vocab_size)
    expected = np.asarray(model(tokens))
    difference = np.abs(runner(token_ids=tokens)["logits"] - expected).max()
    assert 0 < difference <= tolerance * expected.std()
    assert len(next(TFLiteGenerator(path).stream_ids([1, 2, 3], 5, temperature=0))) == 5
