"""Time to accuracy: the lab network trained with a fast recipe over several seeds, and with the
15-epoch defaults once, in each implementation, in one process, measured as speed records are:
test accuracy against the seconds spent training.

Training time is the sum of the epochs' step loops (batches drawn, augmented, stepped); the
data loading, the compilation of the step (JAX), the per-epoch validation and the final test
are timed apart (`shared.loop` records each).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from shared.backend import IMPLEMENTATIONS
from shared.cli import add_impl_flag, positive_int, run_cli
from shared.config import FAST_RECIPE, TrainConfig
from shared.data import Dataset, load_dataset
from shared.io import atomic_write, write_json
from shared.loop import train, train_split
from shared.outputs import hold, prepare_out_dir
from shared.spec import get_arch

ARCH = "lab"
RECIPES = {"fast": FAST_RECIPE, "defaults": {}}
TARGET_ACC = 0.91
TARGET_RATIO = 0.25
# --quick: the same code on 2,000 images, for tests.
QUICK = {"limit": 2000, "seeds": 2, "epochs": {"fast": 1, "defaults": 2}}


def cpu_name() -> str:
    """The processor's model name as `lscpu` gives it (timings are only comparable on one)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    family, model = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
    return f"{name} (family {family}, model {model}), {fields.get('CPU(s)', '?').strip()} CPUs"


def quick_images(data: Dataset, quick: bool) -> int | None:
    """How many images a --quick run trains on (None: all)."""
    return min(QUICK["limit"], len(data.train)) if quick else None


def recipe_config(impl: str, recipe: str, seed: int, quick_images: int | None) -> TrainConfig:
    """The TrainConfig of a recipe run; with `quick_images`, shortened to that many images
    and QUICK's epochs."""
    settings = dict(RECIPES[recipe])
    if quick_images is not None:
        settings |= {"epochs": QUICK["epochs"][recipe], "limit": quick_images}
    return TrainConfig(impl=impl, arch=ARCH, seed=seed, **settings)


def timed_run(config: TrainConfig, data: Dataset) -> dict[str, Any]:
    """Train one run; its test accuracy and where its seconds went."""
    start = time.perf_counter()
    record = train(config, data, log=lambda line: None)
    wall = time.perf_counter() - start
    history = record["history"]
    training = sum(e["train_seconds"] for e in history)
    validation = sum(e["epoch_seconds"] - e["train_seconds"] for e in history)
    compile_seconds = record["compile_seconds"]
    test_seconds = record["test"]["seconds"]
    return {
        "impl": config.impl,
        "seed": config.seed,
        "test_acc": record["test"]["acc"],
        "val_acc": history[-1]["val_acc"],
        "train_seconds": training,
        "compile_seconds": compile_seconds,
        "validation_seconds": validation,
        "test_seconds": test_seconds,
        # Building the backend, the initial weights, moving the data in.
        "setup_seconds": wall - training - validation - compile_seconds - test_seconds,
        "config": dataclasses.asdict(config),
    }


def summarize(runs: list[dict], impl: str) -> dict[str, Any]:
    """Per implementation: test accuracy of the fast recipe over its seeds (mean, min, spread),
    its mean training time, and the ratio of that to the defaults' training time."""
    fast = [r for r in runs if r["impl"] == impl and r["recipe"] == "fast"]
    default = [r for r in runs if r["impl"] == impl and r["recipe"] == "defaults"]
    accs = [r["test_acc"] for r in fast]
    seconds = statistics.mean(r["train_seconds"] for r in fast)
    default_seconds = statistics.mean(r["train_seconds"] for r in default)
    return {
        "impl": impl,
        "seeds": len(fast),
        "mean_acc": statistics.mean(accs),
        "min_acc": min(accs),
        "spread": max(accs) - min(accs),
        "train_seconds": seconds,
        "defaults_acc": statistics.mean(r["test_acc"] for r in default),
        "defaults_train_seconds": default_seconds,
        "ratio": seconds / default_seconds,
        "compile_seconds": statistics.mean(r["compile_seconds"] for r in fast),
        "test_seconds": statistics.mean(r["test_seconds"] for r in fast),
        "meets_accuracy": statistics.mean(accs) >= TARGET_ACC,
        "meets_time": seconds / default_seconds <= TARGET_RATIO,
    }


