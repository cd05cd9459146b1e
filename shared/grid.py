"""Grids of independent training runs (experiments.py, speedrun.py), on this machine or on a
Ray cluster, with one store of finished runs whatever the engine.

A grid is a set of configurations, each a task `task(config, data) -> summary`. The run store
keeps every finished run's summary, keyed by its whole configuration and its data's content
digest, in a JSON file written after each run: an interrupted grid resumes where it stopped
and a rerun trains only what is new or what failed. The engine only decides where the
missing runs train:

- local: one after the other in this process, on every core it may use (as before engines);
- ray (shared/ray_engine.py): each run one Ray task declaring `cpus_per_run` CPUs, in a
  fresh worker process pinned to that many cores of its node before any framework is
  imported, so no two runs share a core (two trainings on 2 cores slowed each other from 22 s
  to 357 s an epoch). The data is read once, by this process, and put once in Ray's object
  store: each node fetches it once and its runs share it without copies. Results come back
  here, the only writer of the store.

A run's result depends on its configuration and seed, its thread count and its processor
(float32 sums are grouped by thread and by instruction set), not on the engine: the same
configuration on the same processor with the same number of cores gives bit-identical weights
(each summary records their digest) through either engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import itertools
import json
import os
import platform
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import ADDED_FIELDS, TrainConfig, with_added_fields
from shared.cost import network_cost
from shared.data import Dataset
from shared.errors import (
    DataError,
    GridFailed,
    Interrupted,
    UsageError,
    first_line,
    interrupted,
    stop_on_signals,
)
from shared.io import read_json, write_json
from shared.loop import SETTING_NAMES, train_split
from shared.parallel import requested_threads
from shared.profile import cpu_name
from shared.ray_engine import check_reachable, run_on_ray
from shared.spec import PRESETS, get_arch

ENGINES = ("local", "ray")
Task = Callable[[TrainConfig, Dataset], dict[str, Any]]
# A summary's fields a report reads, each with the check its stored value must pass.
Fields = Mapping[str, Callable[[object], bool]]


@dataclass(frozen=True)
class Engine:
    """Where a grid's runs train: `name` local or ray; for ray, the cluster's `address` (None:
    start one on this machine for the grid's length) and the cores each run takes (None:
    as many as this process may use, so that a run computes what a local run computes)."""

    name: str = "local"
    address: str | None = None
    cpus_per_run: int | None = None

    def __post_init__(self) -> None:
        """Refuse at once what could not run: an unknown engine, Ray's settings without Ray,
        Ray missing, an address nobody answers at."""
        if self.name not in ENGINES:
            raise UsageError(f"--engine {self.name}: not one of {', '.join(ENGINES)}")
        if self.name != "ray":
            for flag, value in (("--address", self.address), ("--cpus-per-run", self.cpus_per_run)):
                if value is not None:
                    raise UsageError(f"{flag}: only with --engine ray")
            return
        if self.cpus_per_run is not None and not (
            isinstance(self.cpus_per_run, int) and self.cpus_per_run >= 1
        ):
            raise UsageError(f"--cpus-per-run {self.cpus_per_run}: not a whole number >= 1")
        if importlib.util.find_spec("ray") is None:
            raise UsageError("--engine ray: Ray is not installed; pip install -e '.[cluster]'")
        if self.address is not None:
            check_reachable(self.address)

    def run_cpus(self) -> int:
        return self.cpus_per_run or len(os.sched_getaffinity(0))

    @property
    def flags(self) -> str:
        """The flags a report's command names for where its runs trained and on how many
        cores (the cluster's address left out)."""
        cpus = f" --cpus-per-run {self.cpus_per_run}" if self.cpus_per_run else ""
        return f" --engine {self.name}{cpus}" if self.name != "local" else ""


LOCAL = Engine()


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """--engine, --address, --cpus-per-run: where a grid's runs train (shared/grid.py)."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: one run after another in this process (default); ray: each run a Ray "
        "task (pip install -e '.[cluster]')",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="with --engine ray: the Ray cluster to join, as `ray start` printed it, or auto "
        "for the one $RAY_ADDRESS names (default: start one on this machine's cores for the "
        "grid's length)",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int,  # checked by Engine, as for callers of the API
        default=None,
        help="with --engine ray: cores each run takes, its framework threads pinned to them "
        "(default: as many as this process may use, so runs compute what local runs compute)",
    )


def engine_of(args: argparse.Namespace) -> Engine:
    """The Engine the flags of `add_engine_flags` name (checked as it is made)."""
    return Engine(args.engine, args.address, args.cpus_per_run)


def _machine_recorded(run: dict) -> bool:
    """Whether a stored run's processor and cores, where it has them (runs stored before
    they were recorded do not), are a name and a count."""
    cpu, cores = run.get("cpu", ""), run.get("cores", 1)
    return isinstance(cpu, str) and isinstance(cores, int) and not isinstance(cores, bool)


class RunStore:
    """Finished runs' summaries, keyed by their whole configuration and the data they trained
    on (`data`, the dataset's content digest: runs on other files never stand in for these),
    in a JSON file beside the results; each says when, from which commit and on what
    processor and cores it trained. `fresh`: a run counts as stored only once this process
    has trained it again; the other runs the file holds are kept in it, and those a fresh
    grid set out to train again are marked stale in it (`redo`) until they are, so that a
    fresh grid cut short leaves the rest to the same command without --fresh. A file that
    cannot be read or is not a store of runs is refused, `fresh` or not: writing over it
    would lose the runs it holds; so is another command's store (`command` names the one
    keeping it): a speedrun's "defaults" run is the experiments' lab row, summarised
    otherwise, and a speedrun with --fresh wrote over it."""

    def __init__(self, path: Path | None, data: str, fresh: bool = False, command: str = ""):
        self.path, self.data, self.fresh, self.command = path, data, fresh, command
        self.runs: dict[str, dict] = {}
        self.trained: set[str] = set()  # keys this process trained
        self.read: set[str] = set()  # keys whose runs this process read
        self.stale: set[str] = set()  # kept runs a fresh grid has yet to train again
        if path is None or not path.exists():
            return
        try:
            stored = read_json(path)
            runs, stale = stored["runs"], stored.get("stale", [])
            owner = stored.get("command")  # none in a store of an older version
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise _damaged(path, e) from None
        try:
            if not isinstance(owner, str | None):
                raise TypeError("a command that is not a name")
            if owner and command and owner != command:
                raise UsageError(
                    f"{path}: the runs of {owner}.py, which {command}.py does not share; give "
                    "another --out"
                )
            if not all(a_share(r["summary"]["test_acc"]) for r in runs.values()):
                raise TypeError("a run without a test accuracy")
            if not all(_machine_recorded(r) for r in runs.values()):
                raise TypeError("a run whose processor or cores are not a name and a count")
            if not all(isinstance(r["trained"], str) for r in runs.values()):
                raise TypeError("a run whose date and commit are not a text")
            if not (isinstance(stale, list) and all(key in runs for key in stale)):
                raise TypeError("stale runs that are not runs of the store")
            # An older version's store, holding runs, is no command's to claim.
            self.command = owner or ("" if runs else command)
            self.runs = _current_keys(runs)
            self.stale = set(_current_keys(dict.fromkeys(stale, None)))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise _damaged(path, e) from None

    def key(self, config: TrainConfig) -> str:
        return _key({**_with_preset(dataclasses.asdict(config)), "data": self.data})

    def __contains__(self, config: TrainConfig) -> bool:
        return self.holds(config, ACCURACY)

    def holds(self, config: TrainConfig, reads: Fields) -> bool:
        """Whether the run of `config` counts as stored for a report that `reads` these
        fields of it: one stored without one of them (by an older version) does not."""
        key = self.key(config)
        if self.fresh:
            return key in self.trained
        return self._kept(key) and self._complete(key, reads)

    def incomplete(self, config: TrainConfig, reads: Fields) -> bool:
        """Whether the run of `config` is stored, not stale, but lacks a field of `reads`."""
        key = self.key(config)
        return self._kept(key) and not self._complete(key, reads)

    def _kept(self, key: str) -> bool:
        """Whether the run of `key` is stored and not marked for training again."""
        return key in self.runs and key not in self.stale

    def _complete(self, key: str, reads: Fields) -> bool:
        summary = self.runs[key]["summary"]
        return all(check(summary.get(field)) for field, check in reads.items())

    def redo(self, configs: list[TrainConfig]) -> None:
        """Mark the kept runs of `configs`, which a fresh grid is about to train again, as
        stale in the file: none of them counts as stored until it has been."""
        stale = {self.key(config) for config in configs} & set(self.runs)
        if not stale <= self.stale:  # nothing to mark: nothing written (no folder kept)
            self.stale |= stale
            self._write()

    def entry(self, config: TrainConfig) -> dict:
        """A stored run: its summary, and when, where and on how many cores it trained."""
        self.read.add(self.key(config))
        return self.runs[self.key(config)]

    def summary(self, config: TrainConfig, reads: Fields | None = None) -> dict:
        """A stored run's summary, refused in one line unless each field the caller `reads`
        passes its check (a grid given other `reads` than its report's: a bug)."""
        summary = self.entry(config)["summary"]
        for field, check in (reads or ACCURACY).items():
            if not check(summary.get(field)):
                raise DataError(
                    f"{self.path}: the stored {config.impl} run of seed {config.seed} has no "
                    f"valid {field!r}"
                )
        return summary

    def add(self, config: TrainConfig, finished: dict) -> None:
        """Keep a finished run (`run_here`'s result) and write the store at once."""
        self.runs[self.key(config)] = finished
        self.trained.add(self.key(config))
        self.stale.discard(self.key(config))
        self._write()

    def _write(self) -> None:
        if self.path is not None:  # "runs" first: a store is known by its first bytes
            stale = {"stale": sorted(self.stale)} if self.stale else {}
            command = {"command": self.command} if self.command else {}
            write_json(self.path, {"runs": self.runs, **command, **stale})

    @property
    def undated(self) -> int:
        """Stored runs whose key names no data: stored before runs were keyed by it, kept in
        the file and never counted."""
        return sum(json.loads(key)["data"] is None for key in self.runs)

    def provenance(self) -> dict[str, int]:
        """How many of the runs this process read (those behind its tables, not every run the
        file keeps) each (date, commit) trained."""
        return dict(Counter(self.runs[key]["trained"] for key in sorted(self.read)))


def _damaged(path: Path, error: Exception) -> DataError:
    return DataError(
        f"{path}: damaged or not threefold's runs ({type(error).__name__}: {error}); move it "
        "away to start a new store"
    )


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


def _with_preset(config: dict) -> dict:
    """`config` with its preset's layers spelled out (None for a spec or a file): a preset
    redefined since (retuned, say) matches no run of its old definition."""
    return {**config, "preset": PRESETS[config["arch"]][0] if config["arch"] in PRESETS else None}


def _current_keys(runs: dict[str, dict]) -> dict[str, dict]:
    """Stored runs under today's keys: a key written before a setting was added gains it, so
    the run still counts, and one written before presets were spelled out in keys is taken
    as of today's definition. Where the same configuration is stored under an old key and
    under its current one (trained again by a version that did not match the old key), the
    run stored under the current key is kept."""
    current: dict[str, tuple[tuple[bool, bool], dict]] = {}
    for stored, run in runs.items():
        config = json.loads(stored)
        # A run stored before its data was recorded trained on data nobody can name now.
        full = {"data": None, **with_added_fields(config)}
        key = _key(full if "preset" in full else _with_preset(full))
        rank = (ADDED_FIELDS.keys() <= config.keys(), "preset" in config)  # how current
        if key not in current or rank > current[key][0]:
            current[key] = rank, run
    return {key: run for key, (_, run) in current.items()}


def a_share(value: object) -> bool:
    """Whether a stored accuracy is one: a finite float in [0, 1] (JSON may hold NaN)."""
    return isinstance(value, float) and 0.0 <= value <= 1.0


# What a report reads of a run by default: its test accuracy.
ACCURACY: Fields = {"test_acc": a_share}


def a_curve(value: object) -> bool:
    """Whether a stored learning curve is one: a non-empty list of accuracies."""
    return isinstance(value, list) and bool(value) and all(map(a_share, value))


def a_duration(value: object, positive: bool = False) -> bool:
    """Whether a stored time (or size) is one: a number >= 0 (> 0 if `positive`), short of
    1e12, beyond any a run measures (30,000 years; an exabyte in MB): nearer float's maximum,
    a report's sums and plots overflow."""
    if type(value) not in (int, float):  # not bool, nor a string
        return False
    return (value > 0 if positive else value >= 0) and value < 1e12


def a_time(value: object) -> bool:
    """Whether a stored time a run took is one: a duration > 0."""
    return a_duration(value, positive=True)


def checkout_label() -> str:
    """Today's date and the checkout's commit, as far as git can tell, marked `+changes` where
    the commit's code was edited (its results files, which a grid rewrites, do not count)."""
    date = datetime.datetime.now(datetime.UTC).date().isoformat()
    return f"{date} {_loaded_commit()}"


@functools.cache
def _loaded_commit() -> str:
    """The commit (`+changes` if edited) as this process first asked, before its first run:
    the code it loaded, whatever is edited or committed while it trains."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "outside git"
    edited = _git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.toml")
    return f"{commit}{'+changes' if edited else ''}"


def _git(*args: str) -> str:
    """What `git ARGS` prints in this checkout, or "" where git cannot tell."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_here(task: Task, config: TrainConfig, data: Dataset) -> dict:
    """Run `task` in this process: its summary, and where and on how many cores it ran."""
    trained = checkout_label()
    return {
        "summary": task(config, data),
        "trained": trained,
        "host": platform.node(),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
    }


def run_grid(
    task: Task,
    grid: dict[TrainConfig, str],
    data: Dataset,
    store: RunStore,
    engine: Engine = LOCAL,
    progress: Callable[[str], None] = print,
    reads: Mapping[TrainConfig, Fields] | None = None,
) -> None:
    """Train every configuration of `grid` (config -> label for progress) that `store` lacks,
    or holds without a field its report `reads` (config -> fields; by default its test
    accuracy), adding each to the store as it finishes. A failed run is reported by its label
    and does not stop the others; if any failed, GridFailed is raised once all have ended."""
    needs = {config: (reads or {}).get(config, ACCURACY) for config in grid}
    todo = [config for config in grid if not store.holds(config, needs[config])]
    if store.fresh:
        store.redo(todo)
    todo.sort(key=lambda config: training_flops(config, data), reverse=True)
    if grid:
        notes = []
        if incomplete := sum(store.incomplete(config, needs[config]) for config in todo):
            notes.append(f"{incomplete} stored without a figure the report reads: trained again")
        if store.undated:
            notes.append(f"{store.undated} stored before runs named their data: kept, not reused")
        said = f" ({'; '.join(notes)})" if notes else ""
        progress(f"{len(todo)} runs to train, {len(grid) - len(todo)} already stored{said}")
    failures: list[str] = []
    ended = itertools.count(1)

    def finished(config: TrainConfig, result: dict | None, error: str | None) -> None:
        where = f"[{next(ended)}/{len(todo)}] {grid[config]}"
        if result is None:
            failures.append(f"{grid[config]}: {error}")
            progress(f"{where}: FAILED: {error}")
            return
        store.add(config, result)
        progress(f"{where}: test {100 * result['summary']['test_acc']:.2f}%")

    try:
        if engine.name == "ray":
            run_on_ray(run_here, task, todo, data, engine, finished)
        else:
            with stop_on_signals():
                for config in todo:
                    try:
                        result = run_here(task, config, data)
                    except Interrupted:
                        raise
                    # A diverged or misfit run, or one a framework or the memory failed (as
                    # a Ray task's failure is): reported, and the others go on.
                    except Exception as e:
                        finished(config, None, first_line(e))
                    else:
                        finished(config, result, None)
    # A run stopped in this process says what its own loop kept (nothing: a grid's runs save no
    # checkpoint); what the grid kept is the news.
    except (KeyboardInterrupt, Interrupted) as stop:
        kept = sum(1 for config in todo if config in store)
        where = f" in {store.path}" if store.path and store.path.exists() else ""
        raise interrupted(
            stop,
            f"with {kept} of {len(todo)} runs finished, kept{where}; {_again(store)} trains "
            "the rest",
        ) from None
    if failures:
        named = "; ".join(failures[:3]) + (
            f"; {len(failures) - 3} more above" if failures[3:] else ""
        )
        kept = f"the others are kept in {store.path}" if store.path else "the others are kept"
        kept = "none finished" if len(failures) == len(todo) else kept
        raise GridFailed(
            f"{len(failures)} of {len(todo)} runs failed ({named}); {kept}: "
            f"{_again(store)} trains the failed ones"
        )


def _again(store: RunStore) -> str:
    """The command that trains what a grid left: with --fresh, the same command would train
    every run again."""
    return "the same command without --fresh" if store.fresh else "the same command again"


def check_fits(grid: dict[TrainConfig, str], data: Dataset) -> None:
    """Refuse, in one line before anything is written, a grid with a run that `data` cannot
    serve (--limit or --batch-size beyond its images), naming the run by its label, or whose
    NumPy runs this machine's $THREEFOLD_NUMPY_THREADS would fail one by one (a cluster's
    other nodes run with their own)."""
    if any(config.impl == "numpy" for config in grid):
        requested_threads()
    arches = {name: get_arch(name) for name in {config.arch for config in grid}}
    for config, label in grid.items():
        try:
            train_split(config, arches[config.arch], data, SETTING_NAMES)
        except UsageError as e:
            raise UsageError(f"{label}: {e}; give more images with --data-dir") from None


def training_flops(config: TrainConfig, data: Dataset) -> int:
    """The arithmetic of `config`'s training, the order a grid starts its runs in: longest
    first, so that on many machines no long run starts last. A configuration the data cannot
    serve is refused here, before any run."""
    arch = get_arch(config.arch)
    images = len(train_split(config, arch, data, SETTING_NAMES))
    return config.epochs * images * network_cost(arch.layers).flops
