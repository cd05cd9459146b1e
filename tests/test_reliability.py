"""Bad data, interrupted runs, divergence and misuse: clear errors, nothing lost on disk."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import gc
import gzip
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import shared.download
import shared.io
import shared.loop
from shared.backend import IMPLEMENTATIONS
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.cli import run_cli
from shared.config import TrainConfig
from shared.data import DATASETS, FASHION_MNIST, OfficialFiles, find_data_dir, load_dataset
from shared.download import download_dataset, most_bytes
from shared.errors import (
    DataError,
    Interrupted,
    OutputError,
    Terminated,
    UsageError,
    act_on_signals,
    exit_not_swallowed,
    signals_held,
    stop_on_signals,
)
from shared.io import ELSEWHERE_DEAD_AFTER_SECONDS, temporary_prefix
from shared.loop import TrainingDiverged, train
from shared.outputs import EVALUATION_FILES
from shared.train import main as train_main
from tests.conftest import make_dataset_dir, write_idx
from tests.test_runs import wait_for_line
from tests.test_training import ROOT, run_script

IMPLS = list(IMPLEMENTATIONS)


# --- resume -------------------------------------------------------------------------------


class StopAfter:
    """A log callback that presses Ctrl-C once `epochs` epoch lines have been logged."""

    def __init__(self, epochs: int):
        self.left = epochs

    def __call__(self, line: str) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


@pytest.mark.parametrize("impl", IMPLS)
def test_resume_ends_with_exactly_the_uninterrupted_parameters(impl, tiny_data_dir, tmp_path):
    data = load_dataset(tiny_data_dir)
    config = TrainConfig(
        impl=impl,
        arch="pool",
        epochs=4,
        batch_size=16,
        dtype="float64",
        flip=True,
        shift=2,
        label_smoothing=0.1,
    )
    whole, part = tmp_path / "whole", tmp_path / "part"
    whole.mkdir(), part.mkdir()
    train(config, data, whole, log=lambda _: None)
    with pytest.raises(Exception, match="interrupted in epoch 3") as stopped:
        train(config, data, part, log=StopAfter(2))  # stops once epoch 2 is saved and shown
    assert "holds epoch 2" in str(stopped.value)
    ckpt = load_checkpoint(part / "checkpoint.npz")
    assert ckpt.meta["epoch"] == 2
    record = train(config, data, part, log=lambda _: None, resume=ckpt)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    expected, resumed = (
        load_checkpoint(whole / "checkpoint.npz"),
        load_checkpoint(part / "checkpoint.npz"),
    )
    for name, value in expected.params.items():
        assert value.dtype == np.float64
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
        for buffer, tensors in expected.optimizer.items():
            np.testing.assert_array_equal(resumed.optimizer[buffer][name], tensors[name])


def test_the_command_that_continues_a_stopped_run_is_quoted_for_the_shell(tiny_data_dir, tmp_path):
    # "--resume /tmp/my run" was printed as it was: pasted, "unrecognized arguments: run".
    out = tmp_path / "my run"
    out.mkdir()
    config = TrainConfig(impl=IMPLS[0], epochs=2, batch_size=32)
    with pytest.raises(Exception, match="interrupted in epoch 2") as stopped:
        train(config, load_dataset(tiny_data_dir), out, log=StopAfter(1))
    command = str(stopped.value).split("continue with: ")[1]
    assert shlex.split(command)[2:] == ["--resume", str(out), "--data-dir", str(tiny_data_dir)]
    # This Python and train.py, from the folder the run started in: "python" may be another
    # Python, without the project's packages.
    python, script = shlex.split(command)[:2]
    assert Path(python).resolve() == Path(sys.executable).resolve()
    assert Path(script).resolve() == ROOT / "scripts" / "train.py"


def test_a_run_an_overwrite_set_aside_is_named_where_a_command_refuses_the_folder(
    tiny_data_dir, tmp_path
):
    # An --overwrite killed after moving the checkpoint aside left metrics.json and the old
    # run in .replaced-*: --resume said "no checkpoint.npz there", --out to continue it.
    out = tmp_path / "run"
    aside = out / ".replaced-abcd1234"
    aside.mkdir(parents=True)
    (aside / "checkpoint.npz").write_bytes(b"the old run")
    (out / "metrics.json").write_text("{}")
    data = ("--data-dir", str(tiny_data_dir))
    note = f"({aside} holds the run that an --overwrite, stopped before it finished, set aside)"
    for flags in (("--resume", str(out)), ("--out", str(out))):
        result = run_script("train.py", *flags, *data)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.endswith(note) and "continue it" not in last
    # A checkpoint for its folder: "no checkpoint.npz there", beside the file it named.
    (out / "checkpoint.npz").write_bytes(b"")
    result = run_script("train.py", "--resume", str(out / "checkpoint.npz"), *data)
    assert f"give the run's folder, {out}" in result.stderr


def test_a_stop_while_compiling_says_what_was_kept(tiny_data_dir, tmp_path, monkeypatch):
    # Ctrl-C during JAX's first compile said "train.py: interrupted", and nothing more.
    import shared.loop

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shared.loop, "compile_steps", stopped)
    config = TrainConfig(impl=IMPLS[0], epochs=1, batch_size=32)
    with pytest.raises(Interrupted, match=r"^interrupted while compiling; no epoch was completed"):
        train(config, load_dataset(tiny_data_dir), tmp_path, log=lambda _: None)


def test_a_stop_after_the_last_epoch_is_not_in_an_epoch_past_it(tiny_data_dir, tmp_path):
    # A run of 2 epochs stopped as its last checkpoint was written said "in epoch 3".
    config = TrainConfig(impl=IMPLS[0], epochs=2, batch_size=32)
    with pytest.raises(Exception, match=r"interrupted after the last epoch; .* holds epoch 2"):
        train(config, load_dataset(tiny_data_dir), tmp_path, log=StopAfter(2))


def test_a_stop_after_the_run_s_folder_was_removed_does_not_call_it_intact(tiny_data_dir, tmp_path):
    # It said the checkpoint "holds epoch 1, intact", and how to continue from it.
    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig(impl=IMPLS[0], epochs=2, batch_size=32)

    def remove_then_stop(line: str) -> None:
        if "Epoch:" in line:  # epoch 1 saved
            shutil.rmtree(out)
            raise KeyboardInterrupt

    with pytest.raises(Exception, match="interrupted in epoch 2") as stopped:
        train(config, load_dataset(tiny_data_dir), out, log=remove_then_stop)
    said = str(stopped.value)
    assert said.endswith(f"{out / 'checkpoint.npz'}, of epoch 1, is no longer there"), said


@pytest.mark.parametrize("kind", ["fifo", "device", "too large"])
def test_json_that_is_not_a_file_threefold_wrote_is_refused_not_waited_for(
    tmp_path, monkeypatch, kind
):
    # A metrics.json that was /dev/zero took --resume to 2.6 GB and a MemoryError; a FIFO hung.
    path = tmp_path / "metrics.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        monkeypatch.setattr(shared.io, "JSON_MOST_BYTES", 10)
        path.write_text('{"test": "a result"}')
    refused = ValueError if kind == "too large" else OSError
    with pytest.raises(refused, match=r"not a regular file|more than 10 bytes"):
        shared.io.read_json(path)


def test_no_json_file_is_written_that_would_be_refused_on_reading(tmp_path, monkeypatch):
    path = tmp_path / "runs.json"
    monkeypatch.setattr(shared.io, "JSON_MOST_BYTES", 30)
    shared.io.write_json(path, {"runs": {}})
    with pytest.raises(OutputError, match="more than 30"):
        shared.io.write_json(path, {"runs": {"a run": "and its results"}})
    assert shared.io.read_json(path) == {"runs": {}}  # the file as it was


def test_a_run_s_file_that_cannot_be_written_is_refused_before_it_trains(tiny_data_dir, tmp_path):
    # A folder named curves.png: every epoch trained, then "cannot write it", exit 1.
    out = tmp_path / "run"
    (out / "curves.png").mkdir(parents=True)
    result = run_script(
        "train.py", "--impl", IMPLS[0], "--data-dir", str(tiny_data_dir), "--out", str(out)
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {out}: its curves.png is not a file" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png"]


def test_resume_command_continues_and_refuses_changed_flags(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_data_dir)]
    assert (
        run_script(
            "train.py", "--epochs", "2", "--batch-size", "16", "--out", str(out), *common
        ).returncode
        == 0
    )
    result = run_script("train.py", "--resume", str(out), "--lr", "0.5", *common)
    assert result.returncode == 2 and "--lr 0.5 (the run has 0.03)" in result.stderr
    result = run_script("train.py", "--resume", str(tmp_path / "nothing"), *common)
    assert result.returncode == 2 and "no checkpoint.npz there" in result.stderr
    result = run_script("train.py", "--resume", str(out), *common)
    assert result.returncode == 0, result.stderr
    assert "the run is finished" in result.stdout and "| Epoch:" not in result.stdout
    # A run whose settings predate a technique cannot continue with that technique's default.
    ckpt = load_checkpoint(out / "checkpoint.npz")
    del ckpt.meta["config"]["tta"]
    save_checkpoint(out / "checkpoint.npz", ckpt.params, ckpt.meta, ckpt.optimizer)
    result = run_script("train.py", "--resume", str(out), *common)
    assert result.returncode == 1 and "another version of threefold" in result.stderr
    assert "settings differ: tta" in result.stderr and "Traceback" not in result.stderr


# --- interruption and kills ---------------------------------------------------------------


# Runs the script given after it as __main__, heeding Ctrl-C even when pytest runs as a
# background job, whose children inherit SIGINT ignored (Python then installs no
# KeyboardInterrupt handler, and the run would go on to the end).
HEED_CTRL_C = (
    "import runpy, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def start_training(out: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            HEED_CTRL_C,
            str(ROOT / "scripts" / "train.py"),
            "--impl",
            "numpy",
            "--epochs",
            "400",
            "--batch-size",
            "32",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_ctrl_c_stops_with_a_message_and_keeps_the_checkpoint(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start_training(out, tiny_data_dir)
    # Waits for events, not for time: the second epoch's line, then Ctrl-C within epoch 3.
    wait_for_line(proc, "| Epoch:  2 |")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted in epoch" in stderr and f"--resume {out}" in stderr
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(out / "checkpoint.npz")
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert ckpt.meta["epoch"] == len(history) >= 1


def test_an_evaluation_is_never_of_a_checkpoint_a_training_replaces(tiny_data_dir, tmp_path):
    """evaluate.py wrote into a folder a training held, and --resume left its report of the
    older checkpoint beside the finished run's (80.74% where the run scored 85.35%)."""
    out = tmp_path / "run"
    training = start_training(out, tiny_data_dir)
    wait_for_line(training, "| Epoch:  1 |")
    evaluate = ("evaluate.py", str(out / "checkpoint.npz"), "--data-dir", str(tiny_data_dir))
    refused = run_script(*evaluate)
    assert refused.returncode == 2 and f"{out}: in use by a run of process" in refused.stderr
    training.send_signal(signal.SIGINT)
    training.communicate(timeout=60)
    assert run_script(*evaluate).returncode == 0 and (out / "evaluation.json").exists()
    resumed = start_training(out, tiny_data_dir, "--resume", str(out))
    wait_for_line(resumed, "evaluate.py's report of epoch")
    resumed.send_signal(signal.SIGINT)
    resumed.communicate(timeout=60)
    assert not any((out / name).exists() for name in EVALUATION_FILES)


