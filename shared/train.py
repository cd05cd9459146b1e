"""The training loop, written once (any implementation supplies its step through a Backend),
and the train.py command in front of it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared import metrics
from shared.backend import Backend, make_backend, predict
from shared.batches import Batch, num_batches, training_batches
from shared.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared.cli import add_training_flags, config_from_args, given_flags, run_cli
from shared.config import (
    TrainConfig,
    averages_mirrors,
    check_config,
    config_from_saved,
    learning_rate,
    warmup_steps,
)
from shared.data import NUM_CLASSES, Dataset, Split, get_dataset_spec, load_dataset
from shared.errors import CheckpointError, Interrupted, ThreefoldError, UsageError
from shared.io import remove_stale_temporaries, write_json
from shared.outputs import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    METRICS_NAME,
    RUN_FILES,
    fresh_run_dir,
    hold,
    holds_run,
    prepare_out_dir,
)
from shared.plots import plot_curves
from shared.spec import GRAMMAR, get_arch, init_params


class TrainingDiverged(ThreefoldError):
    """The loss, a validation loss or a weight stopped being a finite number."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, which a run takes like Ctrl-C: it stops, keeps its last epoch and says how to
    continue."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then act on them: an epoch's checkpoint
    and metrics.json are written together, so they always tell the same story. (Python runs
    signal handlers in the main thread only; elsewhere the block runs unguarded.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        raise Terminated if caught[0] == signal.SIGTERM else KeyboardInterrupt


def _hyperparameters(config: TrainConfig) -> str:
    """The flags that shape a step's size, as the user would type them."""
    nesterov = "--nesterov" if config.nesterov else "--no-nesterov"
    return (
        f"--lr {config.lr:g}, --momentum {config.momentum:g} {nesterov}, --weight-decay "
        f"{config.weight_decay:g}, --batch-size {config.batch_size}, --warmup "
        f"{'default' if config.warmup is None else f'{config.warmup:g}'}"
    )


def train_split(config: TrainConfig, data: Dataset) -> Split:
    """The images the run trains on; --limit and --batch-size must fit them."""
    if config.limit is not None and config.limit > len(data.train):
        raise UsageError(f"--limit {config.limit} exceeds the {len(data.train)} training images")
    split = data.train if config.limit is None else data.train.head(config.limit)
    if config.batch_size > len(split):
        raise UsageError(
            f"--batch-size {config.batch_size} exceeds the {len(split)} training images"
        )
    if get_arch(config.arch).has_batch_norm and len(split) % config.batch_size == 1:
        raise UsageError(
            f"--batch-size {config.batch_size}: the last batch of each epoch would hold 1 of "
            f"the {len(split)} images, and BatchNorm cannot take statistics of one image "
            "(PyTorch refuses it too); choose another batch size or --limit"
        )
    return split


def epoch_batches(
    backend: Backend, n: int, config: TrainConfig, epoch: int, fill: float
) -> Iterator[Batch]:
    """The batches of `epoch` of a run of n images: its order, flips, shifts (padded with
    `fill`) and the dropout masks of the backend's network, all from (seed, epoch)."""
    return training_batches(
        n,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        flip=config.flip,
        shift=config.shift,
        fill=fill,
        dropouts=backend.arch.dropouts,
    )


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
    batches = epoch_batches(backend, n, config, epoch, fill)
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
                f"with learning rate {lr:.6g} ({_hyperparameters(config)}); a smaller step "
                "(lower --lr or --momentum, a longer --warmup) keeps it finite"
            )
        size = len(batch.idx)
        loss_sum, correct, seen = loss_sum + loss * size, correct + n_correct, seen + size
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return state, loss_sum / seen, correct / seen


def compile_steps(
    backend: Backend, state: Any, data: Any, n: int, config: TrainConfig, fill: float
) -> float:
    """Seconds to compile a training step for each batch size of an epoch of n images (a full
    batch, and the last one if smaller), on a copy of `state`; 0 where nothing compiles."""
    if not backend.compiles:
        return 0.0
    one_per_size: dict[int, Batch] = {}
    for batch in epoch_batches(backend, n, config, 1, fill):
        one_per_size.setdefault(len(batch.idx), batch)
    start = time.perf_counter()
    backend.compile_step(state, data, list(one_per_size.values()))
    return time.perf_counter() - start


