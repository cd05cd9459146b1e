"""The lab's claims rerun as controlled comparisons: same seed and budget per row, every
implementation, results written to docs/EXPERIMENTS.md with learning curves."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.backend import IMPLEMENTATIONS
from shared.cli import add_impl_flag, run_cli
from shared.config import TrainConfig
from shared.data import Dataset, load_dataset
from shared.errors import DataError, UsageError
from shared.io import atomic_write, write_json
from shared.outputs import prepare_out_dir
from shared.plots import plt, save_figure
from shared.spec import get_arch
from shared.train import train

# The lab's own setup, as far as the report shows: `randn * 0.01` weights, plain SGD on plain
# cross-entropy, whole batches of 10,000 images (its printed shapes), 15 epochs. Its learning
# rate is not shown; 0.1 is our assumption. Pixels scaled as ours (the report does not say).
LAB_SETUP = dict(
    init="lab",
    batch_size=10_000,
    lr=0.1,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    label_smoothing=0.0,
    schedule="constant",
    warmup=0,
    flip=False,
    tta=False,
    shift=0,
)


# The preset past 93% (issue 13), whose layers the BatchNorm, dropout and activation rows vary.
STRONG = "strong"
# Those rows train the larger network on a shorter budget, so that all three implementations
# can run them in under an hour; their seed spread is measured at the same budget.
SHORT = {"epochs": 5, "limit": 10_000}

# --quick: a reduced run for tests, the same code path on 1,000 images.
QUICK = dict(
    base=TrainConfig(epochs=2, limit=1000),
    budgets=(1, 2),
    seeds=(0,),
    lab_batch=500,
    short={"epochs": 1, "limit": 500},
)


@dataclass(frozen=True)
class Variant:
    label: str
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """One of the lab's questions: variants of the defaults, each trained alike."""

    title: str
    question: str
    variants: tuple[Variant, ...]
    budget: dict[str, Any] = field(default_factory=dict)  # changes every variant shares
    noise: str = "lab"  # the seed row whose spread judges a difference


def comparisons(
    epochs: int, budgets: tuple[int, ...], lab_batch: int, short: dict[str, Any]
) -> list[Experiment]:
    """The lab's arguments, each as variants that differ from the defaults in one respect."""
    strong = get_arch(STRONG).spec
    on_short = dict(budget=short, noise=seed_row_label(STRONG, short))
    return [
        Experiment(
            "Initialisation",
            "Does He initialisation beat the lab's `randn * 0.01`?",
            (Variant("randn * 0.01", {"init": "lab"}), Variant("He (default)")),
        ),
        Experiment(
            "Convolution",
            "Does the conv layer help?",
            (Variant("without conv (`noconv`)", {"arch": "noconv"}), Variant("with conv (`lab`)")),
        ),
        Experiment(
            "Max-pooling",
            "Does 2x2 max-pooling after the conv help?",
            (
                Variant("without pooling (`lab`)"),
                Variant("with pooling (`pool`)", {"arch": "pool"}),
            ),
        ),
        Experiment(
            "Training setup",
            "The lab's training setup against the new defaults.",
            (
                Variant("the lab's setup", {**LAB_SETUP, "batch_size": lab_batch}),
                Variant("new defaults"),
            ),
        ),
        Experiment(
            "Epochs",
            "More epochs (each run with its schedule completed).",
            (
                *(
                    Variant(f"{e} epoch{'s' * (e != 1)}", {"epochs": e})
                    for e in budgets
                    if e != epochs
                ),
                Variant(f"{epochs} epochs (default)"),
            ),
        ),
        Experiment(
            "A stronger network",
            "How far past the lab's network do two conv blocks with BatchNorm, pooling and "
            "dropout get?",
            (Variant("`lab`"), Variant(f"`{STRONG}`", {"arch": STRONG})),
        ),
        Experiment(
            "BatchNorm",
            f"Does BatchNorm help the `{STRONG}` network?",
            (
                Variant("without BatchNorm", {"arch": _without(strong, "bn")}),
                Variant(f"with BatchNorm (`{STRONG}`)", {"arch": STRONG}),
            ),
            **on_short,
        ),
        Experiment(
            "Dropout",
            f"Does dropout help the `{STRONG}` network?",
            (
                Variant("without dropout", {"arch": _without(strong, "dropout")}),
                Variant(f"with dropout (`{STRONG}`)", {"arch": STRONG}),
            ),
            **on_short,
        ),
        Experiment(
            "Activation",
            f"ReLU, tanh or sigmoid after each layer of the `{STRONG}` network?",
            (
                *(Variant(fn, {"arch": strong.replace("relu", fn)}) for fn in ("sigmoid", "tanh")),
                Variant(f"relu (`{STRONG}`)", {"arch": STRONG}),
            ),
            **on_short,
        ),
    ]


def _without(spec: str, kind: str) -> str:
    """`spec` with every token of `kind` (`bn`, `dropout`) left out."""
    return "-".join(t for t in spec.split("-") if not t.startswith(kind))


