"""What every command's front end shares: flag types, the training flags, and the wrapper
that turns the project's errors into one line and an exit status."""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
from collections.abc import Callable

from shared.config import (
    ADAM_RATE,
    FIELDS,
    IMPLEMENTATIONS,
    RECIPES,
    SHORT_RUN_STEPS,
    Bound,
    TrainConfig,
)
from shared.data import DATA_DIR_ENV, FASHION_MNIST
from shared.errors import (
    Interrupted,
    ThreefoldError,
    UsageError,
    error_line,
    interrupted,
    one_line,
    stop_on_signals,
)
from shared.spec import presets
from shared.typed import path_type, shown_default


def flag(bound: Bound) -> Callable[[str], object]:
    """An argparse type for a setting of `bound`: NaN, infinities and values out of range are
    refused in the same words as a checkpoint's stored value (shared.config.Bound)."""

    def parse(text: str) -> object:
        try:
            return bound.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def number(
    kind: type, minimum: float, inclusive: bool = True, below: float = math.inf
) -> Callable[[str], object]:
    """An argparse type: a finite `kind` at least (or above) `minimum` and below `below`."""
    return flag(Bound(kind, minimum, inclusive, below))


positive_int = number(int, 0, inclusive=False)
positive_float = number(float, 0.0, inclusive=False)
seed_type = flag(FIELDS["seed"])


def add_impl_flag(parser: argparse.ArgumentParser, verb: str) -> None:
    """--impl, repeatable: the implementations a command `verb`s (default: all three)."""
    parser.add_argument(
        "--impl",
        action="append",
        choices=IMPLEMENTATIONS,
        help=f"implementation to {verb} (repeatable; default: all three)",
    )


def chosen_impls(args: argparse.Namespace) -> tuple[str, ...]:
    """The implementations --impl named, each once, in the order typed (default: all)."""
    return tuple(dict.fromkeys(args.impl or IMPLEMENTATIONS))


def _help(d: TrainConfig) -> dict[str, str]:
    """Each training flag's help, in the order --help lists them (`d`: the defaults)."""
    warmup = (
        "epochs of linear learning-rate warm-up, at most half of --epochs (0: off; default: 1 "
        f"epoch, or half the run if shorter, and a run of fewer than {SHORT_RUN_STEPS} steps "
        f"peaks at --lr x steps / {SHORT_RUN_STEPS})"
    )
    return {
        "impl": "implementation to train",
        "init": "weight initialisation: he (Kaiming normal), lab (randn*0.01), torch (PyTorch's "
        "default uniform), xavier-uniform, xavier-normal (Glorot's)",
        "epochs": f"passes over the training images, 1 to {FIELDS['epochs'].below - 1}",
        "batch_size": "images per step, at most the number of training images",
        "optimizer": "sgd (--momentum, --nesterov), adam or adamw (--beta1, --beta2, --eps; "
        "AdamW's decay decoupled), each as torch.optim computes it",
        "lr": f"peak learning rate (> 0; default {d.lr:g}, with Adam {ADAM_RATE:g})",
        "momentum": "in [0, 1)",
        "nesterov": "Nesterov momentum (PyTorch's formulation)",
        "beta1": "Adam's first-moment decay, in [0, 1)",
        "beta2": "Adam's second-moment decay, in [0, 1)",
        "eps": "Adam's epsilon (> 0), added outside the square root",
        "weight_decay": ">= 0 (L2 for sgd and adam; decoupled for adamw)",
        "schedule": "learning-rate schedule after the warm-up",
        "warmup": warmup,
        "label_smoothing": "in [0, 1)",
        "flip": "augment: flip training images horizontally, probability 1/2",
        "tta": "evaluate on each image and its mirror image, averaging the logits (default: "
        "when training with --flip)",
        "shift": "augment: translate training images by up to N pixels, N < "
        f"{FIELDS['shift'].below:g} (0: off)",
        "erase": "augment: erase a rectangle of each training image with probability P in "
        "[0, 1) (0: off), drawn as torchvision's RandomErasing draws it (2-33%% of the image, "
        "aspect ratio 0.3-3.3), to 0 (the mean of standardised pixels)",
        "seed": "seeds the initial weights and the batch order (0 to 2**63 - 1)",
        "limit": "train on the first N training images only",
        "dtype": "the precision every tensor is computed in",
        "pixels": "the network's input: standardised by the training set's mean and deviation, "
        "or raw [0, 1] pixels (recorded; the exported module takes raw pixels either way)",
        "validation": "hold out the last sixth of the training images to validate on "
        "(--no-validation: train on all of them)",
        "dataset": "mnist reads the original digits from --data-dir",
    }


