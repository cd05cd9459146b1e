"""The project's own errors: each carries a one-line message for the user, never a traceback."""

import contextlib
import os
import re
import signal
import sys
import threading
import unicodedata
from collections.abc import Iterator
from typing import NoReturn, TextIO


class ThreefoldError(Exception):
    """Base class: a problem the user can fix, described in one line."""


# What a user's own code (a model file run, its module built, its forward traced or run) may
# raise, each an error of theirs in one line: an exit() in it would otherwise end the command
# with its status, 0 too, and nothing said. Ctrl-C is not among them.
USER_CODE_ERRORS = (Exception, SystemExit)


# A command's error is one line however long its names are (a node's in a hostile ONNX file).
MESSAGE_CHARACTERS = 1000


def escaped(text: str) -> str:
    """`text` as a terminal shows it: control characters (line breaks, colour codes) and the
    marks that reorder text escaped (names read from a file may hold any)."""
    return "".join(repr(c)[1:-1] if _hidden(c) else c for c in text)


def one_line(message: str) -> str:
    """`message` escaped, at most MESSAGE_CHARACTERS long, its start and its end (where the
    advice is) kept."""
    shown = escaped(message)
    if len(shown) <= MESSAGE_CHARACTERS:
        return shown
    cut = f" ... ({len(shown):,} characters in all) ... "
    head = (MESSAGE_CHARACTERS - len(cut)) * 3 // 5
    return shown[:head] + cut + shown[-(MESSAGE_CHARACTERS - len(cut) - head) :]


# Bidirectional controls: text after them shows in another order than it is.
_BIDI_CONTROLS = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def say(line: str, file: TextIO | None = None) -> None:
    """Print `line` escaped, whole, to `file` (stdout by default): the paths and names a
    command reports back come from the user or from files and may hold line breaks or colour
    codes, and the user needs every path of a "wrote" line."""
    print(escaped(line), file=file, flush=True)


def error_line(prog: str, message: str, status: int) -> int:
    """Print `prog: error: message` on stderr as one line -> `status`, the exit status to
    return."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return status


def _hidden(c: str) -> bool:
    """Whether a terminal would act on `c` rather than show it (a CJK or joiner stays)."""
    return unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI_CONTROLS


def first_line(error: BaseException) -> str:
    """The error's type and first line (200 characters at most, without a terminal's colour
    codes, which torch.load's messages hold): a user's error in one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


class DataError(ThreefoldError):
    """A data file is missing, corrupt, truncated or inconsistent."""


class CheckpointError(ThreefoldError):
    """A checkpoint is unreadable or does not fit the architecture."""


class OutputError(ThreefoldError):
    """The machine refused a write (disk full, a read-only folder, no permission); nothing was
    half-written, and what was there before is intact."""


class UsageError(ThreefoldError):
    """A flag or argument has a value that cannot work."""


