"""threefold: one network written three times (NumPy by hand, JAX, PyTorch), proven to compute
the same thing in training as in evaluation.

    import threefold

    network = threefold.from_torch(model)     # your nn.Module: its layers, its weights
    print(network.describe())                 # what each operation became
    report = threefold.crosscheck(network)    # every comparison, as data
    threefold.assert_equivalent(model)        # in your own tests: raises with the failing rows
    module = threefold.to_torch(network)      # a plain nn.Sequential with its weights
    network.to_onnx("model.onnx")             # ONNX (opset 20) taking raw [0, 1] pixels
    network.to_safetensors("model.safetensors")  # the weights, state_dict names, no pickle
    network = threefold.from_onnx("model.onnx")  # and back: an ONNX graph as a network

A network is also a spec or a preset (`threefold.network("conv8-relu-flatten-fc10")`), or a
trained run (`threefold.load("runs/jax-lab/checkpoint.npz")`, or a .safetensors or .onnx file
threefold wrote).

Every refusal is a `threefold.ThreefoldError` in one line (`UsageError` for an argument,
`DataError`, `CheckpointError`, `OutputError` for files); a failed proof is `NotEquivalent`,
an AssertionError.
"""

from shared.errors import CheckpointError, DataError, OutputError, ThreefoldError, UsageError
from shared.network import Mapped, Network
from shared.onnx_import import from_onnx
from shared.proof.rows import CheckResult
from shared.torch_import import from_torch
from threefold.api import (
    NotEquivalent,
    Report,
    assert_equivalent,
    crosscheck,
    load,
    network,
    to_torch,
)

__all__ = [
    "CheckResult",
    "CheckpointError",
    "DataError",
    "Mapped",
    "Network",
    "NotEquivalent",
    "OutputError",
    "Report",
    "ThreefoldError",
    "UsageError",
    "assert_equivalent",
    "crosscheck",
    "from_onnx",
    "from_torch",
    "load",
    "network",
    "to_torch",
]
