"""experiments.py and evaluate.py, end to end on a tiny generated dataset."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from shared import experiments
from shared.backend import IMPLEMENTATIONS
from shared.config import TrainConfig
from shared.data import FASHION_MNIST, load_dataset
from shared.errors import DataError, GridFailed, Interrupted, UsageError
from shared.experiments import command_of, recheck_in_float64, run_experiments
from shared.grid import LOCAL, Engine, RunStore, run_grid
from shared.lab_questions import AGREEMENT, DEEP, STRONG, comparisons, seed_row_label
from shared.loop import train
from shared.outputs import hold, prepare_out_dir
from shared.spec import PRESETS, get_arch, param_shapes
from tests.conftest import make_dataset_dir
from tests.test_training import ROOT, run_script


def test_experiments_write_every_table_and_plot(tiny_data_dir, tmp_path, monkeypatch):
    data = load_dataset(tiny_data_dir)
    out = tmp_path / "docs"
    setup = dict(
        base=TrainConfig(epochs=2, batch_size=16),
        budgets=(1, 2),
        seeds=(0, 1),
        lab_batch=50,
        short={"epochs": 1},
        deep={"epochs": 1, "batch_size": 16},
        progress=lambda _: None,
    )
    results = run_experiments(data, out, **setup)
    report = (out / "EXPERIMENTS.md").read_text()
    for title in (
        "Initialisation",
        "Convolution",
        "Max-pooling",
        "Training setup",
        "Epochs",
        "A stronger network",
        "BatchNorm",
        "Dropout",
        "Activation",
        "Residual connections",
        "Random erasing",
        "Accuracy over seeds",
        "Agreement in training",
    ):
        assert f"## {title}" in report
    slugs = ("initialisation", "convolution", "max-pooling", "training-setup", "epochs")
    more = ("a-stronger-network", "batchnorm", "dropout", "activation", "residual-connections")
    for slug in (*slugs, *more, "random-erasing"):
        assert (out / "experiments" / f"{slug}.png").read_bytes()[:4] == b"\x89PNG"
    # Seeds: two for jax and torch, one for numpy; every accuracy a real fraction.
    # Rows: lab, pool, strong, strong on the short budget the BatchNorm, dropout and
    # activation comparisons share, and deep on the budget of the residual and erasing ones.
    assert [len(v) for v in results["seeds"].values()] == [1, 2, 2] * 5
    assert list(results["seeds"])[-4:] == [
        ("strong, epochs 1", "torch"),
        *(("deep, epochs 1, batch_size 16", impl) for impl in IMPLEMENTATIONS),
    ]
    saved = json.loads((out / "experiments" / "results.json").read_text())
    by_impl = saved["comparisons"]["Epochs"]["1 epoch"]
    assert set(by_impl) == set(IMPLEMENTATIONS)
    assert all(0 <= s["test_acc"] <= 1 and len(s["val_curve"]) == 1 for s in by_impl.values())
    # Exactly the rows whose implementations disagree by more than allowed are rechecked in
    # float64, by every implementation.
    disagreeing = {
        f"{title} / {label}"
        for title, rows in saved["comparisons"].items()
        for label, row in rows.items()
        if round(
            max(s["test_acc"] for s in row.values()) - min(s["test_acc"] for s in row.values()), 9
        )
        > AGREEMENT
    }
    assert set(saved["float64"]) == disagreeing
    for row, accs in saved["float64"].items():
        assert set(accs) == set(IMPLEMENTATIONS)
        assert f"- {row}: " in report and "trained again in float64" in report
    # Every finished run is stored with its date: run again, nothing is trained and the
    # report is the same.
    stored = RunStore(out / "experiments" / "runs.json", data.content_sha256)
    assert sum(saved["trained"].values()) == len(stored.runs)
    summaries = [r["summary"] for r in stored.runs.values()]
    for rows in saved["comparisons"].values():
        assert all(s in summaries for row in rows.values() for s in row.values())
    assert "## Provenance" in report
    # Every seed row with a target is judged against it, deep's on whatever recipe it had.
    for row in ("lab", "pool", "strong", "deep, epochs 1, batch_size 16"):
        assert f"- Target for `{row}`: " in report

    def no_training(*_, **__):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(experiments, "train", no_training)
    assert run_experiments(data, out, **setup)["seeds"] == results["seeds"]
    assert (out / "EXPERIMENTS.md").read_text() == report
    # A stored run without a figure the report reads (an older version's, or edited: its
    # curve; its epoch time, a traceback or -5.00 s in the table) is trained again, alone,
    # before anything is drawn. It was refused only once the rest of the grid had trained.
    path = out / "experiments" / "runs.json"
    runs = json.loads(path.read_text())["runs"]
    key = next(k for k, r in runs.items() if r["summary"] == by_impl["numpy"])
    trained = []

    def counted(config, *args, **kwargs):
        trained.append(RunStore(None, data.content_sha256).key(config))
        return train(config, *args, **kwargs)

    monkeypatch.setattr(experiments, "train", counted)
    again = "(1 stored without a figure the report reads: trained again)"
    for fault in ({"val_curve": None}, *({"epoch_seconds": s} for s in (None, "fast", -5.0))):
        store = json.loads(path.read_text())
        store["runs"][key]["summary"] |= fault
        path.write_text(json.dumps(store))
        said, trained[:] = [], []
        run_experiments(data, out, **{**setup, "progress": said.append})
        assert (
            trained == [key] and f"1 runs to train, {len(runs) - 1} already stored {again}" in said
        )
        summary = json.loads(path.read_text())["runs"][key]["summary"]
        assert len(summary["val_curve"]) == 1 and summary["epoch_seconds"] > 0
    # A seed row's run, of which the report reads the accuracy alone, is not trained again for
    # want of an epoch time (an older version's seed rows kept none: eight runs of the docs').
    plan = experiments.plan_experiments(**{k: v for k, v in setup.items() if k != "progress"})
    seed_one = next(c for (title, *_), cs in plan.cells.items() if title == "Seeds" for c in cs[1:])
    store = json.loads(path.read_text())
    del store["runs"][RunStore(None, data.content_sha256).key(seed_one)]["summary"]["epoch_seconds"]
    path.write_text(json.dumps(store))
    trained.clear()
    run_experiments(data, out, **setup)
    assert trained == []


def test_runs_that_do_not_fit_the_data_are_refused_before_any_folder(tmp_path, tiny_data_dir):
    out = tmp_path / "docs"
    result = run_script(
        "experiments.py", "--quick", "--data-dir", str(tiny_data_dir), "--out", str(out)
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    # The row's setting, not a flag: experiments.py has no --limit.
    assert error.endswith(
        ": limit 1000 exceeds the 100 training images; give more images with --data-dir"
    )
    assert not out.exists()


# A dataset's content digest, as a store keys its runs by (any string serves here).
DATA = "d" * 64


def test_a_fresh_store_trains_its_grid_again_and_keeps_every_other_run(tmp_path):
    path = tmp_path / "runs.json"
    ran = {"summary": {"test_acc": 0.5}, "trained": "t", "cpu": "x", "cores": 1}
    this, other = TrainConfig(impl="numpy"), TrainConfig(impl="numpy", seed=1)
    store = RunStore(path, DATA)
    store.add(this, ran)
    store.add(other, ran)
    fresh = RunStore(path, DATA, fresh=True)
    assert this not in fresh and other not in fresh  # neither counts until trained again
    fresh.add(this, {**ran, "trained": "again"})
    assert this in fresh and other not in fresh
    kept = RunStore(path, DATA)  # --fresh for one grid once dropped every run it did not train
    assert kept.entry(this)["trained"] == "again" and kept.entry(other)["trained"] == "t"


def test_a_store_is_its_command_s_alone(tmp_path):
    # speedrun.py --out OUT/experiments read the experiments' store: its "defaults" run is the
    # grid's lab row, summarised otherwise, and with --fresh it wrote over that finished run.
    path = tmp_path / "runs.json"
    ran = {"summary": {"test_acc": 0.5}, "trained": "t", "cpu": "x", "cores": 1}
    RunStore(path, DATA, command="experiments").add(TrainConfig(impl="numpy"), ran)
    with pytest.raises(UsageError, match=r"the runs of experiments\.py, which speedrun\.py does"):
        RunStore(path, DATA, fresh=True, command="speedrun")
    read = RunStore(path, DATA)  # a reader that names no command, as a tool's
    read.add(TrainConfig(impl="jax"), ran)
    assert json.loads(path.read_text())["command"] == "experiments" and len(read.runs) == 2
    # An older version's store, which names none, stays no command's: the first to open it
    # claimed it, and its owner was refused its own runs.
    legacy = json.loads(path.read_text())
    del legacy["command"]
    path.write_text(json.dumps(legacy))
    RunStore(path, DATA, fresh=True, command="speedrun").add(TrainConfig(impl="torch"), ran)
    assert "command" not in json.loads(path.read_text())
    assert len(RunStore(path, DATA, command="experiments").runs) == 3


def test_a_fresh_grid_cut_short_leaves_the_rest_to_the_same_command_without_fresh(
    tmp_path, tiny_data_dir
):
    """Its advice, the same command without --fresh, once found every old run stored and
    trained nothing: the report mixed the runs it had asked to train again with new ones."""
    path = tmp_path / "runs.json"
    ran = {"summary": {"test_acc": 0.5}, "trained": "old", "cpu": "x", "cores": 1}
    configs = {TrainConfig(impl="numpy", seed=seed): f"seed {seed}" for seed in range(3)}
    other = TrainConfig(impl="numpy", seed=9)  # another grid's, in the same store
    for config in (*configs, other):
        RunStore(path, DATA).add(config, ran)

    def stopped_after_one(config: TrainConfig, data) -> dict:
        if config.seed == 1:
            raise KeyboardInterrupt
        return {"test_acc": 0.75}

    data = load_dataset(tiny_data_dir)
    with pytest.raises(Interrupted, match="the same command without --fresh trains the rest"):
        run_grid(stopped_after_one, configs, data, RunStore(path, DATA, fresh=True))
    store = RunStore(path, DATA)
    assert [config.seed for config in configs if config in store] == [0]
    assert other in store and len(store.runs) == 4  # the old runs kept until replaced
    run_grid(lambda config, data: {"test_acc": 0.75}, configs, data, store)
    store = RunStore(path, DATA)
    assert all(store.entry(config)["summary"]["test_acc"] == 0.75 for config in configs)
    assert "stale" not in json.loads(path.read_text())


def test_a_run_counts_only_for_the_data_it_trained_on(tmp_path, tiny_data_dir):
    """Another dataset's runs, or runs stored before a store named the data, are kept in the
    file and never stand in for this data's: the speedrun once reported runs on a folder of
    test images as the real data's."""
    path = tmp_path / "runs.json"
    config = TrainConfig(impl="numpy")
    ran = {"summary": {"test_acc": 0.5}, "trained": "t", "cpu": "x", "cores": 1}
    RunStore(path, "e" * 64).add(config, ran)
    store = RunStore(path, DATA)
    assert config not in store
    undated = {k: v for k, v in json.loads(store.key(config)).items() if k != "data"}
    runs = json.loads(path.read_text())["runs"]
    path.write_text(json.dumps({"runs": {**runs, json.dumps(undated): ran}}))
    store = RunStore(path, DATA)
    assert config not in store and len(store.runs) == 2 and store.undated == 1
    said, data = [], load_dataset(tiny_data_dir)

    def trained(config: TrainConfig, data) -> dict:
        return {"test_acc": 0.5}

    run_grid(trained, {config: "the run"}, data, store, progress=said.append)
    undated = "(1 stored before runs named their data: kept, not reused)"
    assert said[0] == f"1 runs to train, 0 already stored {undated}"
    assert len(RunStore(path, DATA).runs) == 3 and config in RunStore(path, DATA)


