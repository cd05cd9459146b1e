"""Writing files so that a crash or Ctrl-C never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from shared.errors import OutputError, UsageError


def a_path(value: object, where: str) -> Path:
    """`value` as a Path, or a UsageError naming `where`: the API's callers may pass anything
    (None, a number, bytes, "", a name holding a NUL byte)."""
    text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if not isinstance(text, str) or not text or "\0" in text:
        shown = repr(value)  # a module's repr runs over lines: its type instead
        shown = shown if len(shown) <= 80 and "\n" not in shown else f"a {type(value).__name__}"
        raise UsageError(f"{where}: {shown} is not a file's path")
    return Path(text)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place.

    Readers see either the old file or the complete new one, never a partial write. Where
    the machine refuses (disk full, a read-only folder, no permission), an OutputError names
    `path`, and the old file, if any, is left as it was.
    """
    path = Path(path)
    _refuse_special(path)
    try:
        _write_and_replace(path, write)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or e}); nothing written") from None


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


# Whose pids a temporary's pid is: this host's and pid namespace's. A writer on another
# machine sharing the folder (NFS), or in another container, has pids that mean nothing
# here: its temporaries, in progress, were taken for a dead writer's and deleted.
WRITER_HOST = hashlib.sha256(f"{socket.gethostname()} {_pid_namespace()}".encode()).hexdigest()[:8]

# What a temporary's name adds to its file's: ".NAME.HOST.PID.XXXXXXXX.tmp", a pid of 7 digits.
TEMPORARY_NAME_EXTRA = len("..abcd1234.1234567.abcdefgh.tmp")


def temporary_prefix(name: str, pid: int) -> str:
    """The start of the hidden name under which process `pid` of this host writes `name`."""
    return f".{name}.{WRITER_HOST}.{pid}."


# The writer in a temporary's name: its host and pid, or (a name of an older version's) its
# pid; then mkstemp's 8 characters, and no name of a user's that differs.
WRITER_PATTERN = r"\.(?:([0-9a-f]{8})\.)?(\d+)\.[a-z0-9_]{8}"
# A writer elsewhere (another machine, another container: a container per command has a pid
# namespace of its own) is taken for dead once its temporary is this old, far longer than a
# write takes: its pid means nothing here, and its leftovers piled up.
ELSEWHERE_DEAD_AFTER_SECONDS = 3600


def writers(match: re.Match) -> list[tuple[str | None, int]]:
    """(host, pid) of each writer a match of WRITER_PATTERN's groups names."""
    groups = match.groups()
    return [(groups[i], int(groups[i + 1])) for i in range(0, len(groups), 2) if groups[i + 1]]


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new hidden file in `path`'s folder, (its descriptor, its name), named
    `.NAME.HOST.PID.*.tmp`: the host and pid tell a later clean-up (remove_stale_temporaries)
    whether the writer may still be alive. Those a killed writer of `path` left go first: a
    killed export.py left a copy of its graph that no later command removed."""
    prefix = temporary_prefix(path.name, os.getpid())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    with contextlib.suppress(OSError):  # a folder that cannot be listed: nothing to clean
        # Ages by the clock that stamped this file: an NFS server's may be hours from ours.
        remove_stale_temporaries(path.parent, (path.name,), os.fstat(fd).st_mtime)
    return fd, tmp


def _write_and_replace(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    fd, tmp = _temporary_beside(path)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    """Remove a hidden temporary left by a write that failed or moved it. A folder that
    refuses (made read-only meanwhile) keeps it, and the write's own error is the one said."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A hidden name beside `path` to write it under, moved to `path` when the block ends
    without an error and removed otherwise: a file written with others replaces its older
    version only once all of them are written. Where the folder refuses, an OutputError."""
    path = Path(path)
    _refuse_special(path)  # before the block writes the others
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; nothing written")
    try:
        fd, tmp = _temporary_beside(path)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or e}); nothing written") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except (OutputError, UsageError) as e:  # one naming the hidden name: the user knows `path`
        raise type(e)(str(e).replace(tmp, str(path))) from None
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        _discard(tmp)


def _refuse_special(path: Path) -> None:
    """An OutputError where `path` is a FIFO, a device or a socket (a rename would put a
    plain file in its place), or cannot be a file at all."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:  # a parent that is a file, a name too long: no write gets through
        raise OutputError(f"{path}: cannot write it ({e.strerror or e}); nothing written") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{path}: not a regular file; nothing written")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Atomically write `text`, UTF-8."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented, strict JSON (NaN and infinities are refused: they
    are not JSON, and no result of the project may be one), of at most JSON_MOST_BYTES: no
    file the project writes is one it refuses to read."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if len(text) > JSON_MOST_BYTES:
        raise OutputError(f"{path}: {len(text):,} bytes of JSON, more than {JSON_MOST_BYTES:,}")
    write_text(path, text)


# The most a JSON file the project writes may hold: a grid's store takes about 1 kB a run,
# so 32,000 runs. Parsed, a file of empty objects takes 23 bytes of memory a byte (740 MB):
# at 256 MiB, as before, a hostile metrics.json or store took 7 GB.
JSON_MOST_BYTES = 32 << 20


