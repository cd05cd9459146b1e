"""SGD with (Nesterov) momentum and weight decay, PyTorch's semantics, arrays updated in place."""

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
    nesterov: bool = False,
) -> None:
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v, or with Nesterov momentum
    p -= lr * (d + momentum * v)  (in place, as torch.optim.SGD).

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
        if nesterov:
            # The step looks ahead along the updated velocity.
            d += np.multiply(v, momentum, out=scratch)
            p -= np.multiply(d, lr, out=scratch)
        else:
            p -= np.multiply(v, lr, out=scratch)