def seed_row_label(arch: str, budget: dict[str, Any]) -> str:
    """The seed table's name for `arch` trained on `budget` (the defaults if empty)."""
    return arch + "".join(f", {k} {v:,}" for k, v in budget.items())


def budget_text(budget: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in budget.items())


class RunStore:
    """Finished runs' summaries, keyed by their whole configuration, in a JSON file beside the
    results: an interrupted experiments run resumes where it stopped, a rerun trains only
    what is new, and each run says when and from which commit it was trained."""

    def __init__(self, path: Path | None, fresh: bool = False):
        self.path = path
        self.runs: dict[str, dict] = {}
        if path is not None and not fresh and path.is_file():
            try:
                runs = json.loads(path.read_text())["runs"]
                if not all(isinstance(r["summary"]["test_acc"], float) for r in runs.values()):
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


def plot_comparison(title: str, results: dict[str, dict[str, dict]], path: Path) -> None:
    """Validation accuracy per epoch: one colour per variant, one line style per
    implementation, so the three implementations of a variant lie on top of each other."""
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"numpy": "-", "jax": "--", "torch": ":"}
    for k, (label, by_impl) in enumerate(results.items()):
        for impl, s in by_impl.items():
            epochs = range(1, len(s["val_curve"]) + 1)
            ax.plot(
                epochs,
                [100 * a for a in s["val_curve"]],
                styles[impl],
                color=f"C{k}",
                label=f"{label} | {impl}",
                lw=1.6,
            )
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


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


def _spread(by_impl: dict[str, float]) -> float:
    """max - min, rounded below the resolution of an accuracy on a few thousand images, so
    that 0.9907 - 0.9877 counts as the 0.003 it prints as."""
    return round(max(by_impl.values()) - min(by_impl.values()), 9)


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
            if _spread({i: s["test_acc"] for i, s in by_impl.items()}) <= AGREEMENT:
                continue
            changes = saved["variants"][title][label]
            accs = {}
            for impl in by_impl:
                progress(f"Agreement in float64: {title} / {label} | {impl}")
                accs[impl] = run_variant(base, changes, impl, data, store)["test_acc"]
            rechecked[f"{title} / {label}"] = accs
    return rechecked


def load_results(path: Path) -> tuple[dict, str]:
    """Saved results (experiments/results.json) and their report; a damaged file is refused in
    one line before anything is written."""
    try:
        saved = json.loads(path.read_text())
        return saved, report_text(saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
        raise DataError(
            f"{path}: damaged or not threefold's results ({type(e).__name__}: {e})"
        ) from None


def report_text(saved: dict) -> str:
    """EXPERIMENTS.md from the saved results (out/experiments/results.json)."""
    base = TrainConfig(**saved["base"])
    tables = []
    for comp in comparisons(base.epochs, (), 0, saved.get("short", SHORT)):
        if comp.title in saved["comparisons"]:  # results saved before a comparison existed
            slug = comp.title.lower().replace(" ", "-")
            tables.append((comp, saved["comparisons"][comp.title], f"experiments/{slug}.png"))
    seeds_table = {tuple(k.split("|")): v for k, v in saved["seeds"].items()}
    impls = tuple(next(iter(tables[0][1].values())))
    report = render(tables, seeds_table, base, saved["command"], impls, saved.get("float64", {}))
    return report + trained_text(saved.get("trained", {}))


def trained_text(trained: dict[str, int]) -> str:
    """Which runs came from which commit: the run store keeps finished runs across
    invocations, so one report may gather runs trained on different days."""
    if not trained:
        return ""
    lines = ["", "## Provenance", "", "Runs behind these tables, by date and commit:", ""]
    lines += [f"- {when}: {n} runs" for when, n in sorted(trained.items())]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: str) -> None:
    atomic_write(out / "EXPERIMENTS.md", lambda f: f.write(report.encode()))


TARGETS = {"lab": 0.910, "pool": 0.915, STRONG: 0.930}
AGREEMENT = 0.003  # most the implementations' final test accuracies may differ by


def seed_spread(seeds_table, row: str) -> float:
    """The largest seed-to-seed spread (max - min) of seed row `row` in any implementation;
    0 if only one seed was run."""
    return max(
        (max(a) - min(a) for (r, _), a in seeds_table.items() if r == row and len(a) > 1),
        default=0.0,
    )


