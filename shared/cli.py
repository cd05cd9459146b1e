"""What every command's front end shares: flag types, the training flags, the flags a user
typed, and the wrapper that turns the project's errors into one line and an exit status."""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable

from shared.config import FIELDS, IMPLEMENTATIONS, SHORT_RUN_STEPS, Bound, TrainConfig
from shared.errors import Interrupted, ThreefoldError, UsageError
from shared.spec import presets


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
    """An argparse type: a finite number of `kind` at least (or above) `minimum` and below
    `below`."""
    return flag(Bound(kind, minimum, inclusive, below))


positive_int = number(int, 0, inclusive=False)
positive_float = number(float, 0.0, inclusive=False)
seed_type = flag(FIELDS["seed"])


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options the user typed in `argv` (whatever their values), as
    opposed to those left at their defaults: parsed again with every default suppressed."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def add_impl_flag(parser: argparse.ArgumentParser, verb: str) -> None:
    """--impl, repeatable: the implementations a command `verb`s (default: all three)."""
    parser.add_argument(
        "--impl",
        action="append",
        choices=IMPLEMENTATIONS,
        help=f"implementation to {verb} (repeatable; default: all three)",
    )


def _setting(parser: argparse.ArgumentParser, field: str, default: object, help: str) -> None:
    """--FIELD for a TrainConfig field, checked by its bound (shared.config.FIELDS)."""
    bound = FIELDS[field]
    checked = {"choices": bound.choices} if bound.choices else {"type": flag(bound)}
    parser.add_argument(f"--{field.replace('_', '-')}", default=default, help=help, **checked)


def _switch(parser: argparse.ArgumentParser, field: str, default: object, help: str) -> None:
    """--FIELD / --no-FIELD for a TrainConfig bool."""
    action = argparse.BooleanOptionalAction
    parser.add_argument(f"--{field.replace('_', '-')}", action=action, default=default, help=help)


def add_training_flags(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The flags that make a TrainConfig; shared by every script that trains."""
    d = defaults
    _setting(parser, "impl", d.impl, "implementation to train")
    parser.add_argument(
        "--arch",
        default=d.arch,
        metavar="NETWORK",
        help="a preset ("
        + "; ".join(f"{a.name}: {a.description}" for a in presets().values())
        + "), a spec such as conv16-bn-relu-maxpool2-flatten-fc10, or a .json/.toml file "
        "(grammar below)",
    )
    _setting(
        parser,
        "init",
        d.init,
        "weight initialisation: he (Kaiming normal), lab (randn*0.01), "
        "torch (PyTorch's default uniform)",
    )
    _setting(parser, "epochs", d.epochs, ">= 1")
    _setting(
        parser, "batch_size", d.batch_size, "images per step, at most the number of training images"
    )
    _setting(parser, "lr", d.lr, "peak learning rate (> 0)")
    _setting(parser, "momentum", d.momentum, "in [0, 1)")
    _switch(parser, "nesterov", d.nesterov, "Nesterov momentum (PyTorch's formulation)")
    _setting(parser, "weight_decay", d.weight_decay, ">= 0")
    _setting(parser, "schedule", d.schedule, "learning-rate schedule after the warm-up")
    _setting(
        parser,
        "warmup",
        d.warmup,
        "epochs of linear learning-rate warm-up, at most half of --epochs (0: off; default: "
        "1 epoch, or half the run if shorter, and a run of fewer than "
        f"{SHORT_RUN_STEPS} steps peaks at --lr x steps / {SHORT_RUN_STEPS})",
    )
    _setting(parser, "label_smoothing", d.label_smoothing, "in [0, 1)")
    _switch(parser, "flip", d.flip, "augment: flip training images horizontally, probability 1/2")
    _switch(
        parser,
        "tta",
        d.tta,
        "evaluate on each image and its mirror image, averaging the logits "
        "(default: when training with --flip)",
    )
    _setting(
        parser,
        "shift",
        d.shift,
        f"augment: translate training images by up to N pixels, N < {FIELDS['shift'].below:g} "
        "(0: off)",
    )
    _setting(
        parser, "seed", d.seed, "seeds the initial weights and the batch order (0 to 2**63 - 1)"
    )
    _setting(parser, "limit", d.limit, "train on the first N training images only")
    _setting(parser, "dtype", d.dtype, "the precision every tensor is computed in")
    _setting(parser, "dataset", d.dataset, "mnist reads the original digits from --data-dir")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four IDX files (default: $THREEFOLD_DATA, "
        "then /usr/share/datasets/fashion-mnist)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the training flags parsed into `args`."""
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run_cli(parser: argparse.ArgumentParser, body: Callable[[], int]) -> int:
    """Run `body`, turning the project's errors into one line and an exit status, never a
    traceback: 2 for usage errors, 1 for bad data or a failed run, 130 for Ctrl-C (143 for
    SIGTERM)."""
    try:
        return body()
    except UsageError as e:
        parser.error(str(e))
    except Interrupted as e:
        print(f"\n{parser.prog}: {e}", file=sys.stderr)
        return e.exit_code
    except ThreefoldError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130
