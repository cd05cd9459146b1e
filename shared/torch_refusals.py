"""What a PyTorch module does beyond the forward torch.fx traces, which an import would
miss: hooks (its own, global ones, its state_dict's), parametrizations, lazy parameters,
TorchScript, a forward replaced on the instance, weights that do not train, have gradient
hooks or get no gradient (torch.no_grad inside forward), layers frozen in the other mode
than the module, weights two layers share, and outputs or gradients other than those of the
network read from it (what torch.fx did not record). Each is refused in one line naming the
submodule; shared/torch_import.py calls these before and after tracing, and leaves the
module as it was (left_as_it_was)."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from shared.errors import USER_CODE_ERRORS, UsageError, first_line
from shared.layers import INPUT_SHAPE
from shared.metrics import log_softmax
from shared.network import Network
from shared.spec import float_dtype, tensors


def refuse_frozen(module: Any, where: str) -> None:
    """Refuse a BatchNorm or dropout left in the other mode than the module (a BatchNorm kept
    in evaluation mode while the network trains, as fine-tuning does): threefold's layers
    train, and evaluate, with their network."""
    for name, sub in module.named_modules():
        if (
            type(sub).__name__.startswith(("BatchNorm", "Dropout"))
            and sub.training != module.training
        ):
            mode = "evaluation" if module.training else "training"
            raise UsageError(
                f"{where}: {name}: in {mode} mode while the module is not (frozen); threefold's "
                "layers train and evaluate with their network"
            )


# The hooks that change what a module computes, the gradients it trains by (a backward hook
# may return others), or the weights it reads (its state_dict's).
HOOKS = {
    "_forward_hooks": "forward hooks",
    "_forward_pre_hooks": "forward pre-hooks",
    "_backward_hooks": "backward hooks",
    "_backward_pre_hooks": "backward pre-hooks",
    "_state_dict_hooks": "state_dict hooks",
    "_state_dict_pre_hooks": "state_dict pre-hooks",
}
GLOBAL_HOOKS = {
    "_global_forward_hooks": "register_module_forward_hook",
    "_global_forward_pre_hooks": "register_module_forward_pre_hook",
    "_global_backward_hooks": "register_module_full_backward_hook",
    "_global_backward_pre_hooks": "register_module_full_backward_pre_hook",
}


def refuse_hidden_behaviour(module: Any, where: str) -> None:
    """Refuse what changes a module's computation outside the forward that torch.fx traces:
    lazy parameters not yet given a shape, hooks (pruning and the older weight_norm are
    forward pre-hooks), parametrizations (the newer weight_norm, spectral_norm), TorchScript
    (the whole module or a part)."""
    import torch
    from torch.nn.modules import module as every_module
    from torch.nn.parameter import is_lazy
    from torch.nn.utils import parametrize

    # Hooks set on every module at once run outside any one module's own.
    found = [made for kind, made in GLOBAL_HOOKS.items() if getattr(every_module, kind, None)]
    if found:
        raise UsageError(
            f"{where}: torch.nn has hooks on every module ({found[0]}), which change what each "
            "computes; remove them to import it"
        )
    for name, sub in module.named_modules():
        shown = name or type(module).__name__
        # A lazy module's own pre-hook gives it its shape on the first batch.
        own = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if any(is_lazy(t) for t in own):
            raise UsageError(
                f"{where}: {shown}: has lazy parameters not yet of a shape; run the module "
                "on one batch first"
            )
        hooks = [shown_kind for kind, shown_kind in HOOKS.items() if getattr(sub, kind, None)]
        if hooks:
            raise UsageError(
                f"{where}: {shown}: has {hooks[0]} (pruning and the older weight_norm are "
                "forward pre-hooks), which change what it computes, the gradients it trains "
                "by or the weights it gives; remove them to import it"
            )
        if parametrize.is_parametrized(sub):
            raise UsageError(
                f"{where}: {shown}: has parametrizations (weight_norm, spectral_norm); "
                "remove them (torch.nn.utils.parametrize.remove_parametrizations) to import it"
            )
        if isinstance(sub, torch.jit.ScriptModule):
            raise UsageError(
                f"{where}: {shown}: a TorchScript module, whose forward is compiled; threefold "
                "reads the nn.Module it was scripted from"
            )
        if "forward" in vars(sub):  # torch.fx and the mapping read the class's
            raise UsageError(f"{where}: {shown}: its forward is replaced on the instance")
        for weight, tensor in sub.named_parameters(recurse=False):
            # Post-accumulate hooks step an optimizer in the backward, or change the gradient.
            hooked = tensor._backward_hooks or tensor._post_accumulate_grad_hooks
            if not tensor.requires_grad or hooked:
                why = "does not train" if not tensor.requires_grad else "has gradient hooks"
                raise UsageError(
                    f"{where}: {shown}.{weight}: {why}; threefold trains every weight by its "
                    "plain gradient"
                )


def refuse_cut_gradients(module: Any, graph: Any, where: str) -> None:
    """Refuse a weight of a layer the forward calls that gets no gradient in training: a part
    of the forward under torch.no_grad or inference_mode, which torch.fx does not record,
    would train in threefold and not in the module. The module runs once, in training mode,
    on 2 blank images, whatever grad mode the caller is in; autograd.grad leaves its
    weights' .grad as they were (and left_as_it_was the rest)."""
    import torch

    weights = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            for name, tensor in module.get_submodule(node.target).named_parameters():
                weights[f"{node.target}.{name}"] = tensor
    # Weights made under inference_mode take no gradient anywhere: nothing to see.
    if not weights or any(t.is_inference() for t in weights.values()):
        return
    dtype = next(iter(weights.values())).dtype
    try:
        module.train()
        with torch.inference_mode(False), torch.enable_grad():
            output = module(torch.zeros(2, *INPUT_SHAPE, dtype=dtype))
            grads = (
                torch.autograd.grad(output.sum(), list(weights.values()), allow_unused=True)
                if isinstance(output, torch.Tensor) and output.requires_grad
                else [None] * len(weights)
            )
    except USER_CODE_ERRORS as error:  # the user's forward: any error is theirs
        raise UsageError(
            f"{where}: its forward fails on 1x28x28 images in training mode ({first_line(error)})"
        ) from None
    cut = next((name for name, grad in zip(weights, grads, strict=True) if grad is None), None)
    if cut is not None:
        raise UsageError(
            f"{where}: {cut}: its forward gives it no gradient in training (torch.no_grad or "
            "inference_mode, which torch.fx does not record); threefold trains every weight by "
            "its plain gradient"
        )


