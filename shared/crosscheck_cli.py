"""`scripts/crosscheck.py`: the command-line front end of shared.crosscheck."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.checkpoint import load_checkpoint
from shared.cli import positive_int, run_cli
from shared.crosscheck import checkpoint_agreement, format_table, run_crosscheck
from shared.data import load_dataset
from shared.io import write_json
from shared.spec import ARCHS, get_arch
from shared.train import DTYPES


def crosscheck_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="crosscheck.py",
        description="Show, tensor by tensor, that the NumPy, JAX and PyTorch networks agree.",
    )
    parser.add_argument(
        "--arch",
        action="append",
        choices=list(ARCHS),
        help="architecture to check (repeatable; default: lab and pool)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=DTYPES,
        help="precision to check (repeatable; default: float64 and float32)",
    )
    parser.add_argument("--steps", type=positive_int, default=20, help="SGD steps run in lockstep")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="also load this checkpoint into all three and compare test predictions",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    def body() -> int:
        data = load_dataset(args.data_dir)
        archs = [get_arch(a) for a in (args.arch or ["lab", "pool"])]
        results = run_crosscheck(
            archs,
            args.dtype or ["float64", "float32"],
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        if args.checkpoint is not None:
            ckpt = load_checkpoint(args.checkpoint)
            arch = get_arch(ckpt.meta["arch"])
            results += checkpoint_agreement(ckpt.params, arch, data.test.x)
        print(format_table(results))
        failed = [r for r in results if not r.passed]
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
        if args.json is not None:
            write_json(args.json, [r.as_dict() for r in results])
        return 1 if failed else 0

    return run_cli(parser, body)