def test_a_resumed_run_removes_the_report_once_it_replaces_the_checkpoint(
    tiny_data_dir, tmp_path, monkeypatch
):
    # --resume removed it at start: stopped before an epoch, the run had lost the report of a
    # checkpoint that had not changed.
    data, out = load_dataset(tiny_data_dir), tmp_path / "run"
    out.mkdir()
    config = TrainConfig(impl=IMPLS[0], epochs=2, batch_size=32)
    for name in EVALUATION_FILES:  # evaluate.py --out of another run's checkpoint
        (out / name).write_text("the report of another checkpoint")
    with pytest.raises(Exception, match="interrupted in epoch 2"):
        train(config, data, out, log=StopAfter(1))
    assert all((out / name).exists() for name in EVALUATION_FILES)  # a new run's: not its own
    for name in EVALUATION_FILES:
        (out / name).write_text("the report of epoch 1")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(shared.loop, "evaluate_epoch", stopped)
        with pytest.raises(Exception, match="interrupted in epoch 2"):
            train(config, data, out, log=print, resume=load_checkpoint(out / "checkpoint.npz"))
    assert all((out / name).exists() for name in EVALUATION_FILES)
    said = []
    train(config, data, out, log=said.append, resume=load_checkpoint(out / "checkpoint.npz"))
    assert not any((out / name).exists() for name in EVALUATION_FILES)
    assert sum("report of epoch 1's checkpoint, which epoch 2's replaced" in s for s in said) == 1


