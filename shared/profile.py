"""Where a training step's time goes, phase by phase and layer by layer, in each
implementation: `python scripts/benchmark.py --profile`.

Each phase runs on its own, the framework's way (compiled for JAX), on the batches training
uses, and is timed to completion (JAX dispatches asynchronously, so its results are awaited).
A JAX step compiles all phases into one program, which fuses across their borders: the step
can take less than its phases' sum, and the difference is reported rather than hidden.
Layers are timed the same way, each on its own but a ReLU with the max-pool over its output,
which NumPy's and JAX's passes run as one (shared.layers.pass_steps). Where the step compiles
(JAX), a trace of it gives its own operations as XLA compiled them, each under its layer.
"""

from __future__ import annotations

import platform
import re
import resource
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import numpy as np

from shared.backend import Backend, make_backend
from shared.batches import Batch, steady_batches
from shared.config import TrainConfig
from shared.layers import Layer, pass_steps, step_name
from shared.parallel import joined
from shared.spec import get_arch, init_params


class LayerTimer(NamedTuple):
    """One step's (a layer, or a ReLU with its max-pool) two timed functions and the arguments
    they run on."""

    name: str
    forward: Callable[[Any, Any], Any]
    forward_and_backward: Callable[[Any, Any, Any], Any]
    params: Any
    x: Any
    dout: Any


# Seconds of training steps, after the first, before a timed worker starts timing.
WARMUP_SECONDS = 2.0

PHASES = (
    "host to framework",
    "gather + augment",
    "forward",
    "backward",
    "optimizer update",
    "framework to host",
)


def _clock(fn: Callable[[], Any], wait: Callable[[Any], Any]) -> tuple[float, Any]:
    """Seconds until fn's result is computed (`wait` awaits JAX's), and the result."""
    start = time.perf_counter()
    out = wait(fn())
    return time.perf_counter() - start, out


def step_phases(
    backend: Backend, forward: Callable[..., Any], state: Any, data: Any, batch: Batch, lr: float
) -> dict:
    """Seconds of each phase of one step on `batch`, each run as the backend's step runs it
    (compiled where the framework compiles) and awaited. The forward is `forward`, the
    network's compiled pass_forward: as the training pass runs it, keeping what the
    backward needs (PyTorch's autograd graph, NumPy's caches, on the threads its pass splits
    the batch over); NumPy and PyTorch update `state` in place, JAX's update is discarded."""
    params, opt_state = state
    clock = partial(_clock, wait=backend.wait)
    seconds = {}
    seconds["host to framework"], (arrays, rate) = clock(
        lambda: (backend.moved(backend.step_arrays(batch)), backend.scalar(lr))
    )
    seconds["gather + augment"], (x, y) = clock(
        lambda: backend.gather(data, arrays, batch.pad, batch.fill)
    )
    masks = arrays.masks
    seconds["forward"], _ = clock(lambda: forward(params, x, masks))
    both, (loss, grads, logits, buffers) = clock(
        lambda: backend.training_pass(params, x, y, masks=masks)
    )
    seconds["backward"] = max(both - seconds["forward"], 0.0)
    seconds["optimizer update"], _ = clock(
        lambda: backend.update_state(params, grads, buffers, opt_state, rate)
    )
    seconds["framework to host"], _ = clock(
        lambda: (float(loss), int((np.asarray(logits).argmax(axis=1) == np.asarray(y)).sum()))
    )
    return seconds


def pass_forward(backend: Backend, layers: tuple[Layer, ...]) -> Callable[..., list]:
    """(params, x, masks) -> the output of `layers` from x, computed as the training pass
    computes it (keeping what its backward needs), for each range of the batch's rows that
    the pass runs apart (one in JAX and PyTorch; NumPy's threads'). Uncompiled."""

    def forward(params, x, masks):
        def rows_forward(x, masks, total):
            return backend.chain_vjp(layers, params, x, masks, total)[0]

        return backend.over_rows(rows_forward, x, masks)

    return forward


