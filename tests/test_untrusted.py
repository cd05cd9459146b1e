"""Untrusted input, an adversary's way: spec files and values that must parse back to the same
network, files that block, shared output folders written by two commands at once, and numbers
that must stay numbers in every JSON a command writes. (What a network may cost is
tests/test_cost.py; checkpoints read as untrusted input are tests/test_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import threefold
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import CheckpointError, DataError, UsageError
from shared.grid import RunStore
from shared.outputs import hold
from shared.profile import cpu_name
from shared.proof.rows import CheckResult
from shared.spec import MAX_SPEC_CHARS, get_arch, state_shapes
from tests.conftest import make_dataset_dir, run_measured, usage_error
from tests.test_training import run_script

LONG_LOCKSTEP = 200  # steps: a run that kept them all grew by about 35 MB a step

# --- spec files and values ------------------------------------------------------------------


def test_a_fifo_named_like_a_spec_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "net.json"
    os.mkfifo(fifo)
    # A writer that never comes: a reader that blocked would hang here until the timeout.
    result = run_script("train.py", "--arch", str(fifo), "--epochs", "1", cwd=tmp_path)
    assert "not a regular file" in usage_error(result)


@pytest.mark.parametrize("p", [-0.0, 5e-324, 1e-300, 0.30000000000000004, 0.999999999])
def test_every_accepted_value_gives_a_spec_that_parses_back_to_the_same_network(tmp_path, p):
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"layers": ["flatten", {"type": "dropout", "p": p}, "fc10"]}))
    arch = get_arch(str(path))
    assert "dropout-" not in arch.name  # -0.0 is written as 0, never as "-0"
    again = get_arch(arch.name, files=False)
    assert again.layers == arch.layers and again.name == arch.name
    assert arch.dropouts[0].p == p and str(arch.dropouts[0].p) != "-0.0"


def test_a_network_whose_canonical_spec_would_not_parse_back_is_refused(tmp_path):
    path = tmp_path / "net.json"
    dropouts = [{"type": "dropout", "p": 5e-324}] * 15
    path.write_text(json.dumps({"layers": ["flatten", *dropouts, "fc10"]}))
    with pytest.raises(UsageError, match=f"canonical spec would be .* more than {MAX_SPEC_CHARS}"):
        get_arch(str(path))


@pytest.mark.parametrize(
    "document, problem",
    [
        ('{"layers": [{"type": ["conv"]}]}', "has type ['conv']"),
        ('{"layers": [{"type": "conv", "channels": {"a": 1}}]}', "not an integer"),
        ('{"layers": [{"type": "dropout", "p": NaN}, "fc10"]}', "drop probability nan"),
        ('{"layers": [{"type": "dropout", "p": Infinity}, "fc10"]}', "drop probability inf"),
        ('{"layers": [{"type": "fc", "features": 1e400}]}', "not an integer"),
        ('{"layers": "conv8-relu"}', 'expected {"layers": [...]}'),
        ('[["conv8"]]', 'expected {"layers": [...]}'),
        ('{"layers": [null]}', "neither a token nor a table"),
    ],
)
def test_odd_json_types_are_one_line(tmp_path, document, problem):
    path = tmp_path / "net.json"
    path.write_text(document)
    with pytest.raises(UsageError) as refused:
        get_arch(str(path))
    assert problem in str(refused.value) and "\n" not in str(refused.value)


def test_odd_toml_types_are_one_line(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text('[[layers]]\ntype = "conv"\nchannels = 1979-05-27T07:32:00Z\n')
    with pytest.raises(UsageError, match=r"option channels is .*, not an integer"):
        get_arch(str(path))


# --- shared outputs are locked --------------------------------------------------------------


@pytest.mark.parametrize(
    "script, extra",
    [
        ("experiments.py", ["--quick", "--data-dir"]),
        ("benchmark.py", ["--impl", "numpy", "--batch-sizes", "8", "--steps", "2"]),
        ("speedrun.py", ["--quick", "--data-dir"]),
    ],
)
def test_a_second_command_into_a_held_output_folder_is_refused(tmp_path, script, extra):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.json").write_text("{}")
    if extra[-1] == "--data-dir":  # the speedrun's quick run takes 2,000 images
        extra = [*extra, str(make_dataset_dir(tmp_path / "data", n_train=2500))]
    with hold(out):  # another grid, benchmark or speedrun writing there right now
        result = run_script(script, *extra, "--out", str(out))
    assert "in use by a run of process" in usage_error(result, script)
    assert (out / "kept.json").read_text() == "{}"


# --- numbers stay numbers -------------------------------------------------------------------


def test_a_benchmark_without_pytorch_writes_null_ratios(tiny_data_dir, tmp_path):
    out = tmp_path / "bench"
    result = run_script(
        "benchmark.py", "--impl", "numpy", "--batch-sizes", "8", "--steps", "2", "--repeats", "1",
        "--ladder-images", "0", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "benchmark.json").read_text())
    assert [r["ratio_to_torch"] for r in saved["rows"]] == [None]
    text = (out / "benchmark.md").read_text()
    assert "n/a (torch not run)" in text
    cpu = cpu_name()
    assert saved["cpu"] == cpu and f"on {cpu}," in text


def test_a_row_of_the_cross_check_that_is_not_a_number_is_null_with_its_reason():
    row = CheckResult("float32", "lab", "s", "loss", "numpy-jax", float("inf"), float("inf"), 1e-4)
    written = json.loads(json.dumps(row.as_dict(), allow_nan=False))
    assert written["max_rel"] is None and written["passed"] is False
    assert "not finite" in written["why_null"]


def test_a_checkpoint_whose_logits_overflow_is_refused_by_evaluate(tmp_path, tiny_data_dir):
    arch = get_arch("noconv")
    # fc1 gives 3e38 whatever the image (its weights 0, its bias 3e38), so fc2's products
    # overflow to +inf in any order of summation (3e38 weights times the images overflowed on
    # an Intel Xeon and summed to finite logits on an AMD EPYC).
    params = {
        name: np.full(shape, 0.0 if name == "fc1.weight" else 3e38, np.float32)
        for name, shape in state_shapes(arch).items()
    }
    path = tmp_path / "huge.npz"
    save_checkpoint(path, params, {"arch": "noconv"})
    out = tmp_path / "report"
    result = run_script("evaluate.py", str(path), "--out", str(out), "--data-dir",
                        str(tiny_data_dir))  # fmt: skip
    assert result.returncode == 1 and "non-finite logits" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    assert load_checkpoint(path).meta["arch"] == "noconv"
    # export.py wrote the pair, then failed its check, with NumPy's warnings before it.
    graph = tmp_path / "huge.onnx"
    result = run_script("export.py", str(path), "--onnx", str(graph), "--data-dir",
                        str(tiny_data_dir))  # fmt: skip
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "non-finite logits" in line and "nothing written" in line
    assert not graph.exists() and not graph.with_suffix(".safetensors").exists()


@pytest.mark.parametrize(
    "run",
    [
        '{"summary": {"test_acc": NaN}, "trained": "t"}',
        '{"summary": {"test_acc": 0.9}, "cpu": 3, "cores": 2}',
        '{"summary": {"test_acc": 0.9}, "cpu": "x", "cores": "two"}',
    ],
)
def test_a_damaged_stored_run_is_refused_not_averaged(run, tmp_path):
    path = tmp_path / "runs.json"
    path.write_text(f'{{"runs": {{"x": {run}}}}}')
    with pytest.raises(DataError, match="damaged or not threefold's runs"):
        RunStore(path, "d" * 64)


def test_a_long_lockstep_takes_no_more_memory_than_a_short_one(tmp_path):
    """The lockstep compares each step as it ends, keeping two numbers a step of each compared
    tensor: when it kept every step's tensors of every implementation, 300 steps of `noconv`
    (100,000 parameters) reached 11.7 GB."""
    peaks = {}
    for steps in (2, LONG_LOCKSTEP):
        flags = ["--arch", "noconv", "--dtype", "float64", "--steps", str(steps)]
        done, peaks[steps] = run_measured(
            ["scripts/crosscheck.py", *flags, "--batch-size", "2", "--quiet"],
            tmp_path / f"peak-{steps}",
        )
        # Its verdicts are not this test's: 200 float64 steps carry momentum's round-off past
        # the tolerance set for 20 (1e-9); the check ran to its end and said so.
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
        assert re.search(r"\n\d+ passed, \d+ failed\n", done.stdout)
    assert peaks[LONG_LOCKSTEP] < peaks[2] + 100, peaks


def test_a_refused_hostile_network_costs_under_a_gigabyte(tmp_path):
    spec = "-".join(["conv1275"] + ["relu"] * 60 + ["flatten", "fc10"])
    out = ["--out", str(tmp_path / "run")]
    done, peak = run_measured(
        ["scripts/train.py", "--arch", spec, "--epochs", "1", *out], tmp_path / "peak"
    )
    assert done.returncode == 2 and "more than the 2 G bound" in done.stderr
    assert peak < 1024


# --- found by the review of the first pass ---------------------------------------------------


def test_a_network_that_once_crashed_float64_training_is_refused_before_any_folder(
    tiny_data_dir, tmp_path
):
    """conv1275 and 20 ReLUs once passed the checks and crashed a float64 step that could not
    hold one image; its element-wise work now refuses it when parsed."""
    spec = "conv1275-" + "relu-" * 20 + "flatten-fc24-fc10"
    out = tmp_path / "deep" / "run"
    result = run_script(
        "train.py", "--arch", spec, "--dtype", "float64", "--batch-size", "4",
        "--data-dir", str(tiny_data_dir), "--out", str(out),
    )  # fmt: skip
    assert "more than the 2 G bound" in usage_error(result)
    assert not (tmp_path / "deep").exists()


def test_a_run_that_fails_removes_every_folder_it_made(tiny_data_dir, tmp_path):
    out = tmp_path / "a" / "b" / "run"
    result = run_script(
        "train.py", "--arch", "strong", "--batch-size", "99", "--limit", "100",
        "--data-dir", str(tiny_data_dir), "--out", str(out),
    )  # fmt: skip
    assert "the last batch of each epoch would hold 1" in usage_error(result)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "flag, problem",
    [("--epochs", "out of range"), ("--seed", "out of range"), ("--limit", "exceeds the")],
)
def test_a_huge_integer_flag_is_one_line(flag, problem, tiny_data_dir, tmp_path):
    data, out = ["--data-dir", str(tiny_data_dir)], ["--out", str(tmp_path / "run")]
    result = run_script("train.py", flag, "9" * 400, *data, *out, cwd=tmp_path)
    line = usage_error(result)
    assert flag in line and problem in line, line
    assert not (tmp_path / "run").exists()


def test_a_huge_integer_in_a_checkpoint_is_one_line(tmp_path, tiny_data_dir):
    path = tmp_path / "c.npz"
    meta = {"arch": "noconv", "config": {"epochs": 10**400}}
    save_arrays = {k: v for k, v in _noconv_tensors().items()}
    np.savez(path, **save_arrays, meta=np.array(json.dumps(meta)))
    result = run_script("evaluate.py", str(path), "--data-dir", str(tiny_data_dir))
    assert result.returncode == 1 and "config.epochs" in result.stderr
    assert "Traceback" not in result.stderr


def _noconv_tensors():
    from shared.spec import init_params

    return init_params(get_arch("noconv"))


def test_render_only_into_a_mistyped_folder_creates_nothing(tmp_path):
    out = tmp_path / "typo" / "deeper"
    result = run_script("experiments.py", "--render-only", "--out", str(out))
    assert "no " in usage_error(result, "experiments.py") and not (tmp_path / "typo").exists()


def test_load_names_every_kind_it_reads_for_a_file_of_another_kind(tmp_path):
    """Its error named checkpoints alone, of a file the user may have taken for weights."""
    for name in ("net.json", "weights"):
        (tmp_path / name).write_text("{}")
        with pytest.raises(CheckpointError) as refused:
            threefold.load(tmp_path / name)
        assert str(refused.value) == (
            f"{tmp_path / name}: not a checkpoint (.npz); load reads a file by its name's "
            "suffix, .onnx as an ONNX graph and .safetensors as weights threefold wrote, any "
            "other as a checkpoint"
        )
    (tmp_path / "run.npz").write_text("{}")  # a checkpoint by its name: what is wrong with it
    with pytest.raises(CheckpointError, match=r"run\.npz: not a threefold checkpoint \(\.npz\)$"):
        threefold.load(tmp_path / "run.npz")
