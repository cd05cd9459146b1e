"""Where the commands write: output folders and files checked before any long work, the files
of a run, a fresh folder for each new run, a lock that keeps a second process out of a
folder while a run holds it, and the result files (table, JSON, chart) of the measuring
commands."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from shared.errors import UsageError
from shared.io import write_json, write_text

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, CURVES_NAME)
LOCK_NAME = ".lock"


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds (part of) a run: its checkpoint or its metrics."""
    return any((folder / name).exists() for name in (CHECKPOINT_NAME, METRICS_NAME))


def prepare_out_dir(folder: Path, flag: str = "--out") -> Path:
    """Create `folder` (and its parents) if need be, or say in one line why it cannot be
    written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot create folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: folder is not writable")
    return folder


def check_out_file(path: Path, flag: str) -> Path:
    """Say in one line, before any work, why `path` could not be written as a file: it is a
    folder, or its folder is missing or not writable."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable")
    return path


def fresh_run_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ...: the first that does not exist yet, created. mkdir
    either creates a folder or fails, so two runs started at once never get the same one."""
    prepare_out_dir(base.parent)
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"--out {folder}: cannot create folder ({e.strerror or e})") from None
        return folder


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"process {int(lock.read_text())}"
    return "another process"


@contextlib.contextmanager
def hold(folder: Path, flag: str = "--out") -> Iterator[None]:
    """Hold `folder` for this process until the block ends; a second process is refused,
    naming the first's pid. The lock is the kernel's (flock), so a killed process never
    leaves the folder locked."""
    lock = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"{flag} {folder}: cannot lock it ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"{flag} {folder}: in use by a run of {_holder(lock)}; wait for it to end, or "
                "choose another folder"
            ) from None
        # The holder before us may have removed the file after we opened it: then our lock is
        # on a file nobody else sees, and we try again on the current one.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        # The holder's pid, for the message a second process gets; where the disk refuses
        # it, the lock holds all the same.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.unlink(lock)  # while still locked, so no one else holds a lock on this file
        os.close(fd)


def write_results(
    out: Path,
    name: str,
    text: str,
    payload: dict,
    chart: Callable[[Path], None] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """A command's results in `out`: the table `text` as name.md, `payload` as name.json and,
    given a chart, its picture as name.png; then says what it wrote, by `say`."""
    paths = [out / f"{name}.md", out / f"{name}.json"]
    write_text(paths[0], text + "\n")
    write_json(paths[1], payload)
    if chart is not None:
        paths.append(out / f"{name}.png")
        chart(paths[2])
    say(f"\nwrote {', '.join(map(str, paths))}")
