"""Proof that the three implementations compute the same thing, tensor by tensor: the
crosscheck.py command and `run_crosscheck`, which runs the parts in shared/proof/.

For identical weights and batches every pair of implementations is compared on each layer's
activations, the loss, every parameter gradient and the input gradient; then on an SGD run
in lockstep; and the NumPy gradients against central finite differences; and the code all
three share against the frameworks' own libraries.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.backend import IMPLEMENTATIONS, backend_class, make_backend
from shared.batches import dropout_masks
from shared.checkpoint import load_checkpoint
from shared.cli import add_data_dir_flag, positive_int, run_cli, seed_type
from shared.config import DTYPES, FIELDS, Bound, TrainConfig, python_int
from shared.cost import check_training_batch
from shared.data import Dataset, data_files, load_dataset
from shared.errors import OutputError, UsageError, say
from shared.io import write_json
from shared.network import import_network
from shared.onnx_export import require_onnx
from shared.outputs import check_out_files
from shared.proof.kinks import BATCH_SIZE, away_from_kinks, batch_size_for, crosscheck_cost
from shared.proof.onnx_witness import onnx_rows
from shared.proof.passes import (
    checkpoint_agreement,
    finite_difference_grads,
    lockstep,
    single_pass,
    summed_terms,
)
from shared.proof.references import reference_checks, tolerance
from shared.proof.report import format_table, plot_results
from shared.proof.rows import TOLERANCES, CheckResult, judge
from shared.proof.settings import (
    ALL_ON,
    DEFAULTS,
    check_warmup,
    noisy_batches,
    planted_ties,
    sample_batches,
    scaled_logits,
    settings,
)
from shared.spec import (
    Arch,
    Params,
    cast_params,
    get_arch,
    init_params,
    is_model_file,
    network_files,
)
from shared.typed import parse_once, path_type

# How the options of check_batches are named to the caller: the command's flags, the API's
# keyword arguments.
FLAGS = {"batch_size": "--batch-size", "steps": "--steps", "arch": "--arch"}
KEYWORDS = {"batch_size": "batch_size", "steps": "steps", "arch": "network"}


def check_batches(archs: list[Arch], batch_size: int | None, names: dict) -> None:
    """What a cross-check's batches need, refused in one UsageError naming the option as
    `names` spells it: two images at least where BatchNorm takes batch statistics, and a
    float64 step of every network within the memory bound."""
    if batch_size == 1 and any(a.uses_batch_statistics for a in archs):
        raise UsageError(f"{names['batch_size']} 1: BatchNorm cannot take statistics of one image")
    for arch in archs:  # the float64 pass compares whole batches in every implementation
        why = "the cross-check compares whole steps in every implementation at once"
        where = f"{names['arch']} {arch.name[:60]}"
        check_training_batch(
            crosscheck_cost(arch), batch_size or 2, np.float64, where, least=2, whole=why
        )


# Random images, drawn when there is no data, are held in memory like a dataset's: at most
# as many as Fashion-MNIST's training split.
RANDOM_IMAGES = 50_000


def check_steps(steps: int, batch_size: int | None, data: Dataset | None, names: dict) -> None:
    """Enough training images in `data` for the steps' batches (or random images, at most
    RANDOM_IMAGES)."""
    largest = batch_size or BATCH_SIZE
    available = RANDOM_IMAGES if data is None else len(data.train)
    if steps * largest > available:
        kind = "random images a check draws at most" if data is None else "training images"
        raise UsageError(
            f"{names['steps']} {steps} x {names['batch_size']} {largest} exceeds the "
            f"{available} {kind}"
        )


def check_options(
    archs: list[Arch],
    dtypes: Any,
    steps: Any,
    batch_size: Any,
    seed: Any,
    impls: Any,
    data: Dataset | None,
) -> None:
    """The options of a cross-check called from Python (threefold.crosscheck) checked as the
    command checks its flags: one UsageError naming the keyword at fault. One implementation,
    or no dtype, would compare nothing and pass."""
    if not _some_of(dtypes, DTYPES, least=1):
        raise UsageError(
            f"dtypes={dtypes!r}: a tuple of one or more of {', '.join(DTYPES)}, each once"
        )
    if not _some_of(impls, IMPLEMENTATIONS, least=2):
        raise UsageError(
            f"impls={impls!r}: a tuple of two or more of {', '.join(IMPLEMENTATIONS)}, each once "
            "(the cross-check compares pairs)"
        )
    steps, batch_size, seed = map(python_int, (steps, batch_size, seed))
    for name, value, bound in (
        ("steps", steps, Bound(int, 1)),
        ("batch_size", batch_size, Bound(int, 1, optional=True)),
        ("seed", seed, FIELDS["seed"]),
    ):
        problem = bound.problem(value)
        if problem is not None:
            raise UsageError(f"{name}={value!r}: {problem}")
    check_batches(archs, batch_size, KEYWORDS)
    check_steps(steps, batch_size, data, KEYWORDS)


def _some_of(values: Any, allowed: tuple[str, ...], least: int) -> bool:
    """Whether `values` is a tuple or list of at least `least` `allowed` names, none twice (a
    dtype named twice ran every check twice)."""
    return (
        isinstance(values, tuple | list)
        and all(v in allowed for v in values)
        and len(set(values)) == len(values) >= least
    )


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
    initial: dict[str, Params] | None = None,
    progress: Callable[[str], None] | None = None,
    onnx: bool = False,
    notes: list[str] | None = None,
) -> list[CheckResult]:
    """Every comparison for every architecture and dtype under every setting: by default every
    training technique on (Nesterov momentum, weight decay, warm-up and schedule, label
    smoothing, flips and shifts), then drawn SGD, Adam and AdamW hyperparameters, planted
    ties and huge logits; and the shared code against the frameworks' own libraries. Batches
    of `batch_size` images, or by default `batch_size_for(arch)`. A network starts from
    `initial[arch.name]` (its own weights) if given, else from seeded initial weights;
    `progress` is told each network, dtype and setting as it starts. With `onnx`, the
    network exported to ONNX and run by onnxruntime is compared with every implementation in
    evaluation mode under the first setting; what it cannot run is added to `notes`, and so
    is any lockstep cut short where every implementation's loss left the finite numbers."""
    config = config or ALL_ON
    # A network's own weights in each dtype, before any work: one that float32 cannot hold
    # is refused at once, not after the float64 check.
    own = {
        (dtype, arch.name): cast_params(initial[arch.name], arch, np.dtype(dtype))
        for dtype, arch in itertools.product(dtypes, archs)
        if initial and arch.name in initial
    }
    tell = progress or (lambda _: None)
    results = []
    for dtype, arch in itertools.product(dtypes, archs):
        size = batch_size or batch_size_for(arch)  # batch_size_for: the same for both dtypes
        batches = sample_batches(data, size, steps, seed)
        noisy = noisy_batches(batches, seed)
        if (dtype, arch.name) in own:
            params = own[dtype, arch.name]
        else:
            params = init_params(arch, config.init, seed, np.dtype(dtype))
        masks = dropout_masks(arch.dropouts, size, seed, 0, 0)
        reference = make_backend("numpy", arch, np.float64)  # finds batches away from kinks
        built: dict = {}  # backends by hyperparameters: JAX compiles each once
        chosen = settings(config, steps, seed, arch)
        for number, setting in enumerate(chosen, 1):
            tell(f"{arch.name[:60]} | {dtype} | setting {number}/{len(chosen)}: {setting.name}")
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
                x0 = away_from_kinks(
                    reference,
                    arch,
                    start,
                    batches[0][0],
                    masks,
                    seed,
                    backends=[*backends.values()],
                )
            # float32's round-off of a sum whose terms cancel is measured against the terms
            # (summed_terms); float64 keeps every gradient to its family's size.
            summing, terms = None, {}
            if dtype == "float32":
                summing = make_backend("numpy", arch, np.float64, hyperparams)
                terms, _ = summed_terms(summing, arch, start, x0, xs[0][1], masks)
            checks = [("pass", single_pass(backends, arch, start, x0, xs[0][1], masks, terms))]
            if onnx and number == 1:
                rows, why = onnx_rows(backends, arch, start, x0)
                checks.append(("pass", rows))
                if why is not None and notes is not None:
                    notes.append(note_on(arch.name, dtype, f"onnxruntime not run: {why}"))
            if setting.lockstep:
                resync = dtype == "float32"
                # float32 steps kept away from kinks as the single pass is; planted ties stay
                kept = reference if resync and not setting.planted_ties else None
                compared, rows = lockstep(
                    backends, arch, start, xs, setting, resync, kept, seed, summing
                )
                if notes is not None and compared < len(xs):
                    notes.append(
                        note_on(
                            arch.name,
                            dtype,
                            f"{setting.name}: {rows[0].check}: from the next step on, every "
                            "implementation's loss is infinite or NaN (a rate too high for the "
                            "network, or an error all three share); the steps before are compared",
                        )
                    )
                checks.append(("lockstep", rows))
            for kind, rows in checks:
                for row in rows:
                    shared = row.pair.endswith("-shared")
                    expected = None if shared else _expected(row.check, dtype, arch)
                    tol = TOLERANCES[(dtype, kind)]
                    results.append(judge(row, dtype, arch.name, setting.name, tol, expected))
        if dtype == "float64" and "numpy" in impls:
            tell(f"{arch.name[:60]} | {dtype} | NumPy's gradients against finite differences")
            backend = make_backend("numpy", arch, dtype, config.hyperparams)
            x, y = noisy[0]
            rows = finite_difference_grads(
                backend, arch, params, x[:4].astype(dtype), y[:4], _head(masks, 4), 8, seed
            )
            tol = TOLERANCES[(dtype, "finite-diff")]
            results += [judge(row, dtype, arch.name, DEFAULTS, tol) for row in rows]
    results += shared_code_checks(config, steps, seed, impls)
    return results


