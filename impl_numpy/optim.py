"""SGD with momentum and weight decay, with PyTorch's semantics, updating arrays in place."""

from __future__ import annotations

import numpy as np

from shared.spec import Params


def init_velocity(params: Params) -> Params:
    """Zero momentum buffers; with them the first step equals PyTorch's (buffer = gradient)."""
    return {name: np.zeros_like(p) for name, p in params.items()}


def sgd_step(
    params: Params,
    grads: Params,
    velocity: Params,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v  (in place, as torch.optim.SGD)."""
    for name, p in params.items():
        d = grads[name] + weight_decay * p if weight_decay else grads[name]
        v = velocity[name]
        v *= momentum
        v += d
        p -= lr * v
