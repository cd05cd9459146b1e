"""The training loop, written once: any implementation supplies its step through a Backend.
The train.py command in front of it is shared/train.py; the experiments and the speedrun run
it too."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared import metrics
from shared.backend import Backend, TrainState, batched_logits, make_backend
from shared.batches import Batch, num_batches, training_batches
from shared.checkpoint import Checkpoint, params_digest, save_checkpoint
from shared.config import (
    PROJECT,
    TrainConfig,
    averages_mirrors,
    check_config,
    learning_rate,
    peak_rate,
    warmup_steps,
)
from shared.cost import check_training_batch, network_cost
from shared.data import Dataset, Split
from shared.errors import (
    Interrupted,
    OutputError,
    ThreefoldError,
    UsageError,
    act_on_signals,
    interrupted,
    signals_held,
)
from shared.io import remove_stale_temporaries, write_json
from shared.layers import NUM_CLASSES
from shared.outputs import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    METRICS_NAME,
    RUN_FILES,
    remove_evaluation,
)
from shared.plots import plot_curves
from shared.spec import Arch, Params, cast_params, get_arch, init_params
from shared.typed import typed_path


class TrainingDiverged(ThreefoldError):
    """The loss, a validation loss or a weight stopped being a finite number."""


def _hyperparameters(config: TrainConfig) -> str:
    """The flags that shape a step's size under the run's optimizer, as the user would type
    them."""
    if config.optimizer == "sgd":
        nesterov = "--nesterov" if config.nesterov else "--no-nesterov"
        moves = f"--momentum {config.momentum:g} {nesterov}"
    else:
        moves = f"--beta1 {config.beta1:g} --beta2 {config.beta2:g} --eps {config.eps:g}"
    warmup = "default" if config.warmup is None else f"{config.warmup:g}"
    return (
        f"--lr {config.lr:g}, {moves}, --weight-decay {config.weight_decay:g}, --batch-size "
        f"{config.batch_size}, --warmup {warmup}"
    )


def _smaller_step(config: TrainConfig) -> str:
    """What makes the run's steps smaller, in its optimizer's flags."""
    slower = "--momentum" if config.optimizer == "sgd" else "a larger --eps"
    return f"a smaller step (lower --lr or {slower}, a longer --warmup) keeps it finite"


# How a refusal names the settings it is about: train.py's flags, or a grid's row's settings.
FLAG_NAMES = {"limit": "--limit", "batch_size": "--batch-size"}
SETTING_NAMES = {"limit": "limit", "batch_size": "batch size"}


def train_split(
    config: TrainConfig, arch: Arch, data: Dataset, names: dict[str, str] = FLAG_NAMES
) -> Split:
    """The images the run trains on; --limit and --batch-size (as `names` calls them) must fit
    them, and a network of `arch` that normalises across the batch must never get a batch of
    one."""
    limit, batch = f"{names['limit']} {config.limit}", f"{names['batch_size']} {config.batch_size}"
    if config.limit is not None and config.limit > len(data.train):
        raise UsageError(f"{limit} exceeds the {len(data.train)} training images")
    split = data.train if config.limit is None else data.train.head(config.limit)
    if config.batch_size > len(split):
        raise UsageError(f"{batch} exceeds the {len(split)} training images")
    if arch.uses_batch_statistics:
        check_batch_statistics(config.batch_size, len(split), names)
    bn = arch.uses_batch_statistics
    check_training_batch(
        network_cost(arch.layers),
        config.batch_size,
        config.dtype,
        batch,
        least=2 if bn else 1,
        whole="its BatchNorm needs the whole batch at once" if bn else None,
    )
    return split


def check_batch_statistics(
    batch_size: int, images: int, names: dict[str, str] = FLAG_NAMES
) -> None:
    """Refuse to train a network that normalises across the batch on a batch of one: the
    whole batch, or the last of an epoch of `images`."""
    if batch_size == 1 or images % batch_size == 1:
        which = "each batch" if batch_size == 1 else "the last batch of each epoch"
        raise UsageError(
            f"{names['batch_size']} {batch_size}: {which} would hold 1 of the {images} images, "
            "and BatchNorm cannot take statistics of one image (PyTorch refuses it too); "
            f"choose another batch size or {names['limit']}"
        )


def epoch_batches(
    backend: Backend, n: int, config: TrainConfig, epoch: int, fill: float
) -> Iterator[Batch]:
    """The batches of `epoch` of a run of n images: its order, flips, shifts (padded with
    `fill`), erasing and the dropout masks of the backend's network, all from (seed, epoch)."""
    return training_batches(
        n,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        flip=config.flip,
        shift=config.shift,
        erase=config.erase,
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
    total, warmup = config.epochs * steps, warmup_steps(config, steps)
    peak = peak_rate(config, total)
    batches = epoch_batches(backend, n, config, epoch, fill)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(
        batches, total=steps, desc=f"{backend.name} epoch {epoch}", leave=False, disable=None
    )
    for i, batch in enumerate(bar):
        step = (epoch - 1) * steps + i
        lr = learning_rate(step, total, peak, config.schedule, warmup)
        state, loss, n_correct = backend.train_step(state, data, batch, lr)
        act_on_signals()  # one a library's callback swallowed stops the run here
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {step + 1} (epoch {epoch}, batch {i + 1}) "
                f"with learning rate {lr:.6g} ({_hyperparameters(config)}); "
                f"{_smaller_step(config)}"
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
    if not _kept(out_dir):
        return f"{out_dir / CHECKPOINT_NAME}, of epoch {last_epoch}, is no longer there"
    return f"{out_dir / CHECKPOINT_NAME} holds epoch {last_epoch}, intact"


def _kept(out_dir: Path) -> bool:
    """Whether the run's checkpoint is still in its folder (not removed or moved meanwhile)."""
    return (out_dir / CHECKPOINT_NAME).is_file()


def _resume_command(out_dir: Path, data: Dataset) -> str:
    """The command that continues the run, its paths quoted for the shell as needed: this
    Python (.venv's, which a bare `python` may not be) and train.py, from the current folder."""
    here = Path.cwd()
    python, script = (
        os.path.join(".", os.path.relpath(path)) if path.is_relative_to(here) else str(path)
        for path in (Path(sys.executable).absolute(), PROJECT / "scripts" / "train.py")
    )  # ./python: a bare name would be looked up on the PATH
    folders = f"--resume {typed_path(out_dir)} --data-dir {typed_path(data.source)}"
    return f"{shlex.quote(python)} {shlex.quote(script)} {folders}"


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
    """The history entry of an epoch: its training figures, validation loss and accuracy (None
    when the run trains on every training image and validates on none)."""
    train_seconds = time.perf_counter() - start
    val_loss = val_acc = None
    if len(data.val):
        val_logits = batched_logits(backend, state, data.val.x, tta)
        val_loss = metrics.cross_entropy(val_logits, data.val.y)
        val_acc = metrics.accuracy(val_logits, data.val.y)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "train_seconds": train_seconds,
        "epoch_seconds": time.perf_counter() - start,
    }