@contextlib.contextmanager
def left_as_it_was(module: Any) -> Iterator[None]:
    """Within the block the module's forward may run (torch.fx's traces, the gradient probe):
    on leaving, its attributes (training flags, a counter it keeps), its parameters' and
    buffers' values (non-persistent ones too) and torch's, Python's and NumPy's global random
    number generators are as they were."""
    import torch

    attributes = {sub: dict(vars(sub)) for sub in module.modules()}
    # An inference tensor cannot be written outside inference_mode: by the forward neither.
    every = [*module.parameters(), *module.buffers()]
    tensors = [(t, t.detach().clone()) for t in every if not t.is_inference()]
    python_random, numpy_random = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python_random)
        np.random.set_state(numpy_random)
        for sub, saved in attributes.items():
            for name in set(vars(sub)) - set(saved):
                delattr(sub, name)
            vars(sub).update(saved)
        with torch.no_grad():
            for tensor, value in tensors:
                tensor.copy_(value)


def refuse_shared_weights(module: Any, graph: Any, where: str) -> None:
    """Refuse weights that the forward would use twice: a module with weights called twice,
    or one tensor's memory (a parameter or a buffer, or `nn.Parameter(other.weight.data)`,
    another tensor of the same storage) held by two modules it calls (tied weights).
    Threefold would import two layers, and training would untie them."""
    spans: list[tuple[int, int, str]] = []  # each tensor's bytes: [start, end), its path
    called: set[str] = set()
    for node in graph.graph.nodes:
        if node.op != "call_module":
            continue
        sub = module.get_submodule(node.target)
        if node.target in called and any(True for _ in sub.parameters()):
            raise UsageError(
                f"{where}: {node.target}: {type(sub).__name__}: used twice; its weights would "
                "be shared, which threefold's layers are not"
            )
        called.add(node.target)
        for name, tensor in [*sub.named_parameters(), *sub.named_buffers()]:
            if tensor.numel():
                start = tensor.data_ptr()
                spans.append((start, start + _byte_span(tensor), f"{node.target}.{name}"))
    # Sorted by start, two tensors share memory where one starts before the other ends.
    spans.sort()
    for (_, end, first), (start, _, path) in itertools.pairwise(spans):
        if start < end:
            raise UsageError(
                f"{where}: {first} and {path} are one tensor (tied weights); threefold's "
                "layers do not share weights"
            )


def _byte_span(tensor: Any) -> int:
    """The bytes from a tensor's first element to just past its last, strides included."""
    last = sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride(), strict=True))
    return (last + 1) * tensor.element_size()


