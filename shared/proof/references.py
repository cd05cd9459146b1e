"""The pieces every implementation shares, checked against the frameworks' own libraries.

The cross-check compares the implementations with one another, so code they all share (the
learning-rate schedule, the label-smoothed loss formula, the metrics) would pass it even when
wrong. Here each shared piece meets an independent reference instead: optax's and PyTorch's
schedulers, `torch.nn.functional.cross_entropy` and optax's losses, and plain Python loops.
Rows are the cross-check's `Compared(check, pair, ours, theirs)`. torch, jax and optax are
imported inside the functions that use them, so that `shared` imports without them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

import shared.config
from shared import metrics
from shared.config import SCHEDULES, TrainConfig
from shared.layers import NUM_CLASSES
from shared.proof.rows import Compared

Libraries = tuple[str, ...]
LIBRARIES: Libraries = ("torch", "optax")  # every library the shared code has references in

# logits (N, K), labels (N,), label smoothing -> mean loss (), dlogits (N, K)
LossFn = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]

# float64 rows (schedules, metrics, float64 losses) differ by round-off only: ~1e-16 a step,
# 3e-15 after the ~14000 recursive steps of a 15-epoch torch schedule, so 1e-12 is far above
# that and far below any real bug. float32 rows (both sides compute in float32): unit
# round-off 6e-8 grown by a log-sum-exp over 10 classes and a mean over 8 examples stays under
# 1e-6 (3e-7 measured); 1e-5 keeps that margin while a wrong smoothing target (eps / (K - 1)
# at eps 0.1) moves them by 6e-4 or more.
FLOAT32_TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-12


def tolerance(ours: np.ndarray) -> float:
    """The relative tolerance of a row, by the dtype of its `ours` array (float64 unless
    float32: schedules and metrics are exact up to float64 round-off)."""
    return FLOAT32_TOLERANCE if np.asarray(ours).dtype == np.float32 else FLOAT64_TOLERANCE


def schedule_ours(config: TrainConfig, total_steps: int, warmup_steps: int) -> np.ndarray:
    """shared.config.learning_rate of steps 0..total_steps-1 -> (total_steps,) float64."""
    return np.array(
        [
            shared.config.learning_rate(step, total_steps, config.lr, config.schedule, warmup_steps)
            for step in range(total_steps)
        ]
    )


def schedule_optax(config: TrainConfig, total_steps: int, warmup_steps: int) -> np.ndarray:
    """The same schedule built from optax's schedules -> (total_steps,) float64.

    optax calls a schedule with the count of updates so far, 0 for the first, like our step.
    Our warm-up gives step s the rate (s + 1) / W * lr, so it is linear_schedule from lr / W
    to lr over W - 1 transitions (W = 1: optax holds init_value = lr, as we do). optax's own
    warmup_cosine_decay_schedule(0, lr, W, T) differs: it starts from 0 and reaches lr at
    step W, i.e. its warm-up is ours one step later, while its cosine part equals ours.
    The cosine part (cosine_decay_schedule needs T - W > 0) exists only if steps reach it.
    """
    import jax
    import jax.numpy as jnp
    import optax

    lr, warm = config.lr, warmup_steps
    parts = [optax.linear_schedule(lr / warm, lr, warm - 1)] if warm else []
    if config.schedule == "cosine" and warm < total_steps:
        parts.append(optax.cosine_decay_schedule(lr, total_steps - warm))
    elif config.schedule == "linear" and warm < total_steps:
        parts.append(optax.linear_schedule(lr, 0.0, total_steps - warm))
    elif config.schedule == "constant":
        parts.append(optax.constant_schedule(lr))
    # A list of one schedule with no boundaries is that schedule.
    schedule = optax.join_schedules(parts, [warm] * (len(parts) - 1))
    # vmap: a constant schedule returns one scalar whatever its count. jit: one compilation
    # (~0.1 s) instead of one for each operation at each new length (~0.4 s).
    with jax.enable_x64(True):
        return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total_steps)), np.float64)


def schedule_torch(config: TrainConfig, total_steps: int, warmup_steps: int) -> np.ndarray:
    """The same schedule driven by torch.optim.lr_scheduler on a real SGD optimizer over a
    dummy parameter, reading the rate each step uses -> (total_steps,) float64.

    LinearLR scales lr by start + (end - start) * min(e, total_iters) / total_iters at epoch
    e; start 1 / W, end 1 over W - 1 iterations gives our (s + 1) / W (W = 1: the factor is 1
    from the start). CosineAnnealingLR(T_max=T - W, eta_min=0) is our cosine after the
    warm-up, and LinearLR(1, 0, T - W) our linear decay; SequentialLR restarts either at epoch
    0 at milestone W. The constant schedule needs
    no scheduler after the warm-up: LinearLR holds end_factor once past total_iters.
    """
    import torch
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warm = warmup_steps
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=config.lr)
    parts: list[torch.optim.lr_scheduler.LRScheduler] = []
    if warm:
        parts.append(LinearLR(optimizer, 1 / warm, 1.0, total_iters=warm - 1))
    if config.schedule == "cosine" and warm < total_steps:
        parts.append(CosineAnnealingLR(optimizer, T_max=total_steps - warm))
    if config.schedule == "linear" and warm < total_steps:
        parts.append(LinearLR(optimizer, 1.0, 0.0, total_iters=total_steps - warm))
    if len(parts) == 2:
        parts = [SequentialLR(optimizer, parts, milestones=[warm])]
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # before the scheduler's step, as in training (torch warns otherwise)
        for scheduler in parts:
            scheduler.step()
    return np.array(rates)


def schedule_checks(
    config: TrainConfig, total_steps: int, warmup_steps: int, libraries: Libraries = LIBRARIES
) -> Iterator[Compared]:
    """Our schedule of every step against each of `libraries`' (optax's, PyTorch's)."""
    check = f"schedule {config.schedule}, warm-up {warmup_steps} of {total_steps}"
    ours = schedule_ours(config, total_steps, warmup_steps)
    for library, schedule in SCHEDULES_OF.items():
        if library in libraries:
            theirs = schedule(config, total_steps, warmup_steps)
            yield Compared(check, f"shared-{library}", ours, theirs)