class _ExitsWhenFinalised:
    """Exits in its finaliser, as Ray's SIGTERM handler did when the signal landed in one."""

    def __del__(self):
        raise SystemExit(signal.SIGTERM)


def test_an_exit_python_would_ignore_is_raised_when_the_block_ends(capsys):
    # A SIGTERM while ray.init ran: "Exception ignored", and the grid trained on, exit 0.
    with pytest.raises(SystemExit) as exited, exit_not_swallowed():
        _ExitsWhenFinalised()  # finalised at once: Python reports its exit and goes on
    assert exited.value.code == signal.SIGTERM and capsys.readouterr().err == ""


def test_a_signal_the_process_ignores_stays_ignored_while_signals_are_held():
    # Under nohup SIGINT is ignored; signals_held took it, then raised it as a Ctrl-C.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        except KeyboardInterrupt:
            pytest.fail("the SIGINT the process ignores was raised")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with pytest.raises(Terminated), signals_held():  # one it takes is still held, then raised
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, previous)


def dropping_a_sigterm(dropped: list) -> Callable[[str, dict], None]:
    """A garbage-collector callback during which SIGTERM arrives: Python drops the handler's
    exception raised in it, as it did in JAX's (`_xla_gc_callback`), and `dropped` gets it."""

    def callback(phase: str, info: dict) -> None:
        if phase != "start":
            return
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here, in the callback
        except BaseException as stop:
            dropped.append(stop)
            raise

    return callback


def test_a_signal_whose_exception_a_gc_callback_dropped_still_stops_the_command(monkeypatch):
    """A run trained on to the end and exited 0; Python printed the dropped stop's traceback."""
    dropped, reported = [], []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)  # where Python reports it
    callback = dropping_a_sigterm(dropped)
    for stops_itself in (act_on_signals, lambda: None):  # between steps; else on leaving
        gc.callbacks.append(callback)
        try:
            with pytest.raises(Terminated), stop_on_signals():
                gc.collect()
                gc.callbacks.remove(callback)
                stops_itself()
        finally:
            if callback in gc.callbacks:
                gc.callbacks.remove(callback)
        assert len(dropped) == 1 and isinstance(dropped.pop(), Terminated)
        assert reported == []  # not printed: raised again instead
    act_on_signals()  # nothing is left noted after the block


def test_a_nested_block_keeps_the_stop_the_outer_one_noted(monkeypatch):
    """The nested block cleared it on entering, and the command went on as if not asked."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: None)
    callback = dropping_a_sigterm(dropped)
    gc.callbacks.append(callback)
    try:
        with pytest.raises(Terminated), stop_on_signals():
            gc.collect()
            gc.callbacks.remove(callback)
            with stop_on_signals():
                pass
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
    assert len(dropped) == 1
    act_on_signals()  # nothing is left noted after the outer block


def test_a_stop_dropped_during_a_training_step_ends_the_run_at_the_next(tiny_data_dir, monkeypatch):
    from impl_numpy.backend import Backend

    dropped, steps, step = [], [], Backend.train_step

    def step_dropping_a_stop(self, *args):
        steps.append(len(steps))
        if len(steps) == 1:
            gc.callbacks.append(callback)
            gc.collect()
            gc.callbacks.remove(callback)
        return step(self, *args)

    callback = dropping_a_sigterm(dropped)
    monkeypatch.setattr(Backend, "train_step", step_dropping_a_stop)
    config = TrainConfig(impl="numpy", epochs=2, batch_size=16)
    with pytest.raises(Interrupted, match=r"^terminated \(SIGTERM\) in epoch 1"), stop_on_signals():
        train(config, load_dataset(tiny_data_dir), log=lambda _: None)
    assert len(dropped) == 1 and steps == [0]  # of the epoch's 7


@pytest.mark.parametrize(
    ("during", "said", "tested"),
    [
        ("evaluate_test_set", r"after the last epoch: all 1 epochs are saved in .*--resume", False),
        ("plot_curves", r"after the test \(accuracy \d+\.\d\d%\); the run is whole in ", True),
    ],
)
def test_a_stop_dropped_after_the_last_epoch_says_what_is_kept(
    during, said, tested, tiny_data_dir, tmp_path, monkeypatch
):
    """Each ended the finished run's command with a bare "interrupted"."""
    import shared.loop

    dropped, done = [], getattr(shared.loop, during)
    callback = dropping_a_sigterm(dropped)

    def dropping_a_stop(*args):
        gc.callbacks.append(callback)
        gc.collect()
        gc.callbacks.remove(callback)
        return done(*args)

    monkeypatch.setattr(shared.loop, during, dropping_a_stop)
    config = TrainConfig(impl="numpy", epochs=1, batch_size=16)
    with pytest.raises(Interrupted, match=r"^terminated \(SIGTERM\) " + said), stop_on_signals():
        train(config, load_dataset(tiny_data_dir), tmp_path, log=lambda _: None)
    assert len(dropped) == 1
    assert ("test" in json.loads((tmp_path / "metrics.json").read_text())) == tested
    assert (tmp_path / "curves.png").exists() == tested


def test_a_stop_while_train_py_prints_the_test_says_the_run_is_whole(
    tiny_data_dir, tmp_path, monkeypatch, capsys
):
    """A stop while its output was blocked (a pager, Ctrl-S) gave a bare "interrupted"."""
    import shared.train

    def blocked(*args, **kwargs):
        if "Test Loss" in str(args[0]):
            raise KeyboardInterrupt
        print(*args, **kwargs)

    monkeypatch.setattr(shared.train, "print", blocked, raising=False)
    out = tmp_path / "run"
    status = shared.train.main(["--impl", "numpy", "--epochs", "1", "--batch-size", "16",
                                "--data-dir", str(tiny_data_dir), "--out", str(out)])  # fmt: skip
    said = capsys.readouterr().err.strip()
    assert status == 130 and "\n" not in said and "Traceback" not in said
    whole = rf"after the test \(accuracy \d+\.\d\d%\); the run is whole in {re.escape(str(out))}"
    assert re.fullmatch(f"train.py: interrupted {whole}", said)
    assert "test" in json.loads((out / "metrics.json").read_text())


