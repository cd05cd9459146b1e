"""Grids of runs on Ray (shared/grid.py): a local cluster on this machine, against the local
engine, on generated data. The grids that train (local and on Ray) run on the test's own core
(under xdist, its worker's): on both cores, beside the other worker's tests, the two slowest
took 364 s, on one 147 s."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from shared.errors import UsageError
from shared.ray_engine import check_reachable, claimed_cores
from tests.conftest import clone_with_this_checkouts, make_dataset_dir
from tests.test_training import ROOT, run_script

ALL_CORES = set(range(os.cpu_count() or 1))
# One core: the xdist worker's own (tests/conftest.py pins each worker to one), or the first.
OWN_CORE = {min(os.sched_getaffinity(0))}


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory) -> Path:
    """Enough images for --quick's 1,000-image runs."""
    return make_dataset_dir(tmp_path_factory.mktemp("grid-data"), n_train=1400, n_test=100)


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for Ray's socket paths (at most 107 bytes), of this test alone:
    its Ray session and the core locks of shared.ray_engine.claimed_cores live there."""
    with tempfile.TemporaryDirectory(prefix="tf", dir="/tmp") as folder:
        yield folder


def start(
    program: str, *flags: str, cores: set[int], tmp: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Run `program` (a path under the repository) on `cores` (this test's worker may hold one
    core only), with `env` added to the environment."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / program), *flags],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": tmp, **(env or {})},
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=900)
    return process.returncode, out, err


def stored(out: Path) -> dict[str, dict]:
    return json.loads((out / "runs.json").read_text())["runs"]


def without_timing(value):
    """`value` with every measured duration left out (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_a_grid_on_ray_gives_what_a_local_grid_gives(grid_data, tmp_path, short_tmp):
    flags = ("--quick", "--impl", "numpy", "--data-dir", str(grid_data))
    local = start(
        "scripts/experiments.py",
        *flags,
        "--out",
        str(tmp_path / "local"),
        cores=OWN_CORE,
        tmp=short_tmp,
    )
    assert finish(local)[0] == 0
    on_ray = start(
        "scripts/experiments.py",
        *flags,
        "--out",
        str(tmp_path / "ray"),
        "--engine",
        "ray",
        "--cpus-per-run",
        "1",
        cores=OWN_CORE,
        tmp=short_tmp,
        # As `ray job submit` sets it: ray.init joined it, or a cluster `ray start` left,
        # where no --address asks for a cluster of this machine's cores.
        env={"RAY_ADDRESS": "127.0.0.1:9"},
    )
    code, out, err = finish(on_ray)
    assert code == 0, err
    local_runs, ray_runs = (stored(tmp_path / k / "experiments") for k in ("local", "ray"))
    assert local_runs.keys() == ray_runs.keys() and local_runs
    assert f"{len(ray_runs)} runs to train, 0 already stored" in out
    for key, run in ray_runs.items():
        # Bit-identical weights: one core each, the same processor.
        assert (
            run["cores"] == 1
            and run["summary"]["params_sha256"] == (local_runs[key]["summary"]["params_sha256"])
        )
        assert without_timing(run["summary"]) == without_timing(local_runs[key]["summary"])
    results = [
        without_timing(json.loads((tmp_path / k / "experiments" / "results.json").read_text()))
        for k in ("local", "ray")
    ]
    # The same results; the command that made them names its engine and the cores a run had.
    assert results[1].pop("command") == results[0].pop("command") + " --engine ray --cpus-per-run 1"
    assert results[0] == results[1]


# What XLA's threads did in a Ray task, without JAX: a thread started after make_backend's
# keep_freed_memory (too late for the worker, whose own threads already took their arenas)
# takes 100 MB from malloc nine times, each touched and freed; its page faults, each time.
RAY_THREAD_FAULTS = """
import ctypes, resource, sys, threading
from shared.backend import keep_freed_memory
from shared.config import TrainConfig
from shared.data import load_dataset
from shared.grid import Engine, RunStore, run_grid

SIZE = 100 * 2**20

def thread_faults(config, data):
    keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []

    def allocate():
        for _ in range(9):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            block = libc.malloc(SIZE)
            ctypes.memset(block, 1, SIZE)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    thread = threading.Thread(target=allocate)
    thread.start()
    thread.join()
    return {"test_acc": 0.0, "faults": faults}

config, data = TrainConfig(impl="numpy"), load_dataset(sys.argv[1])
store = RunStore(None, data.content_sha256)
run_grid(thread_faults, {config: "faults"}, data, store, Engine("ray", cpus_per_run=1), print)
print(*store.summary(config)["faults"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a setting of glibc's malloc")
def test_a_ray_task_reuses_the_memory_its_threads_freed(grid_data, short_tmp):
    """A Ray worker's threads take their malloc arenas before any of our code runs, so the
    local cluster starts its processes with keep_freed_memory's settings in the environment:
    without them each 100 MB a task's thread took was mapped afresh and faulted in (25,601
    faults each time, 0 with them; a JAX `strong` step at 128 in a task faulted 26,205 times,
    and tests/test_profile.py checks that step outside Ray)."""
    done = subprocess.run(
        [sys.executable, "-c", RAY_THREAD_FAULTS, str(grid_data)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": short_tmp},
        preexec_fn=lambda: os.sched_setaffinity(0, ALL_CORES),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    faults = [int(n) for n in done.stdout.splitlines()[-1].split()]  # after the progress lines
    assert len(faults) == 9 and statistics.median(faults) < 1000, done.stdout


def ray_runs_in_progress() -> list[int]:
    """Pids of Ray worker processes running a grid's run (Ray titles them by the task)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::run_pinned" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def a_run_under_way(deadline: float) -> int:
    """The pid of a Ray worker seen running a grid's run at two looks half a second apart
    (into its training, past its imports), looking until `deadline`. One look, a second
    after the first run was seen, found none: a run of seconds can end in between."""
    while time.monotonic() < deadline:
        first = set(ray_runs_in_progress())
        time.sleep(0.5)
        if under_way := first & set(ray_runs_in_progress()):
            return under_way.pop()
    raise AssertionError("no grid run under way")


