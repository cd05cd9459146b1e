"""Whether an array can be a tensor of a network: its dtype and shape, then its values. The
checks every reader of tensors shares (checkpoints, .safetensors, ONNX and PyTorch imports),
so that a tensor is refused for one reason in the same words wherever it comes from."""

from __future__ import annotations

import numpy as np

from shared.layers import Tensor

# A counter this close to int64's end would overflow within the life of any run.
MAX_COUNT = 2**62


def form_problem(tensor: Tensor, dtype: np.dtype, shape: tuple[int, ...], arch: str) -> str | None:
    """Why a stored array of `dtype` and `shape` cannot be `tensor` of the network named
    `arch` (None if it can)."""
    if tensor.counter and (dtype.kind != "i" or dtype.itemsize != 8):
        return f"has dtype {cut(str(dtype))}, not int64"
    if not tensor.counter and (dtype.kind != "f" or dtype.itemsize not in (4, 8)):
        return f"has dtype {cut(str(dtype))}, not float32 or float64"
    if shape != tensor.shape:
        return f"has shape {cut(str(shape))}, arch {arch!r} expects {tensor.shape}"
    return None


def tensor_problem(tensor: Tensor, value: np.ndarray, arch: str) -> str | None:
    """Why an array in hand cannot be `tensor` of the network named `arch`: its form, then its
    values (None if it can be)."""
    return form_problem(tensor, value.dtype, value.shape, arch) or value_problem(tensor, value)


def value_problem(tensor: Tensor, value: np.ndarray) -> str | None:
    """Why the values of `tensor` cannot be what they claim (None if they can): NaN or
    infinity in a float, a negative counter or running variance, a counter about to
    overflow."""
    if tensor.counter:
        if (value < 0).any():
            return "is negative"
        if (value > MAX_COUNT).any():
            return f"is beyond {MAX_COUNT}: the step counter would overflow int64"
        return None
    if not np.isfinite(value).all():
        return "has NaN or inf values"
    if tensor.nonnegative and (value < 0).any():
        return "has negative values, which it cannot hold (a variance, a count)"
    return None


def cut(text: str) -> str:
    """`text` cut to 60 characters, for a message."""
    return text if len(text) <= 60 else text[:57] + "..."
