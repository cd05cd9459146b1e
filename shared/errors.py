"""The project's own errors: each carries a one-line message for the user, never a traceback."""

import contextlib
import signal
from collections.abc import Iterator


class ThreefoldError(Exception):
    """Base class: a problem the user can fix, described in one line."""


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
    """SIGTERM, which a command takes like Ctrl-C (terminate_on_sigterm): a run
    stops, keeps its last epoch and says how to continue; a benchmark keeps what it measured."""


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM stops a run as Ctrl-C does (keeping its last epoch). The
    signal is noted as well as raised: a library's blocking call (Ray's) may turn the
    handler's exception into a plain KeyboardInterrupt, which still leaves as Terminated."""
    received: list[int] = []

    def terminate(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt as stop:
        if received and not isinstance(stop, Terminated):
            raise Terminated from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


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
