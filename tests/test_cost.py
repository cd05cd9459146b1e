"""What a network costs: the memory model bounds what each implementation really takes, a
step too large to hold is taken in parts with the same result, evaluation shrinks its batch,
and a network or batch beyond the bounds is refused in one line before anything is spent."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from shared.backend import IMPLEMENTATIONS, batched_logits, make_backend
from shared.batches import training_batches
from shared.config import Hyperparams
from shared.cost import (
    ELEMENTWISE_COST,
    MEMORY_BUDGET,
    OVERHEAD,
    evaluation_batch,
    evaluation_bytes,
    largest_training_batch,
    network_cost,
    training_bytes,
)
from shared.errors import UsageError
from shared.spec import get_arch, init_params
from tests.conftest import run_measured
from tests.test_training import run_script

# A training step's memory above what the process held before it: the peak (VmHWM, reset
# first) less the RSS after the backend, weights and batch were made and a first step taken.
# That first step compiles (JAX), and the compiler's working memory is not the network's
# tensors: it varied from 310 to 623 MiB for one program.
STEP_PEAK = """
import json, sys, numpy as np
from shared.backend import make_backend
from shared.batches import training_batches
from shared.spec import get_arch, init_params
impl, spec, batch, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def rss(key):
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith(key))
arch = get_arch(spec)
backend = make_backend(impl, arch)
x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
state = backend.init_state(init_params(arch))
data = backend.put_data(x, np.arange(batch) % 10)
step = next(training_batches(batch, batch, seed=0, epoch=1, fill=0.0, dropouts=arch.dropouts))
def run(state):
    if mode == "train":
        return backend.train_step(state, data, step, 0.01)[0]
    backend.predict(state, x)
    return state
state = run(state)
before = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
for _ in range(3):
    state = run(state)
