"""Train the CNN: python scripts/train.py --impl {numpy,jax,torch} [--help for all flags]."""

import sys

from shared.train import main

if __name__ == "__main__":
    sys.exit(main())
