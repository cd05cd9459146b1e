"""Kinks: where the loss has no derivative (a ReLU's input at 0, a max-pool window's tie),
which round-off may decide differently in two implementations. The cross-check keeps its
float32 batches away from them (or, where no noise manages that, on the side of each that
every implementation agrees on), passes finite differences over them, and plants them on
purpose where the network keeps exact zeros exact. What a layer kind contributes is its
entry's `kinks` and `keeps_zeros` in shared/kinds.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np

from shared.backend import Backend
from shared.cost import Cost, largest_training_batch, network_cost
from shared.kinds import kind_of
from shared.spec import Arch, Params


def cancelled_biases(arch: Arch) -> frozenset[str]:
    """The biases of layers whose output only a layer normalising across the batch takes (a
    conv's bias before BatchNorm, which subtracts the batch mean the bias adds): their gradient
    is zero in exact arithmetic, and round-off in every implementation. Where a shortcut also
    takes that output (a block whose body starts with BatchNorm), the gradient is not zero."""
    takers = Counter(node.input for node in arch.nodes)  # a block's add takes its input too
    return frozenset(
        f"{node.input}.bias"
        for node in arch.nodes
        if kind_of(node.layer).batch_statistics
        and takers[node.input] == 1
        and f"{node.input}.bias" in arch.trainable
    )


def keeps_zeros_exact(arch: Arch) -> bool:
    """Whether a block of exact zeros stays exact zeros through the network (with zero biases),
    as every layer's kind says: after a BatchNorm's batch mean or a sigmoid's 1/2, equal values
    come from sums in orders that differ by implementation, and ties are decided by round-off."""
    return all(kind_of(node.layer).keeps_zeros for node in arch.nodes)


# A float32 pass starts, where one of a few noises manages it, from a batch whose every ReLU
# input and every max-pool window's gap between its two largest values is at least this share
# of the layer's scale away from a kink (measured in float64): round-off (~1e-7 of the scale)
# then cannot decide a ReLU or a window's maximum differently in two implementations, which
# would swap whole gradient terms, in any of their programs. Where none manages it, the
# implementations' forward passes are asked which side each kink is on (`away_from_kinks`).
KINK_MARGIN = 1e-6
# Among n kinks the nearest lies about 1/n of the scale away, so a batch of more than a few
# hundred thousand cannot be found 1e-6 from all of them by chance: `strong` has 47,168 per
# image, and at 32 images float32 rounding flips a unit and fails `grad input` at 2.9e-2.
KINKS_PER_BATCH = 400_000
BATCH_SIZE = 32  # the cross-check's batch for a network with few kinks


def kinks_per_image(arch: Arch) -> int:
    """How many kinks one image passes: every value at a "zero" kink (a ReLU's inputs), every
    window at a "tie" kink (a max-pool's windows)."""
    count = 0
    for node in arch.nodes:
        kinks = kind_of(node.layer).kinks
        if kinks is not None:
            values = kinks.values(node.layer, np.zeros((1, *node.shape)))
            count += values.size if kinks.at == "zero" else values[..., 0].size
    return count


def batch_size_for(arch: Arch, largest: int = BATCH_SIZE) -> int:
    """The cross-check's batch for `arch`: `largest` images, fewer where the float32 pass could
    not be put KINK_MARGIN away from every kink (at least 2, for BatchNorm), or where a
    float64 step would not fit the memory bound."""
    fits = largest_training_batch(crosscheck_cost(arch), np.float64)
    return max(2, min(largest, fits, KINKS_PER_BATCH // max(kinks_per_image(arch), 1)))


# The single pass holds every implementation's evaluation and training activations, its
# gradients and input gradient at once, and each call copies the parameters in: about three
# training steps' worth, and a margin.
CROSSCHECK_COPIES = 4


def crosscheck_cost(arch: Arch) -> Cost:
    """What one image of the cross-check costs: the network's cost, held CROSSCHECK_COPIES
    times over (shared/cost.py bounds a training step of it)."""
    cost = network_cost(arch.layers)
    return replace(
        cost,
        activations=CROSSCHECK_COPIES * cost.activations,
        unfolded=CROSSCHECK_COPIES * cost.unfolded,
        parameters=CROSSCHECK_COPIES * cost.parameters,
    )


def _kinks(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> Iterator[tuple]:
    """(at, values, scale) for every kink of a pass, as each layer's kind gives them: "zero"
    and a ReLU's inputs, or "tie" and a max-pool's windows (N, C, H', W', k*k); with the
    scale of the layer's input."""
    for node in arch.nodes:
        kinks = kind_of(node.layer).kinks
        if kinks is not None:
            before = x if node.input is None else acts[node.input]
            scale = float(np.abs(before).max()) or 1.0
            yield kinks.at, kinks.values(node.layer, before), scale


def kink_distances(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Every kink's distance, relative to its layer's scale, inf where it does not count: of
    each ReLU's input from 0 (N, C, H, W), and of each max-pool window's largest value from
    its second largest (N, C, H', W'). ReLU inputs that are exactly 0 in float64 do not count:
    they come from exact zeros (an erased box through a convolution whose bias is still 0),
    which every implementation computes as 0 and none passes a gradient through
    (ReLU'(0) = 0), and no noise can move. Windows whose maximum is an exact 0 do not count:
    after a ReLU those zeros take no gradient whichever wins, and the ReLU's own distance
    covers them. Nor do windows whose two largest values are exactly equal in float64: equal
    values come from equal inputs (the constant border a shift pads with), whose weight
    gradients are the same whichever of them takes it."""
    distances = []
    for at, values, scale in _kinks(arch, acts, x):
        if at == "zero":
            distances.append(np.where(values == 0, np.inf, np.abs(values)) / scale)
        else:
            top2 = np.sort(values, axis=-1)[..., -2:]
            tied = (top2[..., 1] == 0) | (top2[..., 1] == top2[..., 0])
            distances.append(np.where(tied, np.inf, top2[..., 1] - top2[..., 0]) / scale)
    return distances


def kink_margin(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> float:
    """How far a pass is from its nearest kink that counts, relative to the kink's layer's
    scale (see `kink_distances`)."""
    return _nearest(kink_distances(arch, acts, x))


def _nearest(distances: list[np.ndarray]) -> float:
    return min((float(d.min(initial=np.inf)) for d in distances), default=np.inf)


def kink_state(arch: Arch, acts: dict[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Which side of every kink a pass is on: each ReLU's input sign, each window's argmax."""
    return [
        values > 0 if at == "zero" else values.argmax(axis=-1)
        for at, values, _ in _kinks(arch, acts, x)
    ]


def away_from_kinks(
    backend64: Backend,
    arch: Arch,
    params: Params,
    x,
    masks,
    seed: int | tuple[int, ...],
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
    backends: Sequence[Backend] = (),
):
    """x plus the first of a few seeded noises (std 0.01) that puts the float64 training pass
    (on `augment(x)`, where a training step flips or shifts its images) at least KINK_MARGIN
    from every kink. Where none does, the one closest to it on which every one of `backends`
    (the implementations being compared, in x's dtype) puts its forward pass on the same side
    of every kink that counts; where none of them agree, the closest."""
    params64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in params.items()}
    seeds = (seed,) if isinstance(seed, int) else seed
    near = []  # (margin, candidate, the images the pass sees, which kinks count)
    for attempt in range(20):
        noise = np.random.default_rng([*seeds, 2, attempt]).normal(scale=1e-2, size=x.shape)
        candidate = (x + noise).astype(x.dtype)
        seen = (candidate if augment is None else augment(candidate)).astype(np.float64)
        distances = kink_distances(arch, backend64.activations(params64, seen, masks), seen)
        margin = _nearest(distances)
        if margin >= KINK_MARGIN:
            return candidate
        counted = [np.isfinite(d) for d in distances]
        near.append((margin, candidate, seen.astype(x.dtype), counted))
    near.sort(key=lambda tried: -tried[0])  # stable: the earlier attempt among equals
    for _, candidate, seen, counted in near:
        if sides_agree(backends, arch, params, seen, masks, counted):
            return candidate
    return near[0][1]


def sides_agree(
    backends: Sequence[Backend],
    arch: Arch,
    params: Params,
    x: np.ndarray,
    masks,
    counted: list[np.ndarray],
) -> bool:
    """Whether every backend's forward pass on x (N, C, H, W) in training mode is on the same
    side of every kink that `counted` marks (each ReLU input's sign, each max-pool window's
    argmax; as `kink_distances` lays them out) as the first backend's."""
    if len(backends) < 2:
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # a state a rate too high blew up
        sides = [kink_state(arch, b.activations(params, x, masks), x) for b in backends]
    return all(same_side(sides[0], side, counted) for side in sides[1:])


def same_side(
    a: list[np.ndarray], b: list[np.ndarray], counted: list[np.ndarray] | None = None
) -> bool:
    """Whether two passes are on the same side of every kink (from `kink_state`), or of
    those that `counted` marks."""
    if counted is None:
        return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    return all(np.array_equal(u[c], v[c]) for u, v, c in zip(a, b, counted, strict=True))
