"""Training checkpoints: model variables (with dropout RNG state; of a LoRA run, the adapters and
not the frozen base), optimizer variables and the run's progress, in one `.npz` file written
atomically (temporary file + `os.replace`); and the temporaries of atomic writes, named after
their writer so that a later start can tell the abandoned ones (their writer was killed) from
those still being written."""

import json
import os
import re
import shutil
import socket
import tempfile
import warnings
import zipfile
import zlib

import numpy as np

_STEP_FILE = re.compile(r"^step-(\d{8})\.ckpt\.npz$")
BEST = "best.ckpt.npz"
# What reading a truncated or corrupted `.npz` raises (a missing zip directory, a bad CRC, a
# short member, an undecodable state).
_DAMAGE = (zipfile.BadZipFile, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError)


def step_path(directory, step):
    return os.path.join(directory, f"step-{step:08d}.ckpt.npz")


def temporary_prefix(kind="tmp"):
    """`.{kind}-{pid}@{host}-`: the name prefix of a temporary file or directory of this process
    (hidden, and not a TF Serving version); `abandoned_temporaries` reads the writer from it."""
    return f".{kind}-{os.getpid()}@{socket.gethostname()}-"


def abandoned_temporaries(directory, kind="tmp"):
    """The paths in `directory` named with `temporary_prefix(kind)` by a process of this host
    that no longer runs (killed before it could clean up). Temporaries of other hosts are never
    returned: whether their writer runs cannot be known here."""
    pattern = re.compile(rf"^\.{re.escape(kind)}-(\d+)@{re.escape(socket.gethostname())}-")
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if (match := pattern.match(name)) and not _running(int(match.group(1)))]


def remove_abandoned_temporaries(directory, kind="tmp"):
    """Deletes `abandoned_temporaries(directory, kind)` (files or directories)."""
    for path in abandoned_temporaries(directory, kind):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write(path, write):
    """Calls `write(file_object)` on a temporary file beside `path`, then renames it to `path`:
    readers see the old file or the complete new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=temporary_prefix())
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def model_variables(model):
    """The variables of `model` that a checkpoint holds: `model.variables` (weights and dropout
    RNG states) less the frozen base weights of LoRA (`lora.frozen_weights`), which a LoRA run
    re-reads from its --init-from."""
    from gpt_keras.lora import frozen_weights  # imports Keras: only when a model is at hand

    frozen = {id(v) for v in frozen_weights(model)}
    return [v for v in model.variables if id(v) not in frozen]


def save(path, model, optimizer, state):
    """Writes `model_variables(model)`, `optimizer.variables` and the JSON-able `state` dict to
    `path`."""
    arrays = {f"model/{i:05d}": np.asarray(v.numpy())
              for i, v in enumerate(model_variables(model))}
    arrays.update(
        {f"optimizer/{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    )
    arrays["state"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def copy(source, path):
    """Copies the checkpoint `source` to `path` atomically."""
    with open(source, "rb") as f:
        atomic_write(path, lambda out: shutil.copyfileobj(f, out, 1 << 24))


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated or corrupted)."""


def read_state(path):
    """The state dict saved in `path` (its variables are not read)."""
    try:
        with np.load(path) as saved:
            return json.loads(saved["state"].tobytes().decode("utf-8"))
    except _DAMAGE as error:
        raise DamagedCheckpointError(f"{path} is damaged ({error})") from None


def load(path, model, optimizer=None):
    """Assigns the variables saved in `path` to `model` (`model_variables`) and `optimizer`
    (which must be built), and returns the saved state. Raises `ValueError` if the checkpoint
    does not fit them, and its subclass `DamagedCheckpointError` if the file is truncated or
    corrupted (then some variables may already be assigned)."""
    try:
        with np.load(path) as saved:
            for prefix, variables in [("model", model_variables(model))] + (
                [("optimizer", optimizer.variables)] if optimizer is not None else []
            ):
                keys = sorted(k for k in saved.files if k.startswith(prefix + "/"))
                if len(keys) != len(variables):
                    raise ValueError(
                        f"{path} holds {len(keys)} {prefix} variables but the {prefix} has "
                        f"{len(variables)}: it was written for another configuration."
                    )
                for key, variable in zip(keys, variables):
                    value = saved[key]
                    if tuple(value.shape) != tuple(variable.shape):
                        raise ValueError(
                            f"{path}: {prefix} variable {variable.path} has shape "
                            f"{variable.shape}, the checkpoint has {value.shape}."
                        )
                    variable.assign(value)
            return json.loads(saved["state"].tobytes().decode("utf-8"))
    except _DAMAGE as error:
        raise DamagedCheckpointError(f"{path} is damaged ({error})") from None


def load_newest(directory, model, optimizer=None):
    """Loads the newest intact step checkpoint of `directory` into `model` (and `optimizer`, see
    `load`) and returns `(path, state)`, or `(None, {})` if there is no step checkpoint. A
    damaged newer checkpoint (truncated by a full disk, a partial copy) is named in a warning
    and skipped; `ValueError` naming the files if none is intact."""
    found = step_checkpoints(directory)
    damaged = []
    for step in sorted(found, reverse=True):
        try:
            return found[step], load(found[step], model, optimizer)
        except DamagedCheckpointError as error:
            damaged.append(found[step])
            if len(damaged) < len(found):
                warnings.warn(f"{error}; skipping it, falling back to an older checkpoint.",
                              stacklevel=2)
    if damaged:
        raise ValueError(
            f"Every step checkpoint in {directory} is damaged (truncated or corrupted): "
            f"{', '.join(os.path.basename(p) for p in damaged)}. Restore them from a backup, "
            "or delete them to train from the start."
        )
    return None, {}


def step_checkpoints(directory):
    """`{step: path}` of the complete step checkpoints in `directory` (temporary files ignored)."""
    if not os.path.isdir(directory):
        return {}
    return {
        int(match.group(1)): os.path.join(directory, name)
        for name in os.listdir(directory)
        if (match := _STEP_FILE.match(name))
    }


def prune(directory, keep):
    """Deletes all but the `keep` newest step checkpoints."""
    found = step_checkpoints(directory)
    for step in sorted(found)[:-keep] if keep > 0 else []:
        os.unlink(found[step])
