"""Compare the three implementations tensor by tensor: python scripts/crosscheck.py [--help]."""

import sys

from shared.crosscheck import main

if __name__ == "__main__":
    sys.exit(main())
