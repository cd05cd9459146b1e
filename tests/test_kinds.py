"""Every layer kind is one complete entry of shared/kinds.py's table, and what the entry says
is what the implementations do: each handles the kind (and `as_module` builds it), its output
shape, its token's round trip, its tensors, and the properties the cross-check relies on
(whether it normalises across the batch, whether exact zeros stay exact, where its kinks are)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impl_torch.model import as_module
from shared.backend import IMPLEMENTATIONS, make_backend
from shared.batches import dropout_masks
from shared.errors import UsageError
from shared.kinds import KINDS, kind_of, token
from shared.layers import LayerKind, Option, Residual, Tensor
from shared.spec import Arch, get_arch, init_params, tensors
from tests.test_training import run_script

KIND_NAMES = list(KINDS)


def token_of(kind: LayerKind) -> str:
    """The shortest token of a kind: its name and its first option's example (a block's: one
    conv and a ReLU)."""
    if kind.layer is Residual:
        return f"{kind.name}(conv3-relu)"
    first = kind.options[:1]
    return kind.name + "".join(str(o.example) for o in first)


def networks_with(kind: LayerKind) -> list[Arch]:
    """Small networks holding a layer of `kind`, wherever its input may be: after a conv of 3
    channels (spatial), after flatten (flat)."""
    token = token_of(kind)
    places = {"spatial": ["spatial"], "flat": ["flat"], "any": ["spatial", "flat"]}[kind.input]
    specs = []
    for place in places:
        if kind.name == "flatten":
            specs.append("conv3-flatten-fc10")
        elif kind.name == "fc":
            specs.append(f"flatten-{token}-fc10")
        elif place == "spatial":
            specs.append(f"conv3-{token}-flatten-fc10")
        else:
            specs.append(f"conv3-flatten-{token}-fc10")
    return [get_arch(spec) for spec in specs]


def layer_of(arch: Arch, kind: LayerKind):
    return next(layer for layer in arch.layers if layer.kind == kind.name)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28))


def outputs(impl: str, arch: Arch, params, x, train: bool) -> dict[str, np.ndarray]:
    """Every layer's output by one implementation, float64, in training or evaluation mode."""
    backend = make_backend(impl, arch, np.float64)
    masks = dropout_masks(arch.dropouts, len(x), 0, 0, 0) if train else None
    return backend.activations(params, x, masks)


