"""The benchmark's profile (a step by phase and by layer) and the lab's loop
implementation it is measured against."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from impl_numpy import layers, model
from shared.backend import IMPLEMENTATIONS, make_backend
from shared.batches import steady_batches
from shared.config import TrainConfig
from shared.data import load_dataset
from shared.ladder import conv_backward_loops, conv_forward_loops, lab_step
from shared.layers import pass_steps, step_name
from shared.loop import compile_steps
from shared.parallel import THREADS_VARIABLE, joined
from shared.profile import (
    PHASES,
    cpu_name,
    layer_timers,
    operation_markdown,
    pass_forward,
    step_by_operation,
)
from shared.proof.report import plot_results, worst_by_row
from shared.proof.rows import CheckResult
from shared.spec import get_arch, init_params
from tests.conftest import ROOT
from tests.test_training import run_script


def test_profile_times_every_phase_and_every_layer_of_every_implementation(tmp_path):
    result = run_script(
        "benchmark.py", "--profile", "--steps", "3", "--batch-sizes", "16", "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "profile.json").read_text())
    rows = saved["rows"]
    assert [r["impl"] for r in rows] == list(IMPLEMENTATIONS)
    for r in rows:
        assert set(r["phases"]) == set(PHASES) and r["step"] > 0
        assert r["phases"]["forward"] > 0 and r["phases"]["optimizer update"] > 0
    names = [layer.name for layer in get_arch("lab").layers]
    expected = {f"{n} forward" for n in names} | {f"{n} backward" for n in names}
    for r in rows:
        assert set(r["layers"]) == expected, r["impl"]
        assert all(r["layers"][f"{n} forward"] > 0 for n in names), r["impl"]
        # The layers, each timed on its own, account for most of the pass.
        pass_seconds = r["phases"]["forward"] + r["phases"]["backward"]
        assert 0.2 * pass_seconds < sum(r["layers"].values()) < 5 * pass_seconds, r["impl"]
    # JAX's compiled step, traced: its operations, each under the layer that made it.
    assert [r["impl"] for r in rows if "ops" in r] == ["jax"]
    assert (tmp_path / "profile.png").stat().st_size > 0
    text = (tmp_path / "profile.md").read_text()
    assert "| numpy | 16 |" in text and "| conv | " in text
    assert "jax's compiled step at batch 16" in text and "| (outside the layers) |" in text
    # Timings compare only on one processor: the tables and the JSON name it.
    cpu = cpu_name()
    assert saved["cpu"] == cpu and f"on {cpu}," in text


def test_the_loop_convolution_computes_the_vectorised_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 6, 5))
    w, b = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    out, cache = layers.conv2d_forward(x, w, b, 1, 1)
    to_lab = (1, 2, 3, 0)  # (N, C, H, W) -> the lab's (C, H, W, N)
    looped = conv_forward_loops(x.transpose(to_lab), w, b)
    np.testing.assert_allclose(looped, out.transpose(to_lab), rtol=1e-12)
    dout = rng.standard_normal(out.shape)
    _, dw, db = layers.conv2d_backward(dout, cache, need_dx=False)
    dw_loops, db_loops = conv_backward_loops(dout.transpose(to_lab), x.transpose(to_lab), w)
    np.testing.assert_allclose(dw_loops, dw, rtol=1e-12)
    np.testing.assert_allclose(db_loops, db, rtol=1e-12)


def test_the_lab_step_is_a_plain_sgd_step_of_the_lab_network():
    arch = get_arch("lab")
    params = init_params(arch, "he", 0, np.dtype(np.float64))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    loss, grads = model.loss_and_grads(params, x, y, arch, masks={})
    stepped = {k: v.copy() for k, v in params.items()}
    assert lab_step(stepped, x, y, 0.1) == pytest.approx(float(loss), rel=1e-12)
    for name, g in grads.items():
        np.testing.assert_allclose(stepped[name], params[name] - 0.1 * g, rtol=1e-10, atol=1e-14)


def test_the_crosscheck_picture_draws_the_worst_row_of_each_tensor(tmp_path):
    def row(dtype, setting, rel, pair="numpy-jax", check="loss", tol=1e-9):
        return CheckResult(dtype, "lab", setting, check, pair, 0.0, rel, tol)

    rows = [
        row("float64", "defaults", 1e-15),
        row("float64", "drawn", 3e-14),
        row("float32", "defaults", float("inf"), tol=1e-4),  # a shape mismatch's row
        row("float64", "defaults", 1e-8, pair="numpy-fd", check="finite-diff input", tol=1e-6),
    ]
    assert worst_by_row(rows, "lab") == {
        ("loss", "numpy-jax", "float64"): (3e-14, 1e-9),
        ("loss", "numpy-jax", "float32"): (float("inf"), 1e-4),
    }
    plot_results(rows, tmp_path / "crosscheck.png")
    assert (tmp_path / "crosscheck.png").stat().st_size > 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compiling_the_step_leaves_the_run_state_as_it_was(impl, tiny_data_dir):
    data = load_dataset(tiny_data_dir)
    config = TrainConfig(impl=impl, batch_size=16)  # 100 images: a full and a ragged batch
    backend = make_backend(impl, get_arch("lab"))
    state = backend.init_state(init_params(get_arch("lab")))
    before = backend.params(state)
    train_data = backend.put_data(data.train.x, data.train.y)
    seconds = compile_steps(backend, state, train_data, len(data.train), config, 0.0)
    assert (seconds > 0) == backend.compiles == (impl == "jax")
    for name, tensor in backend.params(state).items():  # JAX donates: a copy was stepped
        np.testing.assert_array_equal(tensor, before[name])


# strong's JAX step at batch 128 needs a 101 MB buffer, allocated by XLA's threads: page faults
# a step, counted in a process of its own.
STEP_FAULTS = """
import itertools, resource
import numpy as np
from shared.backend import make_backend
from shared.batches import steady_batches
from shared.spec import get_arch, init_params

