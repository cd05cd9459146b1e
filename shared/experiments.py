"""The lab's claims rerun as controlled comparisons (the questions of shared/lab_questions.py):
same seed and budget per row, every implementation, finished runs kept in a run store, results
written to docs/EXPERIMENTS.md with learning curves (shared/experiments_report.py)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.backend import IMPLEMENTATIONS
from shared.cli import add_data_dir_flag, add_impl_flag, chosen_impls, run_cli
from shared.config import DEEP_RECIPE, TrainConfig, setting_problem
from shared.data import Dataset, load_dataset
from shared.errors import DataError, UsageError, say
from shared.experiments_report import (
    CURVES,
    figure_name,
    load_results,
    plot_comparison,
    report_text,
    spread_of,
    write_report,
)
from shared.grid import (
    LOCAL,
    Engine,
    RunStore,
    add_engine_flags,
    check_fits,
    engine_of,
    run_grid,
)
from shared.io import write_json
from shared.lab_questions import (
    AGREEMENT,
    DEEP,
    SHORT,
    STRONG,
    Experiment,
    comparisons,
    seed_row_label,
)
from shared.loop import train
from shared.outputs import (
    STORE_NAME,
    check_out_files,
    hold,
    prepare_out_dir,
    removed_if_left_empty,
)
from shared.typed import parse_once, path_type

# --quick: a reduced run for tests, the same code path on 1,000 images (the questions asked on
# a shorter or deeper run: 500 images, 1 epoch).
QUICK = dict(
    base=TrainConfig(epochs=2, limit=1000),
    budgets=(1, 2),
    seeds=(0,),
    lab_batch=500,
    short={"epochs": 1, "limit": 500},
    deep={**DEEP_RECIPE, "epochs": 1, "limit": 500},
)


def variant_config(base: TrainConfig, changes: dict[str, Any], impl: str) -> TrainConfig:
    """The configuration of one (variant, implementation)."""
    return dataclasses.replace(base, impl=impl, **changes)


def trained_summary(config: TrainConfig, data: Dataset) -> dict:
    """A grid's task: train `config`, keep its summary."""
    return summary(train(config, data, log=lambda _: None))


def summary(record: dict) -> dict:
    history = record["history"]
    return {
        "test_acc": record["test"]["acc"],
        "val_acc": history[-1]["val_acc"],
        "epoch_seconds": statistics.median(h["epoch_seconds"] for h in history),
        "val_curve": [h["val_acc"] for h in history],
        "params_sha256": record["params_sha256"],
    }


@dataclass(frozen=True)
class Plan:
    """Every run of the experiments: each comparison's and seed row's cells, (table, row,
    impl) -> configurations, and the settings they were made from."""

    impls: tuple[str, ...]
    base: TrainConfig
    short: dict[str, Any]
    deep: dict[str, Any]
    comps: list[Experiment]
    cells: dict[tuple[str, str, str], list[TrainConfig]]

    def grid(self) -> dict[TrainConfig, str]:
        """Each configuration -> its label for progress."""
        return {
            config: f"{title}: {row} | {impl}"
            + (f" | seed {config.seed}" if title == "Seeds" else "")
            for (title, row, impl), configs in self.cells.items()
            for config in configs
        }


def plan_experiments(
    *,
    impls: tuple[str, ...] = IMPLEMENTATIONS,
    base: TrainConfig | None = None,
    budgets: tuple[int, ...] = (1, 5, 10, 15),
    seeds: tuple[int, ...] = (0, 1, 2),
    lab_batch: int = 10_000,
    short: dict[str, Any] | None = None,
    deep: dict[str, Any] | None = None,
) -> Plan:
    """The runs of every comparison in `impls` and of the seed repeats (three seeds in JAX and
    PyTorch, the first in NumPy) of lab, pool, strong, strong on the `short` budget and deep on
    its recipe."""
    base = base or TrainConfig()
    short = SHORT if short is None else short
    deep = DEEP_RECIPE if deep is None else deep
    comps = comparisons(base.epochs, budgets, lab_batch, short, deep)
    cells: dict[tuple[str, str, str], list[TrainConfig]] = {}
    for comp in comps:
        for variant in comp.variants:
            for impl in impls:
                config = variant_config(base, {**comp.budget, **variant.changes}, impl)
                cells[comp.title, variant.label, impl] = [config]
    for arch, budget in (("lab", {}), ("pool", {}), (STRONG, {}), (STRONG, short), (DEEP, deep)):
        row = seed_row_label(arch, budget)
        for impl in impls:
            cells["Seeds", row, impl] = [
                variant_config(base, {**budget, "arch": arch, "seed": seed}, impl)
                for seed in (seeds if impl != "numpy" else seeds[:1])
            ]
    return Plan(impls, base, short, deep, comps, cells)


