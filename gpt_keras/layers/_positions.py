"""Position indices and settings shared by the positional layers."""

from keras import ops


def positions_for(start_index, length):
    """Absolute positions of `length` tokens starting at `start_index`.

    `start_index` is a Python int, a scalar tensor, or a `[B]` tensor (one start per row, e.g. for
    left-padded batches). Returns int32 `[T]` for a scalar start and `[B, T]` for a vector.
    """
    offsets = ops.arange(length, dtype="int32")  # [T]
    start = ops.convert_to_tensor(start_index, dtype="int32")
    if len(start.shape) == 0:
        return start + offsets  # [T]
    return ops.expand_dims(start, -1) + ops.expand_dims(offsets, 0)  # [B, T]


def check_max_wavelength(max_wavelength):
    """`max_wavelength` if it is a number greater than 1, else `ValueError`."""
    if (not isinstance(max_wavelength, (int, float)) or isinstance(max_wavelength, bool)
            or max_wavelength <= 1):
        raise ValueError(
            "`max_wavelength` must be a number greater than 1. "
            f"Received: max_wavelength={max_wavelength!r}"
        )
    return max_wavelength
