"""scripts/speedrun.py: both recipes in every implementation, the summary computed from the
runs, results kept when interrupted, bad flags refused in one line."""

from __future__ import annotations

import json
import statistics

import pytest

from shared import speedrun
from shared.backend import IMPLEMENTATIONS
from shared.config import FAST_RECIPE, STRONG_FAST_RECIPE, TrainConfig
from shared.data import load_dataset
from shared.errors import Interrupted
from tests.conftest import make_dataset_dir
from tests.test_training import run_script


def test_quick_speedrun_writes_every_implementation_and_its_summary(tmp_path):
    out, data_dir = tmp_path / "speedrun", make_dataset_dir(tmp_path / "data", n_train=400)
    result = run_script("speedrun.py", "--quick", "--data-dir", str(data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "speedrun.json").read_text())
    assert saved["fast"] == FAST_RECIPE and saved["machines"][0]["cores"] >= 1
    assert (out / "speedrun.png").stat().st_size > 0
    report = (out / "speedrun.md").read_text()
    # The header gives the recipe as the runs trained it: one epoch on the images there were.
    images = saved["runs"][0]["config"]["limit"]
    assert "epochs=1, " in report and f"limit={images} (2 seeds)" in report
    assert f"defaults: 2 epochs on {images:,} images" in report
    for s in saved["summary"]:
        fast = [r for r in saved["runs"] if r["impl"] == s["impl"] and r["recipe"] == "fast"]
        default = [r for r in saved["runs"] if r["impl"] == s["impl"] and r["recipe"] == "defaults"]
        assert [r["seed"] for r in fast] == [0, 1] and len(default) == 1
        accs = [r["test_acc"] for r in fast]
        assert s["mean_acc"] == pytest.approx(statistics.mean(accs))
        assert s["spread"] == pytest.approx(max(accs) - min(accs))
        seconds = statistics.mean(r["train_seconds"] for r in fast)
        assert s["ratio"] == pytest.approx(seconds / default[0]["train_seconds"])
        for r in fast + default:
            assert r["train_seconds"] > 0 and r["compile_seconds"] >= 0 and r["test_seconds"] > 0
        # Each run trained with its recipe: the fast runs one epoch, the defaults two.
        assert {r["config"]["epochs"] for r in fast} == {1}
        assert default[0]["config"]["epochs"] == 2 and default[0]["config"]["flip"]
        assert f"| {s['impl']} | 2 | {100 * s['mean_acc']:.2f}% |" in report


def test_the_strong_race_trains_its_fast_recipe_only_and_judges_accuracy(tmp_path):
    out, data_dir = tmp_path / "strong", make_dataset_dir(tmp_path / "data", n_train=400)
    chosen = IMPLEMENTATIONS[:2]  # a partial race, named in its report
    impl_flags = [flag for impl in chosen for flag in ("--impl", impl)]
    flags = ("--quick", "--arch", "strong", "--seeds", "1", *impl_flags)
    result = run_script("speedrun.py", *flags, "--data-dir", str(data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "speedrun.json").read_text())
    assert saved["arch"] == "strong" and saved["fast"] == STRONG_FAST_RECIPE
    runs = [(r["impl"], r["recipe"], r["config"]["arch"]) for r in saved["runs"]]
    assert runs == [(impl, "fast", "strong") for impl in chosen]
    report = (out / "speedrun.md").read_text()
    command = "speedrun.py --arch strong --quick " + " ".join(impl_flags) + " --seeds 1`"
    assert command in report and "mean >= 92.5%" in report
    assert "defaults" not in report and "ratio" not in report
    for s in saved["summary"]:
        assert s["ratio"] is None and s["meets_time"] is None
        assert s["meets_accuracy"] == (s["mean_acc"] >= 0.925)


def test_the_summary_judges_both_targets():
    runs = [
        {
            "impl": "numpy",
            "recipe": "defaults",
            "test_acc": 0.913,
            "train_seconds": 40.0,
            "compile_seconds": 0.0,
            "test_seconds": 0.5,
        },
    ] + [
        {
            "impl": "numpy",
            "recipe": "fast",
            "test_acc": acc,
            "train_seconds": seconds,
            "compile_seconds": 0.0,
            "test_seconds": 0.5,
        }
        for acc, seconds in ((0.905, 9.0), (0.917, 11.0))
    ]
    lab = speedrun.RACES["lab"]
    s = speedrun.summarize(lab, runs, "numpy")
    assert s["mean_acc"] == pytest.approx(0.911) and s["min_acc"] == 0.905
    assert s["ratio"] == pytest.approx(0.25) and s["meets_accuracy"] and s["meets_time"]
    runs[1]["train_seconds"] = 9.5  # 10.25 / 40 s: four times faster no longer
    assert not speedrun.summarize(lab, runs, "numpy")["meets_time"]
    runs[1]["test_acc"] = 0.9  # a mean of 90.85%
    assert not speedrun.summarize(lab, runs, "numpy")["meets_accuracy"]


def test_the_fast_recipe_is_the_configuration_trained():
    lab, strong = speedrun.RACES["lab"], speedrun.RACES["strong"]
    config = speedrun.recipe_config(lab, "jax", "fast", 3, None)
    assert config == TrainConfig(impl="jax", arch="lab", seed=3, **FAST_RECIPE)
    assert speedrun.recipe_config(lab, "torch", "defaults", 0, None) == TrainConfig(impl="torch")
    config = speedrun.recipe_config(strong, "numpy", "fast", 1, None)
    assert config == TrainConfig(impl="numpy", arch="strong", seed=1, **STRONG_FAST_RECIPE)


