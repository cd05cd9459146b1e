"""Compare the three implementations tensor by tensor: python scripts/crosscheck.py [--help]."""

from shared.crosscheck import main
from shared.errors import exit_process

if __name__ == "__main__":
    exit_process(main())