def pass_forward_and_backward(backend: Backend, layers: tuple[Layer, ...]) -> Callable[..., list]:
    """(params, x, dout, masks) -> (output, pullback of dout) of `layers`, as pass_forward."""

    def forward_and_backward(params, x, dout, masks):
        def rows_pass(x, masks, dout, total):
            # The output too, as training hands it on: XLA drops work whose result nothing
            # returns, and a pullback that keeps only its inputs (a convolution's) leaves
            # the forward unused. Without it JAX's layers' backward on strong at batch 128
            # summed 59.8 ms, against 89.5 with it (docs/PERFORMANCE.md).
            out, pullback = backend.chain_vjp(layers, params, x, masks, total)
            return out, pullback(dout)

        return backend.over_rows(rows_pass, x, masks, dout)

    return forward_and_backward


def layer_timers(backend: Backend, params: Any, x: Any, masks: Any) -> list[LayerTimer]:
    """For each step of the training pass (shared.layers.pass_steps), its forward and its
    forward-and-backward (the output and the pullback of every input, the step's input
    included), each as the training pass runs it (compiled on its own in JAX; NumPy's on the
    threads its pass splits the batch over), with the arguments a training pass gives that
    step from images x (N, 1, 28, 28) and the step's dropout masks. Each timed call hands its
    work to NumPy's threads, about 0.1 ms that a pass pays once: NumPy's small layers read
    high by that much."""
    timers = []
    for step in pass_steps(backend.arch.layers):
        forward = partial(backend.compile(pass_forward(backend, step)), masks=masks)
        both = partial(backend.compile(pass_forward_and_backward(backend, step)), masks=masks)
        # Joined here, untimed: a pass hands each range of rows' output to the same range.
        out = joined(backend.wait(forward(params, x)))
        dout = out * 0 + 1  # a gradient of the output's shape, type and framework
        timers.append(LayerTimer(step_name(step), forward, both, params, x, dout))
        x = out
    return timers


def layer_seconds(backend: Backend, timers: list[LayerTimer]) -> dict[str, float]:
    """Seconds of each layer's forward and backward (forward and backward run together, less
    the forward alone)."""
    clock = partial(_clock, wait=backend.wait)
    seconds = {}
    for t in timers:
        forward, _ = clock(lambda t=t: t.forward(t.params, t.x))
        both, _ = clock(lambda t=t: t.forward_and_backward(t.params, t.x, t.dout))
        seconds[f"{t.name} forward"] = forward
        seconds[f"{t.name} backward"] = max(both - forward, 0.0)
    return seconds


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB: its own memory's high-water mark (VmHWM).
    Not ru_maxrss, which a process started by fork and exec carries over from its parent:
    every benchmark worker reported benchmark.py's own 352 MB, one alone 74."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere than Linux


