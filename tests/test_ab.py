"""benchmark.py --against REV: the working tree's training step against a commit's; and
--paired: each implementation's step against PyTorch's. The two sides step in turn in two
processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import shared.ab
from shared.ab import extract_commit
from shared.backend import IMPLEMENTATIONS
from shared.errors import UsageError
from tests.conftest import clone_with_this_checkouts
from tests.test_training import ROOT, run_script

SLEEP_SECONDS = 0.02
# The lab network has two ReLUs: a step of the slowed tree sleeps twice.
SLOWED_RELU = f"""

_relu_forward = relu_forward


def relu_forward(x):
    import time

    time.sleep({SLEEP_SECONDS})
    return _relu_forward(x)
"""


def test_a_slower_working_tree_shows_against_its_commit(tmp_path):
    # This checkout's measuring code (all of shared/) committed in the clone, whatever it imports.
    shared_code = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "shared").glob("*.py"))
    clone, git = clone_with_this_checkouts(tmp_path / "clone", *shared_code)
    layers = clone / "impl_numpy" / "layers.py"
    layers.write_text(layers.read_text() + SLOWED_RELU)  # left uncommitted: the working tree
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(clone / "scripts" / "benchmark.py"), "--against", "HEAD",
         "--impl", "numpy", "--arch", "lab", "--batch-sizes", "16", "--steps", "6",
         "--out", str(out)],
        capture_output=True, text=True, cwd=clone, timeout=600,
        env={**os.environ, "PYTHONPATH": str(clone)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "ab.json").read_text())
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert saved["against"] == head.strip()
    (row,) = saved["rows"]
    assert (row["impl"], row["batch_size"], row["pairs"]) == ("numpy", 16, 6)
    # Only the working tree sleeps: the commit's side ran the commit's code.
    assert row["tree_ms"] - row["against_ms"] > 2 * SLEEP_SECONDS * 1e3 * 0.9
    assert row["ratio"] > 1 and row["ratio_quartiles"][0] > 1
    assert f"{row['ratio']:.3f}" in (out / "ab.md").read_text()


def test_a_revision_that_reads_as_an_option_is_refused_in_one_line(tmp_path):
    # An unknown name is test_benchmark.py's; this one git would take as its own flag.
    result = run_script(
        "benchmark.py", "--against=--version", "--impl", "numpy", "--steps", "2",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(f"--against --version: no such commit in {ROOT}")
    assert not (tmp_path / "ab.json").exists()


def fake_sides(monkeypatch, seconds) -> tuple[list, list]:
    """Workers that answer each step at once with seconds(label, code) -> each start's (label,
    code) and each step's (the pair of starts it ran under, label), in order."""
    starts, steps = [], []

    @contextmanager
    def start_side(flag, label, code, arch, batch_size, timeout):
        starts.append((label, code))
        started = (len(starts) - 1) // 2

        class Side:
            def step(self) -> float:
                steps.append((started, label))
                return seconds(label, code)

        yield Side()

    monkeypatch.setattr(shared.ab, "start_side", start_side)
    monkeypatch.setattr(shared.ab, "SETTLE_SECONDS", 0.0)
    return starts, steps


@pytest.mark.parametrize(("pairs", "halves"), [(5, [3, 2]), (1, [1])])
def test_each_side_is_started_first_for_half_the_pairs(monkeypatch, pairs, halves):
    """The working tree's worker is started first for the first half of the pairs (with the
    odd one) and the commit's for the rest; every ratio is the working tree's step over the
    commit's, whichever started first."""
    starts, steps = fake_sides(monkeypatch, lambda label, _: {"tree": 0.3, "against": 0.1}[label])
    codes = {"tree": shared.ab.Code(Path("tree"), "numpy"),
             "against": shared.ab.Code(Path("commit"), "numpy")}  # fmt: skip
    row = shared.ab.compare("--against", codes, "lab", 8, pairs, 1.0)
    assert [label for label, _ in starts] == ["tree", "against", "against", "tree"][
        : 2 * len(halves)
    ]
    for half, count in enumerate(halves):
        assert steps.count((half, "tree")) == steps.count((half, "against")) == count
    assert row["ratio"] == pytest.approx(3.0) and row["ratio_quartiles"] == pytest.approx([3, 3])
    assert (row["tree_ms"], row["against_ms"]) == pytest.approx((300, 100))


