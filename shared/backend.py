"""The one interface the training loop and the cross-check drive, whatever the framework, and
the one factory that builds it."""

from __future__ import annotations

import ctypes
import functools
import importlib
import sys
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import numpy as np

from shared.batches import Batch
from shared.config import IMPLEMENTATIONS, Hyperparams
from shared.cost import evaluation_batch, largest_training_batch, network_cost
from shared.errors import UsageError
from shared.layers import Layer
from shared.parallel import Total, alone
from shared.spec import Arch, Params, float_dtype, split_params, tensor_dtype

TrainState = tuple[Any, Any]  # (canonical tensors, optimizer state), in the framework's form
R = TypeVar("R")
OptimizerTensors = dict[str, Params]  # by buffer ("momentum", "exp_avg", ...), then parameter


class StepArrays(NamedTuple):
    """What a training step takes from the host: the batch's rows `idx` (B,), its
    augmentation maps `rows` (B, H) and `cols` (B, W) or None, its dropout keep-masks by
    layer name, its erasing boxes (B, 4) or None; as the framework's step takes them (see
    `step_arrays`)."""

    idx: Any
    rows: Any
    cols: Any
    masks: dict[str, Any]
    boxes: Any = None


class Backend:
    """A network of `arch` in one framework, trained with `hyperparams`, in `dtype`.

    Each `impl_*/backend.py` subclasses it with its framework's part: its `model`, `optim`,
    `ops` (its layers module), `augment` and `erase`, `compile` (jax.jit, or nothing), the
    conversions `_array`, `_exact`, `_tensor`, and (where a framework computes asynchronously
    or on a device) `step_arrays`, `moved`, `scalar`, `wait` and `to_host`. The rest, written
    once here, is the same for every framework: a training step is `gather`,
    `training_pass`, `update_state`, compiled as the framework runs them; arrays go in and
    come out as NumPy, tensors as the canonical dict (parameters and buffers); and training
    state stays in the framework's own form between steps (no conversions in the hot path).
    Dropout masks, where a method takes them, are NumPy bool arrays by layer name; with
    `masks=None` the network runs in evaluation mode.
    """

    name: str
    compiles = False  # whether the step is compiled before it first runs (see compile_step)
    # The library whose schedule and loss the shared code is checked against for this
    # implementation (shared/proof/references.py): its framework's own, where it has one.
    reference_library: str | None = None
    model: ModuleType  # impl_*/model.py
    optim: ModuleType  # impl_*/optim.py
    ops: ModuleType  # impl_*/layers.py
    augment: Callable  # impl_*/augment.py's augment
    erase: Callable  # impl_*/augment.py's erase

    def __init__(self, arch: Arch, dtype: np.dtype, hyperparams: Hyperparams):
        self.arch, self.dtype, self.hyperparams = arch, np.dtype(dtype), hyperparams
        # What fits the memory bound (shared/cost.py): images a step holds at once (a larger
        # batch is taken in parts), and images per batch of logits.
        cost = network_cost(arch.layers)
        self.step_images = largest_training_batch(cost, self.dtype)
        self.logit_images = evaluation_batch(cost, self.dtype)
        h = hyperparams
        if h.optimizer == "sgd":
            self.optimizer = self.optim.SGD(h.momentum, h.nesterov, h.weight_decay)
        else:
            decoupled = h.optimizer == "adamw"
            self.optimizer = self.optim.Adam(h.beta1, h.beta2, h.eps, h.weight_decay, decoupled)
        # An argument of the compiled functions, not a constant compiled into them: one
        # program then serves every smoothing (the cross-check's settings draw their own).
        self.smoothing = self.scalar(h.label_smoothing)
        # The model's functions over framework arrays, as the framework runs them fastest.
        self.predict_fn = self.compile(partial(self.model.forward, arch=arch))
        self.activations_fn = self.compile(partial(self.model.activations, arch=arch))
        self._training_pass = partial(self.model.training_pass, arch=arch)
        # Each piece of a step compiled on its own, for the profile; the step itself compiles
        # them together (see _train_step).
        self._compiled_training_pass = self.compile(self._training_pass)
        self.gather = self.compile(self._gather, static_argnames=("pad", "fill"))
        self.update_state = self.compile(self._update_state)
        self._loss_and_grads = self.compile(partial(self.model.loss_and_grads, arch=arch))
        self._input_grad = self.compile(partial(self.model.input_grad, arch=arch))
        self._step = self.compile(self._train_step, static_argnames=("pad", "fill"), donate=True)

    # --- the framework's part ------------------------------------------------------------

    @staticmethod
    def compile(fn: Callable, static_argnames: tuple[str, ...] = (), donate: bool = False):
        """`fn` as the framework runs it fastest (compiled, or as it is); with `donate`, its
        first argument's buffers may be reused for its result."""
        raise NotImplementedError

    def _array(self, x: np.ndarray) -> Any:
        """x in the framework, in the backend's dtype, sharing memory where it can."""
        raise NotImplementedError

    def _exact(self, a: np.ndarray) -> Any:
        """An array in the framework with its dtype kept (labels, dropout masks, indices)."""
        raise NotImplementedError

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> Any:
        """A fresh framework tensor of `dtype` holding `value` (a state's own, which NumPy
        and PyTorch update in place)."""
        raise NotImplementedError

    def moved(self, arrays: StepArrays) -> StepArrays:
        """Step arrays in the framework's own memory: for the profile, which times the move
        apart (nothing to move where `step_arrays` has moved them)."""
        return arrays

    def scalar(self, value: float) -> Any:
        """A float that compiled functions take as an argument (a step's learning rate, the
        loss's label smoothing), in the form they take it."""
        return value

    def wait(self, value: Any) -> Any:
        """`value` once computed: frameworks that dispatch asynchronously (JAX) block here."""
        return value

    def to_host(self, value: Any) -> Any:
        """A tree of framework scalars and arrays, brought to the host in one transfer."""
        return value

    # --- the same for every framework ----------------------------------------------------

    @staticmethod
    def _numpy(tensors: dict[str, Any]) -> Params:
        """NumPy copies of a framework's tensors: a state's buffers may be updated in place
        (NumPy, PyTorch) or donated to the next step (JAX) after they are read."""
        return {k: np.asarray(v).copy() for k, v in tensors.items()}

    def _copy(self, tensors: Params) -> dict[str, Any]:
        """Canonical tensors as fresh framework tensors: floats in the backend's dtype, the
        BatchNorm counters int64."""
        dtypes = {k: tensor_dtype(self.arch, k, self.dtype) for k in tensors}
        return {k: self._tensor(v, dtypes[k]) for k, v in tensors.items()}

    def _masks(self, masks: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
        return None if masks is None else {k: self._exact(v) for k, v in masks.items()}

    def step_arrays(self, batch: Batch) -> StepArrays:
        """What a step on `batch` takes from the host, as the framework's step takes it: moved
        into the framework here (NumPy, PyTorch), or by the compiled step's call (JAX)."""
        rows, cols, boxes = (
            None if m is None else self._exact(m) for m in (batch.rows, batch.cols, batch.boxes)
        )
        return StepArrays(self._exact(batch.idx), rows, cols, self._masks(batch.masks), boxes)

    def _gather(self, data: tuple[Any, Any], arrays: StepArrays, pad: int, fill: float):
        """The batch's images (augmented, padded by `pad` pixels of `fill`, then erased) and
        labels, from `data` (see `put_data`)."""
        x, y = data[0][arrays.idx], data[1][arrays.idx]
        if arrays.rows is not None:
            x = self.augment(x, arrays.rows, arrays.cols, pad, fill)
        if arrays.boxes is not None:
            x = self.erase(x, arrays.boxes)
        return x, y

    def images(self, data: Any, batch: Batch) -> np.ndarray:
        """The images (B, 1, 28, 28) a step on `batch` of `data` trains on: gathered,
        augmented and erased as the step does it, as NumPy."""
        x, _ = self.gather(data, self.step_arrays(batch), pad=batch.pad, fill=batch.fill)
        return np.asarray(x).copy()

    def _update_state(self, params: dict, grads: dict, buffers: dict, opt_state: Any, lr: Any):
        """The state after one step: trainable parameters moved by the optimizer, BatchNorm
        buffers replaced by the pass's updated ones."""
        trainable, _ = split_params(params, self.arch)
        trainable, opt_state = self.optimizer.update(trainable, grads, opt_state, lr)
        return {**params, **trainable, **buffers}, opt_state

    def _train_step(
        self, state: TrainState, data, arrays: StepArrays, lr, smoothing, pad: int, fill: float
    ):
        params, opt_state = state
        # The uncompiled pieces, so that JAX compiles the step as one program (nested jitted
        # functions measured 3% slower on the lab network).
        x, y = self._gather(data, arrays, pad, fill)
        loss, grads, logits, buffers = self._training_pass(
            params, x, y, masks=arrays.masks, label_smoothing=smoothing
        )
        state = self._update_state(params, grads, buffers, opt_state, lr)
        return state, loss, (logits.argmax(axis=1) == y).sum()

    def train_step(
        self, state: TrainState, data: Any, batch: Batch, lr: float
    ) -> tuple[TrainState, float, int]:
        """One SGD step on a batch of `data` (from `put_data`), augmented as the batch says
        -> (new state, mean loss, correct count). The state given is consumed: NumPy and
        PyTorch update it in place, JAX donates it to its compiled step (a step in parts,
        whose passes and update are compiled apart, donates nothing: its update makes new
        arrays and the old are freed when dropped)."""
        if len(batch.idx) > self.step_images:
            return self._train_step_in_parts(state, data, batch, lr)
        arrays = self.step_arrays(batch)
        state, loss, correct = self._step(
            state, data, arrays, self.scalar(lr), self.smoothing, pad=batch.pad, fill=batch.fill
        )
        loss, correct = self.to_host((loss, correct))
        return state, float(loss), int(correct)

    def _train_step_in_parts(
        self, state: TrainState, data: Any, batch: Batch, lr: float
    ) -> tuple[TrainState, float, int]:
        """A step on a batch too large to hold at once, of a network without batch statistics
        (the training loop refuses one with them): its parts' passes in turn, their gradients
        weighted by their share of the batch adding up to the whole batch's mean-loss
        gradient, then one update."""
        if self.arch.uses_batch_statistics or self.step_images < 1:
            raise ValueError("a step in parts needs a network without batch statistics")
        params, opt_state = state
        n, total, loss, correct = len(batch.idx), {}, 0.0, 0
        # Parts of half what fits: the sum and each part's gradients are held beside a pass.
        size = max(1, self.step_images // 2)
        for start in range(0, n, size):
            part = batch.part(start, start + size)
            arrays = self.step_arrays(part)
            x, y = self.gather(data, arrays, part.pad, part.fill)
            part_loss, grads, logits, _ = self.training_pass(params, x, y, masks=arrays.masks)
            share = len(part.idx) / n
            total = {k: share * g + total[k] if total else share * g for k, g in grads.items()}
            del grads
            part_loss, part_correct = self.to_host((part_loss, (logits.argmax(axis=1) == y).sum()))
            loss, correct = loss + share * float(part_loss), correct + int(part_correct)
        state = self.update_state(params, total, {}, opt_state, self.scalar(lr))
        return state, loss, correct

    def compile_step(self, state: TrainState, data: Any, batches: list[Batch]) -> None:
        """Compile the training step for the shapes of `batches` now, so that the training
        that follows times steps alone: a step of each on a throwaway copy of `state`
        (nothing to do where nothing compiles)."""
        if not self.compiles:
            return
        copy = self.init_state(self.params(state), self.optimizer_tensors(state))
        for batch in batches:
            copy, _, _ = self.train_step(copy, data, batch, 0.0)

    def traced_steps(
        self, state: TrainState, data: Any, batches: list[Batch], lr: float
    ) -> tuple[TrainState, list[dict], str]:
        """Train on `batches` under the framework's profiler -> (the state after them, the
        trace's events in Chrome's trace format, the compiled step as the framework's program
        text): only where the step compiles (`compiles`), for the profile's table of the
        compiled step by operation."""
        raise NotImplementedError(f"{self.name} compiles no step to trace")

    def training_pass(self, params: Any, x: Any, y: Any, masks: dict[str, Any]) -> tuple:
        """The compiled training-mode pass over framework arrays (a batch from `gather`) ->
        (mean loss, gradients of the trainable parameters, logits, updated buffers)."""
        return self._compiled_training_pass(
            params, x, y, masks=masks, label_smoothing=self.smoothing
        )

    # --- a pass's pieces as the training pass runs them, for the profile -------------------

    def over_rows(self, fn: Callable[..., R], *batched: Any) -> list[R]:
        """[fn(*parts, total)] for each range of a batch's rows that the training pass runs
        apart: `parts` is that range of each of `batched` (shared/parallel.py's rows_of) and
        `total` sums values over the ranges. Here one range, the whole batch, since the
        framework spreads each operation over the cores itself; NumPy splits the rows over
        threads."""
        return [fn(*batched, alone)]

    def chain_vjp(
        self, layers: tuple[Layer, ...], params: Any, x: Any, masks: Any, total: Total
    ) -> tuple:
        """The model's chain_vjp on a range of a batch's rows (see `over_rows`); `total`
        reaches the models that run ranges apart."""
        return self.model.chain_vjp(layers, params, x, masks)

    def init_state(
        self, params: Params, optimizer_tensors: OptimizerTensors | None = None
    ) -> TrainState:
        """Training state from canonical tensors and (optionally) the optimizer's state
        tensors: (tensors, optimizer state over the trainable parameters) in the framework."""
        params = self._copy(params)
        if optimizer_tensors is not None:
            optimizer_tensors = {b: self._copy(t) for b, t in optimizer_tensors.items()}
        return params, self.optimizer.init(split_params(params, self.arch)[0], optimizer_tensors)

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """Images x (N, 1, 28, 28) and labels y (N,) moved into the framework once per run
        (in JAX onto the device: a step then transfers only its indices)."""
        return self._array(x), self._exact(y)

    def predict(self, state: TrainState, x: np.ndarray) -> np.ndarray:
        """Logits (B, 10) of the state's tensors for images x (B, 1, 28, 28), in evaluation
        mode."""
        return np.asarray(self.predict_fn(state[0], self._array(x)))

    def params(self, state: TrainState) -> Params:
        """Canonical tensors of a state (parameters and buffers), as NumPy arrays."""
        return self._numpy(state[0])

    def optimizer_tensors(self, state: TrainState) -> OptimizerTensors:
        """The optimizer's state tensors (SGD's momentum; Adam's moments and step), by buffer
        then parameter, as NumPy arrays."""
        return {b: self._numpy(t) for b, t in self.optimizer.tensors(state[1]).items()}

    def activations(
        self, params: Params, x: np.ndarray, masks: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Every layer's output by layer name; in training mode when given `masks`."""
        return self._numpy(
            self.activations_fn(self._copy(params), self._array(x), masks=self._masks(masks))
        )

    def loss_and_grads(
        self, params: Params, x: np.ndarray, y: np.ndarray, masks: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, Params]:
        """Mean training-mode loss (a 0-d array of the dtype it was computed in) and the
        gradient of every trainable parameter."""
        value, grads = self._loss_and_grads(
            self._copy(params),
            self._array(x),
            self._exact(y),
            masks=self._masks(masks),
            label_smoothing=self.smoothing,
        )
        return np.asarray(value), self._numpy(grads)

    def input_grad(
        self, params: Params, x: np.ndarray, y: np.ndarray, masks: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Gradient of the training-mode loss with respect to the images x."""
        dx = self._input_grad(
            self._copy(params),
            self._array(x),
            self._exact(y),
            masks=self._masks(masks),
            label_smoothing=self.smoothing,
        )
        return np.asarray(dx)

    def loss_and_dlogits(
        self, logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """The loss layer alone, in the logits' own dtype: mean cross-entropy of logits (N, K)
        against labels (N,) with label smoothing, and its gradient dlogits (N, K)."""
        loss, dlogits = self.ops.softmax_cross_entropy(
            self._exact(logits), self._exact(labels), label_smoothing
        )
        return np.asarray(loss), np.asarray(dlogits)


# keep_freed_memory's settings of glibc's malloc: name -> (mallopt's parameter, value).
MALLOC_SETTINGS = {
    "arena_max": (-8, 1),  # M_ARENA_MAX: the main arena serves every thread
    "mmap_max": (-4, 0),  # M_MMAP_MAX: no request is mapped on its own; all come from the heap
    "trim_threshold": (-1, 2**30),  # M_TRIM_THRESHOLD: keep up to 1 GiB freed at the heap's top
}
# The same as glibc reads them from the environment when a process starts, before any thread:
# for processes whose threads start before our code runs (Ray's workers).
MALLOC_TUNABLES = ":".join(f"glibc.malloc.{k}={v}" for k, (_, v) in MALLOC_SETTINGS.items())


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next request instead of returning it to the
    system. By default every array above 128 KB is mapped fresh from the kernel and unmapped
    when freed, so each training step page-faults its activations and gradients back in: on
    the lab network that doubled a NumPy step at batch 128 (8,600 against 17,900 images/s,
    `python -m shared.benchmark --worker numpy lab 128 300`) and cost PyTorch a quarter. The
    memory stays the process's own: the freed arrays are reused, but a heap's free gaps are
    not returned, so the peak can be higher (JAX `strong` at batch 128: 680 -> 850-970 MB).

    Threads get arenas of their own, each at most 64 MiB, that map anything larger afresh
    whatever the settings: XLA's worker threads allocate `strong`'s 101 MB step buffer at
    batch 128, 26,000 page faults a step. One arena for every thread keeps it too (0 faults);
    this must run before a framework starts its threads, since a thread keeps the arena it
    first took. A Ray worker's threads start first, so a local Ray cluster starts its
    processes with MALLOC_TUNABLES instead (shared/grid.py). Elsewhere than glibc, nothing to
    do."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # musl has no mallopt
        return
    for parameter, value in MALLOC_SETTINGS.values():
        mallopt(parameter, value)


def torch_module(arch: Arch, tensors: Params, standardise: tuple[float, float] | None) -> Any:
    """The network as PyTorch's `nn.Sequential` (impl_torch.model.as_module, standardising raw
    pixels first where `standardise` is given) holding `tensors` in their dtype, in evaluation
    mode. Importing impl_torch leaves the caller's torch threads as they were."""
    import torch

    threads = torch.get_num_threads()
    try:
        from impl_torch.model import as_module
    finally:
        torch.set_num_threads(threads)
    module = as_module(arch, standardise)
    if float_dtype(tensors) == np.float64:
        module = module.double()  # a float64 network (from a .double() module) stays one
    state = {name: torch.from_numpy(np.array(value)) for name, value in tensors.items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def make_backend(
    impl: str, arch: Arch, dtype: Any = np.float32, hyperparams: Hyperparams | None = None
) -> Backend:
    """Import `impl_<impl>` and build its Backend (by default for plain SGD on plain
    cross-entropy, as evaluation needs); a missing framework affects that impl alone."""
    return backend_class(impl)(arch, np.dtype(dtype), hyperparams or Hyperparams())


def backend_class(impl: str) -> type[Backend]:
    """`impl_<impl>`'s Backend class, imported, unbuilt (what its class says, such as its
    reference_library, without a network); a UsageError where `impl` is none of ours or its
    framework is not installed."""
    if impl not in IMPLEMENTATIONS:
        raise UsageError(
            f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}"
        )
    keep_freed_memory()  # before the framework's import starts its threads
    try:
        module = importlib.import_module(f"impl_{impl}.backend")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {impl, "jaxlib", "optax"}:
            raise UsageError(
                f"--impl {impl}: {e.name} is not installed (run scripts/setup.sh); "
                "the other implementations still work"
            ) from None
        raise
    return module.Backend


def batched_logits(
    backend: Backend,
    state: Any,
    images: np.ndarray,
    tta: bool = False,
    batch_size: int | None = None,
) -> np.ndarray:
    """Logits (N, 10) for images (N, 1, 28, 28), computed in batches (by default as many as
    fit the memory bound, at most 1,000); with `tta`, the mean of the logits of each image
    and of its mirror image (test-time augmentation by flips)."""
    batch_size = batch_size or backend.logit_images
    logits = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        out = backend.predict(state, x)
        if tta:
            out = (out + backend.predict(state, np.ascontiguousarray(x[..., ::-1]))) / 2
        logits.append(out)
    return np.concatenate(logits)
