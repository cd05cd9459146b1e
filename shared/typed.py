"""What the user typed on a command line, beyond the values argparse keeps: which options were
given at all, and none given twice where argparse would keep the last without a word; and
paths, each checked as a path the file system can take."""

from __future__ import annotations

import argparse
import copy
import os
import shlex
from pathlib import Path

# Options meant to be given more than once (--impl, --arch in crosscheck.py), or that end the
# parse (--help).
_REPEATABLE = (argparse._AppendAction, argparse._CountAction, argparse._HelpAction)


def parse_once(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed by `parser`, where a setting given twice (`--recipe fast --recipe deep`,
    `--plain --recipe deep`, `--flip --no-flip`) is refused as argparse refuses a bad value:
    it would keep the last and train what the user may not have meant."""
    probe, given = copy.deepcopy(parser), {}
    for action in probe._actions:
        if action.option_strings and not isinstance(action, _REPEATABLE):
            action.__class__ = _recorded(type(action), given)
    args = probe.parse_args(argv)
    for flags in given.values():
        if len(flags) > 1:
            named = sorted(set(flags))
            if len(named) == 1:
                times = "twice" if len(flags) == 2 else f"{len(flags)} times"
                parser.error(f"{named[0]} given {times}; give it once")
            parser.error(f"{' and '.join(named)} set the same setting; give one")
    return args


def _recorded(kind: type, given: dict[str, list[str]]) -> type:
    """`kind` of action, noting in `given` (dest -> options typed) each time it is used."""

    class Recorded(kind):
        def __call__(self, parser, namespace, values, option_string=None):
            given.setdefault(self.dest, []).append(option_string)
            super().__call__(parser, namespace, values, option_string)

    return Recorded


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options the user typed in `argv` (whatever their values), as
    opposed to those left at their defaults: parsed again with every default suppressed."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


NAME_MAX = 255  # bytes in one name of a path: Linux's file systems' limit


def path_type(text: str) -> Path:
    """An argparse type for a file or folder: an empty one would be the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    # Python 3.11's Path.exists() raises on such a name, where a command would ask.
    longest = max((len(os.fsencode(part)) for part in Path(text).parts), default=0)
    if longest > NAME_MAX:
        raise argparse.ArgumentTypeError(
            f"one of its names is {longest} bytes long, past the {NAME_MAX} a file system allows"
        )
    return Path(text)


def typed_path(path: Path) -> str:
    """`path` as a user would type it after a flag: quoted for the shell as needed, and a
    path that starts with '-' (which argparse would take for a flag) written from `./`."""
    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def shown_default(value: bool | float | int | str) -> str:
    """A flag's default as --help says it: on or off, a float in its shortest form."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)
