"""Command-line front ends; scripts/ only call these."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.backend import IMPLEMENTATIONS
from shared.checkpoint import Checkpoint, load_checkpoint
from shared.crosscheck import checkpoint_agreement, format_table, run_crosscheck
from shared.data import DATASETS, get_dataset_spec, load_dataset
from shared.errors import CheckpointError, ThreefoldError, UsageError
from shared.io import write_json
from shared.spec import ARCHS, INITS, get_arch
from shared.train import (
    CHECKPOINT_NAME,
    DTYPES,
    SCHEDULES,
    Interrupted,
    TrainConfig,
    averages_mirrors,
    train,
)


def _number(kind: type, minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a number of `kind` at least (or above) `minimum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum or (value == minimum and not inclusive):
            bound = f">= {minimum}" if inclusive else f"> {minimum}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {bound})")
        return value

    return parse


positive_int = _number(int, 0, inclusive=False)
positive_float = _number(float, 0.0, inclusive=False)
non_negative_float = _number(float, 0.0, inclusive=True)
non_negative_int = _number(int, 0, inclusive=True)


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range (must be in [0, 1))")
    return value


def add_training_flags(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The flags that make a TrainConfig; shared by every script that trains."""
    d = defaults
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default=d.impl)
    parser.add_argument(
        "--arch",
        choices=list(ARCHS),
        default=d.arch,
        help="; ".join(f"{a.name}: {a.description}" for a in ARCHS.values()),
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        default=d.init,
        help="weight initialisation: he (Kaiming normal), lab (randn*0.01), "
        "torch (PyTorch's default uniform)",
    )
    parser.add_argument("--epochs", type=positive_int, default=d.epochs)
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    parser.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    parser.add_argument("--momentum", type=_fraction, default=d.momentum)
    parser.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=d.nesterov,
        help="Nesterov momentum (PyTorch's formulation)",
    )
    parser.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay)
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="learning-rate schedule over the steps after the warm-up",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=d.warmup,
        help="epochs of linear learning-rate warm-up (0: off; at most --epochs minus 1)",
    )
    parser.add_argument("--label-smoothing", type=_fraction, default=d.label_smoothing)
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=d.flip,
        help="augment: flip training images horizontally with probability 1/2",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=d.tta,
        help="evaluate on each image and its mirror image, averaging the logits "
        "(default: when training with --flip)",
    )
    parser.add_argument(
        "--shift",
        type=non_negative_int,
        default=d.shift,
        help="augment: translate training images by up to N pixels (0: off)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=d.seed,
        help="seeds the initial weights and the batch order",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="train on the first N training images only"
    )
    parser.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    parser.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=d.dataset,
        help="mnist reads the original digits from --data-dir",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four IDX files (default: $THREEFOLD_DATA, "
        "then /usr/share/datasets/fashion-mnist)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def prepare_out_dir(path: Path) -> Path:
    """Create the output folder, or say in one line why it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: folder is not writable")
    return path


def run_cli(parser: argparse.ArgumentParser, body: Callable[[], int]) -> int:
    """Run `body`, turning the project's errors into one line and an exit status, never a
    traceback: 2 for usage errors, 1 for bad data or a failed run, 130 for Ctrl-C."""
    try:
        return body()
    except UsageError as e:
        parser.error(str(e))
    except Interrupted as e:
        print(f"\n{parser.prog}: {e}", file=sys.stderr)
        return 130
    except ThreefoldError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _resumed_config(
    args: argparse.Namespace, defaults: TrainConfig
) -> tuple[TrainConfig, Checkpoint]:
    """The configuration and last checkpoint of the run in --resume DIR; training flags given
    beside it would change the run, so they are refused."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in TrainConfig.__dataclass_fields__
        if getattr(args, name) != getattr(defaults, name)
    ]
    if given:
        raise UsageError(f"--resume continues a run with its own configuration; drop {given[0]}")
    path = args.resume / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"--resume {args.resume}: no {CHECKPOINT_NAME} there to continue from")
    ckpt = load_checkpoint(path)
    if "history" not in ckpt.meta or ckpt.velocity is None:
        raise CheckpointError(f"{path}: written without its run history; cannot resume")
    saved = ckpt.meta["config"]
    # A run from another version of threefold would continue with other semantics.
    if set(saved) != set(TrainConfig.__dataclass_fields__):
        differ = sorted(set(saved) ^ set(TrainConfig.__dataclass_fields__))
        raise CheckpointError(
            f"{path}: written by another version of threefold (settings differ: "
            f"{', '.join(differ)}); cannot resume it exactly, start a new run"
        )
    return TrainConfig(**saved), ckpt