# A script's ending, with JAX loaded and a clean-up Python would run at exit.
EXIT_WITH_JAX = """
import atexit, sys
import jax
from shared.errors import exit_process
atexit.register(lambda: print("clean-up ran", flush=True))
exit_process(int(sys.argv[1]))
"""


@pytest.mark.parametrize(("code", "cleaned"), [(130, False), (143, False), (1, True), (0, True)])
def test_a_stopped_script_with_jax_loaded_leaves_without_python_s_clean_up(code, cleaned):
    # A Ctrl-C during a compile left XLA's threads compiling, and the interpreter's clean-up
    # crashed under them: exit 139 in 5 stops of 10 at train.py's start-up.
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_JAX, str(code)], capture_output=True, text=True
    )
    assert done.returncode == code, done.stderr
    assert ("clean-up ran" in done.stdout) == cleaned


# Ctrl-C during a script's imports, before run_cli handles stops.
STOPPED_WHILE_IMPORTING = """
import os, signal, sys, time
from shared.errors import stopped_in_one_line
sys.argv[0] = "train.py"
with stopped_in_one_line():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
"""


def test_ctrl_c_while_a_script_imports_is_one_line_and_130():
    # A traceback of 17-36 lines, and the process killed by SIGINT (-2), in the first 0.5 s.
    done = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_IMPORTING], capture_output=True, text=True, cwd=ROOT
    )
    assert (done.returncode, done.stderr.strip()) == (130, "train.py: interrupted")
    for script in (ROOT / "scripts").glob("*.py"):  # each imports its command under the block
        text = script.read_text()
        assert text.index("with stopped_in_one_line():") < text.index(" import main"), script


def test_ctrl_c_ignored_as_in_a_background_job_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_path_the_system_refuses_is_one_line_and_a_missing_one_a_bug_s_traceback(capsys):
    # Python 3.11's Path.exists() raises every errno but a few: a stale NFS handle was a
    # traceback. A file missing where the code assumed one is a bug, and shows as one.
    def stale() -> int:
        raise OSError(errno.ESTALE, "Stale file handle", "/data/train-images-idx3-ubyte.gz")

    assert run_cli(argparse.ArgumentParser(prog="train.py"), stale) == 1
    said = "train.py: error: /data/train-images-idx3-ubyte.gz: Stale file handle"
    assert capsys.readouterr().err.strip() == said

    def missing() -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/assumed")

    with pytest.raises(FileNotFoundError):
        run_cli(argparse.ArgumentParser(prog="train.py"), missing)


def test_sigterm_before_a_run_has_anything_to_keep_exits_143(capsys):
    """It said "interrupted" and exited 130, as for Ctrl-C."""

    def body() -> int:
        raise Terminated

    assert run_cli(argparse.ArgumentParser(prog="train.py"), body) == 143
    assert capsys.readouterr().err.strip() == "train.py: terminated (SIGTERM)"


def test_a_data_folder_it_may_not_enter_is_one_line(tiny_data_dir, tmp_path, capsys, monkeypatch):
    """Python 3.11's Path.is_file() raises where a folder may be listed but not entered
    (mode 600): a traceback, for the data, --download's folder and --out. As root no mode
    refuses, so the refusal is the file system's, made here."""
    refused = tiny_data_dir.resolve()
    is_file = Path.is_file

    def no_entry(path: Path) -> bool:
        if path.parent.resolve() == refused:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", no_entry)
    argv = ["--impl", "numpy", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "r")]
    assert train_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.py: error: {refused}/") and err.endswith(": Permission denied")
    assert "\n" not in err and not (tmp_path / "r").exists()


def test_killed_mid_write_never_leaves_a_corrupt_file(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = start_training(
            out,
            tiny_data_dir,
            *(["--resume", str(out)] if (out / "checkpoint.npz").exists() else []),
        )
        wait_for(out / "checkpoint.npz")
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        ckpt = load_checkpoint(out / "checkpoint.npz")  # loads, whole, every time
        record = json.loads((out / "metrics.json").read_text())
        assert ckpt.meta["epoch"] in (len(record["history"]), len(record["history"]) + 1)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} <= {
        "checkpoint.npz",
        "metrics.json",
    }


# --- divergence ---------------------------------------------------------------------------


