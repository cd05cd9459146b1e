"""The training loop, written once (any implementation supplies its step through a Backend),
and the train.py command in front of it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared import metrics
from shared.backend import Backend, make_backend, predict
from shared.batches import num_batches, training_batches
from shared.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared.cli import add_training_flags, config_from_args, prepare_out_dir, run_cli
from shared.config import TrainConfig, averages_mirrors, learning_rate, warmup_steps
from shared.data import NUM_CLASSES, Dataset, Split, get_dataset_spec, load_dataset
from shared.errors import CheckpointError, Interrupted, ThreefoldError, UsageError
from shared.io import remove_stale_temporaries, write_json
from shared.plots import plot_curves
from shared.spec import get_arch, init_params

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"


class TrainingDiverged(ThreefoldError):
    """The loss stopped being a finite number."""


def train_split(config: TrainConfig, data: Dataset) -> Split:
    if config.limit is None:
        return data.train
    if config.limit > len(data.train):
        raise UsageError(f"--limit {config.limit} exceeds the {len(data.train)} training images")
    return data.train.head(config.limit)


def run_epoch(
    backend: Backend,
    state: Any,
    data: Any,
    n: int,
    config: TrainConfig,
    epoch: int,
    fill: float,
) -> tuple[Any, float, float]:
    """One pass over the n images of `data` (from backend.put_data) in the (seed, epoch)
    order, shifted images padded with `fill` -> (state, mean loss, accuracy)."""
    steps = num_batches(n, config.batch_size)
    warmup = warmup_steps(config, steps)
    batches = training_batches(
        n,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        flip=config.flip,
        shift=config.shift,
        fill=fill,
    )
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(
        batches, total=steps, desc=f"{backend.name} epoch {epoch}", leave=False, disable=None
    )
    for i, batch in enumerate(bar):
        step = (epoch - 1) * steps + i
        lr = learning_rate(step, config.epochs * steps, config.lr, config.schedule, warmup)
        state, loss, n_correct = backend.train_step(state, data, batch, lr)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {step + 1} (epoch {epoch}, batch {i + 1}) "
                f"with learning rate {lr:.6g}; lower --lr"
            )
        size = len(batch.idx)
        loss_sum, correct, seen = loss_sum + loss * size, correct + n_correct, seen + size
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return state, loss_sum / seen, correct / seen


def _saved(out_dir: Path | None, last_epoch: int) -> str:
    if out_dir is None or last_epoch < 1:
        return "no epoch was completed, so nothing was saved"
    return f"{out_dir / CHECKPOINT_NAME} holds epoch {last_epoch}, intact"


def evaluate_epoch(
    backend: Backend,
    state: Any,
    data: Dataset,
    epoch: int,
    train_loss: float,
    train_acc: float,
    start: float,
    tta: bool,
) -> dict[str, Any]:
    """The history entry of an epoch: its training figures, validation loss and accuracy."""
    train_seconds = time.perf_counter() - start
    val_logits = predict(backend, state, data.val.x, tta)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": metrics.cross_entropy(val_logits, data.val.y),
        "val_acc": metrics.accuracy(val_logits, data.val.y),
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - start,
    }


def evaluate_test_set(backend: Backend, state: Any, data: Dataset, tta: bool) -> dict[str, Any]:
    """Loss, accuracy, confusion matrix and per-class accuracy on the test images."""
    logits = predict(backend, state, data.test.x, tta)
    cm = metrics.confusion_matrix(logits.argmax(axis=1), data.test.y, NUM_CLASSES)
    return {
        "loss": metrics.cross_entropy(logits, data.test.y),
        "acc": metrics.accuracy(logits, data.test.y),
        "confusion_matrix": cm.tolist(),
        "per_class_acc": metrics.per_class_accuracy(cm).tolist(),
    }


def train(
    config: TrainConfig,
    data: Dataset,
    out_dir: Path | None = None,
    log: Callable[[str], None] = tqdm.write,
    resume: Checkpoint | None = None,
) -> dict[str, Any]:
    """Train from the seeded initial weights (or from `resume`, a checkpoint of this run),
    evaluate on validation each epoch and on test at the end. With `out_dir`: after every
    epoch the checkpoint and metrics.json, at the end curves.png, each written atomically.

    Returns the run's record (configuration, per-epoch history, test metrics).
    """
    arch = get_arch(config.arch)
    backend = make_backend(config.impl, arch, config.dtype, config.hyperparams)
    tta = averages_mirrors(config.flip, config.tta)
    split = train_split(config, data)
    record: dict[str, Any] = {"config": dataclasses.asdict(config), "history": []}
    if resume is None:
        params = init_params(arch, config.init, config.seed, np.dtype(config.dtype))
        state = backend.init_state(params)
    else:
        state = backend.init_state(resume.params, resume.velocity)
        record["history"] = resume.meta["history"]
    train_data = backend.put_data(split.x, split.y)
    done = len(record["history"])
    if out_dir is not None:
        remove_stale_temporaries(out_dir)
    try:
        for epoch in range(done + 1, config.epochs + 1):
            start = time.perf_counter()
            state, train_loss, train_acc = run_epoch(
                backend, state, train_data, len(split), config, epoch, data.spec.background
            )
            entry = evaluate_epoch(backend, state, data, epoch, train_loss, train_acc, start, tta)
            record["history"].append(entry)
            log(
                metrics.epoch_line(
                    backend.name,
                    epoch,
                    train_loss,
                    train_acc,
                    entry["val_loss"],
                    entry["val_acc"],
                    entry["epoch_seconds"],
                )
            )
            if out_dir is not None:
                meta = {
                    "arch": arch.name,
                    "impl": backend.name,
                    "epoch": epoch,
                    "dataset": data.spec.name,
                    "config": record["config"],
                    "history": record["history"],
                }
                save_checkpoint(
                    out_dir / CHECKPOINT_NAME, backend.params(state), meta, backend.velocity(state)
                )
            done = epoch
            if out_dir is not None:
                write_json(out_dir / METRICS_NAME, record)
    except KeyboardInterrupt:
        if out_dir is not None and done:
            # metrics.json tells the same story as the checkpoint, whenever Ctrl-C came.
            write_json(out_dir / METRICS_NAME, {**record, "history": record["history"][:done]})
        resume_hint = (
            f"; continue with: python scripts/train.py --resume {out_dir}"
            if out_dir is not None and done
            else ""
        )
        raise Interrupted(
            f"interrupted in epoch {done + 1}; {_saved(out_dir, done)}{resume_hint}"
        ) from None
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; {_saved(out_dir, done)}") from None
    record["test"] = evaluate_test_set(backend, state, data, tta)
    if out_dir is not None:
        write_json(out_dir / METRICS_NAME, record)
        plot_curves(
            record["history"],
            f"{backend.name} | {arch.name} | seed {config.seed}",
            out_dir / CURVES_NAME,
        )
    return record


def resumed_config(
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


def main(argv: list[str] | None = None) -> int:
    """scripts/train.py: train, print progress and the test accuracy, write the run's files."""
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
            config, ckpt = resumed_config(args, defaults)
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
        print(f"wrote {out / CHECKPOINT_NAME}, {out / METRICS_NAME}, {out / CURVES_NAME}")
        return 0

    return run_cli(parser, body)