arch = get_arch("strong")
backend = make_backend("jax", arch)
state = backend.init_state(init_params(arch))
rng = np.random.default_rng(0)
data = backend.put_data(rng.random((256, 1, 28, 28), np.float32), rng.integers(0, 10, 256))
batches = steady_batches(256, 128, 0.0, arch.dropouts, flip=False)
state, _, _ = backend.train_step(state, data, next(batches), 0.01)  # compiles
for batch in itertools.islice(batches, 9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, _, _ = backend.train_step(state, data, batch, 0.01)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a setting of glibc's malloc")
def test_a_jax_step_reuses_the_memory_its_threads_freed():
    """Each framework thread's own malloc arena maps anything over 64 MiB afresh, so without
    one arena for all threads every step faulted its buffer back in (26,000 faults, 4 KiB
    each). Kept, the heap grows to hold it in the first steps, then a step faults in almost
    nothing."""
    done = subprocess.run(
        [sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    faults = [int(n) for n in done.stdout.split()]
    assert statistics.median(faults) < 1000, faults


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_layer_s_timed_backward_runs_its_forward_too(impl, tiny_data_dir, monkeypatch):
    # A layer's backward is timed as forward and backward together less the forward alone.
    # XLA drops work whose result nothing returns, and a convolution's pullback keeps only its
    # inputs: timed without the output, JAX's forward went unrun and the backward read short.
    arch = get_arch("conv4b0-bn-relu-maxpool2-flatten-fc10")
    data = load_dataset(tiny_data_dir)
    backend = make_backend(impl, arch)
    params, _ = backend.init_state(init_params(arch))
    batch = next(steady_batches(len(data.train), 8, data.background, arch.dropouts, False))
    arrays = backend.moved(backend.step_arrays(batch))
    train_data = backend.put_data(data.train.x, data.train.y)
    x, _ = backend.gather(train_data, arrays, batch.pad, batch.fill)
    monkeypatch.setenv(THREADS_VARIABLE, "1")  # NumPy's pass on one thread: one part
    for timer in layer_timers(backend, params, x, arrays.masks):
        # One part a range of rows the pass runs apart.
        [result] = timer.forward_and_backward(timer.params, timer.x, timer.dout)
        assert isinstance(result, tuple) and len(result) == 2, timer.name
        out, grads = result
        [expected] = timer.forward(timer.params, timer.x)
        # .item() in every framework (float() of a PyTorch tensor that needs grad warns)
        difference, size = abs(out - expected).max().item(), abs(expected).max().item()
        assert difference <= 1e-6 * (1 + size) and "input" in grads, timer.name


def test_the_profile_times_a_relu_and_the_max_pool_over_it_as_one_row():
    # NumPy's and JAX's passes run a ReLU after the max-pool over its output, on the pooled
    # values: timed apart, the ReLU's row would time a pass over the whole map they skip.
    rows = pass_steps(get_arch("strong").layers)
    names = ["+".join(layer.name for layer in row) for row in rows]
    assert names == [
        "conv1", "bn1", "relu1+pool1", "conv2", "bn2", "relu2+pool2",
        "flatten", "fc1", "relu3", "dropout", "fc2",
    ]  # fmt: skip
    assert [layer for row in rows for layer in row] == list(get_arch("strong").layers)


def test_the_profile_times_numpy_on_the_threads_its_pass_splits_the_batch_over(monkeypatch):
    # The training pass splits a batch's rows over threads, BatchNorm's sums totalled across
    # them; a profile that timed NumPy's forward and layers on one thread timed other work.
    arch = get_arch("conv4-bn-relu-maxpool2-dropout0.5-flatten-fc10")
    backend = make_backend("numpy", arch, np.float64)
    params, _ = backend.init_state(init_params(arch))
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 28, 28))
    x[4:] += 10.0  # halves whose batch statistics differ
    masks = {"dropout": rng.random((8, 4, 14, 14)) > 0.5}

    def timed(threads: int) -> tuple[list, list]:
        monkeypatch.setenv(THREADS_VARIABLE, str(threads))
        layers = []
        for t in layer_timers(backend, params, x, masks):
            dout = np.random.default_rng(1).standard_normal(t.dout.shape)
            layers.append((t.forward(t.params, t.x), t.forward_and_backward(t.params, t.x, dout)))
        return pass_forward(backend, arch.layers)(params, x, masks), layers

    def close(actual, expected):
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)

    whole_forward, whole_layers = timed(1)
    forward, layers_on_threads = timed(2)
    assert len(whole_forward) == 1 and len(forward) == 2
    close(joined(forward), whole_forward[0])
    for (out, [(_, grads)]), (parts, pass_parts) in zip(
        whole_layers, layers_on_threads, strict=True
    ):
        assert len(parts) == len(pass_parts) == 2
        close(joined(parts), out[0])
        close(joined([g["input"] for _, g in pass_parts]), grads["input"])
        for name in grads.keys() - {"input"}:  # each thread's share of the batch's
            close(pass_parts[0][1][name] + pass_parts[1][1][name], grads[name])


