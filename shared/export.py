"""The export.py command: a checkpoint's network out as an ONNX graph and its weights as
.safetensors, each file checked by reading it back before the command says it is done."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from shared.backend import batched_logits, make_backend
from shared.cli import add_data_dir_flag, run_cli
from shared.data import data_files, installed_data_dir, load_test_set
from shared.errors import CheckpointError, OutputError, ThreefoldError, UsageError, say
from shared.io import staged
from shared.network import Network, load_network
from shared.onnx_export import OPSET, require_onnx
from shared.onnx_file import external_files
from shared.onnx_import import from_onnx
from shared.outputs import check_out_files
from shared.proof.onnx_witness import onnx_logits
from shared.proof.rows import TOLERANCES, compare
from shared.spec import is_onnx_file
from shared.typed import parse_once, path_type
from shared.weights_file import read_network_file


def raw_test_images(data_dir: str | None) -> tuple[np.ndarray, str]:
    """(images (N, 1, 28, 28) as the exported graph takes them, what they are): the test set
    of --data-dir (whose problems are the user's to hear), else of the usual places where
    installed, else 256 seeded random images in [0, 1]."""
    if data_dir is None and installed_data_dir() is None:
        images = np.random.default_rng(0).random((256, 1, 28, 28), dtype=np.float32)
        return images, "256 seeded random images (the test set is not installed)"
    data = load_test_set(data_dir, pixels="raw")  # the training files are not needed
    return data.test.x, f"{len(data.test.x):,} test images"


def reference_logits(network: Network, images: np.ndarray, source: str) -> np.ndarray:
    """The PyTorch implementation's logits (N, 10) (the three agree; it is the quickest to
    evaluate on a CPU) on `images` (raw pixels) standardised as the network was trained;
    refused, naming `source`, where they leave float32's range (nothing could verify it)."""
    mean, std = network.standardise or (0.0, 1.0)
    backend = make_backend("torch", network.arch)
    with np.errstate(over="ignore", invalid="ignore"):
        logits = batched_logits(backend, backend.init_state(network.tensors), (images - mean) / std)
    if not np.isfinite(logits).all():
        raise CheckpointError(
            f"{source}: its weights give non-finite logits on the images that would verify "
            "the graph (beyond float32's range); nothing written"
        )
    return logits


def verify(written: Network, images: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """(max |logit difference| relative to the logits' scale, images whose predicted class
    differs) between onnxruntime running the graph as written and read back (`written`) on
    `images` (raw pixels) and the `expected` logits."""
    got = onnx_logits(written.arch, written.tensors, images, written.standardise)
    _, relative = compare(got, expected)
    return relative, int((got.argmax(1) != expected.argmax(1)).sum())


def _verified(graph: Path, images: np.ndarray, expected: np.ndarray, label: str) -> str:
    """How closely onnxruntime running `graph` on `images` (raw pixels) gives the `expected`
    logits, as a line to print; a ThreefoldError naming `label` beyond float32's tolerance."""
    relative, differ = verify(from_onnx(graph, "export.py"), images, expected)
    tolerance = TOLERANCES[("float32", "pass")]
    if not relative <= tolerance:
        raise ThreefoldError(
            f"{label}: onnxruntime's logits are {relative:.1e} from PyTorch's, over the "
            f"tolerance {tolerance:.0e}, and {differ} predicted classes differ; nothing written"
        )
    return (
        f"logits within {relative:.1e} of PyTorch's (tolerance {tolerance:.0e}), "
        f"{differ} predicted classes differ"
    )


def _check_read_back(read: Network, network: Network, path) -> None:
    """Refuse weights that read back other than the network written (a writer racing this
    one, a disk that changed them)."""
    same = read.arch.name == network.arch.name and read.standardise == network.standardise
    same = same and all(np.array_equal(read.tensors[k], v) for k, v in network.tensors.items())
    if not same:
        raise OutputError(f"{path}: reads back other than was written; export again")


def _refuse_other_weights(path) -> None:
    """The weights beside --onnx, a name the user did not type, replace only a threefold
    network's weights (an earlier export's): a file of the user's there was replaced."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        read_network_file(path, "export.py")
    except (ThreefoldError, OSError):
        raise UsageError(
            f"the weights beside --onnx, {path}: there already, and not a threefold network's "
            "weights; move it away or give --safetensors FILE"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """scripts/export.py: write a checkpoint's network as ONNX and .safetensors."""
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export a checkpoint's network: an ONNX graph (opset "
        f"{OPSET}, a dynamic batch axis, taking raw [0, 1] pixels) and its weights as "
        ".safetensors with PyTorch's state_dict names.",
    )
    parser.add_argument("checkpoint", type=path_type, help="a checkpoint.npz written by train.py")
    parser.add_argument(
        "--onnx", type=path_type, metavar="FILE.onnx", help="write the ONNX graph here"
    )
    parser.add_argument(
        "--safetensors",
        type=path_type,
        metavar="FILE",
        help="write the weights here (default with --onnx: beside it, FILE.safetensors)",
    )
    add_data_dir_flag(parser, ", which verify the graph", test=True)
    args = parse_once(parser, argv)

    def body() -> int:
        if args.onnx is None and args.safetensors is None:
            raise UsageError("give --onnx FILE.onnx, --safetensors FILE or both")
        if args.onnx is not None:
            require_onnx()
        weights, weights_flag = args.safetensors, "--safetensors"
        if args.onnx is not None and not args.onnx.name:  # `.` or `/`: no name to follow
            raise UsageError(f"--onnx {args.onnx}: is a folder; give a file name")
        if weights is None:  # named after the graph, which is what the user typed
            weights, weights_flag = (
                args.onnx.with_suffix(".safetensors"),
                "the weights beside --onnx,",
            )
            _refuse_other_weights(weights)
        # A model read from ONNX may keep its weights in files beside it.
        model_data = external_files(args.checkpoint) if is_onnx_file(str(args.checkpoint)) else []
        check_out_files(
            [("--onnx", args.onnx), (weights_flag, weights)],
            reads=[
                ("the checkpoint", args.checkpoint),
                *(("the checkpoint's external data", path) for path in model_data),
                *data_files(args.data_dir),
            ],
        )
        network = load_network(
            args.checkpoint, "export.py"
        )  # checked whole before anything is written
        if args.onnx is not None:  # so are the images the graph is verified on
            images, what = raw_test_images(args.data_dir)
            expected = reference_logits(network, images, str(args.checkpoint))
        # A pair or nothing: the graph replaces an older one only once it is verified and
        # its weights are written, so a failure leaves both older files as they were.
        with staged(args.onnx) if args.onnx is not None else nullcontext() as graph:
            if graph is not None:
                network.to_onnx(graph)
                # The graph verified is the one read back from its hidden name: an export
                # racing this one to the same --onnx cannot swap it.
                verified = _verified(graph, images, expected, f"--onnx {args.onnx}, on {what}")
            network.to_safetensors(weights)
        written = [] if args.onnx is None else [args.onnx]
        for path in [*written, weights]:
            say(f"wrote {path} ({path.stat().st_size:,} bytes)")
        # Read back as what they are, whatever their names' suffixes.
        _check_read_back(read_network_file(weights, "export.py"), network, weights)
        if args.onnx is not None:
            say(f"onnxruntime on {what}, raw pixels: {verified}")
        return 0

    return run_cli(parser, body)
