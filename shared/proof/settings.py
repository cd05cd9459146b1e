"""What the cross-check runs under: the settings (training configurations, planted ties,
huge logits) and the batches each comparison is made on."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from shared.backend import Backend
from shared.batches import iterate_batches
from shared.config import FAST_RECIPE, SCHEDULES, TrainConfig
from shared.data import Dataset
from shared.layers import INPUT_SHAPE, NUM_CLASSES, Linear
from shared.proof.kinks import keeps_zeros_exact
from shared.spec import Arch, Params, tensors

# The training defaults with every technique switched on, whatever the defaults choose.
ALL_ON = replace(
    TrainConfig(),
    nesterov=True,
    warmup=1,
    flip=True,
    shift=2,
    erase=0.5,
    label_smoothing=0.1,
    weight_decay=5e-4,
)


@dataclass(frozen=True)
class Setting:
    """What a group of checks runs with: the training configuration, the lockstep's warm-up
    steps, and how its batches are made (`planted_ties`: exact ReLU zeros and pooling ties;
    `logit_scale`: logits that large)."""

    name: str
    config: TrainConfig
    warmup_steps: int
    planted_ties: bool = False
    logit_scale: float | None = None
    lockstep: bool = True  # also train in lockstep (else a single pass)


def drawn_setting(seed: int, steps: int, nesterov: bool) -> Setting:
    """Every hyperparameter at a seeded non-default value, so that a constant hard-coded in one
    implementation (a momentum of 0.9, say) cannot pass; `nesterov`, the switch the defaults
    do not take (drawn, seed 0 took the defaults' Nesterov, and a hard-coded one passed)."""
    rng = np.random.default_rng([seed, 12])
    config = replace(
        ALL_ON,
        lr=float(rng.uniform(0.005, 0.2)),
        momentum=float(rng.uniform(0.5, 0.99)),
        nesterov=nesterov,
        weight_decay=float(10 ** rng.uniform(-4, -2)),
        label_smoothing=float(rng.uniform(0.02, 0.3)),
        schedule=str(rng.choice(SCHEDULES)),
        shift=int(rng.integers(1, 4)),
        erase=float(rng.uniform(0.2, 0.9)),
    )
    warmup = int(rng.integers(1, max(2, steps // 2 + 1)))
    name = (
        f"drawn: lr {config.lr:.3g}, momentum {config.momentum:.3g}"
        f"{' nesterov' if config.nesterov else ''}, wd {config.weight_decay:.2g}, smoothing "
        f"{config.label_smoothing:.3g}, {config.schedule}, warm-up {warmup}/{steps}, "
        f"shift {config.shift}, erase {config.erase:.2g}"
    )
    return Setting(name, config, warmup)


def drawn_adam(seed: int, steps: int, optimizer: str) -> Setting:
    """Adam or AdamW with every hyperparameter drawn: betas, an eps large enough to matter
    (where it sits against the square root shows), a decay strong enough that coupling it
    to the gradient or not shows."""
    rng = np.random.default_rng([seed, 13, len(optimizer)])
    config = replace(
        ALL_ON,
        optimizer=optimizer,
        lr=float(10 ** rng.uniform(-3.5, -2)),
        beta1=float(rng.uniform(0.5, 0.95)),
        beta2=float(rng.uniform(0.9, 0.999)),
        eps=float(10 ** rng.uniform(-6, -3)),
        weight_decay=float(10 ** rng.uniform(-2.5, -1)),
        label_smoothing=float(rng.uniform(0.0, 0.2)),
        schedule=str(rng.choice(SCHEDULES)),
    )
    warmup = int(rng.integers(0, max(1, steps // 2)))
    name = (
        f"drawn {'AdamW' if optimizer == 'adamw' else 'Adam'}: lr {config.lr:.3g}, betas "
        f"{config.beta1:.3g}/{config.beta2:.4g}, eps {config.eps:.2g}, wd "
        f"{config.weight_decay:.2g}, {config.schedule}, warm-up {warmup}/{steps}"
    )
    return Setting(name, config, warmup)


DEFAULTS = "defaults, all techniques on"


def check_warmup(steps: int) -> int:
    """A quarter of the steps warm up, one at least: a run of 3 steps still checks it."""
    return max(1, steps // 4)


def settings(config: TrainConfig, steps: int, seed: int, arch: Arch) -> list[Setting]:
    """The defaults with every technique on, drawn SGD, Adam and AdamW hyperparameters, huge
    logits and, where the network keeps planted zeros exact (see `planted_ties`), exact ReLU
    zeros and pooling ties."""
    base = Setting(DEFAULTS, config, check_warmup(steps) if config.warmup != 0 else 0)
    chosen = [
        base,
        # The speedrun's changes (its rate, weight decay, linear schedule) on these settings.
        Setting("fast recipe of speedrun.py", replace(config, **FAST_RECIPE), check_warmup(steps)),
        drawn_setting(seed, steps, not config.nesterov),
        drawn_adam(seed, steps, "adam"),
        drawn_adam(seed, steps, "adamw"),
        replace(
            base,
            name=f"large logits (|logit| up to {LARGE_LOGIT:g})",
            logit_scale=LARGE_LOGIT,
            lockstep=False,
        ),
    ]
    if keeps_zeros_exact(arch):
        name = "planted ties: exact ReLU zeros and pooling ties"
        chosen.append(replace(base, name=name, planted_ties=True, lockstep=False))
    return chosen


# float32's exp overflows beyond 88.7: an unstabilised softmax gives an infinite loss here.
LARGE_LOGIT = 95.0


def sample_batches(data: Dataset | None, batch_size: int, steps: int, seed: int):
    """`steps` training batches (x, y) in epoch-1 order, or seeded random images when data is
    None; without their noise (`noisy_batches`)."""
    rng = np.random.default_rng(seed)
    if data is None:
        return [
            (
                rng.standard_normal((batch_size, *INPUT_SHAPE)).astype(np.float32),
                rng.integers(0, NUM_CLASSES, batch_size),
            )
            for _ in range(steps)
        ]
    batches = itertools.islice(
        iterate_batches(data.train.x, data.train.y, batch_size, seed=seed, epoch=1), steps
    )
    return list(batches)


def noisy_batches(batches, seed: int):
    """The batches with a little fixed noise (std 0.01 of the normalised pixel scale). Real
    images' uniform backgrounds make exact ties inside max-pool windows and exact zeros at
    ReLUs, where the loss has a kink; the noise keeps the ordinary checks off those kinks,
    and the planted-ties setting puts them back on purpose."""
    rng = np.random.default_rng([seed, 1])
    return [((x + rng.normal(scale=1e-2, size=x.shape)).astype(np.float32), y) for x, y in batches]


def planted_ties(batches, params: Params, arch: Arch):
    """Noisy batches with an exact-zero block in every image (and a quarter of the images all
    zero) and every conv and linear bias zero: layer outputs there are exactly 0, so the ReLUs
    sit at their kink and every pooling window there is a tie (the noise leaves no other tie).
    Conventions all three follow: the ReLU's derivative at 0 is 0; the first maximum of a
    window (row-major) takes its gradient."""
    planted = []
    for x, y in batches:
        x = x.copy()
        x[:, :, :12, :12] = 0.0
        x[: len(x) // 4] = 0.0
        planted.append((x, y))
    biases = {name for name, tensor in tensors(arch).items() if tensor.initial == "bias"}
    return planted, {k: np.zeros_like(v) if k in biases else v for k, v in params.items()}


def scaled_logits(params: Params, arch: Arch, backend: Backend, x, masks, scale: float) -> Params:
    """The parameters with the last linear layer scaled so that the largest training-mode logit
    is `scale` (logits are linear in that layer's weight and bias when it comes last); where
    every logit is 0, its bias set to spread them over [-scale, scale]."""
    last = arch.layers[-1]
    if not isinstance(last, Linear):
        return params
    logits = backend.activations(params, x, masks)[last.name]
    peak = float(np.abs(logits).max())
    bias = f"{last.name}.bias"
    if peak == 0.0:  # a head initialised to zero scales to nothing: its bias spreads them
        if bias not in params:
            return params
        spread = np.linspace(-scale, scale, len(params[bias]))
        return {**params, bias: spread.astype(params[bias].dtype)}
    names = (f"{last.name}.weight", bias)
    return {k: (v * scale / peak).astype(v.dtype) if k in names else v for k, v in params.items()}
