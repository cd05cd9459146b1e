"""What every command's front end shares: flag types, the training flags, output-folder
preparation and the wrapper that turns the project's errors into one line and an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from shared.backend import IMPLEMENTATIONS
from shared.config import DTYPES, SCHEDULES, TrainConfig
from shared.data import DATASETS
from shared.errors import Interrupted, ThreefoldError, UsageError
from shared.spec import ARCHS, INITS


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
    """The TrainConfig of the training flags parsed into `args`."""
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