def train_main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the CNN on Fashion-MNIST with one of the three implementations.",
    )
    add_training_flags(parser, defaults)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for metrics.json, checkpoint.npz and curves.png (default: runs/IMPL-ARCH)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last completed epoch",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch the four official files first, verify their checksums and "
        "put them in --data-dir (default: ~/.local/share/threefold/DATASET)",
    )
    parser.add_argument(
        "--download-url",
        default=None,
        help="base address to download from (default: $THREEFOLD_DOWNLOAD_URL, "
        "then the authors' official source)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        ckpt = None
        if args.resume is not None:
            config, ckpt = _resumed_config(args, defaults)
            out = prepare_out_dir(args.out or args.resume)
        else:
            config = config_from_args(args)
            out = prepare_out_dir(args.out or Path("runs") / f"{config.impl}-{config.arch}")
        data_dir = args.data_dir
        if args.download:
            from shared.download import download_dataset

            spec = get_dataset_spec(config.dataset)
            data_dir = download_dataset(spec, data_dir, args.download_url)
            print(f"downloaded and verified {spec.name} in {data_dir}")
        data = load_dataset(data_dir, config.dataset)
        print(
            f"{config.impl} | {config.arch} | {len(data.train)} train, {len(data.val)} "
            f"validation, {len(data.test)} test images from {data.source}"
        )
        if ckpt is not None:
            print(f"resuming after epoch {ckpt.meta['epoch']} of {config.epochs}")
        record = train(config, data, out, resume=ckpt)
        test = record["test"]
        print(
            f"{config.impl} | Test Loss: {test['loss']:7.4f} | Test Acc: {100 * test['acc']:7.4f}"
        )
        print(f"wrote {out / CHECKPOINT_NAME}, {out / 'metrics.json'}, {out / 'curves.png'}")
        return 0

    return run_cli(parser, body)


def crosscheck_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crosscheck.py",
        description="Show, tensor by tensor, that the NumPy, JAX and PyTorch networks agree.",
    )
    parser.add_argument(
        "--arch",
        action="append",
        choices=list(ARCHS),
        help="architecture to check (repeatable; default: lab and pool)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="precision to check (repeatable; default: float64 and float32)",
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="SGD steps run in lockstep")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="also load this checkpoint into all three and compare test predictions",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        data = load_dataset(args.data_dir)
        archs = [get_arch(a) for a in (args.arch or ["lab", "pool"])]
        results = run_crosscheck(
            archs,
            args.dtype or ["float64", "float32"],
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        if args.checkpoint is not None:
            ckpt = load_checkpoint(args.checkpoint)
            arch = get_arch(ckpt.meta["arch"])
            results += checkpoint_agreement(ckpt.params, arch, data.test.x)
        print(format_table(results))
        failed = [r for r in results if not r.passed]
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
        if args.json is not None:
            write_json(args.json, [r.as_dict() for r in results])
        return 1 if failed else 0

    return run_cli(parser, body)


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Test accuracy, per-class accuracy, a confusion matrix and the misclassified "
        "images of a checkpoint written by any implementation, computed by any of them.",
    )
    parser.add_argument("checkpoint", type=Path)
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
        help="implementation that computes the predictions",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for confusion.png, misclassified.png and evaluation.json "
        "(default: the checkpoint's folder)",
    )
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        from shared.evaluate import evaluate_checkpoint, plot_confusion, plot_misclassified

        out = prepare_out_dir(args.out or args.checkpoint.parent)
        ckpt = load_checkpoint(args.checkpoint)
        data = load_dataset(args.data_dir, ckpt.meta.get("dataset", "fashion-mnist"))
        # Runs from before test-time augmentation existed evaluated without it.
        run = ckpt.meta.get("config", {})
        tta = averages_mirrors(
            run.get("flip", False), run.get("tta") if args.tta is None else args.tta
        )
        result = {
            "checkpoint": str(args.checkpoint),
            **evaluate_checkpoint(ckpt, args.impl, data, tta),
        }
        logits = result.pop("logits")
        print(
            f"{args.checkpoint} (arch {result['arch']}, written by {result['written_by']}, "
            f"evaluated by {args.impl}{', mirror images averaged in' if tta else ''})"
        )
        print(f"test accuracy {100 * result['acc']:.2f}%, loss {result['loss']:.4f}")
        for name, acc in result["per_class_acc"].items():
            print(f"  {name:<12} {100 * acc:6.2f}%")
        title = f"{result['arch']} | test accuracy {100 * result['acc']:.2f}% | {args.impl}"
        cm = np.array(result["confusion_matrix"])
        plot_confusion(cm, data.spec.class_names, title, out / "confusion.png")
        plot_misclassified(data, logits.argmax(axis=1), out / "misclassified.png")
        write_json(out / "evaluation.json", result)
        print(
            f"wrote {out / 'confusion.png'}, {out / 'misclassified.png'}, {out / 'evaluation.json'}"
        )
        return 0

    return run_cli(parser, body)


def experiments_main(argv: list[str] | None = None) -> int:
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
    parser.add_argument(
        "--impl",
        action="append",
        choices=IMPLEMENTATIONS,
        help="implementation to run (repeatable; default: all three)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for EXPERIMENTS.md and experiments/ (default: docs, or "
        "runs/experiments-quick with --quick)",
    )
    parser.add_argument("--data-dir", default=None)
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
        import json

        from shared.experiments import recheck_in_float64, run_experiments, write_report

        impls = tuple(args.impl or IMPLEMENTATIONS)
        quick = dict(
            base=TrainConfig(epochs=2, limit=1000), budgets=(1, 2), seeds=(0,), lab_batch=500
        )
        out = prepare_out_dir(args.out or Path("runs/experiments-quick" if args.quick else "docs"))
        if args.render_only or args.recheck_float64:
            path = out / "experiments" / "results.json"
            flag = "--render-only" if args.render_only else "--recheck-float64"
            if not path.is_file():
                raise UsageError(f"{flag}: no {path}; run without it first")
            saved = json.loads(path.read_text())
            if args.recheck_float64:
                data = load_dataset(args.data_dir)
                saved["float64"] = recheck_in_float64(data, saved, lambda s: print(s, flush=True))
                write_json(path, saved)
            write_report(out, saved)
            print(f"wrote {out / 'EXPERIMENTS.md'}")
            return 0
        command = "python scripts/experiments.py" + (" --quick" if args.quick else "")
        run_experiments(
            load_dataset(args.data_dir),
            out,
            impls=impls,
            command=command,
            progress=lambda s: print(s, flush=True),
            **(quick if args.quick else {}),
        )
        print(f"wrote {out / 'EXPERIMENTS.md'} and {out / 'experiments'}/")
        return 0

    return run_cli(parser, body)
