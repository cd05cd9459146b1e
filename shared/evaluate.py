"""Evaluation of a checkpoint on the test set, by any implementation, with figures, and the
evaluate.py command."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from shared import metrics
from shared.backend import IMPLEMENTATIONS, batched_logits, make_backend
from shared.checkpoint import Checkpoint, load_checkpoint
from shared.cli import add_data_dir_flag, run_cli
from shared.config import averages_mirrors
from shared.data import Dataset, load_test_set
from shared.errors import CheckpointError, UsageError, act_on_signals, say, signals_held
from shared.io import staged, write_json
from shared.layers import NUM_CLASSES
from shared.loop import data_identity
from shared.outputs import (
    CHECKPOINT_NAME,
    EVALUATION_FILES,
    check_out_files,
    hold,
    prepare_out_dir,
)
from shared.plots import plt, save_figure
from shared.spec import float_dtype, get_arch
from shared.typed import parse_once, path_type


def evaluate_checkpoint(
    ckpt: Checkpoint, impl: str, data: Dataset, tta: bool = False, source: str = "checkpoint"
) -> dict[str, Any]:
    """Test loss, accuracy, confusion matrix and per-class accuracy of a checkpoint, computed
    by `impl` whatever implementation wrote it (with `tta`, averaged over each image and its
    mirror image); also the logits (N, 10)."""
    # In the dtype it was trained in: a float64 run's own test loss, not float32's.
    dtype = float_dtype(ckpt.params)
    backend = make_backend(impl, get_arch(ckpt.meta["arch"], files=False), dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, in one line
        logits = batched_logits(backend, backend.init_state(ckpt.params), data.test.x, tta)
    if not np.isfinite(logits).all():
        raise CheckpointError(
            f"{source}: its weights give non-finite logits on the test images (beyond "
            f"{dtype.name}'s range); there is no loss or accuracy to report"
        )
    cm = metrics.confusion_matrix(logits.argmax(axis=1), data.test.y, NUM_CLASSES)
    per_class = metrics.per_class_accuracy(cm)
    return {
        "written_by": ckpt.meta.get("impl"),
        "evaluated_by": impl,
        "arch": ckpt.meta["arch"],
        # Which test set: a folder of ten images would otherwise report as the official one.
        "test_data": {**data_identity(data), "images": len(data.test)},
        "tta": tta,
        "dtype": dtype.name,
        "loss": metrics.cross_entropy(logits, data.test.y),
        "acc": metrics.accuracy(logits, data.test.y),
        "confusion_matrix": cm.tolist(),
        "per_class_acc": dict(zip(data.spec.class_names, per_class, strict=True)),
        "logits": logits,
    }


def plot_confusion(cm: np.ndarray, class_names: tuple[str, ...], title: str, path: Path) -> None:
    """Counts of true (rows) against predicted (columns) classes, with the class names."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(NUM_CLASSES), class_names, rotation=45, ha="right")
    ax.set_yticks(range(NUM_CLASSES), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = cm.max() / 2
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > threshold else "black",
            )
    save_figure(fig, path)


def plot_misclassified(data: Dataset, predicted: np.ndarray, path: Path, count: int = 36) -> None:
    """A grid of the first `count` misclassified test images, titled true -> predicted."""
    test, spec = data.test, data.spec
    mean, std = spec.standardisation(data.pixels)
    wrong = np.flatnonzero(predicted != test.y)[:count]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(test.x[i, 0] * std + mean, cmap="gray_r", vmin=0, vmax=1)
        names = spec.class_names
        ax.set_title(f"{names[test.y[i]]}\n-> {names[predicted[i]]}", fontsize=7)
    fig.suptitle(f"misclassified test images ({len(wrong)} shown): true -> predicted")
    save_figure(fig, path)


