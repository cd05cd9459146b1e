"""SGD (with Nesterov momentum and weight decay) and Adam/AdamW in PyTorch's formulations,
written out by hand.

The contract of every `impl_*/optim.py`: hyperparameters bound once, `init(params, tensors)`,
`update(params, grads, state, lr) -> (params, state)` and `tensors(state)`: the optimizer's
state tensors by buffer ("momentum"; "exp_avg", "exp_avg_sq", "step") and parameter name.
"""

from __future__ import annotations

import math

import numpy as np

from shared.spec import Params

State = dict[str, Params]  # by buffer, then parameter: the tensors themselves, updated in place


class SGD:
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v, or with Nesterov momentum
    p -= lr * (d + momentum * v): torch.optim.SGD's update."""

    BUFFERS = ("momentum",)

    def __init__(self, momentum: float, nesterov: bool, weight_decay: float):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def init(self, params: Params, tensors: State | None = None) -> State:
        """Momentum buffers: copies of the given ones, or zeros (with which the first step
        equals PyTorch's, whose buffer starts as the first gradient)."""
        return _buffers(self.BUFFERS, params, tensors)

    def update(
        self, params: Params, grads: Params, state: State, lr: float
    ) -> tuple[Params, State]:
        """One step with learning rate lr, in place: the parameters and buffers returned are
        the ones given, and the gradients are overwritten (they become d). One scratch array
        per tensor serves both products, so a step allocates nothing as large as fc1's
        weights more than once."""
        for name, p in params.items():
            d, v = grads[name], state["momentum"][name]
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

    def tensors(self, state: State) -> State:
        return state


class Adam:
    """torch.optim.Adam, or AdamW (`decoupled`): with t the step,
    g = grad (+ wd * p for Adam: L2 decay, coupled to the gradient);
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
    p -= lr * wd * p (AdamW: decoupled decay, scaled by the rate);
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps): eps outside the root."""

    BUFFERS = ("exp_avg", "exp_avg_sq", "step")

    def __init__(
        self, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool
    ):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled

    def init(self, params: Params, tensors: State | None = None) -> State:
        """Moments: copies of the given ones, or zeros and step 0 (PyTorch's start)."""
        return _buffers(self.BUFFERS, params, tensors)

    def update(
        self, params: Params, grads: Params, state: State, lr: float
    ) -> tuple[Params, State]:
        """One step with learning rate lr, in place, as torch.optim.Adam(W) takes it."""
        for name, p in params.items():
            g, m, v = grads[name], state["exp_avg"][name], state["exp_avg_sq"][name]
            step = state["step"][name]
            step += 1
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * p
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            if self.weight_decay and self.decoupled:
                p *= 1 - lr * self.weight_decay
            t = float(step)
            # Python floats, which keep a float32 tensor float32.
            denom = np.sqrt(v) / math.sqrt(1 - self.beta2**t) + self.eps
            p -= (lr / (1 - self.beta1**t)) * m / denom
        return params, state

    def tensors(self, state: State) -> State:
        return state


def _buffers(names: tuple[str, ...], params: Params, tensors: State | None) -> State:
    """Each buffer of each parameter: copies of `tensors`, or zeros (a step counter: a
    0-dimensional float, as PyTorch's)."""
    if tensors is not None:
        return {b: {n: np.array(tensors[b][n], copy=True) for n in params} for b in names}

    def zero(buffer: str, p: np.ndarray) -> np.ndarray:
        return np.zeros((), p.dtype) if buffer == "step" else np.zeros_like(p)

    return {b: {n: zero(b, p) for n, p in params.items()} for b in names}
