"""benchmark.py as a command: its flags bounded, its result files checked before it measures
and replaced together, what it measured kept when it stops early, and SIGTERM ending its
workers with it. (Its measurements: tests/test_profile.py and tests/test_ab.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shared.ab
from shared import benchmark
from shared.ab import FIRST_COMMIT
from shared.backend import IMPLEMENTATIONS
from shared.errors import ThreefoldError
from tests.test_ab import fake_sides
from tests.test_reliability import with_full_disk
from tests.test_training import ROOT, run_script

SMALL = ["--batch-sizes", "8", "--steps", "2", "--repeats", "1", "--ladder-images", "0"]


def _older_commit() -> str:
    """The commit before the first the worker can run, as this checkout's history has it."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{FIRST_COMMIT}~1"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--timeout", "3e6"], "--timeout"),  # the operating system's wait refused it
        (["--steps", "50001"], "--steps"),
        (["--repeats", "101"], "--repeats"),
        (["--ladder-images", "1501"], "--ladder-images"),  # it ran 30 minutes outside workers
        (["--against", ""], "--against: an empty revision"),  # it ran the plain benchmark
        (["--against", "OLDER"], f"does not descend from {FIRST_COMMIT}"),
        # Timed twice, as one size's repeats, which the header still counted as one.
        (["--batch-sizes", "32,8,32"], "--batch-sizes 32,8,32: 32 is named twice"),
        # Passed over with exit 0, as if they had counted.
        (["--profile", "--repeats", "7"], "--repeats: not with --profile, which times no"),
        (["--arch", "strong", "--ladder-images", "50"], "--ladder-images 50: the lab's loops"),
        (["--paired", "--impl", "jax", "--ladder-images", "50"], "--arch lab alone, with none"),
    ],
)
def test_a_flag_that_cannot_work_is_one_line_before_anything_is_measured(flags, message, tmp_path):
    flags = [_older_commit() if flag == "OLDER" else flag for flag in flags]
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_script("benchmark.py", "--impl", "numpy", *flags, "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert not out.exists() and time.monotonic() - started < 60


def test_a_batch_larger_than_the_training_images_is_one_line(tmp_path, tiny_data_dir):
    # Its worker waited for a whole batch that never came, until --timeout (10 minutes).
    out = tmp_path / "out"
    flags = ["--batch-sizes", "1000", "--data-dir", str(tiny_data_dir), "--out", str(out)]
    result = run_script("benchmark.py", "--impl", "numpy", "--timeout", "60", *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "--batch-sizes 1000: more than the" in line and "training images" in line
    assert not out.exists()


@pytest.mark.parametrize("name", ["benchmark.json", "benchmark-stopped.png"])
def test_its_result_files_are_checked_before_it_measures(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / "benchmark.md").write_text("earlier results")
    result = run_script("benchmark.py", "--impl", "numpy", *SMALL, "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / name}: is a folder" in result.stderr
    assert "ceiling" not in result.stdout  # nothing was measured
    assert (tmp_path / "benchmark.md").read_text() == "earlier results"


def test_what_it_measured_is_kept_when_a_worker_fails(tmp_path, tiny_data_dir, monkeypatch):
    first, failing = IMPLEMENTATIONS[:2]

    def run_worker(impl, arch, batch_size, steps, timeout, kind="--worker"):
        if impl == failing:
            raise ThreefoldError(f"benchmark of {impl} at batch {batch_size} did not finish")
        row = {"impl": impl, "batch_size": batch_size, "steps": steps}
        return row | {"first_step_seconds": 0.1, "images_per_s": 1000.0, "peak_mb": 100.0}

    monkeypatch.setattr(benchmark, "run_worker", run_worker)
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda: 100.0)
    flags = ["--impl", first, "--impl", failing, *SMALL, "--data-dir", str(tiny_data_dir)]
    before = os.environ.get("THREEFOLD_DATA")
    finished = {f"benchmark.{ext}": f"a finished run's {ext}" for ext in ("md", "json", "png")}
    for name, text in finished.items():
        (tmp_path / name).write_text(text)
    assert benchmark.main([*flags, "--out", str(tmp_path)]) == 1
    assert os.environ.get("THREEFOLD_DATA") == before  # told to its workers alone
    text = (tmp_path / "benchmark-stopped.md").read_text()
    assert text.startswith(f"Stopped early (benchmark of {failing} at batch 8 did not finish)")
    assert f"| {first} | 8 | 1,000 |" in text and "median of up to 1 interleaved" in text
    saved = json.loads((tmp_path / "benchmark-stopped.json").read_text())
    assert [r["impl"] for r in saved["rows"]] == [first] and saved["stopped"].startswith("Stopped")
    assert (tmp_path / "benchmark-stopped.png").read_bytes()[:4] == b"\x89PNG"
    # The stopped rows sit beside a finished run's results, never over them.
    assert {name: (tmp_path / name).read_text() for name in finished} == finished


def test_a_finished_run_s_results_replace_an_older_stopped_set(tmp_path):
    from shared.outputs import write_results

    stopped = "Stopped early (interrupted): the rows measured before.\n\n"
    write_results(tmp_path, "r", "part", {"rows": [1]}, stopped=stopped, say=lambda _: None)
    assert (tmp_path / "r-stopped.md").read_text() == stopped + "part\n"
    assert json.loads((tmp_path / "r-stopped.json").read_text())["stopped"].startswith("Stopped")
    write_results(tmp_path, "r", "whole", {"rows": [1, 2]}, say=lambda _: None)
    assert (tmp_path / "r.md").read_text() == "whole\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_an_implementation_named_twice_is_timed_once(tmp_path, tiny_data_dir, monkeypatch):
    timed = []

    def run_worker(impl, arch, batch_size, steps, timeout, kind="--worker"):
        timed.append(impl)
        row = {"impl": impl, "batch_size": batch_size, "steps": steps}
        return row | {"first_step_seconds": 0.1, "images_per_s": 1000.0, "peak_mb": 100.0}

    monkeypatch.setattr(benchmark, "run_worker", run_worker)
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda: 100.0)
    twice = ["--impl", IMPLEMENTATIONS[0]] * 2
    flags = [*twice, *SMALL, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path)]
    assert benchmark.main(flags) == 0
    assert timed == [IMPLEMENTATIONS[0]]


