"""Time to accuracy: a network trained with a fast recipe over several seeds (and, for the lab
network, with the 15-epoch defaults once) in each implementation, in one process, measured as
speed records are: test accuracy against the seconds spent training.

Training time is the sum of the epochs' step loops (batches drawn, augmented, stepped); the
data loading, the compilation of the step (JAX), the per-epoch validation and the final test
are timed apart (`shared.loop` records each).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.backend import IMPLEMENTATIONS
from shared.cli import add_data_dir_flag, add_impl_flag, chosen_impls, number, run_cli
from shared.config import FAST_RECIPE, STRONG_FAST_RECIPE, TrainConfig
from shared.data import Dataset, load_dataset
from shared.errors import say
from shared.grid import (
    LOCAL,
    Engine,
    RunStore,
    a_duration,
    a_share,
    a_time,
    add_engine_flags,
    check_fits,
    engine_of,
    run_grid,
)
from shared.loop import train
from shared.outputs import (
    STORE_NAME,
    STORE_RESULTS,
    check_out_files,
    hold,
    prepare_out_dir,
    removed_if_left_empty,
    write_results,
)
from shared.profile import peak_memory_mb
from shared.typed import parse_once, path_type


@dataclass(frozen=True)
class Race:
    """One network's speedrun: its recipes (the fast one, and the defaults where the fast one
    is judged against them), the mean test accuracy to reach and, with the defaults, the
    share of their training time to reach it in."""

    arch: str
    recipes: dict[str, dict[str, Any]]
    target_acc: float
    target_ratio: float | None
    seeds: int
    out: str

    @property
    def fast(self) -> dict[str, Any]:
        return self.recipes["fast"]

    @property
    def has_defaults(self) -> bool:
        return "defaults" in self.recipes


RACES = {
    "lab": Race("lab", {"fast": FAST_RECIPE, "defaults": {}}, 0.91, 0.25, 5, "docs/speedrun"),
    # The user's network: time to 92.5% only (its 15-epoch defaults take 5-11 minutes a run,
    # timed in the README; running them again here would triple the speedrun).
    "strong": Race("strong", {"fast": STRONG_FAST_RECIPE}, 0.925, None, 3, "docs/speedrun-strong"),
}
# --quick: the same code on 2,000 images, for tests.
OUTPUT_FILES = (STORE_NAME, *(name for name in STORE_RESULTS if name.startswith("speedrun")))

# Every run of a race is planned (and listed in runs.json) before the first trains; each takes
# minutes, so a thousand seeds is already weeks.
MAX_SEEDS = 1000
QUICK = {"limit": 2000, "seeds": 2, "epochs": {"fast": 1, "defaults": 2}}
# What the report, its results and its plot read of each stored run.
# A training takes time; a summary divides by it.
TIMES = {"test_acc": a_share, "train_seconds": a_time}
TIMES |= dict.fromkeys(("compile_seconds", "test_seconds", "peak_mb"), a_duration)


def quick_images(data: Dataset, quick: bool) -> int | None:
    """How many images a --quick run trains on (None: all)."""
    return min(QUICK["limit"], len(data.train)) if quick else None


def recipe_config(
    race: Race, impl: str, recipe: str, seed: int, quick_images: int | None
) -> TrainConfig:
    """The TrainConfig of a recipe run; with `quick_images`, shortened to that many images
    and QUICK's epochs."""
    settings = dict(race.recipes[recipe])
    if quick_images is not None:
        settings |= {"epochs": QUICK["epochs"][recipe], "limit": quick_images}
    return TrainConfig(impl=impl, arch=race.arch, seed=seed, **settings)


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
        "params_sha256": record["params_sha256"],
        # The peak of the process that trained it: with the local engine, of every run so far.
        "peak_mb": peak_memory_mb(),
    }


def summarize(race: Race, runs: list[dict], impl: str) -> dict[str, Any]:
    """Per implementation: test accuracy of the fast recipe over its seeds (mean, min, spread)
    and its mean training time; where the race has the defaults, their accuracy and training
    time and the ratio of the fast recipe's to theirs (None where it has not)."""
    fast = [r for r in runs if r["impl"] == impl and r["recipe"] == "fast"]
    default = [r for r in runs if r["impl"] == impl and r["recipe"] == "defaults"]
    accs = [r["test_acc"] for r in fast]
    seconds = statistics.mean(r["train_seconds"] for r in fast)
    summary = {
        "impl": impl,
        "seeds": len(fast),
        "mean_acc": statistics.mean(accs),
        "min_acc": min(accs),
        "spread": max(accs) - min(accs),
        "train_seconds": seconds,
        "defaults_acc": None,
        "defaults_train_seconds": None,
        "ratio": None,
        "compile_seconds": statistics.mean(r["compile_seconds"] for r in fast),
        "test_seconds": statistics.mean(r["test_seconds"] for r in fast),
        "meets_accuracy": statistics.mean(accs) >= race.target_acc,
        "meets_time": None,
    }
    if race.has_defaults:
        default_seconds = statistics.mean(r["train_seconds"] for r in default)
        summary |= {
            "defaults_acc": statistics.mean(r["test_acc"] for r in default),
            "defaults_train_seconds": default_seconds,
            "ratio": seconds / default_seconds,
            "meets_time": seconds / default_seconds <= race.target_ratio,
        }
    return summary


