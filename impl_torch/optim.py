"""SGD (with Nesterov momentum and weight decay) and Adam/AdamW in PyTorch's formulations: the
functions that torch.optim.SGD.step, Adam.step and AdamW.step apply.

The contract of every `impl_*/optim.py`: hyperparameters bound once, `init(params, tensors)`,
`update(params, grads, state, lr) -> (params, state)` and `tensors(state)`: the optimizer's
state tensors by buffer ("momentum"; "exp_avg", "exp_avg_sq", "step") and parameter name.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

Params = dict[str, torch.Tensor]
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
        """One step with learning rate lr, in place, as torch.optim.SGD.step does it."""
        with torch.no_grad():
            sgd(
                list(params.values()),
                [grads[name] for name in params],
                [state["momentum"][name] for name in params],
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                lr=lr,
                dampening=0.0,
                nesterov=self.nesterov,
                maximize=False,
                # One kernel per tensor instead of five passes over it: 0.29 ms of a 7.3 ms
                # lab-network step at batch 128 became 0.08 ms.
                fused=True,
            )
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
        """One step with learning rate lr, in place, as torch.optim.Adam(W).step does it."""
        names = list(params)
        with torch.no_grad():
            (adamw if self.decoupled else adam)(
                [params[n] for n in names],
                [grads[n] for n in names],
                [state["exp_avg"][n] for n in names],
                [state["exp_avg_sq"][n] for n in names],
                [],
                [state["step"][n] for n in names],
                amsgrad=False,
                beta1=self.beta1,
                beta2=self.beta2,
                lr=lr,
                weight_decay=self.weight_decay,
                eps=self.eps,
                maximize=False,
            )
        return params, state

    def tensors(self, state: State) -> State:
        return state


def _buffers(names: tuple[str, ...], params: Params, tensors: State | None) -> State:
    """Each buffer of each parameter: copies of `tensors`, or zeros (a step counter: a
    0-dimensional float tensor, as PyTorch's)."""
    if tensors is not None:
        return {b: {n: tensors[b][n].clone() for n in params} for b in names}

    def zero(buffer: str, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=p.dtype) if buffer == "step" else torch.zeros_like(p)

    return {b: {n: zero(b, p) for n, p in params.items()} for b in names}
