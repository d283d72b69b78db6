"""gpt_keras: a GPT language model built from Keras 3 layers on TensorFlow.

`import gpt_keras` registers `GPT` and its layers with Keras, so that
`keras.saving.load_model("model.keras")` finds them. Only the `gpt-keras` command line defers
that (it imports what each command needs), so that `gpt-keras -h` answers without TensorFlow.
"""

import importlib
import os
import sys

__version__ = "0.2.0"

_EXPORTS = {
    "GPT": "gpt_keras.model",
    "GPTConfig": "gpt_keras.config",
    "PRESETS": "gpt_keras.config",
    "num_parameters": "gpt_keras.config",
    "layers": "gpt_keras.layers",
    "load_gpt2": "gpt_keras.hf",
    "save_gpt2": "gpt_keras.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt_keras' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "layers" else getattr(module, name)


def _started_by_the_cli():
    """True in a `gpt-keras ...` or `python -m gpt_keras.cli ...` process."""
    argv = getattr(sys, "orig_argv", sys.argv)
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    module = any(a == "-m" and b == "gpt_keras.cli" for a, b in zip(argv, argv[1:]))
    return script.startswith("gpt-keras") or module


def _round_16_bit_floats_under_xla():
    """XLA on the CPU computes bfloat16 and float16 in float32 and by default skips the rounding
    between the ops it fuses ("excess precision"), so an XLA-compiled bfloat16 decoding could pick
    another token at a near-tie than the plain graph, the SavedModel and TFLite, which round after
    every op. Turned off here (no measured cost), unless `XLA_FLAGS` already sets it; XLA reads its
    flags at its first compilation, so this holds when gpt_keras is imported before it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_allow_excess_precision" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_allow_excess_precision=false".strip()


_round_16_bit_floats_under_xla()

if not _started_by_the_cli():
    from gpt_keras import model as _model  # noqa: E402,F401 (registers the Keras classes)
