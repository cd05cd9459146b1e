"""EXPERIMENTS.md from the experiments' saved results: one table and learning-curve plot per
question, the seed table, what the numbers support, and the implementations' agreement."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from pathlib import Path

from shared.backend import IMPLEMENTATIONS
from shared.config import DEEP_RECIPE, TrainConfig, setting_problem, shown
from shared.errors import DataError
from shared.grid import a_curve, a_share, a_time
from shared.io import read_json, write_text
from shared.lab_questions import (
    AGREEMENT,
    SHORT,
    budget_text,
    comparisons,
    targets,
)
from shared.plots import plt, save_figure

# One line style per implementation, in the order of IMPLEMENTATIONS.
LINE_STYLES = ("-", "--", ":", "-.")

# What a comparison's report and plot read of each stored run, and what each check asks.
CURVES = {
    "test_acc": a_share,
    "val_curve": a_curve,
    "epoch_seconds": a_time,
}
CHECKED = {
    a_share: "not an accuracy in [0, 1]",
    a_curve: "not a list of accuracies in [0, 1]",
    a_time: "not a time in seconds",
}


def plot_comparison(title: str, results: dict[str, dict[str, dict]], path: Path) -> None:
    """Validation accuracy per epoch: one colour per variant, one line style per
    implementation, so the three implementations of a variant lie on top of each other."""
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = dict(zip(IMPLEMENTATIONS, itertools.cycle(LINE_STYLES)))
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


def spread_of(by_impl: dict[str, float]) -> float:
    """max - min, rounded below the resolution of an accuracy on a few thousand images, so
    that 0.9907 - 0.9877 counts as the 0.003 it prints as."""
    return round(max(by_impl.values()) - min(by_impl.values()), 9)


def load_results(path: Path) -> tuple[dict, str]:
    """Saved results (experiments/results.json) and their report; a file that is damaged, or
    holds a figure no run could have made, is refused in one line before anything is written."""
    try:
        saved = read_json(path)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise DataError(f"{path}: damaged or not threefold's results ({e})") from None
    problem = results_problem(saved)
    if problem is not None:
        raise DataError(f"{path}: damaged or not threefold's results: {problem}")
    return saved, report_text(saved)


def results_problem(saved: object) -> str | None:
    """What keeps saved results from being reported, naming the field (`comparisons / t / row
    / jax / test_acc is 1.5, not ...`), or None: every figure the report reads checked as a
    finished run's summary is."""
    if not isinstance(saved, dict):
        return "not an object"
    for name in ("base", "command", "comparisons", "seeds"):
        if name not in saved:
            return f"lacks the field {name!r}"
    settings = {name: saved[name] for name in ("base", "short", "deep") if name in saved}
    problems = [
        *(_settings_problem(name, value) for name, value in settings.items()),
        None if isinstance(saved["command"], str) else "command is not a text",
        _comparisons_problem(saved["comparisons"]),
        _shares_problem("seeds", saved["seeds"], nested=False),
        _shares_problem("float64", saved.get("float64", {}), nested=True),
        _trained_problem(saved.get("trained", {})),
        _trained_problem(saved.get("tables_trained", {}), "tables_trained"),
        None if isinstance(saved.get("data", ""), str) else "data is not a digest",
    ]
    return next((p for p in problems if p is not None), None)


def _settings_problem(where: str, settings: object) -> str | None:
    """A configuration's settings (`base`) or a budget's (`short`, `deep`), each value
    checked as its flag is."""
    if not isinstance(settings, dict):
        return f"{where} is {shown(settings)}, not an object of settings"
    for name, value in settings.items():
        problem = setting_problem(name, value)
        if problem is not None:
            return f"{where} / {name} is {shown(value)}, {problem}"
    return None


def _comparisons_problem(comparisons: object) -> str | None:
    """Every row of every table: the same implementations, each with the figures a
    comparison reads (CURVES), valid; at least one table this version asks."""
    if not isinstance(comparisons, dict) or not comparisons:
        return f"comparisons is {shown(comparisons)}, not an object of tables"
    if not comparisons.keys() & _titles_asked():
        return "comparisons holds none of the questions this version asks"
    impls = None
    for title, table in comparisons.items():
        if not isinstance(table, dict) or not table:
            return f"comparisons / {title} is {shown(table)}, not an object of rows"
        for label, by_impl in table.items():
            where = f"comparisons / {title} / {label}"
            if not isinstance(by_impl, dict) or not by_impl:
                return f"{where} is {shown(by_impl)}, not figures by implementation"
            if not by_impl.keys() <= set(IMPLEMENTATIONS):
                unknown = sorted(by_impl.keys() - set(IMPLEMENTATIONS))[0]
                return f"{where} / {shown(unknown)} is not an implementation"
            impls = impls or set(by_impl)
            if set(by_impl) != impls:
                return f"{where} has other implementations than the first row ({sorted(impls)})"
            for impl, figures in by_impl.items():
                for field, check in CURVES.items():
                    value = figures.get(field) if isinstance(figures, dict) else None
                    if not check(value):
                        return f"{where} / {impl} / {field} is {shown(value)}, {CHECKED[check]}"
    return None