def write_report(path: Path, result: dict[str, Any], data: Dataset, out: Path) -> None:
    """Print the test and per-class accuracy of `result` (from `evaluate_checkpoint`, logits
    included) and write confusion.png, misclassified.png and evaluation.json into `out`."""
    result = {"checkpoint": str(path), **result}
    logits = result.pop("logits")
    impl = result["evaluated_by"]
    say(
        f"{path} (arch {result['arch']}, written by {result['written_by']}, evaluated by "
        f"{impl}{', mirror images averaged in' if result['tta'] else ''})"
    )
    test = result["test_data"]
    say(f"on {test['images']:,} test images of {test['dataset']} in {test['folder']}")
    print(f"test accuracy {100 * result['acc']:.2f}%, loss {result['loss']:.4f}")
    for name, acc in result["per_class_acc"].items():
        print(f"  {name:<12} " + ("no images" if acc is None else f"{100 * acc:6.2f}%"))
    title = f"{result['arch']} | test accuracy {100 * result['acc']:.2f}% | {impl}"
    cm = np.array(result["confusion_matrix"])
    paths = [out / name for name in EVALUATION_FILES]
    # One set: each replaces its older version only once all three are written (a full disk
    # at the second left a new confusion matrix beside an older report).
    with contextlib.ExitStack() as stack:
        confusion, misclassified, evaluation = (stack.enter_context(staged(p)) for p in paths)
        plot_confusion(cm, data.spec.class_names, title, confusion)
        plot_misclassified(data, logits.argmax(axis=1), misclassified)
        write_json(evaluation, result)
    say(f"wrote {', '.join(map(str, paths))}")


def main(argv: list[str] | None = None) -> int:
    """scripts/evaluate.py: evaluate a checkpoint on the test set and write the report."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Test accuracy, per-class accuracy, a confusion matrix and the misclassified "
        "images of a checkpoint written by any implementation, computed by any of them.",
    )
    parser.add_argument("checkpoint", type=path_type)
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average the logits of each image and its mirror image "
        "(default: as the checkpoint's run did)",
    )
    parser.add_argument(
        "--impl",
        choices=IMPLEMENTATIONS,
        default="numpy",
        help="implementation that computes the predictions (default: numpy)",
    )
    parser.add_argument(
        "--out",
        type=path_type,
        default=None,
        help="folder for confusion.png, misclassified.png and evaluation.json "
        "(default: the checkpoint's folder)",
    )
    add_data_dir_flag(parser, test=True)
    args = parse_once(parser, argv)

    def body() -> int:
        out, flag = _out_and_flag(args)
        outputs = [(flag, out / name) for name in EVALUATION_FILES]
        with contextlib.ExitStack() as held:
            # Not a folder a training holds, from before the checkpoint is read to the last
            # write: its checkpoint is about to change. A folder not yet made holds none, and
            # everything is read and evaluated before it is made. Not over the checkpoint, nor
            # another run's files (its own run's evaluation is where its report goes).
            if out.exists() and not out.is_dir():  # found only once it had evaluated
                raise UsageError(f"{flag} {out}: is a file, not a folder")

            def take() -> None:  # held, then checked: no run can begin there in between
                held.enter_context(hold(prepare_out_dir(out, flag), flag))
                reads = [("checkpoint", args.checkpoint)]
                # Another checkpoint put in a run's folder replaced that run's report.
                own = args.checkpoint.name == CHECKPOINT_NAME
                own_run = args.checkpoint.parent if own else None
                check_out_files(outputs, reads, own_run=own_run, own_results="evaluation")

            taken = out.is_dir()
            if taken:
                take()
            ckpt = load_checkpoint(args.checkpoint)  # evaluated in its own dtype
            dataset = ckpt.meta.get("dataset", "fashion-mnist")
            data = load_test_set(args.data_dir, dataset, ckpt.pixels)  # as it was trained
            # Runs from before test-time augmentation existed evaluated without it.
            run = ckpt.meta.get("config", {})
            tta = averages_mirrors(
                run.get("flip", False), run.get("tta") if args.tta is None else args.tta
            )
            result = evaluate_checkpoint(ckpt, args.impl, data, tta, str(args.checkpoint))
            if not taken:  # made now, or by another command meanwhile
                take()
            act_on_signals()  # a stop a library's callback dropped: nothing written
            with signals_held():  # the report's three files are one set
                write_report(args.checkpoint, result, data, out)
        return 0

    return run_cli(parser, body)


def _out_and_flag(args) -> tuple[Path, str]:
    """Where the report goes, and how an error names it: --out, or the checkpoint's folder
    (the default, which the user did not type)."""
    if args.out is not None:
        return args.out, "--out"
    return args.checkpoint.parent, "the checkpoint's folder (--out's default)"
