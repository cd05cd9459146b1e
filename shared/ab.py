"""benchmark.py --against REV: the working tree's training step against commit REV's; and
--paired: each implementation's step against PyTorch's, in the working tree. Both sides are
compiled and warm in two processes that take turns (each turn a short warm-up of untimed
steps, then the mean of a few timed ones: shared/ab_worker.py); each side's process is started
first for half the pairs.

Two benchmark runs minutes apart on a shared VM drift by up to a third (docs/PERFORMANCE.md),
more than most changes buy. Stepping in turn (A B, B A, A B, ...) puts both sides in the same
moment, so a slow spell hits both alike, and the median of the pairs' ratios tells a change of
a few percent apart. Only one side computes at any time.
"""

from __future__ import annotations

import os
import selectors
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shared.ab_worker import TIMED_STEPS, WARM_SECONDS
from shared.config import PROJECT
from shared.errors import ThreefoldError, UsageError
from shared.outputs import write_results, written_at_the_end
from shared.profile import WARMUP_SECONDS, cpu_name

WORKER = Path(__file__).with_name("ab_worker.py")
SETTLE_SECONDS = 0.2
REFERENCE = "torch"  # what --paired steps each implementation against: the targets' reference
FIRST_COMMIT = "cb70b92"  # the first whose training step shared/ab_worker.py can run
TURN = (
    f"each turn untimed steps for {WARM_SECONDS:g} s (one at least), then the mean of "
    f"{TIMED_STEPS} timed ones"
)