def run_experiments(
    data: Dataset,
    out: Path,
    *,
    command: str = "python scripts/experiments.py",
    fresh: bool = False,
    progress: Callable[[str], None] = print,
    engine: Engine = LOCAL,
    **settings: Any,
) -> dict:
    """Run every comparison and the seed repeats of plan_experiments(**settings) on `engine`,
    write EXPERIMENTS.md, plots and JSON into `out` (plots and finished runs under
    out/experiments/; runs stored there are reused unless `fresh`). Returns all results."""
    plan = plan_experiments(**settings)
    impls, cells = plan.impls, plan.cells
    figures = prepare_out_dir(out / "experiments", "--out")
    store = RunStore(figures / STORE_NAME, data.content_sha256, fresh, "experiments")
    drawn = [cells[c.title, v.label, i][0] for c in plan.comps for v in c.variants for i in impls]
    reads = dict.fromkeys(drawn, CURVES)  # a seed row's runs: their accuracies alone
    run_grid(trained_summary, plan.grid(), data, store, engine, progress, reads)
    tables = []
    for comp in plan.comps:
        results = {
            v.label: {i: store.summary(cells[comp.title, v.label, i][0], CURVES) for i in impls}
            for v in comp.variants
        }
        plot_comparison(comp.title, results, figures / figure_name(comp.title))
        tables.append((comp, results, f"experiments/{figure_name(comp.title)}"))
    seeds_table = {
        (row, impl): [store.summary(c)["test_acc"] for c in configs]
        for (title, row, impl), configs in cells.items()
        if title == "Seeds"
    }
    saved = {
        "base": dataclasses.asdict(plan.base),
        "short": plan.short,
        "deep": plan.deep,
        "command": command,
        "comparisons": {c.title: r for c, r, _ in tables},
        "variants": {
            c.title: {v.label: {**c.budget, **v.changes} for v in c.variants} for c, _, _ in tables
        },
        "seeds": {f"{a}|{i}": v for (a, i), v in seeds_table.items()},
        "float64": {},
        # What a later --recheck-float64 must train on, and the runs behind the tables.
        "data": data.content_sha256,
        "tables_trained": store.provenance(),
    }

    def save() -> None:
        saved["trained"] = store.provenance()
        write_json(figures / "results.json", saved)
        write_report(out, report_text(saved))

    save()  # before the recheck too, so that stopping it loses no finished table
    saved["float64"] = recheck_in_float64(data, saved, progress, store, engine)
    save()
    return {"tables": tables, "seeds": seeds_table}


def recheck_in_float64(
    data: Dataset,
    saved: dict,
    progress: Callable[[str], None] = print,
    store: RunStore | None = None,
    engine: Engine = LOCAL,
) -> dict[str, dict[str, float]]:
    """Train again, in float64, every row whose implementations' test accuracies differ by
    more than AGREEMENT: float32 drift vanishes there, a real difference would not.
    -> {"title / label": {impl: test accuracy}}."""
    base = dataclasses.replace(TrainConfig(**saved["base"]), dtype="float64")
    store = store or RunStore(None, data.content_sha256)
    rows = {
        f"{title} / {label}": {
            impl: variant_config(base, saved["variants"][title][label], impl) for impl in by_impl
        }
        for title, table in saved["comparisons"].items()
        for label, by_impl in table.items()
        if spread_of({i: s["test_acc"] for i, s in by_impl.items()}) > AGREEMENT
    }
    grid = {
        config: f"Agreement in float64: {row} | {impl}"
        for row, configs in rows.items()
        for impl, config in configs.items()
    }
    check_fits(grid, data)  # naming the row, not a --limit the user never typed
    run_grid(trained_summary, grid, data, store, engine, progress)
    return {
        row: {impl: store.summary(config)["test_acc"] for impl, config in configs.items()}
        for row, configs in rows.items()
    }