def read_json(path: Path) -> Any:
    """A JSON file the project wrote, read as strictly: NaN and infinities, which Python's
    json would accept, are refused with a ValueError, as they would be when written, and so is
    a file of more than JSON_MOST_BYTES; a folder, a FIFO or a device under its name (which
    would wait for a writer, or never end) is an OSError, as a file that cannot be read."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not a number JSON holds")

    with _opened_regular(path) as file:
        text = file.read(JSON_MOST_BYTES + 1)
    if len(text) > JSON_MOST_BYTES:
        raise ValueError(f"more than {JSON_MOST_BYTES:,} bytes, more than threefold writes")
    return json.loads(text.decode(), parse_constant=refuse)


def once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (json keeps the last of two): an
    object_pairs_hook."""
    kept = dict(pairs)
    if len(kept) < len(pairs):  # in one pass: a 1 MiB header holds 100,000 keys
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{key!r} given twice")
            seen.add(key)
    return kept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or no such pid at all
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(
    folder: Path, names: tuple[str, ...], now: float | None = None
) -> None:
    """Delete what `atomic_write` leaves when its process is killed mid-write: hidden
    `.NAME.HOST.PID.*.tmp` files for each of `names` (the files a command writes in
    `folder`), and the temporaries written under those (`staged`'s), which never look like
    data but should not pile up. Files of a process still alive are another writer's, in
    progress, and stay; so do another user's (which a shared folder would not let us delete)
    and files named otherwise; another host's or container's, or an older version's, go once
    ELSEWHERE_DEAD_AFTER_SECONDS old by `now` (the folder's clock: a file just made there),
    and stay without it. A file that cannot be deleted stays: the clean-up never fails a
    write."""
    name = f"(?:{'|'.join(map(re.escape, names))})"
    temporary = rf"{WRITER_PATTERN}\.tmp"
    # .NAME.HOST.PID.x.tmp, or its own temporary ..NAME.HOST.PID.x.tmp.HOST.PID.y.tmp
    ours = re.compile(rf"\.{name}{temporary}|\.\.{name}{temporary}{temporary}")
    remove_left_by_the_dead(folder, ".*.tmp", ours, Path.unlink, now)


def remove_left_by_the_dead(
    folder: Path, glob: str, pattern: re.Pattern, remove: Callable[[Path], Any], now: float | None
) -> None:
    """remove() each entry of `folder` matching `glob`, whose name `pattern` (of
    WRITER_PATTERN's groups) matches, left by dead writers (left_by_the_dead; a name that
    gives no writer, an older version's, is judged by its age alone). One that cannot be
    removed stays."""
    for leftover in Path(folder).glob(glob):
        match = pattern.fullmatch(leftover.name)
        with contextlib.suppress(OSError):
            if match is not None and left_by_the_dead(
                leftover, writers(match) or [(None, None)], now
            ):
                remove(leftover)


def left_by_the_dead(
    path: Path, named: list[tuple[str | None, int | None]], now: float | None
) -> bool:
    """Whether `path`, written by the writers `named` ((host, pid): temporary_prefix's host,
    None for an older version's name), is left by dead ones, and ours to delete (another
    user's we may not): a writer of this host is alive while its pid is; one elsewhere until
    the file is ELSEWHERE_DEAD_AFTER_SECONDS old by `now` (the folder's clock; None: never
    old); an older version's while either holds (it may be this host's, alive)."""
    status = path.lstat()
    old = now is not None and now - status.st_mtime > ELSEWHERE_DEAD_AFTER_SECONDS

    def alive(host: str | None, pid: int | None) -> bool:
        if host == WRITER_HOST:
            return _alive(pid)
        return not old or (host is None and pid is not None and _alive(pid))

    return bool(named) and not any(alive(*w) for w in named) and status.st_uid == os.geteuid()


@contextlib.contextmanager
def regular_file(path: Path, where: str, follow: bool = True) -> Iterator[IO[bytes]]:
    """`path` opened for reading without blocking, if it is a regular file: a FIFO or a
    device under a file's name would otherwise wait for a writer, or never end. Without
    `follow`, a symlink is refused too. Anything else, or a file that cannot be opened, is a
    UsageError naming `where`."""
    try:
        opened = _opened_regular(path, follow)
    except _NotRegular:
        raise UsageError(f"{where}: not a regular file") from None
    except ValueError:  # os.open's answer to a NUL byte in the name
        raise UsageError(f"{where}: a name holding a NUL byte is no file's") from None
    except OSError as e:
        if not follow and e.errno == errno.ELOOP:  # O_NOFOLLOW's answer to a symlink
            raise UsageError(f"{where}: a symlink, which is not followed") from None
        raise UsageError(f"{where}: cannot read it ({e.strerror or e})") from None
    with opened as file:
        yield file


def read_start(path: Path, size: int) -> bytes | None:
    """The first `size` bytes of `path` (through any link), if it is a regular file that can
    be read; None otherwise: a check of what a file is never waits on a FIFO or a device."""
    try:
        with _opened_regular(path) as file:
            return file.read(size)
    except (OSError, ValueError):  # none there, not a file, unreadable; a NUL in the name
        return None


class _NotRegular(OSError):
    """A folder, a FIFO, a device or a socket where a file was to be read."""


def _opened_regular(path: Path, follow: bool = True) -> IO[bytes]:
    """`path` opened for reading without blocking (a FIFO would wait for a writer), if it
    is a regular file; else _NotRegular, whose strerror says "Is a directory" for a folder.
    Without `follow`, a symlink is refused (an OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # before fdopen, which refuses a folder
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise _NotRegular(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        raise _NotRegular("not a regular file")
    return os.fdopen(fd, "rb")