def add_training_flags(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The flags that make a TrainConfig, each checked by its field's bound
    (shared.config.FIELDS); shared by every script that trains."""
    parser.add_argument(
        "--arch",
        default=defaults.arch,
        metavar="NETWORK",
        help="a preset ("
        # argparse formats help with %, so a description's own % is doubled.
        + "; ".join(f"{a.name}: {a.description}".replace("%", "%%") for a in presets().values())
        + "), a spec such as conv16-bn-relu-maxpool2-flatten-fc10, a .json/.toml file "
        "(grammar below), a PyTorch model FILE.py:NAME (the file is executed) or an ONNX "
        f"graph FILE.onnx (default: {defaults.arch})",
    )
    for field, help in _help(defaults).items():
        bound, default = FIELDS[field], getattr(defaults, field)
        if bound.kind is bool:
            checked = {"action": argparse.BooleanOptionalAction}
        else:
            checked = {"choices": bound.choices} if bound.choices else {"type": flag(bound)}
        if default is not None and not re.search(r"[(;] ?default", help):  # what runs untyped
            help += f" (default: {shown_default(default)})"
        parser.add_argument(f"--{field.replace('_', '-')}", default=default, help=help, **checked)
    add_data_dir_flag(parser)


def add_data_dir_flag(parser: argparse.ArgumentParser, why: str = "", test: bool = False) -> None:
    """The --data-dir flag every command that reads the data takes (`why`: what for; `test`:
    the test set's files alone)."""
    files = "the test set's IDX files (t10k-*)" if test else "the four IDX files"
    where = f"${DATA_DIR_ENV} where set, else {FASHION_MNIST.default_dir}, then "
    where += str(FASHION_MNIST.user_dir)
    help = f"folder with {files}{why} (default: {where}, where train.py --download puts them)"
    parser.add_argument("--data-dir", type=path_type, default=None, help=help)


def config_from_args(args: argparse.Namespace, typed: set[str]) -> TrainConfig:
    """The TrainConfig of the training flags parsed into `args`; `typed` names the flags the
    user gave, which win over --recipe's settings and Adam's default rate."""
    fields = TrainConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    if getattr(args, "recipe", None):
        values |= {k: v for k, v in RECIPES[args.recipe].items() if k not in typed}
    if values["optimizer"] != "sgd" and "lr" not in typed:
        values["lr"] = ADAM_RATE
    return TrainConfig(**values)


def run_cli(parser: argparse.ArgumentParser, body: Callable[[], int]) -> int:
    """Run `body`, turning the project's errors into one line and an exit status, never a
    traceback: 2 for usage errors, 1 for bad data or a failed run, 130 for Ctrl-C (143 for
    SIGTERM, and for a stop a library's callback dropped: stop_on_signals)."""
    try:
        with stop_on_signals():
            return body()
    except UsageError as e:  # the value at fault named alone: argparse's usage would bury it
        return error_line(parser.prog, str(e), 2)
    except Interrupted as e:
        print(f"\n{parser.prog}: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except ThreefoldError as e:
        return error_line(parser.prog, str(e), 1)
    except KeyboardInterrupt as stop:  # before a run had anything to keep
        stopped = interrupted(stop)
        print(f"\n{parser.prog}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except BrokenPipeError:
        # The reader went away (`| head`): as Python's docs advise, what is left to flush goes
        # nowhere, quietly. 141: the shell's for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a path's, which Python 3.11's Path.exists() raises unless missing
        named = e.filename2 or e.filename  # os.replace's target is the second
        if named is None or e.errno == errno.ENOENT:
            raise  # a missing file the code assumed there: a bug's traceback
        if e.errno == errno.ENAMETOOLONG:
            too_long = f"{named}: a name in it is longer than the file system allows"
            return error_line(parser.prog, too_long, 2)
        return error_line(parser.prog, f"{named}: {e.strerror or e}", 1)