def evaluate_test_set(backend: Backend, state: Any, data: Dataset, tta: bool) -> dict[str, Any]:
    """Loss, accuracy, confusion matrix and per-class accuracy on the test images."""
    start = time.perf_counter()
    logits = batched_logits(backend, state, data.test.x, tta)
    seconds = time.perf_counter() - start
    cm = metrics.confusion_matrix(logits.argmax(axis=1), data.test.y, NUM_CLASSES)
    return {
        "loss": metrics.cross_entropy(logits, data.test.y),
        "acc": metrics.accuracy(logits, data.test.y),
        "confusion_matrix": cm.tolist(),
        "per_class_acc": metrics.per_class_accuracy(cm),
        "seconds": seconds,
    }


@dataclass
class Run:
    """A run in progress: what it trains, with what, where it writes, and how far it is."""

    config: TrainConfig
    arch: Arch
    data: Dataset
    split: Split
    backend: Backend
    state: TrainState
    train_data: Any  # the training split moved into the framework (backend.put_data)
    record: dict[str, Any]  # configuration, per-epoch history, (at the end) test metrics
    out_dir: Path | None
    tta: bool

    @property
    def done(self) -> int:
        """Epochs completed (and, with an out_dir, saved)."""
        return len(self.record["history"])


def train(
    config: TrainConfig,
    data: Dataset,
    out_dir: Path | None = None,
    log: Callable[[str], None] = tqdm.write,
    resume: Checkpoint | None = None,
    arch: Arch | None = None,
    initial: Params | None = None,
) -> dict[str, Any]:
    """Train from the seeded initial weights, or from `initial` (canonical tensors: a model's
    own weights), or from `resume` (a checkpoint of this run); evaluate on validation each
    epoch and on test at the end. With `out_dir`: after every epoch the checkpoint and
    metrics.json, at the end curves.png, each written atomically. `arch` is the network of
    `config.arch`, where the caller has parsed it already.

    Returns the run's record (configuration, per-epoch history, test metrics).
    """
    if arch is None:
        arch = get_arch(config.arch)
    elif arch.name != config.arch:
        raise ValueError(f"arch {arch.name!r} is not config.arch {config.arch!r}")
    run = start_run(config, data, out_dir, resume, arch, initial)
    # A diverging run overflows in NumPy's products before its loss is found non-finite,
    # which the run reports in one line naming the flags; NumPy's warnings would precede it.
    with np.errstate(over="ignore", invalid="ignore"):
        train_epochs(run, log)
    finish_run(run)
    return run.record


