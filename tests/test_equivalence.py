"""The three implementations compute the same thing: whole networks (the presets and seeded
random specs) in evaluation and training mode, optimizer steps, the cross-check's every row
in lockstep on real data, and across checkpoints. And the comparison itself has teeth.

Single layers against PyTorch's own ops are tests/test_layers.py; planted wrong variants of
the newer layers are tests/test_planted.py.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import threefold
from impl_numpy import optim as numpy_optim
from shared.backend import IMPLEMENTATIONS, make_backend
from shared.batches import dropout_masks
from shared.checkpoint import load_checkpoint
from shared.config import PAIRS as PAIR_NAMES
from shared.config import Hyperparams, TrainConfig
from shared.crosscheck import run_crosscheck
from shared.data import load_dataset
from shared.errors import UsageError
from shared.kinds import KINDS, kind_of
from shared.layers import Activation, BatchNorm, Conv, Dropout, Pool
from shared.loop import train
from shared.proof.kinks import cancelled_biases, keeps_zeros_exact
from shared.proof.passes import checkpoint_agreement
from shared.proof.report import format_table
from shared.proof.rows import CheckResult, Compared, Measured, compare, judge
from shared.proof.settings import ALL_ON
from shared.spec import PRESETS, Arch, get_arch, init_params, param_shapes, state_shapes
from tests.conftest import pairs_with, to_native
from tests.test_planted import SPEC as PLANTED_SPEC

IMPL_PAIRS = list(itertools.combinations(IMPLEMENTATIONS, 2))
F64_TOL = 1e-10
# A small network with every stateful layer: BatchNorm 2d and 1d (buffers) and dropout (masks);
# test_planted's, whose baseline checks its float64 rows on generated images.
BN_DROPOUT = PLANTED_SPEC
# Dropout on 4-d maps (N, C, H, W), each unit masked on its own.
SPATIAL_DROPOUT = "conv4-relu-dropout0.3-maxpool2-flatten-fc10"
EVERY_ACTIVATION = [name for name, kind in KINDS.items() if kind.layer is Activation]


def assert_same(a: np.ndarray, b: np.ndarray, what: str, tol: float = F64_TOL, scale=0.0):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    max_abs, max_rel = compare(a, b, scale)
    assert max_rel <= tol, f"{what}: max abs {max_abs:.3g}, max rel {max_rel:.3g} > {tol}"


# --- seeded random networks --------------------------------------------------------------


def random_spec(seed: int, every_kind: bool = False) -> Arch:
    """A random valid network: one or two blocks of conv (random channels, kernel, stride,
    padding), maybe BatchNorm, an activation, maybe a pooling (max or avg, any stride) and
    dropout; then flatten, maybe BatchNorm, maybe a hidden fc with its BatchNorm, activation
    and dropout; fc10. Drawn again until get_arch accepts it (pools must tile their input).

    `every_kind` draws from the whole grammar: every activation, padded pools, whole-channel
    dropout, residual blocks after the first block, adaptive pooling before flatten (the
    same seed without it draws the same network as before it existed)."""
    rng = np.random.default_rng([seed, 2024])
    activations = EVERY_ACTIVATION if every_kind else ["relu", "tanh", "sigmoid"]

    def maybe(probability: float, token: str) -> list[str]:
        return [token] if rng.random() < probability else []

    def activation() -> str:
        return str(rng.choice(activations))

    def dropout(kind: str = "dropout") -> str:
        return f"{kind}{rng.uniform(0.1, 0.5):.2f}"

    def residual() -> str:
        c, stride = rng.integers(2, 7), rng.choice(["", "s2"])
        body = [f"conv{c}{stride}b0", *maybe(0.5, "bn"), activation(), f"conv{c}b0"]
        return f"res({'-'.join(body + maybe(0.5, 'bn'))})"

    for _ in range(200):
        tokens = []
        for block in range(int(rng.integers(1, 3))):
            if every_kind and block > 0 and rng.random() < 0.5:
                tokens += [residual(), activation()]
                continue
            k = int(rng.choice([1, 3, 5]))
            tokens.append(f"conv{rng.integers(2, 7)}k{k}s{rng.integers(1, 4)}p{rng.integers(0, k)}")
            tokens += maybe(0.5, "bn")
            tokens.append(activation())
            if rng.random() < 0.6:
                size, op = int(rng.integers(2, 4)), rng.choice(["max", "avg"])
                tokens.append(f"{op}pool{size}s{rng.integers(1, size + 1)}")
                if every_kind:
                    tokens[-1] += f"p{rng.integers(0, size // 2 + 1)}"
            if rng.random() < 0.3:
                tokens.append(
                    dropout(rng.choice(["dropout", "dropout2d"]) if every_kind else "dropout")
                )
        if every_kind:
            tokens += maybe(0.3, "adaptiveavgpool1")
        tokens += ["flatten", *maybe(0.4, "bn")]
        if rng.random() < 0.8:
            tokens += [f"fc{rng.integers(8, 33)}", *maybe(0.5, "bn"), activation()]
            if rng.random() < 0.5:
                tokens.append(dropout())
        tokens.append("fc10")
        try:
            return get_arch("-".join(tokens))
        except UsageError:
            continue
    raise AssertionError(f"no valid spec in 200 draws from seed {seed}")


GENERATED = [random_spec(seed).spec for seed in range(6)]
# Drawn from the whole grammar, for the float64 passes alone: what fuses across layers in a
# compiler (JAX's sigmoid before a max-pool, docs/CROSSCHECK.md) no one layer's test reaches.
EVERY_KIND = [random_spec(seed, every_kind=True).spec for seed in range(12)]
# Residual blocks: an identity shortcut, a strided projection with BatchNorm, one without.
RESIDUAL = (
    "conv4-bn-relu-res(conv4b0-bn-relu-conv4b0-bn)-relu-res(conv6s2b0-bn-relu-conv6b0-bn)-relu"
    "-res(conv6-relu-conv8)-relu-adaptiveavgpool1-flatten-fc10"
)
# Paths chosen by size, which no preset nor drawn network took: a kernel over 7x7 with a bias
# (JAX's own path for it lost the bias, unseen), a max-pool whose windows leave an odd
# input's last row (7 -> 3: NumPy's gradient there was left unwritten, unseen).
SIZES = "conv4k9p4-relu-maxpool2-conv8-relu-maxpool2-maxpool2-flatten-fc10"
NETWORKS = [*PRESETS, *GENERATED, RESIDUAL, SIZES, *EVERY_KIND]
NETWORK_IDS = [
    *PRESETS,
    *(f"random{i}" for i in range(len(GENERATED))),
    "residual",
    "sizes",
    *(f"every-kind{i}" for i in range(len(EVERY_KIND))),
]


def features(arch: Arch) -> set[str]:
    """What of the grammar a network exercises."""
    found = set()
    for layer in arch.layers:
        match layer:
            case Conv(kernel_size=k, stride=s, padding=p):
                found |= {"conv", f"conv k{k}"}
                found |= {"conv stride"} if s > 1 else set()
                found |= {"conv padding"} if p != k // 2 else set()
            case Pool(op=op, size=size, stride=stride):
                found |= {f"{op}pool"} | ({"pool stride"} if stride != size else set())
            case BatchNorm(spatial=spatial):
                found.add("bn 2d" if spatial else "bn 1d")
            case Dropout(shape=shape):
                found.add("dropout 2d" if len(shape) == 3 else "dropout 1d")
            case Activation(fn=fn):
                found.add(fn)
    return found


def test_the_generated_networks_cover_the_grammar():
    covered = set().union(*(features(get_arch(spec)) for spec in GENERATED))
    assert covered >= {
        "conv",
        "conv k1",
        "conv k5",
        "conv stride",
        "conv padding",
        "maxpool",
        "avgpool",
        "pool stride",
        "bn 2d",
        "bn 1d",
        "dropout 2d",
        "dropout 1d",
        "relu",
        "tanh",
        "sigmoid",
    }
    assert any(sum(isinstance(layer, Conv) for layer in get_arch(s).layers) > 1 for s in GENERATED)
    # Seeded: another process, with another hash seed, draws the same networks (xdist's
    # workers collect them apart, and a run's rows are named by them).
    code = "from tests.test_equivalence import GENERATED; print(GENERATED)"
    drawn = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONHASHSEED": "7"},
    )  # fmt: skip
    assert drawn.stdout.strip() == str(GENERATED)


def test_the_networks_drawn_from_every_kind_hold_every_kind():
    """Every kind of layer, a padded pool and a block that changes the shape among them."""
    archs = [get_arch(spec) for spec in EVERY_KIND]
    assert {kind_of(node.layer).name for arch in archs for node in arch.nodes} == set(KINDS)
    layers = [node.layer for arch in archs for node in arch.nodes]
    assert any(isinstance(layer, Pool) and layer.padding > 0 for layer in layers)
    assert any(layer.name.endswith("downsample.0") for layer in layers)


# --- whole networks ----------------------------------------------------------------------


def with_running_stats(params: dict, rng: np.random.Generator) -> dict:
    """The tensors with BatchNorm's running statistics away from their initial 0 and 1, so
    that evaluation mode has something to use."""
    out = dict(params)
    for name, value in params.items():
        if name.endswith(".running_mean"):
            out[name] = rng.standard_normal(value.shape) * 0.3
        elif name.endswith(".running_var"):
            out[name] = rng.uniform(0.5, 2.0, value.shape)
        elif name.endswith(".num_batches_tracked"):
            out[name] = np.array(5, np.int64)
    return out


@pytest.mark.parametrize("spec", NETWORKS, ids=NETWORK_IDS)
def test_model_passes_agree(spec):
    """Every layer's output in evaluation and in training mode, the loss, every gradient and
    the input gradient, in float64. (BatchNorm's updated buffers and the optimizer step are
    the cross-check's lockstep rows, tested below.)"""
    arch = get_arch(spec)
    rng = np.random.default_rng(7)
    n = 5
    x, y = rng.standard_normal((n, 1, 28, 28)), rng.integers(0, 10, n)
    params = with_running_stats(init_params(arch, "torch", seed=3, dtype=np.float64), rng)
    masks = dropout_masks(arch.dropouts, n, seed=1, epoch=0, step=0)
    out = {}
    for impl in IMPLEMENTATIONS:
        backend = make_backend(impl, arch, np.float64, Hyperparams(label_smoothing=0.1))
        out[impl] = {
            "eval": backend.activations(params, x),
            "train": backend.activations(params, x, masks),
            "loss and grads": backend.loss_and_grads(params, x, y, masks),
            "input grad": backend.input_grad(params, x, y, masks),
        }
    trainable = param_shapes(arch)
    for a, b in IMPL_PAIRS:
        ra, rb = out[a], out[b]
        for mode in ("eval", "train"):
            assert set(ra[mode]) == {node.layer.name for node in arch.nodes}
            for layer in (node.layer for node in arch.nodes):
                what = f"{layer.name} ({mode}) {a}-{b}"
                assert_same(ra[mode][layer.name], rb[mode][layer.name], what)
        (loss_a, grads_a), (loss_b, grads_b) = ra["loss and grads"], rb["loss and grads"]
        assert loss_a.shape == () and loss_a.dtype == np.float64
        assert_same(loss_a, loss_b, f"loss {a}-{b}")
        # JAX returns dicts with their keys sorted: compare by name, not order.
        assert set(grads_a) == set(grads_b) == set(trainable)
        # A bias that BatchNorm follows has a zero gradient up to round-off: measure every
        # gradient against the largest of the pass, as the cross-check does.
        scale = max(float(np.abs(g).max()) for g in grads_a.values())
        for name in trainable:
            assert_same(grads_a[name], grads_b[name], f"grad {name} {a}-{b}", scale=scale)
        assert_same(ra["input grad"], rb["input grad"], f"grad input {a}-{b}")
    # Evaluation and training mode differ wherever the network has BatchNorm or dropout:
    # the comparisons above covered two computations, not one twice.
    for layer in (node.layer for node in arch.nodes):
        if isinstance(layer, BatchNorm | Dropout):
            evals, trains = out["numpy"]["eval"][layer.name], out["numpy"]["train"][layer.name]
            assert not np.allclose(evals, trains), layer.name


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_agrees(seed, smoothing):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 18))
    logits, labels = rng.standard_normal((n, 10)) * 4, rng.integers(0, 10, n)
    results = {}
    for impl in IMPLEMENTATIONS:
        mod = importlib.import_module(f"impl_{impl}.layers")
        loss, dlogits = mod.softmax_cross_entropy(
            to_native(impl, logits), to_native(impl, labels), smoothing
        )
        results[impl] = (np.asarray(loss), np.asarray(dlogits))
    for a, b in IMPL_PAIRS:
        assert_same(results[a][0], results[b][0], f"loss {a}-{b}")
        assert_same(results[a][1], results[b][1], f"dlogits {a}-{b}")


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0, 3])
def test_augmentation_agrees(flip, shift):
    from shared.batches import augmentation_maps
    from shared.data import FASHION_MNIST

    rng = np.random.default_rng(shift)
    x = rng.standard_normal((11, 2, 28, 28))
    rows, cols = augmentation_maps(rng, 11, 28, 28, flip, shift)
    out = {}
    for impl in IMPLEMENTATIONS:
        mod = importlib.import_module(f"impl_{impl}.augment")
        native = [to_native(impl, a) for a in (x, rows, cols)]
        out[impl] = np.asarray(mod.augment(*native, shift, FASHION_MNIST.background()))
    for a, b in IMPL_PAIRS:
        assert_same(out[a], out[b], f"augment {a}-{b}", tol=0.0)


