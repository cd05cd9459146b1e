"""Compare the three implementations tensor by tensor: python scripts/crosscheck.py [--help]."""

import sys

from shared.cli import crosscheck_main

if __name__ == "__main__":
    sys.exit(crosscheck_main())