def cpu_name() -> str:
    """The processor's model name as `lscpu` gives it (timings are only comparable on one)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    family, model = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
    return f"{name} (family {family}, model {model}), {fields.get('CPU(s)', '?').strip()} CPUs"


def timing_setup(
    impl: str, arch_name: str, batch_size: int, flip: bool
) -> tuple[Backend, Any, Any, Iterator[Batch]]:
    """What a timing worker steps: a backend of the network with train.py's defaults, its
    seeded initial state, the training images moved in, and an endless stream of full batches
    of `batch_size` (flipped when `flip`)."""
    from shared.data import load_dataset

    config = TrainConfig(impl=impl, arch=arch_name)
    arch = get_arch(arch_name)
    data = load_dataset()
    backend = make_backend(impl, arch, config.dtype, config.hyperparams)
    state = backend.init_state(init_params(arch, config.init, config.seed))
    train_data = backend.put_data(data.train.x, data.train.y)
    n, fill = len(data.train), data.background
    return backend, state, train_data, steady_batches(n, batch_size, fill, arch.dropouts, flip)


def profile(impl: str, arch_name: str, batch_size: int, steps: int) -> dict:
    """Median seconds per phase over `steps` steps, the median whole step as training runs
    it, and per layer; this runs in a worker process of its own. Flips as train.py's
    defaults have them, so the augmentation shows."""
    flip = TrainConfig().flip
    backend, state, train_data, stream = timing_setup(impl, arch_name, batch_size, flip)
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    whole, layers = [], {}
    batch = next(stream)
    # On copies of the weights (JAX donates a state's to the step that follows), with the
    # first batch's images and masks: a layer's time does not depend on the values.
    arrays = backend.moved(backend.step_arrays(batch))
    x, _ = backend.gather(train_data, arrays, batch.pad, batch.fill)
    params, _ = backend.init_state(backend.params(state))
    timers = layer_timers(backend, params, x, arrays.masks)
    forward = backend.compile(pass_forward(backend, backend.arch.layers))
    for i in range(steps + 5):  # the first five compile and warm up
        batch = next(stream)
        seconds = step_phases(backend, forward, state, train_data, batch, 0.01)
        start = time.perf_counter()
        state, _, _ = backend.train_step(state, train_data, batch, 0.01)
        step = time.perf_counter() - start
        by_layer = layer_seconds(backend, timers)
        if i >= 5:
            whole.append(step)
            for p in PHASES:
                phases[p].append(seconds[p])
            for k, v in by_layer.items():
                layers.setdefault(k, []).append(v)
    result = {
        "impl": impl,
        "batch_size": batch_size,
        "steps": steps,
        "phases": {p: statistics.median(v) for p, v in phases.items()},
        "step": statistics.median(whole),
        "layers": {k: statistics.median(v) for k, v in layers.items()},
    }
    if backend.compiles and batch_size <= backend.step_images:
        # The layers above compile one by one, and XLA compiles the step as one program,
        # fusing across layers and overlapping operations: the trace shows the step's own.
        # (A batch too large to hold at once runs as a step in parts, compiled apart.)
        traced = [next(stream) for _ in range(TRACED_STEPS)]
        _, events, program = backend.traced_steps(state, train_data, traced, 0.01)
        result["ops"] = step_by_operation(events, program, len(traced))
        result["traced_steps"] = len(traced)
    return result


# Steps traced for the table of a compiled step (JAX's) by operation.
TRACED_STEPS = 10

# What an operation computes, by the opcodes in it (a fusion's, in the computation it calls);
# with none of them it is element-wise work.
KINDS = (
    "convolution",
    "dot",
    "reduce",
    "reduce-window",
    "select-and-scatter",
    "scatter",
    "gather",
    "concatenate",
    "dynamic-update-slice",
    "pad",
    "transpose",
)
# Operations that run others (a loop's body), whose time the trace gives apart.
CONTAINERS = ("while", "conditional", "call")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
# A layer's name scope in an operation's source: jvp(conv2) forward, transpose(jvp(conv2))
# its backward (the pullback is the forward's linearisation, transposed).
_SCOPE = re.compile(r"(transpose\()?jvp\(([^()]+)\)")


def program_ops(program: str) -> dict[str, dict]:
    """A compiled XLA program's instructions (HLO text) by name -> {"opcode", "shape" (its
    output's, with layout), "computes" (a fusion: the KINDS in the computation it calls, or
    "element-wise"; another instruction: its opcode), "scope" (the layer's name scope in the
    source of the JAX operation it came from, see scope_of), "also" (a fusion: the other
    scopes of the instructions fused into it)}."""
    inside: dict[str, list[tuple[str, str]]] = {}  # computation -> its (opcode, scope)s
    ops, computation = {}, ""
    for line in program.splitlines():
        if header := re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line):
            computation = header[1]
            inside[computation] = []
        elif found := _INSTRUCTION.match(line):
            name, shape, opcode, rest = found.groups()
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            source = re.search(r'op_name="([^"]*)"', rest)
            scope = scope_of(source[1] if source else "")
            inside[computation].append((opcode, scope))
            ops[name] = {"opcode": opcode, "shape": shape, "scope": scope}
            ops[name]["calls"] = calls[1] if calls else None
    for op in ops.values():
        called = inside.get(op.pop("calls"), [])
        kinds = {opcode for opcode, _ in called}
        op["computes"] = (
            ", ".join(k for k in KINDS if k in kinds) or "element-wise"
            if op["opcode"] == "fusion"
            else op["opcode"]
        )
        layers = dict.fromkeys(scope[0] for _, scope in called if scope[0])
        op["also"] = [layer for layer in layers if layer != op["scope"][0]]
    return ops


def scope_of(source: str) -> tuple[str, str]:
    """An operation's source (its op_name) -> (the name scope of the pass step it came from,
    "forward" or "backward"), or ("", "") outside any (the data's gather, the loss, the
    optimizer). A fusion's source is its root's, so work of another layer fused into it
    counts under the root's layer."""
    scope = _SCOPE.search(source)
    if not scope:
        return "", ""
    return scope[2], "backward" if scope[1] else "forward"