def _titles_asked() -> set[str]:
    """The titles of the comparisons this version asks (whatever their budgets)."""
    return {c.title for c in comparisons(0, (), 0, SHORT, DEEP_RECIPE)}


def _shares_problem(where: str, table: object, nested: bool) -> str | None:
    """`seeds` ({"arch|impl": [accuracy, ...]}) or `float64` ({row: {impl: accuracy}})."""
    if not isinstance(table, dict):
        return f"{where} is {shown(table)}, not an object"
    for row, accs in table.items():
        if nested:
            held = isinstance(accs, dict) and accs.keys() <= set(IMPLEMENTATIONS)
            called = "accuracies by implementation"
        else:
            held = isinstance(accs, list) and row.count("|") == 1
            called = "a list of accuracies"
        if not held or not accs:
            return f"{where} / {row} is {shown(accs)}, not {called}"
        bad = [a for a in (accs.values() if nested else accs) if not a_share(a)]
        if bad:
            return f"{where} / {row} holds {shown(bad[0])}, {CHECKED[a_share]}"
    return None


def _trained_problem(trained: object, name: str = "trained") -> str | None:
    """`trained` (saved as `name`): runs by date and commit, each a count."""
    if not isinstance(trained, dict):
        return f"{name} is {shown(trained)}, not an object"
    for when, count in trained.items():
        if type(count) is not int or count < 1:
            return f"{name} / {when} is {shown(count)}, not a count of runs"
    return None


def figure_name(title: str) -> str:
    """The file of a comparison's figure, in the experiments' folder."""
    return f"{title.lower().replace(' ', '-')}.png"


def report_text(saved: dict) -> str:
    """EXPERIMENTS.md from the saved results (out/experiments/results.json)."""
    base = TrainConfig(**saved["base"])
    tables = []
    budgets = saved.get("short", SHORT), saved.get("deep", DEEP_RECIPE)
    for comp in comparisons(base.epochs, (), 0, *budgets):
        if comp.title in saved["comparisons"]:  # results saved before a comparison existed
            figure = f"experiments/{figure_name(comp.title)}"
            tables.append((comp, saved["comparisons"][comp.title], figure))
    seeds_table = {tuple(k.split("|")): v for k, v in saved["seeds"].items()}
    impls = tuple(next(iter(tables[0][1].values())))
    float64 = saved.get("float64", {})
    report = render(
        tables, seeds_table, base, saved["command"], impls, float64, targets(budgets[1])
    )
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
    write_text(out / "EXPERIMENTS.md", report)


def seed_spread(seeds_table, row: str) -> float:
    """The largest seed-to-seed spread (max - min) of seed row `row` in any implementation;
    0 if only one seed was run."""
    return max(
        (max(a) - min(a) for (r, _), a in seeds_table.items() if r == row and len(a) > 1),
        default=0.0,
    )


def conclusions(tables, seeds_table, impls, goals: dict[str, float]) -> list[str]:
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
    for arch, target in goals.items():
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


def render(
    tables, seeds_table, base: TrainConfig, command: str, impls, float64: dict, goals: dict
) -> str:
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
        "Epoch time is the median over the run's epochs (training plus validation), on the",
        "processor and cores each run records in experiments/runs.json.",
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
    lines += ["", *conclusions(tables, seeds_table, impls, goals)]
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
            spread = spread_of({i: by_impl[i]["test_acc"] for i in impls})
            flag = f" (above the {_pct(AGREEMENT)} allowed)" if spread > AGREEMENT else ""
            row = f"{comp.title} / {label}"
            if row in float64:
                accs = ", ".join(f"{i} {_pct(a)}" for i, a in float64[row].items())
                flag += f"; trained again in float64: {_pct(spread_of(float64[row]))} ({accs})"
            lines.append(f"- {row}: {_pct(spread)} points{flag}")
    if float64:
        lines += [
            "",
            f"Rows above {_pct(AGREEMENT)} points were trained again in float64 (same seed, "
            "same batches): where the implementations then agree, the float32 gap was rounding "
            "drift amplified by training, not a difference in what they compute.",
        ]
    return "\n".join(lines) + "\n"
