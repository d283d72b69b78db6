"""The `gpt-keras` command line: help, errors, notes, generate, evaluate and export guards."""

import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import gpt_keras
from gpt_keras import cli
from gpt_keras.cli import main
from gpt_keras.config import FINE_TUNING_LEARNING_RATE, TrainConfig
from gpt_keras.data import TokenFile
from gpt_keras.generation import TextGenerator
from gpt_keras.tokenizers import load_tokenizer
from gpt_keras.training import Run, load_model

from tests.conftest import SHAKESPEARE  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_generate_xla_flag_picks_the_engine(run_dir, capsys, monkeypatch):
    # Each setting against the library's own engine of that setting (the same kernels, so the
    # same text on any CPU; XLA against the plain graph is the engines test's business).
    engines = []

    class Recording(TextGenerator):
        def __init__(self, *args, jit_compile="auto"):
            engines.append(jit_compile)
            super().__init__(*args, jit_compile=jit_compile)

    monkeypatch.setattr("gpt_keras.generation.TextGenerator", Recording)
    args = [run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--temperature", "0.8",
            "--seed", "5", "--no-stream"]
    model, tokenizer = load_model(run_dir), load_tokenizer(os.path.join(run_dir, "tokenizer"))
    for flag, jit_compile in (("on", True), ("off", False), ("auto", "auto")):
        generator = TextGenerator(model, tokenizer, jit_compile=jit_compile)
        expected = generator.generate("ROMEO:", 40, temperature=0.8, seed=5)
        assert generate(capsys, *args, "--xla", flag) == "ROMEO:" + expected + "\n"
        assert len(expected) > 0
    assert engines == [True, False, "auto"]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", run_dir, "--tflite", "model.tflite", "--xla", "off"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("gpt-keras: error: --xla does not apply to --tflite")


def test_streaming_prints_the_same_text_for_a_seed(run_dir, capsys):
    args = [run_dir, "--prompt", "First", "--max-new-tokens", "30", "--seed", "3",
            "--top-k", "10"]
    assert generate(capsys, *args, "--stream") == generate(capsys, *args, "--no-stream")


def test_prompt_from_stdin_and_several_samples(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("KING"))
    out = generate(capsys, run_dir, "--prompt", "-", "--num-samples", "2", "--seed", "1",
                   "--max-new-tokens", "10", "--no-stream")
    assert out.count("--- sample") == 2 and out.count("\nKING") == 2


def test_steering_flags_give_text_generators_text_and_logprobs(run_dir, capsys):
    """--repetition-penalty, --min-new-tokens, --ban, --stop and --logprobs."""
    generator = TextGenerator(load_model(run_dir), load_tokenizer(os.path.join(run_dir,
                                                                               "tokenizer")))
    steering = dict(temperature=0.8, seed=2, repetition_penalty=1.3, min_new_tokens=4,
                    banned_token_ids=[1, 5])
    full = generator.generate("ROMEO:", 30, **steering)
    stop = full[10:12]
    expected = generator.generate("ROMEO:", 30, stop_strings=[stop], return_logprobs=True,
                                  **steering)
    assert expected.text == full[: full.index(stop)]
    args = [run_dir, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "0.8",
            "--seed", "2", "--repetition-penalty", "1.3", "--min-new-tokens", "4", "--ban", "1",
            "--ban", "5", "--stop", stop]
    main(["generate", *args, "--logprobs"])
    out, err = capsys.readouterr()
    assert out == "ROMEO:" + expected.text + "\n"
    rows = [line.split("\t") for line in err.splitlines()[1:]]  # after the compiling note
    assert [int(row[0]) for row in rows] == expected.token_ids
    np.testing.assert_allclose([float(row[1]) for row in rows], expected.logprobs, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--repetition-penalty", "0"], "argument --repetition-penalty: expected a number > 0, "
                                    "received 0"),
    (["--top-k", "-1"], "argument --top-k: expected an integer >= 0, received -1"),
    (["--top-p", "1.5"], "argument --top-p: expected a number in (0, 1], received 1.5"),
    (["--top-p", "0"], "argument --top-p: expected a number in (0, 1], received 0"),
    (["--temperature", "-1"], "argument --temperature: expected a number >= 0, received -1"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: expected an integer >= 0, "
                                "received 'x'"),
])
def test_bad_knobs_are_one_line_errors_before_anything_is_printed(run_dir, capsys, args,
                                                                  message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", run_dir, "--prompt", "ROMEO:", *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err == f"gpt-keras: error: {message} (see `gpt-keras generate -h`)\n"


@pytest.mark.parametrize("args, message", [
    (["--stop", "x" * 65], "Pass at most 8"),
    (["--ban", "9999"], "must be ids in [0, "),
])
def test_bad_steering_values_are_one_line_errors(run_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", run_dir, "--prompt", "ROMEO:", *args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.splitlines()[-1].startswith("gpt-keras: error: ") and message in err


def test_generate_notes_compiling_and_a_long_prompt_in_one_line_each(run_dir, capsys):
    prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    main(["generate", run_dir, "--prompt", prompt, "--max-new-tokens", "5", "--seed", "0"])
    out, err = capsys.readouterr()
    assert out.startswith(prompt)
    assert err.splitlines() == [
        "gpt-keras: compiling the decoding loop for this shape (first call only)...",
        f"gpt-keras: note: Prompt 0 has {len(prompt)} tokens; keeping its last 32 so that it "
        "fits in context_length=32.",
    ]


def test_generate_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path)])
    assert "is not a gpt_keras run directory (no run.json)" in capsys.readouterr().err


