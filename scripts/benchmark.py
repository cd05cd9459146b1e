"""Time the three implementations side by side: python scripts/benchmark.py [--help]."""

import sys

from shared.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
