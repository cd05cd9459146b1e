"""No run lost, none shared, resume exact, every number finite: train.py and the other commands
under misuse (issue 11)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import shared.checkpoint
import threefold
from shared.backend import IMPLEMENTATIONS
from shared.checkpoint import load_checkpoint
from shared.config import ADDED_FIELDS, FIELDS, TrainConfig, check_config
from shared.data import load_dataset
from shared.errors import CheckpointError, Interrupted, OutputError, UsageError
from shared.io import (
    ELSEWHERE_DEAD_AFTER_SECONDS,
    TEMPORARY_NAME_EXTRA,
    remove_stale_temporaries,
    staged,
    temporary_prefix,
    write_json,
    write_text,
)
from shared.loop import train
from shared.network import load_weights
from shared.outputs import check_out_files, fresh_run_dir, hold, replacing_run
from shared.spec import get_arch
from shared.train import main as train_main
from tests.conftest import make_dataset_dir, usage_error
from tests.test_training import ROOT, run_script

QUICK = ["--epochs", "1", "--batch-size", "16"]


def strict_json(path: Path):
    """Parse as strict JSON: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --- no run overwritten or shared -----------------------------------------------------------


def test_the_same_command_twice_keeps_both_runs(tiny_data_dir, tmp_path):
    for _ in range(2):
        result = run_script("train.py", *QUICK, "--data-dir", str(tiny_data_dir), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    first, second = tmp_path / "runs" / "numpy-lab", tmp_path / "runs" / "numpy-lab-2"
    assert "writing to runs/numpy-lab-2" in result.stdout
    for run in (first, second):
        assert load_checkpoint(run / "checkpoint.npz").meta["epoch"] == 1
        assert strict_json(run / "metrics.json")["test"]["acc"] >= 0


def test_a_limited_run_says_how_many_images_it_trains_on(tiny_data_dir, tmp_path):
    """Its first line said the split's 100, whatever --limit."""
    data, out = ["--data-dir", str(tiny_data_dir)], ["--out", str(tmp_path / "run")]
    result = run_script("train.py", *QUICK, "--limit", "40", *data, *out)
    assert result.returncode == 0, result.stderr
    assert "| 40 train (--limit; of 100), " in result.stdout.splitlines()[0]


def test_a_folder_named_with_control_characters_is_reported_in_one_line(tiny_data_dir, tmp_path):
    """The lines that name what a command wrote printed the name raw: a line break in it broke
    the line, and a terminal acted on a colour code."""
    out = tmp_path / "run\n\x1b[31mzq"
    trained = run_script("train.py", *QUICK, "--data-dir", str(tiny_data_dir), "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    evaluated = run_script(
        "evaluate.py", str(out / "checkpoint.npz"), "--data-dir", str(tiny_data_dir)
    )
    assert evaluated.returncode == 0, evaluated.stderr
    for said in (trained.stdout, evaluated.stdout):
        assert "\x1b" not in said and "zq" in said
        assert all("zq" not in line or "run\\n\\x1b[31mzq" in line for line in said.splitlines())
    assert (out / "evaluation.json").is_file()


def test_fresh_run_dirs_are_distinct(tmp_path):
    folders = [fresh_run_dir(tmp_path / "runs" / "jax-lab") for _ in range(3)]
    assert [f.name for f in folders] == ["jax-lab", "jax-lab-2", "jax-lab-3"]


def test_an_out_folder_holding_a_run_is_refused_unless_overwritten(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    args = [*QUICK, "--data-dir", str(tiny_data_dir), "--out", str(out)]
    assert run_script("train.py", *args).returncode == 0
    before = (out / "checkpoint.npz").read_bytes()
    result = run_script("train.py", *args, "--seed", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {out}: already holds a run" in result.stderr
    assert f"--resume {out}" in result.stderr and "--overwrite" in result.stderr
    assert (out / "checkpoint.npz").read_bytes() == before
    result = run_script("train.py", *args, "--seed", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out / "checkpoint.npz").meta["config"]["seed"] == 1


def test_an_overwriting_run_that_saves_nothing_leaves_the_old_run_in_place(
    finished_run, tiny_data_dir
):
    (finished_run / "evaluation.json").write_text("{}")  # an evaluation of the old run
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    diverges = ["--lr", "1e30", "--warmup", "0", "--no-flip", "--seed", "1", "--overwrite"]
    result = run_script(
        "train.py", *QUICK, *diverges, "--data-dir", str(tiny_data_dir), "--out", str(finished_run)
    )
    assert result.returncode == 1 and "nothing was saved" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == before
    assert not [p for p in finished_run.iterdir() if p.name.startswith(".replaced")]
    # One that saves replaces the old run whole: no evaluation of the old run stays beside it.
    result = run_script(
        "train.py",
        *QUICK,
        "--seed",
        "1",
        "--overwrite",
        "--data-dir",
        str(tiny_data_dir),
        "--out",
        str(finished_run),
    )
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(finished_run / "checkpoint.npz").meta["config"]["seed"] == 1
    assert not (finished_run / "evaluation.json").exists()


def test_a_file_written_over_a_fifo_is_refused_and_the_fifo_kept(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    network = threefold.network("flatten-fc10")
    for write in (network.to_onnx, network.to_safetensors):
        with pytest.raises(OutputError, match=f"{fifo}: not a regular file"):
            write(fifo)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_folder_read_as_a_file_is_named(tmp_path):
    for name in ("d.safetensors", "d.onnx"):
        (tmp_path / name).mkdir()
        with pytest.raises(UsageError, match=f"{name}.*: not a regular file"):
            threefold.load(tmp_path / name)


@pytest.mark.parametrize(
    ("script", "flags"),
    [
        ("train.py", ["--out", ""]),
        ("benchmark.py", ["--out", " "]),
        ("export.py", ["x.npz", "--onnx", ""]),
        ("crosscheck.py", ["--json", ""]),
    ],
)
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(script, flags, tmp_path):
    result = run_script(script, *flags, cwd=tmp_path)
    assert result.returncode == 2 and "an empty path" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_replaced_run_goes_only_once_its_replacement_has_finished(tmp_path, monkeypatch):
    old = {"checkpoint.npz": b"old run", "metrics.json": b"{}", "evaluation.json": b"{}"}

    def folder_with_the_old_run(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / ".replaced-x").mkdir()  # a killed process's leftover, not to be touched
        for file, content in old.items():
            (folder / file).write_bytes(content)
        return folder

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def set_aside(folder: Path) -> list[Path]:
        # Not by the name's last letter: mkdtemp's names end in an "x" one time in 37.
        return [p for p in folder.glob(".replaced-*") if p.name != ".replaced-x"]

    # The new run fails before saving: the old run is put back as it was.
    folder = folder_with_the_old_run("restored")
    with pytest.raises(OutputError, match=r"^disk full$"), replacing_run(folder):
        assert files(folder) == {}
        raise OutputError("disk full")
    assert files(folder) == old
    # It fails after saving: its checkpoint stays, and the old run too, named in the error.
    folder = folder_with_the_old_run("kept")
    kept_in = "the run it was to replace is kept in .*replaced-"
    with pytest.raises(Interrupted, match=kept_in), replacing_run(folder):
        (folder / "checkpoint.npz").write_bytes(b"new run, epoch 1")
        raise Interrupted("stopped in epoch 2")
    aside = set_aside(folder)
    assert len(aside) == 1 and files(aside[0]) == old
    # It fails before saving, and the folder refuses the old run back (made read-only
    # meanwhile): the old run stays aside, named; it was a second traceback, unnamed.
    folder = folder_with_the_old_run("unreturnable")
    real_replace = os.replace

    def refusing_to_put_back(source, target):
        if Path(source).parent.name.startswith(".replaced-"):
            raise PermissionError(1, "Operation not permitted")
        real_replace(source, target)

    with pytest.raises(OutputError, match=f"^disk full; {kept_in}"), replacing_run(folder):
        monkeypatch.setattr(os, "replace", refusing_to_put_back)  # once set aside
        raise OutputError("disk full")
    monkeypatch.undo()
    aside = set_aside(folder)
    assert len(aside) == 1 and files(aside[0]) == old
    # It finishes: the old run is gone, the leftover of another process stays.
    folder = folder_with_the_old_run("finished")
    with replacing_run(folder):
        (folder / "checkpoint.npz").write_bytes(b"new run, done")
    assert sorted(p.name for p in folder.iterdir()) == [".replaced-x", "checkpoint.npz"]


def test_a_run_an_overwrite_did_not_finish_replacing_is_named_by_the_next_command(
    tiny_data_dir, tmp_path
):
    """A process killed while replacing a run leaves the old run in .replaced-*, which no
    message named: the next command that holds the folder does."""
    out = tmp_path / "run"
    aside = out / ".replaced-abc"
    aside.mkdir(parents=True)
    (aside / "checkpoint.npz").write_bytes(b"the old run")
    result = run_script("train.py", *QUICK, "--data-dir", str(tiny_data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"note: {aside} holds the files of a run that an --overwrite did not finish" in (
        result.stderr
    )
    assert (aside / "checkpoint.npz").read_bytes() == b"the old run"


def test_output_into_a_pipe_that_closes_is_no_traceback(finished_run, tiny_data_dir, tmp_path):
    # `| head -2` closes the pipe while evaluate.py still prints its table.
    evaluate = [
        sys.executable,
        str(ROOT / "scripts" / "evaluate.py"),
        str(finished_run / "checkpoint.npz"),
    ]
    command = " ".join([*evaluate, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "e")])
    done = subprocess.run(
        ["bash", "-c", f"{command} 2> {tmp_path / 'err'} | head -2; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
    )
    assert len(done.stdout.splitlines()) == 2
    assert "Traceback" not in (tmp_path / "err").read_text()
    assert done.returncode in (0, 141)  # 0 where the table fitted the pipe before it closed


def test_a_lock_deleted_by_hand_does_not_fail_the_run(tmp_path):
    with hold(tmp_path):
        (tmp_path / ".lock").unlink()
    # The block ended without an error, and the folder is free and clean for the next run.
    with hold(tmp_path):
        assert (tmp_path / ".lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_the_folder_refuses_to_remove_does_not_fail_the_run(tmp_path, monkeypatch):
    """A folder made read-only during the run: the lock's removal failed in a traceback."""

    def refused(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    with hold(tmp_path):
        monkeypatch.setattr(os, "unlink", refused)
    monkeypatch.undo()
    with hold(tmp_path):  # the lock left behind holds nothing
        pass


def test_a_file_of_the_user_s_under_the_lock_s_name_is_refused_and_kept(tmp_path):
    """It was truncated, given a pid, and deleted when the command ended."""
    (tmp_path / ".lock").write_text("my notes, not threefold's")
    refused = pytest.raises(UsageError, match=r"^--out .*: its \.lock is a file of other text")
    with refused, hold(tmp_path):
        pass
    assert (tmp_path / ".lock").read_text() == "my notes, not threefold's"
    (tmp_path / ".lock").write_text("12345\n")  # what a killed holder leaves
    with hold(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".lock").exists()


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    """The pid was written through it, over the target's content."""
    target = tmp_path / "precious.txt"
    target.write_text("the user's")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with (
        pytest.raises(UsageError, match=r"^--out .*run: cannot lock it \("),
        hold(tmp_path / "run"),
    ):
        pass
    assert target.read_text() == "the user's"


def test_a_held_folder_refuses_a_second_process_naming_the_first(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with hold(out):
        result = run_script("train.py", *QUICK, "--data-dir", str(tiny_data_dir), "--out", str(out))
    assert result.returncode == 2 and f"in use by a run of process {os.getpid()}" in result.stderr
    assert not (out / "checkpoint.npz").exists()
    # Released: the folder takes a run again, and the lock leaves nothing behind.
    result = run_script("train.py", *QUICK, "--data-dir", str(tiny_data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "curves.png", "metrics.json"]


def test_a_killed_holder_never_leaves_the_folder_locked(tmp_path):
    code = (
        "import sys, time, pathlib\n"
        "from shared.outputs import hold\n"
        "with hold(pathlib.Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"process {holder.pid}"), hold(tmp_path):
        pass
    holder.kill()
    holder.wait()
    with hold(tmp_path):
        pass


def test_start_up_clean_up_spares_live_writers_and_files_not_its_own(tmp_path):
    mine = tmp_path / f"{temporary_prefix('metrics.json', os.getpid())}abcd1234.tmp"
    dead = tmp_path / f"{temporary_prefix('metrics.json', 999999999)}abcd1234.tmp"
    # The user's own hidden temporaries, and another file's, were deleted too.
    notes = f"{temporary_prefix('notes.txt', 999999999)}abcd1234.tmp"
    # A writer's on another machine sharing the folder, or in another container: its pid,
    # dead here, was taken for a dead writer's, and its write in progress deleted.
    elsewhere = f".metrics.json.{'f' * 8}.999999999.abcd1234.tmp"
    users = [tmp_path / name for name in (".mywork.tmp", notes, elsewhere)]
    # Untouched for longer than any write takes, another host's, and an older version's
    # (named without a host), are taken for dead: a container per command never cleaned up.
    old_elsewhere = tmp_path / f".checkpoint.npz.{'f' * 8}.999999999.abcd1234.tmp"
    old_version = tmp_path / ".checkpoint.npz.999999999.abcd1234.tmp"
    for path in (mine, dead, *users, old_elsewhere, old_version):
        path.write_text("partial")
    # An older version's name of a live process of this host, untouched for long, is its.
    old_but_alive = tmp_path / f".checkpoint.npz.{os.getpid()}.efgh5678.tmp"
    old_but_alive.write_text("partial")
    long_ago = time.time() - ELSEWHERE_DEAD_AFTER_SECONDS - 60
    for path in (old_elsewhere, old_version, old_but_alive):
        os.utime(path, (long_ago, long_ago))
    # Without the folder's clock, none is old: this host's may run hours ahead of an NFS
    # server's, and another host's write a second old was deleted.
    remove_stale_temporaries(tmp_path, ("metrics.json", "checkpoint.npz"))
    assert mine.exists() and not dead.exists() and all(path.exists() for path in users)
    assert old_elsewhere.exists() and old_version.exists()
    remove_stale_temporaries(tmp_path, ("metrics.json", "checkpoint.npz"), time.time())
    assert not old_elsewhere.exists() and not old_version.exists() and old_but_alive.exists()
    assert all(path.exists() for path in users)


def test_a_write_removes_what_a_killed_writer_of_its_file_left(tmp_path):
    # A killed export.py left its graph's temporary, which no later export removed.
    target = tmp_path / "m.onnx"
    dead = tmp_path / f"{temporary_prefix('m.onnx', 999999999)}abcd1234.tmp"
    # The graph itself, written under the temporary staged() holds the name with.
    dead_staged = tmp_path / f"{temporary_prefix(dead.name, 999999999)}efgh5678.tmp"
    mine = tmp_path / f"{temporary_prefix('m.onnx', os.getpid())}abcd1234.tmp"  # in progress
    for path in (dead, dead_staged, mine):
        path.write_text("partial")
    with staged(target) as hidden:
        write_text(hidden, "graph")
    assert target.read_text() == "graph" and mine.exists()
    assert not dead.exists() and not dead_staged.exists()


def test_a_leftover_that_cannot_be_deleted_fails_no_write(tmp_path, monkeypatch):
    # Another user's, in a sticky folder such as /tmp: the write failed, "Operation not
    # permitted", on a file it could write.
    (tmp_path / f"{temporary_prefix('m.json', 999999999)}abcd1234.tmp").write_text("partial")

    def refused(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(Path, "unlink", refused)
    write_text(tmp_path / "m.json", "{}")
    assert (tmp_path / "m.json").read_text() == "{}"


def test_the_longest_name_an_output_may_take_is_written_with_another(tmp_path):
    # Written with others, a file is written under a temporary's temporary: a name the
    # check let through (room for one) failed after the command's work.
    room = os.pathconf(tmp_path, "PC_NAME_MAX") - 2 * TEMPORARY_NAME_EXTRA
    longest = tmp_path / ("g" * room)
    check_out_files([("--onnx", longest)])
    with staged(longest) as hidden:
        write_text(hidden, "graph")
    assert longest.read_text() == "graph"
    with pytest.raises(UsageError, match=f"a name of {room + 1} bytes; at most {room} here"):
        check_out_files([("--onnx", tmp_path / ("g" * (room + 1)))])


# --- resume ---------------------------------------------------------------------------------


@pytest.fixture
def finished_run(tiny_data_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    args = ["--epochs", "2", "--batch-size", "16", "--lr", "0.02", "--out", str(out)]
    result = run_script("train.py", *args, "--data-dir", str(tiny_data_dir))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("train.py", ["--plain", "--recipe", "deep"], "--plain and --recipe set the same setting"),
        ("train.py", ["--recipe", "fast", "--recipe", "deep"], "--recipe given twice"),
        ("train.py", ["--arch", "lab", "--arch", "pool"], "--arch given twice"),
        ("train.py", ["--flip", "--no-flip"], "--flip and --no-flip set the same setting"),
        ("train.py", ["--epochs", "1", "--epochs=2", "--epochs", "3"], "--epochs given 3 times"),
        ("evaluate.py", ["a.npz", "--out", "x", "--out", "y"], "--out given twice"),
    ],
)
def test_a_setting_given_twice_is_refused_not_the_last_kept(script, flags, message, tmp_path):
    # argparse keeps the last: `--plain --recipe deep` trained the deep recipe without a word.
    result = run_script(script, *flags, cwd=tmp_path)
    assert message in usage_error(result, script)
    assert list(tmp_path.iterdir()) == []


def test_the_api_loads_a_float64_run_in_float64(tiny_data_dir, tmp_path):
    # threefold.load cast every checkpoint to float32: a float64 run lost its precision, and
    # to_torch built a float32 module from it.
    out = tmp_path / "run64"
    flags = ["--dtype", "float64", "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    result = run_script("train.py", *flags, "--data-dir", str(tiny_data_dir))
    assert result.returncode == 0, result.stderr
    network = threefold.load(out / "checkpoint.npz")
    stored = load_checkpoint(out / "checkpoint.npz").params
    for name, value in network.tensors.items():
        assert value.dtype == np.float64 and np.array_equal(value, stored[name]), name
    assert next(threefold.to_torch(network).parameters()).dtype == torch.float64


def test_the_api_writes_over_no_run_checkpoint_or_data(finished_run, tiny_data_dir, monkeypatch):
    """Network.to_onnx and to_safetensors refuse what export.py refuses: a run's files, a
    checkpoint under another name, the data's files. A run's checkpoint was written over,
    and the run lost."""
    monkeypatch.setenv("THREEFOLD_DATA", str(tiny_data_dir))
    network = threefold.load(finished_run / "checkpoint.npz")
    renamed = finished_run.parent / "weights.bin"
    shutil.copy(finished_run / "checkpoint.npz", renamed)
    data = sorted(tiny_data_dir.iterdir())[0]
    kept = {p: p.read_bytes() for p in [*finished_run.iterdir(), renamed, data]}
    refusals = {
        finished_run / "checkpoint.npz": "one of the files of the run",
        finished_run / "metrics.json": "one of the files of the run",
        renamed: "a checkpoint of threefold's",
        data: "the same file as the data",
    }
    for write in (network.to_onnx, network.to_safetensors):
        for path, message in refusals.items():
            with pytest.raises(UsageError, match=f"{write.__name__} {path}: {message}"):
                write(path)
    assert {p: p.read_bytes() for p in kept} == kept
    assert threefold.load(finished_run / "checkpoint.npz").tensors.keys() == network.tensors.keys()


def test_evaluate_writes_neither_over_its_checkpoint_nor_into_another_run(
    finished_run, tiny_data_dir, tmp_path
):
    # Both were written: another run's folder then mixed two runs' files, and a checkpoint
    # named evaluation.json was replaced by the report.
    data = ("--data-dir", str(tiny_data_dir))
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    checkpoint = finished_run / "checkpoint.npz"
    line = usage_error(
        run_script("evaluate.py", str(checkpoint), "--out", str(other), *data), "evaluate.py"
    )
    assert f"one of the files of the run in {other}" in line
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    named = tmp_path / "lone" / "evaluation.json"
    named.parent.mkdir()
    shutil.copy(checkpoint, named)
    line = usage_error(run_script("evaluate.py", str(named), *data), "evaluate.py")
    assert f"the same file as checkpoint {named}" in line
    assert named.read_bytes() == checkpoint.read_bytes()
    # Into its own run's folder, the default, it writes its report.
    assert run_script("evaluate.py", str(checkpoint), *data).returncode == 0
    assert (finished_run / "evaluation.json").exists()


def test_resume_compares_the_flags_as_typed(finished_run, tiny_data_dir):
    data = ["--data-dir", str(tiny_data_dir)]
    # Agreeing flags are accepted, even where they equal the defaults.
    result = run_script("train.py", "--resume", str(finished_run), "--lr", "0.02", *data)
    assert result.returncode == 0, result.stderr
    result = run_script(
        "train.py", "--resume", str(finished_run), "--lr", "0.03", "--arch", "pool", *data
    )
    assert result.returncode == 2
    assert "--arch pool (the run has lab)" in result.stderr
    assert "--lr 0.03 (the run has 0.02)" in result.stderr
    # --tta as it applies: the run's None averages mirrors, as it trained with flips.
    for flag, agrees in (("--tta", True), ("--no-tta", False)):
        result = run_script("train.py", "--resume", str(finished_run), flag, *data)
        assert (result.returncode == 0) == agrees, result.stderr
        assert agrees or "--tta False (the run has True)" in result.stderr
    result = run_script("train.py", "--resume", str(finished_run), "--epochs", "15", *data)
    assert result.returncode == 2 and "--epochs 15" in result.stderr
    assert "planned for 2 epochs" in result.stderr and "start a new run" in result.stderr
    for extra in (["--out", str(finished_run.parent)], ["--overwrite"]):
        result = run_script("train.py", "--resume", str(finished_run), *extra, *data)
        assert result.returncode == 2 and f"{extra[0]}: --resume continues" in result.stderr


def test_resume_refuses_a_flag_before_it_reads_a_tensor(finished_run, monkeypatch, capsys):
    # It read the checkpoint whole twice, the first still held while the second was read: a
    # network of 24.6M parameters took 1.37 GiB and 7.5 s to refuse a flag typed wrong.
    def read_tensor(*args, **kwargs):
        raise AssertionError("a tensor read")

    monkeypatch.setattr(shared.checkpoint, "_read_tensor", read_tensor)
    assert train_main(["--resume", str(finished_run), "--lr", "5"]) == 2
    assert "--lr 5.0 (the run has 0.02)" in capsys.readouterr().err


def test_resume_finds_its_data_and_refuses_other_data(finished_run, tmp_path):
    # Without --data-dir the run goes on with the data it was trained on; a finished run is
    # left as it is, its metrics as it wrote them.
    metrics = (finished_run / "metrics.json").read_bytes()
    result = run_script("train.py", "--resume", str(finished_run))
    assert result.returncode == 0, result.stderr
    assert "the run is finished (its test and curves are written); nothing to do" in result.stdout
    assert (finished_run / "metrics.json").read_bytes() == metrics
    other = make_dataset_dir(tmp_path / "other", seed=1)
    result = run_script("train.py", "--resume", str(finished_run), "--data-dir", str(other))
    assert result.returncode == 2 and "holds other data" in result.stderr
    assert "--data-dir" in result.stderr and "Traceback" not in result.stderr
    # The run's own folder, its files changed: named again, it sent the user round.
    trained_on = json.loads((finished_run / "metrics.json").read_text())
    data_dir = Path(load_checkpoint(finished_run / "checkpoint.npz").meta["data"]["folder"])
    make_dataset_dir(data_dir, seed=1)
    result = run_script("train.py", "--resume", str(finished_run))
    said = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "--data-dir" not in said, said
    assert said.endswith("its files have changed since; put the run's data back there")
    assert trained_on == json.loads((finished_run / "metrics.json").read_text())


def test_a_resumed_download_leaves_the_run_s_own_data_alone(finished_run, tiny_data_dir):
    # --resume took the folder the checkpoint names, and --download wrote the official
    # files over the run's own data: the run could never be resumed again.
    before = {p.name: p.read_bytes() for p in tiny_data_dir.iterdir()}
    address = ["--download-url", "http://127.0.0.1:9/"]  # never reached
    result = run_script("train.py", "--resume", str(finished_run), "--download", *address)
    assert result.returncode == 1, result.stderr
    assert "is not the official" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in tiny_data_dir.iterdir()} == before


def test_a_checkpoint_records_its_data(finished_run, tiny_data_dir):
    data = load_checkpoint(finished_run / "checkpoint.npz").meta["data"]
    assert data["dataset"] == "fashion-mnist"
    assert data["folder"] == str(tiny_data_dir.resolve()) and len(data["sha256"]) == 64


def rewind_to_epoch_1(path: Path, config_arch: str) -> None:
    """Make the checkpoint at `path` (of a 2-epoch run) claim epoch 1, its run configured with
    `config_arch` while its field arch still names the network of its tensors."""
    arrays = dict(np.load(path))
    meta = json.loads(str(arrays["meta"]))
    meta |= {"epoch": 1, "history": meta["history"][:1]}
    meta["config"]["arch"] = config_arch
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.mark.parametrize("config_arch", ["pool", "net.json"])
def test_resume_refuses_a_stored_network_its_tensors_are_not_and_reads_no_file(
    finished_run, tiny_data_dir, tmp_path, config_arch
):
    # A file the checkpoint names: another network, which a resume must never read or build.
    (tmp_path / "net.json").write_text('{"layers": ["flatten", "fc64", "relu", "fc10"]}')
    path = finished_run / "checkpoint.npz"
    rewind_to_epoch_1(path, config_arch)
    result = run_script(
        "train.py", "--resume", str(finished_run), "--data-dir", str(tiny_data_dir), cwd=tmp_path
    )
    # Refused in one line naming the field and the network the tensors are, the run as it was.
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"config.arch {config_arch!r}" in result.stderr, result.stderr
    assert "is not the checkpoint's network 'lab'" in result.stderr, result.stderr
    assert load_checkpoint(path).meta["epoch"] == 1


def test_every_setting_of_a_run_has_its_bound():
    """A field of TrainConfig without a bound would be stored unchecked, and be a KeyError
    on resume."""
    assert set(FIELDS) == set(TrainConfig.__dataclass_fields__)
    assert set(ADDED_FIELDS) <= set(FIELDS)


def edit_stored_config(path: Path, **fields) -> None:
    """Change values of the run configuration stored in the checkpoint at `path`."""
    arrays = dict(np.load(path))
    meta = json.loads(str(arrays["meta"]))
    meta["config"].update(fields)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("dtype", "float16", "not one of float32, float64"),
        ("shift", 100, "out of range (must be >= 0 and < 28)"),
        ("schedule", "bogus", "not one of constant, cosine, linear"),
        ("lr", float("nan"), "out of range (must be > 0)"),
        ("momentum", 1.5, "out of range (must be >= 0 and < 1)"),
        ("batch_size", 0, "out of range (must be >= 1)"),
        ("seed", -1, "out of range (must be >= 0 and < 9223372036854775808)"),
        ("init", "xavier", "not one of he, lab, torch"),
        ("flip", 1, "not true or false"),
        ("warmup", 99.0, "--warmup 99 is more than half of --epochs 2"),
        ("batch_size", 10**5, "--batch-size 100000 exceeds the"),  # in range, not for this data
    ],
)
def test_resume_checks_every_stored_setting_as_its_flag(finished_run, field, value, problem):
    path = finished_run / "checkpoint.npz"
    edit_stored_config(path, **{field: value})
    before = path.read_bytes()
    result = run_script("train.py", "--resume", str(finished_run))
    assert result.returncode == 1, result.stderr
    assert "meta field config" in result.stderr and problem in result.stderr, result.stderr
    named = (f"config.{field} ", f"--{field.replace('_', '-')} ")  # the field, or its flag
    assert any(name in result.stderr for name in named), result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert path.read_bytes() == before  # nothing trained, nothing written


# --- signals --------------------------------------------------------------------------------


def start(out: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            *("--data-dir", str(data_dir), "--out", str(out), "--batch-size", "16"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read the child's output until a line holds `text`: an event, not a guess of time."""
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended without printing {text!r}: {proc.stderr.read()}")


def test_sigterm_is_taken_like_ctrl_c(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(out, tiny_data_dir, "--epochs", "400")
    wait_for_line(proc, "| Epoch:  2 |")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM) in epoch" in stderr and "Traceback" not in stderr
    assert f"--resume {out} --data-dir {tiny_data_dir}" in stderr
    ckpt = load_checkpoint(out / "checkpoint.npz")
    assert ckpt.meta["epoch"] == len(strict_json(out / "metrics.json")["history"]) >= 2


def test_interrupted_after_the_last_epoch_says_how_to_finish(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()

    def stop_at_the_test(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("shared.loop.evaluate_test_set", stop_at_the_test)
        with pytest.raises(Interrupted, match="after the last epoch") as stopped:
            train(TrainConfig(epochs=2, batch_size=16), load_dataset(tiny_data_dir), out)
    message = str(stopped.value)
    assert "all 2 epochs are saved" in message and f"--resume {out}" in message
    assert "test" not in strict_json(out / "metrics.json")
    result = run_script("train.py", "--resume", str(out))
    assert result.returncode == 0, result.stderr
    assert "test" in strict_json(out / "metrics.json") and (out / "curves.png").exists()


# --- numbers and bounds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "nan"], "--lr"),
        (["--momentum", "nan"], "--momentum"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--label-smoothing", "nan"], "--label-smoothing"),
        (["--warmup", "nan"], "--warmup"),
        (["--shift", "30"], "--shift"),
        (["--seed", "-1"], "--seed"),
        (["--warmup", "5", "--epochs", "2"], "--warmup 5 is more than half of --epochs 2"),
        (["--batch-size", "1000"], "--batch-size 1000 exceeds the 100 training images"),
    ],
)
def test_numbers_out_of_bounds_are_usage_errors(args, message, tiny_data_dir, tmp_path):
    result = run_script(
        "train.py", *args, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "checkpoint.npz").exists()


@pytest.mark.parametrize(("field", "text"), [("epochs", "٣"), ("lr", "1_0"), ("seed", "1_0")])
def test_a_number_is_written_in_ascii_digits(field, text):
    # Python's int and float read both: --epochs=٣ trained three epochs.
    with pytest.raises(ValueError, match="in ASCII digits"):
        FIELDS[field].parse(text)
    with pytest.raises(UsageError, match="token 'conv٣' is malformed"):
        get_arch("conv٣-flatten-fc10")


def test_help_states_the_bounds():
    text = " ".join(run_script("train.py", "--help").stdout.split())  # as one line, unwrapped
    assert "N < 28" in text and "at most half of --epochs" in text
    assert "at most the number of training images" in text
    # The defaults a run takes were said for --lr alone (--impl numpy, --epochs 15, ...).
    for flag, said in [
        ("--impl", "implementation to train (default: numpy)"),
        ("--epochs", "1 to 1000 (default: 15)"),
        ("--weight-decay", "decoupled for adamw) (default: 0.001)"),
        ("--nesterov", "(default: on)"),
        ("--init", "xavier-normal (Glorot's) (default: he)"),  # "PyTorch's default" hid it
    ]:
        assert said in text, flag
    assert "(default: None)" not in text and "default 0.03, with Adam 0.001)" in text


def test_a_diverging_run_names_the_flags_involved(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        "train.py", "--epochs", "3", "--batch-size", "16", "--lr", "1e30", "--warmup", "0",
        "--data-dir", str(tiny_data_dir), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "loss became" in result.stderr and "epoch 1" in result.stderr
    assert "--lr 1e+30, --momentum 0.9 --nesterov, --weight-decay 0.001" in result.stderr
    assert "nothing was saved" in result.stderr
    assert not out.exists()  # the folder the run made, left empty, went with it


def test_a_run_overflowing_numpy_s_products_says_so_in_one_line(real_data, tmp_path):
    # NumPy's overflow warnings, with their source lines, came before the run's own line.
    result = run_script(
        "train.py", "--impl", "numpy", "--limit", "64", "--epochs", "2", "--lr", "1e10",
        "--data-dir", str(real_data.source), "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "the validation loss became non-finite in epoch 2 (--lr 1e+10" in line


def test_an_adam_run_that_diverges_names_adam_s_flags(tiny_data_dir, tmp_path):
    result = run_script(
        "train.py", "--optimizer", "adam", "--epochs", "1", "--batch-size", "16", "--lr", "1e30",
        "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert "--beta1 0.9 --beta2 0.999 --eps 1e-08" in line and "a larger --eps" in line
    assert "--momentum" not in line and "nesterov" not in line


@pytest.mark.parametrize(
    ("flag", "value", "became"),
    [
        ("--eps", "1e-50", "0"),
        ("--lr", "1e-46", "0"),
        ("--eps", "1e39", "inf"),
        ("--weight-decay", "1e39", "inf"),
        ("--weight-decay", "1e-50", "0"),
    ],
)
def test_a_value_that_is_0_or_inf_in_the_run_s_dtype_is_refused(flag, value, became, tmp_path):
    """Adam's eps of 1e-50 is 0 in float32: the run once went to NaN at its second step,
    blaming --momentum; --lr 1e-46 trained nothing and said nothing; an eps of 1e39, inf in
    float32, trained nothing and exited 0."""
    out = tmp_path / "run"
    result = run_script("train.py", flag, value, "--optimizer", "adam", "--out", str(out))
    line = usage_error(result)
    assert f"{flag} {float(value):g} is {became} in float32" in line and not out.exists()
    field = flag[2:].replace("-", "_")
    check_config(TrainConfig(dtype="float64", **{field: float(value)}))  # float64 holds it
    check_config(TrainConfig(eps=float(value)))  # SGD, which never uses it: a run resumes


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--eps", "1e-40", "--eps 1e-40 is subnormal in float32, which XLA takes for 0"),
        ("--beta1", "0.99999999", "--beta1 0.99999999 is 1 in float32, which the run uses"),
        ("--beta2", "0.9999999999", "--beta2 0.9999999999 is 1 in float32, which the run uses"),
    ],
)
def test_a_value_only_jax_would_take_otherwise_is_refused(flag, value, said):
    """NumPy and PyTorch trained; JAX's loss went to NaN, its message blaming --lr: XLA flushes
    a subnormal eps to 0 (0/0 where a gradient is 0), and optax's bias correction 1 - beta**t
    is 0 in float32 where beta rounds to 1."""
    with pytest.raises(UsageError, match=re.escape(said)):
        check_config(TrainConfig(optimizer="adam", **{flag[2:]: float(value)}))
    check_config(TrainConfig(optimizer="adam", dtype="float64", **{flag[2:]: float(value)}))


@pytest.mark.parametrize("flag", ["--momentum", "--label-smoothing"])
def test_a_value_below_1_that_is_1_in_the_run_s_dtype_is_refused(flag):
    # Both were taken as 1, which their ranges exclude.
    field = flag[2:].replace("-", "_")
    with pytest.raises(UsageError, match=re.escape(f"{flag} 0.999999999 is 1 in float32")):
        check_config(TrainConfig(**{field: 0.999999999}))
    check_config(TrainConfig(dtype="float64", **{field: 0.999999999}))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--momentum", "0", "--nesterov"), "--nesterov: needs --momentum above 0"),
        (("--momentum", "0"), "--momentum 0: Nesterov's look-ahead, on by default, needs"),
        (("--beta1", "0.5"), "--beta1: --optimizer sgd does not use it (it is adam and adamw's)"),
        (("--optimizer", "adam", "--momentum", "0.5"), "--momentum: --optimizer adam does not"),
        (("--optimizer", "adamw", "--no-nesterov"), "--nesterov: --optimizer adamw does not"),
        (("--download-url", "http://127.0.0.1:9"), "--download-url: without --download nothing"),
    ],
)
def test_a_flag_the_run_would_not_use_is_refused(flags, message, tmp_path):
    """Each trained, recording what it did not do (`nesterov: true` at momentum 0, which
    torch.optim.SGD itself refuses)."""
    out = tmp_path / "run"
    line = usage_error(run_script("train.py", *flags, "--out", str(out)))
    assert message in line and not out.exists()


def test_json_written_by_the_project_is_strict(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not (tmp_path / "x.json").exists()


# --- short runs -----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_epoch_on_5000_images_with_the_defaults_passes_75_percent(impl, real_data):
    """79 steps: the defaults' warm-up takes half of them and the rate comes down over the
    rest (it once rose over all of them, to 54.2%)."""
    record = train(TrainConfig(impl=impl, epochs=1, limit=5000), real_data, log=lambda _: None)
    assert record["test"]["acc"] >= 0.75


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_epoch_on_500_images_learns(impl, real_data):
    record = train(TrainConfig(impl=impl, epochs=1, limit=500), real_data, log=lambda _: None)
    assert record["history"][0]["val_acc"] > 0.4  # chance is 0.1


# --- the other commands -----------------------------------------------------------------------


def test_a_name_too_long_or_a_loop_of_links_is_one_line(finished_run, tmp_path):
    # Each was a traceback (OSError: File name too long; RuntimeError: Symlink loop), and a
    # name of 236 bytes was refused only after the check had run, for its temporary's sake.
    # Python 3.11's Path.exists() raises on a name past 255 bytes: a flag's path is refused
    # naming the flag, any other path (a model file in --arch) naming the path.
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    checkpoint, long, near = str(finished_run / "checkpoint.npz"), "x" * 300, "y" * 236
    check = ("--arch", "noconv", "--steps", "1", "--batch-size", "2", "--dtype", "float64")
    past = "one of its names is 300 bytes long, past the 255 a file system allows"
    cases = [
        (("export.py", checkpoint, "--onnx", str(tmp_path / f"{long}/m.onnx")), f"nx: {past}"),
        (("export.py", checkpoint, "--onnx", str(tmp_path / f"{near}.onnx")), "at most"),
        (("crosscheck.py", *check, "--json", str(tmp_path / f"{near}.json")), "at most"),
        (("crosscheck.py", *check, "--json", str(tmp_path / "loop1")), "Symlink loop"),
        (("export.py", str(tmp_path / "loop1"), "--onnx", str(tmp_path / "k.onnx")), "loop"),
        (("train.py", "--data-dir", str(tmp_path / long)), f"--data-dir: {past}"),
        (("train.py", "--out", str(tmp_path / long)), f"--out: {past}"),
        (("train.py", "--resume", str(tmp_path / long)), f"--resume: {past}"),
        (("evaluate.py", str(tmp_path / long / "checkpoint.npz")), f"checkpoint: {past}"),
        (("experiments.py", "--render-only", "--out", str(tmp_path / long)), f"--out: {past}"),
        (("benchmark.py", "--out", str(tmp_path / long)), f"--out: {past}"),
        (("crosscheck.py", "--arch", f"{tmp_path / long}/m.py:Net"), "longer than the file sys"),
    ]
    for command, message in cases:
        started = time.monotonic()
        line = usage_error(run_script(*command), command[0])
        assert message in line and time.monotonic() - started < 30, line


def test_export_reads_its_files_back_whatever_their_names_and_never_over_a_checkpoint(
    finished_run, tmp_path
):
    checkpoint = finished_run / "checkpoint.npz"
    graph, weights = tmp_path / "model.graph", tmp_path / "weights.bin"
    result = run_script("export.py", str(checkpoint), "--onnx", str(graph),
                        "--safetensors", str(weights))  # fmt: skip
    assert result.returncode == 0 and "0 predicted classes differ" in result.stdout, result.stderr
    # A copy of a run's checkpoint under another name was written over.
    kept = tmp_path / "kept.npz"
    shutil.copy(checkpoint, kept)
    line = usage_error(run_script("export.py", str(checkpoint), "--onnx", str(kept)), "export.py")
    assert f"--onnx {kept}: a checkpoint of threefold's" in line
    assert kept.read_bytes() == checkpoint.read_bytes()


def test_benchmark_does_not_write_its_results_over_its_network_s_file(tmp_path):
    # A spec named benchmark.json in --out was replaced by the results.
    spec = tmp_path / "benchmark.json"
    spec.write_text('{"layers": ["flatten", "fc10"]}')
    flags = ("--impl", "numpy", "--steps", "3", "--batch-sizes", "8", "--ladder-images", "0")
    result = run_script("benchmark.py", "--arch", str(spec), "--out", str(tmp_path), *flags)
    line = usage_error(result, "benchmark.py")
    assert f"--out {spec}: the same file as --arch {spec}" in line
    assert spec.read_text() == '{"layers": ["flatten", "fc10"]}'


def test_benchmark_refuses_an_impossible_batch_size_at_once(tmp_path):
    start_time = time.monotonic()
    out = tmp_path / "out"
    result = run_script("benchmark.py", "--batch-sizes", "64,100000", "--out", str(out))
    assert result.returncode == 2 and "--batch-sizes" in result.stderr and not out.exists()
    assert time.monotonic() - start_time < 30


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_crosscheck_checks_its_output_paths_before_working(flag, tmp_path):
    result = run_script("crosscheck.py", flag, str(tmp_path))
    assert result.returncode == 2 and f"{flag} {tmp_path}: is a folder" in result.stderr


def test_crosscheck_writes_over_neither_its_checkpoint_nor_its_other_output(finished_run, tmp_path):
    checkpoint = finished_run / "checkpoint.npz"
    before = checkpoint.read_bytes()
    spec = tmp_path / "net.json"
    spec.write_text('{"layers": ["flatten", "fc10"]}')
    result = run_script("crosscheck.py", "--arch", str(spec), "--json", str(spec))
    assert result.returncode == 2 and "the same file as --arch" in result.stderr, result.stderr
    assert spec.read_text() == '{"layers": ["flatten", "fc10"]}'
    for flags, message in [
        (["--json", str(checkpoint)], f"--json {checkpoint}: the same file as --checkpoint"),
        (["--plot", str(checkpoint)], "the same file as --checkpoint"),
        (["--json", str(tmp_path / "r"), "--plot", str(tmp_path / "r")], "the same file as"),
    ]:
        result = run_script("crosscheck.py", "--checkpoint", str(checkpoint), *flags)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert checkpoint.read_bytes() == before and not (tmp_path / "r").exists()


def test_a_model_weight_that_float32_cannot_hold_is_refused_before_any_work(tmp_path):
    model = tmp_path / "big.py"
    model.write_text(
        "import torch\n"
        "def Net():\n"
        "    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).double()\n"
        "    with torch.no_grad():\n"
        "        net[1].weight[0, 0] = 1e300\n"
        "    return net\n"
    )
    # Its float64 check used to come first, then 144 failed float32 rows.
    started = time.monotonic()
    result = run_script("crosscheck.py", "--arch", f"{model}:Net", "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "a value of 1e+300 does not fit float32" in result.stderr.strip().splitlines()[-1]
    assert time.monotonic() - started < 60


def test_a_checkpoint_s_weights_start_another_run_of_its_network(finished_run, tmp_path):
    # --weights run/checkpoint.npz failed in torch.load's own words; a .pt given to
    # threefold.load was "not a threefold checkpoint (.npz): a zip64 directory".
    path = finished_run / "checkpoint.npz"
    weights, digest = load_weights(path, get_arch("lab"), {})
    assert all(np.array_equal(v, load_checkpoint(path).params[k]) for k, v in weights.items())
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()  # the run records it
    with pytest.raises(UsageError, match=f"--weights {path}: holds lab, not pool"):
        load_weights(path, get_arch("pool"), {})
    torch.save(threefold.to_torch(threefold.load(path)).state_dict(), tmp_path / "lab.pt")
    with pytest.raises(CheckpointError, match="a state_dict, which names no layers; load it into"):
        threefold.load(tmp_path / "lab.pt")
    with pytest.raises(CheckpointError, match=f"^--weights {tmp_path / 'none.npz'}: no such"):
        load_weights(tmp_path / "none.npz", get_arch("lab"), {})  # named by its flag


def test_weights_that_float32_cannot_hold_are_refused_naming_the_file(tmp_path):
    # The message named the tensor alone, not --weights or its file.
    from safetensors.numpy import save_file

    network = threefold.network("flatten-fc10")
    tensors = {**network.tensors, "fc.weight": network.tensors["fc.weight"].astype(np.float64)}
    tensors["fc.weight"][0, 0] = 1e300
    save_file(tensors, tmp_path / "big.safetensors")
    out = tmp_path / "run"
    weights = ("--weights", str(tmp_path / "big.safetensors"))
    line = usage_error(
        run_script("train.py", "--arch", "flatten-fc10", *weights, "--out", str(out))
    )
    assert f"--weights {tmp_path / 'big.safetensors'}: fc.weight: a value of 1e+300" in line
    assert not out.exists()


def test_crosscheck_writes_its_files_before_its_table_reaches_a_closed_pipe(tmp_path):
    json_file, plot = tmp_path / "rows.json", tmp_path / "rows.png"
    flags = ["--arch", "noconv", "--dtype", "float64", "--steps", "1", "--batch-size", "2"]
    files = ["--quiet", "--json", str(json_file), "--plot", str(plot)]
    read, write = os.pipe()
    os.close(read)  # the reader went away: the table's first line meets a closed pipe
    try:
        done = subprocess.run([sys.executable, "scripts/crosscheck.py", *flags, *files],
                              stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              timeout=300)  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr
    assert json.loads(json_file.read_text()) and plot.read_bytes()[:4] == b"\x89PNG"


def test_crosscheck_checks_its_outputs_again_before_it_writes(tmp_path, monkeypatch, capsys):
    """A speedrun that stored its first finished runs in the folder while the cross-check
    ran had them replaced by the cross-check's rows."""
    import shared.crosscheck

    store = tmp_path / "runs.json"
    computed = shared.crosscheck.run_crosscheck

    def a_speedrun_writes_meanwhile(*args, **kwargs):
        rows = computed(*args, **kwargs)
        store.write_text('{"runs": {}}')
        return rows

    flags = ["--arch", "noconv", "--dtype", "float64", "--steps", "1", "--batch-size", "2"]
    for _ in range(2):  # a file of rows named runs.json is no store: written over again
        assert shared.crosscheck.main([*flags, "--quiet", "--json", str(store)]) == 0
    assert isinstance(json.loads(store.read_text()), list)
    monkeypatch.setattr(shared.crosscheck, "run_crosscheck", a_speedrun_writes_meanwhile)
    capsys.readouterr()
    assert shared.crosscheck.main([*flags, "--quiet", "--json", str(store)]) == 1
    printed, said = capsys.readouterr()
    assert "passed, 0 failed" in printed  # the table, minutes of work, is still shown
    assert said.count("\n") == 1 and said.startswith("crosscheck.py: error: --json ")
    assert "holds the finished runs of a grid or a speedrun; nothing written" in said
    assert store.read_text() == '{"runs": {}}'


def test_no_output_is_written_over_the_data_it_reads(finished_run, tiny_data_dir):
    labels = tiny_data_dir / "t10k-labels-idx1-ubyte.gz"
    before = labels.read_bytes()
    data = ["--data-dir", str(tiny_data_dir)]
    checkpoint = str(finished_run / "checkpoint.npz")
    for script, flags in [
        ("crosscheck.py", ["--json", str(labels)]),
        ("crosscheck.py", ["--plot", str(labels)]),
        ("export.py", [checkpoint, "--safetensors", str(labels)]),
    ]:
        result = run_script(script, *flags, *data)
        assert result.returncode == 2, result.stderr
        assert f"{labels}: the same file as the data {labels}" in result.stderr
    assert labels.read_bytes() == before


def test_damaged_experiment_results_are_one_line_errors(tmp_path):
    results = tmp_path / "experiments" / "results.json"
    results.parent.mkdir()
    empty = '{"base": {}, "comparisons": {}, "seeds": {}, "command": "x"}'
    deep = "[" * 100_000 + "]" * 100_000  # nested past Python's stack
    for text in ("{not json", '{"base": {}}', "[]", empty, deep):
        results.write_text(text)
        result = run_script("experiments.py", "--render-only", "--out", str(tmp_path))
        assert result.returncode == 1 and "damaged" in result.stderr, result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert not (tmp_path / "EXPERIMENTS.md").exists()


def saved_results() -> dict:
    """The experiments' results as docs/ keeps them: every field a report reads."""
    return json.loads((ROOT / "docs" / "experiments" / "results.json").read_text())


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            lambda s: s["comparisons"]["Initialisation"]["He (default)"]["jax"].update(
                test_acc=1.5
            ),
            "comparisons / Initialisation / He (default) / jax / test_acc is 1.5, not an accuracy",
        ),
        (
            lambda s: s["comparisons"]["Epochs"]["15 epochs (default)"]["torch"].pop("val_curve"),
            "comparisons / Epochs / 15 epochs (default) / torch / val_curve is None, not a list",
        ),
        (
            lambda s: s["comparisons"]["Epochs"]["15 epochs (default)"]["numpy"].update(
                epoch_seconds=-2
            ),
            "/ numpy / epoch_seconds is -2, not a time in seconds",
        ),
        (
            lambda s: s["comparisons"]["Dropout"]["with dropout (`strong`)"].pop("jax"),
            "Dropout / with dropout (`strong`) has other implementations than the first row",
        ),
        (lambda s: s.pop("seeds"), "lacks the field 'seeds'"),
        (lambda s: s["seeds"].update({"lab|jax": [0.9, 91.4]}), "seeds / lab|jax holds 91.4"),
        (lambda s: s["float64"].update({"x": {"mx": 0.5}}), "float64 / x is {'mx': 0.5}, not"),
        (lambda s: s["trained"].update({"today": 0}), "trained / today is 0, not a count"),
        (lambda s: s["base"].update(epochs=0), "base / epochs is 0, out of range"),
        (lambda s: s["deep"].update(lr="fast"), "deep / lr is 'fast', "),
        (lambda s: s.update(comparisons={"Foo": {}}), "holds none of the questions this version"),
    ],
)
def test_experiment_results_no_run_could_have_made_are_refused_by_field(tmp_path, edit, problem):
    # A hand-edited figure would render as a result (an accuracy of 1.5 as 150.00%).
    saved = saved_results()
    edit(saved)
    results = tmp_path / "experiments" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps(saved))
    result = run_script("experiments.py", "--render-only", "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr
    assert not (tmp_path / "EXPERIMENTS.md").exists()


def test_experiments_refuse_results_without_variants_and_a_file_for_their_folder(tmp_path, capsys):
    # Results that render, written before the variants were kept, cannot be trained again.
    from shared.experiments import main

    results = tmp_path / "experiments" / "results.json"
    results.parent.mkdir()
    saved = saved_results()
    variants = saved.pop("variants")
    results.write_text(json.dumps(saved))
    assert main(["--recheck-float64", "--out", str(tmp_path)]) == 1
    assert "lacks the variants of its comparisons" in capsys.readouterr().err
    # Variants are checked as flags would be, before anything trains again.
    for variant, problem in (
        (
            {"epochs": 10**9},
            "variants / Dropout / without dropout: epochs = 1000000000, out of range",
        ),
        ({"foo": 1}, "variants / Dropout / without dropout: foo = 1, not a setting"),
    ):
        variants["Dropout"]["without dropout"] = variant
        results.write_text(json.dumps({**saved, "variants": variants}))
        assert main(["--recheck-float64", "--out", str(tmp_path)]) == 1
        assert problem in capsys.readouterr().err
    out = tmp_path / "other"
    out.mkdir()
    (out / "experiments").write_text("")  # a file where the folder goes
    result = run_script("experiments.py", "--quick", "--out", str(out))
    said = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and said.endswith("experiments: exists and is not a folder")
    assert "Traceback" not in result.stderr


def test_a_run_begun_in_evaluate_s_folder_while_it_evaluates_is_not_written_into(
    finished_run, tiny_data_dir, tmp_path, monkeypatch, capsys
):
    """--out not yet a folder: evaluate.py held it and checked its files only when it
    existed at the start, and wrote its report beside a run begun there meanwhile."""
    import shared.evaluate

    out = tmp_path / "later"
    evaluated = shared.evaluate.evaluate_checkpoint

    def a_run_begins_there(*args, **kwargs):
        result = evaluated(*args, **kwargs)
        out.mkdir()
        (out / "metrics.json").write_text("{}")
        return result

    monkeypatch.setattr(shared.evaluate, "evaluate_checkpoint", a_run_begins_there)
    checkpoint = str(finished_run / "checkpoint.npz")
    flags = ["--out", str(out), "--data-dir", str(tiny_data_dir)]
    assert shared.evaluate.main([checkpoint, *flags]) == 2
    assert (
        f"--out {out / 'confusion.png'}: one of the files of the run in" in capsys.readouterr().err
    )
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


def test_the_command_a_message_gives_takes_a_folder_named_like_a_flag(tiny_data_dir, tmp_path):
    """`--resume -run` is argparse's flag without its value: the folder is written from ./"""
    flags = ["--out=-run", "--epochs", "1", "--data-dir", str(tiny_data_dir)]
    assert run_script("train.py", *flags, cwd=tmp_path).returncode == 0
    again = run_script("train.py", *flags, cwd=tmp_path)
    said = again.stderr.strip().splitlines()[-1]
    assert again.returncode == 2 and "continue it with --resume ./-run, replace it" in said
    resumed = run_script("train.py", "--resume", "./-run", cwd=tmp_path)
    assert resumed.returncode == 0 and "-run: the run is finished" in resumed.stdout


def test_a_folder_under_a_run_file_s_name_is_refused_not_deleted(tiny_data_dir, tmp_path):
    """--overwrite moved a folder named metrics.json aside with the run and deleted it."""
    notes = tmp_path / "ud" / "metrics.json" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    flags = ["--out", str(tmp_path / "ud"), "--epochs", "1", "--data-dir", str(tiny_data_dir)]
    for extra in ([], ["--overwrite"]):
        done = run_script("train.py", *flags, *extra)
        said = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and said.endswith(
            "its metrics.json is not a file; move it away"
        )
    assert notes.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "ud").iterdir()) == ["metrics.json"]


def test_evaluate_scores_a_float64_run_in_float64(tiny_data_dir, tmp_path):
    """It evaluated every checkpoint in float32: a float64 run's test loss agreed with its
    own to 1e-8 only."""
    run, data = tmp_path / "run", ["--data-dir", str(tiny_data_dir)]
    flags = ["--dtype", "float64", "--arch", "noconv", "--epochs", "1", "--out", str(run)]
    assert run_script("train.py", *flags, *data).returncode == 0
    own = json.loads((run / "metrics.json").read_text())["test"]["loss"]
    for impl in IMPLEMENTATIONS:
        out = tmp_path / impl
        done = run_script("evaluate.py", str(run / "checkpoint.npz"), "--impl", impl,
                          "--out", str(out), *data)  # fmt: skip
        assert done.returncode == 0, done.stderr
        evaluated = json.loads((out / "evaluation.json").read_text())
        assert evaluated["dtype"] == "float64" and abs(evaluated["loss"] - own) < 1e-12


def test_a_checkpoint_whose_data_folder_is_empty_is_not_resumed_from_here(finished_run):
    """An empty folder name was the current folder: --resume read the data there."""
    path = finished_run / "checkpoint.npz"
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    meta = json.loads(str(arrays["meta"]))
    meta["data"]["folder"] = ""
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    done = run_script("train.py", "--resume", str(finished_run))
    said = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert said.endswith("cannot check that it continues on the same data, start a new run")


def test_beside_a_store_only_its_own_results_are_refused(tmp_path):
    """Any existing file beside a store was refused: a cross-check's --json there wrote once,
    then never again."""
    (tmp_path / "runs.json").write_text('{"runs": {}}')
    for name in ("crosscheck.json", "results.json"):
        (tmp_path / name).write_text("[]")
    check_out_files([("--json", tmp_path / "crosscheck.json")])
    with pytest.raises(UsageError, match="a result of the grid or speedrun whose finished runs"):
        check_out_files([("--json", tmp_path / "results.json")])


def test_no_command_writes_over_a_benchmark_s_or_an_evaluation_s_results(tmp_path, capsys):
    """crosscheck.py --json bench/benchmark.json replaced the measurements beside benchmark.md,
    and --plot eval/confusion.png an evaluation's matrix, with exit 0."""
    from shared.crosscheck import main as crosscheck_main

    bench, evaluation = tmp_path / "bench", tmp_path / "eval"
    bench.mkdir()
    evaluation.mkdir()
    for path in (bench / "benchmark.md", bench / "benchmark.json", bench / "ab-stopped.json"):
        path.write_text("measured")
    for name in ("evaluation.json", "confusion.png"):
        (evaluation / name).write_text("evaluated")
    for flag, path, writer in [
        ("--json", bench / "benchmark.json", "benchmark.py"),
        ("--plot", bench / "benchmark.png", "benchmark.py"),  # not there: it would join them
        ("--json", bench / "ab-stopped.json", "benchmark.py"),
        ("--plot", evaluation / "confusion.png", "evaluate.py"),
    ]:
        status = crosscheck_main(["--arch", "noconv", flag, str(path)])
        assert status == 2 and capsys.readouterr().err.strip() == (
            f"crosscheck.py: error: {flag} {path}: one of the results {writer} wrote in "
            f"{path.parent}; choose another name"
        )
    assert (
        all(p.read_text() == "measured" for p in bench.iterdir())
        and len(list(bench.iterdir())) == 3
    )
    assert all(p.read_text() == "evaluated" for p in evaluation.iterdir())
