"""`gpt-keras convert`: a Hugging Face GPT-2 directory becomes a run directory that `generate` and
`evaluate` accept, and a run directory goes back to Hugging Face with equal logits."""

import os
import re
import shutil

import numpy as np
import pytest

from gpt_keras import GPTConfig
from gpt_keras.cli import main
from gpt_keras.generation import TextGenerator
from gpt_keras.tokenizers import GPT2Tokenizer, load_tokenizer
from gpt_keras.training import TrainConfig, load_model, read_run_config, train
from tests.conftest import GPT2_VOCAB, SHAKESPEARE
from tests.test_hf_conversion import MALFORMED, hf_greedy, hf_logits, random_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf_model = random_hf_model(vocab_size=50257, n_positions=64)
    hf_dir = str(root / "hf")
    hf_model.save_pretrained(hf_dir)
    for name in ("encoder.json", "vocab.bpe"):  # a checkpoint that ships its tokenizer files
        shutil.copy(os.path.join(GPT2_VOCAB, name), hf_dir)
    run_dir = str(root / "run")
    main(["convert", hf_dir, run_dir])
    return hf_model, hf_dir, run_dir


def test_hf_checkpoint_becomes_a_run_directory(converted, capsys):
    hf_model, hf_dir, run_dir = converted
    assert read_run_config(run_dir)["source"] == {"huggingface": os.path.abspath(hf_dir)}
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    assert isinstance(tokenizer, GPT2Tokenizer) and tokenizer.vocab_size == 50257
    prompt = "To be, or not to be"
    ids = tokenizer.tokenize(prompt).numpy().tolist()
    expected = tokenizer.detokenize(np.array(hf_greedy(hf_model, ids, 8), np.int32)).numpy()
    capsys.readouterr()
    main(["generate", run_dir, "--prompt", prompt, "--max-new-tokens", "8", "--temperature",
          "0", "--no-stream"])
    printed = capsys.readouterr().out
    generated = TextGenerator(load_model(run_dir), tokenizer).generate(prompt, 8, temperature=0,
                                                                      stop_token_ids=())
    assert generated.encode("utf-8") == expected
    assert printed.startswith(prompt)
    sample = os.path.join(os.path.dirname(run_dir), "sample.txt")
    with open(SHAKESPEARE, encoding="utf-8") as source, open(sample, "w") as target:
        target.write(source.read(5_000))
    main(["evaluate", run_dir, "--data", sample, "--batch-size", "8"])
    assert "perplexity" in capsys.readouterr().out


def test_run_directory_goes_back_to_hugging_face(converted, tmp_path):
    hf_model, _, run_dir = converted
    out = str(tmp_path / "back")
    main(["convert", run_dir, out, "--to", "hf"])
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(0, 50257, (2, 12))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=1e-5)
    fast = transformers.GPT2TokenizerFast(vocab=os.path.join(out, "vocab.json"),
                                          merges=os.path.join(out, "merges.txt"))
    text = "Hello world, it's me"
    assert fast(text)["input_ids"] == load_tokenizer(
        os.path.join(run_dir, "tokenizer")).tokenize(text).numpy().tolist()


def test_convert_errors_are_one_line(converted, tmp_path, capsys):
    _, hf_dir, run_dir = converted
    with pytest.raises(SystemExit):
        main(["convert", hf_dir, run_dir])  # the run directory exists
    assert "already exists" in capsys.readouterr().err
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(hf_dir, name), bare)
    with pytest.raises(SystemExit):
        main(["convert", str(bare), str(tmp_path / "run2")])
    assert "holds neither encoder.json + vocab.bpe nor vocab.json + merges.txt" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run2").exists()


def test_fine_tuning_from_a_hugging_face_directory(converted, tmp_path):
    """`train --init-from HF_DIR`: the checkpoint's weights, shape and GPT-2 tokenizer are the
    starting point (the loss of the first interval is the imported model's, not a fresh one's)."""
    hf_model, hf_dir, _ = converted
    corpus = tmp_path / "text.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        corpus.write_text(f.read(20_000), encoding="utf-8")
    config = TrainConfig(batch_size=4, max_steps=2, learning_rate=1e-9, min_learning_rate=1e-9,
                         warmup_steps=0, checkpoint_every=2, eval_every=2, eval_batches=1,
                         sample_every=0)
    run_dir = str(tmp_path / "tuned")
    train(run_dir, [str(corpus)], GPTConfig.from_preset("tiny"), config, verbose=False,
          init_from=hf_dir)
    assert isinstance(load_tokenizer(os.path.join(run_dir, "tokenizer")), GPT2Tokenizer)
    tuned = load_model(run_dir)
    assert tuned.config.vocab_size == 50257 and tuned.config.position_embedding == "learned"
    tokens = np.random.default_rng(2).integers(0, 50257, (1, 10))
    # A learning rate of 1e-9 leaves the imported weights as they were: logits equal HF's.
    np.testing.assert_allclose(np.asarray(tuned(tokens.astype("int32"))),
                               hf_logits(hf_model, tokens), atol=1e-3)


@pytest.mark.parametrize("case", ["safetensors-header-list", "index-no-weight_map",
                                  "torch-truncated", "nan-weight", "n_layer-huge"])
def test_malformed_checkpoint_is_one_line(tmp_path, capsys, case):
    """`convert` of a malformed directory (see `MALFORMED`) prints one line and exits with 2."""
    change, message = MALFORMED[case]
    directory = tmp_path / "hf"
    random_hf_model().save_pretrained(directory)
    change(directory)
    capsys.readouterr()  # transformers' progress bar
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(directory), str(tmp_path / "run")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("gpt-keras: error: ") and error.count("\n") == 1, error
    assert re.search(message, error)
    assert not (tmp_path / "run").exists()
