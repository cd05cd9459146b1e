"""Rerun the lab's claims as controlled comparisons: python scripts/experiments.py [--quick]."""

import sys

from shared.cli import experiments_main

if __name__ == "__main__":
    sys.exit(experiments_main())
