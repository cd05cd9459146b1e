"""The ray engine of shared/grid.py: a grid's missing runs as Ray tasks, each in a fresh
worker process pinned to cores no other run on its node holds (`claimed_cores`), their
results handed back to the grid, the only writer of its run store, as they end.

`run_grid` passes in how a run trains in a process (`shared.grid.run_here`), which both
engines share, so this module needs nothing of the grid's and the grid imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.backend import MALLOC_TUNABLES
from shared.config import TrainConfig
from shared.data import Dataset
from shared.errors import (
    Terminated,
    UsageError,
    exit_not_swallowed,
    first_line,
    signals_held,
    stop_on_signals,
)

if TYPE_CHECKING:
    from shared.grid import Engine, Task

    # How a run trains in a process, its result from (task, config, data): shared.grid.run_here.
    Runner = Callable[[Task, TrainConfig, Dataset], dict]


def run_on_ray(
    run: Runner,
    task: Task,
    todo: list[TrainConfig],
    data: Dataset,
    engine: Engine,
    finished: Callable[[TrainConfig, dict | None, str | None], None],
) -> None:
    """Each configuration one Ray task, `run(task, config, data)` in a process pinned to its
    cores (run_pinned); results handed to `finished` in the order they end."""
    if not todo:
        return
    # A stop while Ray imports left it half-initialised, and the exit hook it had registered
    # then printed a traceback: the stop is acted on once the import is whole.
    with signals_held():
        import ray

    cpus = engine.run_cpus()
    pending: dict[Any, TrainConfig] = {}
    # From before ray.init: a stop while it starts a cluster shuts the cluster down.
    with stop_on_signals():
        try:
            _join(ray, engine)
            largest = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
            if cpus > largest:
                default = "" if engine.cpus_per_run else " (by default, this machine's cores)"
                raise UsageError(
                    f"--cpus-per-run {cpus}{default}: no node of the cluster has that many "
                    f"CPUs (the largest has {largest:g})"
                )
            # max_calls=1: a fresh process per run, pinned before its frameworks load; no
            # retries: a run whose worker died is reported, and the next invocation trains it.
            remote = ray.remote(num_cpus=cpus, max_calls=1, max_retries=0)(run_pinned)
            data_ref = ray.put(data)
            pending.update(
                {remote.remote(run, task, config, data_ref, cpus): config for config in todo}
            )
            wait_for(ray, pending, finished)
        finally:
            # Stopped whole: a second stop waits for the cluster's end, then is raised.
            with signals_held():
                for ref in pending:  # interrupted: what has not ended is stopped, not left running
                    ray.cancel(ref, force=True)
                ray.shutdown()


@contextlib.contextmanager
def _handlers_kept() -> Iterator[None]:
    """The handlers of SIGTERM and SIGINT set back on leaving the block: ray.init sets its
    own, which exits with the signal's number for a status and nothing said, where the
    command's own stop the grid and say what it kept."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:  # None: set outside Python, which cannot set it back
                signal.signal(signum, handler)


def _join(ray: Any, engine: Engine) -> None:
    """ray.init: the cluster at --address, or one of this process's cores; the command's
    signal handlers kept, and a SIGTERM that Ray's took while it ran raised as the command's
    would raise it."""
    try:
        with _handlers_kept(), exit_not_swallowed():
            if engine.address is None:
                # A cluster of this process's cores for the grid's length, quiet on the
                # terminal, whose workers keep the memory their threads free (see
                # keep_freed_memory; JAX `strong` at batch 128 in a task: 26,205 page faults
                # a step -> 0). A user's own tunables come after ours: theirs win.
                own = os.environ.get("GLIBC_TUNABLES")
                tunables = ":".join(filter(None, (MALLOC_TUNABLES, own)))
                with _environment(GLIBC_TUNABLES=tunables):
                    ray.init(
                        # "local": not the cluster $RAY_ADDRESS or a `ray start` names.
                        address="local",
                        num_cpus=len(os.sched_getaffinity(0)),
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.ERROR,
                    )
            else:
                ray.init(address=engine.address, log_to_driver=False, logging_level=logging.ERROR)
    except SystemExit as e:
        # Ray's handler, set first thing in ray.init, exits with the signal's number.
        if e.code == signal.SIGTERM:
            raise Terminated from None
        raise
    except (ConnectionError, ValueError, RuntimeError) as e:
        # Ray 2.59+ starts clusters with token authentication; a driver without the token is
        # refused with a bare "Failed to connect".
        refused = any("Authentication" in str(c) for c in _causes(e))
        hint = "; set RAY_AUTH_MODE=token with the cluster's token (docs/CLUSTER.md)" * refused
        where = f"--address {engine.address}" if engine.address else "--engine ray"
        raise UsageError(f"{where}: no Ray cluster to join ({e}){hint}") from None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@contextlib.contextmanager
