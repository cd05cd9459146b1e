"""The lab's questions, each a controlled comparison: variants of the defaults that differ in
one respect, trained alike in every implementation (run by shared/experiments.py, reported by
shared/experiments_report.py), and the targets the seed rows are held to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.spec import get_arch

# The lab's own setup, as far as the report shows: `randn * 0.01` weights, plain SGD on plain
# cross-entropy, whole batches of 10,000 images (its printed shapes), 15 epochs. Its learning
# rate is not shown; 0.1 is our assumption. Pixels scaled as ours (the report does not say).
LAB_SETUP = dict(
    init="lab",
    batch_size=10_000,
    lr=0.1,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    label_smoothing=0.0,
    schedule="constant",
    warmup=0,
    flip=False,
    tta=False,
    shift=0,
)


# The stronger preset (two conv blocks with BatchNorm), whose layers the BatchNorm, dropout and
# activation rows vary.
STRONG = "strong"
# Those rows train the larger network on a shorter budget, so that all three implementations
# can run them in under an hour; their seed spread is measured at the same budget.
SHORT = {"epochs": 5, "limit": 10_000}

# The preset past 93.5% (issue 26), whose rows train it with its own recipe.
DEEP = "deep"
# `deep` with its convolutions after the first paired into residual blocks (the second pair's
# shortcut a strided 1x1 projection): 2,176 parameters more, 0.5%.
RESIDUAL_DEEP = (
    "conv32b0-bn-relu-maxpool2-res(conv32b0-bn-relu-conv32b0-bn)-relu-"
    "res(conv64s2b0-bn-relu-conv64b0-bn)-relu-flatten-fc128-relu-dropout0.3-fc10"
)


@dataclass(frozen=True)
class Variant:
    label: str
    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    """One of the lab's questions: variants of the defaults, each trained alike."""

    title: str
    question: str
    variants: tuple[Variant, ...]
    budget: dict[str, Any] = field(default_factory=dict)  # changes every variant shares
    noise: str = "lab"  # the seed row whose spread judges a difference


def comparisons(
    epochs: int,
    budgets: tuple[int, ...],
    lab_batch: int,
    short: dict[str, Any],
    deep: dict[str, Any],
) -> list[Experiment]:
    """The lab's arguments, each as variants that differ from the defaults in one respect."""
    strong = get_arch(STRONG).spec
    on_short = dict(budget=short, noise=seed_row_label(STRONG, short))
    on_deep = dict(budget=deep, noise=seed_row_label(DEEP, deep))
    return [
        Experiment(
            "Initialisation",
            "Does He initialisation beat the lab's `randn * 0.01`?",
            (Variant("randn * 0.01", {"init": "lab"}), Variant("He (default)")),
        ),
        Experiment(
            "Convolution",
            "Does the conv layer help?",
            (Variant("without conv (`noconv`)", {"arch": "noconv"}), Variant("with conv (`lab`)")),
        ),
        Experiment(
            "Max-pooling",
            "Does 2x2 max-pooling after the conv help?",
            (
                Variant("without pooling (`lab`)"),
                Variant("with pooling (`pool`)", {"arch": "pool"}),
            ),
        ),
        Experiment(
            "Training setup",
            "The lab's training setup against the new defaults.",
            (
                Variant("the lab's setup", {**LAB_SETUP, "batch_size": lab_batch}),
                Variant("new defaults"),
            ),
        ),
        Experiment(
            "Epochs",
            "More epochs (each run with its schedule completed).",
            (
                *(
                    Variant(f"{e} epoch{'s' * (e != 1)}", {"epochs": e})
                    for e in budgets
                    if e != epochs
                ),
                Variant(f"{epochs} epochs (default)"),
            ),
        ),
        Experiment(
            "A stronger network",
            "How far past the lab's network do two conv blocks with BatchNorm, pooling and "
            "dropout get?",
            (Variant("`lab`"), Variant(f"`{STRONG}`", {"arch": STRONG})),
        ),
        Experiment(
            "BatchNorm",
            f"Does BatchNorm help the `{STRONG}` network?",
            (
                Variant("without BatchNorm", {"arch": _without(strong, "bn")}),
                Variant(f"with BatchNorm (`{STRONG}`)", {"arch": STRONG}),
            ),
            **on_short,
        ),
        Experiment(
            "Dropout",
            f"Does dropout help the `{STRONG}` network?",
            (
                Variant("without dropout", {"arch": _without(strong, "dropout")}),
                Variant(f"with dropout (`{STRONG}`)", {"arch": STRONG}),
            ),
            **on_short,
        ),
        Experiment(
            "Activation",
            f"ReLU, tanh or sigmoid after each layer of the `{STRONG}` network?",
            (
                *(Variant(fn, {"arch": strong.replace("relu", fn)}) for fn in ("sigmoid", "tanh")),
                Variant(f"relu (`{STRONG}`)", {"arch": STRONG}),
            ),
            **on_short,
        ),
        Experiment(
            "Residual connections",
            f"Do residual connections help the `{DEEP}` network at (nearly) equal parameters? "
            "Its convolutions after the first, paired into two residual blocks, the second "
            "block's shortcut a strided 1x1 projection.",
            (
                Variant("residual", {"arch": RESIDUAL_DEEP}),
                Variant(f"plain (`{DEEP}`)", {"arch": DEEP}),
            ),
            **on_deep,
        ),
        Experiment(
            "Random erasing",
            f"Does random erasing (p = 0.5, torchvision's defaults) help the `{DEEP}` network?",
            (
                Variant("random erasing", {"arch": DEEP, "erase": 0.5}),
                Variant(f"none (`{DEEP}`)", {"arch": DEEP}),
            ),
            **on_deep,
        ),
    ]


def _without(spec: str, kind: str) -> str:
    """`spec` with every token of `kind` (`bn`, `dropout`) left out."""
    return "-".join(t for t in spec.split("-") if not t.startswith(kind))


def seed_row_label(arch: str, budget: dict[str, Any]) -> str:
    """The seed table's name for `arch` trained on `budget` (the defaults if empty)."""
    return arch + "".join(
        f", {k} {v:,}" if isinstance(v, int | float) and not isinstance(v, bool) else f", {k} {v}"
        for k, v in budget.items()
    )


def budget_text(budget: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in budget.items())


def targets(deep: dict[str, Any]) -> dict[str, float]:
    """Test accuracy each implementation's mean over its seeds should reach, by seed row;
    `deep`'s row is the one trained on its recipe `deep`, whatever that recipe is."""
    return {"lab": 0.910, "pool": 0.915, STRONG: 0.930, seed_row_label(DEEP, deep): 0.935}


AGREEMENT = 0.003  # most the implementations' final test accuracies may differ by