def _saved(out_dir: Path | None, last_epoch: int) -> str:
    if out_dir is None or last_epoch < 1:
        return "no epoch was completed, so nothing was saved"
    return f"{out_dir / CHECKPOINT_NAME} holds epoch {last_epoch}, intact"


def _resume_command(out_dir: Path, data: Dataset) -> str:
    return f"python scripts/train.py --resume {out_dir} --data-dir {data.source}"


def _finite(values: dict[str, Any], what: str, epoch: int, config: TrainConfig) -> None:
    """Stop the run if one of `values` (numbers or arrays) is not finite, naming it."""
    for name, value in values.items():
        if not np.all(np.isfinite(value)):
            raise TrainingDiverged(
                f"{what} {name} became non-finite in epoch {epoch} ({_hyperparameters(config)})"
            )


def data_identity(data: Dataset) -> dict[str, str]:
    """What a run was trained on: the dataset, its folder, and the digest of its files'
    content (the same for any faithful copy, wherever it lies)."""
    return {
        "dataset": data.spec.name,
        "folder": str(Path(data.source).resolve()),
        "sha256": data.content_sha256,
    }


def _interrupted(stop: KeyboardInterrupt, what: str) -> Interrupted:
    """The one-line error for Ctrl-C or SIGTERM (`stop`), followed by `what` was kept."""
    if isinstance(stop, Terminated):
        return Interrupted(f"terminated (SIGTERM) {what}", signal_number=signal.SIGTERM)
    return Interrupted(f"interrupted {what}", signal_number=signal.SIGINT)


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
    start = time.perf_counter()
    logits = predict(backend, state, data.test.x, tta)
    seconds = time.perf_counter() - start
    cm = metrics.confusion_matrix(logits.argmax(axis=1), data.test.y, NUM_CLASSES)
    return {
        "loss": metrics.cross_entropy(logits, data.test.y),
        "acc": metrics.accuracy(logits, data.test.y),
        "confusion_matrix": cm.tolist(),
        "per_class_acc": metrics.per_class_accuracy(cm),
        "seconds": seconds,
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
    check_config(config)
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
    if done < config.epochs:
        # Compiled before the first epoch's clock starts: an epoch's time is its steps'.
        record["compile_seconds"] = compile_steps(
            backend, state, train_data, len(split), config, data.spec.background
        )
    if out_dir is not None:
        identity = data_identity(data)
        remove_stale_temporaries(out_dir)
    try:
        for epoch in range(done + 1, config.epochs + 1):
            start = time.perf_counter()
            state, train_loss, train_acc = run_epoch(
                backend, state, train_data, len(split), config, epoch, data.spec.background
            )
            entry = evaluate_epoch(backend, state, data, epoch, train_loss, train_acc, start, tta)
            _finite({"loss": entry["val_loss"]}, "the validation", epoch, config)
            record["history"].append(entry)
            if out_dir is not None:
                params = backend.params(state)
                _finite(params, "the weights of", epoch, config)
                meta = {
                    "arch": arch.name,
                    "impl": backend.name,
                    "epoch": epoch,
                    "dataset": data.spec.name,
                    "data": identity,
                    "config": record["config"],
                    "history": record["history"],
                }
                with _signals_held():
                    save_checkpoint(
                        out_dir / CHECKPOINT_NAME, params, meta, backend.velocity(state)
                    )
                    write_json(out_dir / METRICS_NAME, record)
                    done = epoch
            else:
                done = epoch
            # Printed once saved: an epoch on the screen is an epoch in the checkpoint.
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
    except KeyboardInterrupt as stop:
        resume_hint = (
            f"; continue with: {_resume_command(out_dir, data)}"
            if out_dir is not None and done
            else ""
        )
        raise _interrupted(
            stop, f"in epoch {done + 1}; {_saved(out_dir, done)}{resume_hint}"
        ) from None
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; {_saved(out_dir, done)}") from None
    try:
        record["test"] = evaluate_test_set(backend, state, data, tta)
        if out_dir is not None:
            write_json(out_dir / METRICS_NAME, record)
            plot_curves(
                record["history"],
                f"{backend.name} | {arch.name} | seed {config.seed}",
                out_dir / CURVES_NAME,
            )
    except KeyboardInterrupt as stop:
        if out_dir is None:
            raise _interrupted(stop, "after the last epoch, before the test") from None
        raise _interrupted(
            stop,
            f"after the last epoch: all {config.epochs} epochs are saved in "
            f"{out_dir / CHECKPOINT_NAME}; finish the test and the curves with: "
            f"{_resume_command(out_dir, data)}",
        ) from None
    return record


def resumed_config(args: argparse.Namespace, typed: set[str]) -> tuple[TrainConfig, Checkpoint]:
    """The configuration and last checkpoint of the run in --resume DIR. Training flags typed
    beside it must agree with the run's: one that would change the run is refused, naming it."""
    path = args.resume / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    if "history" not in ckpt.meta or "config" not in ckpt.meta or ckpt.velocity is None:
        raise CheckpointError(f"{path}: written without its run history; cannot resume")
    config = config_from_saved(ckpt.meta["config"], str(path))
    if config.arch != ckpt.meta["arch"]:
        # The tensors are the network of field arch (checked on loading); the configuration
        # must name the same one, and never a file.
        raise CheckpointError(
            f"{path}: meta field config.arch {config.arch[:60]!r} is not the checkpoint's "
            f"network {ckpt.meta['arch'][:60]!r}"
        )
    trained_on = ckpt.meta.get("data")
    if not (
        isinstance(trained_on, dict)
        and all(isinstance(trained_on.get(k), str) for k in ("dataset", "folder", "sha256"))
    ):
        raise CheckpointError(
            f"{path}: written by another version of threefold (no record of its data); "
            "cannot check that it continues on the same data, start a new run"
        )
    # Values that do not fit the run's dtype are refused rather than cast to inf.
    ckpt = load_checkpoint(path, dtype=config.dtype)
    if len(ckpt.meta["history"]) > config.epochs:
        raise CheckpointError(
            f"{path}: history has {len(ckpt.meta['history'])} epochs for a run of {config.epochs}"
        )
    contradicting = [
        f"--{name.replace('_', '-')} {getattr(args, name)} (the run has {getattr(config, name)})"
        for name in sorted(typed & set(TrainConfig.__dataclass_fields__))
        if getattr(args, name) != getattr(config, name)
    ]
    if "epochs" in typed and args.epochs != config.epochs:
        raise UsageError(
            f"--epochs {args.epochs}: the run in {args.resume} was planned for "
            f"{config.epochs} epoch{'s' * (config.epochs != 1)} and its learning-rate schedule "
            "is fixed by that; extending or shortening it is not supported: start a new run"
        )
    if contradicting:
        raise UsageError(
            f"--resume continues the run in {args.resume} as it was configured; these flags "
            f"contradict it: {', '.join(contradicting)}"
        )
    return config, ckpt


def check_same_data(ckpt: Checkpoint, data: Dataset, run_dir: Path) -> None:
    """Refuse to continue a run on other data than it was trained on."""
    trained_on, now = ckpt.meta["data"], data_identity(data)
    if (trained_on.get("dataset"), trained_on.get("sha256")) != (now["dataset"], now["sha256"]):
        raise UsageError(
            f"--resume {run_dir}: the run was trained on {trained_on.get('dataset')} in "
            f"{trained_on.get('folder')} (content {str(trained_on.get('sha256'))[:12]}), "
            f"but {now['folder']} holds other data (content {now['sha256'][:12]}); pass "
            f"--data-dir {trained_on.get('folder')}"
        )


def build_parser(defaults: TrainConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the CNN on Fashion-MNIST with one of the three implementations.",
        epilog="networks (--arch):\n" + GRAMMAR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_training_flags(parser, defaults)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for metrics.json, checkpoint.npz and curves.png; refused if it holds a "
        "run, unless --overwrite (default: runs/IMPL-ARCH, or runs/IMPL-ARCH-2, -3, ... if "
        "taken)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its checkpoint, metrics and curves)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last completed epoch, on the data it was "
        "trained on (training flags, if given, must agree with the run's)",
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
    return parser


def _refuse_a_run_in(folder: Path) -> None:
    if holds_run(folder):
        raise UsageError(
            f"--out {folder}: already holds a run; continue it with --resume {folder}, "
            "replace it with --overwrite, or choose another folder"
        )


def main(argv: list[str] | None = None) -> int:
    """scripts/train.py: train, print progress and the test accuracy, write the run's files."""
    parser = build_parser(TrainConfig())
    args = parser.parse_args(argv)
    typed = given_flags(parser, argv)

    def body() -> int:
        ckpt = None
        # The network by its canonical name: a run never needs a spec file again.
        args.arch = get_arch(args.arch).name
        if args.resume is not None:
            elsewhere = args.out is not None and args.out.resolve() != args.resume.resolve()
            if elsewhere or args.overwrite:
                flag = "--out" if elsewhere else "--overwrite"
                raise UsageError(f"{flag}: --resume continues the run in its own folder")
            folder = args.resume
            if not (folder / CHECKPOINT_NAME).is_file():
                raise UsageError(f"--resume {folder}: no {CHECKPOINT_NAME} there to continue from")
        else:
            config = config_from_args(args)
            check_config(config)
            folder = args.out
            if folder is not None:
                if folder.exists() and not folder.is_dir():
                    raise UsageError(f"--out {folder}: is a file, not a folder")
                if not args.overwrite and folder.is_dir():
                    _refuse_a_run_in(folder)
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            if args.resume is not None:
                with hold(folder, "--resume"):
                    config, ckpt = resumed_config(args, typed)
                    data = _load_data(args, config, ckpt)
                    check_same_data(ckpt, data, folder)
                    return _run(config, data, folder, ckpt)
            data = _load_data(args, config, None)
            train_split(config, data)  # before any folder is made: --limit, --batch-size fit
            created = folder is None or not folder.exists()
            if folder is None:
                label = get_arch(config.arch).label
                folder = fresh_run_dir(Path("runs") / f"{config.impl}-{label}")
            else:
                prepare_out_dir(folder)
            try:
                with hold(folder):
                    if args.overwrite:
                        for name in RUN_FILES:
                            (folder / name).unlink(missing_ok=True)
                    else:
                        _refuse_a_run_in(folder)  # again: a run may have finished meanwhile
                    return _run(config, data, folder, None)
            except BaseException:
                if created:  # a folder this run made and left empty goes with it
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run_cli(parser, body)


def _load_data(args: argparse.Namespace, config: TrainConfig, ckpt: Checkpoint | None) -> Dataset:
    """The data of the run: from --data-dir, else (resuming) where the run found it, else the
    usual lookup; fetched first with --download."""
    data_dir = args.data_dir
    if data_dir is None and ckpt is not None and Path(ckpt.meta["data"]["folder"]).is_dir():
        data_dir = ckpt.meta["data"]["folder"]
    if args.download:
        from shared.download import download_dataset

        spec = get_dataset_spec(config.dataset)
        data_dir = download_dataset(spec, data_dir, args.download_url)
        print(f"downloaded and verified {spec.name} in {data_dir}")
    return load_dataset(data_dir, config.dataset)


def _run(config: TrainConfig, data: Dataset, folder: Path, ckpt: Checkpoint | None) -> int:
    print(
        f"{config.impl} | {config.arch} | {len(data.train)} train, {len(data.val)} "
        f"validation, {len(data.test)} test images from {data.source} | writing to {folder}"
    )
    if ckpt is not None:
        print(f"resuming after epoch {ckpt.meta['epoch']} of {config.epochs}")
    record = train(config, data, folder, resume=ckpt)
    test = record["test"]
    print(f"{config.impl} | Test Loss: {test['loss']:7.4f} | Test Acc: {100 * test['acc']:7.4f}")
    print(f"wrote {folder / CHECKPOINT_NAME}, {folder / METRICS_NAME}, {folder / CURVES_NAME}")
    return 0