def test_evaluate_scores_text_files_with_every_metric(run_dir, tmp_path, capsys):
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(40_000)[-3_000:]  # ASCII characters the run's tokenizer knows
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    main(["evaluate", run_dir, "--data", str(path)])
    lines = capsys.readouterr().out.splitlines()
    tokens = np.asarray(load_tokenizer(os.path.join(run_dir, "tokenizer")).tokenize(text))
    assert len(tokens) == len(text)  # one token per character and byte
    count = (len(tokens) - 1) // 32
    windows = tokens[np.arange(count)[:, None] * 32 + np.arange(33)].astype("int32")
    loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        windows[:, 1:], load_model(run_dir)(windows[:, :-1])))
    bits = loss / np.log(2)
    assert lines[0] == f"Scoring {path} (tokenizing first)..."
    names, values = lines[-1].split()[::2], [float(v) for v in lines[-1].split()[1::2]]
    assert names == ["tokens", "loss", "perplexity", "bits/char", "bits/byte"]
    # printed to 4 (perplexity 3) decimals; the batched sum differs from one mean by rounding
    np.testing.assert_allclose(values, [count * 32, loss, np.exp(loss), bits, bits],
                               rtol=1e-5, atol=1e-3)


def test_evaluate_defaults_to_the_runs_validation_split_with_progress(run_dir, capsys,
                                                                      monkeypatch):
    def no_default_corpus():
        raise AssertionError("evaluate must not read the default corpus")

    monkeypatch.setattr(cli, "default_corpus", no_default_corpus)
    main(["evaluate", run_dir, "--batch-size", "8"])
    lines = capsys.readouterr().out.splitlines()
    token_file = TokenFile.load(os.path.join(run_dir, "data"))
    tokens = token_file.tokens()[token_file.num_train:]
    count = (len(tokens) - 1) // 32
    windows = tokens[np.arange(count)[:, None] * 32 + np.arange(33)].astype("int32")
    logits = load_model(run_dir)(windows[:, :-1])
    expected = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        windows[:, 1:], logits))
    batches = -(-count // 8)
    assert lines[0] == f"Scoring the validation split of {run_dir}..."
    assert lines[1] == f"  batch 1/{batches}" and lines[-2] == f"  batch {batches}/{batches}"
    assert lines[-1].startswith(f"tokens {count * 32}  loss {expected:.4f}  ")


def test_every_option_has_help_and_the_help_has_examples(capsys):
    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(subcommands) == {"train", "evaluate", "generate", "attention", "convert", "export",
                                "serve"}
    for name, command in subcommands.items():
        for action in command._actions:
            assert action.help, (name, action.dest)
        assert "example" in command.format_help(), name
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "gpt-keras train --run-dir runs/shakespeare --max-steps 500" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"gpt-keras {gpt_keras.__version__}\n"


@pytest.mark.parametrize("args, expected", [
    ([], TrainConfig.learning_rate),
    (["--init-from", "runs/source"], FINE_TUNING_LEARNING_RATE),
    (["--learning-rate", "5e-4"], 5e-4),
    (["--init-from", "runs/source", "--learning-rate", "5e-4"], 5e-4),
])
def test_learning_rate_defaults_to_the_from_scratch_or_the_fine_tuning_rate(monkeypatch, args,
                                                                            expected):
    seen = []

    def record(run_dir, data_paths, model_config, train_config, **options):
        seen.append((train_config.learning_rate, options["init_from"]))
        return Run(run_dir, model_config, train_config)

    monkeypatch.setattr("gpt_keras.training.train", record)
    main(["train", "--run-dir", "runs/x", "--data", SHAKESPEARE, *args])
    assert seen == [(expected, "runs/source" if "--init-from" in args else None)]
    assert FINE_TUNING_LEARNING_RATE < TrainConfig.learning_rate


def _console(*args, importtime=False):
    """`python -m gpt_keras.cli ARGS` as a user runs it (no TF_CPP_MIN_LOG_LEVEL set)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "gpt_keras.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["--version"]])
def test_help_and_version_print_no_log_line_and_import_no_tensorflow(args):
    result = _console(*args)
    assert result.returncode == 0 and result.stderr == "" and result.stdout
    imported = _console(*args, importtime=True).stderr
    modules = {line.split("|")[-1].strip().split(".")[0] for line in imported.splitlines()}
    assert "gpt_keras" in modules
    assert not modules & {"tensorflow", "keras", "numpy"}


def test_a_command_that_loads_tensorflow_prints_only_its_own_lines(tmp_path):
    result = _console("evaluate", str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"gpt-keras: error: {tmp_path} is not a gpt_keras run directory "
                             "(no run.json). Pass the --run-dir of a `gpt-keras train` run.\n")


def test_messages_name_flags_not_python_fields():
    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    assert cli.flag_names(
        "`hidden_dim` must be divisible by `num_heads`. Received: hidden_dim=30, num_heads=4",
        train_parser,
    ) == "--hidden-dim must be divisible by --num-heads. Received: --hidden-dim 30, --num-heads 4"
    assert cli.flag_names(
        "runs/x holds a run with other settings (model.num_layers, tokenizer.kind, "
        "train.learning_rate). The dropout and the data stay; see max_steps; pass xla=True.",
        train_parser,
    ) == ("runs/x holds a run with other settings (--num-layers, --tokenizer, --learning-rate). "
          "The dropout and the data stay; see --max-steps; pass xla=True.")


def test_formats_never_overwrite_each_other(run_dir, tmp_path, capsys):
    """--force replaces an export of the same format only: a TFLite export refuses a folder of
    SavedModel versions, and a SavedModel export refuses a TFLite folder."""
    saved_model = tmp_path / "models" / "zh"
    (saved_model / "1").mkdir(parents=True)
    (saved_model / "1" / "saved_model.pb").write_bytes(b"model")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run_dir, "--format", "tflite", "--out", str(saved_model), "--force"])
    assert exit_info.value.code == 2
    assert "holds files that are not a TFLite export" in capsys.readouterr().err
    assert (saved_model / "1" / "saved_model.pb").read_bytes() == b"model"

    tflite = tmp_path / "exports" / "zh"
    tflite.mkdir(parents=True)
    (tflite / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", run_dir, "--out", str(tflite), "--force"])
    assert exit_info.value.code == 2
    assert "holds a TFLite export; choose another --out" in capsys.readouterr().err
    assert sorted(os.listdir(tflite)) == ["manifest.json"]