def markdown(race: Race, summary: list[dict]) -> str:
    """The summary as a table; the defaults' columns only where the race has them."""
    verdict = {True: "met", False: "missed"}
    columns = [
        ("impl", "---", lambda s: s["impl"]),
        ("seeds", "---:", lambda s: str(s["seeds"])),
        ("test acc mean", "---:", lambda s: f"{100 * s['mean_acc']:.2f}%"),
        ("min", "---:", lambda s: f"{100 * s['min_acc']:.2f}%"),
        ("spread", "---:", lambda s: f"{100 * s['spread']:.2f}"),
        ("training s", "---:", lambda s: f"{s['train_seconds']:.1f}"),
    ]
    with_defaults = [
        (
            "defaults: test acc, training s",
            "---:",
            lambda s: f"{100 * s['defaults_acc']:.2f}%, {s['defaults_train_seconds']:.1f}",
        ),
        ("ratio", "---:", lambda s: f"{100 * s['ratio']:.0f}%"),
    ]
    columns += with_defaults if race.has_defaults else []
    columns += [
        ("compile s", "---:", lambda s: f"{s['compile_seconds']:.2f}"),
        ("final test s", "---:", lambda s: f"{s['test_seconds']:.2f}"),
        (f"mean >= {100 * race.target_acc:.1f}%", "---", lambda s: verdict[s["meets_accuracy"]]),
    ]
    if race.has_defaults:
        ratio = f"ratio <= {100 * race.target_ratio:.0f}%"
        columns.append((ratio, "---", lambda s: verdict[s["meets_time"]]))
    rows = [[head for head, _, _ in columns], [align for _, align, _ in columns]]
    rows += [[cell(s) for _, _, cell in columns] for s in summary]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(race: Race, runs: list[dict], path: Path, title: str) -> None:
    """Test accuracy against training seconds: every run, every recipe, the three
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
    target = 100 * race.target_acc
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.1f}%")
    ax.set(xlabel="training seconds", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def race_runs(
    race: Race, impls: tuple[str, ...], seeds: int, quick_images: int | None
) -> dict[TrainConfig, str]:
    """Every run of the race, in order, and its recipe: per implementation the defaults once
    (where the race has them), then the fast recipe `seeds` times."""
    return {
        recipe_config(race, impl, recipe, seed, quick_images): recipe
        for impl in impls
        for recipe, seed in ([("defaults", 0)] if race.has_defaults else [])
        + [("fast", seed) for seed in range(seeds)]
    }


def labelled(runs: dict[TrainConfig, str]) -> dict[TrainConfig, str]:
    """Each run of `race_runs` -> its label for progress and errors."""
    return {config: f"{config.impl} {recipe} seed {config.seed}" for config, recipe in runs.items()}


def run_speedrun(
    race: Race,
    data: Dataset,
    out: Path,
    impls: tuple[str, ...],
    seeds: int,
    quick: bool,
    progress=print,
    engine: Engine = LOCAL,
    fresh: bool = False,
) -> list[dict]:
    """Train the defaults once (where the race has them) and the fast recipe `seeds` times per
    implementation on `engine`. Finished runs are kept in out/runs.json as they end, so an
    interrupted speedrun resumes with the runs it lacks (all again with `fresh`)."""
    recipes = race_runs(race, impls, seeds, quick_images(data, quick))
    store = RunStore(out / STORE_NAME, data.content_sha256, fresh, "speedrun")
    reads = dict.fromkeys(recipes, TIMES)
    run_grid(timed_run, labelled(recipes), data, store, engine, progress, reads)
    runs = [
        # The store's key, not the summary, says which implementation trained it.
        {
            "recipe": recipe,
            **store.summary(config, TIMES),
            "impl": config.impl,
            **machine_of(store.entry(config)),
        }
        for config, recipe in recipes.items()
    ]
    machines = sorted({(r["cpu"], r["cores"]) for r in runs})
    summary = [summarize(race, runs, impl) for impl in impls]
    payload = {
        "machines": [{"cpu": cpu, "cores": cores} for cpu, cores in machines],
        "arch": race.arch,
        "fast": race.fast,
        "quick": quick,
        "engine": engine.name,
        "peak_mb": max(r["peak_mb"] for r in runs),
        "summary": summary,
        "runs": runs,
    }
    text = report(race, machines, quick_images(data, quick), seeds, summary, engine)
    for line in ("\n" + text).splitlines():  # `progress` takes a line at a time
        progress(line)
    title = f"{race.arch} network, time to accuracy ({'; '.join(cpu for cpu, _ in machines)})"
    write_results(
        out, "speedrun", text, payload, lambda path: plot(race, runs, path, title), progress
    )
    return summary


def machine_of(stored: dict) -> dict[str, Any]:
    """The processor and the cores a stored run trained on (runs stored before they were
    recorded have neither)."""
    return {"cpu": stored.get("cpu", "an unrecorded processor"), "cores": stored.get("cores", 0)}


def report(
    race: Race,
    machines: list[tuple[str, int]],
    images: int | None,
    seeds: int,
    summary: list[dict],
    engine: Engine = LOCAL,
) -> str:
    """speedrun.md: the command, the machines and cores a run had, the recipe as the runs
    trained it (`images`: a --quick run's, None for the whole set), the table."""
    quick = images is not None
    fast = race.fast | ({"epochs": QUICK["epochs"]["fast"], "limit": images} if quick else {})
    defaults = (
        f"{QUICK['epochs']['defaults']} epochs on {images:,} images"
        if quick
        else f"{TrainConfig().epochs} epochs at batch {TrainConfig().batch_size}"
    )
    impls = [s["impl"] for s in summary]
    flags = (" --arch " + race.arch if race.arch != "lab" else "") + (" --quick" if quick else "")
    flags += "".join(f" --impl {impl}" for impl in impls) if impls != list(IMPLEMENTATIONS) else ""
    flags += f" --seeds {seeds}" if seeds != (QUICK["seeds"] if quick else race.seeds) else ""
    flags += engine.flags
    where = "; ".join(f"{cpu}, {cores} core{'s' * (cores > 1)} a run" for cpu, cores in machines)
    header = f"`python scripts/speedrun.py{flags}` on {where}. Fast recipe: " + ", ".join(
        f"{k}={v}" for k, v in fast.items()
    )
    header += f" ({seeds} seed{'s' * (seeds > 1)})"
    if race.has_defaults:
        header += (
            f"; defaults: {defaults} (1 run). Ratio: the fast recipe's mean training time over "
            "the defaults'"
        )
    return header + ".\n\n" + markdown(race, summary)


def main(argv: list[str] | None = None) -> int:
    """scripts/speedrun.py: the fast recipe in every implementation (against the defaults, on
    the lab network)."""
    parser = argparse.ArgumentParser(prog="speedrun.py", description=__doc__)
    add_impl_flag(parser, "run")
    parser.add_argument(
        "--arch",
        choices=tuple(RACES),
        default="lab",
        help="lab: to 91%% with the fast recipe, against the 15-epoch defaults; strong: to 92.5%%",
    )
    parser.add_argument(
        "--seeds",
        type=number(int, 1, below=MAX_SEEDS + 1),
        default=None,
        help=f"fast-recipe seeds (lab 5, strong 3; at most {MAX_SEEDS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2,000 images, 1 epoch (2 for the defaults), 2 seeds (for tests)",
    )
    parser.add_argument(
        "--out",
        type=path_type,
        default=None,
        help="folder for speedrun.md, speedrun.json and speedrun.png (default: docs/speedrun, "
        "docs/speedrun-strong with --arch strong, or runs/speedrun-quick with --quick)",
    )
    add_data_dir_flag(parser)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="train every run again instead of reusing those stored in OUT/runs.json",
    )
    add_engine_flags(parser)
    args = parse_once(parser, argv)

    def body() -> int:
        engine = engine_of(args)
        race = RACES[args.arch]
        default_out = "runs/speedrun-quick" if args.quick else race.out
        seeds = args.seeds or (QUICK["seeds"] if args.quick else race.seeds)
        data = load_dataset(args.data_dir)
        impls = chosen_impls(args)
        check_fits(labelled(race_runs(race, impls, seeds, quick_images(data, args.quick))), data)
        out = args.out or Path(default_out)
        # A cluster found missing or too small leaves no empty folder behind.
        with removed_if_left_empty(out):
            prepare_out_dir(out)
            # Checked before any run trains, not found when the race has ended.
            outputs = [("--out", out / name) for name in OUTPUT_FILES]
            check_out_files(outputs, store=out / STORE_NAME)
            with hold(out):
                run_speedrun(
                    race,
                    data,
                    out,
                    impls,
                    seeds,
                    args.quick,
                    progress=say,
                    engine=engine,
                    fresh=args.fresh,
                )
        return 0

    return run_cli(parser, body)