def step_by_operation(events: list[dict], program: str, steps: int) -> list[dict]:
    """Milliseconds a step of each operation of a compiled step, from the trace `events`
    (Chrome's format, microseconds) of `steps` steps of `program` (HLO text), slowest first,
    each with the layer (a step of shared.layers.pass_steps) and pass its source names.
    XLA's own convolution (a convolution outside any fusion, which YNNPACK's fusions do
    not take) hands its work to other threads: the trace times its launch alone
    ("launch_only"; seen of convolutions only)."""
    module = re.match(r"HloModule ([^\s,]+)", program)[1]
    ops = program_ops(program)
    seconds: Counter[str] = Counter()
    for event in events:
        name = event.get("name", "")
        if (
            event.get("ph") == "X"
            and event.get("args", {}).get("hlo_module") == module
            and name in ops
            and ops[name]["opcode"] not in CONTAINERS
        ):
            seconds[name] += event["dur"] / 1e6
    if not seconds:
        raise ValueError(f"the trace holds no operation of the program {module}")
    rows = []
    for name, total in seconds.most_common():
        op = ops[name]
        layer, direction = op["scope"]
        rows.append(
            {
                "op": name,
                "ms": 1e3 * total / steps,
                "layer": layer,
                "pass": direction,
                "also": op["also"],
                "computes": op["computes"],
                "shape": op["shape"],
                "launch_only": op["opcode"] == "convolution",
            }
        )
    return rows


def operation_markdown(row: dict, top: int = 15) -> str:
    """Two tables of a profile row's compiled step's operations: milliseconds a step of each
    layer (layer_names) forward and backward, summed over its operations (a fusion under
    its root's layer), and of the `top` slowest operations, then every one whose launch
    alone the trace times."""
    ops, names = row["ops"], layer_names(row)
    total = sum(o["ms"] for o in ops)
    by_layer: Counter[tuple[str, str]] = Counter()
    for o in ops:
        by_layer[o["layer"], o["pass"]] += o["ms"]
    outside = "(outside the layers)"
    lines = ["| layer | forward | backward | both | share |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        f, b = by_layer[name, "forward"], by_layer[name, "backward"]
        lines.append(f"| {name} | {f:.3f} | {b:.3f} | {f + b:.3f} | {100 * (f + b) / total:.1f}% |")
    # The batch's gather, the loss, the optimizer (and any scope not a step's, if one were).
    rest = sum(ms for (layer, _), ms in by_layer.items() if layer not in names)
    lines.append(f"| {outside} | | | {rest:.3f} | {100 * rest / total:.1f}% |")
    lines += [
        "",
        "| operation | ms a step | share | layer | pass | computes | output |",
        "| --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    shown = ops[:top] + [o for o in ops[top:] if o["launch_only"]]
    for o in shown:
        name = o["op"] + (" (XLA's own: its launch alone)" if o["launch_only"] else "")
        also = f" (with {', '.join(o['also'])} fused in)" if o["also"] else ""
        layer = (o["layer"] or outside) + also
        lines.append(
            f"| {name} | {o['ms']:.3f} | {100 * o['ms'] / total:.1f}% | {layer} "
            f"| {o['pass']} | {o['computes']} | `{o['shape']}` |"
        )
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """One table: milliseconds per phase for each implementation and batch size."""
    head = "| impl | batch | " + " | ".join(PHASES) + " | sum of phases | whole step |"
    lines = [head, "|" + " --- |" * 2 + " ---: |" * (len(PHASES) + 2)]
    for r in rows:
        ms = [1e3 * r["phases"][p] for p in PHASES]
        cells = " | ".join(f"{v:.3f}" for v in ms)
        lines.append(
            f"| {r['impl']} | {r['batch_size']} | {cells} | {sum(ms):.3f} | {1e3 * r['step']:.3f} |"
        )
    return "\n".join(lines)


def layer_names(row: dict) -> list[str]:
    """The steps of the pass a profile's row times, in order (`relu1+pool1`, ...)."""
    return list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in row["layers"]))


