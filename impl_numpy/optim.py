"""SGD with (Nesterov) momentum and weight decay in PyTorch's formulation, written out by hand.

The contract of every `impl_*/optim.py`: hyperparameters bound once, `init(params, velocity)`,
`update(params, grads, state, lr) -> (params, state)` and `velocity(state)`.
"""

from __future__ import annotations

import numpy as np

from shared.spec import Params

State = Params  # the momentum buffers, keyed like the parameters


class SGD:
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v, or with Nesterov momentum
    p -= lr * (d + momentum * v): torch.optim.SGD's update."""

    def __init__(self, momentum: float, nesterov: bool, weight_decay: float):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def init(self, params: Params, velocity: Params | None = None) -> State:
        """Momentum buffers: copies of `velocity`, or zeros (with which the first step equals
        PyTorch's, whose buffer starts as the first gradient)."""
        if velocity is None:
            return {name: np.zeros_like(p) for name, p in params.items()}
        return {name: velocity[name].copy() for name in params}

    def update(
        self, params: Params, grads: Params, state: State, lr: float
    ) -> tuple[Params, State]:
        """One step with learning rate lr, in place: the parameters and buffers returned are
        the ones given, and the gradients are overwritten (they become d). One scratch array
        per tensor serves both products, so a step allocates nothing as large as fc1's
        weights more than once."""
        for name, p in params.items():
            d, v = grads[name], state[name]
            scratch = np.empty_like(p)
            if self.weight_decay:
                d += np.multiply(p, self.weight_decay, out=scratch)
            v *= self.momentum
            v += d
            if self.nesterov:
                # The step looks ahead along the updated velocity.
                d += np.multiply(v, self.momentum, out=scratch)
                p -= np.multiply(d, lr, out=scratch)
            else:
                p -= np.multiply(v, lr, out=scratch)
        return params, state

    def velocity(self, state: State) -> Params:
        """The momentum buffers, keyed like the parameters."""
        return state