PASSES = {"forward", "backward"}


def test_a_traced_jax_step_gives_each_operation_its_layer_and_pass(tiny_data_dir):
    """The compiled step's operations, from a trace, each under the step of the pass whose
    name scope its source holds (a block's layers under the block), forward or backward;
    the data's gather, the loss and the optimizer under none. Every layer that computes
    shows in its pass."""
    arch = get_arch("conv4-relu-maxpool2-res(conv4-bn-relu)-flatten-fc10")
    backend = make_backend("jax", arch)
    state = backend.init_state(init_params(arch))
    data = load_dataset(tiny_data_dir)
    on_device = backend.put_data(data.train.x, data.train.y)
    batches = list(itertools.islice(steady_batches(len(data.train), 8, 0.0, (), False), 3))
    state, events, program = backend.traced_steps(state, on_device, batches, 0.01)
    ops = step_by_operation(events, program, len(batches))
    assert ops and all(o["ms"] > 0 for o in ops)
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    names = [step_name(step) for step in pass_steps(arch.layers)]
    assert names == ["conv", "relu+pool", "block", "flatten", "fc"]
    assert {o["layer"] for o in ops} <= {*names, ""}
    timed = {(o["layer"], o["pass"]) for o in ops}
    for name in ("conv", "relu+pool", "block", "fc"):
        assert {(name, "forward"), (name, "backward")} <= timed, name
    assert ("", "") in timed  # the optimizer's update
    # The products where they belong: the block's convolution forward and its input
    # gradient backward; fc's product forward and its gradients backward.
    convolutions = [o for o in ops if "convolution" in o["computes"]]
    assert {(o["layer"], o["pass"]) for o in convolutions} == {("block", p) for p in PASSES}
    assert {o["pass"] for o in ops if o["layer"] == "fc" and "dot" in o["computes"]} == PASSES
    # The state after the traced steps trains on.
    assert np.isfinite(backend.train_step(state, on_device, batches[0], 0.01)[1])