def loss_batches(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (logits (8, 10), labels (8,)): a float64 batch, and float32 logits in 90-100,
    where exp overflows float32 (above 88.7) unless the maximum is subtracted first."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, 8)
    return {
        "float64": (3 * rng.standard_normal((8, NUM_CLASSES)), labels),
        "float32 logits 90-100": (
            rng.uniform(90, 100, (8, NUM_CLASSES)).astype(np.float32),
            labels,
        ),
    }


def loss_torch(
    logits: np.ndarray, labels: np.ndarray, smoothing: float
) -> tuple[np.ndarray, np.ndarray]:
    """F.cross_entropy (mean, target (1 - eps) * one_hot + eps / K) and its autograd
    gradient -> (loss (), dlogits (N, K)), in the logits' dtype."""
    import torch
    import torch.nn.functional as F

    z = torch.tensor(logits, requires_grad=True)
    loss = F.cross_entropy(z, torch.from_numpy(labels), label_smoothing=smoothing)
    loss.backward()
    return loss.detach().numpy(), z.grad.numpy()


@functools.cache
def _optax_loss_and_grad() -> Callable:
    """jit(value_and_grad) of (logits (N, K), labels (N,), eps) -> mean loss, built once so
    that its compilations are reused across calls."""
    import jax
    import optax

    def mean_loss(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
        one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, smoothing)).mean()

    return jax.jit(jax.value_and_grad(mean_loss))


def loss_optax(
    logits: np.ndarray, labels: np.ndarray, smoothing: float
) -> tuple[np.ndarray, np.ndarray]:
    """optax.softmax_cross_entropy against optax.smooth_labels(one_hot, eps), which is
    (1 - eps) * one_hot + eps / K as in PyTorch, averaged, and its jax.grad
    -> (loss (), dlogits (N, K)), in the logits' dtype."""
    import jax

    with jax.enable_x64(True):
        loss, grad = _optax_loss_and_grad()(logits, labels, smoothing)
        return np.asarray(loss), np.asarray(grad)


# The libraries the shared code is checked against (LIBRARIES), by name: each one's schedule
# and loss.
SCHEDULES_OF = {"optax": schedule_optax, "torch": schedule_torch}
LOSSES_OF = {"torch": loss_torch, "optax": loss_optax}


