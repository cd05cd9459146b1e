"""What a network costs, derived from its layers: memory and work per image, and the bound
every command holds it to at the batch it really uses.

Memory is modelled per implementation from what each keeps (docs/RELIABILITY.md, "What a
network may cost"): training holds every layer's output for the backward pass and NumPy also
every unfolded convolution and pooling window, each with a gradient of its size on the way
back; the parameters come with their gradients, the optimizer's buffers and a scratch copy;
a framework adds its own working memory (JAX's compiler most). The factors are upper
envelopes of peaks measured on ten networks at two batch sizes in each implementation
(tests/test_cost.py measures more). A command that would need more than MEMORY_BUDGET is
refused before it allocates, or runs in parts: evaluation in smaller batches, a training
step on a network without batch statistics in micro-batches whose gradients add up to the
whole batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from shared.errors import UsageError
from shared.kinds import kind_of, nodes
from shared.layers import INPUT_SHAPE, Layer

# Bytes a command may spend on one network's tensors at a time: its activations, unfolded
# inputs, parameters, gradients and optimizer state. The framework's own working memory
# (OVERHEAD) comes on top, as the process's baseline does.
MEMORY_BUDGET = 2**30
# A training step's work per image, in operations: its products' multiplies and adds, and
# ELEMENTWISE_COST for every activation value it makes (element-wise work runs at a few
# G values/s where products run at 100-250 GFLOP/s: conv1275 followed by 30 tanh, at 0.096
# GFLOP an image, took a NumPy step 0.21 s an image). 2 G operations is about a second a step
# at batch 64 on a 2-core machine.
MAX_WORK_PER_IMAGE = 2_000_000_000
ELEMENTWISE_COST = 500
# Held per image in training, per value of activations and unfolded inputs (each with its
# gradient on the way back), and in evaluation per value of the widest layer.
TRAINING_FACTOR = 2.0
EVALUATION_FACTOR = 2.0
# Per parameter: itself, its gradient, the optimizer's buffers (Adam's two moments; SGD's one
# momentum) and one scratch copy in the update.
STATE_FACTOR = 5
# What a framework adds for a network whatever the batch: at most 256 MiB, JAX's compiling of
# the step (NumPy measured under 32, PyTorch under 96). Not counted against MEMORY_BUDGET.
OVERHEAD = 256 * 2**20
EVALUATION_BATCH = 1000  # images per batch in validation and evaluation, where they fit
SMALLEST_TRAINING_BATCH = 2  # what BatchNorm needs


@dataclass(frozen=True)
class Cost:
    """What one image costs a network, in values (times the dtype's bytes) and operations."""

    activations: int  # the input and every layer's output: what training keeps
    unfolded: int  # every conv's unfolded input and every pool's windows (NumPy's copies)
    widest: int  # the most one layer holds at once: its input, output and unfolded input
    parameters: int
    buffers: int
    # Operations of a training step's products (multiply and add counted apart): forward, weight
    # gradients, and input gradients for every layer but the first (nothing needs the images'
    # gradient). Element-wise work is memory traffic, not arithmetic a matmul ceiling measures.
    flops: int


@cache
def network_cost(layers: tuple[Layer, ...]) -> Cost:
    """The cost of the network of `layers` (applied to one 1x28x28 image)."""
    activations, unfolded, widest, flops = math.prod(INPUT_SHAPE), 0, 0, 0
    for node in nodes(layers):  # a block's layers, and its add
        kind, shape, after = kind_of(node.layer), node.shape, node.out
        macs, unfold = kind.macs(node.layer, shape, after), kind.unfolded(node.layer, shape, after)
        activations += math.prod(after)
        unfolded += unfold
        widest = max(widest, math.prod(shape) + math.prod(after) + unfold)
        first = node.input is None  # nothing needs the images' gradient
        flops += 2 * macs * (2 if first else 3)  # forward, dW, and dX unless first
    parameters, buffers = 0, 0
    for layer in layers:  # a block lists its layers' tensors
        for tensor in kind_of(layer).tensors(layer).values():
            if tensor.trainable:
                parameters += math.prod(tensor.shape)
            else:
                buffers += math.prod(tensor.shape)
    return Cost(activations, unfolded, widest, parameters, buffers, flops)


def training_bytes(cost: Cost, dtype: np.dtype, batch: int) -> int:
    """Bytes of the network's tensors in a training step on `batch` images, in `dtype`, in
    any implementation (its framework adds at most OVERHEAD)."""
    size = np.dtype(dtype).itemsize
    per_image = TRAINING_FACTOR * (cost.activations + cost.unfolded)
    state = STATE_FACTOR * cost.parameters + cost.buffers
    return int(size * (batch * per_image + state))


def evaluation_bytes(cost: Cost, dtype: np.dtype, batch: int) -> int:
    """Bytes of the network's tensors for the logits of `batch` images (nothing kept for a
    backward pass; the framework adds at most OVERHEAD)."""
    size = np.dtype(dtype).itemsize
    state = cost.parameters + cost.buffers
    return int(size * (batch * EVALUATION_FACTOR * cost.widest + state))


def _largest(need, budget: int) -> int:
    """The largest batch whose `need(batch)` fits `budget` (0 if not even one image)."""
    per_image = need(2) - need(1)
    return max(0, int((budget - (need(1) - per_image)) // per_image))


def largest_training_batch(cost: Cost, dtype: np.dtype) -> int:
    """The most images one training step can hold within MEMORY_BUDGET (0: not even one)."""
    return _largest(lambda b: training_bytes(cost, dtype, b), MEMORY_BUDGET)


def evaluation_batch(cost: Cost, dtype: np.dtype) -> int:
    """Images per batch for the logits: EVALUATION_BATCH, or fewer where those would not fit
    (at least 1: a network that cannot evaluate one image is refused when it is built)."""
    fits = _largest(lambda b: evaluation_bytes(cost, dtype, b), MEMORY_BUDGET)
    return max(1, min(EVALUATION_BATCH, fits))


def check_network(layers: tuple[Layer, ...], where: str) -> None:
    """Refuse a network whose step of SMALLEST_TRAINING_BATCH images would take more than
    MAX_WORK_PER_IMAGE an image or MEMORY_BUDGET, in float32; one line saying what it would
    need."""
    cost = network_cost(layers)
    work = cost.flops + ELEMENTWISE_COST * cost.activations
    if work > MAX_WORK_PER_IMAGE:
        raise UsageError(
            f"{where}: a training step takes {work / 1e9:.1f} G operations an image ("
            f"{cost.flops / 1e9:.2f} GFLOP of products, {cost.activations:,} values made), "
            f"more than the {MAX_WORK_PER_IMAGE / 1e9:g} G bound (seconds an image)"
        )
    batch = SMALLEST_TRAINING_BATCH
    need = training_bytes(cost, np.float32, batch)
    if need > MEMORY_BUDGET:
        raise UsageError(
            f"{where}: training it on {batch} images needs {show_bytes(need)}, more than the "
            f"{show_bytes(MEMORY_BUDGET)} bound ({show_bytes(need // batch)} an image)"
        )


def check_training_batch(
    cost: Cost,
    batch: int,
    dtype: np.dtype,
    where: str,
    *,
    least: int = 1,
    whole: str | None = None,
) -> None:
    """Refuse a step of `batch` images that cannot be taken within the bound, in one line
    starting with `where` (the flag at fault): a network that cannot hold even `least` images
    in `dtype` (2 for BatchNorm), or, where the step must be taken whole (`whole` says why:
    BatchNorm's statistics need the whole batch, the benchmark times whole steps), one that
    cannot hold the batch. Other steps take a large batch in parts."""
    dtype = np.dtype(dtype)
    fits = largest_training_batch(cost, dtype)
    if fits < least:
        need = show_bytes(training_bytes(cost, dtype, least))
        raise UsageError(
            f"{where}: this network cannot train in {dtype}: a step on {least} "
            f"image{'s' * (least > 1)} needs {need}, more than the "
            f"{show_bytes(MEMORY_BUDGET)} bound"
        )
    if whole is not None and batch > fits:
        need = show_bytes(training_bytes(cost, dtype, batch))
        raise UsageError(
            f"{where}: a step of this network on {batch} images needs {need} in "
            f"{dtype}, more than the {show_bytes(MEMORY_BUDGET)} bound, and {whole}; at most "
            f"{fits} images fit"
        )


def show_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"
