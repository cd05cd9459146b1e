"""The training loop, written once: any implementation supplies its step through a Backend."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared import metrics
from shared.backend import Backend, load_backend
from shared.checkpoint import Checkpoint, save_checkpoint
from shared.data import NUM_CLASSES, Dataset, Split, num_batches, training_batches
from shared.errors import ThreefoldError, UsageError
from shared.io import remove_stale_temporaries, write_json
from shared.plots import plot_curves
from shared.spec import get_arch, init_params

SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "float64")
CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"


class TrainingDiverged(ThreefoldError):
    """The loss stopped being a finite number."""


@dataclass(frozen=True)
class TrainConfig:
    """A run's whole configuration. The defaults were chosen on the validation split only
    (PyTorch, 15 epochs, seeds 0 to 2; figures in docs/EXPERIMENTS.md): a one-epoch warm-up
    made learning rate 0.03 usable, Nesterov momentum and flips with test-time flips each
    added a little; dropout, weight averaging and shifts did not help in 15 epochs."""

    impl: str = "numpy"
    arch: str = "lab"
    init: str = "he"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-3
    schedule: str = "cosine"
    warmup: int = 1
    label_smoothing: float = 0.1
    flip: bool = True
    tta: bool | None = None  # None: as `flip`
    shift: int = 0
    seed: int = 0
    limit: int | None = None
    dtype: str = "float32"
    dataset: str = "fashion-mnist"


def learning_rate(
    step: int, total_steps: int, base_lr: float, schedule: str, warmup_steps: int = 0
) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`: a linear
    rise to base_lr over the first `warmup_steps`, then the schedule over the rest."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise UsageError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def averages_mirrors(flip: bool, tta: bool | None) -> bool:
    """Whether evaluation averages each image with its mirror image: as asked, or by default
    when the network was trained on flipped images (one trained without them has learnt
    left-right asymmetries that a mirror image would contradict)."""
    return flip if tta is None else tta


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Steps of warm-up: `config.warmup` epochs, but the last epoch always follows the schedule
    (so a 1-epoch run has none)."""
    return min(config.warmup, config.epochs - 1) * steps_per_epoch


def make_backend(config: TrainConfig) -> Backend:
    return load_backend(
        config.impl,
        get_arch(config.arch),
        dtype=np.dtype(config.dtype),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
    )


def predict(
    backend: Backend, state: Any, images: np.ndarray, tta: bool = False, batch_size: int = 1000
) -> np.ndarray:
    """Logits (N, 10) for images (N, 1, 28, 28), computed in batches; with `tta`, the mean of
    the logits of each image and of its mirror image (test-time augmentation by flips)."""
    logits = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        out = backend.predict(state, x)
        if tta:
            out = (out + backend.predict(state, np.ascontiguousarray(x[..., ::-1]))) / 2
        logits.append(out)
    return np.concatenate(logits)


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


class Interrupted(ThreefoldError):
    """The user stopped the run (Ctrl-C)."""


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


def test_metrics(backend: Backend, state: Any, data: Dataset, tta: bool) -> dict[str, Any]:
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
    backend = make_backend(config)
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
    record["test"] = test_metrics(backend, state, data, tta)
    if out_dir is not None:
        write_json(out_dir / METRICS_NAME, record)
        plot_curves(
            record["history"],
            f"{backend.name} | {arch.name} | seed {config.seed}",
            out_dir / CURVES_NAME,
        )
    return record
