"""SGD with (Nesterov) momentum and weight decay in PyTorch's formulation, from optax.

The contract of every `impl_*/optim.py`: hyperparameters bound once, `init(params, velocity)`,
`update(params, grads, state, lr) -> (params, state)` and `velocity(state)`.
"""

from __future__ import annotations

import jax
import optax

Params = dict[str, jax.Array]
State = optax.OptState  # holds the momentum buffers ("trace") and the learning rate


def _sgd(learning_rate, momentum, weight_decay, nesterov) -> optax.GradientTransformation:
    # d = g + wd * p (add_decayed_weights); v = momentum * v + d (trace); update = -lr * v,
    # or -lr * (d + momentum * v) with Nesterov: torch.optim.SGD's formulas.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


class SGD:
    """d = g + wd * p;  v = momentum * v + d;  p -= lr * v, or with Nesterov momentum
    p -= lr * (d + momentum * v): torch.optim.SGD's update."""

    def __init__(self, momentum: float, nesterov: bool, weight_decay: float):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        # The learning rate lives in the state, so that each step can set it (see `update`).
        self._optax = optax.inject_hyperparams(_sgd, static_args="nesterov")(
            learning_rate=0.0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )

    def init(self, params: Params, velocity: Params | None = None) -> State:
        """Momentum buffers: `velocity`, or zeros (with which the first step equals
        PyTorch's, whose buffer starts as the first gradient)."""
        state = self._optax.init(params)
        if velocity is None:
            return state
        return optax.tree_utils.tree_set(state, trace=velocity)

    def update(
        self, params: Params, grads: Params, state: State, lr: jax.Array
    ) -> tuple[Params, State]:
        """One step with learning rate lr -> (new parameters, new state)."""
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})
        updates, state = self._optax.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def velocity(self, state: State) -> Params:
        """The momentum buffers, keyed like the parameters."""
        return optax.tree_utils.tree_get(state, "trace")
