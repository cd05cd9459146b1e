"""Training throughput of the three implementations, side by side, against the machine's
measured float32 matmul ceiling. Each implementation runs in its own process, so its peak
memory is its own."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from shared.ab import FIRST_COMMIT, REFERENCE, run_ab, run_paired
from shared.backend import IMPLEMENTATIONS
from shared.cli import add_data_dir_flag, add_impl_flag, chosen_impls, number, run_cli
from shared.cost import check_training_batch, network_cost
from shared.data import DATA_DIR_ENV, load_dataset
from shared.errors import Terminated, ThreefoldError, UsageError, interrupted, stop_on_signals
from shared.ladder import loop_epoch_seconds
from shared.outputs import (
    check_out_files,
    hold,
    prepare_out_dir,
    removed_if_left_empty,
    result_files,
    write_results,
    written_at_the_end,
)
from shared.profile import WARMUP_SECONDS, cpu_name, peak_memory_mb, timing_setup
from shared.spec import Arch, get_arch, network_files
from shared.typed import given_flags, parse_once, path_type

EPOCH_IMAGES = 50_000
# Every timed step takes a full batch of the 50,000 training images, so none can be larger.
batch_size = number(int, 1, below=EPOCH_IMAGES + 1)
# Bounds on the flags that set how long a benchmark runs: an epoch's steps at batch 1, a
# day for one worker (beyond about 25 days, the operating system's wait refuses the
# timeout), and the lab's loops on 1,500 images (37 s for 1,000 on an Intel Xeon; they run
# in this process, outside any worker's timeout).
MAX_STEPS = EPOCH_IMAGES
MAX_REPEATS = 100
MAX_TIMEOUT = 86_400
MAX_LADDER_IMAGES = 1_500
# Each mode's result files: (name, whether it draws a chart).
RESULTS = {
    "--against": ("ab", False),
    "--paired": ("paired", False),
    "--profile": ("profile", True),
}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 n x n matmul throughput of NumPy and PyTorch on this machine, GFLOP/s."""
    import torch

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    t = torch.from_numpy(a)
    best = 0.0
    for product in (lambda: a @ a, lambda: t @ t):
        product()
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def measure(impl: str, arch_name: str, batch_size: int, steps: int) -> dict:
    """Time `steps` training steps on real batches after compilation and warm-up; this runs in
    a worker process of its own."""
    # The step alone, without augmentation: what flips add is a data cost, which the profile
    # shows apart (its "gather + augment").
    backend, state, train_data, stream = timing_setup(impl, arch_name, batch_size, flip=False)

    def run(n: int) -> float:
        nonlocal state
        start = time.perf_counter()
        for batch in itertools.islice(stream, n):
            state, _, _ = backend.train_step(state, train_data, batch, 0.01)
        return time.perf_counter() - start

    first_step = run(1)  # JAX compiles here
    warm_until = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < warm_until:
        run(10)
    seconds = run(steps)
    return {
        "impl": impl,
        "batch_size": batch_size,
        "steps": steps,
        "first_step_seconds": first_step,
        "images_per_s": steps * batch_size / seconds,
        "peak_mb": peak_memory_mb(),
    }


@contextlib.contextmanager
def _reading(folder: Path) -> Iterator[None]:
    """Within the block, every worker this process starts (they inherit its environment) and
    this process read the data in `folder`; the environment is as it was after."""
    before = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ[DATA_DIR_ENV]
        else:
            os.environ[DATA_DIR_ENV] = before


