"""A run's configuration, the hyperparameters a training step needs, and the learning rate of
every step: the settings that every command and every implementation read alike."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data import DATASETS
from shared.errors import CheckpointError, UsageError
from shared.layers import INPUT_SHAPE
from shared.spec import INITS

# The checkout: scripts/, shared/ and the implementations.
PROJECT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("numpy", "jax", "torch")
# Every pair of implementations, as the cross-check names them: "numpy-jax", ...
PAIRS = tuple(f"{a}-{b}" for a, b in itertools.combinations(IMPLEMENTATIONS, 2))
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("sgd", "adam", "adamw")
# Each optimizer's state tensors, one of each buffer a parameter, in PyTorch's names (its SGD
# calls the buffer momentum_buffer; ours is the same tensor).
OPTIMIZER_BUFFERS = {
    "sgd": ("momentum",),
    "adam": ("exp_avg", "exp_avg_sq", "step"),
    "adamw": ("exp_avg", "exp_avg_sq", "step"),
}
# How the pixels reach the network: standardised by the training set's mean and standard
# deviation, or raw, scaled to [0, 1] only (as torchvision's ToTensor leaves them).
PIXELS = ("standardised", "raw")
DTYPES = ("float32", "float64")
# He-initialised, the lab network's loss climbs to 3-9 within its first ten steps at rates near
# 0.01 with momentum 0.9; after about a hundred steps at lower rates it takes 0.03. So under
# the defaults' warm-up a run of fewer steps peaks lower, at lr x steps / SHORT_RUN_STEPS,
# halfway through, and comes down over its second half. `train.py --impl numpy --epochs 1
# --limit N`, seed 0, test accuracy: N=5,000 (79 steps) 79.7% (54.2% when the warm-up was held
# to at least 100 steps, outlasting the run, and the rate never came down), N=500 (8 steps)
# 58.6% (57.2%), N=10,000 (157 steps, the full peak) 83.4%.
SHORT_RUN_STEPS = 100


# scripts/speedrun.py's recipe for the lab network: the TrainConfig fields that differ from the
# defaults. Chosen on the validation split only (JAX, seeds 0-2, mean validation accuracy; every
# candidate in docs/SPEEDRUN.md): the shortest run that clears 91.5% there, which test accuracy
# trails by about half a point. 6 epochs plateau at 91.0-91.4% whatever the rate (0.05, 0.1),
# weight decay (2e-4, 1e-3), schedule or batch (64, 128); 8 epochs with flips reach 91.62%.
FAST_RECIPE = {
    "epochs": 8,
    "batch_size": 128,
    "lr": 0.1,
    "weight_decay": 2e-4,
    "schedule": "linear",
    "warmup": 0.3,
}

# scripts/speedrun.py --arch strong: the strong network's recipe to 92.5%, the lab's with more
# epochs. Chosen on the validation split only (PyTorch, seed 0; docs/SPEEDRUN.md): the shortest
# that clears 93.3% there (8 epochs 92.93%, 10 93.22%, 12 93.31%), test trailing by 0.6-0.8.
STRONG_FAST_RECIPE = {**FAST_RECIPE, "epochs": 12}

# The `deep` preset's recipe: the same at 15 epochs, the most issue 26 allows. Chosen on the
# validation split only (PyTorch, seeds 0-2; docs/TUNING.md): 12 epochs 0.06-0.1 points lower.
DEEP_RECIPE = {**FAST_RECIPE, "epochs": 15}


# `--plain`: a tutorial's run, every technique the defaults switch on switched off (plain SGD
# at a constant rate on the images as they are; flags typed beside it win).
PLAIN_RECIPE = {
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup": 0.0,
    "label_smoothing": 0.0,
    "flip": False,
    "tta": False,
}
# `--recipe NAME`: the settings each was chosen with on validation, by name (flags typed
# beside it win).
RECIPES = {
    "plain": PLAIN_RECIPE,
    "fast": FAST_RECIPE,
    "strong-fast": STRONG_FAST_RECIPE,
    "deep": DEEP_RECIPE,
}
# The rate Adam and AdamW train at when --lr is not given: PyTorch's default, where SGD's 0.03
# would diverge.
ADAM_RATE = 1e-3


@dataclass(frozen=True)
class Hyperparams:
    """What a training step needs besides its learning rate, bound once when a backend is made:
    the optimizer (SGD's momentum and Nesterov switch, Adam's betas and eps, the weight decay
    of either) and the loss's label smoothing. The defaults are plain SGD on plain
    cross-entropy."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    optimizer: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


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
    warmup: float | None = None  # epochs; None: 1, or half the run if shorter
    label_smoothing: float = 0.1
    flip: bool = True
    tta: bool | None = None  # None: as `flip`
    shift: int = 0
    erase: float = 0.0
    seed: int = 0
    limit: int | None = None
    dtype: str = "float32"
    dataset: str = "fashion-mnist"
    optimizer: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    pixels: str = "standardised"
    validation: bool = True  # hold out the last sixth of the training images to validate on
    weights: str | None = None  # SHA-256 of the file the initial weights came from, if one

    @property
    def hyperparams(self) -> Hyperparams:
        return Hyperparams(
            self.momentum,
            self.nesterov,
            self.weight_decay,
            self.label_smoothing,
            self.optimizer,
            self.beta1,
            self.beta2,
            self.eps,
        )