def test_a_run_that_fails_outside_threefold_is_reported_and_the_others_go_on(
    tmp_path, tiny_data_dir
):
    # Out of memory, or a framework's own error: it stopped the local grid with a traceback,
    # and the runs after it never started (on Ray, a FAILED line and the others went on).
    store, said = RunStore(tmp_path / "runs.json", DATA), []
    configs = {TrainConfig(impl="numpy", seed=seed): f"seed {seed}" for seed in range(3)}

    def trained(config: TrainConfig, data) -> dict:
        if config.seed == 0:
            raise MemoryError()  # numpy's has a message; a bare one has none
        if config.seed == 1:
            raise RuntimeError("a framework's failure\nits second line")
        return {"test_acc": 0.5}

    with pytest.raises(GridFailed) as failed:
        run_grid(trained, configs, load_dataset(tiny_data_dir), store, progress=said.append)
    assert "2 of 3 runs failed (seed 0: MemoryError; seed 1: RuntimeError: a framework's" in str(
        failed.value
    )
    assert [config.seed for config in configs if config in store] == [2]
    assert any(
        line.endswith("seed 1: FAILED: RuntimeError: a framework's failure") for line in said
    )
    # Every run failed: it said the others were kept in a store never written.
    nothing = tmp_path / "none" / "runs.json"
    with pytest.raises(GridFailed) as failed:
        run_grid(trained, dict(itertools.islice(configs.items(), 2)), load_dataset(tiny_data_dir),
                 RunStore(nothing, DATA), progress=said.append)  # fmt: skip
    assert "2 of 2 runs failed (" in str(failed.value) and "); none finished: " in str(failed.value)
    assert not nothing.exists()