def conclusions(tables, seeds_table, impls) -> list[str]:
    """What the numbers support: a difference counts only where it exceeds the seed-to-seed
    spread of the same network at the same budget (the experiment's noise row)."""
    lines = [
        "## What the numbers support",
        "",
        "A difference between rows counts only where it exceeds the largest seed-to-seed spread "
        "of the network the comparison varies, at the comparison's budget (the seed table "
        "above); every figure below is the mean over the implementations.",
        "",
    ]
    for comp, results, _ in tables:
        noise = seed_spread(seeds_table, comp.noise)
        means = {
            label: statistics.mean(r[i]["test_acc"] for i in impls) for label, r in results.items()
        }
        (ref_label, ref), others = list(means.items())[-1], list(means.items())[:-1]
        for label, acc in others:
            diff = ref - acc
            if noise == 0:
                verdict = "not judged: one seed, so the spread is unknown"
            elif abs(diff) > noise:
                verdict = f"a real difference (seed spread {_pct(noise)})"
            else:
                verdict = f"within the seed spread ({_pct(noise)}): no difference shown"
            lines.append(
                f"- {comp.title}: {ref_label} {_pct(ref)}% against {label} "
                f"{_pct(acc)}% ({diff * 100:+.2f} points), {verdict}."
            )
    for arch, target in TARGETS.items():
        # The target holds for each implementation: its mean over its seeds.
        means = {i: statistics.mean(a) for (ar, i), a in seeds_table.items() if ar == arch}
        if means:
            met = "met" if min(means.values()) >= target else "not met"
            each = ", ".join(f"{i} {_pct(m)}%" for i, m in means.items())
            lines.append(
                f"- Target for `{arch}`: {_pct(target)}% for each implementation; mean test "
                f"accuracy over its seeds: {each}: {met}."
            )
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def render(tables, seeds_table, base: TrainConfig, command: str, impls, float64: dict) -> str:
    """The markdown report: one table and plot per comparison, then seeds and agreement."""
    lines = [
        "# Experiments",
        "",
        f"Made by `{command}`. Every row trains from the same seed with the same budget;",
        "only what the row names differs from the defaults: "
        + ", ".join(
            f"`{k}={v}`"
            for k, v in dataclasses.asdict(base).items()
            if k not in ("impl", "limit", "dtype")
        )
        + ".",
        "Test accuracy is on the official 10,000 test images, which choose nothing; the defaults",
        "were chosen on the validation split (the last 10,000 training images).",
        "Epoch time is the median over the run's epochs (training plus validation) on the",
        "2-core machine, all implementations sharing it in turn.",
        "",
    ]
    for comp, results, figure in tables:
        lines += [
            f"## {comp.title}",
            "",
            comp.question
            + (f" Budget for every row: {budget_text(comp.budget)}." if comp.budget else ""),
            "",
            "| variant | " + " | ".join(f"{i} test acc % | {i} s/epoch" for i in impls) + " |",
            "| --- | " + " | ".join("---: | ---:" for _ in impls) + " |",
        ]
        for label, by_impl in results.items():
            cells = " | ".join(
                f"{_pct(by_impl[i]['test_acc'])} | {by_impl[i]['epoch_seconds']:.2f}" for i in impls
            )
            lines.append(f"| {label} | {cells} |")
        lines += ["", f"![{comp.title}]({figure})", ""]
    lines += [
        "## Accuracy over seeds",
        "",
        "| arch | impl | seeds | test acc % (each) | mean | spread (max - min) |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for (arch, impl), accs in seeds_table.items():
        lines.append(
            f"| {arch} | {impl} | {len(accs)} | {', '.join(_pct(a) for a in accs)} | "
            f"{_pct(statistics.mean(accs))} | {_pct(max(accs) - min(accs))} |"
        )
    lines += ["", *conclusions(tables, seeds_table, impls)]
    lines += [
        "",
        "## Agreement in training",
        "",
        "Same seed, same initial weights, same batches and augmentation; float32. The",
        "final test accuracies of the implementations differ by (max - min):",
        "",
    ]
    for comp, results, _ in tables:
        for label, by_impl in results.items():
            spread = _spread({i: by_impl[i]["test_acc"] for i in impls})
            flag = f" (above the {_pct(AGREEMENT)} allowed)" if spread > AGREEMENT else ""
            row = f"{comp.title} / {label}"
            if row in float64:
                accs = ", ".join(f"{i} {_pct(a)}" for i, a in float64[row].items())
                flag += f"; trained again in float64: {_pct(_spread(float64[row]))} ({accs})"
            lines.append(f"- {row}: {_pct(spread)} points{flag}")
    if float64:
        lines += [
            "",
            f"Rows above {_pct(AGREEMENT)} points were trained again in float64 (same seed, "
            "same batches): where the implementations then agree, the float32 gap was rounding "
            "drift amplified by training, not a difference in what they compute.",
        ]
    return "\n".join(lines) + "\n"


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
        out = prepare_out_dir(args.out or Path("runs/experiments-quick" if args.quick else "docs"))
        if args.render_only or args.recheck_float64:
            path = out / "experiments" / "results.json"
            flag = "--render-only" if args.render_only else "--recheck-float64"
            if not path.is_file():
                raise UsageError(f"{flag}: no {path}; run without it first")
            saved, report = load_results(path)
            if args.recheck_float64:
                data = load_dataset(args.data_dir)
                store = RunStore(path.parent / "runs.json", args.fresh)
                saved["float64"] = recheck_in_float64(
                    data, saved, lambda s: print(s, flush=True), store
                )
                saved["trained"] = store.provenance()
                write_json(path, saved)
                report = report_text(saved)
            write_report(out, report)
            print(f"wrote {out / 'EXPERIMENTS.md'}")
            return 0
        command = "python scripts/experiments.py" + (" --quick" if args.quick else "")
        run_experiments(
            load_dataset(args.data_dir),
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
