"""The cross-check's results for a reader: the table, one line a comparison, and the
picture of every compared tensor's worst difference against its tolerance."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from shared.config import PAIRS
from shared.proof.rows import CheckResult


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
            verdict = "pass" if r.passed else "FAIL"
            if r.first_step is not None:
                verdict += f" (from step {r.first_step})"
            lines.append(
                f"{r.check:<36} {r.pair:<14} {r.dtypes:<9} {r.max_abs:10.2e} {r.max_rel:10.2e} "
                f"{r.tolerance:8.0e}  {verdict}"
            )
    return "\n".join(lines)


DTYPE_COLORS = {"float64": "tab:blue", "float32": "tab:orange"}
ZERO = 1e-18  # where a difference of exactly 0 is drawn on the log scale
CLIPPED = 1e3  # where a non-finite or huge difference is drawn (as an x)


def worst_by_row(results: list[CheckResult], arch: str) -> dict[tuple[str, str, str], tuple]:
    """(check, pair, dtype) -> (worst relative difference over the settings, its tolerance),
    for the implementation pairs of one network's rows, in the order they were checked."""
    worst: dict[tuple[str, str, str], tuple] = {}
    for r in results:
        if r.arch == arch and r.pair in PAIRS:
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
        len(PAIRS),
        figsize=(13, 1.2 + 0.17 * height),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": [len({k[0] for k in tables[a]}) for a in archs]},
    )
    for row, arch in enumerate(archs):
        checks = list(dict.fromkeys(k[0] for k in tables[arch]))
        ys = np.arange(len(checks))
        for col, pair in enumerate(PAIRS):
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
