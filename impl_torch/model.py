"""The network as functions of (params, x) over canonical tensors: no module, no transposes,
canonical names. `as_module` builds the plain `nn.Module` these tensors load into.

`masks` sets the mode: None is evaluation (BatchNorm normalises with its running statistics,
dropout is the identity); a dict with one keep-mask per dropout layer is training (BatchNorm
uses the batch's statistics and returns updated running ones, dropout applies those masks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from impl_torch import layers
from shared.layers import (
    Activation,
    AdaptivePool,
    BatchNorm,
    Conv,
    Dropout,
    Flatten,
    Layer,
    Linear,
    Pool,
    Residual,
)
from shared.spec import Arch, layer_trainable, split_params

Params = dict[str, torch.Tensor]
Masks = dict[str, torch.Tensor] | None


def layer_forward(
    layer: Layer, params: Params, x: torch.Tensor, masks: Masks, buffers: Params, outputs: Params
) -> torch.Tensor:
    """The layer's output; updated BatchNorm buffers go into `buffers`, the outputs of a
    block's layers into `outputs`."""
    match layer:
        case Residual(body=body, shortcut=shortcut):
            out = chain_forward(body, params, x, masks, buffers, outputs)
            return out + chain_forward(shortcut, params, x, masks, buffers, outputs)
        case Conv(name, stride=stride, padding=padding):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            return layers.conv2d(x, w, b, stride, padding)
        case Pool(op="max", size=size, stride=stride, padding=padding):
            return layers.max_pool(x, size, stride, padding)
        case Pool(op="avg", size=size, stride=stride, padding=padding):
            return layers.avg_pool(x, size, stride, padding)
        case AdaptivePool(window=window):
            return layers.avg_pool(x, window, window)
        case BatchNorm(name, momentum=momentum, eps=eps):
            out, mean, var = layers.batch_norm(
                x,
                params[f"{name}.weight"],
                params[f"{name}.bias"],
                params[f"{name}.running_mean"],
                params[f"{name}.running_var"],
                momentum,
                eps,
                train=masks is not None,
            )
            if masks is not None:
                buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"] = mean, var
                buffers[f"{name}.num_batches_tracked"] = params[f"{name}.num_batches_tracked"] + 1
            return out
        case Dropout(name, p):
            return x if masks is None else layers.dropout(x, masks[name], p)
        case Activation(fn=fn, param=param):
            # Looked up at call time, so a test can swap one for a planted wrong variant.
            return getattr(layers, fn)(x, *([] if param is None else [param]))
        case Flatten():
            return layers.flatten(x)
        case Linear(name):
            return layers.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])
    raise TypeError(f"unknown layer {layer!r}")


def chain_vjp(
    layers: tuple[Layer, ...], params: Params, x: torch.Tensor, masks: Masks
) -> tuple[torch.Tensor, Callable[[torch.Tensor], Params]]:
    """The chain's output and its pullback: dout -> {"input": dx, parameter name: gradient}
    (how the profile times layers forward and backward)."""
    names = [k for layer in layers for k in layer_trainable(layer)]
    inputs = {"input": x, **{k: params[k] for k in names}}
    inputs = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    out = chain_forward(layers, {**params, **inputs}, inputs["input"], masks, {}, {})

    def pullback(dout: torch.Tensor) -> Params:
        return dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), dout), strict=True))

    return out, pullback


def chain_forward(
    layers: tuple[Layer, ...],
    params: Params,
    x: torch.Tensor,
    masks: Masks,
    buffers: Params,
    outputs: Params,
) -> torch.Tensor:
    """x through `layers` in turn; each layer's output goes into `outputs` by name (a block's
    layers' too)."""
    for layer in layers:
        x = layer_forward(layer, params, x, masks, buffers, outputs)
        outputs[layer.name] = x
    return x


def _forward(
    params: Params, x: torch.Tensor, arch: Arch, masks: Masks
) -> tuple[dict[str, torch.Tensor], Params]:
    """Every layer's output by name (a block's layers' too), and the updated buffers
    (training only)."""
    outputs, buffers = {}, {}
    chain_forward(arch.layers, params, x, masks, buffers, outputs)
    return outputs, buffers


def activations(params: Params, x: torch.Tensor, arch: Arch, masks: Masks = None) -> Params:
    """Every layer's output, by layer name; x (N, 1, 28, 28) -> ..., logits (N, 10) last."""
    with torch.no_grad():
        return _forward(params, x, arch, masks)[0]


def forward(params: Params, x: torch.Tensor, arch: Arch) -> torch.Tensor:
    """x (N, 1, 28, 28) -> logits (N, 10), in evaluation mode."""
    with torch.no_grad():
        return _forward(params, x, arch, None)[0][arch.layers[-1].name]


def _loss(params, x, y, arch, masks, label_smoothing):
    """The training-mode loss, with (logits, updated buffers) alongside."""
    outputs, buffers = _forward(params, x, arch, masks)
    logits = outputs[arch.layers[-1].name]
    return layers.cross_entropy(logits, y, label_smoothing), logits, buffers