def _environment(**variables: str):
    """os.environ with `variables` set, for the processes started meanwhile; restored after."""
    before = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for(ray, pending: dict[Any, TrainConfig], finished: Callable) -> None:
    """Hand each Ray task's result (or why it failed) to `finished` as it ends, emptying
    `pending`."""
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        config = pending.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            finished(config, None, first_line(e.cause if e.cause is not None else e))
        except ray.exceptions.RayError as e:  # the worker or its node died
            finished(config, None, first_line(e))
        else:
            finished(config, result, None)


# HTTP/2's client preface, then an empty SETTINGS frame: a gRPC server, as Ray's GCS and its
# client server are, answers with a frame of its own SETTINGS.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse, within `timeout` seconds, an --address no server answers at, or whose server
    does not speak gRPC's HTTP/2 (a web server, the dashboard's port): Ray itself would retry
    for minutes. "auto" (the cluster this machine belongs to) is left to Ray, and so is a
    cluster whose connections are TLS ($RAY_USE_TLS), which answers no plain preface."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    deadline = time.monotonic() + timeout
    try:  # an IPv6 host is written in brackets: [::1]:6379
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                sock.sendall(_HTTP2_PREFACE)
                # A frame's header: length, type, flags, stream.
                frame = _first_bytes(sock, 9, deadline)
                if len(frame) < 9 or frame[3] != _SETTINGS:
                    raise UsageError(
                        f"--address {address}: a server answers there, but not as a Ray "
                        "cluster does (gRPC); give the address `ray start --head` printed"
                    )
    except ValueError:
        raise UsageError(f"--address {address}: not HOST:PORT") from None
    except OSError as e:
        raise UsageError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e})"
        ) from None


def _first_bytes(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Up to `count` bytes the peer sends first: fewer where it closes the connection or has
    not sent them by `deadline` (time.monotonic's), however it trickles them."""
    received = b""
    try:
        while len(received) < count and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not (chunk := sock.recv(count - len(received))):
                break
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def run_pinned(run: Runner, task: Task, config: TrainConfig, data: Dataset, cpus: int) -> dict:
    """A Ray task: `run(task, config, data)` pinned to `cpus` cores of this node that no other
    run holds."""
    with claimed_cores(cpus):
        return run(task, config, data)


def _claims_folder() -> Path:
    """The user's own folder of core claims in the temporary folder: one shared by every
    user took the first one's permissions (the others' runs all failed), and files there
    any user could replace by links."""
    folder = Path(tempfile.gettempdir()) / f"threefold-cores-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
        raise RuntimeError(f"{folder}: not a folder of this user's; move it away")
    return folder


@contextlib.contextmanager
def claimed_cores(count: int) -> Iterator[list[int]]:
    """Pin this process to `count` cores of its affinity that no other process of this user
    on the node has claimed, waiting until that many are free. Each core is claimed by a
    kernel lock (flock) on a file of its own, so a killed run frees its cores."""
    cores = sorted(os.sched_getaffinity(0))
    count = min(count, len(cores))
    folder = _claims_folder()
    held: list[tuple[int, int]] = []
    while len(held) < count:
        for core in cores:
            fd = os.open(folder / f"cpu{core}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((core, fd))
            if len(held) == count:
                break
        if len(held) < count:  # not enough free: let go, so two runs never wait on each other
            for _, fd in held:
                os.close(fd)
            held = []
            time.sleep(0.1)
    os.sched_setaffinity(0, {core for core, _ in held})
    try:
        yield [core for core, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)