def extract_commit(rev: str, into: Path) -> str:
    """Write the files of commit `rev` of this repository under `into` -> its full hash."""
    git = ["git", "-C", str(PROJECT)]
    try:
        found = subprocess.run(
            [*git, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise UsageError(f"--against {rev}: needs git, which is not installed") from None
    if found.returncode != 0:
        # --quiet silences a missing commit alone: git's own failure (no repository here, a
        # checkout of another user's it distrusts) says why.
        said = found.stderr.strip().splitlines()
        reason = f"git: {said[0].removeprefix('fatal: ')}" if said else "no such commit"
        raise UsageError(f"--against {rev}: {reason} in {PROJECT}")
    commit = found.stdout.strip()
    older = subprocess.run(
        [*git, "merge-base", "--is-ancestor", FIRST_COMMIT, commit], capture_output=True
    )
    if older.returncode == 1:  # 0: it descends; other codes: git cannot tell (a shallow clone)
        raise UsageError(
            f"--against {rev}: does not descend from {FIRST_COMMIT}, the first commit whose "
            "training step the worker can run"
        )
    # Streamed from git into the folder: the archive is never held whole in memory.
    archive = subprocess.Popen([*git, "archive", "--format=tar", commit], stdout=subprocess.PIPE)
    failed = f"--against {rev}: git archive failed"
    try:
        with archive, tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
            # git's archive of the user's own commit; the filter, where this Python has it
            # (3.11.4 on; Debian 12's 3.11.2 has not), refuses links out of the folder too.
            tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except tarfile.TarError:  # git's stream ended short, or was no archive
        raise ThreefoldError(f"{failed} (exit {archive.wait()})") from None
    except OSError as e:  # a write refused: a full disk, say
        raise ThreefoldError(
            f"--against {rev}: cannot write its files into {into} ({e.strerror or e})"
        ) from None
    if archive.returncode != 0:
        raise ThreefoldError(f"{failed} (exit {archive.returncode})")
    return commit


@dataclass
class Side:
    """A worker process stepping one tree's code (shared/ab_worker.py)."""

    flag: str  # the option measuring, for messages: "--against", "--paired"
    what: str  # "numpy at batch 64, tree"
    process: subprocess.Popen
    errors: IO[str]  # the worker's stderr
    timeout: float

    def answer(self) -> str:
        """The worker's next line, within the timeout; its last error line if it died."""
        with selectors.DefaultSelector() as wait:
            wait.register(self.process.stdout, selectors.EVENT_READ)
            if not wait.select(self.timeout):
                raise ThreefoldError(
                    f"{self.flag}: {self.what} did not answer within {self.timeout:g} s "
                    "(--timeout); stopped it"
                )
        line = self.process.stdout.readline()
        if not line:
            raise self.failed()
        return line.strip()

    def failed(self) -> ThreefoldError:
        """The worker's end, in one line: its last error line and how it exited."""
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            how = "still running"
        elif code < 0:
            how = f"killed by signal {-code}"
        else:
            how = f"exit {code}"
        self.errors.seek(0)
        last = (self.errors.read().strip().splitlines() or ["no message"])[-1]
        return ThreefoldError(f"{self.flag}: {self.what} failed ({how}): {last}")

    def step(self) -> float:
        """Mean seconds a training step over one turn (see shared/ab_worker.py)."""
        try:
            self.process.stdin.write("step\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self.failed() from None
        answer = self.answer()
        try:
            return float(answer)
        except ValueError:
            raise ThreefoldError(f"{self.flag}: {self.what} answered {answer!r}") from None


@dataclass(frozen=True)
class Code:
    """What one side steps: an implementation, from the files under a tree's root; `tree`
    names the tree in messages where the two sides differ by tree ("tree", "against")."""

    root: Path
    impl: str
    tree: str = ""


@contextmanager
def start_side(
    flag: str, label: str, code: Code, arch: str, batch_size: int, timeout: float
) -> Iterator[Side]:
    """A worker stepping `code`, compiled and warm; killed when the block ends."""
    # The tree first on the import path, and not the current folder (-P): every module then
    # comes from that tree, this worker file aside, while files the network names (--arch
    # FILE) are read from the same folder by both sides.
    launch = f"import runpy; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
    args = [code.impl, arch, str(batch_size), str(WARMUP_SECONDS)]
    paths = [str(code.root), *filter(None, [os.environ.get("PYTHONPATH")])]
    with (
        tempfile.TemporaryFile(mode="w+") as errors,
        subprocess.Popen(
            [sys.executable, "-P", "-c", launch, *args],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        ) as process,
    ):
        try:
            what = f"{code.impl} at batch {batch_size}" + (f", {code.tree}" if code.tree else "")
            side = Side(flag, what, process, errors, timeout)
            if side.answer() != "ready":
                raise ThreefoldError(f"{flag}: the worker for {side.what} did not start")
            yield side
        finally:
            process.kill()


def step_in_turn(
    flag: str,
    codes: dict[str, Code],
    starting: list[str],
    pairs: int,
    seconds: dict[str, list[float]],
    arch: str,
    batch_size: int,
    timeout: float,
) -> None:
    """Start a worker for each side of `codes` in the order of `starting`, then step them in
    turn for `pairs` pairs, each turn's mean seconds a step added to `seconds` under its
    label."""
    with ExitStack() as stack:
        sides = {
            label: stack.enter_context(
                start_side(flag, label, codes[label], arch, batch_size, timeout)
            )
            for label in starting
        }
        for i in range(pairs):
            # Each side goes first in every other pair: neither always follows the other.
            for label in starting if i % 2 == 0 else starting[::-1]:
                # The other side's threads spin for a while after its step (OpenBLAS's for
                # about 0.1 s), and would take a core from this one: wait them out.
                time.sleep(SETTLE_SECONDS)
                seconds[label].append(sides[label].step())


def compare(
    flag: str, codes: dict[str, Code], arch: str, batch_size: int, pairs: int, timeout: float
) -> dict:
    """Step both sides of `codes` ({label: code}, the side measured first) in turn for `pairs`
    pairs -> median milliseconds of each ("<label>_ms") and the median of the pairs' ratios
    (first / second: below 1, the first is faster)."""
    labels = list(codes)
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    # Each side is started first for half the pairs: in A/A runs (the same code on both
    # sides), the side started first measured up to 4% slower, whichever tree it ran.
    for starting, count in ((labels, pairs - pairs // 2), (labels[::-1], pairs // 2)):
        if count:
            step_in_turn(flag, codes, starting, count, seconds, arch, batch_size, timeout)
    first, second = (seconds[label] for label in labels)
    ratios = [a / b for a, b in zip(first, second, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if pairs > 1 else ratios
    q1, q3 = quartiles[0], quartiles[-1]
    return {
        "batch_size": batch_size,
        "pairs": pairs,
        **{f"{label}_ms": 1e3 * statistics.median(s) for label, s in seconds.items()},
        "ratio": statistics.median(ratios),
        "ratio_quartiles": [q1, q3],
    }


def markdown(rows: list[dict], keys: tuple[str, str], titles: tuple[str, str]) -> str:
    """One line a comparison: each side's median milliseconds a step (row[keys[i]], headed
    titles[i]), then the median of the pairs' ratios and their quartiles."""
    lines = [
        f"| impl | batch | pairs | {titles[0]}, ms a step | {titles[1]}, ms a step "
        "| ratio (median of pairs) | quartiles of the ratios |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        q1, q3 = r["ratio_quartiles"]
        lines.append(
            f"| {r['impl']} | {r['batch_size']} | {r['pairs']} | {r[keys[0]]:.2f} | "
            f"{r[keys[1]]:.2f} | {r['ratio']:.3f} | {q1:.3f}-{q3:.3f} |"
        )
    return "\n".join(lines)


def _rows(
    rows: list[dict],
    flag: str,
    impls: list[str],
    sizes: list[int],
    sides: Callable[[str], dict[str, Code]],
    keys: tuple[str, str],
    arch: str,
    pairs: int,
    timeout: float,
) -> None:
    """A comparison of the two sides `sides(impl)` for each batch size and implementation,
    added to `rows` and printed as each comes (`keys`: the row's two sides' milliseconds)."""
    for b in sizes:
        for impl in impls:
            rows.append({"impl": impl, **compare(flag, sides(impl), arch, b, pairs, timeout)})
            first, second = (rows[-1][k] for k in keys)
            print(
                f"  {impl:5} batch {b:4}: {first:8.2f} ms against {second:8.2f} ms, "
                f"ratio {rows[-1]['ratio']:.3f}",
                flush=True,
            )


def _compared_and_written(
    name: str,
    flag: str,
    impls: list[str],
    sides: Callable[[str], dict[str, Code]],
    columns: dict[str, str],
    about: str,
    sizes: list[int],
    arch: str,
    pairs: int,
    timeout: float,
    out: Path,
    **payload: str,
) -> None:
    """_rows, then their table (after `about`, `columns`: each side's key and title) and their
    JSON (with `payload`) in `out` as name.md and name.json: the rows measured so far if the
    comparison stops early."""
    keys, titles = tuple(columns), tuple(columns.values())
    rows: list[dict] = []

    def write(stopped: str = "") -> None:
        cpu = cpu_name()
        text = f"`--arch {arch}`, float32, on {cpu}: {about}\n\n" + markdown(rows, keys, titles)
        results = {"arch": arch, "cpu": cpu, **payload, "rows": rows}
        write_results(out, name, text, results, stopped=stopped)
        print("\n" + stopped + text)

    with written_at_the_end(write, lambda: bool(rows)):
        _rows(rows, flag, impls, sizes, sides, keys, arch, pairs, timeout)


def run_ab(
    rev: str, impls: list[str], arch: str, sizes: list[int], pairs: int, timeout: float, out: Path
) -> int:
    """--against: every implementation at every batch size, the working tree against commit
    `rev`; tables in `out` (ab.md, ab.json), with the rows measured if it stops early."""
    with tempfile.TemporaryDirectory(prefix="threefold-against-") as folder:
        commit = extract_commit(rev, Path(folder))

        def sides(impl: str) -> dict[str, Code]:
            return {
                "tree": Code(PROJECT, impl, "tree"),
                "against": Code(Path(folder), impl, "against"),
            }

        about = (
            f"the working tree against {rev} ({commit[:10]}), stepping in turn in two processes "
            f"({TURN}; each started first for half), {pairs} pairs each; ratio below 1: the "
            "working tree is faster."
        )
        columns = {"tree_ms": "working tree", "against_ms": rev}
        _compared_and_written(
            "ab", "--against", impls, sides, columns, about, sizes, arch, pairs, timeout, out,
            against=commit,
        )  # fmt: skip
    return 0


def run_paired(
    impls: list[str], arch: str, sizes: list[int], pairs: int, timeout: float, out: Path
) -> int:
    """--paired: each implementation of `impls` but PyTorch (at least one) against PyTorch,
    at every batch size, both from the working tree; tables in `out` (paired.md,
    paired.json), with the rows measured if it stops early. The ratio of their step times,
    taken in one moment, estimates the targets' ratio of epoch times. A step soon after the
    other side's turn runs slow, so each turn warms up before it times
    (shared/ab_worker.py; docs/PERFORMANCE.md, "Method")."""
    measured = [impl for impl in impls if impl != REFERENCE]

    def sides(impl: str) -> dict[str, Code]:
        return {"impl": Code(PROJECT, impl), REFERENCE: Code(PROJECT, REFERENCE)}

    about = (
        f"each implementation's training step against {REFERENCE}'s, both from the working "
        f"tree, stepping in turn in two processes ({TURN}; each started first for half), "
        f"{pairs} pairs each; the ratio of the step times estimates the implementation's epoch "
        f"time over {REFERENCE}'s (below 1: faster)."
    )
    columns = {"impl_ms": "the implementation", f"{REFERENCE}_ms": REFERENCE}
    _compared_and_written(
        "paired", "--paired", measured, sides, columns, about, sizes, arch, pairs, timeout, out,
        reference=REFERENCE,
    )  # fmt: skip
    return 0
