"""Time to accuracy, fast recipe against the defaults: python scripts/speedrun.py [--help]."""

from shared.errors import exit_process
from shared.speedrun import main

if __name__ == "__main__":
    exit_process(main())
