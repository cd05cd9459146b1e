"""The train.py command: flags, a fresh or resumed run's folder and checks, in front of the
training loop of shared/loop.py."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from shared.checkpoint import Checkpoint, checkpoint_meta, load_checkpoint
from shared.cli import add_training_flags, config_from_args, run_cli
from shared.config import (
    RECIPES,
    TrainConfig,
    averages_mirrors,
    check_config,
    check_flags_used,
    config_from_saved,
)
from shared.data import Dataset, get_dataset_spec, load_dataset
from shared.errors import (
    CheckpointError,
    UsageError,
    act_on_signals,
    say,
    stop_on_signals,
)
from shared.io import read_json
from shared.loop import data_identity, stopped_when_whole, train, train_split
from shared.network import import_network, load_weights
from shared.outputs import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    METRICS_NAME,
    RUN_FILES,
    check_out_file,
    fresh_run_dir,
    hold,
    holds_run,
    missing_folders,
    prepare_out_dir,
    refuse_odd_run_files,
    remove_if_empty,
    replacing_run,
    set_aside_runs,
)
from shared.spec import (
    GRAMMAR,
    Arch,
    Params,
    cast_params,
    get_arch,
    is_model_file,
    is_onnx_file,
)
from shared.typed import given_flags, parse_once, path_type, typed_path


def _applied(name: str, value: Any, config: TrainConfig) -> Any:
    """Setting `name` of value `value` as it applies in the run of `config`: --tta as the
    run's flips make it (a tta of None averages mirrors where the run flips), any other as
    it is."""
    return averages_mirrors(config.flip, value) if name == "tta" else value


def resumed_config(args: argparse.Namespace, typed: set[str]) -> tuple[TrainConfig, Checkpoint]:
    """The configuration and last checkpoint of the run in --resume DIR. Training flags typed
    beside it must agree with the run's: one that would change the run is refused, naming it."""
    path = args.resume / CHECKPOINT_NAME
    # The metadata first: a flag typed wrong is refused before a tensor is read (a network of
    # 24.6M parameters, read twice at once, took 1.37 GiB and 7.5 s to refuse one).
    meta = checkpoint_meta(path)
    no_history = CheckpointError(f"{path}: written without its run history; cannot resume")
    if "history" not in meta or "config" not in meta:
        raise no_history
    config = config_from_saved(meta["config"], str(path))
    if config.arch != meta["arch"]:
        # The tensors are the network of field arch (checked on loading); the configuration
        # must name the same one, and never a file.
        raise CheckpointError(
            f"{path}: meta field config.arch {config.arch[:60]!r} is not the checkpoint's "
            f"network {meta['arch'][:60]!r}"
        )
    trained_on = meta.get("data")
    if not (
        isinstance(trained_on, dict)
        and all(isinstance(trained_on.get(k), str) for k in ("dataset", "folder", "sha256"))
        and trained_on["folder"]  # "" would be the current folder
    ):
        raise CheckpointError(
            f"{path}: written by another version of threefold (no record of its data); "
            "cannot check that it continues on the same data, start a new run"
        )
    if len(meta["history"]) > config.epochs:
        raise CheckpointError(
            f"{path}: history has {len(meta['history'])} epochs for a run of {config.epochs}"
        )
    contradicting = [
        f"--{name.replace('_', '-')} {getattr(args, name)} (the run has "
        f"{_applied(name, getattr(config, name), config)})"
        for name in sorted(typed & set(TrainConfig.__dataclass_fields__))
        if _applied(name, getattr(args, name), config)
        != _applied(name, getattr(config, name), config)
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
    # Values that do not fit the run's dtype are refused rather than cast to inf.
    ckpt = load_checkpoint(path, dtype=config.dtype)
    if ckpt.optimizer is None:
        raise no_history
    return config, ckpt


def check_same_data(ckpt: Checkpoint, data: Dataset, run_dir: Path) -> None:
    """Refuse to continue a run on other data than it was trained on."""
    trained_on, now = ckpt.meta["data"], data_identity(data)
    if (trained_on.get("dataset"), trained_on.get("sha256")) != (now["dataset"], now["sha256"]):
        raise UsageError(
            f"--resume {run_dir}: the run was trained on {trained_on.get('dataset')} in "
            f"{trained_on.get('folder')} (content {str(trained_on.get('sha256'))[:12]}), "
            f"but {now['folder']} holds other data (content {now['sha256'][:12]}); "
            + (  # the folder itself changed: naming it again would send the user round
                "its files have changed since; put the run's data back there"
                if now["folder"] == trained_on.get("folder")
                else f"pass --data-dir {typed_path(Path(trained_on['folder']))}"
            )
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
        "--recipe",
        choices=RECIPES,
        default=None,
        help="settings by name, flags typed beside it winning: plain is a tutorial's run, fast "
        "the lab network's speedrun recipe, strong-fast and deep those of the presets ("
        + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v}" for k, v in recipe.items())
            for name, recipe in RECIPES.items()
        )
        + ")",
    )
    parser.add_argument(
        "--plain", action="store_const", const="plain", dest="recipe", help="--recipe plain"
    )
    parser.add_argument(
        "--weights",
        type=path_type,
        default=None,
        metavar="FILE",
        dest="weights_file",
        help="start from these weights: a state_dict saved with torch.save (.pt, read with "
        "torch.load(weights_only=True)), a .safetensors file, an ONNX graph's initialisers "
        "(.onnx) or a run's checkpoint.npz, named as the --arch model file names them (or "
        "canonically)",
    )
    parser.add_argument(
        "--out",
        type=path_type,
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
        type=path_type,
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its last completed epoch, on the data it was "
        "trained on (training flags, if given, must agree with the run's)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch the four official files first, verify their checksums and "
        "put them in --data-dir (default: $THREEFOLD_DATA where set, else "
        "~/.local/share/threefold/DATASET)",
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
        resume = (
            f"continue it with --resume {typed_path(folder)}, "
            if (folder / CHECKPOINT_NAME).is_file()
            else ""  # metrics alone: a run killed before its first checkpoint
        )
        raise UsageError(
            f"--out {folder}: already holds a run; {resume}replace it with --overwrite, or "
            f"choose another folder{_set_aside(folder)}"
        )


def _set_aside(folder: Path) -> str:
    """A note of the runs an --overwrite killed before it finished left aside in `folder`."""
    aside = set_aside_runs(folder)
    if not aside:
        return ""
    return f" ({aside[0]} holds the run that an --overwrite, stopped before it finished, set aside)"


def main(argv: list[str] | None = None) -> int:
    """scripts/train.py: train, print progress and the test accuracy, write the run's files."""
    parser = build_parser(TrainConfig())
    args = parse_once(parser, argv)
    typed = given_flags(parser, argv)

    def body() -> int:
        with stop_on_signals():
            if args.resume is not None:
                return _resume(args, typed)
            return _start(args, typed)

    return run_cli(parser, body)


def _resume(args: argparse.Namespace, typed: set[str]) -> int:
    """Continue the run in --resume DIR, on the data it was trained on, holding its folder."""
    folder = args.resume
    elsewhere = args.out is not None and args.out.resolve() != folder.resolve()
    if elsewhere or args.overwrite:
        flag = "--out" if elsewhere else "--overwrite"
        raise UsageError(f"{flag}: --resume continues the run in its own folder")
    if args.recipe or args.weights_file is not None:
        flag = f"--recipe {args.recipe}" if args.recipe else "--weights"
        raise UsageError(f"{flag}: --resume continues the run as it was configured and trained")
    if folder.name == CHECKPOINT_NAME and folder.is_file():
        raise UsageError(f"--resume {folder}: give the run's folder, {folder.parent}")
    if not (folder / CHECKPOINT_NAME).is_file():
        raise UsageError(
            f"--resume {folder}: no {CHECKPOINT_NAME} there to continue from{_set_aside(folder)}"
        )
    if "arch" in typed:  # compared with the run's by its canonical name
        args.arch = get_arch(args.arch).name
    with hold(folder, "--resume"):
        config, ckpt = resumed_config(args, typed)
        data = _load_data(args, config, ckpt)
        check_same_data(ckpt, data, folder)
        arch = get_arch(config.arch, files=False)
        try:  # settings each in range may still not fit together, or the data
            train_split(config, arch, data)
        except UsageError as e:
            raise CheckpointError(f"{folder / CHECKPOINT_NAME}: meta field config: {e}") from None
        if ckpt.meta["epoch"] >= config.epochs and _finished(folder):
            # Run again, its test and curves would be written anew over the ones it has.
            say(f"{folder}: the run is finished (its test and curves are written); nothing to do")
            return 0
        return _run(config, arch, data, folder, ckpt)


def _finished(folder: Path) -> bool:
    """Whether a run that trained all its epochs also wrote its test and its curves: one
    stopped during them (Ctrl-C, SIGTERM) is finished by --resume."""
    try:
        return "test" in read_json(folder / METRICS_NAME) and (folder / CURVES_NAME).is_file()
    except (OSError, ValueError, TypeError):
        return False


def _start(args: argparse.Namespace, typed: set[str]) -> int:
    """A new run: every flag and the data checked before a folder is made; the folder (--out,
    or a fresh runs/IMPL-ARCH[-N]) held while it trains, and removed if the run fails before
    writing anything into a folder it made."""
    # Parsed once; the run keeps the network's canonical name and never needs a spec file.
    network = import_network(args.arch) if is_model_file(args.arch) else None
    arch = get_arch(args.arch) if network is None else network.arch
    if network is not None and args.weights_file is None:
        # A graph's weights are trained ones, and a module's constructor may load some:
        # a user may take them to be the start.
        add = args.arch if is_onnx_file(args.arch) else "FILE.pt, its state_dict saved,"
        say(
            f"note: --arch {args.arch} gives the layers; training starts from --init "
            f"{args.init}, not from its weights (add --weights {add} for those)"
        )
    if network is not None and network.standardise is not None:
        # The network is trained on this run's pixels; its own scaling is not a layer.
        mean, std = network.standardise
        fed = {"standardised": "the training set's mean and std", "raw": "raw [0, 1] pixels"}
        say(
            f"note: --arch {args.arch} scales its input as (x - {mean:.6g}) / {std:.6g}; "
            f"training feeds it --pixels {args.pixels} ({fed[args.pixels]}) instead"
        )
    for theirs, ours in ({} if network is None else network.copies).items():
        # ONNX cannot tell tied weights from equal ones an exporter merged (docs/EXPORT.md).
        say(
            f"note: --arch {args.arch} feeds {theirs} to {len(ours)} layers; each trains "
            f"its own copy ({', '.join(ours)})"
        )
    source, args.arch = args.arch, arch.name
    initial = None
    if args.weights_file is not None:
        renames, unread = ({}, ()) if network is None else (network.renames, network.unread)
        if unread:
            shown = ", ".join(unread[:3]) + (", ..." if len(unread) > 3 else "")
            say(f"note: --weights passes over {shown}: --arch {source} never calls them")
        initial, args.weights = load_weights(args.weights_file, arch, renames, "--weights", unread)
    config = config_from_args(args, typed)
    check_config(config)
    check_flags_used(config, typed)
    if initial is not None:  # in the run's dtype, as it trains: refused here, naming the file
        try:
            cast_params(initial, arch, config.dtype)
        except UsageError as error:
            raise UsageError(f"--weights {args.weights_file}: {error}") from None
    folder = args.out
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out {folder}: is a file, not a folder")
        if folder.is_dir():
            refuse_odd_run_files(folder)
            if not args.overwrite:
                _refuse_a_run_in(folder)
    data = _load_data(args, config, None)
    train_split(config, arch, data)  # --limit and --batch-size fit the data
    if folder is None:
        base = Path("runs") / f"{config.impl}-{arch.label}"
        made = missing_folders(base.parent)
        folder = fresh_run_dir(base)
        made.insert(0, folder)
    else:
        made = missing_folders(folder)
        prepare_out_dir(folder)
    try:
        with hold(folder):
            if not args.overwrite:
                _refuse_a_run_in(folder)  # again: a run may have finished meanwhile
            with replacing_run(folder) if args.overwrite else contextlib.nullcontext():
                return _run(config, arch, data, folder, None, initial)
    except BaseException:
        remove_if_empty(made)  # folders this run made and left empty go with it
        raise


def _load_data(args: argparse.Namespace, config: TrainConfig, ckpt: Checkpoint | None) -> Dataset:
    """The data of the run: from --data-dir, else (resuming) where the run found it, else the
    usual lookup; fetched first with --download."""
    if args.download_url is not None and not args.download:
        raise UsageError("--download-url: without --download nothing is fetched")
    data_dir = args.data_dir
    if data_dir is None and ckpt is not None and Path(ckpt.meta["data"]["folder"]).is_dir():
        data_dir = ckpt.meta["data"]["folder"]
    if args.download:
        from shared.download import download_dataset

        spec = get_dataset_spec(config.dataset)
        data_dir = download_dataset(spec, data_dir, args.download_url)
        say(f"{spec.name}: the official files, verified, in {data_dir}")
    return load_dataset(data_dir, config.dataset, config.pixels, config.validation)


def _run(
    config: TrainConfig,
    arch: Arch,
    data: Dataset,
    folder: Path,
    ckpt: Checkpoint | None,
    initial: Params | None = None,
) -> int:
    limited = "" if config.limit is None else f" (--limit; of {len(data.train)})"
    say(
        f"{config.impl} | {config.arch} | {config.limit or len(data.train)} train"
        f"{limited}, {len(data.val)} validation, {len(data.test)} test images from "
        f"{data.source} ({config.pixels} pixels) | writing to {folder}"
    )
    if ckpt is not None:
        print(f"resuming after epoch {ckpt.meta['epoch']} of {config.epochs}")
    flag = "--out" if ckpt is None else "--resume"
    for name in RUN_FILES:  # not found after the training
        check_out_file(folder / name, flag)
    record = train(config, data, folder, resume=ckpt, arch=arch, initial=initial)
    loss, accuracy = record["test"]["loss"], 100 * record["test"]["acc"]
    try:  # a stop while the output is blocked (a pager, Ctrl-S) finds the run whole
        print(f"{config.impl} | Test Loss: {loss:7.4f} | Test Acc: {accuracy:7.4f}")
        say(f"wrote {folder / CHECKPOINT_NAME}, {folder / METRICS_NAME}, {folder / CURVES_NAME}")
        act_on_signals()
    except KeyboardInterrupt as stop:
        raise stopped_when_whole(stop, record, folder) from None
    return 0