class _StoppedCluster(types.ModuleType):
    """A stand-in for `ray` whose start and shutdown each receive a SIGTERM, as a user's second
    stop would land while the grid shuts its cluster down."""

    def __init__(self):
        super().__init__("ray")
        self.shut_down = False

    def init(self, **options) -> None:
        _terminated_here()

    def shutdown(self) -> None:
        _terminated_here()
        self.shut_down = True


def _terminated_here() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs between bytecodes


def test_a_second_stop_waits_for_the_ray_cluster_to_shut_down(tmp_path, tiny_data_dir, monkeypatch):
    # The second SIGTERM was raised inside ray.shutdown, which stopped partway.
    engine, cluster = Engine("ray"), _StoppedCluster()
    monkeypatch.setitem(sys.modules, "ray", cluster)
    store = RunStore(tmp_path / "runs.json", DATA)
    configs = {TrainConfig(impl="numpy"): "the run"}
    with pytest.raises(Interrupted, match="terminated"):
        run_grid(lambda c, d: {}, configs, load_dataset(tiny_data_dir), store, engine, print)
    assert cluster.shut_down


def test_the_report_names_the_command_that_made_its_tables():
    # `--impl torch` made a report of torch alone that said `experiments.py --quick`.
    assert (
        command_of(True, ("torch",), LOCAL) == "python scripts/experiments.py --quick --impl torch"
    )
    assert command_of(False, IMPLEMENTATIONS, LOCAL) == "python scripts/experiments.py"
    ray = dataclasses.replace(LOCAL, name="ray")  # not constructed: Ray would be checked
    two = IMPLEMENTATIONS[:2]
    flags = f"--impl {two[0]} --impl {two[1]} --engine ray"
    assert command_of(False, two, ray).endswith(flags)
    # The cores a run had change its times: a speedrun's report dropped --cpus-per-run.
    one_core = dataclasses.replace(ray, cpus_per_run=1)
    assert command_of(False, two, one_core).endswith(f"{flags} --cpus-per-run 1")