def real_number(value: object) -> bool:
    """Whether `value` is a real number (NumPy's too), not a bool, which Python counts as one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def python_int(value: object) -> object:
    """A NumPy integer as the Python int it is (a Bound takes Python's); anything else as
    it is."""
    is_integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return operator.index(value) if is_integer else value


@dataclass(frozen=True)
class Bound:
    """What a setting may hold, checked alike where a flag is parsed and where a checkpoint's
    stored value is read: a number of `kind` from `low` (or above it, if not `inclusive`) to
    below `below`, finite; a string among `choices`; a bool; and None where `optional`."""

    kind: type
    low: float = -math.inf
    inclusive: bool = True
    below: float = math.inf
    choices: tuple[str, ...] = ()
    optional: bool = False

    def problem(self, value: object) -> str | None:
        """Why `value` cannot be this setting, as the end of a sentence; None if it can."""
        if value is None:
            return None if self.optional else "missing"
        if self.kind is bool or isinstance(value, bool):
            return None if self.kind is bool and isinstance(value, bool) else f"not {_a(self)}"
        if self.kind is str:
            if not isinstance(value, str):
                return f"not {_a(self)}"
            if self.choices and value not in self.choices:
                return f"not one of {', '.join(self.choices)}"
            return None
        if not isinstance(value, int if self.kind is int else int | float):
            return f"not {_a(self)}"
        low_ok = value > self.low or (self.inclusive and value == self.low)
        # An int is compared exactly, however large (math.isfinite would overflow on it).
        finite = isinstance(value, int) or math.isfinite(value)
        if not (finite and low_ok and value < self.below):
            low = f"{'>=' if self.inclusive else '>'} {self._show(self.low)}"
            if self.below == math.inf:
                return f"out of range (must be {low})"
            if self.low == -math.inf:
                return f"out of range (must be < {self._show(self.below)})"
            return f"out of range (must be {low} and < {self._show(self.below)})"
        return None

    def _show(self, bound: float) -> str:
        return str(int(bound)) if self.kind is int else f"{bound:g}"

    def parse(self, text: str) -> object:
        """A flag's text as this setting; ValueError with the reason if it cannot be."""
        # Python's int and float also read "1_0" and other scripts' digits ("٣").
        if self.kind in (int, float) and (not text.isascii() or "_" in text):
            raise ValueError(f"{text!r} is not {_a(self)} in ASCII digits")
        try:
            value = self.kind(text)
        except (ValueError, OverflowError):
            raise ValueError(f"{text!r} is not {_a(self)}") from None
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{text} is {problem}")
        return value


def _a(bound: Bound) -> str:
    return {bool: "true or false", str: "a string", int: "an integer"}.get(bound.kind, "a number")


# Every TrainConfig field's bound: the flag that sets it and a checkpoint that stores it are
# checked by the same one. The network (`arch`) is checked by parsing it.
FIELDS: dict[str, Bound] = {
    "impl": Bound(str, choices=IMPLEMENTATIONS),
    "arch": Bound(str),
    "init": Bound(str, choices=INITS),
    # A run's history is kept in its checkpoint's metadata (at most 4 MiB, about 5,000 epochs).
    "epochs": Bound(int, 1, below=1001),
    "batch_size": Bound(int, 1),
    "lr": Bound(float, 0.0, inclusive=False),
    "momentum": Bound(float, 0.0, below=1.0),
    "nesterov": Bound(bool),
    "weight_decay": Bound(float, 0.0),
    "schedule": Bound(str, choices=SCHEDULES),
    "warmup": Bound(float, 0.0, optional=True),
    "label_smoothing": Bound(float, 0.0, below=1.0),
    "flip": Bound(bool),
    "tta": Bound(bool, optional=True),
    "shift": Bound(int, 0, below=INPUT_SHAPE[-1]),
    "erase": Bound(float, 0.0, below=1.0),
    # Seeds feed NumPy's generators, which take any non-negative integer; 2**63 keeps them
    # storable.
    "seed": Bound(int, 0, below=2**63),
    "limit": Bound(int, 1, optional=True),
    "dtype": Bound(str, choices=DTYPES),
    "dataset": Bound(str, choices=tuple(DATASETS)),
    "optimizer": Bound(str, choices=OPTIMIZERS),
    "beta1": Bound(float, 0.0, below=1.0),
    "beta2": Bound(float, 0.0, below=1.0),
    "eps": Bound(float, 0.0, inclusive=False),
    "pixels": Bound(str, choices=PIXELS),
    "validation": Bound(bool),
    "weights": Bound(str, optional=True),
}
# Settings added after runs were first saved, with the value those runs had: a checkpoint
# without them is of a run made with that value.
ADDED_FIELDS = {
    "optimizer": "sgd",
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "pixels": "standardised",
    "validation": True,
    "weights": None,
    "erase": 0.0,
}


def check_saved_field(name: str, value: object, source: str) -> None:
    """Refuse a checkpoint's stored config.`name` as its flag would be refused, naming the
    field (`source` names the file)."""
    problem = FIELDS[name].problem(value)
    if problem is not None:
        raise CheckpointError(f"{source}: meta field config.{name} is {shown(value)}, {problem}")


def setting_problem(name: str, value: object) -> str | None:
    """Why a saved setting `name` (a grid's variant, its results' base) cannot be `value`, as
    its flag would be refused, or that it is no setting; None if it can be."""
    return FIELDS[name].problem(value) if name in FIELDS else "not a setting"


def shown(value: object) -> str:
    """`value` for a message, cut short (a saved file may hold anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def with_added_fields(saved: dict) -> dict:
    """A saved configuration with the settings added since it was written, at the values
    its run had (ADDED_FIELDS)."""
    return {**{k: v for k, v in ADDED_FIELDS.items() if k not in saved}, **saved}


def config_from_saved(saved: dict, source: str) -> TrainConfig:
    """The TrainConfig of a checkpoint's `config` field, each value checked as its flag is
    (`source` names the file in the error)."""
    fields = TrainConfig.__dataclass_fields__
    saved = with_added_fields(saved)
    if set(saved) != set(fields):
        differ = sorted(set(saved) ^ set(fields))
        raise CheckpointError(
            f"{source}: written by another version of threefold (settings differ: "
            f"{', '.join(differ)}); cannot resume it exactly, start a new run"
        )
    for name, value in saved.items():
        check_saved_field(name, value, source)
    config = TrainConfig(**saved)
    try:
        check_config(config)
    except UsageError as e:
        raise CheckpointError(f"{source}: meta field config: {e}") from None
    return config


def averages_mirrors(flip: bool, tta: bool | None) -> bool:
    """Whether evaluation averages each image with its mirror image: as asked, or by default
    when the network was trained on flipped images (one trained without them has learnt
    left-right asymmetries that a mirror image would contradict)."""
    return flip if tta is None else tta


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of warm-up: `config.warmup` epochs, rounded to the nearest step; by default 1
    epoch, or half the run if shorter."""
    if config.warmup is None:
        return min(steps_per_epoch, config.epochs * steps_per_epoch // 2)
    return round(config.warmup * steps_per_epoch)


def peak_rate(config: TrainConfig, total_steps: int) -> float:
    """The rate a run of `total_steps` warms up to: `config.lr`, or under the defaults' warm-up
    in a run shorter than SHORT_RUN_STEPS, lr x total_steps / SHORT_RUN_STEPS."""
    if config.warmup is None and total_steps < SHORT_RUN_STEPS:
        return config.lr * total_steps / SHORT_RUN_STEPS
    return config.lr


def check_config(config: TrainConfig) -> None:
    """Refuse settings that contradict each other, naming the flags (each flag's own range is
    checked where it is parsed)."""
    used = [("--lr", config.lr), ("--weight-decay", config.weight_decay)]
    used += [("--eps", config.eps)] if config.optimizer != "sgd" else []
    dtype = np.dtype(config.dtype).type
    for flag, value in used:
        with np.errstate(over="ignore"):
            cast = float(dtype(value))
        if cast == 0.0 < value or not math.isfinite(cast):  # 1e-50 or 1e39 in float32
            became = "0" if cast == 0.0 else "inf"
            raise UsageError(f"{flag} {value:g} is {became} in {config.dtype}, which the run uses")
        if 0.0 < cast < np.finfo(dtype).tiny:  # XLA flushes it to 0: JAX alone would differ
            raise UsageError(
                f"{flag} {value:g} is subnormal in {config.dtype}, which XLA takes for 0; "
                f"give at least {np.finfo(dtype).tiny:.3g}"
            )
    # Below 1 by their ranges: a beta of 1 makes 1 - beta**t 0, which JAX's optax divides by.
    below_one = [("--label-smoothing", config.label_smoothing)]
    below_one += (
        [("--momentum", config.momentum)]
        if config.optimizer == "sgd"
        else [("--beta1", config.beta1), ("--beta2", config.beta2)]
    )
    for flag, value in below_one:
        if float(dtype(value)) == 1.0 != value:
            raise UsageError(f"{flag} {value!r} is 1 in {config.dtype}, which the run uses")
    if config.warmup is not None and config.warmup > config.epochs / 2:
        raise UsageError(
            f"--warmup {config.warmup:g} is more than half of --epochs {config.epochs}: the "
            "schedule would have no room left; shorten the warm-up or train longer"
        )


# Each optimizer's own flags: typed with another optimizer, they would change nothing.
OPTIMIZER_FLAGS = {"momentum": ("sgd",), "nesterov": ("sgd",)} | dict.fromkeys(
    ("beta1", "beta2", "eps"), ("adam", "adamw")
)


def check_flags_used(config: TrainConfig, typed: set[str]) -> None:
    """Refuse a flag the user typed that the run would not use: another optimizer's, or
    Nesterov's look-ahead without momentum, which torch.optim.SGD refuses too."""
    for name, optimizers in OPTIMIZER_FLAGS.items():
        if name in typed and config.optimizer not in optimizers:
            raise UsageError(
                f"--{name}: --optimizer {config.optimizer} does not use it (it is "
                f"{' and '.join(optimizers)}'s)"
            )
    if config.optimizer == "sgd" and config.nesterov and config.momentum == 0:
        if "nesterov" in typed:
            raise UsageError("--nesterov: needs --momentum above 0 (torch.optim.SGD's too)")
        if "momentum" in typed:  # the run would record a look-ahead it does not take
            raise UsageError(
                "--momentum 0: Nesterov's look-ahead, on by default, needs momentum; add "
                "--no-nesterov (or use --plain)"
            )


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
    if schedule == "linear":
        # Straight down to 0 at the end: with the warm-up, the triangle of fast-training records.
        return base_lr * (1 - (step - warmup_steps) / (total_steps - warmup_steps))
    raise UsageError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
