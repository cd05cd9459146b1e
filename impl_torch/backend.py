"""The PyTorch implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from impl_torch import layers, model, optim, use_every_core
from impl_torch.augment import augment, erase
from shared import backend


class Backend(backend.Backend):
    name = "torch"
    reference_library = "torch"
    model, optim, ops = model, optim, layers
    augment, erase = staticmethod(augment), staticmethod(erase)

    def __init__(self, *args, **kwargs):
        # Again: threefold.to_torch may have imported impl_torch first, keeping the caller's.
        use_every_core()
        super().__init__(*args, **kwargs)

    @staticmethod
    def compile(fn: Callable, static_argnames: tuple[str, ...] = (), donate: bool = False):
        # torch.compile ran the lab's step at half eager speed, and `strong`'s 1.06-1.22x faster
        # after seconds of compiling each batch shape; its kernels would be one more program
        # for the cross-check to prove (docs/PERFORMANCE.md).
        return fn

    def _array(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype))

    def _exact(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.array(value, dtype=dtype))