def test_provenance_counts_the_runs_read_not_every_run_the_store_keeps(tmp_path):
    # A speedrun's runs copied into the experiments' store were counted behind its tables.
    path = tmp_path / "runs.json"
    ran = {"summary": {"test_acc": 0.5}, "cpu": "x", "cores": 1}
    configs = [TrainConfig(impl="numpy", seed=seed) for seed in range(3)]
    for config, trained in zip(configs, ("day 1", "day 1", "day 2"), strict=True):
        RunStore(path, DATA).add(config, {**ran, "trained": trained})
    store = RunStore(path, DATA)
    store.summary(configs[0])
    store.summary(configs[2])
    assert store.provenance() == {"day 1": 1, "day 2": 1}


def test_a_damaged_or_unreadable_run_store_is_refused_fresh_or_not(tmp_path):
    data_dir = make_dataset_dir(tmp_path / "data", n_train=1400, n_test=100)  # fits --quick
    store = tmp_path / "docs" / "experiments" / "runs.json"
    store.parent.mkdir(parents=True)
    deep = "[" * 100_000 + "]" * 100_000  # nested past Python's stack
    ran = {"summary": {"test_acc": 0.5}, "cpu": "x", "cores": 1}
    undated = json.dumps({"runs": {"k": ran}})  # no date and commit: the report's traceback
    listed = json.dumps({"runs": {"k": {**ran, "trained": [1]}}})
    damages = ('{"runs": [1, 2', '{"runs": [1, 2]}', '{"runs": {"k": 1}}', deep, undated, listed)
    for damaged in damages:
        store.write_text(damaged)
        for fresh in (False, True):  # written over, its runs would be lost
            with pytest.raises(DataError, match=r"runs.json: damaged.*move it away"):
                RunStore(store, DATA, fresh)
    unreadable = tmp_path / "folder" / "runs.json"
    unreadable.mkdir(parents=True)
    for fresh in (False, True):
        with pytest.raises(DataError, match=r"runs.json: cannot read it \(Is a directory\)"):
            RunStore(unreadable, DATA, fresh)
    out = store.parents[1]
    result = run_script("experiments.py", "--quick", "--data-dir", str(data_dir), "--out", str(out))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "runs.json: damaged" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (out / "EXPERIMENTS.md").exists()