def test_a_program_s_operations_are_timed_each_under_its_layer_and_pass():
    """From a program and a trace written out by hand: a fusion counts under its root's
    layer, the layers of the instructions fused into it named beside, and computes what is
    inside it; an instruction in a loop's body counts, and the loop that runs it does not
    (its time holds the body's); events of another program do not count. XLA's own
    convolution, outside YNNPACK's fusions, hands its work to other threads: the trace times
    its launch. It is flagged, and listed below the slowest operations."""
    program = """HloModule jit__train_step, entry_computation_layout={()->f32[2]}

%fused_computation (param_0: f32[2]) -> f32[2] {
  %param_0 = f32[2]{0} parameter(0)
  %negate.1 = f32[2]{0} negate(%param_0), metadata={op_name="jit(_train_step)/jvp(fc)/neg"}
  ROOT %convolution.2 = f32[2]{0} convolution(%negate.1, %param_0), metadata={op_name="jit(_train_step)/jvp(conv)/conv_general_dilated"}
}

%body (p: (s64[], f32[2])) -> (s64[], f32[2]) {
  %p = (s64[], f32[2]{0}) parameter(0)
  ROOT %sum-fusion.1 = (s64[], f32[2]{0}) fusion(%p), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(_train_step)/transpose(jvp(fc))/while/body/add"}
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %ynn_fusion = f32[2]{0} fusion(%x), kind=kCustom, calls=%fused_computation, metadata={op_name="jit(_train_step)/jvp(conv)/conv_general_dilated;jit(_train_step)"}
  %while.3 = (s64[], f32[2]{0}) while(%x), condition=%body, body=%body
  ROOT %convolution.1 = f32[2]{0} convolution(%ynn_fusion, %x), metadata={op_name="jit(_train_step)/transpose(jvp(conv))/conv_general_dilated"}
}
"""  # noqa: E501
    module = {"hlo_module": "jit__train_step"}
    events = [
        {"ph": "X", "name": "ynn_fusion", "dur": 3000.0, "args": module},
        {"ph": "X", "name": "while.3", "dur": 5000.0, "args": module},
        {"ph": "X", "name": "sum-fusion.1", "dur": 1000.0, "args": module},
        {"ph": "X", "name": "sum-fusion.1", "dur": 1000.0, "args": module},
        {"ph": "X", "name": "convolution.1", "dur": 20.0, "args": module},
        {"ph": "X", "name": "ynn_fusion", "dur": 9000.0, "args": {"hlo_module": "other"}},
    ]
    ops = step_by_operation(events, program, steps=2)
    rows = [
        (o["op"], o["ms"], o["layer"], o["pass"], o["also"], o["computes"], o["launch_only"])
        for o in ops
    ]
    assert rows == [
        ("ynn_fusion", 1.5, "conv", "forward", ["fc"], "convolution", False),
        ("sum-fusion.1", 1.0, "fc", "backward", ["conv"], "convolution", False),
        ("convolution.1", 0.01, "conv", "backward", [], "convolution", True),
    ]
    layers = {f"{name} {p}": 1.0 for name in ("conv", "fc") for p in ("forward", "backward")}
    text = operation_markdown({"ops": ops, "layers": layers}, top=1)
    assert (
        "| ynn_fusion | 1.500 | 59.8% | conv (with fc fused in) | forward | convolution |" in text
    )
    assert "| convolution.1 (XLA's own: its launch alone) | 0.010 |" in text
    assert "| conv | 1.500 | 0.010 | 1.510 | 60.2% |" in text
    assert "| fc | 0.000 | 1.000 | 1.000 | 39.8% |" in text
    with pytest.raises(ValueError, match="no operation of the program jit__train_step"):
        step_by_operation(events[-1:], program, steps=2)
