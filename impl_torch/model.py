"""The network as functions of (params, x) over canonical tensors: no module, no transposes,
canonical names."""

from __future__ import annotations

import torch

from impl_torch import layers
from shared.spec import Arch, Conv, Flatten, Layer, Linear, MaxPool, ReLU

Params = dict[str, torch.Tensor]


def _layer_forward(layer: Layer, params: Params, x: torch.Tensor) -> torch.Tensor:
    match layer:
        case Conv(name, padding=padding):
            return layers.conv2d(x, params[f"{name}.weight"], params[f"{name}.bias"], padding)
        case ReLU():
            return layers.relu(x)
        case MaxPool(size=size):
            return layers.max_pool(x, size)
        case Flatten():
            return layers.flatten(x)
        case Linear(name):
            return layers.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])
    raise TypeError(f"unknown layer {layer!r}")


def activations(params: Params, x: torch.Tensor, arch: Arch) -> dict[str, torch.Tensor]:
    """Every layer's output, by layer name; x (N, 1, 28, 28) -> ..., logits (N, 10) last."""
    acts = {}
    for layer in arch.layers:
        x = _layer_forward(layer, params, x)
        acts[layer.name] = x
    return acts


def forward(params: Params, x: torch.Tensor, arch: Arch) -> torch.Tensor:
    """x (N, 1, 28, 28) -> logits (N, 10)."""
    for layer in arch.layers:
        x = _layer_forward(layer, params, x)
    return x


def loss(
    params: Params, x: torch.Tensor, y: torch.Tensor, arch: Arch, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of the network's logits against labels y (N,)."""
    return layers.cross_entropy(forward(params, x, arch), y, label_smoothing)


def loss_grads_and_logits(
    params: Params, x: torch.Tensor, y: torch.Tensor, arch: Arch, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, Params, torch.Tensor]:
    """Mean cross-entropy, its gradient for every canonical parameter, and the logits (N, 10)
    of the forward pass (for training metrics)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    logits = forward(leaves, x, arch)
    value = layers.cross_entropy(logits, y, label_smoothing)
    grads = torch.autograd.grad(value, list(leaves.values()))
    return value.detach(), dict(zip(leaves, grads, strict=True)), logits.detach()


def loss_and_grads(
    params: Params, x: torch.Tensor, y: torch.Tensor, arch: Arch, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, Params]:
    """Mean cross-entropy and its gradient for every canonical parameter."""
    value, grads, _ = loss_grads_and_logits(params, x, y, arch, label_smoothing)
    return value, grads


def input_grad(
    params: Params, x: torch.Tensor, y: torch.Tensor, arch: Arch, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Gradient of the loss with respect to the images, dx (N, 1, 28, 28)."""
    x = x.detach().requires_grad_(True)
    (dx,) = torch.autograd.grad(loss(params, x, y, arch, label_smoothing), x)
    return dx
