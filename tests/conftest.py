"""Fixtures: generated IDX datasets, the real Fashion-MNIST, and framework converters."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _pin_worker_to_one_core() -> None:
    """Under pytest-xdist (`-n auto`, one worker a core), each worker and what it starts keeps
    to its own core: frameworks that each spread over every core slow each other far more
    than twice over (an epoch went from 22 s to 357 s). Done before NumPy, PyTorch and JAX
    are imported, which size their thread pools from this affinity."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_pin_worker_to_one_core()


def _share_jax_compilations() -> None:
    """One persistent JAX compilation cache for the session, its xdist workers and the
    scripts they start (which inherit the environment): tests build many backends of the same
    network, and each new backend's functions would compile again (about 1 s each, most of a
    cross-check's time). The cache is keyed by the compiled program itself, so a planted
    variant compiles afresh. Made by the process that starts the session (before it starts
    the workers) and removed at its end; a user's own JAX_COMPILATION_CACHE_DIR is kept. (Two
    workers may write one entry at once; one that reads it half-written compiles again, with
    a warning.)"""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    _MADE["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="threefold-jax-cache-")
    # Every program, however quick to compile: the default keeps those over 1 s only.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        _MADE["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ.update(_MADE)


_MADE: dict[str, str] = {}  # the variables set by _share_jax_compilations
_share_jax_compilations()

import numpy as np
import pytest

from shared.config import PAIRS
from shared.data import FASHION_MNIST, Dataset, load_dataset


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file: magic 0x0000 08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_dataset_dir(folder: Path, n_train: int = 120, n_test: int = 30, seed: int = 0) -> Path:
    """Four gzip IDX files of random 28x28 images whose class sets a bright stripe, so that
    a network can learn them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = FASHION_MNIST.files
    for images_file, labels_file, n in (
        (files.train_images, files.train_labels, n_train),
        (files.test_images, files.test_labels, n_test),
    ):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 2 + 2 * labels] = 255
        write_idx(folder / f"{images_file.name}.gz", images)
        write_idx(folder / f"{labels_file.name}.gz", labels)
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    return make_dataset_dir(tmp_path / "data")


@pytest.fixture(scope="session")
def real_data() -> Dataset:
    """The real Fashion-MNIST; scripts/setup.sh installs it, so its absence is a failure."""
    return load_dataset()


def to_native(impl: str, array):
    if impl == "jax":
        import jax.numpy as jnp

        return jnp.asarray(array)
    if impl == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(array))
    return array


ROOT = Path(__file__).resolve().parents[1]


def clone_with_this_checkouts(folder: Path, *paths: str) -> tuple[Path, list[str]]:
    """A git clone of this repository in `folder`, with this checkout's `paths` (edited or
    not) committed on top, so that the code under test is this checkout's -> (the clone, a
    git command prefix that works in it)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
    for path in paths:
        shutil.copy(ROOT / path, folder / path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder)]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "this checkout's code", "--allow-empty"], check=True)
    return folder, git


# Runs a script (or -c CODE) as __main__ and, at exit, writes the process's own peak RSS in
# KiB to $THREEFOLD_PEAK_FILE: VmHWM, which starts afresh at exec. ru_maxrss does not: a child
# forked from a pytest grown to a gigabyte reports at least that, whatever it does.
_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["THREEFOLD_PEAK_FILE"], "w") as out:
        out.write(peak)
atexit.register(report)
if sys.argv[1] == "-c":
    code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
    exec(compile(code, "<child>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_measured(
    args: list[str], peak_file: Path, **kwargs
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python ARGS` (a script and its arguments, or -c CODE ...) from the repository ->
    (the completed process, its own peak memory in MiB)."""
    env = {**os.environ, "THREEFOLD_PEAK_FILE": str(peak_file), **kwargs.pop("env", {})}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
        **kwargs,
    )
    return done, int(peak_file.read_text()) / 1024


def pairs_with(impl: str) -> tuple[str, ...]:
    """The pairs of implementations that include `impl`: those a bug planted in it fails."""
    return tuple(pair for pair in PAIRS if impl in pair.split("-"))


def pytest_unconfigure(config) -> None:
    if "JAX_COMPILATION_CACHE_DIR" in _MADE:
        shutil.rmtree(_MADE["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    for name in _MADE:
        os.environ.pop(name, None)
    _MADE.clear()


def usage_error(result, prog: str = "train.py") -> str:
    """The one error line of a usage error: exit status 2, then one line; argparse's usage
    above it only where argparse itself refused the command line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error: "), result.stderr
    if len(lines) > 1:
        assert lines[0].startswith(f"usage: {prog} "), result.stderr
        assert all(line.startswith(" ") for line in lines[1:-1]), result.stderr
    return lines[-1]
