"""Rerun the lab's claims as controlled comparisons: python scripts/experiments.py [--quick]."""

from shared.errors import exit_process
from shared.experiments import main

if __name__ == "__main__":
    exit_process(main())