# Runs scripts/SCRIPT with ARGS under a file-size limit of LIMIT bytes: a write past it
# fails with EFBIG, as on a full disk (SIGXFSZ, which would kill the process, is ignored).
UNDER_A_FILE_SIZE_LIMIT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
script, limit = f"scripts/{sys.argv[1]}", int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def with_full_disk(script: str, limit: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", UNDER_A_FILE_SIZE_LIMIT, script, str(limit), *args],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip


def train_with_full_disk(limit: int, *args: str) -> subprocess.CompletedProcess:
    return with_full_disk("train.py", limit, *args)


def test_evaluate_refuses_an_out_that_is_a_file_before_it_evaluates(tiny_data_dir, tmp_path):
    # Found only once the whole test set was evaluated: "cannot create folder".
    run = ("--impl", IMPLS[0], "--epochs", "1", "--out", str(tmp_path / "run"))
    assert run_script("train.py", *run, "--data-dir", str(tiny_data_dir)).returncode == 0
    metrics = tmp_path / "run" / "metrics.json"
    before = metrics.read_bytes()
    flags = ("--out", str(metrics), "--data-dir", str(tmp_path / "no data"))  # never read
    done = run_script("evaluate.py", str(tmp_path / "run" / "checkpoint.npz"), *flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--out {metrics}: is a file, not a folder" in done.stderr.splitlines()[-1]
    assert metrics.read_bytes() == before


def test_another_checkpoint_in_a_run_s_folder_does_not_replace_its_report(tiny_data_dir, tmp_path):
    # candidate.npz's report (13.33%) replaced the run's own (73.33%), exit 0.
    run = ("--impl", IMPLS[0], "--epochs", "1", "--out", str(tmp_path / "run"))
    assert run_script("train.py", *run, "--data-dir", str(tiny_data_dir)).returncode == 0
    data = ("--data-dir", str(tiny_data_dir))
    assert (
        run_script("evaluate.py", str(tmp_path / "run" / "checkpoint.npz"), *data).returncode == 0
    )
    report = (tmp_path / "run" / "evaluation.json").read_bytes()
    candidate = tmp_path / "run" / "candidate.npz"
    shutil.copy(tmp_path / "run" / "checkpoint.npz", candidate)
    done = run_script("evaluate.py", str(candidate), *data)
    assert done.returncode == 2 and "one of the files of the run in" in done.stderr
    assert (tmp_path / "run" / "evaluation.json").read_bytes() == report


def test_evaluate_needs_the_test_files_alone(tiny_data_dir, tmp_path):
    # "train-images-idx3-ubyte[.gz]: missing": it read 60,000 training images it never used.
    run = ("--impl", IMPLS[0], "--epochs", "1", "--out", str(tmp_path / "run"))
    assert run_script("train.py", *run, "--data-dir", str(tiny_data_dir)).returncode == 0
    test_only = tmp_path / "test-only"
    test_only.mkdir()
    for path in tiny_data_dir.glob("t10k-*"):
        shutil.copy(path, test_only)
    reports = []
    for data_dir in (tiny_data_dir, test_only):
        out = tmp_path / f"report-{data_dir.name}"
        flags = ("--data-dir", str(data_dir), "--out", str(out))
        done = run_script("evaluate.py", str(tmp_path / "run" / "checkpoint.npz"), *flags)
        assert done.returncode == 0, done.stderr
        reports.append(json.loads((out / "evaluation.json").read_text()))
    assert reports[0]["acc"] == reports[1]["acc"] and reports[0]["loss"] == reports[1]["loss"]


def test_an_evaluation_report_is_replaced_whole_or_not_at_all(tiny_data_dir, tmp_path):
    # A full disk at its second picture left a new confusion matrix beside the older report.
    data = ("--data-dir", str(tiny_data_dir))
    run = ("--impl", IMPLS[0], "--epochs", "1", "--out", str(tmp_path / "run"))
    assert run_script("train.py", *run, *data).returncode == 0
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    assert run_script("evaluate.py", str(checkpoint), "--tta", *data).returncode == 0
    report = [checkpoint.parent / name for name in EVALUATION_FILES]
    before = [path.read_bytes() for path in report]
    pictures = sorted(len(path.read_bytes()) for path in report if path.suffix == ".png")
    assert pictures[0] < 0.9 * pictures[1]  # a limit between them fails the larger alone
    limit = (pictures[0] + pictures[1]) // 2
    done = with_full_disk("evaluate.py", limit, str(checkpoint), "--no-tta", *data)
    assert done.returncode == 1 and "File too large" in done.stderr
    assert [path.read_bytes() for path in report] == before


def test_a_full_disk_ends_in_one_line_and_loses_no_epoch(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--impl", "numpy", "--epochs", "2", "--batch-size", "16", "--out", str(out),
            "--data-dir", str(tiny_data_dir)]  # fmt: skip
    # Not even the first checkpoint fits: nothing is left, not even the folder.
    done = train_with_full_disk(4096, *args)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "checkpoint.npz: cannot write it (File too large)" in line
    assert "no epoch was completed" in line and not out.exists()
    # A run with its first epoch saved: the second's write fails, the first stays intact.
    assert run_script("train.py", *args[:3], "1", *args[4:]).returncode == 0
    saved = (out / "checkpoint.npz").read_bytes()
    rewound = load_checkpoint(out / "checkpoint.npz")
    config = {**rewound.meta["config"], "epochs": 2}
    save_checkpoint(out / "checkpoint.npz", rewound.params, {**rewound.meta, "config": config},
                    rewound.optimizer)  # fmt: skip
    saved = (out / "checkpoint.npz").read_bytes()
    done = train_with_full_disk(len(saved) // 2, "--resume", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "checkpoint.npz holds epoch 1, intact" in done.stderr
    assert (out / "checkpoint.npz").read_bytes() == saved
    assert not list(out.glob(".*.tmp"))


def test_a_failed_write_in_a_folder_that_refuses_the_clean_up_is_one_error(tmp_path, monkeypatch):
    """A folder made read-only during a write: removing the hidden temporary failed too, and
    its PermissionError came after the write's own error as a second traceback."""
    from shared.outputs import write_results

    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    def chart(path):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    (tmp_path / "r.md").write_text("older")
    monkeypatch.setattr(os, "unlink", refused)
    named = re.escape(str(tmp_path / "r.png"))
    with pytest.raises(OutputError, match=f"^{named}: cannot write it \\(Operation not permitted"):
        write_results(tmp_path, "r", "text", {}, chart, say=lambda _: None)
    assert (tmp_path / "r.md").read_text() == "older"


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path):
    from impl_numpy.backend import Backend

    data = load_dataset(tiny_data_dir)
    calls = {"n": 0}
    step = Backend.train_step

    def blows_up_in_epoch_2(self, state, d, batch, lr):
        calls["n"] += 1
        state, loss, correct = step(self, state, d, batch, lr)
        return state, (float("nan") if calls["n"] == 9 else loss), correct

    out = tmp_path / "run"
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Backend, "train_step", blows_up_in_epoch_2)
        with pytest.raises(TrainingDiverged) as err:
            train(TrainConfig(epochs=3, batch_size=16), data, out, log=lambda _: None)
    message = str(err.value)
    assert "loss became nan at step 9 (epoch 2, batch 2)" in message and "learning rate" in message
    assert "holds epoch 1, intact" in message
    assert load_checkpoint(out / "checkpoint.npz").meta["epoch"] == 1


# --- misuse -------------------------------------------------------------------------------


def test_unknown_dataset_is_a_usage_error(tmp_path):
    result = run_script("train.py", "--dataset", "cifar", cwd=tmp_path)
    assert result.returncode == 2 and "--dataset" in result.stderr


def test_a_missing_framework_only_affects_its_own_implementation(tiny_data_dir, tmp_path):
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "from shared.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["--epochs", "1", "--batch-size", "16", "--data-dir", str(tiny_data_dir)]
    blocked = subprocess.run(
        [sys.executable, "-c", code, "--impl", "jax", *args, "--out", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert blocked.returncode == 2 and "--impl jax: jax is not installed" in blocked.stderr
    fine = subprocess.run(
        [sys.executable, "-c", code, "--impl", "numpy", *args, "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert fine.returncode == 0, fine.stderr


def test_mnist_from_a_local_folder(tmp_path):
    folder = make_dataset_dir(tmp_path / "mnist")
    out = tmp_path / "run"
    result = run_script(
        "train.py",
        "--dataset",
        "mnist",
        "--data-dir",
        str(folder),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["dataset"] == "mnist"
    result = run_script("evaluate.py", str(out / "checkpoint.npz"), "--data-dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert "\n  7 " in result.stdout and "Sneaker" not in result.stdout


# --- integrity ----------------------------------------------------------------------------


def test_a_file_with_the_official_count_must_have_the_official_content(tmp_path):
    folder = make_dataset_dir(tmp_path / "data")
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(10_000, np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((10_000, 28, 28), np.uint8))
    with pytest.raises(
        DataError,
        match=r"t10k-images-idx3-ubyte.gz: content differs from the "
        r"official fashion-mnist file .* --download",
    ):
        load_dataset(folder)


def test_a_damaged_system_install_does_not_hide_the_download(tmp_path, monkeypatch):
    # Its error said to --download, and every command went on reading the damaged one.
    system, downloaded = tmp_path / "system", make_dataset_dir(tmp_path / "xdg/threefold/f")
    system.mkdir()
    (system / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("THREEFOLD_DATA", raising=False)
    spec = dataclasses.replace(FASHION_MNIST, name="f", default_dir=system)
    assert find_data_dir(spec=spec) == downloaded
    for file in downloaded.iterdir():
        file.unlink()
    assert find_data_dir(spec=spec) == system  # neither whole: the first, whose error names it


def test_the_real_files_are_the_official_ones_and_load(real_data):
    """The pinned digests are those of this machine's files, hashed here apart from the
    loader (whose check of them the test above plants a wrong file against)."""
    folder = find_data_dir()
    for file in FASHION_MNIST.files:
        packed, plain = folder / f"{file.name}.gz", folder / file.name
        content = gzip.decompress(packed.read_bytes()) if packed.exists() else plain.read_bytes()
        assert hashlib.sha256(content).hexdigest() == file.content_sha256, file.name
    sizes = len(real_data.train), len(real_data.val), len(real_data.test)
    assert sizes == (50_000, 10_000, 10_000)


# --- download -----------------------------------------------------------------------------


class Server:
    """A local HTTP server on 127.0.0.1 that serves `files` (name -> bytes), can cut a body
    short, send no Content-Length or one of its own (`length` a string), and answer with an
    error status."""

    def __init__(
        self,
        files: dict[str, bytes],
        truncate: str | None = None,
        status: int = 200,
        length: bool | str = True,
    ):
        self.files, self.truncate, self.status, self.length = files, truncate, status, length
        handler = functools.partial(self._Handler, self)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    class _Handler(http.server.BaseHTTPRequestHandler):
        def __init__(self, server_state, *args, **kwargs):
            self.state = server_state
            super().__init__(*args, **kwargs)

        def do_GET(self):
            name = self.path.lstrip("/")
            body = self.state.files.get(name)
            if self.state.status != 200 or body is None:
                self.send_error(self.state.status if body is not None else 404)
                return
            self.send_response(200)
            if self.state.length:
                told = self.state.length
                self.send_header("Content-Length", told if told is not True else str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if name == self.state.truncate else body)

        def log_message(self, *args):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()


@pytest.fixture
def served_files(tmp_path):
    """The tiny dataset's four .gz files, and Fashion-MNIST's spec with their MD5 and content
    SHA-256 sums in place of the official ones."""
    folder = make_dataset_dir(tmp_path / "source")
    files, rows = {}, []
    for row in FASHION_MNIST.files:
        body = (folder / f"{row.name}.gz").read_bytes()
        files[f"{row.name}.gz"] = body
        md5 = hashlib.md5(body).hexdigest()
        sha = hashlib.sha256(gzip.decompress(body)).hexdigest()
        rows.append(dataclasses.replace(row, gzip_md5=md5, content_sha256=sha))
    return files, dataclasses.replace(FASHION_MNIST, files=OfficialFiles(*rows))


def idx_files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_verifies_then_moves_into_place(served_files, tmp_path):
    files, spec = served_files
    dest = tmp_path / "dest"
    with Server(files) as server:
        download_dataset(spec, dest, server.url, progress=False)
    assert idx_files_in(dest) == sorted(files)
    assert len(load_dataset(dest).test) == 30


def test_a_mirror_that_recompressed_the_files_is_verified_by_their_content(served_files, tmp_path):
    """Debian's package recompresses the official files: their .gz MD5s differ from the
    published ones, and a download from a copy of them was refused."""
    files, spec = served_files
    recompressed = {
        name: gzip.compress(gzip.decompress(body), 1, mtime=1) for name, body in files.items()
    }
    assert all(recompressed[name] != body for name, body in files.items())
    with Server(recompressed) as server:
        download_dataset(spec, tmp_path / "dest", server.url, progress=False)
    assert len(load_dataset(tmp_path / "dest").test) == 30


def test_a_download_goes_where_every_command_then_looks(served_files, tmp_path, monkeypatch):
    """With $THREEFOLD_DATA set, it went to the user folder, and the next command, which
    reads $THREEFOLD_DATA, said to --download again."""
    files, spec = served_files
    monkeypatch.setenv("THREEFOLD_DATA", str(tmp_path / "env"))
    with Server(files) as server:
        assert download_dataset(spec, None, server.url, progress=False) == tmp_path / "env"
    assert idx_files_in(tmp_path / "env") == sorted(files) and len(load_dataset().test) == 30


@pytest.mark.parametrize(
    "fault",
    [
        "truncated",
        "wrong content",
        "wrong MD5",
        "server error",
        "missing",
        "endless",
        "too long",
        "bad length",
        "corrupt gzip",
    ],
)
def test_a_failed_download_leaves_nothing_that_looks_valid(served_files, tmp_path, fault):
    files, spec = served_files
    dest = tmp_path / "dest"
    if fault == "corrupt gzip":  # whole as served, no MD5 to catch it: its IDX reader does
        labels = dataclasses.replace(spec.files.train_labels, gzip_md5=None)
        spec = dataclasses.replace(spec, files=spec.files._replace(train_labels=labels))
        files = {**files, "train-labels-idx1-ubyte.gz": files["train-labels-idx1-ubyte.gz"][:-20]}
    if fault in ("wrong content", "wrong MD5"):  # the MD5 is checked where no SHA-256 is pinned
        sums = {"content_sha256": "0" * 64} if fault == "wrong content" else {"gzip_md5": "0" * 32}
        if fault == "wrong MD5":
            sums["content_sha256"] = None
        test_images = dataclasses.replace(spec.files.test_images, **sums)
        spec = dataclasses.replace(spec, files=spec.files._replace(test_images=test_images))
    if fault == "missing":
        files = {k: v for k, v in files.items() if not k.startswith("t10k-labels")}
    if fault in ("endless", "too long"):  # past what the labels' file can be, told or not
        files = {
            **files,
            "train-labels-idx1-ubyte.gz": bytes(most_bytes(spec.files.train_labels) + 1),
        }
    kwargs = {"truncate": "train-labels-idx1-ubyte.gz"} if fault == "truncated" else {}
    status = 500 if fault == "server error" else 200
    length = {"endless": False, "bad length": "²"}.get(fault, True)  # "abc", "²": ValueErrors
    with (
        Server(files, status=status, length=length, **kwargs) as server,
        pytest.raises(DataError) as err,
    ):
        download_dataset(spec, dest, server.url, progress=False)
    assert "\n" not in str(err.value) and ".download." not in str(err.value)
    if fault == "corrupt gzip":  # named by its address: the staging file is gone
        assert str(err.value).startswith(f"{server.url}train-labels-idx1-ubyte.gz: corrupt")
    if fault in ("endless", "too long"):
        assert "more than the file can be" in str(err.value)
    if fault == "wrong content":
        assert "SHA-256 of the IDX content" in str(err.value)
    if fault == "wrong MD5":
        assert "differs from the published" in str(err.value)
    if fault == "bad length":
        assert "the server declared a length of '²', not a number" in str(err.value)
    assert not dest.exists()  # not the files that downloaded fine, nor the folder it made


class RawServer:
    """A server on 127.0.0.1 that answers every connection with `reply`'s bytes, then
    `trickle`'s a byte every 0.2 s, and closes it: replies no HTTP server would send."""

    def __init__(self, reply: bytes, trickle: bytes = b""):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/"
        self.reply, self.trickle = reply, trickle
        threading.Thread(target=self._answer, daemon=True).start()

    def _answer(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            with connection:
                connection.recv(65536)
                connection.sendall(self.reply)
                for byte in self.trickle:
                    time.sleep(0.2)
                    try:
                        connection.sendall(bytes([byte]))
                    except OSError:  # the client gave up
                        break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.socket.close()


@pytest.mark.parametrize(
    ("reply", "message"),
    [  # each was a traceback: IncompleteRead, BadStatusLine, int()'s limit of 4,300 digits
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nabc", "IncompleteRead"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "BadStatusLine"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "5,000 digits"),
        # urllib follows a redirect to ftp:// of its own accord.
        (
            b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1/x.gz\r\nContent-Length: 0\r\n\r\n",
            "redirected to 'ftp://127.0.0.1/x.gz', not http(s)",
        ),
    ],
)
def test_a_reply_that_is_not_a_file_is_one_line(served_files, tmp_path, reply, message):
    _, spec = served_files
    dest = tmp_path / "dest"
    with RawServer(reply) as server, pytest.raises(DataError) as err:
        download_dataset(spec, dest, server.url, progress=False)
    assert "\n" not in str(err.value) and message in str(err.value)
    assert not dest.exists()


def test_a_server_that_trickles_is_stopped(served_files, tmp_path, monkeypatch):
    # A byte every 5 s: the download would have gone on for 83 minutes a file.
    _, spec = served_files
    monkeypatch.setattr(shared.download, "TIMEOUT_SECONDS", 1)
    monkeypatch.setattr(shared.download, "SLOWEST_BYTES_PER_SECOND", 10**12)
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
    started = time.monotonic()
    with RawServer(reply, trickle=bytes(100)) as server, pytest.raises(DataError) as err:
        download_dataset(spec, tmp_path / "dest", server.url, progress=False)
    assert "slower than 1,000,000,000,000 bytes a second; stopped" in str(err.value)
    assert time.monotonic() - started < 10 and not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("/usr/share/datasets/fashion-mnist", "not an http:// or https:// address"),
        ("", "not an http:// or https:// address"),  # it fell back to the official address
        ("http://localhost:8O8O/", "not an address (Port could not be cast"),
        ("http://[::1", "not an address (Invalid IPv6 URL)"),
        ("http://a b/", "an address holds no spaces or control characters"),
    ],
)
def test_a_download_address_that_is_not_one_is_refused_naming_the_flag(
    served_files, tmp_path, address, message
):
    _, spec = served_files
    with pytest.raises(UsageError, match=re.escape(f"--download-url {address!r}: {message}")):
        download_dataset(spec, tmp_path / "dest", address, progress=False)
    assert not (tmp_path / "dest").exists()


def test_an_address_with_a_password_is_refused_without_repeating_it(served_files, tmp_path):
    # urllib looked "user:secret@127.0.0.1" up as a host, and the error printed the password.
    _, spec = served_files
    with pytest.raises(UsageError) as err:
        download_dataset(spec, tmp_path / "dest", "http://user:secret@127.0.0.1:9/", progress=False)
    assert str(err.value) == "--download-url: an address with a user name or password; give none"
    # A password holding '/' ran past a mask and into urllib's message about the port.
    with pytest.raises(UsageError) as err:
        download_dataset(spec, tmp_path / "dest", "https://bob:s3c/r3t@x.org/f/", progress=False)
    assert str(err.value) == "--download-url (an address holding '@', not shown): not an address"
    # An '@' in the path is an address's own (jsDelivr's fashion-mnist@master): it was refused.
    mirrored = {f"fashion-mnist@master/{name}": body for name, body in served_files[0].items()}
    with Server(mirrored) as server:
        address = f"{server.url}fashion-mnist@master/"
        download_dataset(spec, tmp_path / "dest", address, progress=False)
    assert len(idx_files_in(tmp_path / "dest")) == 4


def test_a_download_removes_what_killed_downloads_left(served_files, tmp_path):
    # A download killed with SIGKILL left its staging folder, with a file in it, for good.
    _, spec = served_files
    dest = tmp_path / "dest"
    dead = dest / f"{temporary_prefix('download', 999999999)}abcd1234"
    alive = dest / f"{temporary_prefix('download', os.getpid())}abcd1234"  # in progress
    elsewhere = dest / f".download.{'f' * 8}.999999999.abcd1234"  # another host's
    # Another host's, and an older version's (which names no writer), long untouched.
    old_elsewhere = dest / f".download.{'f' * 8}.999999999.efgh5678"
    old_version = dest / ".download-abcd1234"
    users = [dest / ".download-backup", dest / ".download.2024.jan"]  # a user's own
    for folder in (dead, alive, elsewhere, old_elsewhere, old_version, *users):
        folder.mkdir(parents=True)
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"partial")
    long_ago = time.time() - ELSEWHERE_DEAD_AFTER_SECONDS - 60
    for folder in (old_elsewhere, old_version, *users):
        os.utime(folder, (long_ago, long_ago))
    with Server(served_files[0]) as server:
        download_dataset(spec, dest, server.url, progress=False)
    assert not dead.exists() and alive.exists() and elsewhere.exists()
    assert not old_elsewhere.exists() and not old_version.exists()
    assert all(folder.exists() for folder in users)


def test_a_folder_in_a_file_s_place_is_refused_before_any_file_moves(served_files, tmp_path):
    files, spec = served_files
    dest = tmp_path / "dest"
    (dest / "t10k-labels-idx1-ubyte.gz").mkdir(parents=True)
    with Server(files) as server, pytest.raises(DataError, match="a folder where the download"):
        download_dataset(spec, dest, server.url, progress=False)
    assert idx_files_in(dest) == ["t10k-labels-idx1-ubyte.gz"]  # three had moved in


def test_a_download_writes_over_no_other_data_and_fetches_nothing_twice(served_files, tmp_path):
    files, spec = served_files
    dest = tmp_path / "dest"
    with Server(files) as server:
        download_dataset(spec, dest, server.url, progress=False)
    # Run again, it fetches nothing: the server has nothing left to give.
    with Server({}) as server:
        assert download_dataset(spec, dest, server.url, progress=False) == dest
    # A user's own data under the official names, gzipped or plain (which a .gz would stand
    # in front of), is never written over; refused before any network access.
    own = make_dataset_dir(tmp_path / "own", seed=1)
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in files:
        (plain / name.removesuffix(".gz")).write_bytes(gzip.decompress((own / name).read_bytes()))
    for folder in (own, plain):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        with pytest.raises(DataError, match=r"is not the official .*writes over no file"):
            download_dataset(spec, folder, "http://127.0.0.1:9/", progress=False)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    fifo = tmp_path / "fifo"  # read to be checked, it would wait for a writer
    fifo.mkdir()
    os.mkfifo(fifo / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="not a regular file where the download puts"):
        download_dataset(spec, fifo, "http://127.0.0.1:9/", progress=False)


def test_a_dataset_without_checksums_is_not_downloaded(served_files, tmp_path):
    # MNIST's files came from any address and were called verified.
    files, _ = served_files
    with Server(files) as server, pytest.raises(UsageError, match="no checksums are known"):
        download_dataset(DATASETS["mnist"], tmp_path / "dest", server.url, progress=False)
    assert not (tmp_path / "dest").exists()


def test_download_flag_checks_the_official_checksums(served_files, tmp_path):
    files, _ = served_files
    dest = tmp_path / "dest"
    with Server(files) as server:
        result = run_script(
            "train.py",
            "--download",
            "--download-url",
            server.url,
            "--data-dir",
            str(dest),
            "--out",
            str(tmp_path / "run"),
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        "SHA-256 of the IDX content" in result.stderr
        and "differs from the official" in result.stderr
    )
    assert idx_files_in(dest) == []


@pytest.mark.parametrize("through", ["server", "proxy"])
def test_a_server_that_trickles_its_headers_is_stopped_by_the_file_s_deadline(
    served_files, tmp_path, monkeypatch, through
):
    """Headers were read under the per-read timeout alone: a server that sent one byte of
    them every few seconds kept a download going for months; so did an HTTPS proxy's reply
    to CONNECT, read before the connection is wrapped."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"http://{listener.getsockname()[0]}:{listener.getsockname()[1]}/"
    url = address
    if through == "proxy":
        for name in ("no_proxy", "NO_PROXY", "HTTPS_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("https_proxy", address)
        url = "https://threefold.invalid/"
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(1 << 16)
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.wait(0.1):
                connection.sendall(b"X")  # one header that never ends

    threading.Thread(target=trickle, daemon=True).start()
    monkeypatch.setattr(shared.download, "TIMEOUT_SECONDS", 1)
    monkeypatch.setattr(shared.download, "SLOWEST_BYTES_PER_SECOND", 10**12)  # 1 s a file
    _, spec = served_files
    started = time.monotonic()
    try:
        with pytest.raises(DataError, match="0 bytes in 1 s, slower than"):
            download_dataset(spec, tmp_path / "dest", url, progress=False)
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - started < 10 and idx_files_in(tmp_path / "dest") == []


def test_a_figure_is_written_in_the_format_its_name_names(tmp_path):
    """crosscheck.py --plot figure.pdf wrote PNG bytes under the name, and said it wrote it."""
    import matplotlib.pyplot as plt

    from shared.plots import save_figure

    for name, start in (
        ("f.pdf", b"%PDF"),
        ("f.svg", b"<?xml"),
        ("f.png", b"\x89PNG"),
        ("f", b"\x89PNG"),
    ):
        fig, _ = plt.subplots()
        save_figure(fig, tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(start), name
