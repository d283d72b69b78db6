"""What `pip install -e .` gives: the dependencies gpt_keras imports (and no others), extras named
for what they give, and Keras classes registered by `import gpt_keras`."""

import ast
import configparser
import glob
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(text):
    """Normalised distribution names of a setup.cfg requirement list."""
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


def _setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    runtime = _requirements(parser["options"]["install_requires"])
    extras = {name: _requirements(value)
              for name, value in parser["options.extras_require"].items()}
    return runtime, extras


def _third_party_imports(pattern):
    """Top-level modules imported by the files matching `pattern` that are neither standard
    library nor gpt_keras/tests. Optional imports (in a `try` that catches ImportError, e.g.
    torch for PyTorch checkpoints) are left out."""
    modules = set()
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        optional = {
            id(inner)
            for node in ast.walk(tree) if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id.endswith("ImportError")
                or isinstance(h.type, ast.Name) and h.type.id == "ModuleNotFoundError"
                for h in node.handlers)
            for statement in node.body for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules
            if m not in sys.stdlib_module_names and m not in ("gpt_keras", "tests")}


def _distributions(module):
    found = importlib.metadata.packages_distributions().get(module, [])
    assert found, f"{module} is imported but not installed"
    return {name.lower().replace("_", "-") for name in found}


def test_install_requires_is_what_gpt_keras_imports():
    """Issue 11, point 1: TFLite export works after `pip install -e .`; nothing is installed for
    every user that gpt_keras does not import."""
    runtime, _ = _setup_cfg()
    imported = _third_party_imports("gpt_keras/**/*.py")
    assert "ai_edge_litert" in imported  # `export --format tflite`, `generate --tflite`
    needed = set()
    for module in imported:
        distributions = _distributions(module)
        assert distributions & runtime, f"gpt_keras imports {module} ({distributions}), " \
                                        "which install_requires does not list"
        needed |= distributions & runtime
    assert runtime - needed <= {"tensorboard"}  # `tensorboard --logdir`, the printed command
    assert not runtime & {"keras-hub", "tensorflow-text", "torch", "transformers"}


def test_extras_are_named_for_what_they_give_and_test_holds_them_all():
    runtime, extras = _setup_cfg()
    assert {"parity", "serving", "benchmarks", "test"} <= set(extras)
    assert "keras-hub" in extras["parity"] and "tensorflow-text" in extras["benchmarks"]
    others = set().union(*(names for name, names in extras.items() if name != "test"))
    assert others <= extras["test"]  # CI: `pip install -e ".[test]"`, then `make test`
    for module in _third_party_imports("tests/**/*.py"):
        assert _distributions(module) & (runtime | extras["test"]), module


def test_import_gpt_keras_registers_the_model_for_load_model(tmp_path):
    """Issue 11, point 11: `import gpt_keras`, then `keras.saving.load_model` (no `from gpt_keras
    import GPT`), in a fresh process."""
    from gpt_keras import GPT, GPTConfig

    model = GPT(**vars(GPTConfig.from_preset("tiny")))
    model.build()
    path = str(tmp_path / "model.keras")
    model.save(path)
    code = ("import gpt_keras, keras, sys; "
            f"model = keras.saving.load_model({path!r}); "
            "print(type(model).__name__, model.count_params())")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["GPT", str(model.count_params())]


@pytest.mark.parametrize("orig_argv, argv0, deferred", [
    (["/venv/bin/python", "/venv/bin/gpt-keras", "--help"], "/venv/bin/gpt-keras", True),
    (["python", "-m", "gpt_keras.cli", "train"], "-m", True),
    (["python", "-X", "importtime", "-m", "gpt_keras.cli", "-h"], "-m", True),
    (["python", "train.py"], "train.py", False),
    (["python", "-m", "pytest"], "-m", False),
])
def test_only_the_command_line_defers_the_keras_import(monkeypatch, orig_argv, argv0, deferred):
    import gpt_keras

    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert gpt_keras._started_by_the_cli() == deferred
