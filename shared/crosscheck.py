"""Proof that the three implementations compute the same thing, tensor by tensor.

For identical weights and batches every pair of implementations is compared on each layer's
activations, the loss, every parameter gradient and the input gradient; then on an SGD run
in lockstep; and the NumPy gradients against central finite differences.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from shared.backend import IMPLEMENTATIONS, Backend, make_backend, predict
from shared.batches import dropout_masks, iterate_batches, training_batches
from shared.checkpoint import load_checkpoint
from shared.cli import positive_int, run_cli, seed_type
from shared.config import DTYPES, FAST_RECIPE, SCHEDULES, TrainConfig, learning_rate
from shared.data import FASHION_MNIST, Dataset, load_dataset
from shared.errors import UsageError
from shared.io import write_json
from shared.outputs import check_out_file
from shared.references import reference_checks, tolerance
from shared.spec import (
    IMAGE_SHAPE,
    Activation,
    Arch,
    Conv,
    Linear,
    Params,
    Pool,
    get_arch,
    init_params,
    output_shape,
    split_params,
)

# Relative error is max|a - b| / max|b|: the worst difference measured against the tensor's
# own scale, so tiny entries of a large tensor do not dominate.
# float64: differences are round-off (unit round-off 1.1e-16) grown by sums of at most 6272
# terms and a few layers, so 1e-9 is far above them and far below any real bug.
# float32: unit round-off 6e-8; a 6272-term sum in another order, then several layers,
# leaves ~1e-6 relative; 1e-4 keeps a 100x margin while a wrong factor or layout gives O(1).
# In lockstep, float64 runs carry their differences through 20 steps and momentum (still round-
# off, far below 1e-9); float32 restarts every step from a shared state (see `lockstep`), so a
# step's difference is its own, and the single pass's 1e-4 holds.
# Finite differences with step 1e-6 in float64 are accurate to ~1e-9 relative to the gradient.
TOLERANCES = {
    ("float64", "pass"): 1e-9,
    ("float64", "lockstep"): 1e-9,
    ("float32", "pass"): 1e-4,
    ("float32", "lockstep"): 1e-4,
    ("float64", "finite-diff"): 1e-6,
}
FD_STEP = 1e-6
# The training defaults with every technique switched on, whatever the defaults choose.
ALL_ON = replace(
    TrainConfig(),
    nesterov=True,
    warmup=1,
    flip=True,
    shift=2,
    label_smoothing=0.1,
    weight_decay=5e-4,
)


@dataclass(frozen=True)
class CheckResult:
    """One row of the cross-check: the worst difference of one tensor between a pair, under
    one setting (the hyperparameters or the planted batch the row ran with). `dtypes` is the
    pair's dtype, or both when they differ; a row passes only within tolerance and with both
    in `expected_dtype` (None: no dtype to check)."""

    dtype: str
    arch: str
    setting: str
    check: str
    pair: str
    max_abs: float
    max_rel: float
    tolerance: float
    dtypes: str = ""
    expected_dtype: str | None = None

    @property
    def passed(self) -> bool:
        dtype_ok = self.expected_dtype is None or self.dtypes == self.expected_dtype
        return self.max_rel <= self.tolerance and dtype_ok

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare(a: np.ndarray, b: np.ndarray, scale: float = 0.0) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(|a|, |b|, scale)); shapes must match exactly.

    `scale` is the size of the tensor's family (every gradient of the pass, say): a tensor
    that is zero in exact arithmetic, such as the gradient of a conv bias that BatchNorm
    follows (BatchNorm subtracts the mean the bias adds), is pure round-off in every
    implementation, and is measured against its family rather than against itself."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b)), scale))
    if not np.isfinite(diff):
        return float("inf"), float("inf")
    return diff, (diff / scale if scale > 0 else 0.0)


def _dtypes(a: np.ndarray, b: np.ndarray) -> str:
    a, b = np.asarray(a).dtype, np.asarray(b).dtype
    return str(a) if a == b else f"{a}/{b}"


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


def drawn_setting(seed: int, steps: int) -> Setting:
    """Every hyperparameter at a seeded non-default value, so that a constant hard-coded in one
    implementation (a momentum of 0.9, say) cannot pass."""
    rng = np.random.default_rng([seed, 12])
    config = replace(
        ALL_ON,
        lr=float(rng.uniform(0.005, 0.2)),
        momentum=float(rng.uniform(0.5, 0.99)),
        nesterov=bool(rng.integers(2)),
        weight_decay=float(10 ** rng.uniform(-4, -2)),
        label_smoothing=float(rng.uniform(0.02, 0.3)),
        schedule=str(rng.choice(SCHEDULES)),
        shift=int(rng.integers(1, 4)),
    )
    warmup = int(rng.integers(1, max(2, steps // 2 + 1)))
    name = (
        f"drawn: lr {config.lr:.3g}, momentum {config.momentum:.3g}"
        f"{' nesterov' if config.nesterov else ''}, wd {config.weight_decay:.2g}, smoothing "
        f"{config.label_smoothing:.3g}, {config.schedule}, warm-up {warmup}/{steps}, "
        f"shift {config.shift}"
    )
    return Setting(name, config, warmup)


DEFAULTS = "defaults, all techniques on"


def settings(config: TrainConfig, steps: int, seed: int, arch: Arch) -> list[Setting]:
    """The defaults with every technique on, drawn hyperparameters, huge logits and, where the
    network keeps planted zeros exact (see `planted_ties`), exact ReLU zeros and pooling ties."""
    base = Setting(DEFAULTS, config, steps // 4 if config.warmup != 0 else 0)
    chosen = [
        base,
        # The speedrun's changes (its rate, weight decay, linear schedule) on these settings.
        Setting("fast recipe of speedrun.py", replace(config, **FAST_RECIPE), steps // 4),
        drawn_setting(seed, steps),
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


def keeps_zeros_exact(arch: Arch) -> bool:
    """Whether a block of exact zeros stays exact zeros through the network (with zero biases):
    BatchNorm subtracts a batch mean and sigmoid(0) is 1/2, after which equal values come from
    sums in orders that differ by implementation, and ties are decided by round-off."""
    sigmoid = any(isinstance(layer, Activation) and layer.fn == "sigmoid" for layer in arch.layers)
    return not (arch.has_batch_norm or sigmoid)


# float32's exp overflows beyond 88.7: an unstabilised softmax gives an infinite loss here.
LARGE_LOGIT = 95.0


def sample_batches(data: Dataset | None, batch_size: int, steps: int, seed: int):
    """`steps` training batches (x, y) in epoch-1 order, or seeded random images when data is
    None; without their noise (`noisy_batches`)."""
    rng = np.random.default_rng(seed)
    if data is None:
        return [
            (
                rng.standard_normal((batch_size, 1, 28, 28)).astype(np.float32),
                rng.integers(0, 10, batch_size),
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


# A float32 pass starts from a batch whose every ReLU input and every max-pool window's gap
# between its two largest values is at least this share of the layer's scale away from a kink
# (measured in float64): round-off (~1e-7 of the scale) then cannot decide a ReLU or a window's
# maximum differently in two implementations, which would swap whole gradient terms.
KINK_MARGIN = 1e-6
# Among n kinks the nearest lies about 1/n of the scale away, so a batch of more than a few
# hundred thousand cannot be found 1e-6 from all of them by chance: `strong` has 47,168 per
# image, and at 32 images float32 rounding flips a unit and fails `grad input` at 2.9e-2.
KINKS_PER_BATCH = 400_000
BATCH_SIZE = 32  # the cross-check's batch for a network with few kinks


def kinks_per_image(arch: Arch) -> int:
    """How many kinks one image passes: every ReLU input and every max-pool window."""
    shape, count = IMAGE_SHAPE, 0
    for layer in arch.layers:
        after = output_shape(layer, shape)
        if isinstance(layer, Activation) and layer.fn == "relu":
            count += math.prod(shape)
        if isinstance(layer, Pool) and layer.op == "max":
            count += math.prod(after)
        shape = after
    return count


def batch_size_for(arch: Arch, largest: int = BATCH_SIZE) -> int:
    """The cross-check's batch for `arch`: `largest` images, fewer where the float32 pass could
    not be put KINK_MARGIN away from every kink (at least 2, for BatchNorm)."""
    return max(2, min(largest, KINKS_PER_BATCH // max(kinks_per_image(arch), 1)))


def _kinks(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> Iterator[tuple]:
    """(kind, values, scale) for every kink of a pass: each ReLU's inputs, and each max-pool's
    windows (N, C, H', W', k*k), with the scale of the layer's input."""
    inputs = [x] + [acts[layer.name] for layer in arch.layers[:-1]]
    for layer, before in zip(arch.layers, inputs, strict=True):
        scale = float(np.abs(before).max()) or 1.0
        if isinstance(layer, Activation) and layer.fn == "relu":
            yield "relu", before, scale
        if isinstance(layer, Pool) and layer.op == "max":
            k, s = layer.size, layer.stride
            windows = sliding_window_view(before, (k, k), axis=(2, 3))[:, :, ::s, ::s]
            yield "max", windows.reshape(*windows.shape[:4], -1), scale


