"""Training checkpoints: model variables (with dropout RNG state), optimizer variables and the
run's progress, in one `.npz` file written atomically (temporary file + `os.replace`)."""

import json
import os
import re
import tempfile

import numpy as np

_STEP_FILE = re.compile(r"^step-(\d{8})\.ckpt\.npz$")
BEST = "best.ckpt.npz"


def step_path(directory, step):
    return os.path.join(directory, f"step-{step:08d}.ckpt.npz")


def atomic_write(path, write):
    """Calls `write(file_object)` on a temporary file beside `path`, then renames it to `path`:
    readers see the old file or the complete new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
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


def save(path, model, optimizer, state):
    """Writes `model.variables`, `optimizer.variables` and the JSON-able `state` dict to `path`."""
    arrays = {f"model/{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update(
        {f"optimizer/{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    )
    arrays["state"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load(path, model, optimizer=None):
    """Assigns the variables saved in `path` to `model` (and `optimizer`, which must be built) and
    returns the saved state. Raises `ValueError` if the checkpoint does not fit them."""
    with np.load(path) as saved:
        for prefix, variables in [("model", model.variables)] + (
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
                        f"{path}: {prefix} variable {variable.path} has shape {variable.shape}, "
                        f"the checkpoint has {value.shape}."
                    )
                variable.assign(value)
        return json.loads(saved["state"].tobytes().decode("utf-8"))


def step_checkpoints(directory):
    """`{step: path}` of the complete step checkpoints in `directory` (temporary files ignored)."""
    if not os.path.isdir(directory):
        return {}
    return {
        int(match.group(1)): os.path.join(directory, name)
        for name in os.listdir(directory)
        if (match := _STEP_FILE.match(name))
    }


def latest(directory):
    """The path of the newest step checkpoint in `directory`, or None."""
    found = step_checkpoints(directory)
    return found[max(found)] if found else None


def prune(directory, keep):
    """Deletes all but the `keep` newest step checkpoints."""
    found = step_checkpoints(directory)
    for step in sorted(found)[:-keep] if keep > 0 else []:
        os.unlink(found[step])