print(json.dumps(rss("VmHWM") - before))
"""
MEASURED = [
    ("conv32-bn-relu-conv32-bn-relu-maxpool2-dropout0.25-flatten-fc128-relu-fc10", 96),
    ("conv64-relu-conv64-relu-flatten-fc10", 64),
    ("flatten-fc2048-bn-relu-dropout0.3-fc2048-relu-fc10", 128),
]


@pytest.mark.parametrize("spec, batch", MEASURED, ids=lambda v: str(v)[:24])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["train", "evaluate"])
def test_the_memory_model_bounds_what_each_implementation_takes(tmp_path, impl, spec, batch, mode):
    done, _ = run_measured(["-c", STEP_PEAK, impl, spec, str(batch), mode], tmp_path / "peak")
    assert done.returncode == 0, done.stderr
    taken = json.loads(done.stdout.splitlines()[-1])
    cost = network_cost(get_arch(spec).layers)
    model = training_bytes if mode == "train" else evaluation_bytes
    assert taken <= model(cost, np.float32, batch) + OVERHEAD, f"{taken / 2**20:.0f} MiB"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_step_in_parts_stays_within_what_a_whole_step_may_take(tmp_path, impl):
    """120 images of conv1275-relu-flatten-fc10, which holds 37 at once: taken in parts, the
    step needs no more than the largest whole step the bound admits."""
    spec, batch = "conv1275-relu-flatten-fc10", 120
    done, _ = run_measured(["-c", STEP_PEAK, impl, spec, str(batch), "train"], tmp_path / "peak")
    assert done.returncode == 0, done.stderr
    taken = json.loads(done.stdout.splitlines()[-1])
    cost = network_cost(get_arch(spec).layers)
    fits = largest_training_batch(cost, np.float32)
    assert fits < batch and taken <= training_bytes(cost, np.float32, fits) + OVERHEAD


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_step_too_large_to_hold_is_taken_in_parts_with_the_same_result(impl):
    arch = get_arch("conv4-relu-maxpool2-flatten-dropout0.3-fc16-tanh-fc10")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((22, 1, 28, 28)), rng.integers(0, 10, 22)
    params = init_params(arch, "he", 0, np.float64)
    hyper = Hyperparams(momentum=0.9, nesterov=True, weight_decay=1e-3, label_smoothing=0.1)
    results = []
    for step_images in (None, 5):  # the whole batch at once, then parts of 5, 5, 5, 5, 2
        backend = make_backend(impl, arch, np.float64, hyper)
        if step_images is not None:
            backend.step_images = step_images
        state = backend.init_state(params)
        data = backend.put_data(x, y)
        batches = training_batches(22, 22, seed=0, epoch=1, fill=0.0, flip=True, shift=2,
                                   dropouts=arch.dropouts)  # fmt: skip
        for batch in batches:
            state, loss, correct = backend.train_step(state, data, batch, 0.05)
        results.append((loss, correct, backend.params(state), backend.optimizer_tensors(state)))
    (loss, correct, tensors, state), (p_loss, p_correct, p_tensors, p_state) = results
    assert correct == p_correct and np.isclose(loss, p_loss, rtol=1e-12)
    for name in tensors:
        np.testing.assert_allclose(p_tensors[name], tensors[name], rtol=1e-10, atol=1e-14)
    for name in state["momentum"]:
        momenta = p_state["momentum"][name], state["momentum"][name]
        np.testing.assert_allclose(*momenta, rtol=1e-10, atol=1e-14)


def test_evaluation_shrinks_its_batch_to_fit_and_gives_the_same_logits():
    wide = get_arch("conv1275-relu-flatten-fc10")
    cost = network_cost(wide.layers)
    fits = evaluation_batch(cost, np.float32)
    assert 1 <= fits < 1000 and evaluation_bytes(cost, np.float32, fits) <= MEMORY_BUDGET
    assert evaluation_bytes(cost, np.float32, fits + 1) > MEMORY_BUDGET
    assert evaluation_batch(network_cost(get_arch("lab").layers), np.float32) == 1000
    small = get_arch("conv4-relu-flatten-fc10")
    backend = make_backend("numpy", small, np.float64)
    state = backend.init_state(init_params(small, "he", 0, np.float64))
    images = np.random.default_rng(1).standard_normal((25, 1, 28, 28))
    whole = batched_logits(backend, state, images)
    np.testing.assert_allclose(batched_logits(backend, state, images, batch_size=7), whole)


def test_the_largest_training_batch_is_the_last_that_fits():
    cost = network_cost(get_arch("strong").layers)
    for dtype in (np.float32, np.float64):
        largest = largest_training_batch(cost, dtype)
        assert training_bytes(cost, dtype, largest) <= MEMORY_BUDGET
        assert training_bytes(cost, dtype, largest + 1) > MEMORY_BUDGET


# Conv layers within every per-layer bound that together need minutes and gigabytes a step:
# refused for their work per image before anything is allocated.
DEEP = "-".join(["conv96"] + ["conv96", "relu"] * 16 + ["flatten", "fc10"])
# Its message's figures, from the layers: the image, 17 convs' and 16 ReLUs' 96 x 28 x 28
# outputs, flatten's and fc10's; 2 FLOPs a multiply-add, taken for the forward and the
# weights' gradient, and for the input's gradient but in the first layer.
PLANE = 96 * 28 * 28
DEEP_VALUES = 784 + (17 + 16 + 1) * PLANE + 10
DEEP_FLOPS = 2 * (2 * 96 * 9 * 784 + 3 * (16 * 96 * 96 * 9 * 784 + 10 * PLANE))
DEEP_WORK = DEEP_FLOPS + ELEMENTWISE_COST * DEEP_VALUES


@pytest.mark.parametrize(
    "spec, problem",
    [
        (
            DEEP,
            re.escape(
                f"{DEEP_WORK / 1e9:.1f} G operations an image ({DEEP_FLOPS / 1e9:.2f} GFLOP of"
                f" products, {DEEP_VALUES:,} values"
            ),
        ),
        ("conv1275-" + "tanh-" * 30 + "flatten-fc10", "more than the 2 G bound"),
    ],
    ids=["products", "element-wise"],
)
def test_a_network_that_cannot_fit_is_refused_in_one_line(spec, problem):
    with pytest.raises(UsageError, match=problem):
        get_arch(spec)


def test_train_refuses_a_batch_norm_batch_too_large_to_hold(tiny_data_dir, tmp_path):
    arch = "conv512k1-bn-relu-flatten-fc10"
    fits = largest_training_batch(network_cost(get_arch(arch).layers), np.float32)
    out = tmp_path / "run"
    args = ["--arch", arch, "--batch-size", str(fits + 1), "--limit", str(fits + 3)]
    done, peak = run_measured(
        ["scripts/train.py", *args, "--data-dir", str(tiny_data_dir), "--out", str(out)],
        tmp_path / "peak",
    )
    assert done.returncode == 2 and f"at most {fits} images fit" in done.stderr
    assert "BatchNorm needs the whole batch" in done.stderr and "Traceback" not in done.stderr
    assert peak < 1024 and not out.exists()


def test_a_wide_network_trains_in_parts_within_the_bound(tiny_data_dir, tmp_path):
    """The network that once took validation to 4.35 GB: it trains and evaluates in batches
    that fit, and its run needs no more than the bound above a small network's run."""
    peaks = {}
    for arch in ("lab", "conv1275-relu-flatten-fc10"):
        done, peaks[arch] = run_measured(
            ["scripts/train.py", "--impl", "numpy", "--epochs", "1", "--arch", arch,
             "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / arch)],
            tmp_path / "peak",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert peaks["conv1275-relu-flatten-fc10"] - peaks["lab"] < MEMORY_BUDGET / 2**20


def test_crosscheck_reads_its_checkpoint_before_any_work(tiny_data_dir, tmp_path):
    done = run_script(
        "crosscheck.py", "--checkpoint", str(tmp_path / "missing.npz"),
        "--data-dir", str(tiny_data_dir), "--steps", "1",
    )  # fmt: skip
    assert done.returncode == 1 and "missing.npz: no such checkpoint" in done.stderr
    assert "passed" not in done.stdout


def test_evaluate_of_a_mistyped_path_creates_nothing(tmp_path):
    out = tmp_path / "report" / "deeper"
    done = run_script("evaluate.py", str(tmp_path / "typo.npz"), "--out", str(out))
    assert done.returncode == 1 and "typo.npz: no such checkpoint" in done.stderr
    assert not (tmp_path / "report").exists()


def test_a_small_checkpoint_of_a_wide_network_evaluates_within_the_bound(tiny_data_dir, tmp_path):
    """A 40 KB file can describe conv1275-relu-flatten-fc10 (its 10M zero weights deflate to
    almost nothing): evaluate.py builds it and evaluates in batches that fit the bound, where
    batches of 1,000 once took it to 4.3 GB; a file describing a network beyond the bounds is
    refused before any tensor is read."""
    arch = get_arch("conv1275-relu-flatten-fc10")
    tensors = {k: np.zeros(v.shape, np.float32) for k, v in init_params(arch).items()}
    path = tmp_path / "wide.npz"
    np.savez_compressed(path, **tensors, meta=np.array(json.dumps({"arch": arch.name})))
    assert path.stat().st_size < 100_000
    peaks = {}
    for name, checkpoint in (("wide", path), ("lab", _lab_checkpoint(tmp_path))):
        done, peaks[name] = run_measured(
            ["scripts/evaluate.py", str(checkpoint), "--data-dir", str(tiny_data_dir),
             "--out", str(tmp_path / name)],
            tmp_path / "peak",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert peaks["wide"] - peaks["lab"] < MEMORY_BUDGET / 2**20
    beyond = "-".join(["conv1275"] + ["relu"] * 60 + ["flatten", "fc10"])
    meta = json.dumps({"arch": beyond})
    np.savez(tmp_path / "beyond.npz", meta=np.array(meta))
    done, peak = run_measured(
        ["scripts/evaluate.py", str(tmp_path / "beyond.npz"), "--data-dir", str(tiny_data_dir)],
        tmp_path / "peak",
    )
    assert done.returncode == 1 and "more than the 2 G bound" in done.stderr
    assert "Traceback" not in done.stderr and peak < 1024


def _lab_checkpoint(folder):
    from shared.checkpoint import save_checkpoint

    path = folder / "lab.npz"
    save_checkpoint(path, init_params(get_arch("lab")), {"arch": "lab"})
    return path