def kink_margin(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> float:
    """The smallest distance to a kink, relative to its layer's scale: of any ReLU's input
    from 0, and of any max-pool window's largest value from its second largest. Windows whose
    maximum is an exact 0 are left out: after a ReLU those zeros take no gradient whichever
    wins, and the ReLU's own margin covers them."""
    margins = [np.inf]
    for kind, values, scale in _kinks(arch, acts, x):
        if kind == "relu":
            margins.append(float(np.abs(values).min()) / scale)
        else:
            top2 = np.sort(values, axis=-1)[..., -2:]
            gaps = np.where(top2[..., 1] == 0, np.inf, top2[..., 1] - top2[..., 0])
            margins.append(float(gaps.min()) / scale)
    return min(margins)


def kink_state(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Which side of every kink a pass is on: each ReLU's input sign, each window's argmax."""
    return [
        values > 0 if kind == "relu" else values.argmax(axis=-1)
        for kind, values, _ in _kinks(arch, acts, x)
    ]


def away_from_kinks(backend64: Backend, arch: Arch, params: Params, x, masks, seed: int):
    """x plus the first of a few seeded noises (std 0.01) that puts the float64 training pass
    at least KINK_MARGIN from every kink; x with the last noise tried if none does."""
    params64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in params.items()}
    for attempt in range(20):
        noise = np.random.default_rng([seed, 2, attempt]).normal(scale=1e-2, size=x.shape)
        candidate = (x + noise).astype(x.dtype)
        acts = backend64.activations(params64, candidate.astype(np.float64), masks)
        if kink_margin(arch, acts, candidate) >= KINK_MARGIN:
            break
    return candidate


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
    biases = {f"{layer.name}.bias" for layer in arch.layers if isinstance(layer, Conv | Linear)}
    return planted, {k: np.zeros_like(v) if k in biases else v for k, v in params.items()}


def scaled_logits(params: Params, arch: Arch, backend: Backend, x, masks, scale: float) -> Params:
    """The parameters with the last linear layer scaled so that the largest training-mode logit
    is `scale` (logits are linear in that layer's weight and bias when it comes last)."""
    last = arch.layers[-1]
    if not isinstance(last, Linear):
        return params
    logits = backend.activations(params, x, masks)[last.name]
    factor = scale / float(np.abs(logits).max())
    names = (f"{last.name}.weight", f"{last.name}.bias")
    return {k: (v * factor).astype(v.dtype) if k in names else v for k, v in params.items()}


def _pairs(results: dict[str, object]) -> Iterator[tuple[str, object, object]]:
    for a, b in itertools.combinations(results, 2):
        yield f"{a}-{b}", results[a], results[b]


def single_pass(
    backends: dict[str, Backend],
    arch: Arch,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(check, pair, a, b) for every layer's output in evaluation and in training mode, the
    loss, every parameter gradient, the input gradient, and each dropout layer's mask against
    the shared one."""
    evals = {name: b.activations(params, x) for name, b in backends.items()}
    trains = {name: b.activations(params, x, masks) for name, b in backends.items()}
    grads = {name: b.loss_and_grads(params, x, y, masks) for name, b in backends.items()}
    dx = {name: b.input_grad(params, x, y, masks) for name, b in backends.items()}
    for mode, acts in (("eval", evals), ("train", trains)):
        for pair, a, b in _pairs(acts):
            for layer in arch.layers:
                label = "logits" if layer is arch.layers[-1] else f"activation {layer.name}"
                yield f"{label} ({mode})", pair, a[layer.name], b[layer.name]
    for pair, (loss_a, grads_a), (loss_b, grads_b) in _pairs(grads):
        yield "loss", pair, loss_a, loss_b
        scale = _largest(grads_a.values())
        for name in grads_a:
            yield f"grad {name}", pair, grads_a[name], grads_b[name], scale
    for pair, a, b in _pairs(dx):
        yield "grad input", pair, a, b
    inputs = dict(zip([layer.name for layer in arch.layers[1:]], arch.layers, strict=False))
    for layer in arch.dropouts:
        before = inputs.get(layer.name)
        for name, acts in trains.items():
            x_in = x if before is None else acts[before.name]
            # Where the input is 0 the output is 0 either way: count those as the shared mask.
            applied = (acts[layer.name] != 0) | ((x_in == 0) & masks[layer.name])
            yield f"dropout mask {layer.name}", f"{name}-shared", applied, masks[layer.name]


def lockstep(
    backends: dict[str, Backend],
    arch: Arch,
    params: Params,
    batches,
    setting: Setting,
    resync: bool,
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Run SGD from the same start on the same batches; compare losses, every tensor
    (parameters and BatchNorm's running statistics) and the momentum buffers after every
    step. With `resync`, each step starts every implementation from the first one's state, so
    a difference is that step's own.

    Why float32 resyncs: a ReLU input within float32 round-off of zero (about 1e-6; one in the
    20 default steps on real data) is on for one implementation and off for another, which
    changes a whole row of fc1's gradient; carried forward, that one rounding decision would
    be all the comparison measures. float64 carries the runs through without it.
    """
    config = setting.config
    steps, size = len(batches), len(batches[0][1])
    x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    # The concatenated batches in order, augmented and masked as training would do it.
    plan = list(
        training_batches(
            len(y),
            size,
            seed=0,
            epoch=0,
            fill=FASHION_MNIST.background,
            flip=config.flip,
            shift=config.shift,
            shuffle=False,
            dropouts=arch.dropouts,
        )
    )
    data = {name: backend.put_data(x, y) for name, backend in backends.items()}
    states = {name: backend.init_state(params) for name, backend in backends.items()}
    runs: dict[str, list] = {name: [] for name in backends}  # (loss, tensors, velocity) a step
    for step, batch in enumerate(plan):
        lr = learning_rate(step, steps, config.lr, config.schedule, setting.warmup_steps)
        for name, backend in backends.items():
            states[name], loss, _ = backend.train_step(states[name], data[name], batch, lr)
            runs[name].append((loss, backend.params(states[name]), backend.velocity(states[name])))
        if resync:
            _, p, v = runs[next(iter(backends))][-1]
            states = {name: backend.init_state(p, v) for name, backend in backends.items()}
    trainable = arch.trainable
    for pair, run_a, run_b in _pairs(runs):
        yield f"lockstep loss x{steps}", pair, _stacked(run_a, 0), _stacked(run_b, 0)
        weights = _largest(_stacked(run_a, 1, name) for name in trainable)
        velocities = _largest(_stacked(run_a, 2, name) for name in trainable)
        for name in params:
            a, b = _stacked(run_a, 1, name), _stacked(run_b, 1, name)
            yield f"lockstep {name}", pair, a, b, weights if name in trainable else 0.0
            if not config.momentum or name not in trainable:
                continue  # without momentum there are no buffers: PyTorch keeps none
            a, b = _stacked(run_a, 2, name), _stacked(run_b, 2, name)
            yield f"lockstep momentum {name}", pair, a, b, velocities


def _largest(tensors) -> float:
    """The largest magnitude in any of the tensors: their family's scale for `compare`."""
    return max((float(np.abs(t).max()) for t in tensors if np.size(t)), default=0.0)


def _stacked(run: list, field: int, name: str | None = None) -> np.ndarray:
    """One quantity of every step of a lockstep run, stacked (steps, ...)."""
    return np.stack([np.asarray(s[field] if name is None else s[field][name]) for s in run])


def finite_difference_grads(
    backend: Backend,
    arch: Arch,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
    per_tensor: int,
    seed: int,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(tensor, analytic, numeric) on `per_tensor` random entries of every trainable parameter
    and of x, in training mode. An entry whose step moves the pass across a kink (a ReLU's
    sign, a max-pool window's argmax) is passed over for another: the loss has no derivative
    there for a central difference to approximate."""
    rng = np.random.default_rng(seed)
    _, grads = backend.loss_and_grads(params, x, y, masks)
    tensors = {**split_params(params, arch)[0], "input": x}
    analytic_of = {**grads, "input": backend.input_grad(params, x, y, masks)}
    side = kink_state(arch, backend.activations(params, x, masks), x)
    for name, tensor in tensors.items():
        picks, numeric = [], []
        for flat in rng.permutation(tensor.size):
            losses = []
            for sign in (1, -1):
                shifted = tensor.copy()
                shifted.flat[flat] += sign * FD_STEP
                p, xx = (params, shifted) if name == "input" else ({**params, name: shifted}, x)
                if not _same_side(side, kink_state(arch, backend.activations(p, xx, masks), xx)):
                    break
                losses.append(float(backend.loss_and_grads(p, xx, y, masks)[0]))
            else:
                picks.append(flat)
                numeric.append((losses[0] - losses[1]) / (2 * FD_STEP))
            if len(picks) == per_tensor:
                break
        yield name, analytic_of[name].flat[picks], np.array(numeric)


def _same_side(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def run_crosscheck(
    archs: list[Arch],
    dtypes: list[str],
    data: Dataset | None,
    *,
    steps: int = 20,
    batch_size: int | None = None,
    seed: int = 0,
    config: TrainConfig | None = None,
    impls: tuple[str, ...] = IMPLEMENTATIONS,
) -> list[CheckResult]:
    """Every comparison for every architecture and dtype under every setting: by default every
    training technique on (Nesterov momentum, weight decay, warm-up and schedule, label
    smoothing, flips and shifts), then drawn hyperparameters, planted ties and huge logits;
    and the shared code against the frameworks' own libraries. Batches of `batch_size` images,
    or by default `batch_size_for(arch)`."""
    config = config or ALL_ON
    results = []
    for dtype, arch in itertools.product(dtypes, archs):
        size = batch_size or batch_size_for(arch)  # batch_size_for: the same for both dtypes
        batches = sample_batches(data, size, steps, seed)
        noisy = noisy_batches(batches, seed)
        params = init_params(arch, config.init, seed, np.dtype(dtype))
        masks = dropout_masks(arch.dropouts, size, seed, 0, 0)
        reference = make_backend("numpy", arch, np.float64)  # finds batches away from kinks
        built: dict = {}  # backends by hyperparameters: JAX compiles each once
        for setting in settings(config, steps, seed, arch):
            xs, start = noisy, params
            if setting.planted_ties:
                xs, start = planted_ties(xs, params, arch)
            xs = [(xb.astype(dtype), yb) for xb, yb in xs]
            hyperparams = setting.config.hyperparams
            if hyperparams not in built:
                built[hyperparams] = {
                    impl: make_backend(impl, arch, dtype, hyperparams) for impl in impls
                }
            backends = built[hyperparams]
            if setting.logit_scale is not None:
                first = next(iter(backends.values()))
                start = scaled_logits(start, arch, first, xs[0][0], masks, setting.logit_scale)
            x0 = xs[0][0]
            if not setting.planted_ties and dtype == "float32":
                x0 = away_from_kinks(reference, arch, start, batches[0][0], masks, seed)
            checks = [("pass", single_pass(backends, arch, start, x0, xs[0][1], masks))]
            if setting.lockstep:
                resync = dtype == "float32"
                checks.append(("lockstep", lockstep(backends, arch, start, xs, setting, resync)))
            for kind, rows in checks:
                for check, pair, a, b, *scale in rows:
                    expected = None if pair.endswith("-shared") else _expected(check, dtype)
                    results.append(
                        CheckResult(
                            dtype,
                            arch.name,
                            setting.name,
                            check,
                            pair,
                            *compare(a, b, *scale),
                            TOLERANCES[(dtype, kind)],
                            _dtypes(a, b),
                            expected,
                        )
                    )
        if dtype == "float64" and "numpy" in impls:
            backend = make_backend("numpy", arch, dtype, config.hyperparams)
            x, y = noisy[0]
            rows = list(
                finite_difference_grads(
                    backend, arch, params, x[:4].astype(dtype), y[:4], _head(masks, 4), 8, seed
                )
            )
            scale = _largest(analytic for name, analytic, _ in rows if name != "input")
            for name, analytic, numeric in rows:
                results.append(
                    CheckResult(
                        dtype,
                        arch.name,
                        DEFAULTS,
                        f"finite-diff {name}",
                        "numpy-fd",
                        *compare(analytic, numeric, 0.0 if name == "input" else scale),
                        TOLERANCES[(dtype, "finite-diff")],
                    )
                )
    results += shared_code_checks(config, steps, seed)
    return results


def _expected(check: str, dtype: str) -> str | None:
    """The dtype a compared tensor must have in a run of `dtype` (None: a Python float, as
    the training step reports its loss; the pass compares the loss's own dtype)."""
    if check.startswith("lockstep loss"):
        return None
    return "int64" if check.endswith(".num_batches_tracked") else dtype


def _head(masks: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in masks.items()}


def shared_code_checks(config: TrainConfig, steps: int, seed: int) -> list[CheckResult]:
    """The code all three share (schedule, loss, metrics) against the frameworks' libraries."""
    return [
        CheckResult(
            "any",
            "-",
            "shared code vs libraries",
            check,
            pair,
            *compare(ours, theirs),
            tolerance(ours),
            _dtypes(ours, theirs),
        )
        for check, pair, ours, theirs in reference_checks(config, steps, steps // 4, seed)
    ]


def format_table(results: list[CheckResult]) -> str:
    """One line a comparison, grouped by dtype, architecture and setting."""
    header = (
        f"{'check':<36} {'pair':<14} {'dtype':<9} {'max abs':>10} {'max rel':>10} {'tol':>8}"
        "  result"
    )
    lines = []
    key = lambda r: (r.dtype, r.arch, r.setting)  # noqa: E731
    for (dtype, arch, setting), group in itertools.groupby(results, key=key):
        lines += ["", f"== {dtype} | arch {arch} | {setting}", header]
        for r in group:
            lines.append(
                f"{r.check:<36} {r.pair:<14} {r.dtypes:<9} {r.max_abs:10.2e} {r.max_rel:10.2e} "
                f"{r.tolerance:8.0e}  {'pass' if r.passed else 'FAIL'}"
            )
    return "\n".join(lines)


PAIR_NAMES = tuple(f"{a}-{b}" for a, b in itertools.combinations(IMPLEMENTATIONS, 2))
DTYPE_COLORS = {"float64": "tab:blue", "float32": "tab:orange"}
ZERO = 1e-18  # where a difference of exactly 0 is drawn on the log scale
CLIPPED = 1e3  # where a non-finite or huge difference is drawn (as an x)


def worst_by_row(results: list[CheckResult], arch: str) -> dict[tuple[str, str, str], tuple]:
    """(check, pair, dtype) -> (worst relative difference over the settings, its tolerance),
    for the implementation pairs of one network's rows, in the order they were checked."""
    worst: dict[tuple[str, str, str], tuple] = {}
    for r in results:
        if r.arch == arch and r.pair in PAIR_NAMES:
            key = (r.check, r.pair, r.dtype)
            rel, tol = worst.get(key, (0.0, r.tolerance))
            worst[key] = (max(rel, r.max_rel), tol)
    return worst


def plot_results(results: list[CheckResult], path: Path) -> None:
    """The worst relative difference of every compared tensor (rows), for each pair of
    implementations (columns), float64 and float32 side by side on a log scale, each with its
    tolerance marked; one row of panels per network."""
    from shared.plots import plt, save_figure

    archs = list(dict.fromkeys(r.arch for r in results if r.arch != "-"))
    tables = {arch: worst_by_row(results, arch) for arch in archs}
    height = sum(len({k[0] for k in t}) for t in tables.values())
    fig, axes = plt.subplots(
        len(archs),
        len(PAIR_NAMES),
        figsize=(13, 1.2 + 0.17 * height),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": [len({k[0] for k in tables[a]}) for a in archs]},
    )
    for row, arch in enumerate(archs):
        checks = list(dict.fromkeys(k[0] for k in tables[arch]))
        ys = np.arange(len(checks))
        for col, pair in enumerate(PAIR_NAMES):
            ax = axes[row, col]
            for offset, (dtype, color) in zip((-0.18, 0.18), DTYPE_COLORS.items(), strict=True):
                cells = [tables[arch].get((c, pair, dtype)) for c in checks]
                shown = [(y, cell) for y, cell in zip(ys, cells, strict=True) if cell]
                if not shown:
                    continue
                y = np.array([y for y, _ in shown]) + offset
                rel = np.array([min(max(cell[0], ZERO), CLIPPED) for _, cell in shown])
                tol = np.array([max(cell[1], ZERO) for _, cell in shown])
                off = rel >= CLIPPED  # inf (a shape mismatch, a NaN) or far off: in view
                ax.scatter(rel[~off], y[~off], s=14, color=color, label=dtype, zorder=3)
                ax.scatter(rel[off], y[off], s=40, color=color, marker="x", zorder=3)
                ax.scatter(tol, y, marker="|", s=60, color=color, alpha=0.7)
            ax.set_xscale("log")
            ax.set_yticks(ys, checks if col == 0 else [""] * len(checks), fontsize=7)
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{arch}: {pair}" if len(archs) > 1 else pair, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("worst relative difference (| = tolerance)", fontsize=8)
    labelled = [ax.get_legend_handles_labels() for ax in axes.flat]
    handles, labels = next(((h, lab) for h, lab in labelled if h), ([], []))
    if handles:  # the dtypes' colours, from whichever panel has points of both
        axes[0, -1].legend(handles, labels, fontsize=7, loc="lower right")
    save_figure(fig, path)


def checkpoint_agreement(
    params: Params, arch: Arch, images: np.ndarray, impls: tuple[str, ...] = IMPLEMENTATIONS
) -> list[CheckResult]:
    """Load the same weights into every implementation (float32) and compare test logits and
    predicted classes. A differing argmax counts only where neither side has a near-tie:
    top-two logits closer than the float32 tolerance times the logits' scale."""
    tolerance = TOLERANCES[("float32", "pass")]
    logits = {}
    for impl in impls:
        backend = make_backend(impl, arch)
        logits[impl] = predict(backend, backend.init_state(params), images)
    results = []
    for pair, a, b in _pairs(logits):
        results.append(
            CheckResult(
                "float32",
                arch.name,
                "checkpoint",
                "checkpoint logits",
                pair,
                *compare(a, b),
                tolerance,
                _dtypes(a, b),
                "float32",
            )
        )
        differ = a.argmax(axis=1) != b.argmax(axis=1)
        scale = max(np.abs(a).max(), np.abs(b).max())
        near_tie = np.zeros(len(a), dtype=bool)
        for side in (a, b):
            top2 = np.sort(side, axis=1)[:, -2:]
            near_tie |= (top2[:, 1] - top2[:, 0]) <= tolerance * scale
        unexplained = int((differ & ~near_tie).sum())
        results.append(
            CheckResult(
                "float32",
                arch.name,
                "checkpoint",
                f"checkpoint argmax ({int(differ.sum())}/{len(a)} differ)",
                pair,
                float(unexplained),
                unexplained / len(a),
                0.0,
            )
        )
    return results


def main(argv: list[str] | None = None) -> int:
    """scripts/crosscheck.py: print every comparison; exit 1 if any fails."""
    parser = argparse.ArgumentParser(
        prog="crosscheck.py",
        description="Show, tensor by tensor, that the NumPy, JAX and PyTorch networks agree.",
    )
    parser.add_argument(
        "--arch",
        action="append",
        metavar="NETWORK",
        help="network to check: a preset, a spec or a .json/.toml file, as train.py --arch "
        "(repeatable; default: lab and pool)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="precision to check (repeatable; default: float64 and float32)",
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="SGD steps run in lockstep")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per batch (default: 32, or fewer for a network with so many ReLU and "
        "max-pool kinks that float32 could not be checked away from them: 8 for strong)",
    )
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="also load this checkpoint into all three and compare test predictions",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE",
        help="draw every compared tensor's worst relative difference per pair, float64 and "
        "float32 side by side, against its tolerance (PNG)",
    )
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        if args.json is not None:
            check_out_file(args.json, "--json")
        if args.plot is not None:
            check_out_file(args.plot, "--plot")
        data = load_dataset(args.data_dir)
        largest = args.batch_size or BATCH_SIZE
        if args.steps * largest > len(data.train):
            raise UsageError(
                f"--steps {args.steps} x --batch-size {largest} exceeds the "
                f"{len(data.train)} training images"
            )
        archs = [get_arch(a) for a in (args.arch or ["lab", "pool"])]
        if args.batch_size == 1 and any(a.has_batch_norm for a in archs):
            raise UsageError("--batch-size 1: BatchNorm cannot take statistics of one image")
        results = run_crosscheck(
            archs,
            args.dtype or ["float64", "float32"],
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        if args.checkpoint is not None:
            ckpt = load_checkpoint(args.checkpoint, dtype=np.float32)  # as checkpoint_agreement
            arch = get_arch(ckpt.meta["arch"], files=False)
            results += checkpoint_agreement(ckpt.params, arch, data.test.x)
        print(format_table(results))
        failed = [r for r in results if not r.passed]
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
        if args.json is not None:
            write_json(args.json, [r.as_dict() for r in results])
        if args.plot is not None:
            plot_results(results, args.plot)
            print(f"wrote {args.plot}")
        return 1 if failed else 0

    return run_cli(parser, body)