def training_pass(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    arch: Arch,
    masks: dict[str, torch.Tensor],
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Params, torch.Tensor, Params]:
    """One training-mode pass: (mean cross-entropy, the gradient of every trainable parameter,
    the logits (N, 10), the updated BatchNorm buffers)."""
    trainable, buffers = split_params(params, arch)
    leaves = {k: v.detach().requires_grad_(True) for k, v in trainable.items()}
    value, logits, new_buffers = _loss({**buffers, **leaves}, x, y, arch, masks, label_smoothing)
    grads = torch.autograd.grad(value, list(leaves.values()))
    new_buffers = {k: v.detach() for k, v in new_buffers.items()}
    return value.detach(), dict(zip(leaves, grads, strict=True)), logits.detach(), new_buffers


def loss_and_grads(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    arch: Arch,
    masks: dict[str, torch.Tensor],
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Params]:
    """Mean cross-entropy and its gradient for every trainable parameter, in training mode."""
    value, grads, _, _ = training_pass(params, x, y, arch, masks, label_smoothing)
    return value, grads


def input_grad(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    arch: Arch,
    masks: dict[str, torch.Tensor],
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Gradient of the training-mode loss with respect to the images, dx (N, 1, 28, 28)."""
    x = x.detach().requires_grad_(True)
    (dx,) = torch.autograd.grad(_loss(params, x, y, arch, masks, label_smoothing)[0], x)
    return dx


def _activation_module(fn: str, param: float | None) -> torch.nn.Module:
    """PyTorch's module for an element-wise function."""
    match fn:
        case "relu":
            return torch.nn.ReLU()
        case "leakyrelu":
            return torch.nn.LeakyReLU(param)
        case "elu":
            return torch.nn.ELU(param)
        case "gelu":
            return torch.nn.GELU()
        case "gelutanh":
            return torch.nn.GELU(approximate="tanh")
        case "tanh":
            return torch.nn.Tanh()
        case "sigmoid":
            return torch.nn.Sigmoid()
    raise TypeError(f"unknown activation {fn!r}")


class Standardise(torch.nn.Module):
    """x -> (x - mean) / std: raw [0, 1] pixels as a network trained on standardised ones
    takes them. The constants are not in the state_dict, which stays the canonical tensors."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class Block(torch.nn.Module):
    """out = body(x) + downsample(x), or + x where it has no downsample: torchvision's
    BasicBlock without its last ReLU, its layers named as there (conv1, bn1, relu, ...,
    downsample.0, downsample.1)."""

    def __init__(self, body: dict[str, torch.nn.Module], downsample: torch.nn.Module | None):
        super().__init__()
        for name, module in body.items():
            self.add_module(name, module)
        self.body = list(body)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.body:
            out = self.get_submodule(name)(out)
        return out + (x if self.downsample is None else self.downsample(x))


def as_module(arch: Arch, standardise: tuple[float, float] | None = None) -> torch.nn.Sequential:
    """The network as a plain PyTorch module whose `state_dict` has exactly the canonical
    names and shapes, so `as_module(arch).load_state_dict(tensors, strict=True)` takes any
    implementation's checkpoint into ordinary PyTorch code (`module.eval()` to predict).
    With `standardise` (mean, std) it first standardises raw [0, 1] pixels, as a network
    trained on standardised pixels needs."""
    modules = {} if standardise is None else {"standardise": Standardise(*standardise)}
    modules.update({layer.name: _module(layer) for layer in arch.layers})
    return torch.nn.Sequential(OrderedDict(modules))


def _module(layer: Layer) -> torch.nn.Module:
    """PyTorch's module for one layer."""
    match layer:
        case Residual(name, body, shortcut):
            inner = {part.name.removeprefix(f"{name}."): _module(part) for part in body}
            downsample = torch.nn.Sequential(*map(_module, shortcut)) if shortcut else None
            return Block(inner, downsample)
        case Conv(_, i, o, k, stride, padding, bias):
            return torch.nn.Conv2d(i, o, k, stride, padding, bias=bias)
        case Pool(_, "max", size, stride, padding):
            return torch.nn.MaxPool2d(size, stride, padding)
        case Pool(_, "avg", size, stride, padding):
            return torch.nn.AvgPool2d(size, stride, padding)
        case AdaptivePool(_, size):
            return torch.nn.AdaptiveAvgPool2d(size)
        case BatchNorm(_, c, spatial, momentum, eps):
            kind = torch.nn.BatchNorm2d if spatial else torch.nn.BatchNorm1d
            return kind(c, eps=eps, momentum=momentum)
        case Dropout(_, p, channelwise=channelwise):
            return (torch.nn.Dropout2d if channelwise else torch.nn.Dropout)(p)
        case Activation(_, fn, param):
            return _activation_module(fn, param)
        case Flatten():
            return torch.nn.Flatten()
        case Linear(_, i, o):
            return torch.nn.Linear(i, o)
    raise TypeError(f"unknown layer {layer!r}")