def test_a_paired_run_keeps_its_rows_when_a_later_one_fails(tmp_path, monkeypatch):
    fake_sides(monkeypatch, lambda _, code: 0.1)
    real = shared.ab.compare

    def compare(flag, codes, arch, batch_size, pairs, timeout):
        if batch_size == 16:
            raise KeyboardInterrupt
        return real(flag, codes, arch, batch_size, pairs, timeout)

    monkeypatch.setattr(shared.ab, "compare", compare)
    measured = next(impl for impl in IMPLEMENTATIONS if impl != shared.ab.REFERENCE)
    with pytest.raises(KeyboardInterrupt):
        shared.ab.run_paired([measured], "lab", [8, 16], 2, 1.0, tmp_path)
    text = (tmp_path / "paired-stopped.md").read_text()
    assert text.startswith("Stopped early (interrupted): the rows measured before.")
    assert not (tmp_path / "paired.md").exists()
    rows = json.loads((tmp_path / "paired-stopped.json").read_text())["rows"]
    assert [(r["impl"], r["batch_size"]) for r in rows] == [(measured, 8)]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_sigterm_stops_its_worker_and_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    flags = ["--impl", "numpy", "--batch-sizes", "8", "--steps", "50000", "--repeats", "1"]
    benchmark_run = subprocess.Popen(
        [sys.executable, "scripts/benchmark.py", *flags, "--ladder-images", "0", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # the data read and the ceiling measured first
        while not _children(benchmark_run.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        (worker,) = _children(benchmark_run.pid)  # measuring, 50,000 steps ahead of it
        benchmark_run.terminate()
        _, stderr = benchmark_run.communicate(timeout=60)
    finally:
        benchmark_run.kill()
    assert benchmark_run.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "benchmark.py: terminated (SIGTERM)"
    assert not Path(f"/proc/{worker}").exists()  # stopped, not left running without a timeout
    assert not out.exists()  # nothing was measured: the folder it made goes, and its lock


def test_a_commit_whose_files_cannot_be_written_is_one_line(tmp_path):
    # Extracting the commit is the command's first write; its pictures are hundreds of KB.
    out = tmp_path / "out"
    done = with_full_disk("benchmark.py", 20_000, "--against", "HEAD", "--impl", "numpy",
                          "--batch-sizes", "8", "--steps", "2", "--out", str(out))  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "--against HEAD: cannot write its files into" in last and "File too large" in last
    assert not out.exists()


# A parent that has touched 512 MB starts a process that reports its peak.
PARENT_OF_A_SMALL_PROCESS = """
import subprocess, sys
import numpy as np
touched = np.ones(64_000_000)
code = "from shared.profile import peak_memory_mb; print(peak_memory_mb())"
print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
"""


def test_a_worker_s_peak_memory_is_its_own_not_its_parent_s():
    # ru_maxrss carries over fork and exec: every benchmark worker reported the parent's
    # 352 MB, whatever its implementation and batch.
    done = subprocess.run(
        [sys.executable, "-c", PARENT_OF_A_SMALL_PROCESS], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert 10 < float(done.stdout) < 400, done.stdout
