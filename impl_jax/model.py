"""The network as pure functions of (params, x): no state, no transposes, canonical names.

`masks` sets the mode: None is evaluation (BatchNorm normalises with its running statistics,
dropout is the identity); a dict with one keep-mask per dropout layer is training (BatchNorm
uses the batch's statistics and returns updated running ones, dropout applies those masks).
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax

from impl_jax import layers
from shared.layers import (
    INPUT_SHAPE,
    NUM_CLASSES,
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
    pass_steps,
    run_order,
    step_name,
)
from shared.spec import Arch, layer_trainable, split_params, state_shapes

Params = dict[str, jax.Array]
Masks = dict[str, jax.Array] | None


def layer_forward(
    layer: Layer,
    params: Params,
    x: jax.Array,
    masks: Masks,
    buffers: Params,
    outputs: Params,
    channels_last: bool = False,
) -> jax.Array:
    """The layer's output; updated BatchNorm buffers go into `buffers`, the outputs of a
    block's layers into `outputs`. `channels_last`: x lies NHWC in memory (_lies_channels_last),
    which max-pooling reads in that order (a block passes it on to its paths)."""
    match layer:
        case Residual(body=body, shortcut=shortcut):
            out = chain_forward(body, params, x, masks, buffers, outputs, channels_last)
            return out + chain_forward(shortcut, params, x, masks, buffers, outputs, channels_last)
        case Conv(name, stride=stride, padding=padding):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            return layers.conv2d(x, w, b, stride, padding)
        case Pool(op="max", size=size, stride=stride, padding=padding):
            return layers.max_pool(x, size, stride, padding, channels_last)
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


def _lies_channels_last(layer: Layer, input_channels_last: bool) -> bool:
    """Whether the layer's output lies NHWC in memory in the compiled step: a convolution's
    where it is XLA's (layers.by_xla_convolution); BatchNorm's, an activation's and dropout's
    as their input's, since XLA computes them in their producer's layout; any other's NCHW,
    the order the program names (after a block whose paths both end NHWC, a max-pool told
    so was no faster, docs/PERFORMANCE.md)."""
    match layer:
        case Conv(in_channels=in_channels):
            return layers.by_xla_convolution(in_channels)
        case BatchNorm() | Activation() | Dropout():
            return input_channels_last
    return False


def chain_vjp(
    layers: tuple[Layer, ...], params: Params, x: jax.Array, masks: Masks
) -> tuple[jax.Array, Callable[[jax.Array], Params]]:
    """The chain's output and its pullback: dout -> {"input": dx, parameter name: gradient}
    (how the profile times layers forward and backward)."""
    names = [k for layer in layers for k in layer_trainable(layer)]

    def of_inputs(inputs: Params) -> jax.Array:
        return chain_forward(layers, {**params, **inputs}, inputs["input"], masks, {}, {})

    out, pull = jax.vjp(of_inputs, {"input": x, **{k: params[k] for k in names}})
    return out, lambda dout: pull(dout)[0]


def _check_boundary(params: Params, x: jax.Array, arch: Arch, masks: Masks) -> None:
    """What every entry point takes, as the docstrings say: images x (N, 1, 28, 28) floating,
    each canonical tensor in its shape, and (training) a bool keep-mask (N, *shape) per dropout
    layer. Shapes are static, so under jax.jit this costs nothing after tracing."""
    chex.assert_rank(x, 4)
    chex.assert_shape(x, (None, *INPUT_SHAPE))
    chex.assert_type(x, float)
    for name, shape in state_shapes(arch).items():
        chex.assert_shape(params[name], shape)
    if masks is not None:
        for layer in arch.dropouts:
            chex.assert_shape(masks[layer.name], (x.shape[0], *layer.shape))
            chex.assert_type(masks[layer.name], bool)


def chain_forward(
    layers: tuple[Layer, ...],
    params: Params,
    x: jax.Array,
    masks: Masks,
    buffers: Params,
    outputs: Params,
    channels_last: bool = False,
) -> jax.Array:
    """x through `layers` a step at a time (shared.layers.pass_steps); each layer's output
    goes into `outputs` by name (a block's layers' too). A ReLU stepped with the max-pool
    over its output runs on the pooled values; its own output, recorded for `outputs`, XLA
    computes under jit only where it is returned (activations). `channels_last`: x lies NHWC
    in memory (a block's input after XLA's convolution, layer_forward)."""
    for step in pass_steps(layers):
        # The step's name on its operations in the compiled program (their op_name), forward
        # and backward: the profile's trace of a compiled step sums them by layer.
        with jax.named_scope(step_name(step)):
            if len(step) == 2:  # the ReLU's own output, on the values before pooling
                relu = step[0]
                outputs[relu.name] = layer_forward(relu, params, x, masks, buffers, outputs)
            for layer in run_order(step):
                x = layer_forward(layer, params, x, masks, buffers, outputs, channels_last)
                channels_last = _lies_channels_last(layer, channels_last)
        outputs[step[-1].name] = x
    return x


def _forward(
    params: Params, x: jax.Array, arch: Arch, masks: Masks
) -> tuple[dict[str, jax.Array], Params]:
    """Every layer's output by name (a block's layers' too), and the updated buffers
    (training only)."""
    _check_boundary(params, x, arch, masks)
    outputs, buffers = {}, {}
    logits = chain_forward(arch.layers, params, x, masks, buffers, outputs)
    chex.assert_shape(logits, (x.shape[0], NUM_CLASSES))
    return outputs, buffers


def activations(params: Params, x: jax.Array, arch: Arch, masks: Masks = None) -> Params:
    """Every layer's output, by layer name; x (N, 1, 28, 28) -> ..., logits (N, 10) last."""
    return _forward(params, x, arch, masks)[0]


