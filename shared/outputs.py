"""Where the commands write: output folders and files checked before any long work, the files
of a run, a fresh folder for each new run, a lock that keeps a second process out of a
folder while a run holds it, and the result files (table, JSON, chart) of the measuring
commands."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from shared.checkpoint import is_checkpoint
from shared.errors import OutputError, ThreefoldError, UsageError, interrupted, say
from shared.idx import is_idx_file
from shared.io import TEMPORARY_NAME_EXTRA, read_start, staged, write_json, write_text

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, CURVES_NAME)
EVALUATION_FILES = ("confusion.png", "misclassified.png", "evaluation.json")  # evaluate.py's
LOCK_NAME = ".lock"
STORE_NAME = "runs.json"  # a grid's or a speedrun's finished runs (shared.grid.RunStore)
# What the experiments' grid and a speedrun write beside their store, theirs alone to rewrite.
STORE_RESULTS = ("results.json", "speedrun.md", "speedrun.json", "speedrun.png")
# What benchmark.py writes in its modes (NAME.md, .json, .png; NAME-stopped.* for rows of a
# stopped one): measurements no other command may write over.
MEASUREMENTS = ("benchmark", "ab", "paired", "profile")


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds (part of) a run: its checkpoint or its metrics."""
    return any((folder / name).is_file() for name in (CHECKPOINT_NAME, METRICS_NAME))


def refuse_odd_run_files(folder: Path, flag: str = "--out") -> None:
    """Refuse a folder where a run's file (or its evaluation's) is a folder, a FIFO or a
    dangling link: a run could not write it there, and --overwrite would delete what it is."""
    for name in (*RUN_FILES, *EVALUATION_FILES):
        path = folder / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise UsageError(f"{flag} {folder}: its {name} is not a file; move it away")


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first: what making it makes."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (deepest first) that is empty: the folders a command made for
    work that then failed."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """For a block that makes `folder` (and its missing parents): those it made and left
    empty are removed if it ends in an error (a bad flag found late, a cluster not there)."""
    made = missing_folders(folder)
    try:
        yield
    except BaseException:
        remove_if_empty(made)
        raise


def prepare_out_dir(folder: Path, flag: str = "--out") -> Path:
    """Create `folder` (and its parents) if need be, or say in one line why it cannot be
    written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's "File exists" would not say that it is no folder
        raise UsageError(f"{flag} {folder}: exists and is not a folder") from None
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot create folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: folder is not writable")
    return folder


REPLACED_PREFIX = ".replaced-"  # the hidden folder an --overwrite sets the old run aside in


def set_aside_runs(folder: Path) -> list[Path]:
    """The runs in `folder` an --overwrite set aside and did not finish replacing."""
    return sorted(folder.glob(f"{REPLACED_PREFIX}*"))


@contextlib.contextmanager
def replacing_run(folder: Path) -> Iterator[None]:
    """For a run that replaces the one in `folder` (--overwrite): the old run's files, and
    those an evaluation of it wrote, moved aside into a hidden `.replaced-*` folder while the
    new run trains, so that the folder never mixes two runs. Deleted once the new run has
    finished; put back if it ends before saving a checkpoint of its own (a divergence in its
    first epoch, Ctrl-C); kept where they are otherwise, the error naming the folder. A
    finished run is gone only once the one replacing it has finished."""
    names = [name for name in (*RUN_FILES, *EVALUATION_FILES) if (folder / name).exists()]
    if not names:
        yield
        return
    try:
        aside = Path(tempfile.mkdtemp(dir=folder, prefix=REPLACED_PREFIX))
    except OSError as e:
        raise OutputError(f"{folder}: cannot set the old run aside ({e.strerror or e})") from None
    moved = []
    try:
        for name in names:
            os.replace(folder / name, aside / name)
            moved.append(name)
        yield
    except BaseException as error:
        new_run_saved = len(moved) == len(names) and (folder / CHECKPOINT_NAME).exists()
        if new_run_saved or not _put_back(aside, folder, moved):
            _tell(error, f"the run it was to replace is kept in {aside}")
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _put_back(aside: Path, folder: Path, names: list[str]) -> bool:
    """Move `names` from `aside` back into `folder`, then remove `aside`: whether the files
    went back (a folder made read-only meanwhile keeps them aside)."""
    try:
        for name in names:
            os.replace(aside / name, folder / name)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        aside.rmdir()
    return True


def _tell(error: BaseException, note: str) -> None:
    """Add `note` to the one line a ThreefoldError prints; print it before anything else."""
    if isinstance(error, ThreefoldError) and error.args:
        error.args = (f"{error.args[0]}; {note}", *error.args[1:])
    else:
        say(note, file=sys.stderr)


def remove_evaluation(folder: Path) -> list[str]:
    """Remove evaluate.py's report from `folder`, whose checkpoint a training has just
    replaced: left, it gave an older epoch's accuracy beside the run's (80.74% where the
    finished run scored 85.35%). -> the names removed."""
    removed = []
    for name in EVALUATION_FILES:
        path = folder / name
        if not os.path.lexists(path):
            continue
        try:
            path.unlink()
        except OSError as e:
            raise OutputError(f"{path}: cannot remove it ({e.strerror or e})") from None
        removed.append(name)
    return removed


