"""Time the three implementations side by side: python scripts/benchmark.py [--help]."""

from shared.benchmark import main
from shared.errors import exit_process

if __name__ == "__main__":
    exit_process(main())
