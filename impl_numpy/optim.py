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
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v  (in place, as torch.optim.SGD).

    The gradients are overwritten (they become d), and one scratch array per tensor serves
    both products, so a step allocates nothing as large as fc1's weights more than once.
    """
    for name, p in params.items():
        d, v = grads[name], velocity[name]
        scratch = np.empty_like(p)
        if weight_decay:
            d += np.multiply(p, weight_decay, out=scratch)
        v *= momentum
        v += d
        p -= np.multiply(v, lr, out=scratch)