def test_runs_stored_before_a_setting_was_added_still_count(tmp_path):
    # A setting joins TrainConfig at the value earlier runs had, so they stay reusable.
    config = TrainConfig(arch="pool", seed=3)
    older = {**dataclasses.asdict(config), "data": DATA}
    del older["erase"], older["optimizer"]
    finished = {"summary": {"test_acc": 0.9}, "trained": "2026-01-01 0123abc"}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": {json.dumps(older): finished}}))
    store = RunStore(path, DATA)
    assert config in store and store.entry(config) == finished
    assert dataclasses.replace(config, erase=0.5) not in store
    assert dataclasses.replace(config, optimizer="adam") not in store


def test_a_preset_redefined_since_a_run_does_not_reuse_it(tmp_path):
    """A key names the preset's layers: a run of an earlier `pool` does not count for today's,
    while a run stored before keys named them is taken as today's."""
    config = TrainConfig(arch="pool", seed=3)
    current = json.loads(RunStore(None, DATA).key(config))
    assert current["preset"] == PRESETS["pool"][0]
    finished = {"summary": {"test_acc": 0.9}, "trained": "2026-01-01 0123abc"}
    path = tmp_path / "runs.json"
    for stored, counts in (
        ({**current, "preset": "conv16-relu-maxpool2-flatten-fc10"}, False),
        ({k: v for k, v in current.items() if k != "preset"}, True),
    ):
        path.write_text(json.dumps({"runs": {json.dumps(stored): finished}}))
        assert (config in RunStore(path, DATA)) == counts