def test_erasing_agrees():
    from shared.batches import erasing_boxes

    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 2, 28, 28))
    boxes = erasing_boxes(rng, 64, 28, 28, 0.7)
    out = {}
    for impl in IMPLEMENTATIONS:
        mod = importlib.import_module(f"impl_{impl}.augment")
        out[impl] = np.asarray(mod.erase(to_native(impl, x), to_native(impl, boxes)))
    for a, b in IMPL_PAIRS:
        assert_same(out[a], out[b], f"erase {a}-{b}", tol=0.0)
    # Each image's box, and nothing else, is zero in every channel.
    for image, erased, (top, left, h, w) in zip(x, out["numpy"], boxes, strict=True):
        expected = image.copy()
        expected[:, top : top + h, left : left + w] = 0
        np.testing.assert_array_equal(erased, expected)


# --- the cross-check's rows --------------------------------------------------------------


def setting_kind(setting: str) -> str:
    """The kind of a cross-check setting from its name (drawn ones name their values)."""
    for kind in (*SETTING_KINDS, "shared code"):
        if setting.startswith(kind):
            return kind
    raise AssertionError(f"unknown setting {setting!r}")


# The settings' kinds, a name before any it starts (drawn AdamW before drawn Adam), each with
# the optimizer buffers its lockstep compares (None: it takes no steps).
SETTING_KINDS = {
    "defaults": ("momentum",),
    "fast recipe": ("momentum",),
    "drawn AdamW": ("exp_avg", "exp_avg_sq", "step"),
    "drawn Adam": ("exp_avg", "exp_avg_sq", "step"),
    "drawn": ("momentum",),
    "large logits": None,
    "planted ties": None,
}