def forward(params: Params, x: jax.Array, arch: Arch) -> jax.Array:
    """x (N, 1, 28, 28) -> logits (N, 10), in evaluation mode."""
    return _forward(params, x, arch, None)[0][arch.layers[-1].name]


def _loss(trainable, buffers, x, y, arch, masks, label_smoothing):
    """The training-mode loss as a function of the trainable parameters (what is
    differentiated), with (logits, updated buffers) alongside."""
    chex.assert_shape(y, (x.shape[0],))
    chex.assert_type(y, int)
    outputs, new_buffers = _forward({**buffers, **trainable}, x, arch, masks)
    logits = outputs[arch.layers[-1].name]
    return layers.cross_entropy(logits, y, label_smoothing), (logits, new_buffers)


def training_pass(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    arch: Arch,
    masks: dict[str, jax.Array],
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Params, jax.Array, Params]:
    """One training-mode pass: (mean cross-entropy, the gradient of every trainable parameter,
    the logits (N, 10), the updated BatchNorm buffers)."""
    trainable, buffers = split_params(params, arch)
    (value, (logits, new_buffers)), grads = jax.value_and_grad(_loss, has_aux=True)(
        trainable, buffers, x, y, arch, masks, label_smoothing
    )
    return value, grads, logits, new_buffers


def loss_and_grads(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    arch: Arch,
    masks: dict[str, jax.Array],
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Params]:
    """Mean cross-entropy and its gradient for every trainable parameter, in training mode."""
    value, grads, _, _ = training_pass(params, x, y, arch, masks, label_smoothing)
    return value, grads


def input_grad(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    arch: Arch,
    masks: dict[str, jax.Array],
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Gradient of the training-mode loss with respect to the images, dx (N, 1, 28, 28)."""
    trainable, buffers = split_params(params, arch)

    def loss_of_x(x):
        return _loss(trainable, buffers, x, y, arch, masks, label_smoothing)[0]

    return jax.grad(loss_of_x)(x)
