"""What every command's front end shares: flag types, the training flags, the flags a user
typed, and the wrapper that turns the project's errors into one line and an exit status."""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable

from shared.backend import IMPLEMENTATIONS
from shared.config import DTYPES, MIN_WARMUP_STEPS, SCHEDULES, TrainConfig
from shared.data import DATASETS
from shared.errors import Interrupted, ThreefoldError, UsageError
from shared.spec import INITS, INPUT_SHAPE, presets


def number(
    kind: type, minimum: float, inclusive: bool = True, below: float = math.inf
) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` at least (or above) `minimum` and below
    `below`; NaN and infinities are refused like any other value out of range."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        low_ok = value > minimum or (inclusive and value == minimum)
        if not (math.isfinite(value) and low_ok and value < below):
            low = f"{'>=' if inclusive else '>'} {minimum}"
            bound = low if below == math.inf else f"{low} and < {below}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {bound})")
        return value

    return parse


positive_int = number(int, 0, inclusive=False)
positive_float = number(float, 0.0, inclusive=False)
non_negative_float = number(float, 0.0)
non_negative_int = number(int, 0)
fraction = number(float, 0.0, below=1.0)
# Seeds feed NumPy's generators, which take any non-negative integer; 2**63 keeps them storable.
seed_type = number(int, 0, below=2**63)


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


def add_training_flags(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The flags that make a TrainConfig; shared by every script that trains."""
    d = defaults
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default=d.impl)
    parser.add_argument(
        "--arch",
        default=d.arch,
        metavar="NETWORK",
        help="a preset ("
        + "; ".join(f"{a.name}: {a.description}" for a in presets().values())
        + "), a spec such as conv16-bn-relu-maxpool2-flatten-fc10, or a .json/.toml file "
        "(grammar below)",
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        default=d.init,
        help="weight initialisation: he (Kaiming normal), lab (randn*0.01), "
        "torch (PyTorch's default uniform)",
    )
    parser.add_argument("--epochs", type=positive_int, default=d.epochs, help=">= 1")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help="images per step, at most the number of training images",
    )
    parser.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (> 0)")
    parser.add_argument("--momentum", type=fraction, default=d.momentum, help="in [0, 1)")
    parser.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=d.nesterov,
        help="Nesterov momentum (PyTorch's formulation)",
    )
    parser.add_argument(
        "--weight-decay", type=non_negative_float, default=d.weight_decay, help=">= 0"
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="learning-rate schedule over the steps after the warm-up",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_float,
        default=d.warmup,
        help="epochs of linear learning-rate warm-up, at most half of --epochs (0: off; default: "
        "1 epoch, or half the run if shorter); never fewer than "
        f"{MIN_WARMUP_STEPS} steps, so a run shorter than that ends on the rise",
    )
    parser.add_argument(
        "--label-smoothing", type=fraction, default=d.label_smoothing, help="in [0, 1)"
    )
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
        type=number(int, 0, below=INPUT_SHAPE[-1]),
        default=d.shift,
        help="augment: translate training images by up to N pixels, "
        f"N < {INPUT_SHAPE[-1]} (0: off)",
    )
    parser.add_argument(
        "--seed",
        type=seed_type,
        default=d.seed,
        help="seeds the initial weights and the batch order (0 to 2**63 - 1)",
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="train on the first N training images only (N at most their number)",
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