def expected_rows(arch: Arch, kind: str, dtype: str, steps: int, momentum: float) -> Counter:
    """The (check, pair) rows the cross-check makes for `arch` under one setting: the single
    pass (every layer in both modes, the prediction path's logits, loss, gradients, input
    gradient, dropout masks against the shared ones), and the lockstep where the setting
    trains (the images each step trains on, every canonical tensor, and the momentum buffers
    of the trainable ones when there is momentum), and, for float64 under the defaults, the
    finite differences."""
    rows: Counter = Counter()
    last = arch.layers[-1]
    checks = [
        f"{'logits' if layer is last else f'activation {layer.name}'} ({mode})"
        for mode in ("eval", "train")
        for layer in (node.layer for node in arch.nodes)
    ]
    checks += ["logits (predict)", "loss", *(f"grad {name}" for name in param_shapes(arch))]
    checks += ["grad input"]
    buffers = SETTING_KINDS[kind]
    # In float32 Adam moves a bias whose exact gradient is 0 by round-off / eps: not compared.
    unsteered = cancelled_biases(arch) if dtype == "float32" and "Adam" in kind else set()
    if buffers is not None:
        states = [n for n in state_shapes(arch) if n not in unsteered]
        checks += [f"lockstep loss x{steps}", "lockstep images"]
        checks += [f"lockstep {n}" for n in states]
        if momentum or buffers != ("momentum",):
            checks += [f"lockstep {b} {name}" for b in buffers for name in param_shapes(arch)]
    rows.update((check, pair) for check in checks for pair in PAIR_NAMES)
    rows.update(
        (f"dropout mask {layer.name}", f"{impl}-shared")
        for layer in arch.dropouts
        for impl in IMPLEMENTATIONS
    )
    if kind == "defaults" and dtype == "float64":
        rows.update((f"finite-diff {n}", "numpy-fd") for n in [*param_shapes(arch), "input"])
    return rows