@pytest.mark.parametrize(
    ("stop", "said"),
    [
        (KeyboardInterrupt(), "interrupted"),
        # As the training loop raises it: its "nothing was saved" is not the grid's news.
        (Interrupted("interrupted in epoch 1; nothing was saved"), "interrupted"),
        (
            Interrupted("terminated (SIGTERM) in epoch 1", signal_number=15),
            "terminated \\(SIGTERM\\)",
        ),
    ],
)
def test_an_interrupted_speedrun_keeps_the_runs_it_finished_and_resumes(
    stop, said, tmp_path, monkeypatch
):
    real, calls = speedrun.timed_run, []

    def stopped_at_the_third(config, data):
        calls.append(config)
        if len(calls) == 3:
            raise stop
        return real(config, data)

    monkeypatch.setattr(speedrun, "timed_run", stopped_at_the_third)
    data = load_dataset(make_dataset_dir(tmp_path / "data", n_train=400))
    race = speedrun.RACES["lab"]
    kept_in = f"^{said} with 2 of 3 runs finished, kept in .*runs\\.json"
    with pytest.raises(Interrupted, match=kept_in) as raised:
        speedrun.run_speedrun(race, data, tmp_path, ("numpy",), 2, True, lambda _: None)
    assert raised.value.exit_code == (143 if "SIGTERM" in said else 130)
    kept = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["summary"]["seed"]) for r in kept.values()] == [0, 0]
    assert not (tmp_path / "speedrun.json").exists()
    # Run again: only the run that was stopped trains.
    summary = speedrun.run_speedrun(race, data, tmp_path, ("numpy",), 2, True, lambda _: None)
    assert len(calls) == 4 and calls[3] == calls[2] and summary[0]["seeds"] == 2
    saved = json.loads((tmp_path / "speedrun.json").read_text())
    assert [(r["recipe"], r["seed"]) for r in saved["runs"]] == [
        ("defaults", 0),
        ("fast", 0),
        ("fast", 1),
    ]
    # On other files none of these runs stands in: all three train again, kept beside them.
    other = load_dataset(make_dataset_dir(tmp_path / "other", n_train=400, seed=1))
    speedrun.run_speedrun(race, other, tmp_path, ("numpy",), 2, True, lambda _: None)
    assert len(calls) == 7 and calls[4:] == calls[:3]
    assert len(json.loads((tmp_path / "runs.json").read_text())["runs"]) == 6


@pytest.mark.parametrize(
    ("field", "stored"),
    [
        ("train_seconds", None),
        ("compile_seconds", "1"),
        ("peak_mb", -1),
        # A ZeroDivisionError and a plot's overflow, in tracebacks.
        ("train_seconds", 0),
        ("test_seconds", 1.7e308),
    ],
)
def test_a_stored_run_without_what_the_report_reads_is_trained_again(field, stored, tmp_path):
    """It was refused, once the rest of the race had trained, with advice that trained the
    whole race again."""
    data = load_dataset(make_dataset_dir(tmp_path / "data", n_train=400))
    race, said = speedrun.RACES["strong"], []
    speedrun.run_speedrun(race, data, tmp_path, ("numpy",), 1, True, lambda _: None)
    path = tmp_path / "runs.json"
    store = json.loads(path.read_text())
    (run,) = store["runs"].values()
    run["summary"][field] = stored  # an older version's store, or one edited by hand
    path.write_text(json.dumps(store))
    speedrun.run_speedrun(race, data, tmp_path, ("numpy",), 1, True, said.append)
    again = "(1 stored without a figure the report reads: trained again)"
    assert said[0] == f"1 runs to train, 0 already stored {again}"
    (run,) = json.loads(path.read_text())["runs"].values()
    assert all(check(run["summary"][name]) for name, check in speedrun.TIMES.items())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seeds", "0"], "--seeds"),
        (["--impl", "fortran"], "--impl"),
        ([], "numpy fast seed 0: batch size 128 exceeds the 100 training images"),  # no flag
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, tiny_data_dir):
    out = tmp_path / "o"
    data = ["--data-dir", str(tiny_data_dir)]
    result = run_script("speedrun.py", "--quick", "--out", str(out), *data, *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_seeds_beyond_the_bound_are_refused_before_any_run_is_planned(capsys):
    with pytest.raises(SystemExit) as refused:
        speedrun.main(["--seeds", str(speedrun.MAX_SEEDS + 1)])
    assert refused.value.code == 2
    assert f"--seeds: {speedrun.MAX_SEEDS + 1} is out of range" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_any_run(tmp_path, capsys):
    data_dir = make_dataset_dir(tmp_path / "data", n_train=400)
    out = tmp_path / "out"
    (out / "speedrun.png").mkdir(parents=True)  # found once the race had ended, before
    flags = ["--quick", "--impl", "numpy", "--out", str(out), "--data-dir", str(data_dir)]
    assert speedrun.main(flags) == 2 and "speedrun.png: is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["speedrun.png"]  # no run trained


def test_a_folder_named_with_control_characters_is_reported_in_one_line(tmp_path, capsys):
    """speedrun.py printed its "wrote" line raw: a line break broke it, a colour code acted."""
    data_dir = make_dataset_dir(tmp_path / "data", n_train=400)
    out = tmp_path / "run\n\x1b[31mzq"
    flags = ["--quick", "--impl", "numpy", "--arch", "strong", "--seeds", "1"]
    assert speedrun.main([*flags, "--out", str(out), "--data-dir", str(data_dir)]) == 0
    said = capsys.readouterr().out
    assert "\x1b" not in said and "wrote " in said
    assert all("zq" not in line or "run\\n\\x1b[31mzq" in line for line in said.splitlines())
    assert (out / "speedrun.md").is_file()