def start_run(
    config: TrainConfig,
    data: Dataset,
    out_dir: Path | None,
    resume: Checkpoint | None,
    arch: Arch,
    initial: Params | None = None,
) -> Run:
    """The run's backend and state (the seeded initial weights, `initial`, or the
    checkpoint's), its training images moved in, and its step compiled before the first
    epoch's clock starts."""
    check_config(config)
    if (data.pixels, bool(len(data.val))) != (config.pixels, config.validation):
        raise ValueError("the data is not prepared as the configuration says (pixels, split)")
    backend = make_backend(config.impl, arch, config.dtype, config.hyperparams)
    split = train_split(config, arch, data)
    record: dict[str, Any] = {"config": dataclasses.asdict(config), "history": []}
    if resume is None and initial is not None:
        state = backend.init_state(cast_params(initial, arch, config.dtype))
    elif resume is None:
        state = backend.init_state(init_params(arch, config.init, config.seed, config.dtype))
    else:
        state = backend.init_state(resume.params, resume.optimizer)
        record["history"] = resume.meta["history"]
    tta = averages_mirrors(config.flip, config.tta)
    train_data = backend.put_data(split.x, split.y)
    run = Run(config, arch, data, split, backend, state, train_data, record, out_dir, tta)
    if run.done < config.epochs:
        try:  # an epoch's time is then its steps' alone
            record["compile_seconds"] = compile_steps(
                backend, state, train_data, len(split), config, data.background
            )
        except KeyboardInterrupt as stop:  # it said "interrupted" alone
            raise interrupted(stop, f"while compiling; {_saved(out_dir, run.done)}") from None
    if out_dir is not None:
        remove_stale_temporaries(out_dir, RUN_FILES)
    return run


