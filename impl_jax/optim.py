"""SGD (with Nesterov momentum and weight decay) and Adam/AdamW in PyTorch's formulations,
from optax.

The contract of every `impl_*/optim.py`: hyperparameters bound once, `init(params, tensors)`,
`update(params, grads, state, lr) -> (params, state)` and `tensors(state)`: the optimizer's
state tensors by buffer ("momentum"; "exp_avg", "exp_avg_sq", "step") and parameter name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Params = dict[str, jax.Array]
State = optax.OptState  # the buffers, and the learning rate (see `update`)


def _sgd(learning_rate, momentum, weight_decay, nesterov) -> optax.GradientTransformation:
    # d = g + wd * p (add_decayed_weights); v = momentum * v + d (trace); update = -lr * v,
    # or -lr * (d + momentum * v) with Nesterov: torch.optim.SGD's formulas.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def _adam(learning_rate, b1, b2, eps, weight_decay, decoupled) -> optax.GradientTransformation:
    # optax's moments, bias correction and eps outside the root (eps_root 0) are PyTorch's;
    # adamw's decay is decoupled and scaled by the rate (-lr * wd * p), PyTorch's AdamW; Adam's
    # is L2, added to the gradient before the moments, PyTorch's Adam.
    if decoupled:
        return optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay)
    return optax.chain(
        optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1, b2, eps)
    )


class _Optax:
    """An optax transformation whose learning rate lives in its state, so that each step can
    set it and one compiled step serves every rate."""

    def __init__(self, make, static: str, **hyperparams):
        self._optax = optax.inject_hyperparams(make, static_args=static)(
            learning_rate=0.0, **hyperparams
        )

    def update(
        self, params: Params, grads: Params, state: State, lr: jax.Array
    ) -> tuple[Params, State]:
        """One step with learning rate lr -> (new parameters, new state)."""
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})
        updates, state = self._optax.update(grads, state, params)
        return optax.apply_updates(params, updates), state


class SGD(_Optax):
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v, or with Nesterov momentum
    p -= lr * (d + momentum * v): torch.optim.SGD's update."""

    BUFFERS = ("momentum",)

    def __init__(self, momentum: float, nesterov: bool, weight_decay: float):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        super().__init__(
            _sgd, "nesterov", momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )

    def init(self, params: Params, tensors: dict[str, Params] | None = None) -> State:
        """Momentum buffers: the given ones, or zeros (with which the first step equals
        PyTorch's, whose buffer starts as the first gradient)."""
        state = self._optax.init(params)
        if tensors is None:
            return state
        return optax.tree_utils.tree_set(state, trace=tensors["momentum"])

    def tensors(self, state: State) -> dict[str, Params]:
        return {"momentum": optax.tree_utils.tree_get(state, "trace")}


class Adam(_Optax):
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
        super().__init__(
            _adam, "decoupled", b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay,
            decoupled=decoupled,
        )  # fmt: skip

    def init(self, params: Params, tensors: dict[str, Params] | None = None) -> State:
        """Moments: the given ones, or zeros and step 0 (PyTorch's start). optax counts the
        steps once for all parameters, as they all step together."""
        state = self._optax.init(params)
        if tensors is None:
            return state
        step = int(next(iter(tensors["step"].values())))
        state = optax.tree_utils.tree_set(state, mu=tensors["exp_avg"], nu=tensors["exp_avg_sq"])

        # Every count: Adam's and the injected hyperparameters' (which step alike), each its
        # own buffer, as a step donates them.
        def set_count(path: tuple, leaf: jax.Array) -> jax.Array:
            is_count = getattr(path[-1], "name", None) == "count"
            return jnp.asarray(step, jnp.int32) if is_count else leaf

        return jax.tree_util.tree_map_with_path(set_count, state)

    def tensors(self, state: State) -> dict[str, Params]:
        mu = optax.tree_utils.tree_get(state, "mu")
        # Adam's own count, the last of the counts (the injected hyperparameters' comes first).
        count = optax.tree_utils.tree_get_all_with_path(state, "count")[-1][1]
        # One count, as a float step per parameter: PyTorch's form of the same state.
        steps = {name: count.astype(value.dtype) for name, value in mu.items()}
        return {"exp_avg": mu, "exp_avg_sq": optax.tree_utils.tree_get(state, "nu"), "step": steps}