def run_worker(
    impl: str, arch: str, batch_size: int, steps: int, timeout: float, kind: str = "--worker"
) -> dict:
    """`measure` (or with kind "--profile-worker", `shared.profile.profile`) in a fresh
    process, so frameworks and memory do not mix; stopped after `timeout` seconds, so no
    worker can hang the benchmark."""
    command = [sys.executable, "-m", "shared.benchmark", kind, impl, arch, str(batch_size)]
    command.append(str(steps))
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ThreefoldError(
            f"benchmark of {impl} at batch {batch_size} did not finish within {timeout:g} s "
            "(--timeout); stopped it"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        if last.startswith("shared.errors."):  # the project's message, not its class's name
            last = last.split(": ", 1)[-1]
        raise ThreefoldError(f"benchmark of {impl} at batch {batch_size} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """One row from repeated runs of one implementation and batch size: median throughput,
    the worst first step and peak memory."""
    ips = statistics.median(r["images_per_s"] for r in runs)
    return {
        **{k: runs[0][k] for k in ("impl", "batch_size", "steps")},
        "repeats": len(runs),
        "images_per_s": ips,
        "images_per_s_all": [r["images_per_s"] for r in runs],
        "epoch_seconds": EPOCH_IMAGES / ips,
        "first_step_seconds": max(r["first_step_seconds"] for r in runs),
        "peak_mb": max(r["peak_mb"] for r in runs),
    }


def add_derived(rows: list[dict], flops: int, ceiling: float) -> list[dict]:
    """Ratio to PyTorch at the same batch size, GFLOP/s and share of the ceiling."""
    torch_time = {r["batch_size"]: r["epoch_seconds"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        # null where PyTorch was not run at this batch size: JSON has no NaN.
        reference = torch_time.get(r["batch_size"])
        r["ratio_to_torch"] = None if reference is None else r["epoch_seconds"] / reference
        r["gflops"] = r["images_per_s"] * flops / 1e9
        r["ceiling_share"] = r["gflops"] / ceiling
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| impl | batch | images/s | s / 50k epoch | ratio to torch | first step (compile) s "
        "| peak MB | GFLOP/s | share of ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['batch_size']} | {r['images_per_s']:,.0f} | "
            f"{r['epoch_seconds']:.2f} | {_ratio(r['ratio_to_torch'])} | "
            f"{r['first_step_seconds']:.2f} | "
            f"{r['peak_mb']:,.0f} | {r['gflops']:.1f} | {100 * r['ceiling_share']:.1f}% |"
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a (torch not run)" if value is None else f"{value:.2f}"


def ladder_table(loops: dict, rows: list[dict]) -> str:
    """The lab's loops (timed on a few images, extrapolated) beside the vectorised epochs of
    `rows` at one batch size (128 if measured)."""
    sizes = [r["batch_size"] for r in rows]
    size = 128 if 128 in sizes else sizes[0]
    lines = [
        "| the lab network, one 50,000-image epoch | seconds | speed-up over the loops |",
        "| --- | ---: | ---: |",
        f"| the lab's loops (NumPy; {loops['images']} images timed, extrapolated) | "
        f"{loops['epoch_seconds']:,.0f} | 1 |",
    ]
    for r in rows:
        if r["batch_size"] == size:
            lines.append(
                f"| {r['impl']}, vectorised, batch {size} | {r['epoch_seconds']:.2f} | "
                f"{loops['epoch_seconds'] / r['epoch_seconds']:,.0f} |"
            )
    return "\n".join(lines)


def run_profile(
    impls: list[str], arch: str, sizes: list[int], steps: int, timeout: float, out: Path
) -> int:
    """--profile: each implementation's step by phase and by layer, as tables and a
    chart in `out`."""
    from shared import profile

    rows: list[dict] = []

    def write(stopped: str = "") -> None:
        cpu = cpu_name()
        text = (
            f"`--arch {arch}`, float32, training defaults (flips on), on {cpu}, median of "
            f"{steps} steps; milliseconds per step.\n\n" + profile.markdown(rows)
        )
        for b in sizes:
            at_b = [r for r in rows if r["batch_size"] == b]
            if at_b:
                text += f"\n\nBy layer, batch {b}, milliseconds:\n\n" + profile.layer_markdown(at_b)
        for r in rows:
            if "ops" in r:
                text += (
                    f"\n\n{r['impl']}'s compiled step at batch {r['batch_size']}, from a trace "
                    f"of {r['traced_steps']} steps (milliseconds a step; the trace slows the "
                    "step): by layer, summed over the operations whose source the layer's name "
                    "scope holds, then the slowest operations, and any convolution of XLA's own "
                    "(outside YNNPACK's fusions), which runs on other threads: the trace times "
                    "its launch alone.\n\n" + profile.operation_markdown(r)
                )
        payload = {"arch": arch, "cpu": cpu, "rows": rows}
        write_results(out, "profile", text, payload, partial(profile.chart, rows), stopped=stopped)
        print("\n" + stopped + text)

    with written_at_the_end(write, lambda: bool(rows)):
        for b in sizes:
            for impl in impls:
                rows.append(run_worker(impl, arch, b, steps, timeout, kind="--profile-worker"))
                print(f"  profiled {impl} at batch {b}", flush=True)
    return 0


def bar_chart(rows: list[dict], network: str, path: Path) -> None:
    """Seconds per epoch by batch size, a bar for each implementation, of `network`."""
    from shared.plots import plt, save_figure

    sizes = sorted({r["batch_size"] for r in rows})
    impls = [i for i in IMPLEMENTATIONS if any(r["impl"] == i for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        values = [
            next(
                (r["epoch_seconds"] for r in rows if r["impl"] == impl and r["batch_size"] == b), 0
            )
            for b in sizes
        ]
        xs = np.arange(len(sizes)) + (k - (len(impls) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=impl)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(sizes)), [f"batch {b}" for b in sizes])
    ax.set_ylabel("seconds per 50,000-image epoch")
    ax.set_title(f"training time, {network[:60]}, float32 (lower is better)")
    ax.legend()
    save_figure(fig, path)


def run_benchmark(
    args: argparse.Namespace, arch: Arch, sizes: list[int], impls: list[str], out: Path
) -> int:
    """Every implementation at every batch size, interleaved repeats each in a fresh process,
    against the float32 matmul ceiling measured in the same run; tables and chart in `out`."""
    ceiling = matmul_gflops()
    flops = network_cost(arch.layers).flops
    print(
        f"float32 matmul ceiling: {ceiling:.1f} GFLOP/s; "
        f"work per image: {flops / 1e6:.2f} MFLOP (forward + backward)"
    )
    runs: dict[tuple[int, str], list[dict]] = {}  # (batch, impl) -> its repeats so far
    loops: list[dict] = []  # the lab's loops, once timed

    def write(stopped: str = "") -> None:
        rows = add_derived([summarize(repeats) for repeats in runs.values()], flops, ceiling)
        table = markdown_table(rows)
        if loops:
            table += "\n\n" + ladder_table(loops[0], rows)
        cpu = cpu_name()
        header = (
            f"`--arch {args.arch}`, float32, on {cpu}, median of {'up to ' * bool(stopped)}"
            f"{args.repeats} interleaved repeats, each in a fresh process. float32 matmul "
            f"ceiling {ceiling:.1f} GFLOP/s; {flops / 1e6:.2f} MFLOP per image.\n\n"
        )
        payload = {"cpu": cpu, "ceiling_gflops": ceiling, "flops_per_image": flops, "rows": rows}
        chart = partial(bar_chart, rows, arch.name)
        write_results(out, "benchmark", header + table, payload, chart, stopped=stopped)
        print("\n" + table)

    with written_at_the_end(write, lambda: bool(runs)):
        for b in sizes:
            steps = args.steps or EPOCH_IMAGES // b
            # Interleaved, so that a slow spell of the machine hits every implementation alike.
            for r in range(args.repeats):
                for impl in impls:
                    measured = run_worker(impl, arch.name, b, steps, args.timeout)
                    runs.setdefault((b, impl), []).append(measured)
                    ips = measured["images_per_s"]
                    print(
                        f"  batch {b:4} repeat {r + 1}: {impl:5} {ips:8,.0f} images/s", flush=True
                    )
        if args.ladder_images and arch.name == "lab":  # the loops are the lab network's
            loops.append(loop_epoch_seconds(args.ladder_images))
    return 0


def main(argv: list[str] | None = None) -> int:
    """scripts/benchmark.py: time every implementation, write the tables and the chart."""
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__)
    add_impl_flag(parser, "time")
    parser.add_argument(
        "--arch",
        default="lab",
        metavar="NETWORK",
        help="a preset, a spec, a .json/.toml file, a PyTorch FILE.py:NAME or an ONNX FILE.onnx, "
        "as train.py's --arch",
    )
    parser.add_argument(
        "--batch-sizes",
        default="128",
        help=f"comma-separated batch sizes, each at most {EPOCH_IMAGES:,}, e.g. 32,128,512",
    )
    parser.add_argument(
        "--steps",
        type=number(int, 1, below=MAX_STEPS + 1),
        default=None,
        help="timed steps per repeat, or pairs (an even number) with --against and --paired "
        f"(default: one 50,000-image epoch; at most {MAX_STEPS:,})",
    )
    parser.add_argument(
        "--repeats",
        type=number(int, 1, below=MAX_REPEATS + 1),
        default=5,
        help=f"at most {MAX_REPEATS}",
    )
    parser.add_argument(
        "--timeout",
        type=number(float, 0.0, inclusive=False, below=MAX_TIMEOUT),
        default=600.0,
        help="seconds one worker (one implementation, batch size and repeat) may take; "
        "with --against or --paired, to start and warm up, then to answer each turn "
        f"(a short warm-up, then a few timed steps); less than a day ({MAX_TIMEOUT:,})",
    )
    parser.add_argument(
        "--out",
        type=path_type,
        default=Path("docs/benchmark"),
        help="folder for benchmark.md, benchmark.json and benchmark.png (profile.* with "
        "--profile, ab.* with --against, paired.* with --paired)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: break one step of each implementation into phases and into layers "
        "(median of --steps steps, default 50), at each of --batch-sizes",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help=f"instead: the working tree's training step against commit REV's (git; {FIRST_COMMIT} "
        "or later), both warm in two processes that step in turn, --steps pairs (default 40) "
        "at each of --batch-sizes; ratio below 1: the working tree is faster",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="instead: each implementation of --impl but torch against torch, both warm in two "
        "processes that step in turn, --steps pairs (default 40) at each of --batch-sizes; the "
        "ratio of their step times estimates the implementation's epoch time over torch's",
    )
    parser.add_argument(
        "--ladder-images",
        type=number(int, 0, below=MAX_LADDER_IMAGES + 1),
        default=200,
        help="images to time the lab's loop implementation on, extrapolated to an epoch "
        f"(0: skip it; at most {MAX_LADDER_IMAGES:,}, about a minute)",
    )
    add_data_dir_flag(parser, ", which every worker reads")
    args = parse_once(parser, argv)

    def body() -> int:
        if args.against is not None and not args.against.strip():
            raise UsageError("--against: an empty revision; name a commit")
        modes = {"--profile": args.profile, "--against": args.against, "--paired": args.paired}
        chosen = [flag for flag, on in modes.items() if on]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)}: choose one")
        if chosen in (["--against"], ["--paired"]) and args.steps is not None and args.steps % 2:
            # Odd, one side would be started first once more: the side started first runs
            # slower (docs/PERFORMANCE.md, "Method"), and the report says each did for half.
            raise UsageError(
                f"--steps {args.steps}: {chosen[0]} takes an even number of pairs, each side "
                "started first in half of them"
            )
        impls = list(chosen_impls(args))
        if args.paired and set(impls) == {REFERENCE}:
            raise UsageError(f"--paired: name an implementation besides {REFERENCE} with --impl")
        try:
            sizes = [batch_size(s) for s in args.batch_sizes.split(",")]
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--batch-sizes: {e}") from None
        twice = sorted({size for size in sizes if sizes.count(size) > 1})
        if twice:  # each would be timed twice, as a repeat of the other
            raise UsageError(f"--batch-sizes {args.batch_sizes}: {twice[0]} is named twice")
        arch = get_arch(args.arch)
        # Flags a mode does not use were passed over with exit 0, as if they had counted.
        typed = given_flags(parser, argv)
        if chosen and "repeats" in typed:
            raise UsageError(f"--repeats: not with {chosen[0]}, which times no repeats")
        timed = "ladder_images" in typed and args.ladder_images
        if timed and (chosen or arch.name != "lab"):
            raise UsageError(
                f"--ladder-images {args.ladder_images}: the lab's loops are timed beside a "
                "benchmark of --arch lab alone, with none of --profile, --against, --paired"
            )
        if arch.uses_batch_statistics and 1 in sizes:
            raise UsageError("--batch-sizes 1: BatchNorm cannot take statistics of one image")
        cost = network_cost(arch.layers)
        for size in sizes:
            whole = "the benchmark times whole steps"
            check_training_batch(cost, size, np.float32, f"--batch-sizes {size}", whole=whole)
        # Read once here, so that a problem is one line before any work; every worker, the
        # other tree of --against and the lab's loops then read the same folder.
        data = load_dataset(args.data_dir)
        for size in sizes:
            if size > len(data.train):  # no whole batch to time
                raise UsageError(
                    f"--batch-sizes {size}: more than the {len(data.train):,} training images "
                    f"in {data.source}"
                )
        folder = data.source
        name, chart = RESULTS.get(chosen[0] if chosen else "", ("benchmark", True))
        # A bad --against, say, leaves no empty folder behind.
        try:
            with removed_if_left_empty(args.out):
                out = prepare_out_dir(args.out)
                reads = [("--arch", path) for path in network_files(args.arch)]  # kept
                outputs = [
                    ("--out", path)
                    for stopped in (False, True)
                    for path in result_files(out, name, chart, stopped)
                ]
                check_out_files(outputs, reads, own_results=name)
                # One benchmark at a time writes its tables.
                with hold(out), stop_on_signals(), _reading(folder):
                    if args.against:
                        steps = args.steps or 40
                        return run_ab(
                            args.against, impls, arch.name, sizes, steps, args.timeout, out
                        )
                    if args.paired:
                        steps = args.steps or 40
                        return run_paired(impls, arch.name, sizes, steps, args.timeout, out)
                    if args.profile:
                        steps = args.steps or 50
                        return run_profile(impls, arch.name, sizes, steps, args.timeout, out)
                    return run_benchmark(args, arch, sizes, impls, out)
        except Terminated as stop:
            raise interrupted(stop) from None

    return run_cli(parser, body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        impl, arch, batch, steps = sys.argv[2:6]
        print(json.dumps(measure(impl, arch, int(batch), int(steps))))
    elif sys.argv[1:2] == ["--profile-worker"]:
        from shared.profile import profile

        impl, arch, batch, steps = sys.argv[2:6]
        print(json.dumps(profile(impl, arch, int(batch), int(steps))))
    else:
        sys.exit(main())