def assert_rows_as_expected(results: list[CheckResult], archs: list[Arch], steps: int, config):
    """Each setting of each network and dtype has exactly its expected rows, once each."""
    groups: dict[tuple, Counter] = {}
    for r in results:
        if r.arch == "-":
            continue
        kind = setting_kind(r.setting)
        groups.setdefault((r.dtype, r.arch, kind), Counter())[(r.check, r.pair)] += 1
    for (dtype, name, kind), rows in groups.items():
        arch = next(a for a in archs if a.name == name)
        # Drawn hyperparameters always draw a momentum (in [0.5, 0.99)).
        momentum = 1.0 if kind.startswith("drawn") else config.momentum
        assert rows == expected_rows(arch, kind, dtype, steps, momentum), (dtype, name, kind)
    for arch in archs:
        kinds = {kind for dtype, name, kind in groups if name == arch.name}
        wanted = {"defaults", "fast recipe", "drawn", "drawn Adam", "drawn AdamW", "large logits"}
        wanted |= {"planted ties"} if keeps_zeros_exact(arch) else set()
        assert kinds == wanted, arch.name
    assert any(r.arch == "-" and r.setting == "shared code vs libraries" for r in results)


# Nesterov without momentum is plain SGD (PyTorch refuses the combination; ours accept it).
# The optimizer does not depend on the network: the cheapest one (fastest to compile) serves.
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, False), (0.9, True), (0.0, True)])
@pytest.mark.parametrize(("dtype", "steps"), [("float64", 8), ("float32", 3)])
def test_optimizer_steps_agree(dtype, steps, momentum, nesterov):
    config = replace(ALL_ON, momentum=momentum, nesterov=nesterov)
    archs = [get_arch("noconv")]
    results = run_crosscheck(archs, [dtype], None, steps=steps, batch_size=5, seed=1, config=config)
    assert_rows_as_expected(results, archs, steps, config)
    assert [(r.arch, r.setting, r.check, r.pair) for r in results if not r.passed] == []
    lockstep = [r for r in results if r.check.startswith("lockstep")]
    kinds = {"defaults", "fast recipe", "drawn", "drawn Adam", "drawn AdamW"}
    assert {setting_kind(r.setting) for r in lockstep} == kinds


def test_numpy_optimizers_step_in_pieces_as_the_frameworks_do(monkeypatch):
    """NumPy's optimizers update each tensor a piece at a time (impl_numpy.optim.PIECE_BYTES
    of its values and buffers together). In pieces of 12,000 bytes, fc1's weights in 201-268
    pieces and fc2's in 3 or 4 of sizes a value apart, every optimizer's steps still agree
    with JAX's and PyTorch's."""
    monkeypatch.setattr(numpy_optim, "PIECE_BYTES", 12_000)
    archs = [get_arch("noconv")]
    results = run_crosscheck(archs, ["float64"], None, steps=3, batch_size=5, seed=1)
    assert_rows_as_expected(results, archs, 3, ALL_ON)
    assert [(r.setting, r.check, r.pair) for r in results if not r.passed] == []


@pytest.mark.parametrize(
    "optimizer",
    [numpy_optim.SGD(0.9, True, 0.01), numpy_optim.Adam(0.9, 0.99, 1e-8, 0.01, True)],
    ids=["SGD", "AdamW"],
)
def test_numpy_optimizers_update_a_tensor_that_is_not_contiguous_in_place(optimizer, monkeypatch):
    """A tensor laid out column by column (one from a transposed array) has no flat view, so
    it is updated whole: in place, as a contiguous copy of it is in pieces."""
    monkeypatch.setattr(numpy_optim, "PIECE_BYTES", 100)
    rng = np.random.default_rng(0)
    weight, grad = rng.standard_normal((2, 5, 9))
    by_columns, by_rows = {"w": np.asfortranarray(weight)}, {"w": weight.copy()}
    for params in (by_columns, by_rows):
        state = optimizer.init(params)
        for _ in range(2):
            optimizer.update(params, {"w": grad.copy()}, state, 0.1)
    assert not np.array_equal(by_rows["w"], weight)
    np.testing.assert_array_equal(by_columns["w"], by_rows["w"])


def test_a_lockstep_that_every_implementation_loses_alike_is_compared_up_to_there():
    """A rate far too high sends every implementation's loss out of the finite numbers after
    two steps. After that, how NaN spreads is each library's own (a mask times NaN, or a
    select), so the lockstep compares the steps before and says so in a note; a user's network
    that the fast recipe blows up is not reported as a disagreement."""
    notes = []
    config = replace(ALL_ON, lr=1e100)
    results = run_crosscheck(
        [get_arch("noconv")], ["float64"], None, steps=4, batch_size=5, seed=1, config=config,
        notes=notes,
    )  # fmt: skip
    assert [(r.setting, r.check, r.pair) for r in results if not r.passed] == []
    cut = {
        r.check for r in results if r.setting.startswith("defaults") and "lockstep loss" in r.check
    }
    assert cut == {"lockstep loss x2 of 4"}
    assert len(notes) == 1 and "lockstep loss x2 of 4: from the next step on" in notes[0]
    # What `import threefold` users read: the report's summary carries the note.
    report = threefold.Report(threefold.network("noconv"), tuple(results), "random", tuple(notes))
    assert report.passed and f"note: {notes[0]}" in report.summary()


