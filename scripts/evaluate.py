"""Evaluate a checkpoint on the test set: python scripts/evaluate.py CHECKPOINT [--impl jax]."""

import sys

from shared.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