def markdown(summary: list[dict]) -> str:
    lines = [
        "| impl | seeds | test acc mean | min | spread | training s | defaults: test acc, "
        f"training s | ratio | compile s | final test s | mean >= {100 * TARGET_ACC:.1f}% | "
        f"ratio <= {100 * TARGET_RATIO:.0f}% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    verdict = {True: "met", False: "missed"}
    for s in summary:
        lines.append(
            f"| {s['impl']} | {s['seeds']} | {100 * s['mean_acc']:.2f}% | "
            f"{100 * s['min_acc']:.2f}% | {100 * s['spread']:.2f} | {s['train_seconds']:.1f} | "
            f"{100 * s['defaults_acc']:.2f}%, {s['defaults_train_seconds']:.1f} | "
            f"{100 * s['ratio']:.0f}% | {s['compile_seconds']:.2f} | {s['test_seconds']:.2f} | "
            f"{verdict[s['meets_accuracy']]} | {verdict[s['meets_time']]} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Test accuracy against training seconds: every run, both recipes, the three
    implementations overlaid."""
    from shared.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {impl: f"C{k}" for k, impl in enumerate(IMPLEMENTATIONS)}
    for impl in IMPLEMENTATIONS:
        for recipe, marker in (("fast", "o"), ("defaults", "s")):
            mine = [r for r in runs if r["impl"] == impl and r["recipe"] == recipe]
            if mine:
                ax.scatter(
                    [r["train_seconds"] for r in mine],
                    [100 * r["test_acc"] for r in mine],
                    marker=marker,
                    color=colors[impl],
                    label=f"{impl}, {recipe}",
                    alpha=0.8,
                )
    ax.axhline(
        100 * TARGET_ACC, color="gray", ls="--", lw=1, label=f"target {100 * TARGET_ACC:.1f}%"
    )
    ax.set(xlabel="training seconds", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run_speedrun(
    data: Dataset,
    out: Path,
    impls: tuple[str, ...],
    seeds: int,
    quick: bool,
    progress=print,
) -> list[dict]:
    """Train the defaults once and the fast recipe `seeds` times per implementation; the
    results so far are written after every run, so an interrupted speedrun keeps them."""
    cpu = cpu_name()
    runs: list[dict] = []

    def save(done: bool) -> list[dict]:
        summary = [summarize(runs, impl) for impl in impls] if done else []
        write_json(
            out / "speedrun.json",
            {
                "cpu": cpu,
                "fast": FAST_RECIPE,
                "quick": quick,
                "complete": done,
                # All three frameworks in this one process: its peak bounds each run's.
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "summary": summary,
                "runs": runs,
            },
        )
        return summary

    for impl in impls:
        plan = [("defaults", 0)] + [("fast", seed) for seed in range(seeds)]
        for recipe, seed in plan:
            config = recipe_config(impl, recipe, seed, quick_images(data, quick))
            run = {"recipe": recipe, **timed_run(config, data)}
            runs.append(run)
            save(done=False)
            progress(
                f"{impl:5} {recipe:8} seed {seed}: test {100 * run['test_acc']:.2f}% after "
                f"{run['train_seconds']:.1f} s of training"
            )
    summary = save(done=True)
    text = report(cpu, quick, seeds, summary)
    atomic_write(out / "speedrun.md", lambda f: f.write((text + "\n").encode()))
    plot(runs, out / "speedrun.png", f"lab network, time to accuracy ({cpu})")
    progress("\n" + text)
    return summary


def report(cpu: str, quick: bool, seeds: int, summary: list[dict]) -> str:
    """speedrun.md: the command, the machine, the recipe, and the table."""
    defaults = (
        f"{QUICK['epochs']['defaults']} epochs on {QUICK['limit']:,} images"
        if quick
        else f"{TrainConfig().epochs} epochs at batch {TrainConfig().batch_size}"
    )
    header = (
        f"`python scripts/speedrun.py{' --quick' if quick else ''}` on {cpu}. Fast recipe: "
        + ", ".join(f"{k}={v}" for k, v in FAST_RECIPE.items())
        + f" ({seeds} seeds); defaults: {defaults} (1 run). Ratio: the fast "
        "recipe's mean training time over the defaults'.\n\n"
    )
    return header + markdown(summary)


def main(argv: list[str] | None = None) -> int:
    """scripts/speedrun.py: the fast recipe against the defaults, in every implementation."""
    parser = argparse.ArgumentParser(prog="speedrun.py", description=__doc__)
    add_impl_flag(parser, "run")
    parser.add_argument("--seeds", type=positive_int, default=None, help="fast-recipe seeds (5)")
    parser.add_argument(
        "--quick", action="store_true", help="2,000 images, 1 and 2 epochs, 2 seeds (for tests)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for speedrun.md, speedrun.json and speedrun.png (default: docs/speedrun, "
        "or runs/speedrun-quick with --quick)",
    )
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        default_out = "runs/speedrun-quick" if args.quick else "docs/speedrun"
        seeds = args.seeds or (QUICK["seeds"] if args.quick else 5)
        data = load_dataset(args.data_dir)
        for recipe in RECIPES:  # both fit the data before any folder is made
            config = recipe_config("numpy", recipe, 0, quick_images(data, args.quick))
            train_split(config, get_arch(config.arch), data)
        out = prepare_out_dir(args.out or Path(default_out))
        with hold(out):
            run_speedrun(
                data,
                out,
                tuple(dict.fromkeys(args.impl or IMPLEMENTATIONS)),  # each once
                seeds,
                args.quick,
                progress=lambda line: print(line, flush=True),
            )
        print(f"wrote {out / 'speedrun.md'}, {out / 'speedrun.json'}, {out / 'speedrun.png'}")
        return 0

    return run_cli(parser, body)
