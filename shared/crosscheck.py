"""Proof that the three implementations compute the same thing, tensor by tensor.

For identical weights and batches every pair of implementations is compared on each layer's
activations, the loss, every parameter gradient and the input gradient; then on an SGD run
in lockstep; and the NumPy gradients against central finite differences.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from shared.backend import IMPLEMENTATIONS, Backend, make_backend, predict
from shared.batches import iterate_batches, training_batches
from shared.checkpoint import load_checkpoint
from shared.cli import positive_int, run_cli, seed_type
from shared.config import DTYPES, TrainConfig, learning_rate
from shared.data import FASHION_MNIST, Dataset, load_dataset
from shared.errors import UsageError
from shared.io import write_json
from shared.outputs import check_out_file
from shared.spec import ARCHS, Arch, Params, get_arch, init_params

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
    """One row of the cross-check: the worst difference of one tensor between a pair."""

    dtype: str
    arch: str
    check: str
    pair: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|); shapes must match exactly."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b))))
    if not np.isfinite(diff):
        return float("inf"), float("inf")
    return diff, (diff / scale if scale > 0 else 0.0)


def sample_batches(data: Dataset | None, batch_size: int, steps: int, seed: int):
    """`steps` training batches in epoch-1 order, or seeded random images when data is None.

    Real images get a little fixed noise (std 0.01 of the normalised pixel scale): their uniform
    backgrounds make exact ties inside max-pool windows, where the loss has a kink, the
    gradient is not unique, and which tied element takes it depends on the last bit of
    rounding in the conv, so no two implementations, nor finite differences, need agree there.
    """
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
    return [((x + rng.normal(scale=1e-2, size=x.shape)).astype(np.float32), y) for x, y in batches]


def _pairs(results: dict[str, object]) -> Iterator[tuple[str, object, object]]:
    for a, b in itertools.combinations(results, 2):
        yield f"{a}-{b}", results[a], results[b]


def single_pass(
    backends: dict[str, Backend], arch: Arch, params: Params, x: np.ndarray, y: np.ndarray
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(check, pair, a, b) for activations, loss, parameter and input gradients."""
    acts = {name: b.activations(params, x) for name, b in backends.items()}
    grads = {name: b.loss_and_grads(params, x, y) for name, b in backends.items()}
    dx = {name: b.input_grad(params, x, y) for name, b in backends.items()}
    for pair, a, b in _pairs(acts):
        for layer in arch.layers:
            label = "logits" if layer is arch.layers[-1] else f"activation {layer.name}"
            yield label, pair, a[layer.name], b[layer.name]
    for pair, (loss_a, grads_a), (loss_b, grads_b) in _pairs(grads):
        yield "loss", pair, np.array(loss_a), np.array(loss_b)
        for name in params:
            yield f"grad {name}", pair, grads_a[name], grads_b[name]
    for pair, a, b in _pairs(dx):
        yield "grad input", pair, a, b


def lockstep(
    backends: dict[str, Backend], params: Params, batches, config: TrainConfig, resync: bool
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """Run SGD from the same start on the same batches; compare losses, weights and buffers
    after every step. With `resync`, each step starts every implementation from the first
    one's weights and buffers, so a difference is that step's own.

    Why float32 resyncs: a ReLU input within float32 round-off of zero (about 1e-6; one in the
    20 default steps on real data) is on for one implementation and off for another, which
    changes a whole row of fc1's gradient; carried forward, that one rounding decision would
    be all the comparison measures. float64 carries the runs through without it.
    """
    steps, size = len(batches), len(batches[0][1])
    x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    # The concatenated batches in order, augmented as training would augment them.
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
        )
    )
    # Training's shape of schedule compressed into these steps: warm-up over the first quarter.
    warmup_steps = steps // 4 if config.warmup != 0 else 0
    data = {name: backend.put_data(x, y) for name, backend in backends.items()}
    states = {name: backend.init_state(params) for name, backend in backends.items()}
    runs: dict[str, list] = {name: [] for name in backends}  # (loss, params, velocity) a step
    for step, batch in enumerate(plan):
        lr = learning_rate(step, steps, config.lr, config.schedule, warmup_steps)
        for name, backend in backends.items():
            states[name], loss, _ = backend.train_step(states[name], data[name], batch, lr)
            runs[name].append((loss, backend.params(states[name]), backend.velocity(states[name])))
        if resync:
            _, p, v = runs[next(iter(backends))][-1]
            states = {name: backend.init_state(p, v) for name, backend in backends.items()}
    for pair, run_a, run_b in _pairs(runs):
        yield f"lockstep loss x{steps}", pair, _stacked(run_a, 0), _stacked(run_b, 0)
        for name in params:
            yield f"lockstep {name}", pair, _stacked(run_a, 1, name), _stacked(run_b, 1, name)
            if not config.momentum:
                continue  # without momentum there are no buffers: PyTorch keeps none
            yield (
                f"lockstep momentum {name}",
                pair,
                _stacked(run_a, 2, name),
                _stacked(run_b, 2, name),
            )