@pytest.mark.parametrize("name", KIND_NAMES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_implementation_handles_every_kind_with_its_output_shape(name, impl):
    for arch in networks_with(KINDS[name]):
        params = init_params(arch, "torch", 0, np.float64)
        x = images(4)
        for train in (False, True):
            acts = outputs(impl, arch, params, x, train)
            for node in arch.nodes:
                assert acts[node.layer.name].shape == (4, *node.out), (impl, node.layer, train)
        masks = dropout_masks(arch.dropouts, 4, 0, 0, 0)
        _, grads = make_backend(impl, arch, np.float64).loss_and_grads(
            params, x, np.arange(4), masks
        )
        assert set(grads) == set(arch.trainable)


@pytest.mark.parametrize("name", KIND_NAMES)
def test_as_module_builds_every_kind_and_loads_its_tensors_strictly(name):
    for arch in networks_with(KINDS[name]):
        params = init_params(arch, "torch", 0, np.float64)
        module = as_module(arch).double()
        module.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
        module.eval()
        x = images(3)
        expected = outputs("numpy", arch, params, x, train=False)[arch.layers[-1].name]
        with torch.no_grad():
            np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("name", KIND_NAMES)
def test_a_kind_s_token_rebuilds_its_layer(name):
    kind = KINDS[name]
    for arch in networks_with(kind):
        layer = layer_of(arch, kind)
        assert kind_of(layer) is kind
        assert get_arch(arch.spec).layers == arch.layers
        assert token(layer) == kind.token(layer) or kind.layer is Residual
        assert token(layer) in arch.spec


def test_help_and_the_refusal_of_an_unknown_token_show_every_kind():
    shown = run_script("train.py", "--help").stdout
    with pytest.raises(UsageError) as refused:
        get_arch("vgg16-flatten-fc10")
    for kind in KINDS.values():
        assert f"  {kind.usage} " in shown and kind.name in str(refused.value)


@pytest.mark.parametrize("name", KIND_NAMES)
def test_a_kind_s_tensors_have_their_initial_values(name):
    kind = KINDS[name]
    for arch in networks_with(kind):
        layer = layer_of(arch, kind)
        own = kind.tensors(layer)
        assert all(key.startswith(f"{layer.name}.") for key in own)
        for scheme in ("he", "lab", "torch"):
            values = init_params(arch, scheme, 0, np.float64)
            for key, tensor in own.items():
                value = values[key]
                assert value.shape == tensor.shape
                assert value.dtype == (np.int64 if tensor.counter else np.float64)
                if tensor.initial == "one":
                    assert (value == 1).all()
                elif tensor.initial in ("zero", "count") or (
                    tensor.initial == "bias" and scheme != "torch"
                ):
                    assert (value == 0).all()
                else:  # drawn: a weight, or PyTorch's bias
                    assert value.std() > 0
        with torch.no_grad():
            module_tensors = as_module(arch).state_dict()
        assert {k: tuple(v.shape) for k, v in module_tensors.items()} == {
            k: t.shape for k, t in tensors(arch).items()
        }


@pytest.mark.parametrize("name", KIND_NAMES)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_what_the_cross_check_asks_of_a_kind_is_what_it_does(name, impl):
    """batch_statistics: training changes an image's output when the other images change.
    keeps_zeros: an all-zero image gives exactly zero, with zero biases, in training."""
    kind = KINDS[name]
    for arch in networks_with(kind):
        layer = layer_of(arch, kind)
        params = init_params(arch, "he", 0, np.float64)
        params = {k: np.zeros_like(v) if k.endswith("bias") else v for k, v in params.items()}
        x = images(4)
        x[0] = 0.0
        before = outputs(impl, arch, params, x, train=True)[layer.name]
        others = x.copy()
        others[1:] += 1.0
        after = outputs(impl, arch, params, others, train=True)[layer.name]
        assert (not np.allclose(before[0], after[0])) == kind.batch_statistics, impl
        assert (before[0] == 0).all() == kind.keeps_zeros, impl


@pytest.mark.parametrize("name", [n for n, k in KINDS.items() if k.kinks is not None])
def test_a_kind_s_kinks_are_where_its_gradient_jumps(name):
    """A "zero" kink: the gradient differs just above and just below 0. A "tie" kink: the
    gradient moves to whichever of the window's two largest values is larger."""
    kind = KINDS[name]
    arch = networks_with(kind)[0]
    layer = layer_of(arch, kind)
    backend = make_backend("numpy", arch, np.float64)
    model = backend.model

    def input_gradient(x_in: np.ndarray) -> np.ndarray:
        out, cache = model.layer_forward(layer, {}, x_in, None, {}, {})
        return model.layer_backward(layer, np.ones_like(out), cache, True, {})

    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4))
    values = kind.kinks.values(layer, x)
    if kind.kinks.at == "zero":
        assert values.shape == x.shape
        above, below = input_gradient(np.full_like(x, 1e-3)), input_gradient(np.full_like(x, -1e-3))
        assert not np.allclose(above, below)
    else:
        out, _ = model.layer_forward(layer, {}, x, None, {}, {})
        assert values.shape[:-1] == out.shape
        tied = np.zeros((1, 1, 2, 2))
        tied[0, 0, 0, 0], tied[0, 0, 1, 1] = 1.0, 1.0 + 1e-9
        first, second = tied.copy(), tied.copy()
        second[0, 0, 0, 0] = 1.0 + 2e-9
        assert not np.array_equal(input_gradient(first), input_gradient(second))


def test_a_table_entry_missing_a_piece_or_malformed_is_refused_where_it_is_written():
    conv = KINDS["conv"]
    pieces = {f: getattr(conv, f) for f in conv.__dataclass_fields__}
    for missing in pieces:
        partial = {k: v for k, v in pieces.items() if k != missing}
        with pytest.raises(TypeError):
            LayerKind(**partial)
    with pytest.raises(ValueError):  # only the first option goes without a letter
        LayerKind(**{**pieces, "options": (*conv.options, Option("dilation", "", "D", int))})
    with pytest.raises(ValueError):
        LayerKind(**{**pieces, "input": "3d"})
    with pytest.raises(ValueError):  # an initial value that no initialisation knows
        Tensor((3,), True, "xavier-ish")