class Interrupted(ThreefoldError):
    """The user stopped a run (Ctrl-C, SIGTERM); the message says what was kept. The exit
    status is the shell's for that signal: 128 + its number (130 for Ctrl-C)."""

    def __init__(self, message: str, signal_number: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class Terminated(KeyboardInterrupt):
    """SIGTERM, which a command takes like Ctrl-C (stop_on_signals): a run
    stops, keeps its last epoch and says how to continue; a benchmark keeps what it measured."""


# Ctrl-C and SIGTERM received within stop_on_signals whose exception has not yet left it.
_PENDING: list[int] = []
_depth = 0  # how many stop_on_signals blocks are running, one inside the other


def _stop(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM stop a run alike (keeping its last epoch).

    Each signal is noted as well as raised, for two thieves of the handler's exception: a
    library's blocking call (Ray's) may turn it into a plain KeyboardInterrupt, which still
    leaves as Terminated; and an exception raised while Python runs a garbage-collector
    callback (JAX's, during a compile) is dropped, and Python prints its traceback.
    act_on_signals raises a dropped one between steps, and the block raises it on leaving, so
    the command never ends as if nothing had been asked; its traceback is not printed."""

    def note(signum: int, frame: object) -> None:
        _PENDING.append(signum)
        raise _stop(signum)

    def unraisable(info: "sys.UnraisableHookArgs") -> None:
        # A stop that `note` raised and a callback dropped is raised again between steps;
        # Python's traceback of it would only alarm.
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _PENDING):
            hook(info)

    global _depth
    outermost = _depth == 0  # a nested block leaves the stops the outer one noted
    if outermost:
        _PENDING.clear()
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    # Ctrl-C only where Python's own handler takes it: not where it is ignored, as in a
    # background job or under nohup, nor where another handler owns it.
    taken = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        taken.append(signal.SIGINT)
    previous = {s: signal.signal(s, note) for s in taken}
    _depth += 1
    try:
        yield
        act_on_signals()
    except KeyboardInterrupt as stop:
        if signal.SIGTERM in _PENDING and not isinstance(stop, Terminated):
            raise Terminated from None
        raise
    finally:
        _depth -= 1
        if outermost:
            _PENDING.clear()
        sys.unraisablehook = hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def exit_not_swallowed() -> Iterator[None]:
    """Within the block, a SystemExit that Python reports as ignored is raised again when the
    block ends, unprinted: Ray's SIGTERM handler, set in ray.init, exits from wherever the
    signal lands, and in a finaliser or logging's lock release the exit was lost (a grid
    stopped while its cluster started trained on and exited 0)."""
    lost: list[SystemExit] = []
    hook = sys.unraisablehook

    def unraisable(info: "sys.UnraisableHookArgs") -> None:
        if isinstance(info.exc_value, SystemExit):
            lost.append(info.exc_value)
        else:
            hook(info)

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        sys.unraisablehook = hook
    if lost:
        raise lost[0]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then act on them: files written together
    (an epoch's checkpoint and metrics.json, an evaluation's report) tell the same story.
    (Python runs signal handlers in the main thread only; elsewhere the block runs
    unguarded.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    # Not one the process ignores (SIGINT under nohup or in a background job): held, it
    # would be raised.
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        raise Terminated if caught[0] == signal.SIGTERM else KeyboardInterrupt


def act_on_signals() -> None:
    """Raise the Ctrl-C or SIGTERM that stop_on_signals noted, if any: the call costs a
    list's test, for loops to make between steps."""
    if _PENDING:
        raise _stop(_PENDING[0])


def interrupted(stop: KeyboardInterrupt | Interrupted, what: str = "") -> Interrupted:
    """The one-line error for Ctrl-C or SIGTERM (`stop`, or the Interrupted already made of
    it), followed by what was kept (`what`, where there is news of it)."""
    sigterm = 128 + signal.SIGTERM
    if isinstance(stop, Terminated) or getattr(stop, "exit_code", None) == sigterm:
        return Interrupted(" ".join(filter(None, ("terminated (SIGTERM)", what))), signal.SIGTERM)
    return Interrupted(" ".join(filter(None, ("interrupted", what))), signal.SIGINT)


class GridFailed(ThreefoldError):
    """Runs of a grid failed; the others finished and are kept, and the message names each
    failed run and what stopped it."""


def exit_process(code: int) -> NoReturn:
    """A script's exit with `code`. A stopped one (130, 143) leaves at once, without
    Python's clean-up, where JAX is loaded: a stop during a compile leaves XLA compiling on
    its own threads, and the interpreter's clean-up crashed under them (a segfault, exit 139,
    in 5 stops of 10 at start-up); what the command keeps is on disk by now."""
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and "jax" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@contextlib.contextmanager
def stopped_in_one_line() -> Iterator[None]:
    """Around a script's start: Ctrl-C before the command's own handling is in place (during
    its imports, a second at most) ends it as a stop does later, in one line with status 130,
    not in a traceback."""
    try:
        yield
    except KeyboardInterrupt as stop:
        stopped = interrupted(stop)
        print(f"\n{os.path.basename(sys.argv[0])}: {stopped}", file=sys.stderr)
        exit_process(stopped.exit_code)