# A float32 network rebuilt from a module's layers runs the same kernels, a few units of
# round-off apart; a forward under autocast to bfloat16 is thousands.
AGREEMENT = {np.float32: 2e-5, np.float64: 1e-10}


def refuse_other_outputs(module: Any, network: Network, where: str) -> None:
    """Refuse a module whose evaluation-mode outputs on 3 seeded random images, or the
    gradients of its weights there, differ from those of the network read from it (as
    threefold.to_torch exports it), as log-probabilities (a final LogSoftmax is dropped):
    what torch.fx did not record (a replaced __call__, autocast, a size read from the batch,
    a path under torch.no_grad) would otherwise be imported as something else."""
    import torch

    from shared.backend import torch_module

    dtype = float_dtype(network.tensors).type
    images = np.random.default_rng(0).random((3, *INPUT_SHAPE)).astype(dtype)
    # Each trained tensor: (the module's name, the network's canonical one).
    trained = tensors(network.arch)
    pairs = [p for m in network.mapping for p in m.tensors if trained[p[1]].trainable]
    module.eval()  # not chained: a train() of the user's may return None
    try:
        theirs, their_grads = _outputs_and_gradients(module, images, [t for t, _ in pairs])
    except USER_CODE_ERRORS as error:  # the user's forward: any error is theirs
        raise UsageError(
            f"{where}: its forward or backward fails on a batch of 3 images in evaluation "
            f"mode ({first_line(error)})"
        ) from None
    if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != (3, 10):
        got = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
        raise UsageError(f"{where}: gives {got} for 3 images, not (3, 10) logits")
    ours_module = torch_module(network.arch, network.tensors, network.standardise)
    ours, our_grads = _outputs_and_gradients(ours_module, images, [c for _, c in pairs])
    logits = theirs.detach().double().numpy()
    # Round-off grows with the logits, which log-probabilities hide (a shift of all of them).
    scale = max(1.0, float(np.abs(logits).max()))
    ours = ours.detach().double().numpy()
    apart = float(np.abs(log_softmax(logits) - log_softmax(ours)).max()) / scale
    if not apart <= AGREEMENT[dtype]:
        raise UsageError(
            f"{where}: its outputs differ from those of the layers read from it ({apart:.2g} "
            "apart): its forward computes what torch.fx does not record (autocast, a replaced "
            "__call__, a size read from the batch)"
        )
    if their_grads is None or our_grads is None:
        return
    # Measured against the largest gradient: a weight's own may be round-off alone.
    largest = max((float(np.abs(g).max()) for g in our_grads), default=0.0)
    scale = max(largest, np.finfo(dtype).tiny)
    for (name, _), t, o in zip(pairs, their_grads, our_grads, strict=True):  # the first named
        apart = float(np.abs(t - o).max()) / scale
        if not apart <= AGREEMENT[dtype]:
            raise UsageError(
                f"{where}: {name}: its gradient differs from that of the layer read from it "
                f"({apart:.2g} apart): part of its forward runs under torch.no_grad or "
                "inference_mode, which torch.fx does not record"
            )


def _outputs_and_gradients(
    module: Any, images: np.ndarray, weights: list[str]
) -> tuple[Any, list[np.ndarray] | None]:
    """The module's outputs (N, 10) for images (N, 1, 28, 28), and the gradients of its
    log-probabilities in a seeded random direction with respect to the named `weights`
    (training's gradients, in evaluation mode), or None where no gradient reaches its outputs
    (weights made under inference_mode, a forward without gradients) or they are not
    (N, 10)."""
    import torch

    # Inference tensors cannot be saved for a backward.
    frozen = any(t.is_inference() for t in module.parameters())
    with torch.inference_mode(False), torch.set_grad_enabled(not frozen):
        out = module(torch.from_numpy(images.copy()))  # a copy it may write in place
        shaped = isinstance(out, torch.Tensor) and tuple(out.shape) == (len(images), 10)
        # A forward wholly without gradients in evaluation mode (as `torch.set_grad_enabled(
        # self.training)` makes it) is one an inference may run; training's are probed apart.
        if not shaped or not out.requires_grad:
            return out, None
        direction = torch.from_numpy(np.random.default_rng(1).standard_normal(out.shape))
        log_probabilities = torch.log_softmax(out.double(), dim=1)
        tensors = [module.get_parameter(name) for name in weights]
        grads = torch.autograd.grad(
            (log_probabilities * direction).sum(), tensors, allow_unused=True
        )
    return out, [
        np.zeros(t.shape) if g is None else g.double().numpy()
        for t, g in zip(tensors, grads, strict=True)
    ]
