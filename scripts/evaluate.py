"""Evaluate a checkpoint on the test set: python scripts/evaluate.py CHECKPOINT [--impl jax]."""

import sys

from shared.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