def check_out_file(path: Path, flag: str) -> Path:
    """Say in one line, before any work, why `path` could not be written as a file: it is a
    folder, a FIFO or a device, its folder is missing or not writable, or its name leaves no
    room for the temporary written beside it."""
    with _one_line(flag, path):
        _check_writable(path, flag)
    return path


@contextlib.contextmanager
def _one_line(flag: str, path: Path) -> Iterator[None]:
    """What the file system says of `path` within the block (a name too long, a loop of
    symbolic links) as one UsageError naming `flag`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        raise UsageError(f"{flag} {path}: {getattr(e, 'strerror', None) or e}") from None


def _check_writable(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not path.is_file():  # a FIFO or a device, which a rename would replace
        raise UsageError(f"{flag} {path}: not a regular file")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable")
    # A file written with others (io.staged) is written under a temporary's temporary.
    room = os.pathconf(folder, "PC_NAME_MAX") - 2 * TEMPORARY_NAME_EXTRA
    if len(os.fsencode(path.name)) > room:
        raise UsageError(
            f"{flag} {path}: a name of {len(os.fsencode(path.name))} bytes; at most {room} here "
            "(the temporaries written beside it add to it)"
        )


def check_out_files(
    outputs: list[tuple[str, Path | None]],
    reads: list[tuple[str, Path | None]] = (),
    store: Path | None = None,
    own_run: Path | None = None,
    own_results: str | None = None,
) -> None:
    """check_out_file on each output given (flag, path; None where not given), and refuse an
    output that is a file the command reads, another output, a file of a run (its
    checkpoint, metrics, curves or evaluation) other than the evaluation of the run in
    `own_run` (evaluate.py's, of its checkpoint), a store of runs other than the command's
    own `store`, or another command's results (an evaluation's, a benchmark's) than the kind
    it writes itself (`own_results`, see _results_of): writing it would destroy the input,
    what the command wrote a moment before, finished runs or measurements."""
    seen = [(flag, path) for flag, path in reads if path is not None]
    for flag, path in outputs:
        if path is None:
            continue
        check_out_file(path, flag)
        check_nothing_kept(flag, path, seen, store, own_run, own_results)
        seen.append((flag, path))


def check_nothing_kept(
    flag: str,
    path: Path,
    seen: list[tuple[str, Path]],
    store: Path | None = None,
    own_run: Path | None = None,
    own_results: str | None = None,
) -> None:
    """Refuse `path` as an output where it is a file read or written already (`seen`), a
    run's file other than `own_run`'s evaluation, a checkpoint under another name, a store
    of runs other than `store`, or results of another kind than `own_results`. A FIFO or a
    device is not opened, which would wait for a writer: writing it is refused
    (check_out_file, atomic_write)."""
    try:
        special = path.exists() and not path.is_file()
    except OSError:  # a name the file system refuses (too long): no file is kept there
        return
    if special:
        return
    with _one_line(flag, path):  # a loop of symbolic links among the files read
        _check_other_files(flag, path, seen, store, own_run, own_results)


def _check_other_files(
    flag: str,
    path: Path,
    seen: list,
    store: Path | None,
    own_run: Path | None,
    own_results: str | None,
) -> None:
    for other_flag, other in seen:
        if _same_file(path, other):
            raise UsageError(f"{flag} {path}: the same file as {other_flag} {other}")
    own = own_run is not None and path.name in EVALUATION_FILES
    own = own and path.parent.resolve() == own_run.resolve()
    if path.name in (*RUN_FILES, *EVALUATION_FILES) and holds_run(path.parent) and not own:
        raise UsageError(f"{flag} {path}: one of the files of the run in {path.parent}")
    if _holds_runs(path) and not (store and _same_file(path, store)):
        raise UsageError(f"{flag} {path}: holds the finished runs of a grid or a speedrun")
    # A grid's results beside its store are its own to rewrite.
    beside = path.name in STORE_RESULTS and _holds_runs(path.parent / STORE_NAME)
    if store is None and beside and path.is_file():
        raise UsageError(
            f"{flag} {path}: a result of the grid or speedrun whose finished runs are in "
            f"{path.parent / STORE_NAME}; choose another name"
        )
    kind = _results_of(path)
    if kind is not None and kind != own_results:  # there, or to join them
        writer = "evaluate.py" if kind == "evaluation" else "benchmark.py"
        raise UsageError(
            f"{flag} {path}: one of the results {writer} wrote in {path.parent}; choose "
            "another name"
        )
    if is_checkpoint(path):  # a run's, copied or renamed
        raise UsageError(f"{flag} {path}: a checkpoint of threefold's; choose another name")
    if is_idx_file(path):  # a dataset's, in a folder the command does not read
        raise UsageError(f"{flag} {path}: a dataset's IDX file; choose another name")


def _results_of(path: Path) -> str | None:
    """The kind of a command's results `path` is named as, where the report it belongs with
    is beside it: "evaluation" (evaluate.py's EVALUATION_FILES beside evaluation.json) or a
    name of MEASUREMENTS (NAME.md, .json, .png beside NAME.json, or NAME-stopped.*); None
    otherwise."""
    if path.name in EVALUATION_FILES and (path.parent / "evaluation.json").is_file():
        return "evaluation"
    stem, _, suffix = path.name.rpartition(".")
    stem = stem.removesuffix("-stopped")
    written = suffix in ("md", "json", "png") and stem in MEASUREMENTS
    reports = (path.parent / f"{stem}{end}.json" for end in ("", "-stopped"))
    return stem if written and any(report.is_file() for report in reports) else None


def _holds_runs(path: Path) -> bool:
    """Whether `path` (through any link) is a store of finished runs, which RunStore writes as
    {"runs": ...} under whatever name: its first bytes tell, however large the file."""
    head = read_start(path, 64)  # None: none there yet, or no file a command reads back
    return head is not None and re.match(rb'\s*\{\s*"runs"\s*:', head) is not None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once resolved, or hard links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return False


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
            # Never through a symlink, whose target the pid below would overwrite.
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
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
    if not _a_lock_of_ours(fd):  # a user's own file: it would be made a pid, then deleted
        os.close(fd)
        raise UsageError(
            f"{flag} {folder}: its {LOCK_NAME} is a file of other text, not a lock threefold "
            "left; move it away"
        )
    try:
        # The holder's pid, for the message a second process gets; where the disk refuses
        # it, the lock holds all the same.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        # Held, no --overwrite is under way here: one set aside is a run it did not finish
        # replacing (killed, or stopped after its first epoch), which only its folder keeps.
        for aside in set_aside_runs(folder):
            say(
                f"note: {aside} holds the files of a run that an --overwrite did not finish "
                "replacing; move them back to keep that run, or delete the folder",
                file=sys.stderr,
            )
        yield
    finally:
        # While still locked, so no one else holds a lock on this file; someone may have
        # deleted it by hand, or made the folder read-only, which must not fail a finished
        # run (a lock left behind holds nothing once closed).
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _a_lock_of_ours(fd: int) -> bool:
    """Whether the open lock file holds what `hold` writes in one: nothing, or a pid (what a
    killed holder left)."""
    size = os.fstat(fd).st_size
    return size == 0 or (size <= 24 and re.fullmatch(rb"\d+\n?", os.pread(fd, size, 0)) is not None)


def result_files(out: Path, name: str, chart: bool = True, stopped: bool = False) -> list[Path]:
    """The files write_results writes: name.md, name.json and, with a chart, name.png; for a
    command stopped early, name-stopped.* instead."""
    stem = f"{name}-stopped" if stopped else name
    return [out / f"{stem}.{ext}" for ext in ("md", "json", "png")[: 3 if chart else 2]]


def write_results(
    out: Path,
    name: str,
    text: str,
    payload: dict,
    chart: Callable[[Path], None] | None = None,
    say: Callable[[str], None] = say,
    stopped: str = "",
) -> None:
    """A command's results in `out`: the table `text` as name.md, `payload` as name.json and,
    given a chart, its picture as name.png; then says what it wrote, by `say`. The files
    replace their older versions only once all are written (a chart that fails leaves the
    older set whole). Rows of a command stopped early (`stopped`, why, heads the table) go to
    name-stopped.*: they never replace a finished run's results, and a finished run's
    results, once written, replace them (removed)."""
    paths = result_files(out, name, chart is not None, bool(stopped))
    if stopped:
        text, payload = stopped + text, {**payload, "stopped": stopped.strip()}
    with contextlib.ExitStack() as stack:
        staging = [stack.enter_context(staged(path)) for path in paths]
        write_text(staging[0], text + "\n")
        write_json(staging[1], payload)
        if chart is not None:
            chart(staging[2])
    if not stopped:
        for path in result_files(out, name, chart is not None, stopped=True):
            with contextlib.suppress(OSError):  # none there; or not ours to remove (a folder)
                path.unlink()
    say("")
    say(f"wrote {', '.join(map(str, paths))}")


@contextlib.contextmanager
def written_at_the_end(
    write: Callable[[str], None], measured: Callable[[], bool]
) -> Iterator[None]:
    """Within the block a command measures; when it ends, `write(note)` writes the results:
    all of them (`note` empty), or, where something stopped the block (a worker that failed
    or ran out of time, Ctrl-C, SIGTERM), those measured before, if any (`measured()`),
    headed by why. The stop then goes on as it came, whatever the writing met (said in one
    line): a long benchmark keeps what it finished."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as stop:
        if measured():
            why = str(stop) or str(interrupted(stop))
            try:
                write(f"Stopped early ({why}): the rows measured before.\n\n")
            except (Exception, KeyboardInterrupt) as failed:
                print(f"the rows measured were not kept: {failed}", file=sys.stderr)
        raise
    write("")