def loss_checks(
    ours: LossFn, smoothing: float, seed: int, libraries: Libraries = LIBRARIES
) -> Iterator[Compared]:
    """A loss layer's loss and dlogits with label smoothing (`ours`: NumPy's, written by
    hand), and shared.metrics.cross_entropy (no smoothing, float64), against each of
    `libraries` (PyTorch, optax) on each of `loss_batches`."""
    for name, (logits, labels) in loss_batches(seed).items():
        loss, dlogits = ours(logits, labels, smoothing)
        # metrics.cross_entropy works in float64 whatever the logits, so its references do too.
        evaluated = np.array(metrics.cross_entropy(logits, labels))
        wide = logits.astype(np.float64)
        for library, reference in LOSSES_OF.items():
            if library not in libraries:
                continue
            their_loss, their_dlogits = reference(logits, labels, smoothing)
            pair = f"numpy-{library}"
            yield Compared(f"loss, smoothing {smoothing:g}, {name}", pair, loss, their_loss)
            yield Compared(
                f"dlogits, smoothing {smoothing:g}, {name}", pair, dlogits, their_dlogits
            )
            their_evaluated = reference(wide, labels, 0.0)[0]
            check = f"metrics cross-entropy, {name}"
            yield Compared(check, f"metrics-{library}", evaluated, their_evaluated)


def metric_batch(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits (12, 4), labels (12,), K = 4): the last class has no example, though it may
    be predicted."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((12, 4)), rng.integers(0, 3, 12), 4


def predicted_by_loop(logits: np.ndarray) -> list[int]:
    """The index of each row's first largest entry, as argmax."""
    return [row.index(max(row)) for row in logits.tolist()]


def per_class_by_loop(predicted: list[int], labels: list[int], num_classes: int) -> list:
    """Share of each true class predicted correctly, None for a class without examples."""
    shares = []
    for k in range(num_classes):
        of_class = [p for p, y in zip(predicted, labels, strict=True) if y == k]
        shares.append(sum(p == k for p in of_class) / len(of_class) if of_class else None)
    return shares


def as_shares(shares: list[float | None]) -> np.ndarray:
    """per-class shares -> (K,) float64, None as -1: no share is negative, and compare()
    fails on NaN."""
    return np.array([-1.0 if s is None else s for s in shares])


def metric_checks(seed: int) -> Iterator[Compared]:
    """accuracy, confusion_matrix and per_class_accuracy against explicit loops over the
    examples."""
    logits, labels, k = metric_batch(seed)
    predicted, truth = predicted_by_loop(logits), labels.tolist()
    correct = sum(p == y for p, y in zip(predicted, truth, strict=True))
    counts = np.zeros((k, k), dtype=np.int64)
    for p, y in zip(predicted, truth, strict=True):
        counts[y, p] += 1
    cm = metrics.confusion_matrix(logits.argmax(axis=1), labels, k)
    ours_accuracy = np.array(metrics.accuracy(logits, labels))
    yield Compared("accuracy", "metrics-loop", ours_accuracy, np.array(correct / len(truth)))
    yield Compared("confusion matrix", "metrics-loop", cm, counts)
    yield Compared(
        "per-class accuracy (-1: no example)",
        "metrics-loop",
        as_shares(metrics.per_class_accuracy(cm)),
        as_shares(per_class_by_loop(predicted, truth, k)),
    )


def reference_checks(
    config: TrainConfig,
    total_steps: int,
    warmup_steps: int,
    seed: int,
    loss: LossFn,
    libraries: Libraries = LIBRARIES,
) -> Iterator[Compared]:
    """Rows for every schedule (`config`'s first) over `total_steps` with `warmup_steps`, the
    `loss` layer with `config.label_smoothing`, and the metrics, against `libraries` (a
    library not installed is left out by the caller); `seed` draws the batches. Tolerances:
    `tolerance(row.a)`."""
    schedules = sorted(SCHEDULES, key=lambda s: s != config.schedule)
    return itertools.chain(
        *(
            schedule_checks(replace(config, schedule=s), total_steps, warmup_steps, libraries)
            for s in schedules
        ),
        loss_checks(loss, config.label_smoothing, seed, libraries),
        metric_checks(seed),
    )