def test_a_run_stored_under_an_old_and_a_current_key_keeps_the_current_one(tmp_path):
    # A version that did not read old keys trained the run again under a fuller key: all are
    # in the file, in any order, and the most current key's run is the one that counts.
    config = TrainConfig(arch="pool", seed=3)
    current = json.loads(RunStore(None, DATA).key(config))
    full = {k: v for k, v in current.items() if k != "preset"}  # before presets were keyed
    older = {k: v for k, v in full.items() if k not in ("erase", "optimizer")}
    runs = [
        (older, {"summary": {"test_acc": 0.7}, "trained": "2026-01-01 0123abc"}),
        (full, {"summary": {"test_acc": 0.8}, "trained": "2026-02-01 4567def"}),
        (current, {"summary": {"test_acc": 0.9}, "trained": "2026-03-01 89abcde"}),
    ]
    path = tmp_path / "runs.json"
    for order in itertools.permutations(runs):
        for stored in (order, [run for run in order if run[0] is not current]):
            path.write_text(json.dumps({"runs": {json.dumps(k): r for k, r in stored}}))
            store = RunStore(path, DATA)
            assert len(store.runs) == 1
            assert store.summary(config)["test_acc"] == (0.9 if len(stored) == 3 else 0.8)
    # Written back, the store holds the current keys only and reads back the same.
    store.add(TrainConfig(arch="lab"), runs[0][1])
    assert RunStore(path, DATA).runs == store.runs and len(store.runs) == 2


def test_residual_and_erasing_are_judged_on_the_deep_seed_row():
    deep = {"epochs": 2, "batch_size": 16}
    by_title = {c.title: c for c in comparisons(15, (1, 5), 100, {"epochs": 1}, deep)}
    for title in ("Residual connections", "Random erasing"):
        assert by_title[title].budget == deep
        assert by_title[title].noise == seed_row_label(DEEP, deep) != seed_row_label(STRONG, {})
    # At (nearly) equal parameters: the residual network's extra are its 1x1 projection
    # (32 -> 64, no bias) and the projection's BatchNorm.
    residual, plain = (v.changes["arch"] for v in by_title["Residual connections"].variants)
    counts = [
        sum(math.prod(s) for s in param_shapes(get_arch(a)).values())
        for a in (residual, plain, "deep")
    ]
    assert counts[0] - counts[1] == 32 * 64 + 2 * 64 and counts[1] == counts[2]


def test_rows_that_disagree_are_trained_again_in_float64(tiny_data_dir):
    impls = IMPLEMENTATIONS
    saved = {
        "base": dataclasses.asdict(TrainConfig(epochs=1, batch_size=16)),
        "comparisons": {
            "Epochs": {
                "1 epoch": {
                    i: {"test_acc": a} for i, a in zip(impls, (0.5, 0.5, 0.9), strict=True)
                },
                "agreeing": {i: {"test_acc": 0.5} for i in impls},
            }
        },
        "variants": {"Epochs": {"1 epoch": {"epochs": 1}, "agreeing": {"arch": "noconv"}}},
    }
    rechecked = recheck_in_float64(load_dataset(tiny_data_dir), saved, progress=lambda _: None)
    assert list(rechecked) == ["Epochs / 1 epoch"]
    accs = rechecked["Epochs / 1 epoch"]
    assert set(accs) == set(impls)
    # In float64 the implementations agree: what is left is far below the allowed gap.
    assert max(accs.values()) - min(accs.values()) <= AGREEMENT


