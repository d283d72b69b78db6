import contextlib
import dataclasses
import fcntl
import importlib.util
import io
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402

# ../shared/data beside the checkout (read-only; tests never download anything).
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare.txt")
GPT2_VOCAB = os.path.join(SHARED_DATA, "gpt2")  # encoder.json + vocab.bpe
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def load_example(name):
    """The module `examples/{name}.py` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A file with the first 60,000 characters of Tiny Shakespeare."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(60_000)
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _float32_policy_and_seed():
    """Every test starts in float32 with a fixed seed, whatever the previous test set."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def built_once(tmp_path_factory, name, build):
    """The directory `name` that `build(path)` fills, built once per test session: pytest-xdist's
    workers share it (the first to ask builds it, the others wait on a lock and reuse it). Tests
    must treat it as read-only."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base directories lie side by side
    directory, done = root / name, root / (name + ".done")
    with open(root / (name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a failed build's leftovers
            build(directory)
            done.touch()
    return directory


def printed(function, *args):
    """What `function(*args)` prints to stdout."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        function(*args)
    return output.getvalue()


def _char_export(directory):
    from gpt_keras import GPT, GPTConfig
    from gpt_keras.cli import main
    from gpt_keras.tokenizers import CharTokenizer
    from gpt_keras.training import create_run
    from tests.numpy_reference import randomize_weights

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = CharTokenizer.train(f.read(20_000))
    config = GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size,
                                   position_embedding="learned")
    model = GPT(**dataclasses.asdict(config))
    model.build()
    randomize_weights(model, seed=1)  # greedy text varies, some rows stop at end of text
    run_dir = create_run(str(directory / "run"), model, tokenizer, {"test": "random weights"})
    text = printed(main, ["export", run_dir, "--out", str(directory / "models" / "shakespeare")])
    (directory / "export.txt").write_text(text, encoding="utf-8")


@pytest.fixture(scope="session")
def char_export(tmp_path_factory):
    """A tiny random GPT (learned positions) with the characters of Tiny Shakespeare's first
    20,000 (60 ids), and its `gpt-keras export` into an empty base path, shared by the test files
    (read-only): `(run directory, version directory, printed text)`."""
    directory = built_once(tmp_path_factory, "char_export", _char_export)
    return (str(directory / "run"), str(directory / "models" / "shakespeare" / "1"),
            (directory / "export.txt").read_text(encoding="utf-8"))