def note_on(arch: str, dtype: str, text: str) -> str:
    """A note on one network's run in one dtype, as the report prints it: the network's
    whole name, so that no two networks' notes are alike (see notes_on)."""
    return f"{arch} | {dtype} | {text}"


def notes_on(row: CheckResult, notes: list[str]) -> list[str]:
    """The texts of the notes on the network and dtype of `row` (see note_on)."""
    scope = note_on(row.arch, row.dtype, "")
    return [note[len(scope) :] for note in notes if note.startswith(scope)]


def _expected(check: str, dtype: str, arch: Arch) -> str | None:
    """The dtype a compared tensor must have in a run of `dtype` (None: a Python float, as
    the training step reports its loss; the pass compares the loss's own dtype)."""
    if check.startswith("lockstep loss"):
        return None
    return "int64" if check.rsplit(" ", 1)[-1] in arch.counters else dtype


def _head(masks: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in masks.items()}


# The fewest steps the shared schedules are compared over: with 1 to 3, every step was
# warm-up, and the cosine and linear parts were never met.
SCHEDULE_STEPS = 20


def shared_code_checks(
    config: TrainConfig, steps: int, seed: int, impls: tuple[str, ...] = IMPLEMENTATIONS
) -> list[CheckResult]:
    """The code all three share (schedule, metrics) and NumPy's hand-written loss against the
    libraries of the frameworks in `impls` (one left out may not be installed). The loss
    layer is the same whatever the network: a NumPy backend of the smallest preset computes
    it."""
    loss = make_backend("numpy", get_arch("noconv")).loss_and_dlogits
    classes = [backend_class(impl) for impl in impls]
    libraries = tuple(c.reference_library for c in classes if c.reference_library)
    # The schedules over enough steps to leave their warm-up, however short the lockstep.
    steps = max(steps, SCHEDULE_STEPS)
    rows = reference_checks(config, steps, check_warmup(steps), seed, loss, libraries)
    return [judge(row, "any", "-", "shared code vs libraries", tolerance(row.a)) for row in rows]


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
        help="network to check: a preset, a spec, a .json/.toml file, a PyTorch model "
        "FILE.py:NAME (the file is executed) or an ONNX FILE.onnx, as train.py --arch; a "
        "model file is checked from its own weights, a module's drawn from --seed "
        "(repeatable; default: lab and pool)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="precision to check (repeatable; default: float64 and float32)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=20,
        help="optimizer steps run in lockstep, SGD's and Adam's (default: 20)",
    )
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
        type=path_type,
        default=None,
        help="also load this checkpoint into all three and compare test predictions",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export each network to ONNX and compare onnxruntime's layer outputs with "
        "every implementation in evaluation mode, its graph optimisations off and on (needs "
        "the optional extra: pip install -e '.[onnx]')",
    )
    parser.add_argument(
        "--json", type=path_type, default=None, help="write the results as JSON here"
    )
    parser.add_argument(
        "--plot",
        type=path_type,
        default=None,
        metavar="FILE",
        help="draw every compared tensor's worst relative difference per pair, float64 and "
        "float32 side by side, against its tolerance (PNG, or PDF or SVG by the name's "
        "suffix)",
    )
    add_data_dir_flag(parser)
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines (network, dtype, setting)"
    )
    args = parse_once(parser, argv)

    def body() -> int:
        if args.onnx:
            require_onnx()
        files = [("--arch", path) for text in args.arch or [] for path in network_files(text)]
        outputs = [("--json", args.json), ("--plot", args.plot)]
        reads = [("--checkpoint", args.checkpoint), *files, *data_files(args.data_dir)]
        check_out_files(outputs, reads)
        # A model file is proven from its own weights; a spec or preset from seeded ones.
        archs, initial, named = [], {}, {}
        for text in args.arch or ["lab", "pool"]:
            network = import_network(text, seed=args.seed) if is_model_file(text) else None
            arch = get_arch(text) if network is None else network.arch
            # Checked twice, or (two model files) both from the weights of one of them.
            if arch.name in named:
                raise UsageError(
                    f"--arch {text}: the same network as --arch {named[arch.name]} "
                    f"({arch.name}); check it once"
                )
            named[arch.name] = text
            archs.append(arch)
            if network is not None:
                initial[arch.name] = network.tensors
        check_batches(archs, args.batch_size, FLAGS)
        # Read (and checked) before any work: a damaged checkpoint wastes no cross-check.
        ckpt = None if args.checkpoint is None else load_checkpoint(args.checkpoint, np.float32)
        data = load_dataset(args.data_dir)
        check_steps(args.steps, args.batch_size, data, FLAGS)
        started = time.perf_counter()
        notes: list[str] = []

        def progress(message: str) -> None:  # on stderr: the table on stdout stays clean
            print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr)

        results = run_crosscheck(
            archs,
            list(dict.fromkeys(args.dtype or ["float64", "float32"])),  # each once
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=None if args.quiet else progress,
            initial=initial,
            onnx=args.onnx,
            notes=notes,
        )
        if ckpt is not None:  # in float32, as checkpoint_agreement computes
            arch = get_arch(ckpt.meta["arch"], files=False)
            results += checkpoint_agreement(ckpt.params, arch, data.test.x, onnx=args.onnx)
        # Checked again: a run or a grid may have written its files there meanwhile. Then the
        # table is still printed, minutes of work, and the files are not written.
        try:
            check_out_files(outputs, reads)
            refused = None
        except UsageError as error:
            refused = OutputError(f"{error}; nothing written (the table above is the result)")
        # The files first: a reader of the table that goes away (`| head`) costs none of them.
        if args.json is not None and refused is None:
            # Each row carries the notes on its network and dtype: what was not run or
            # compared there is as plain to a program reading the rows as to a reader.
            write_json(args.json, [{**r.as_dict(), "notes": notes_on(r, notes)} for r in results])
        if args.plot is not None and refused is None:
            plot_results(results, args.plot)
        print(format_table(results))
        for note in notes:
            print(note)
        failed = [r for r in results if not r.passed]
        if any(math.isinf(r.max_rel) for r in failed):
            print(
                "inf: the pair's shapes differ, a value is not finite, or nothing was compared "
                "(a finite difference whose every entry crosses a kink: a dead ReLU layer)"
            )
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
        if refused is not None:
            raise refused
        for written in filter(None, (args.json, args.plot)):
            say(f"wrote {written}")
        return 1 if failed else 0

    return run_cli(parser, body)
