"""SGD with (Nesterov) momentum and weight decay from optax, in PyTorch's order, learning rate
per step."""

from __future__ import annotations

import jax
import optax


def _sgd(learning_rate, momentum, weight_decay, nesterov) -> optax.GradientTransformation:
    # d = g + wd * p (add_decayed_weights); v = momentum * v + d (trace); update = -lr * v,
    # or -lr * (d + momentum * v) with Nesterov: torch.optim.SGD's formulas.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def make_optimizer(
    momentum: float, weight_decay: float, nesterov: bool = False
) -> optax.GradientTransformation:
    """The learning rate is a hyperparameter of the state, set by `sgd_step` each step."""
    return optax.inject_hyperparams(_sgd, static_args="nesterov")(
        learning_rate=0.0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def init_velocity(optimizer: optax.GradientTransformation, params) -> optax.OptState:
    """Optimizer state with zero momentum buffers (the first step then equals PyTorch's)."""
    return optimizer.init(params)


def velocity(opt_state: optax.OptState):
    """The momentum buffers inside an optimizer state, keyed like the parameters."""
    return optax.tree_utils.tree_get(opt_state, "trace")


def with_velocity(opt_state: optax.OptState, buffers) -> optax.OptState:
    return optax.tree_utils.tree_set(opt_state, trace=buffers)


def sgd_step(optimizer, params, grads, opt_state, lr: jax.Array):
    """One step: returns (new params, new optimizer state)."""
    opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
