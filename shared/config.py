"""A run's configuration, the hyperparameters a training step needs, and the learning rate of
every step: the settings that every command and every implementation read alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.errors import UsageError

SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Hyperparams:
    """What a training step needs besides its learning rate, bound once when a backend is made:
    the optimizer's momentum, Nesterov switch and weight decay, and the loss's label smoothing.
    The defaults are plain SGD on plain cross-entropy."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """A run's whole configuration. The defaults were chosen on the validation split only
    (PyTorch, 15 epochs, seeds 0 to 2; figures in docs/EXPERIMENTS.md): a one-epoch warm-up
    made learning rate 0.03 usable, Nesterov momentum and flips with test-time flips each
    added a little; dropout, weight averaging and shifts did not help in 15 epochs."""

    impl: str = "numpy"
    arch: str = "lab"
    init: str = "he"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-3
    schedule: str = "cosine"
    warmup: int = 1
    label_smoothing: float = 0.1
    flip: bool = True
    tta: bool | None = None  # None: as `flip`
    shift: int = 0
    seed: int = 0
    limit: int | None = None
    dtype: str = "float32"
    dataset: str = "fashion-mnist"

    @property
    def hyperparams(self) -> Hyperparams:
        return Hyperparams(self.momentum, self.nesterov, self.weight_decay, self.label_smoothing)


def averages_mirrors(flip: bool, tta: bool | None) -> bool:
    """Whether evaluation averages each image with its mirror image: as asked, or by default
    when the network was trained on flipped images (one trained without them has learnt
    left-right asymmetries that a mirror image would contradict)."""
    return flip if tta is None else tta


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of warm-up: `config.warmup` epochs, but the last epoch always follows the schedule
    (so a 1-epoch run has none)."""
    return min(config.warmup, config.epochs - 1) * steps_per_epoch


def learning_rate(
    step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0
) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`: a linear
    rise to base_lr over the first `warmup_steps`, then the schedule over the rest."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise UsageError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