def test_paired_steps_each_implementation_against_pytorch_from_the_working_tree(
    monkeypatch, tmp_path
):
    measured = [impl for impl in IMPLEMENTATIONS if impl != "torch"]
    seconds = {"torch": 0.1} | {impl: 0.1 * (k + 2) for k, impl in enumerate(measured)}
    starts, _ = fake_sides(monkeypatch, lambda _, code: seconds[code.impl])
    assert shared.ab.run_paired(list(IMPLEMENTATIONS), "lab", [8, 16], 2, 1.0, tmp_path) == 0
    # Every side runs this tree's code; each pairing is an implementation and PyTorch, its two
    # halves in turn.
    assert {code.root for _, code in starts} == {shared.ab.PROJECT}
    assert all((label == "torch") == (code.impl == "torch") for label, code in starts)
    pairings = [{starts[i][1].impl, starts[i + 1][1].impl} for i in range(0, len(starts), 2)]
    assert pairings == [{impl, "torch"} for _ in (8, 16) for impl in measured for _ in (1, 2)]
    saved = json.loads((tmp_path / "paired.json").read_text())
    rows = {(r["impl"], r["batch_size"]): r for r in saved["rows"]}
    assert set(rows) == {(impl, b) for impl in measured for b in (8, 16)}
    for (impl, _), r in rows.items():
        assert set(r) == {"impl", "batch_size", "pairs", "impl_ms", "torch_ms", "ratio",
                          "ratio_quartiles"}  # fmt: skip
        assert r["ratio"] == pytest.approx(seconds[impl] / seconds["torch"])
        assert (r["impl_ms"], r["torch_ms"]) == pytest.approx((1e3 * seconds[impl], 100))
    first, ratio = measured[0], seconds[measured[0]] / seconds["torch"]
    line = f"| {first} | 8 | 2 | {1e3 * seconds[first]:.2f} | 100.00 | {ratio:.3f} | {ratio:.3f}-"
    assert line in (tmp_path / "paired.md").read_text()


def test_paired_runs_real_workers_and_writes_its_tables(tmp_path):
    result = run_script(
        "benchmark.py", "--paired", "--impl", "numpy", "--arch", "lab", "--batch-sizes", "16",
        "--steps", "4", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "paired.json").read_text())
    assert saved["reference"] == "torch"
    (row,) = saved["rows"]
    assert (row["impl"], row["batch_size"], row["pairs"]) == ("numpy", 16, 4)
    assert row["impl_ms"] > 0 and row["torch_ms"] > 0
    text = (tmp_path / "paired.md").read_text()
    assert "| the implementation, ms a step | torch, ms a step |" in text
    assert f"| {row['ratio']:.3f} |" in text


def test_a_paired_worker_that_does_not_answer_is_named_in_one_line(tmp_path):
    result = run_script(
        "benchmark.py", "--paired", "--impl", "numpy", "--arch", "lab", "--batch-sizes", "16",
        "--timeout", "0.01", "--out", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "--paired: numpy at batch 16 did not answer within 0.01 s (--timeout); stopped it"
    )
    assert not (tmp_path / "paired.json").exists() and not (tmp_path / "paired.md").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--paired", "--impl", "torch"],
            "--paired: name an implementation besides torch with --impl",
        ),
        (["--paired", "--against", "HEAD"], "--against and --paired: choose one"),
        (["--profile", "--paired"], "--profile and --paired: choose one"),
        # Found out once the folder is made: it goes again.
        (["--against", "no-such-revision"], "no-such-revision: no such commit in " + str(ROOT)),
    ],
)
def test_a_paired_run_that_cannot_work_is_refused_in_one_line(tmp_path, flags, message):
    out = tmp_path / "out"
    result = run_script("benchmark.py", *flags, "--steps", "2", "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(message)
    assert not out.exists()


def test_git_s_own_failure_is_named_not_taken_for_a_missing_commit(tmp_path, monkeypatch):
    """A checkout git distrusts (another user's) or no repository at all said "no such
    commit"."""
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-repository"))
    with pytest.raises(UsageError, match=r"^--against HEAD: git: not a git repository"):
        extract_commit("HEAD", tmp_path / "tree")


@pytest.mark.parametrize("mode", [["--paired", "--impl", "jax"], ["--against", "HEAD"]])
def test_an_odd_number_of_pairs_is_refused(mode, tmp_path):
    """One side was started first once more, and the report said each was for half."""
    result = run_script("benchmark.py", *mode, "--steps", "3", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"benchmark.py: error: --steps 3: {mode[0]} takes an even number of pairs, each side "
        "started first in half of them"
    )