def main(argv: list[str] | None = None) -> int:
    """scripts/experiments.py: run (or re-render, or recheck) the experiments."""
    parser = argparse.ArgumentParser(
        prog="experiments.py",
        description="Rerun the lab's claims as controlled comparisons in every implementation "
        "and write EXPERIMENTS.md with tables and learning curves.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run: 1,000 images, 2 epochs (500 and 1 for the short and deep questions), "
        "one seed (for tests)",
    )
    add_impl_flag(parser, "run")
    parser.add_argument(
        "--out",
        type=path_type,
        default=None,
        help="folder for EXPERIMENTS.md and experiments/ (default: docs, or "
        "runs/experiments-quick with --quick)",
    )
    add_data_dir_flag(parser)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="train every run again instead of reusing those stored in OUT/experiments/runs.json",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite EXPERIMENTS.md from OUT/experiments/results.json, no training",
    )
    parser.add_argument(
        "--recheck-float64",
        action="store_true",
        help="train again in float64 the rows of OUT/experiments/results.json whose "
        "implementations differ by more than 0.3 points, then rewrite EXPERIMENTS.md",
    )
    add_engine_flags(parser)
    args = parse_once(parser, argv)

    def body() -> int:
        rerender = args.render_only or args.recheck_float64
        out = args.out or Path("runs/experiments-quick" if args.quick else "docs")
        results = out / "experiments" / "results.json"
        if rerender and args.impl:  # the saved rows hold their own implementations
            flag = "--render-only" if args.render_only else "--recheck-float64"
            raise UsageError(f"--impl: not with {flag}, which takes the saved results' own")
        if rerender and not results.is_file():
            flag = "--render-only" if args.render_only else "--recheck-float64"
            raise UsageError(f"{flag}: no {results}; run without it first")
        # The data is read, and every run checked to fit it, before any folder is made (a
        # re-render needs none).
        rendered_only = args.render_only and not args.recheck_float64  # a recheck trains
        unused = [("--fresh", args.fresh), ("--data-dir", args.data_dir is not None)]
        unused += [(f"--engine {args.engine}", args.engine != "local")]
        flag = next((flag for flag, given in unused if given and rendered_only), None)
        if flag is not None:
            raise UsageError(f"{flag}: --render-only trains nothing and reads no data")
        engine = engine_of(args)  # after: a cluster it would not use is not looked for
        data = None if rendered_only else load_dataset(args.data_dir)
        settings = {"impls": chosen_impls(args), **(QUICK if args.quick else {})}
        if not rerender:
            check_fits(plan_experiments(**settings).grid(), data)
        # A cluster found missing or too small leaves no empty folder behind.
        with removed_if_left_empty(out / "experiments"):
            out = prepare_out_dir(out)
            # Checked before any run trains, not found when the grid has ended.
            figures = out / "experiments"
            stored = ("results.json", STORE_NAME) if figures.is_dir() else ()
            plotted = () if rerender or not stored else plan_experiments(**settings).comps
            written = [
                out / "EXPERIMENTS.md",
                *(figures / name for name in stored),
                *(figures / figure_name(comp.title) for comp in plotted),
            ]
            check_out_files([("--out", path) for path in written], store=figures / STORE_NAME)
            # One grid at a time writes its report and, in its own folder, its run store (which a
            # speedrun given --out OUT/experiments refuses: RunStore's command).
            with hold(out), hold(prepare_out_dir(figures)):
                if rerender:
                    return _rerender(args, out, data, engine, settings)
                run_experiments(
                    data,
                    out,
                    command=command_of(args.quick, settings["impls"], engine),
                    fresh=args.fresh,
                    progress=say,
                    engine=engine,
                    **settings,
                )
        say(f"wrote {out / 'EXPERIMENTS.md'} and {out / 'experiments'}/")
        return 0

    return run_cli(parser, body)


def command_of(quick: bool, impls: tuple[str, ...], engine: Engine) -> str:
    """The command the report names: the flags that change what its tables hold, and where
    they trained."""
    command = "python scripts/experiments.py" + (" --quick" if quick else "")
    if impls != IMPLEMENTATIONS:
        command += "".join(f" --impl {impl}" for impl in impls)
    return command + engine.flags


def _check_variants(saved: dict, path: Path) -> None:
    """The settings of every row of saved results' comparisons, there and each checked as its
    flag would be, before any is trained again: else a DataError naming the file."""
    variants = saved.get("variants")
    rows = [(title, label) for title, table in saved["comparisons"].items() for label in table]
    if not isinstance(variants, dict) or not all(
        isinstance(variants.get(title), dict) and isinstance(variants[title].get(label), dict)
        for title, label in rows
    ):
        raise DataError(
            f"{path}: lacks the variants of its comparisons, to train them again (written "
            "before --recheck-float64 existed, or damaged); run the experiments again"
        )
    for title, label in rows:
        for name, value in variants[title][label].items():
            problem = setting_problem(name, value)
            if problem is not None:
                raise DataError(
                    f"{path}: variants / {title} / {label}: {name} = {value!r}, {problem}"
                )


def _rerender(
    args: argparse.Namespace, out: Path, data: Dataset | None, engine: Engine, settings: dict
) -> int:
    """--render-only: EXPERIMENTS.md again from the saved results; --recheck-float64: first
    train again in float64 the rows whose implementations disagree."""
    path = out / "experiments" / "results.json"
    saved, report = load_results(path)
    if args.recheck_float64:
        _check_variants(saved, path)
        if saved.get("data", data.content_sha256) != data.content_sha256:
            raise UsageError(
                f"{data.source}: other data than the tables of {path} trained on; recheck "
                "them on the same data (--data-dir)"
            )
        store = RunStore(path.parent / STORE_NAME, data.content_sha256, args.fresh, "experiments")
        tables = saved.get("tables_trained")
        if tables is None:  # saved by an older version: the runs this grid's flags plan
            for config in plan_experiments(**settings).grid():
                if store.key(config) in store.runs:  # read, not trained again, even with --fresh
                    store.entry(config)
        saved["float64"] = recheck_in_float64(data, saved, say, store, engine)
        saved["trained"] = dict(Counter(tables or {}) + Counter(store.provenance()))
        write_json(path, saved)
        report = report_text(saved)
    write_report(out, report)
    say(f"wrote {out / 'EXPERIMENTS.md'}")
    return 0