def test_evaluate_any_checkpoint_with_any_implementation(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    train(
        TrainConfig(impl="torch", arch="pool", epochs=1, batch_size=16),
        load_dataset(tiny_data_dir),
        out,
        log=lambda _: None,
    )
    accs = []
    for impl in IMPLEMENTATIONS:
        result = run_script(
            "evaluate.py",
            str(out / "checkpoint.npz"),
            "--impl",
            impl,
            "--data-dir",
            str(tiny_data_dir),
            "--out",
            str(tmp_path / impl),
        )
        assert result.returncode == 0, result.stderr
        assert all(name in result.stdout for name in FASHION_MNIST.class_names)
        evaluation = json.loads((tmp_path / impl / "evaluation.json").read_text())
        assert evaluation["written_by"] == "torch" and evaluation["evaluated_by"] == impl
        assert np.array(evaluation["confusion_matrix"]).sum() == 30
        test = evaluation["test_data"]  # which test set, said and kept
        assert test["images"] == 30 and test["folder"] == str(tiny_data_dir.resolve())
        assert len(test["sha256"]) == 64 and "on 30 test images of fashion-mnist" in result.stdout
        for name in ("confusion.png", "misclassified.png"):
            assert (tmp_path / impl / name).read_bytes()[:4] == b"\x89PNG"
        assert evaluation["tta"] is True  # as the run evaluated
        accs.append(evaluation["acc"])
    assert len(set(accs)) == 1
    result = run_script(
        "evaluate.py",
        str(out / "checkpoint.npz"),
        "--no-tta",
        "--data-dir",
        str(tiny_data_dir),
        "--out",
        str(tmp_path / "plain"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "plain" / "evaluation.json").read_text())["tta"] is False


def test_a_grid_holds_the_folder_of_its_run_store(tmp_path):
    """A speedrun given --out OUT/experiments writes the run store the experiments of OUT
    keep there: whichever starts second is refused, naming the first."""
    data_dir = make_dataset_dir(tmp_path / "data", n_train=1400, n_test=100)  # fits --quick
    out = tmp_path / "docs"
    with hold(prepare_out_dir(out / "experiments")):  # a speedrun's --out, under way
        result = run_script(
            "experiments.py", "--quick", "--data-dir", str(data_dir), "--out", str(out)
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert f"--out {out / 'experiments'}: in use by a run of process {os.getpid()}" in line
    assert [p.name for p in out.rglob("*")] == ["experiments"]  # nothing written in them


def test_a_fresh_recheck_records_the_stored_runs_behind_the_tables(tiny_data_dir, tmp_path):
    # Under --fresh no stored run counted as held, so the provenance named only the float64
    # runs the recheck trained, not the runs behind every table.
    saved = json.loads((ROOT / "docs" / "experiments" / "results.json").read_text())
    figures = tmp_path / "experiments"
    figures.mkdir()
    (figures / "results.json").write_text(json.dumps(saved))
    store = RunStore(figures / "runs.json", load_dataset(tiny_data_dir).content_sha256)
    grid = experiments.plan_experiments(**experiments.QUICK).grid()
    for config in grid:
        store.add(config, {"summary": {"test_acc": 0.5}, "trained": "2026-12-01 abc1234"})
    flags = ["--recheck-float64", "--fresh", "--quick", "--out", str(tmp_path)]
    with pytest.MonkeyPatch.context() as patch:  # the float64 runs are not what is asked
        patch.setattr(experiments, "recheck_in_float64", lambda *_, **__: {})
        assert experiments.main([*flags, "--data-dir", str(tiny_data_dir)]) == 0
    trained = json.loads((figures / "results.json").read_text())["trained"]
    assert trained == {"2026-12-01 abc1234": len(grid)}


def test_a_recheck_trains_on_the_tables_data_and_counts_the_runs_behind_them(
    tiny_data_dir, tmp_path, capsys
):
    # On other data it mixed float64 rows of those into the report; its provenance counted
    # the runs today's flags plan (4 runs behind a report of 34, without --quick).
    saved = json.loads((ROOT / "docs" / "experiments" / "results.json").read_text())
    figures = tmp_path / "experiments"
    figures.mkdir()
    digest = load_dataset(tiny_data_dir).content_sha256
    flags = ["--recheck-float64", "--out", str(tmp_path), "--data-dir", str(tiny_data_dir)]
    (figures / "results.json").write_text(json.dumps({**saved, "data": "f" * 64}))
    assert experiments.main(flags) == 2
    assert "other data than the tables of" in capsys.readouterr().err
    behind = {"2026-12-01 abc1234": 34}
    (figures / "results.json").write_text(
        json.dumps({**saved, "data": digest, "tables_trained": behind})
    )
    with pytest.MonkeyPatch.context() as patch:  # the float64 runs are not what is asked
        patch.setattr(experiments, "recheck_in_float64", lambda *_, **__: {})
        assert experiments.main(flags) == 0
    assert json.loads((figures / "results.json").read_text())["trained"] == behind


def test_a_figure_that_cannot_be_written_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """A folder where a comparison's figure goes was found only once the grid had ended, and
    the figures before it had been replaced while results.json stayed the old one."""
    data_dir = make_dataset_dir(tmp_path / "data", n_train=1400, n_test=100)
    (tmp_path / "out" / "experiments" / "initialisation.png").mkdir(parents=True)
    monkeypatch.setattr(experiments, "run_grid", lambda *args: pytest.fail("a run began"))
    assert (
        experiments.main(["--quick", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
        == 2
    )
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("experiments.py: error: --out ") and "initialisation.png" in said


def test_a_fifo_under_the_store_s_name_is_refused_not_waited_on(tmp_path):
    """Checking results.json, the command opened the store beside it to see whose it is, and
    a FIFO there waited for a writer: the grid hung before its first run."""
    data_dir = make_dataset_dir(tmp_path / "data", n_train=1400, n_test=100)
    store = tmp_path / "out" / "experiments" / "runs.json"
    store.parent.mkdir(parents=True)
    os.mkfifo(store)
    flags = ["--quick", "--impl", "numpy", "--data-dir", str(data_dir)]
    flags += ["--out", str(store.parents[1])]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "experiments.py"), *flags],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip() == (
        f"experiments.py: error: --out {store}: not a regular file"
    )
    assert stat.S_ISFIFO(os.stat(store).st_mode) and os.listdir(store.parent) == ["runs.json"]


@pytest.mark.parametrize("script", ["experiments.py", "speedrun.py"])
def test_a_numpy_thread_count_no_run_can_take_is_refused_before_any_run(script, tmp_path):
    """Every NumPy run failed on it in turn, and the grid ended with exit 1."""
    data_dir = make_dataset_dir(tmp_path / "data", n_train=1400, n_test=100)
    flags = [
        "--quick",
        "--impl",
        "numpy",
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *flags],
        env={**os.environ, "THREEFOLD_NUMPY_THREADS": "0"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr == (
        f"{script}: error: THREEFOLD_NUMPY_THREADS='0': expected a positive whole number\n"
    )
    assert not (tmp_path / "o").exists()


def test_a_recheck_the_data_cannot_serve_names_its_row(tiny_data_dir):
    """It said "--limit 1000 exceeds the 100 training images", a flag nobody typed."""
    saved = json.loads((ROOT / "docs" / "experiments" / "results.json").read_text())
    saved["base"]["limit"] = 1000  # as --quick saves it
    with pytest.raises(UsageError) as refused:
        recheck_in_float64(load_dataset(tiny_data_dir), saved)
    said = str(refused.value)
    assert said.startswith("Agreement in float64: Training setup / the lab's setup | ")
    assert said.endswith("exceeds the 100 training images; give more images with --data-dir")


def test_a_rerender_refuses_impl_which_the_saved_results_decide(tmp_path, capsys):
    for flag in ("--render-only", "--recheck-float64"):
        assert experiments.main([flag, "--impl", "numpy", "--out", str(tmp_path)]) == 2
        assert f"--impl: not with {flag}, which takes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--fresh"], ["--data-dir", "/nonexistent"], ["--engine", "ray"]]
)
def test_a_render_only_refuses_what_it_would_not_use(flags, tmp_path, capsys):
    # Each was accepted, and ignored, with exit 0.
    saved = (ROOT / "docs" / "experiments" / "results.json").read_text()
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "results.json").write_text(saved)
    assert experiments.main(["--render-only", *flags, "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert f"{flags[0]}" in said and "--render-only trains nothing and reads no data" in said
    assert experiments.main(["--render-only", "--out", str(tmp_path)]) == 0
