"""`gpt-keras generate` and `gpt-keras evaluate` on a small trained run."""

import io
import os

import pytest

from gpt_keras.cli import main
from gpt_keras.generation import TextGenerator
from gpt_keras.tokenizers import load_tokenizer
from gpt_keras.training import load_model

from tests.conftest import SHAKESPEARE  # noqa: E402
SMALL = ["--context-length", "32", "--num-layers", "2", "--num-heads", "2", "--hidden-dim", "32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        corpus.write_text(f.read(40_000), encoding="utf-8")
    directory = str(tmp_path_factory.mktemp("runs") / "run")
    main(["train", "--data", str(corpus), "--run-dir", directory, *SMALL, "--max-steps", "20",
          "--learning-rate", "0.01", "--warmup-steps", "2", "--eval-batches", "1",
          "--sample-every", "0"])
    return directory


def generate(capsys, *args):
    main(["generate", *args])
    return capsys.readouterr().out


def test_greedy_generate_prints_prompt_and_continuation(run_dir, capsys):
    out = generate(capsys, run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "25",
                   "--temperature", "0", "--no-stream")
    generator = TextGenerator(load_model(run_dir), load_tokenizer(os.path.join(run_dir,
                                                                               "tokenizer")))
    expected = generator.generate("ROMEO:", 25, temperature=0)
    assert out == "ROMEO:" + expected + "\n"
    assert len(expected) > 0


def test_streaming_prints_the_same_text_for_a_seed(run_dir, capsys):
    args = [run_dir, "--prompt", "First", "--max-new-tokens", "30", "--seed", "3",
            "--top-k", "10"]
    assert generate(capsys, *args, "--stream") == generate(capsys, *args, "--no-stream")


def test_prompt_from_stdin_and_several_samples(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("KING"))
    out = generate(capsys, run_dir, "--prompt", "-", "--num-samples", "2", "--seed", "1",
                   "--max-new-tokens", "10", "--no-stream")
    assert out.count("--- sample") == 2 and out.count("\nKING") == 2


@pytest.mark.parametrize("args, message", [
    (["--top-k", "-1"], "top_k` must be an integer ≥ 0 (0 = no cut). Received: top_k=-1"),
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
])
def test_bad_knobs_are_one_line_errors(run_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", run_dir, *args])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error


def test_generate_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path)])
    assert "is not a gpt_keras run directory (no run.json)" in capsys.readouterr().err


def test_evaluate_prints_all_metrics(run_dir, capsys):
    main(["evaluate", run_dir, "--data", SHAKESPEARE])
    out = capsys.readouterr().out
    for name in ("loss", "perplexity", "bits/char", "bits/byte"):
        assert name in out
