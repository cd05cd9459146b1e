"""The comparisons: every pair of implementations on one training pass and on a lockstep
run, NumPy's gradients against finite differences, and a checkpoint's predictions. The first
three give rows (shared/proof/rows.py: `Compared`, and `Measured` for the lockstep's tensors,
compared step by step) for the caller to judge; the checkpoint's agreement, whose
predicted-class row counts differing classes, gives its verdicts itself."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from shared.backend import IMPLEMENTATIONS, Backend, batched_logits, make_backend
from shared.batches import training_batches
from shared.config import OPTIMIZER_BUFFERS, TrainConfig, learning_rate
from shared.data import FASHION_MNIST
from shared.layers import BatchNorm, Conv, Linear
from shared.parallel import alone
from shared.proof.kinks import away_from_kinks, cancelled_biases, kink_state, same_side
from shared.proof.onnx_witness import onnx_logits
from shared.proof.rows import (
    FD_STEP,
    TOLERANCES,
    CheckResult,
    Compared,
    Measured,
    compare,
    dtypes_of,
)
from shared.proof.settings import Setting
from shared.spec import Arch, Params, cast_params, layer_trainable, split_params


def summed_terms(
    reference: Backend,
    arch: Arch,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
) -> tuple[Params, Params]:
    """For every gradient a layer's backward sums over the batch and the positions, the sum of
    its terms' magnitudes, entry by entry; and the gradients; both by `reference` (NumPy's
    backward, float64). A convolution's or a linear layer's weight sums |dout| x |input|, its
    bias |dout| (its own backward run on those magnitudes); BatchNorm's weight |dout| x
    |xhat|, its bias |dout|.

    Two orders of summing n terms differ by up to about log2(n) unit round-offs of the terms'
    magnitudes, not of the sum: where the terms cancel, the sum is far smaller than they are.
    BatchNorm, which centres the gradient over the batch, makes the gradients of the layers
    before it such sums: in float32, `conv4-bn-tanh-flatten-bn-fc10`'s `grad bn1.bias`
    differed by 1.2e-4 of its family's size between XLA's order and NumPy's, over 25,088
    terms a channel (docs/CROSSCHECK.md)."""
    params = cast_params(params, arch, np.float64)
    outputs, douts, grads = reference.pass_parts(params, x, y, masks)
    terms = {}
    for node in arch.nodes:
        layer = node.layer
        if not isinstance(layer, Conv | Linear | BatchNorm):
            continue
        dout = np.abs(douts[layer.name])
        before = np.asarray(x if node.input is None else outputs[node.input], np.float64)
        if isinstance(layer, BatchNorm):
            weight, bias = layer_trainable(layer)
            ones, zeros = np.ones_like(params[weight]), np.zeros_like(params[bias])
            unit = {**params, weight: ones, bias: zeros}
            xhat, _ = reference.chain_vjp((layer,), unit, before, masks, alone)
            across = (0, *range(2, dout.ndim))  # all but the channels
            terms |= {weight: (dout * np.abs(xhat)).sum(across), bias: dout.sum(across)}
        else:
            pulled = reference.chain_vjp((layer,), params, np.abs(before), masks, alone)[1](dout)
            terms |= {name: pulled[name] for name in layer_trainable(layer)}
    return terms, grads


def round_off_sizes(
    terms: Params, grads: Params, params: Params, config: TrainConfig
) -> dict[str, dict]:
    """What a step's round-off in its gradient's sums (`summed_terms`) reaches, by optimizer
    buffer, then parameter: SGD's momentum takes the gradient whole (PyTorch's, without
    dampening), Adam's first moment (1 - beta1) of it, its second moment (1 - beta2) of the
    square of what it takes (the gradient, plus the weight decay for Adam's coupled form),
    whose round-off is 2 |that| times the gradient's; the step count none."""
    decay = config.weight_decay if config.optimizer == "adam" else 0.0
    shares = {
        "momentum": lambda t, name: t,
        "exp_avg": lambda t, name: (1 - config.beta1) * t,
        "exp_avg_sq": lambda t, name: (
            (1 - config.beta2) * 2 * np.abs(grads[name] + decay * params[name]) * t
        ),
    }
    return {
        buffer: {name: _largest_finite(share(t, name)) for name, t in terms.items()}
        for buffer, share in shares.items()
    }


def _largest_finite(values: np.ndarray | float) -> float:
    """The largest finite value (0.0 if none): a run that has left the finite numbers, which
    the lockstep compares only up to there, gives no size."""
    values = np.asarray(values, np.float64)
    return float(np.max(values, where=np.isfinite(values), initial=0.0))


def _pairs(results: dict[str, object]) -> Iterator[tuple[str, object, object]]:
    for a, b in itertools.combinations(results, 2):
        yield f"{a}-{b}", results[a], results[b]


def single_pass(
    backends: dict[str, Backend],
    arch: Arch,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
    terms: Params | None = None,
) -> Iterator[Compared]:
    """Rows for every layer's output in evaluation and in training mode, the logits the
    prediction path gives (validation, test, evaluate.py: its own function), the loss, every
    parameter gradient, the input gradient, and each dropout layer's mask against the shared
    one. A gradient is measured against its family's size, or, where larger, the largest
    sum of its terms' sizes (`terms`, from summed_terms)."""
    terms = terms or {}
    evals = {name: b.activations(params, x) for name, b in backends.items()}
    predicted = {name: b.predict(b.init_state(params), x) for name, b in backends.items()}
    trains = {name: b.activations(params, x, masks) for name, b in backends.items()}
    grads = {name: b.loss_and_grads(params, x, y, masks) for name, b in backends.items()}
    dx = {name: b.input_grad(params, x, y, masks) for name, b in backends.items()}
    for mode, acts in (("eval", evals), ("train", trains)):
        for pair, a, b in _pairs(acts):
            for node in arch.nodes:
                layer = node.layer
                label = "logits" if layer is arch.layers[-1] else f"activation {layer.name}"
                yield Compared(f"{label} ({mode})", pair, a[layer.name], b[layer.name])
    for pair, a, b in _pairs(predicted):
        yield Compared("logits (predict)", pair, a, b)
    for pair, (loss_a, grads_a), (loss_b, grads_b) in _pairs(grads):
        yield Compared("loss", pair, loss_a, loss_b)
        family = _family_size(grads_a.values())
        for name in grads_a:
            scale = max(family, _largest_finite(terms.get(name, 0.0)))
            yield Compared(f"grad {name}", pair, grads_a[name], grads_b[name], scale)
    for pair, a, b in _pairs(dx):
        yield Compared("grad input", pair, a, b)
    inputs = {node.layer.name: node.input for node in arch.nodes}
    for layer in arch.dropouts:
        before = inputs[layer.name]
        for name, acts in trains.items():
            x_in = x if before is None else acts[before]
            # A channel's mask covers its whole map (Dropout2d). Where the input is 0 the
            # output is 0 either way: count those as the shared mask.
            shared = np.broadcast_to(masks[layer.name], acts[layer.name].shape)
            applied = (acts[layer.name] != 0) | ((x_in == 0) & shared)
            yield Compared(f"dropout mask {layer.name}", f"{name}-shared", applied, shared)


def lockstep(
    backends: dict[str, Backend],
    arch: Arch,
    params: Params,
    batches,
    setting: Setting,
    resync: bool,
    reference: Backend | None = None,
    seed: int = 0,
    summing: Backend | None = None,
) -> tuple[int, list[Compared | Measured]]:
    """Train from the same start on the same batches; compare losses, every tensor
    (parameters and BatchNorm's running statistics) and the optimizer's state (SGD's momentum,
    Adam's moments and step) after every step. With `resync`, each step starts every
    implementation from the first one's state, so a difference is that step's own.

    Why float32 resyncs: a ReLU input within float32 round-off of zero (about 1e-6; one in the
    20 default steps on real data) is on for one implementation and off for another, which
    changes a whole row of fc1's gradient; carried forward, that one rounding decision would
    be all the comparison measures. float64 carries the runs through without it. With a
    `reference` (a float64 NumPy backend), each step's images are also kept away from the
    kinks the way the single pass's are (`away_from_kinks`: or, where no noise manages it, on
    the side of each that every implementation's forward agrees on), from the state that step
    starts from, so that no single unit's rounding decides a row. With `summing` (a float64
    NumPy backend of the setting's; resynced runs only), an optimizer buffer is measured
    against what the round-off of that step's gradient sums reaches in it too, where larger
    (`round_off_sizes`), as the single pass measures the gradients.

    Returns how many steps are compared, and the rows: a run whose loss every implementation
    loses for good is compared over the steps before (`_steps_before_divergence`), its loss
    row then named `lockstep loss xK of N`.
    """
    config = setting.config
    steps, size = len(batches), len(batches[0][1])
    # The concatenated batches in order, augmented and masked as training would do it.
    plan = list(
        training_batches(
            steps * size,
            size,
            seed=0,
            epoch=0,
            fill=FASHION_MNIST.background(),
            flip=config.flip,
            shift=config.shift,
            erase=config.erase,
            shuffle=False,
            dropouts=arch.dropouts,
        )
    )
    rates = [
        learning_rate(step, steps, config.lr, config.schedule, setting.warmup_steps)
        for step in range(steps)
    ]
    if reference is not None:
        batches = each_step_away_from_kinks(
            reference, list(backends.values()), arch, params, batches, plan, rates, seed
        )
    x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    data = {name: backend.put_data(x, y) for name, backend in backends.items()}
    states = {name: backend.init_state(params) for name, backend in backends.items()}
    trainable = arch.trainable
    # Adam divides a gradient by its own root mean square plus eps: a gradient that is round-off
    # (~1e-6 in float32, as large as eps) moves its parameter by a rate's worth in a direction
    # round-off decides. So in float32 a cancelled bias's value is left out of Adam's rows; its
    # gradient (single pass) and moments (below) are compared, and float64 compares it all.
    unsteered = cancelled_biases(arch) if resync and config.optimizer != "sgd" else frozenset()
    # Without momentum SGD has no buffers to compare: PyTorch keeps none.
    buffers = [b for b in OPTIMIZER_BUFFERS[config.optimizer] if config.momentum or b != "momentum"]
    losses: dict[str, list] = {name: [] for name in backends}
    finite: dict[str, list[bool]] = {name: [] for name in backends}  # each step's whole state
    measured: dict[tuple[str, str], Measured] = {}  # (pair, check) -> its row, in row order
    starts_from = params  # each step's, with resync
    for batch, lr in zip(plan, rates, strict=True):
        # The images as each step augments them: a wrong flip, shift or erasing box is named
        # here, before the loss and every tensor it moves.
        images = {name: backend.images(data[name], batch) for name, backend in backends.items()}
        for pair, images_a, images_b in _pairs(images):
            _row(measured, pair, "lockstep images").add(images_a, images_b, 0.0)
        reached: dict[str, dict] = {}
        if summing is not None and resync:  # from the state every implementation started at
            first = images[next(iter(backends))]
            with np.errstate(over="ignore", invalid="ignore"):  # a run past the finite numbers
                terms, grads = summed_terms(
                    summing, arch, starts_from, first, y[batch.idx], batch.masks
                )
            reached = round_off_sizes(terms, grads, starts_from, config)
        step = {}
        for name, backend in backends.items():
            states[name], loss, _ = backend.train_step(states[name], data[name], batch, lr)
            step[name] = backend.params(states[name]), backend.optimizer_tensors(states[name])
            losses[name].append(loss)
            finite[name].append(_finite(*step[name]))
        # Each step is compared as it ends and not kept: the run's memory does not grow with
        # its steps. Each tensor against its family's size at this step (see Measured).
        for pair, (tensors_a, optimizer_a), (tensors_b, optimizer_b) in _pairs(step):
            weights = _family_size(tensors_a[name] for name in trainable)
            scales = {b: _family_size(optimizer_a[b][name] for name in trainable) for b in buffers}
            for name in params:
                if name not in unsteered:
                    scale = weights if name in trainable else 0.0
                    row = _row(measured, pair, f"lockstep {name}")
                    row.add(tensors_a[name], tensors_b[name], scale)
                if name not in trainable:
                    continue
                for buffer in buffers:
                    scale = max(scales[buffer], reached.get(buffer, {}).get(name, 0.0))
                    row = _row(measured, pair, f"lockstep {buffer} {name}")
                    row.add(optimizer_a[buffer][name], optimizer_b[buffer][name], scale)
        if resync:
            starts_from, optimizer = step[next(iter(backends))]
            states = {
                name: backend.init_state(starts_from, optimizer)
                for name, backend in backends.items()
            }
    kept = _steps_before_divergence(losses, finite, steps)
    loss_check = f"lockstep loss x{steps}" if kept == steps else f"lockstep loss x{kept} of {steps}"
    # The loss keeps the run's scale: it is the log-sum-exp of the logits less the true
    # class's, whose round-off grows with the logits, not with the loss (float32's lab under
    # the fast recipe: 3e-5 of a step's own loss of 22, a third of the tolerance, against
    # 2e-7 of the run's largest); a step's error in the training shows in the tensors.
    rows: list[Compared | Measured] = []
    for pair, losses_a, losses_b in _pairs(losses):
        a, b = np.asarray(losses_a[:kept]), np.asarray(losses_b[:kept])
        rows.append(Compared(loss_check, pair, a, b))
        rows += [row.first(kept) for (of, _), row in measured.items() if of == pair]
    return kept, rows


def _row(rows: dict[tuple[str, str], Measured], pair: str, check: str) -> Measured:
    """The row of `check` between `pair`, made at its first step."""
    return rows.setdefault((pair, check), Measured(check, pair))


def _steps_before_divergence(
    losses: dict[str, list], finite: dict[str, list[bool]], steps: int
) -> int:
    """How many of a lockstep run's `steps` to compare: all, or those before the last steps when
    every implementation's loss is infinite or NaN to the end (a rate too high for the
    network, say), after which how NaN and infinity spread is each library's own (a mask
    times NaN, or a select). The cut is taken only where every implementation's state after
    the last step kept is `finite` throughout, the tensors no row compares included: a NaN
    that one implementation wrote there, and the others then started from (float32's
    restarts), is not cut away. A step that only some implementations lose is kept, and
    fails; so is a run lost from its first step, which the single pass shows too."""
    if len(losses) < 2:  # no pair to compare
        return steps
    values = np.array([[float(loss) for loss in run] for run in losses.values()])
    lost = ~np.isfinite(values).any(axis=0)  # (steps,): no implementation's loss finite
    kept = steps
    while kept > 0 and lost[kept - 1]:
        kept -= 1
    if kept in (0, steps) or not all(run[kept - 1] for run in finite.values()):
        return steps
    return kept


def _finite(tensors: dict, optimizer: dict) -> bool:
    """Whether every float tensor of a lockstep step's state is finite."""
    values = [*tensors.values(), *(t for buffer in optimizer.values() for t in buffer.values())]
    return all(np.isfinite(v).all() for v in map(np.asarray, values) if v.dtype.kind == "f")


def each_step_away_from_kinks(
    reference: Backend,
    backends: list[Backend],
    arch: Arch,
    params: Params,
    batches,
    plan,
    rates,
    seed,
):
    """The batches, each step's images re-noised until that step's float64 training pass
    (augmented and masked as the step will be, from the state the first of `backends` reaches
    by then, which every step restarts from) is KINK_MARGIN from every kink, where a few
    seeded noises manage it; else until all of `backends` agree on every kink's side."""
    leader = backends[0]
    state, chosen = leader.init_state(params), []
    for step, ((x, y), batch, lr) in enumerate(zip(batches, plan, rates, strict=True)):
        own = replace(batch, idx=np.arange(len(y)))  # this step's images alone

        def augment(candidate: np.ndarray, y=y, own=own) -> np.ndarray:
            data = reference.put_data(candidate.astype(np.float64), y)
            return np.asarray(
                reference.gather(data, reference.step_arrays(own), own.pad, own.fill)[0]
            )

        x = away_from_kinks(
            reference, arch, leader.params(state), x, own.masks, (seed, step), augment, backends
        )
        chosen.append((x, y))
        state, _, _ = leader.train_step(state, leader.put_data(x, y), own, lr)
    return chosen


def _family_size(tensors) -> float:
    """The largest magnitude in any of the tensors: their family's size for `compare` (0.0 if
    they hold none). A NaN is passed over (fmax): the tensor holding it fails its own row,
    and the rest of its family are still measured against the family's size, not each
    against itself."""
    largest = [np.fmax.reduce(np.abs(t), axis=None) for t in tensors if np.size(t)]
    return float(np.fmax.reduce(largest)) if largest else 0.0


# A central difference of a float64 loss L carries round-off of about 1e-16 |L| / FD_STEP =
# 1e-10 |L| whatever the gradient; judged against a gradient smaller than 1e-4 |L| that alone
# exceeds the 1e-6 tolerance (a sigmoid LeNet's input gradient of 2.5e-5 at L = 2.3 failed at
# 1.4e-5 while its three implementations agreed to 1e-15). So no row's scale is below
# FD_FLOOR |L|, ten times that: the noise stays a tenth of the tolerance, and a wrong gradient
# fails unless it is wrong by less than 1e-9 |L|.
FD_FLOOR = 1e-3


def finite_difference_grads(
    backend: Backend,
    arch: Arch,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    masks: dict[str, np.ndarray],
    per_tensor: int,
    seed: int,
) -> list[Compared]:
    """The analytic gradient (of `backend`) against central differences on `per_tensor` random
    entries of every trainable parameter and of x, in training mode. An entry whose step moves
    the pass across a kink (a ReLU's sign, a max-pool window's argmax) is passed over for
    another: the loss has no derivative there for a central difference to approximate. The
    parameters' rows are measured against the largest of their sampled gradients, and every
    row against no less than the loss's size times FD_FLOOR (see there)."""
    rng = np.random.default_rng(seed)
    loss, grads = backend.loss_and_grads(params, x, y, masks)
    tensors = {**split_params(params, arch)[0], "input": x}
    analytic_of = {**grads, "input": backend.input_grad(params, x, y, masks)}
    side = kink_state(arch, backend.activations(params, x, masks), x)
    sampled = {}
    for name, tensor in tensors.items():
        picks, numeric = [], []
        for flat in rng.permutation(tensor.size):
            losses = []
            for sign in (1, -1):
                shifted = tensor.copy()
                shifted.flat[flat] += sign * FD_STEP
                p, xx = (params, shifted) if name == "input" else ({**params, name: shifted}, x)
                if not same_side(side, kink_state(arch, backend.activations(p, xx, masks), xx)):
                    break
                losses.append(float(backend.loss_and_grads(p, xx, y, masks)[0]))
            else:
                picks.append(flat)
                numeric.append((losses[0] - losses[1]) / (2 * FD_STEP))
            if len(picks) == per_tensor:
                break
        sampled[name] = analytic_of[name].flat[picks], np.array(numeric)
    floor = FD_FLOOR * abs(float(loss))
    scale = max(_family_size(a for name, (a, _) in sampled.items() if name != "input"), floor)
    return [
        Compared(
            f"finite-diff {name}", f"{backend.name}-fd", a, b, floor if name == "input" else scale
        )
        for name, (a, b) in sampled.items()
    ]


def checkpoint_agreement(
    params: Params,
    arch: Arch,
    images: np.ndarray,
    impls: tuple[str, ...] = IMPLEMENTATIONS,
    onnx: bool = False,
) -> list[CheckResult]:
    """Load the same weights into every implementation (float32), and with `onnx` into
    onnxruntime (the exported graph, all optimisations on), and compare test logits and
    predicted classes. A differing argmax counts only where neither side has a near-tie:
    top-two logits closer than the float32 tolerance times the logits' scale."""
    tolerance = TOLERANCES[("float32", "pass")]
    logits = {}
    for impl in impls:
        backend = make_backend(impl, arch)
        logits[impl] = batched_logits(backend, backend.init_state(params), images)
    if onnx:
        logits["onnx-opt"] = onnx_logits(arch, params, images)
    results = []
    for pair, a, b in _pairs(logits):
        results.append(
            CheckResult(
                "float32",
                arch.name,
                "checkpoint",
                "checkpoint logits",
                pair,
                *compare(a, b),
                tolerance,
                dtypes_of(a, b),
                "float32",
            )
        )
        differ = a.argmax(axis=1) != b.argmax(axis=1)
        scale = max(np.abs(a).max(), np.abs(b).max())
        near_tie = np.zeros(len(a), dtype=bool)
        for side in (a, b):
            top2 = np.sort(side, axis=1)[:, -2:]
            near_tie |= (top2[:, 1] - top2[:, 0]) <= tolerance * scale
        unexplained = int((differ & ~near_tie).sum())
        results.append(
            CheckResult(
                "float32",
                arch.name,
                "checkpoint",
                f"checkpoint argmax ({int(differ.sum())}/{len(a)} differ)",
                pair,
                float(unexplained),
                unexplained / len(a),
                0.0,
            )
        )
    return results
