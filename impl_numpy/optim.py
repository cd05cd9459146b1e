"""SGD (with Nesterov momentum and weight decay) and Adam/AdamW in PyTorch's formulations,
written out by hand.

The contract of every `impl_*/optim.py`: hyperparameters bound once, `init(params, tensors)`,
`update(params, grads, state, lr) -> (params, state)` and `tensors(state)`: the optimizer's
state tensors by buffer ("momentum"; "exp_avg", "exp_avg_sq", "step") and parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from shared.parallel import ranges_within
from shared.spec import Params

State = dict[str, Params]  # by buffer, then parameter: the tensors themselves, updated in place

# The bytes of a piece of the tensors that an update takes at a time (see _pieces), the
# tensors together: in float32 43,690 values of SGD's three (a parameter, its gradient and its
# momentum), 32,768 of Adam's four, a quarter of a Xeon's or an AMD EPYC's L2 cache and less.
PIECE_BYTES = 512 << 10


def _pieces(*tensors: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Same-shaped tensors -> views of a piece of their elements at a time (PIECE_BYTES of
    them together), the same places in each, until all are covered: the update's passes (eight
    for SGD with Nesterov momentum and weight decay) then run over pieces in the core's cache,
    not over the whole of a large tensor again and again. On the PyTorch examples' Net (1.2 M
    parameters) an SGD update took 1.27 ms in pieces of 32 K values (128 K: the same) against
    2.55 ms whole; over two threads the pieces took longer (docs/PERFORMANCE.md). The
    tensors whole if one of them is not contiguous: its flat view would be a copy, and an
    update in place would be lost."""
    if not all(t.flags.c_contiguous for t in tensors):
        yield tensors
        return
    flat = [t.reshape(-1) for t in tensors]
    row_bytes = sum(t.itemsize for t in tensors)
    for piece in ranges_within(flat[0].size, row_bytes, PIECE_BYTES):
        yield tuple(f[piece] for f in flat)


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
        """One step with learning rate lr, in place, a piece of each tensor at a time: the
        parameters and buffers returned are the ones given, and the gradients are
        overwritten (they become d). One scratch array per piece serves every product."""
        for name, p in params.items():
            for p_piece, d, v in _pieces(p, grads[name], state["momentum"][name]):
                self._update_piece(p_piece, d, v, lr)
        return params, state

    def _update_piece(self, p: np.ndarray, d: np.ndarray, v: np.ndarray, lr: float) -> None:
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
        """One step with learning rate lr, in place, as torch.optim.Adam(W) takes it, a
        piece of each tensor at a time."""
        for name, p in params.items():
            step = state["step"][name]
            step += 1
            t = float(step)
            moments = state["exp_avg"][name], state["exp_avg_sq"][name]
            for p_piece, g, m, v in _pieces(p, grads[name], *moments):
                self._update_piece(p_piece, g, m, v, lr, t)
        return params, state

    def _update_piece(
        self, p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float, t: float
    ) -> None:
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * p
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * g * g
        if self.weight_decay and self.decoupled:
            p *= 1 - lr * self.weight_decay
        # Python floats, which keep a float32 tensor float32.
        denom = np.sqrt(v) / math.sqrt(1 - self.beta2**t) + self.eps
        p -= (lr / (1 - self.beta1**t)) * m / denom

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
