"""The lab's claims rerun as controlled comparisons (the questions of shared/lab_questions.py):
same seed and budget per row, every implementation, finished runs kept in a run store, results
written to docs/EXPERIMENTS.md with learning curves (shared/experiments_report.py)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.backend import IMPLEMENTATIONS
from shared.cli import add_impl_flag, run_cli
from shared.config import TrainConfig
from shared.data import Dataset, load_dataset
from shared.errors import DataError, UsageError
from shared.experiments_report import (
    load_results,
    plot_comparison,
    report_text,
    spread_of,
    write_report,
)
from shared.io import read_json, write_json
from shared.lab_questions import AGREEMENT, SHORT, STRONG, comparisons, seed_row_label
from shared.loop import train
from shared.outputs import hold, prepare_out_dir

# --quick: a reduced run for tests, the same code path on 1,000 images.
QUICK = dict(
    base=TrainConfig(epochs=2, limit=1000),
    budgets=(1, 2),
    seeds=(0,),
    lab_batch=500,
    short={"epochs": 1, "limit": 500},
)


class RunStore:
    """Finished runs' summaries, keyed by their whole configuration, in a JSON file beside the
    results: an interrupted experiments run resumes where it stopped, a rerun trains only
    what is new, and each run says when and from which commit it was trained."""

    def __init__(self, path: Path | None, fresh: bool = False):
        self.path = path
        self.runs: dict[str, dict] = {}
        if path is not None and not fresh and path.is_file():
            try:
                runs = read_json(path)["runs"]
                if not all(_a_share(r["summary"]["test_acc"]) for r in runs.values()):
                    raise TypeError("a run without a test accuracy")
                self.runs = runs
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(
                    f"{path}: damaged or not threefold's runs ({type(e).__name__}: {e}); "
                    "move it away or pass --fresh"
                ) from None

    @staticmethod
    def key(config: TrainConfig) -> str:
        return json.dumps(dataclasses.asdict(config), sort_keys=True)

    def run(self, config: TrainConfig, data: Dataset) -> dict:
        """The summary of `config`'s run, training it unless already stored."""
        key = self.key(config)
        if key not in self.runs:
            record = train(config, data, log=lambda _: None)
            self.runs[key] = {"summary": summary(record), "trained": checkout_label()}
            if self.path is not None:
                write_json(self.path, {"runs": self.runs})
        return self.runs[key]["summary"]

    def provenance(self) -> dict[str, int]:
        """How many stored runs each (date, commit) trained."""
        return dict(collections.Counter(r["trained"] for r in self.runs.values()))


def _a_share(value: object) -> bool:
    """Whether a stored accuracy is one: a finite float in [0, 1] (JSON may hold NaN)."""
    return isinstance(value, float) and 0.0 <= value <= 1.0


def checkout_label() -> str:
    """Today's date and the checkout's commit, as far as git can tell."""
    date = datetime.datetime.now(datetime.UTC).date().isoformat()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{date} {commit or 'outside git'}"


def run_variant(
    base: TrainConfig, changes: dict[str, Any], impl: str, data: Dataset, store: RunStore
) -> dict:
    """The summary of one (variant, implementation): the stored one or a new run."""
    return store.run(dataclasses.replace(base, impl=impl, **changes), data)


def summary(record: dict) -> dict:
    history = record["history"]
    return {
        "test_acc": record["test"]["acc"],
        "val_acc": history[-1]["val_acc"],
        "epoch_seconds": statistics.median(h["epoch_seconds"] for h in history),
        "val_curve": [h["val_acc"] for h in history],
    }