def _stacked(run: list, field: int, name: str | None = None) -> np.ndarray:
    """One quantity of every step of a lockstep run, stacked (steps, ...)."""
    return np.stack([np.asarray(s[field] if name is None else s[field][name]) for s in run])


def finite_difference_grads(
    backend: Backend, params: Params, x: np.ndarray, y: np.ndarray, per_tensor: int, seed: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(tensor, analytic, numeric) on `per_tensor` random entries of every parameter and of x."""
    rng = np.random.default_rng(seed)
    _, grads = backend.loss_and_grads(params, x, y)
    tensors = {**params, "input": x}
    analytic_of = {**grads, "input": backend.input_grad(params, x, y)}
    for name, tensor in tensors.items():
        picks = rng.choice(tensor.size, size=min(per_tensor, tensor.size), replace=False)
        numeric = []
        for flat in picks:
            losses = []
            for sign in (1, -1):
                shifted = tensor.copy()
                shifted.flat[flat] += sign * FD_STEP
                p, xx = (params, shifted) if name == "input" else ({**params, name: shifted}, x)
                losses.append(backend.loss_and_grads(p, xx, y)[0])
            numeric.append((losses[0] - losses[1]) / (2 * FD_STEP))
        yield name, analytic_of[name].flat[picks], np.array(numeric)


def run_crosscheck(
    archs: list[Arch],
    dtypes: list[str],
    data: Dataset | None,
    *,
    steps: int = 20,
    batch_size: int = 32,
    seed: int = 0,
    config: TrainConfig | None = None,
    impls: tuple[str, ...] = IMPLEMENTATIONS,
) -> list[CheckResult]:
    """Every comparison for every architecture and dtype, by default with every training
    technique on (Nesterov momentum, weight decay, warm-up and schedule, label smoothing, flips
    and shifts)."""
    config = config or ALL_ON
    batches = sample_batches(data, batch_size, steps, seed)
    y = batches[0][1]
    results = []
    for dtype, arch in itertools.product(dtypes, archs):
        backends = {impl: make_backend(impl, arch, dtype, config.hyperparams) for impl in impls}
        params = init_params(arch, config.init, seed, np.dtype(dtype))
        xs = [(xb.astype(dtype), yb) for xb, yb in batches]
        checks = [
            ("pass", single_pass(backends, arch, params, xs[0][0], y)),
            ("lockstep", lockstep(backends, params, xs, config, resync=dtype == "float32")),
        ]
        for kind, rows in checks:
            for check, pair, a, b in rows:
                results.append(
                    CheckResult(
                        dtype, arch.name, check, pair, *compare(a, b), TOLERANCES[(dtype, kind)]
                    )
                )
        if dtype == "float64" and "numpy" in backends:
            for name, analytic, numeric in finite_difference_grads(
                backends["numpy"], params, xs[0][0][:4], y[:4], per_tensor=8, seed=seed
            ):
                results.append(
                    CheckResult(
                        dtype,
                        arch.name,
                        f"finite-diff {name}",
                        "numpy-fd",
                        *compare(analytic, numeric),
                        TOLERANCES[(dtype, "finite-diff")],
                    )
                )
    return results


def format_table(results: list[CheckResult]) -> str:
    """One line a comparison, grouped by dtype and architecture."""
    header = f"{'check':<34} {'pair':<12} {'max abs':>10} {'max rel':>10} {'tol':>8}  result"
    lines = []
    for (dtype, arch), group in itertools.groupby(results, key=lambda r: (r.dtype, r.arch)):
        lines += ["", f"== {dtype} | arch {arch}", header]
        for r in group:
            lines.append(
                f"{r.check:<34} {r.pair:<12} {r.max_abs:10.2e} {r.max_rel:10.2e} "
                f"{r.tolerance:8.0e}  {'pass' if r.passed else 'FAIL'}"
            )
    return "\n".join(lines)


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
            CheckResult("float32", arch.name, "checkpoint logits", pair, *compare(a, b), tolerance)
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
        choices=list(ARCHS),
        help="architecture to check (repeatable; default: lab and pool)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="precision to check (repeatable; default: float64 and float32)",
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="SGD steps run in lockstep")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="also load this checkpoint into all three and compare test predictions",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        if args.json is not None:
            check_out_file(args.json, "--json")
        data = load_dataset(args.data_dir)
        if args.steps * args.batch_size > len(data.train):
            raise UsageError(
                f"--steps {args.steps} x --batch-size {args.batch_size} exceeds the "
                f"{len(data.train)} training images"
            )
        archs = [get_arch(a) for a in (args.arch or ["lab", "pool"])]
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
            arch = get_arch(ckpt.meta["arch"])
            results += checkpoint_agreement(ckpt.params, arch, data.test.x)
        print(format_table(results))
        failed = [r for r in results if not r.passed]
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
        if args.json is not None:
            write_json(args.json, [r.as_dict() for r in results])
        return 1 if failed else 0

    return run_cli(parser, body)