def test_a_cross_check_of_one_implementation_runs_what_needs_no_pair():
    """threefold.crosscheck takes `impls`: with one, no pair is compared, and what is left
    (NumPy's finite differences, the shared code against the libraries) runs and passes."""
    notes = []
    results = run_crosscheck(
        [get_arch("noconv")], ["float64"], None, steps=1, batch_size=5,
        impls=IMPLEMENTATIONS[:1], notes=notes,
    )  # fmt: skip
    assert results and all(r.passed for r in results) and notes == []
    assert not any(r.check.startswith("lockstep") for r in results)


def test_lockstep_on_real_data_agrees(real_data):
    """Every setting on real images, for networks that between them hold every kink and mode:
    max-pooling and BatchNorm (strong), BatchNorm 1d, sigmoid, tanh and dropout (BN_DROPOUT),
    Dropout2d (SPATIAL_DROPOUT), the lab's; in float32, and in float64 but for BN_DROPOUT,
    whose float64 rows test_planted's baseline checks on generated images. (pool's max-pooling
    is strong's too; noconv's lockstep runs in test_optimizer_steps_agree.)"""
    names = ("lab", "strong", BN_DROPOUT, SPATIAL_DROPOUT)
    archs = [get_arch(name) for name in names]
    in_float64 = [get_arch(name) for name in names if name != BN_DROPOUT]
    steps = 3
    results = run_crosscheck(in_float64, ["float64"], real_data, steps=steps)
    results += run_crosscheck(archs, ["float32"], real_data, steps=steps)
    assert [(r.dtype, r.arch, r.setting, r.check, r.pair) for r in results if not r.passed] == []
    assert_rows_as_expected(results, archs, steps, ALL_ON)
    # Rows check each tensor's dtype too: the run's float, and int64 for the batch counters.
    typed = [r for r in results if r.expected_dtype is not None]
    assert {r.expected_dtype for r in typed} == {"float64", "float32", "int64"}


def test_checkpoint_interchange(tiny_data_dir, tmp_path, real_data):
    tiny = load_dataset(tiny_data_dir)
    for impl in IMPLEMENTATIONS:
        out = tmp_path / impl
        out.mkdir()
        train(
            TrainConfig(impl=impl, arch="pool", epochs=1, batch_size=16),
            tiny,
            out,
            log=lambda _: None,
        )
        ckpt = load_checkpoint(out / "checkpoint.npz")
        assert ckpt.meta["impl"] == impl
        results = checkpoint_agreement(ckpt.params, get_arch("pool"), real_data.test.x)
        assert [r.check for r in results if not r.passed] == []


# --- the comparison has teeth ----------------------------------------------------------


def failing_checks(arch: str) -> set[tuple[str, str, str]]:
    """(setting kind, check, pair) of every failing row of a short float64 check of `arch`."""
    results = run_crosscheck([get_arch(arch)], ["float64"], None, steps=2, batch_size=6)
    return {(setting_kind(r.setting), r.check, r.pair) for r in results if not r.passed}


PASS_SETTINGS = ("defaults", "drawn", "large logits", "planted ties")


def test_checks_catch_a_wrong_flatten_order(monkeypatch):
    import impl_numpy.layers as np_layers

    def flatten_hwc(x):
        return x.transpose(0, 2, 3, 1).reshape(len(x), -1), x.shape

    monkeypatch.setattr(np_layers, "flatten_forward", flatten_hwc)
    # lab flattens 8 channels (noconv flattens the one-channel image, the same either way).
    failed = failing_checks("lab")
    for kind in PASS_SETTINGS:
        for mode in ("eval", "train"):
            for pair in pairs_with("numpy"):
                assert (kind, f"activation flatten ({mode})", pair) in failed
                assert (kind, f"activation conv ({mode})", pair) not in failed
    assert all("numpy" in pair.split("-") for _, _, pair in failed)


def test_checks_catch_a_bias_gradient_off_by_a_factor(monkeypatch):
    import impl_numpy.layers as np_layers

    linear_backward = np_layers.linear_backward

    def off_by_a_factor(dout, cache, need_dx=True):
        dx, dw, db = linear_backward(dout, cache, need_dx)
        return dx, dw, db * 1.001

    monkeypatch.setattr(np_layers, "linear_backward", off_by_a_factor)
    failed = failing_checks("noconv")
    for kind in PASS_SETTINGS:
        assert {
            (kind, "grad fc1.bias", "numpy-jax"),
            (kind, "grad fc2.bias", "numpy-torch"),
        } <= failed
        assert (kind, "grad fc1.weight", "numpy-jax") not in failed
        assert not any(k == kind and c.endswith("(train)") for k, c, _ in failed)
    assert ("defaults", "finite-diff fc1.bias", "numpy-fd") in failed
    assert ("defaults", "finite-diff fc1.weight", "numpy-fd") not in failed
    assert all("numpy" in pair.split("-") for _, _, pair in failed)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_dropout_on_4d_maps_is_the_formula(impl):
    """Each unit of (N, C, H, W) maps kept or dropped by its own mask, the kept scaled by
    1 / (1 - p): against the formula, not against another implementation."""
    arch = get_arch(SPATIAL_DROPOUT)
    dropout = arch.dropouts[0]
    assert len(dropout.shape) == 3
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28))
    masks = dropout_masks(arch.dropouts, 6, 3, 1, 0)
    params = init_params(arch, "he", 0, np.float64)
    acts = make_backend(impl, arch, np.float64).activations(params, x, masks)
    before = acts[arch.layers[arch.layers.index(dropout) - 1].name]
    expected = before * masks[dropout.name] / (1 - dropout.p)
    np.testing.assert_allclose(acts[dropout.name], expected, rtol=1e-15, atol=0)


