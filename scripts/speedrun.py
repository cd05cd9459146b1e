"""Time to accuracy, fast recipe against the defaults: python scripts/speedrun.py [--help]."""

import sys

from shared.speedrun import main

if __name__ == "__main__":
    sys.exit(main())
