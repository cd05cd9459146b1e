"""SGD with (Nesterov) momentum and weight decay: torch.optim.SGD, learning rate set per step."""

from __future__ import annotations

import torch


def make_optimizer(
    params, momentum: float, weight_decay: float, nesterov: bool = False
) -> torch.optim.SGD:
    # lr is a placeholder: `sgd_step` sets it on every step from the shared schedule.
    # PyTorch refuses Nesterov without momentum, where it is plain SGD anyway.
    return torch.optim.SGD(
        params,
        lr=0.0,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
    )


def velocity(optimizer: torch.optim.SGD, named_params) -> dict[str, torch.Tensor]:
    """The momentum buffers, keyed like the parameters (zeros before the first step)."""
    buffers = {}
    for name, p in named_params:
        buf = optimizer.state[p].get("momentum_buffer")
        buffers[name] = torch.zeros_like(p) if buf is None else buf
    return buffers


def with_velocity(optimizer: torch.optim.SGD, named_params, buffers) -> None:
    for name, p in named_params:
        optimizer.state[p]["momentum_buffer"] = buffers[name].clone()


def sgd_step(optimizer: torch.optim.SGD, lr: float) -> None:
    """Apply the gradients accumulated in `.grad` with learning rate lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