def test_the_biases_batchnorm_cancels_are_named():
    arch = get_arch("conv4-bn-relu-conv4b0-bn-relu-conv4-relu-flatten-fc16-bn-relu-fc10")
    assert cancelled_biases(arch) == {"conv1.bias", "fc1.bias"}
    assert cancelled_biases(get_arch("lab")) == frozenset()
    # The block's add takes conv's output too: its bias has a gradient, and Adam's rows
    # left it uncompared.
    assert cancelled_biases(get_arch("conv4-res(bn-relu-conv4)-flatten-fc10")) == frozenset()


def test_a_check_that_compared_nothing_fails_and_a_zero_head_is_checked():
    # Every ReLU of a dead layer sits at its kink: the finite differences found no entry to
    # compare, and their rows passed. A head initialised to zero: ZeroDivisionError.
    network = threefold.network("conv4-relu-flatten-fc10")
    zero = {k: np.zeros_like(v) for k, v in network.tensors.items() if k.startswith("conv")}
    options = dict(dtypes=("float64",), steps=1, batch_size=2, data=None)
    report = threefold.crosscheck(replace(network, tensors={**network.tensors, **zero}), **options)
    assert {(r.check, r.max_rel) for r in report.failed} == {
        ("finite-diff conv.weight", float("inf")),
        ("finite-diff conv.bias", float("inf")),
    }
    head = {k: np.zeros_like(v) for k, v in network.tensors.items() if k.startswith("fc")}
    assert threefold.crosscheck(
        replace(network, tensors={**network.tensors, **head}), **options
    ).passed


def test_float32_lockstep_steps_are_kept_away_from_kinks(real_data):
    """Each float32 lockstep step's batch, flipped, erased and masked as the step is, from the
    state the step starts from, is KINK_MARGIN clear of every ReLU and max-pool kink (issue
    25: a faster convolution had moved a momentum row over its tolerance through one unit);
    the exact zeros an erased box makes through the first step's zero biases do not count as
    kinks. Shifts are left out: the constant border a shift pads with makes exact ties that
    no noise of the image reaches (docs/CROSSCHECK.md)."""
    from shared.batches import training_batches
    from shared.proof.kinks import KINK_MARGIN, kink_margin
    from shared.proof.passes import each_step_away_from_kinks
    from shared.proof.settings import sample_batches

    arch, steps, size, lr = get_arch("pool"), 6, 8, 0.05
    batches = [(x.astype(np.float32), y) for x, y in sample_batches(real_data, size, steps, 0)]
    params = init_params(arch, "he", 0, np.dtype(np.float32))
    plan = training_batches(
        steps * size,
        size,
        seed=0,
        epoch=0,
        fill=real_data.background,
        flip=True,
        shift=0,
        erase=0.5,
        shuffle=False,
        dropouts=arch.dropouts,
    )
    plan = list(plan)
    reference = make_backend("numpy", arch, np.float64)
    leader = make_backend("numpy", arch, np.float32, ALL_ON.hyperparams)
    chosen = each_step_away_from_kinks(
        reference, [leader], arch, params, batches, plan, [lr] * steps, 0
    )
    state = leader.init_state(params)
    for (x, y), batch in zip(chosen, plan, strict=True):
        own = replace(batch, idx=np.arange(size))
        data = reference.put_data(x.astype(np.float64), y)
        seen = np.asarray(reference.gather(data, reference.step_arrays(own), 0, 0.0)[0])
        params64 = {
            k: v.astype(np.float64) if v.dtype.kind == "f" else v
            for k, v in leader.params(state).items()
        }
        assert kink_margin(arch, reference.activations(params64, seen, own.masks), seen) >= (
            KINK_MARGIN
        )
        state, _, _ = leader.train_step(state, leader.put_data(x, y), own, lr)


class _Nudged:
    """A backend whose every layer output is raised by `by` of the layer's largest magnitude:
    as if its round-off put each ReLU input that close below zero on the other side."""

    def __init__(self, backend, by: float):
        self.backend, self.by = backend, by

    def activations(self, params, x, masks=None):
        acts = self.backend.activations(params, x, masks)
        return {name: a + self.by * np.abs(a).max() for name, a in acts.items()}


def _sides_agree(backends, arch, params, x, masks) -> bool:
    """Whether the backends' passes on x agree on every kink that counts in float64."""
    from shared.proof.kinks import kink_distances, sides_agree

    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    x64 = x.astype(np.float64)
    acts = make_backend("numpy", arch, np.float64).activations(params64, x64, masks)
    counted = [np.isfinite(d) for d in kink_distances(arch, acts, x64)]
    return sides_agree(backends, arch, params, x, masks, counted)


def test_where_no_noise_clears_the_kinks_the_implementations_must_agree(monkeypatch):
    """Where no noise puts a batch KINK_MARGIN clear of every kink (here a margin no batch
    has), the noise taken is the closest on which every implementation is on the same side of
    every kink, not merely the closest: one ReLU unit that NumPy's round-off decided
    differently failed 6 drawn-AdamW rows of conv16-relu-conv32-maxpool2-conv32-relu-flatten-
    fc10 (issue 25)."""
    from shared.proof import kinks

    monkeypatch.setattr(kinks, "KINK_MARGIN", 1.0)
    arch = get_arch("lab")
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    params = init_params(arch, "he", 0, np.dtype(np.float32))
    reference = make_backend("numpy", arch, np.float64)
    float32 = make_backend("numpy", arch, np.float32)
    backends = [float32, _Nudged(float32, 5e-5)]
    closest = kinks.away_from_kinks(reference, arch, params, x, {}, 0)
    chosen = kinks.away_from_kinks(reference, arch, params, x, {}, 0, backends=backends)
    assert not _sides_agree(backends, arch, params, closest, {})  # the nudge bites there
    assert _sides_agree(backends, arch, params, chosen, {})


