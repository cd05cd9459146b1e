"""onnxruntime as a fourth witness: the network exported to ONNX (shared/onnx_export.py) and
run by onnxruntime, compared in evaluation mode with every implementation, layer by layer.

Two sessions run the graph with every layer's output exposed: `onnx` with onnxruntime's graph
optimisations disabled (the graph as written) and `onnx-opt` with all of them enabled. Exposing
a layer's output keeps onnxruntime from fusing that layer into the next, so a third session runs
the graph with the logits alone and all optimisations on, where a conv and the BatchNorm after
it are folded into one conv: that row measures what fusion does to the round-off.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from shared.backend import Backend
from shared.cost import evaluation_batch, network_cost
from shared.onnx_export import INPUT, OUTPUT, onnx_model
from shared.proof.rows import Compared
from shared.spec import Arch, Params

WITNESSES = ("onnx", "onnx-opt")


def session(model, optimise: bool):
    """An onnxruntime CPU session of `model`, its graph optimisations all on or all off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def missing_kernel(error: Exception) -> str | None:
    """The operator onnxruntime has no CPU kernel for (float64 Conv, say), if that is the
    error; None for any other."""
    found = re.search(r"NOT_IMPLEMENTED.*implementation for (\w+)\(", str(error))
    return found.group(1) if found else None


def onnx_rows(
    backends: dict[str, Backend], arch: Arch, params: Params, x: np.ndarray
) -> tuple[list[Compared], str | None]:
    """(rows comparing every implementation's evaluation-mode layer outputs on x (N, 1, 28,
    28) with onnxruntime's, None) or ([], why) when onnxruntime cannot run the graph in x's
    dtype (it has no float64 kernel for some operators)."""
    dtype = x.dtype
    try:
        every_layer = onnx_model(arch, params, dtype=dtype, every_layer=True)
        sessions = {
            "onnx": session(every_layer, False),
            "onnx-opt": session(every_layer, True),
            "fused": session(onnx_model(arch, params, dtype=dtype), True),
        }
    except Exception as error:  # onnxruntime raises its own types; a missing kernel is a note
        op = missing_kernel(error)
        if op is None:
            raise
        return [], f"onnxruntime has no {dtype} CPU kernel for {op}"
    evals = {name: b.activations(params, x) for name, b in backends.items()}
    return list(_rows(sessions, evals, arch, x)), None


def _rows(sessions: dict, evals: dict, arch: Arch, x: np.ndarray) -> Iterator[Compared]:
    layers = [node.layer for node in arch.nodes]
    names = [layer.name for layer in layers[:-1]] + [OUTPUT]
    for witness in WITNESSES:
        outputs = dict(zip(names, sessions[witness].run(names, {INPUT: x}), strict=True))
        for impl, acts in evals.items():
            for layer, value in zip(layers, names, strict=True):
                label = "logits" if value == OUTPUT else f"activation {layer.name}"
                yield Compared(
                    f"{label} (eval)", f"{impl}-{witness}", acts[layer.name], outputs[value]
                )
    (fused,) = sessions["fused"].run([OUTPUT], {INPUT: x})
    for impl, acts in evals.items():
        logits = acts[arch.layers[-1].name]
        yield Compared("logits (eval, logits-only graph)", f"{impl}-onnx-opt", logits, fused)


def onnx_logits(
    arch: Arch, params: Params, images: np.ndarray, standardise: tuple[float, float] | None = None
) -> np.ndarray:
    """onnxruntime's logits (N, 10) for images (N, 1, 28, 28) in float32, the graph exported
    with `standardise` and every optimisation on; in batches that fit the memory bound."""
    params = {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in params.items()}
    run = session(onnx_model(arch, params, standardise), True)
    images = images.astype(np.float32, copy=False)
    size = evaluation_batch(network_cost(arch.layers), np.dtype(np.float32))
    batches = [
        run.run([OUTPUT], {INPUT: images[i : i + size]})[0] for i in range(0, len(images), size)
    ]
    return np.concatenate(batches) if batches else np.zeros((0, 10), np.float32)
