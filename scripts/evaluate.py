"""Evaluate a checkpoint on the test set: python scripts/evaluate.py CHECKPOINT [--impl jax]."""

from shared.errors import exit_process
from shared.evaluate import main

if __name__ == "__main__":
    exit_process(main())