def test_each_lockstep_step_is_taken_where_the_implementations_agree(monkeypatch):
    """The lockstep's steps ask every implementation it is given, not the leader alone: each
    step's images, where no noise clears the (here unreachable) margin, are ones on which a
    nudged implementation agrees with the leader, from the state that step starts from."""
    from shared.batches import training_batches
    from shared.proof import kinks
    from shared.proof.passes import each_step_away_from_kinks
    from shared.proof.settings import sample_batches

    monkeypatch.setattr(kinks, "KINK_MARGIN", 1.0)
    arch, steps, size, lr = get_arch("lab"), 3, 4, 0.05
    batches = sample_batches(None, size, steps, 0)
    params = init_params(arch, "he", 0, np.dtype(np.float32))
    plan = list(
        training_batches(
            steps * size, size, seed=0, epoch=0, fill=0.0, flip=False, shift=0, erase=0.0,
            shuffle=False, dropouts=arch.dropouts,
        )
    )  # fmt: skip
    reference = make_backend("numpy", arch, np.float64)
    leader = make_backend("numpy", arch, np.float32, ALL_ON.hyperparams)
    backends = [leader, _Nudged(leader, 5e-5)]
    chosen = each_step_away_from_kinks(
        reference, backends, arch, params, batches, plan, [lr] * steps, 0
    )
    state, closest_agree = leader.init_state(params), []
    for step, ((x, y), (x0, _), batch) in enumerate(zip(chosen, batches, plan, strict=True)):
        own = replace(batch, idx=np.arange(size))
        at = leader.params(state)
        assert _sides_agree(backends, arch, at, x, own.masks)
        closest = kinks.away_from_kinks(reference, arch, at, x0, own.masks, (0, step))
        closest_agree.append(_sides_agree(backends, arch, at, closest, own.masks))
        state, _, _ = leader.train_step(state, leader.put_data(x, y), own, lr)
    assert not all(closest_agree)  # the nudge bites on some step's closest


class _AlteredAfterSteps:
    """A backend whose training steps are its own but for what `altered` does after each:
    one implementation's planted error in a lockstep run."""

    def __init__(self, backend):
        self.backend, self.steps = backend, 0

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def train_step(self, state, data, batch, lr):
        state, loss, extra = self.backend.train_step(state, data, batch, lr)
        self.steps += 1
        return (*self.altered(state, loss), extra)

    def altered(self, state, loss):
        """(state, loss) after step `self.steps` (from 1), as the error leaves them."""
        raise NotImplementedError


class _LosesFrom(_AlteredAfterSteps):
    """A backend whose training loss is NaN from its `step`-th step on, its state finite: one
    implementation alone losing steps."""

    def __init__(self, backend, step: int):
        super().__init__(backend)
        self.step = step

    def altered(self, state, loss):
        return state, np.full_like(loss, np.nan) if self.steps > self.step else loss


class _WeightOffAt(_AlteredAfterSteps):
    """A backend whose `name` after its `step`-th step (from 1) is `factor` times the true
    one: a small error in one step of one implementation."""

    def __init__(self, backend, name: str, step: int, factor: float):
        super().__init__(backend)
        self.name, self.step, self.factor = name, step, factor

    def altered(self, state, loss):
        if self.steps == self.step:
            params = self.backend.params(state)
            params[self.name] = params[self.name] * self.factor
            state = self.backend.init_state(params, self.backend.optimizer_tensors(state))
        return state, loss


def _noconv_lockstep(config: TrainConfig, steps: int):
    """What a float64 lockstep of `noconv` under `config`'s first setting takes: the network,
    the setting, its batches of 5, seeded weights and every implementation's backend."""
    from shared.proof.settings import noisy_batches, sample_batches, settings

    arch = get_arch("noconv")
    setting = settings(config, steps, 0, arch)[0]
    batches = noisy_batches(sample_batches(None, 5, steps, 0), 0)
    params = init_params(arch, "he", 0, np.dtype(np.float64))
    hyperparams = setting.config.hyperparams
    backends = {impl: make_backend(impl, arch, np.float64, hyperparams) for impl in IMPLEMENTATIONS}
    return arch, setting, batches, params, backends


def test_each_lockstep_step_is_measured_against_its_own_scale():
    """A run at rate 100 grows fc1's weights from about 60 to about 5e8 in 4 steps. An error
    of 1e-6 in one implementation's weights after the first step (every step restarting
    from the first implementation's state, as float32's do) fails its pairs' rows of those
    weights, though against the last step's weights it would be 1e-13, inside float64's
    tolerance."""
    from shared.proof.passes import lockstep
    from shared.proof.rows import TOLERANCES, judge

    steps, name = 4, "fc1.weight"
    arch, setting, batches, params, backends = _noconv_lockstep(replace(ALL_ON, lr=100.0), steps)
    off = IMPLEMENTATIONS[-1]  # not the first, whose state every step restarts from
    backends[off] = _WeightOffAt(backends[off], name, 1, 1 + 1e-6)
    _, rows = lockstep(backends, arch, params, batches, setting, resync=True)
    tolerance = TOLERANCES[("float64", "lockstep")]
    weights = {row.pair: row for row in rows if row.check == f"lockstep {name}"}
    grown = next(iter(weights.values())).sizes  # the weights' size at each step
    assert len(grown) == steps and grown[-1] > 1e6 * grown[0]  # the run this test needs
    verdicts = {
        pair: judge(row, "float64", arch.name, setting.name, tolerance).passed
        for pair, row in weights.items()
    }
    assert verdicts == {pair: off not in pair.split("-") for pair in verdicts}
    # Against the whole run's scale, the same rows would pass.
    assert all(max(row.diffs) / max(row.sizes) < tolerance for row in weights.values())
    # Every other row passes: the error is in those weights alone, at that step alone.
    others = [row for row in rows if row.check != f"lockstep {name}"]
    assert all(judge(row, "float64", arch.name, setting.name, tolerance).passed for row in others)