def train_epochs(run: Run, log: Callable[[str], None]) -> None:
    """The remaining epochs, each evaluated on validation, saved, then printed. Ctrl-C,
    SIGTERM or a divergence end the run in one line that says what was kept."""
    config, backend = run.config, run.backend
    resumed_after = run.done  # the epochs of the checkpoint resumed; 0 for a new run
    try:
        for epoch in range(run.done + 1, config.epochs + 1):
            start = time.perf_counter()
            run.state, train_loss, train_acc = run_epoch(
                backend,
                run.state,
                run.train_data,
                len(run.split),
                config,
                epoch,
                run.data.background,
            )
            entry = evaluate_epoch(
                backend, run.state, run.data, epoch, train_loss, train_acc, start, run.tta
            )
            if entry["val_loss"] is not None:
                _finite({"loss": entry["val_loss"]}, "the validation", epoch, config)
            # A report in a new run's folder is of another checkpoint, which stays.
            removed = save_epoch(run, entry, drop_report=resumed_after > 0)
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
            if removed:
                log(
                    f"note: removed {', '.join(removed)}, evaluate.py's report of epoch "
                    f"{epoch - 1}'s checkpoint, which epoch {epoch}'s replaced (evaluate it "
                    "again once the run ends)"
                )
    except KeyboardInterrupt as stop:
        resume_hint = (
            f"; continue with: {_resume_command(run.out_dir, run.data)}"
            if run.out_dir is not None and run.done and _kept(run.out_dir)
            else ""
        )
        # Stopped as the last epoch's checkpoint was written: no epoch is under way.
        when = (
            f"in epoch {run.done + 1}" if run.done < run.config.epochs else "after the last epoch"
        )
        raise interrupted(stop, f"{when}; {_saved(run.out_dir, run.done)}{resume_hint}") from None
    except (TrainingDiverged, OutputError) as e:
        raise type(e)(f"{e}; {_saved(run.out_dir, run.done)}") from None


def save_epoch(run: Run, entry: dict[str, Any], drop_report: bool = False) -> list[str]:
    """Add the epoch's history entry to the record; with an out_dir, write the checkpoint and
    metrics.json together, Ctrl-C and SIGTERM held until both are written, and with
    `drop_report` remove evaluate.py's report of the checkpoint replaced. -> the report's
    files removed."""
    if run.out_dir is None:
        run.record["history"].append(entry)
        return []
    params = run.backend.params(run.state)
    _finite(params, "the weights of", entry["epoch"], run.config)
    history = [*run.record["history"], entry]
    meta = {
        "arch": run.arch.name,
        "impl": run.backend.name,
        "epoch": entry["epoch"],
        "dataset": run.data.spec.name,
        "data": data_identity(run.data),
        "config": run.record["config"],
        "history": history,
    }
    with signals_held():
        optimizer = run.backend.optimizer_tensors(run.state)
        save_checkpoint(run.out_dir / CHECKPOINT_NAME, params, meta, optimizer)
        run.record["history"] = history  # the checkpoint holds the epoch from here on
        write_json(run.out_dir / METRICS_NAME, run.record)
        return remove_evaluation(run.out_dir) if drop_report else []


def finish_run(run: Run) -> None:
    """The test metrics into the record; with an out_dir, metrics.json and curves.png."""
    try:
        run.record["test"] = evaluate_test_set(run.backend, run.state, run.data, run.tta)
        act_on_signals()  # one dropped during the test stops here, saying what was kept
        run.record["params_sha256"] = params_digest(run.backend.params(run.state))
        _finite({"loss": run.record["test"]["loss"]}, "the test", run.config.epochs, run.config)
        if run.out_dir is not None:
            write_json(run.out_dir / METRICS_NAME, run.record)
            title = f"{run.backend.name} | {run.arch.name} | seed {run.config.seed}"
            plot_curves(run.record["history"], title, run.out_dir / CURVES_NAME)
    except KeyboardInterrupt as stop:
        if run.out_dir is None:
            raise interrupted(stop, "after the last epoch, before the test") from None
        raise interrupted(
            stop,
            f"after the last epoch: all {run.config.epochs} epochs are saved in "
            f"{run.out_dir / CHECKPOINT_NAME}; finish the test and the curves with: "
            f"{_resume_command(run.out_dir, run.data)}",
        ) from None
    except (TrainingDiverged, OutputError) as e:
        raise type(e)(f"{e}; {_saved(run.out_dir, run.done)}") from None
    try:
        act_on_signals()  # one dropped while the files were written: they are whole
    except KeyboardInterrupt as stop:
        raise stopped_when_whole(stop, run.record, run.out_dir) from None


def stopped_when_whole(stop: KeyboardInterrupt, record: dict, out_dir: Path | None) -> Interrupted:
    """The one-line error for a stop once a run has finished (its test and files written)."""
    kept = "" if out_dir is None else f"; the run is whole in {out_dir}"
    return interrupted(stop, f"after the test (accuracy {100 * record['test']['acc']:.2f}%){kept}")
