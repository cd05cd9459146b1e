"""Rerun the lab's claims as controlled comparisons: python scripts/experiments.py [--quick]."""

import sys

from shared.experiments import main

if __name__ == "__main__":
    sys.exit(main())