def test_a_measured_row_measures_each_step_against_its_family_then():
    """A tensor zero in exact arithmetic is measured against its family's size at each step
    (round-off of 1e-17 at a step whose family is 1 reads 1e-17; against the run's family,
    1e12, the row would read 1e-18), and 1e-3 of a step whose family is about 1 fails though
    a later step's family is 1e12. The row keeps two numbers a step, not the tensors."""
    zero_exact, exact = Measured("c", "p"), Measured("c", "p")
    for step, family in ((np.array([1e-17, 0.0]), 1.0), (np.array([0.0, 1e-6]), 1e12)):
        zero_exact.add(step, np.zeros(2), family)
    assert zero_exact.measured()[1] == 1e-17
    assert compare(np.array([[1e-17, 0.0], [0.0, 1e-6]]), np.zeros((2, 2)), 1e12)[1] == (
        pytest.approx(1e-18)
    )
    grows = np.array([[1.0, 0.5], [1e12, 3e11]])
    wrong_early = grows + np.array([[1e-3, 0.0], [0.0, 0.0]])
    for a, b, family in zip(grows, wrong_early, (1.0, 1e12), strict=True):
        exact.add(a, b, family)
    assert exact.measured() == (pytest.approx(1e-3), pytest.approx(1e-3 / (1 + 1e-3)), "float64")
    assert exact.first(1).measured()[1] == exact.measured()[1] and len(exact.diffs) == 2
    assert compare(grows, wrong_early, 1e12)[1] < 1e-14  # the whole run's scale hides it


def test_a_failing_lockstep_row_names_the_first_step_past_its_tolerance():
    """A row gave its worst step alone: a momentum planted wrong, off by 1e-3 from step 3 and
    by 1e-1 at step 4, read as a failure of step 4's size."""
    row = Measured("lockstep momentum fc.weight", "numpy-torch")
    for off in (0.0, 1e-12, 1e-3, 1e-1):
        row.add(np.ones(3), np.ones(3) + off)
    failed = judge(row, "float64", "lab", "defaults", 1e-9)
    assert not failed.passed and failed.first_step == 3 and failed.as_dict()["first_step"] == 3
    assert format_table([failed]).splitlines()[-1].endswith("FAIL (from step 3)")
    assert judge(row.first(2), "float64", "lab", "defaults", 1e-9).first_step is None  # passes
    single = Compared("loss", "numpy-torch", np.ones(3), np.ones(3) + 1e-3)
    assert judge(single, "float64", "lab", "defaults", 1e-9).first_step is None  # one step


@pytest.mark.parametrize("resync", [False, True])
def test_steps_one_implementation_alone_loses_are_compared_and_fail(resync):
    """The lockstep is cut only where every implementation loses the loss to the end: steps
    that one implementation alone loses stay in the comparison, and its pairs' loss rows fail
    while the others' pass."""
    from shared.proof.passes import lockstep
    from shared.proof.rows import TOLERANCES, judge

    steps = 4
    arch, setting, batches, params, backends = _noconv_lockstep(ALL_ON, steps)
    loser = IMPLEMENTATIONS[0]
    backends[loser] = _LosesFrom(backends[loser], 2)
    compared, rows = lockstep(backends, arch, params, batches, setting, resync)
    assert compared == steps
    tolerance = TOLERANCES[("float64", "lockstep")]
    verdicts = {
        row.pair: judge(row, "float64", arch.name, setting.name, tolerance).passed
        for row in rows
        if row.check == f"lockstep loss x{steps}"
    }
    assert verdicts == {pair: loser not in pair.split("-") for pair in verdicts}
    assert len(verdicts) == len(list(itertools.combinations(IMPLEMENTATIONS, 2)))


def test_the_first_divergence_is_where_the_computation_first_parts():
    """A wrong tanh fails its own output and, through the backward, the gradients of every
    layer before it: the network's order alone named fc1, whatever the fault."""
    network = threefold.network("flatten-fc32-relu-fc16-tanh-fc10")

    def report(*failing: str) -> threefold.Report:
        checks = ["activation relu (eval)", "grad fc3.weight", "lockstep fc1.weight", *failing]
        rows = [
            CheckResult("float64", network.spec, "defaults", check, "numpy-torch", 0.0,
                        1.0 if check in failing else 0.0, 1e-9)
            for check in checks
        ]  # fmt: skip
        return threefold.Report(network, tuple(rows), "seeded random images")

    grads = ("grad fc1.weight", "grad fc2.bias")
    wrong_tanh = report("activation tanh (eval)", *grads, "lockstep fc1.weight")
    assert wrong_tanh.divergence == ("tanh", "forward") and wrong_tanh.first_divergence == "tanh"
    assert "first divergence: tanh (forward)" in wrong_tanh.summary()
    assert report(*grads).divergence == ("fc2", "backward")  # fc2, or the tanh after it
    assert report("grad input").divergence == ("flatten", "backward")
    assert report("logits (eval)", "grad fc3.bias").divergence == ("fc3", "forward")
    assert report("lockstep fc1.weight").divergence == ("fc1", "training")
    assert report().divergence is None and report().first_divergence is None