def test_a_killed_worker_loses_only_its_run_which_the_next_invocation_trains(
    grid_data, tmp_path, short_tmp
):
    flags = ("--quick", "--impl", "numpy", "--data-dir", str(grid_data), "--out", str(tmp_path))
    flags += ("--engine", "ray", "--cpus-per-run", "1")
    flags += ("--arch", "strong", "--seeds", "5")  # runs of seconds, to be killed in
    grid = start("scripts/speedrun.py", *flags, cores=OWN_CORE, tmp=short_tmp)
    os.kill(a_run_under_way(time.monotonic() + 300), signal.SIGKILL)
    code, out, err = finish(grid)
    assert code == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert "1 of 5 runs failed" in line and "the same command again trains the failed ones" in line
    assert len(stored(tmp_path)) == 4
    assert not (tmp_path / "speedrun.md").exists()
    again = start("scripts/speedrun.py", *flags, cores=OWN_CORE, tmp=short_tmp)
    code, out, err = finish(again)
    assert code == 0, err
    assert "1 runs to train, 4 already stored" in out
    saved = json.loads((tmp_path / "speedrun.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1, 2, 3, 4] and len(stored(tmp_path)) == 5


def test_sigterm_stops_a_ray_grid_in_one_line_keeping_its_finished_runs(
    grid_data, tmp_path, short_tmp
):
    flags = ("--quick", "--impl", "numpy", "--data-dir", str(grid_data), "--out", str(tmp_path))
    flags += ("--engine", "ray", "--cpus-per-run", "1", "--arch", "strong", "--seeds", "5")
    grid = start("scripts/speedrun.py", *flags, cores=OWN_CORE, tmp=short_tmp)
    deadline = time.monotonic() + 300
    while not (tmp_path / "runs.json").exists():  # a run finished and stored
        assert time.monotonic() < deadline and grid.poll() is None, "no run finished"
        time.sleep(0.2)
    a_run_under_way(deadline)  # and the next under way
    finished = stored(tmp_path)
    grid.send_signal(signal.SIGTERM)
    code, _, err = finish(grid)
    assert code == 128 + signal.SIGTERM
    [line] = err.strip().splitlines()
    kept = stored(tmp_path)
    assert finished.items() <= kept.items() and f"terminated (SIGTERM) with {len(kept)} of" in line
    assert "the same command again trains the rest" in line
    while ray_runs_in_progress():  # the runs under way stop with the grid
        assert time.monotonic() < deadline, "a run outlived its grid"
        time.sleep(0.2)


def test_sigterm_while_ray_starts_its_cluster_stops_the_grid_in_one_line(
    grid_data, tmp_path, short_tmp
):
    # ray.init sets a handler that exits at once: status 15, nothing said, until the grid's
    # own took over; the cluster it was starting is shut down.
    flags = ("--quick", "--impl", "numpy", "--data-dir", str(grid_data), "--out", str(tmp_path))
    grid = start("scripts/speedrun.py", *flags, "--engine", "ray", cores=OWN_CORE, tmp=short_tmp)
    deadline = time.monotonic() + 120
    while not (Path(short_tmp) / "ray").exists():  # ray.init under way
        assert time.monotonic() < deadline and grid.poll() is None, "Ray never started"
        time.sleep(0.05)
    grid.send_signal(signal.SIGTERM)
    code, _, err = finish(grid)
    assert code == 128 + signal.SIGTERM, err
    [line] = err.strip().splitlines()
    assert "terminated (SIGTERM) with 0 of 3 runs finished, kept;" in line
    assert not (tmp_path / "runs.json").exists()


STOPPED_WHILE_RAY_IMPORTS = """
import atexit, os, signal, sys
register = atexit.register

def stop_once_ray_registers_its_exit(function, *args, **kwargs):
    # Ray's module registers its shutdown halfway through its import: a stop lands there.
    registered = register(function, *args, **kwargs)
    if getattr(function, "__module__", "").startswith("ray"):
        os.kill(os.getpid(), signal.SIGTERM)
    return registered

atexit.register = stop_once_ray_registers_its_exit
from shared.errors import exit_process
from shared.speedrun import main
exit_process(main(sys.argv[1:]))
"""


def test_sigterm_while_ray_imports_stops_the_grid_in_one_line(grid_data, tmp_path, short_tmp):
    """Ray, half-imported, left an exit hook that printed a traceback below the line."""
    flags = ["--quick", "--impl", "numpy", "--data-dir", str(grid_data), "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_RAY_IMPORTS, *flags, "--engine", "ray"],
        cwd=ROOT, env={**os.environ, "TMPDIR": short_tmp}, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip().splitlines() == [
        "speedrun.py: terminated (SIGTERM) with 0 of 3 runs finished, kept; the same command "
        "again trains the rest"
    ]


@pytest.fixture
def ray_head(short_tmp):
    """An existing cluster, as a user starts one (`ray start --head`, token authentication on,
    as Ray 2.59+ does by default), stopped with its processes at the end: its address."""
    env = {**os.environ, "TMPDIR": short_tmp, "RAY_AUTH_MODE": "token"}
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
        ],
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, ALL_CORES),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = None
    for line in head.stdout:
        if found := re.search(r"ray start --address='([^']+)'", line):
            address = found.group(1)
            break
    try:
        assert address, "ray start printed no address"
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_a_grid_joins_an_existing_cluster_at_its_address(ray_head, grid_data, tmp_path):
    address, env = ray_head
    flags = ["--quick", "--impl", "numpy", "--data-dir", str(grid_data), "--out", str(tmp_path)]
    flags += ["--engine", "ray", "--address", address, "--cpus-per-run", "1"]
    script = [sys.executable, str(ROOT / "scripts" / "speedrun.py"), *flags]

    def grid(**changes: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            script, env={**env, **changes}, cwd=ROOT, capture_output=True, text=True, timeout=600
        )

    refused = grid(RAY_AUTH_MODE="disabled")  # without the cluster's token
    assert refused.returncode == 2 and "RAY_AUTH_MODE=token" in refused.stderr.splitlines()[-1]
    result = grid()
    assert result.returncode == 0, result.stderr
    assert len(stored(tmp_path)) == 3 and (tmp_path / "speedrun.md").is_file()


def hold_a_core(tmp: str) -> tuple[subprocess.Popen, str]:
    """A process holding one claimed core until killed, and that core as it reports it."""
    holder = start("tests/hold_a_core.py", cores=ALL_CORES, tmp=tmp)
    core, affinity = holder.stdout.readline().split(maxsplit=1)
    assert affinity.strip() == f"[{core}]"  # pinned to the core it claimed
    return holder, core


def test_claimed_cores_are_never_shared_and_a_killed_holder_frees_them(short_tmp):
    if len(ALL_CORES) < 2:
        pytest.skip("needs two cores")
    holders = []  # each started one, ended however the test ends

    def held() -> int:
        holder, core = hold_a_core(short_tmp)
        holders.append(holder)
        return core

    try:
        core, other = held(), held()
        assert core != other
        holders[0].kill()
        holders[0].wait()
        assert held() == core
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_core_claims_are_the_user_s_own_and_follow_no_link(short_tmp, monkeypatch):
    """One folder for every user took the first one's permissions: another user's runs all
    failed on its locks. It is now the user's own, and never followed through a link."""
    monkeypatch.setattr(tempfile, "tempdir", short_tmp)
    folder = Path(short_tmp) / f"threefold-cores-{os.getuid()}"
    with claimed_cores(1) as (core,):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / f"cpu{core}.lock").stat().st_mode) == 0o600
    shutil.rmtree(folder)
    folder.symlink_to(short_tmp)
    with (
        pytest.raises(RuntimeError, match="not a folder of this user's; move it away"),
        claimed_cores(1),
    ):
        pass


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--address", "127.0.0.1:6379"], "--address: only with --engine ray"),
        (["--cpus-per-run", "1"], "--cpus-per-run: only with --engine ray"),
        (["--engine", "ray", "--cpus-per-run", "0"], "--cpus-per-run"),
        (["--engine", "ray", "--address", "127.0.0.1:9"], "no Ray cluster answers there"),
        (["--engine", "ray", "--address", "localhost"], "not HOST:PORT"),
        (["--engine", "ray", "--cpus-per-run", "64"], "no node of the cluster has that many"),
    ],
)
@pytest.mark.parametrize("script", ["experiments.py", "speedrun.py"])
def test_bad_engine_flags_are_one_line_errors(script, flags, message, grid_data, tmp_path):
    result = run_script(
        script, "--quick", "--data-dir", str(grid_data), "--out", str(tmp_path / "o"), *flags
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()  # a cluster not there left an empty folder tree


def test_an_address_whose_server_is_not_ray_is_refused_within_the_timeout():
    """A web server there (a typo'd port, the dashboard's) passed the check, and ray.init
    retried for minutes, printing Ray's warnings."""
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    trickling = socket.create_server(("127.0.0.1", 0))  # a byte every 0.4 s: each recv waited

    def trickle() -> None:
        connection, _ = trickling.accept()
        with connection, contextlib.suppress(OSError):
            for _ in range(9):
                time.sleep(0.4)
                connection.sendall(b"x")

    threading.Thread(target=trickle, daemon=True).start()
    with web, trickling, socket.create_server(("127.0.0.1", 0)) as silent:  # never answers
        for server in (web.server_address, silent.getsockname(), trickling.getsockname()):
            started = time.monotonic()
            with pytest.raises(UsageError, match="a server answers there, but not as a Ray"):
                check_reachable(f"127.0.0.1:{server[1]}", timeout=1.0)
            assert time.monotonic() - started < 1.5  # the timeout is the whole check's
        web.shutdown()


LABEL_AFTER_AN_EDIT = """
import pathlib
from shared.grid import checkout_label, run_here

def edit_the_code(config, data):
    code = pathlib.Path("shared/grid.py")
    code.write_text(code.read_text() + "# edited while a run trained\\n")
    return {}

run_here(edit_the_code, None, None)
print(run_here(lambda config, data: {}, None, None)["trained"])  # the process's next run
"""


def test_a_run_is_labelled_with_the_code_it_started_from(tmp_path):
    """Code edited (or committed) while a grid trains does not relabel its runs, the one
    under way or the next; a process started after the edit is labelled `+changes`."""
    clone, git = clone_with_this_checkouts(tmp_path / "clone", "shared/grid.py")
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    def label(code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=clone, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert label(LABEL_AFTER_AN_EDIT).endswith(f" {commit}")
    assert label("from shared.grid import checkout_label; print(checkout_label())").endswith(
        f" {commit}+changes"
    )