def layer_markdown(rows: list[dict]) -> str:
    """Rows of one batch size: milliseconds forward and backward of each layer, and its share
    of the layers' sum, an implementation a column group."""
    names = layer_names(rows[0])
    totals = [sum(r["layers"].values()) for r in rows]
    head = "| layer | " + " | ".join(f"{r['impl']} forward | backward | share" for r in rows) + " |"
    lines = [head, "| --- |" + " ---: |" * (3 * len(rows))]
    for name in [*names, "all layers"]:
        cells = []
        for r, total in zip(rows, totals, strict=True):
            if name == "all layers":
                f = sum(v for k, v in r["layers"].items() if k.endswith(" forward"))
                b = total - f
            else:
                f, b = r["layers"][f"{name} forward"], r["layers"][f"{name} backward"]
            cells.append(f"{1e3 * f:.3f} | {1e3 * b:.3f} | {100 * (f + b) / total:.1f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path) -> None:
    """Stacked bars: a step's phases per implementation (and batch size), and beside them
    the layers forward and backward of each implementation at the first batch size."""
    from shared.plots import plt, save_figure

    fig, (ax, by_layer) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['impl']}\nbatch {r['batch_size']}" for r in rows]
    bottom = np.zeros(len(rows))
    for phase in PHASES:
        ms = np.array([1e3 * r["phases"][phase] for r in rows])
        ax.bar(labels, ms, bottom=bottom, label=phase)
        bottom += ms
    ax.scatter(
        labels,
        [1e3 * r["step"] for r in rows],
        color="black",
        marker="_",
        s=400,
        label="whole step",
        zorder=3,
    )
    ax.set(ylabel="milliseconds per step", title="one training step, by phase")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    first = [r for r in rows if r["batch_size"] == rows[0]["batch_size"]]
    names = layer_names(first[0])
    height = 0.8 / len(first)
    for i, r in enumerate(first):
        y = np.arange(len(names)) + i * height
        f = np.array([1e3 * r["layers"][f"{n} forward"] for n in names])
        b = np.array([1e3 * r["layers"][f"{n} backward"] for n in names])
        by_layer.barh(y, f, height, label=f"{r['impl']} forward", color=f"C{i}", alpha=0.5)
        by_layer.barh(y, b, height, left=f, label=f"{r['impl']} backward", color=f"C{i}")
    by_layer.set_yticks(np.arange(len(names)) + 0.4 - height / 2, names)
    by_layer.invert_yaxis()
    by_layer.set(xlabel="milliseconds", title=f"by layer, batch {rows[0]['batch_size']}")
    by_layer.legend(fontsize=7)
    save_figure(fig, path)