def run_experiments(
    data: Dataset,
    out: Path,
    *,
    impls: tuple[str, ...] = IMPLEMENTATIONS,
    base: TrainConfig | None = None,
    budgets: tuple[int, ...] = (1, 5, 10, 15),
    seeds: tuple[int, ...] = (0, 1, 2),
    lab_batch: int = 10_000,
    short: dict[str, Any] | None = None,
    command: str = "python scripts/experiments.py",
    fresh: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Run every comparison and the seed repeats, write EXPERIMENTS.md, plots and JSON into
    `out` (plots and finished runs under out/experiments/; runs stored there are reused
    unless `fresh`). Returns all results."""
    base = base or TrainConfig()
    short = SHORT if short is None else short
    figures = out / "experiments"
    figures.mkdir(parents=True, exist_ok=True)
    store = RunStore(figures / "runs.json", fresh)
    tables = []
    for comp in comparisons(base.epochs, budgets, lab_batch, short):
        results: dict[str, dict[str, dict]] = {}
        for variant in comp.variants:
            for impl in impls:
                progress(f"{comp.title}: {variant.label} | {impl}")
                changes = {**comp.budget, **variant.changes}
                results.setdefault(variant.label, {})[impl] = run_variant(
                    base, changes, impl, data, store
                )
        slug = comp.title.lower().replace(" ", "-")
        plot_comparison(comp.title, results, figures / f"{slug}.png")
        tables.append((comp, results, f"experiments/{slug}.png"))
    seeds_table = {}
    for arch, budget in (("lab", {}), ("pool", {}), (STRONG, {}), (STRONG, short)):
        row = seed_row_label(arch, budget)
        for impl in impls:
            accs = []
            for seed in seeds if impl != "numpy" else seeds[:1]:
                progress(f"Seeds: {row} | {impl} | seed {seed}")
                changes = {**budget, "arch": arch, "seed": seed}
                accs.append(run_variant(base, changes, impl, data, store)["test_acc"])
            seeds_table[(row, impl)] = accs
    saved = {
        "base": dataclasses.asdict(base),
        "short": short,
        "command": command,
        "comparisons": {c.title: r for c, r, _ in tables},
        "variants": {
            c.title: {v.label: {**c.budget, **v.changes} for v in c.variants} for c, _, _ in tables
        },
        "seeds": {f"{a}|{i}": v for (a, i), v in seeds_table.items()},
        "float64": {},
    }

    def save() -> None:
        saved["trained"] = store.provenance()
        write_json(figures / "results.json", saved)
        write_report(out, report_text(saved))

    save()  # before the recheck too, so that stopping it loses no finished table
    saved["float64"] = recheck_in_float64(data, saved, progress, store)
    save()
    return {"tables": tables, "seeds": seeds_table}


def recheck_in_float64(
    data: Dataset,
    saved: dict,
    progress: Callable[[str], None] = print,
    store: RunStore | None = None,
) -> dict[str, dict[str, float]]:
    """Train again, in float64, every row whose implementations' test accuracies differ by
    more than AGREEMENT: float32 drift vanishes there, a real difference would not.
    -> {"title / label": {impl: test accuracy}}."""
    base = dataclasses.replace(TrainConfig(**saved["base"]), dtype="float64")
    store = store or RunStore(None)
    rechecked = {}
    for title, rows in saved["comparisons"].items():
        for label, by_impl in rows.items():
            if spread_of({i: s["test_acc"] for i, s in by_impl.items()}) <= AGREEMENT:
                continue
            changes = saved["variants"][title][label]
            accs = {}
            for impl in by_impl:
                progress(f"Agreement in float64: {title} / {label} | {impl}")
                accs[impl] = run_variant(base, changes, impl, data, store)["test_acc"]
            rechecked[f"{title} / {label}"] = accs
    return rechecked


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
        help="a reduced run: 1,000 images, 2 epochs, one seed (for tests)",
    )
    add_impl_flag(parser, "run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for EXPERIMENTS.md and experiments/ (default: docs, or "
        "runs/experiments-quick with --quick)",
    )
    parser.add_argument("--data-dir", default=None)
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
    args = parser.parse_args(argv)

    def body() -> int:
        rerender = args.render_only or args.recheck_float64
        out = args.out or Path("runs/experiments-quick" if args.quick else "docs")
        results = out / "experiments" / "results.json"
        if rerender and not results.is_file():
            flag = "--render-only" if args.render_only else "--recheck-float64"
            raise UsageError(f"{flag}: no {results}; run without it first")
        # The data is read before any folder is made (a re-render needs none).
        data = None if args.render_only else load_dataset(args.data_dir)
        out = prepare_out_dir(out)
        with hold(out):  # one grid at a time writes its run store and report
            if rerender:
                return _rerender(args, out, data)
            command = "python scripts/experiments.py" + (" --quick" if args.quick else "")
            run_experiments(
                data,
                out,
                impls=tuple(args.impl or IMPLEMENTATIONS),
                command=command,
                fresh=args.fresh,
                progress=lambda s: print(s, flush=True),
                **(QUICK if args.quick else {}),
            )
        print(f"wrote {out / 'EXPERIMENTS.md'} and {out / 'experiments'}/")
        return 0

    return run_cli(parser, body)


def _rerender(args: argparse.Namespace, out: Path, data: Dataset | None) -> int:
    """--render-only: EXPERIMENTS.md again from the saved results; --recheck-float64: first
    train again in float64 the rows whose implementations disagree."""
    path = out / "experiments" / "results.json"
    saved, report = load_results(path)
    if args.recheck_float64:
        store = RunStore(path.parent / "runs.json", args.fresh)
        saved["float64"] = recheck_in_float64(data, saved, lambda s: print(s, flush=True), store)
        saved["trained"] = store.provenance()
        write_json(path, saved)
        report = report_text(saved)
    write_report(out, report)
    print(f"wrote {out / 'EXPERIMENTS.md'}")
    return 0
