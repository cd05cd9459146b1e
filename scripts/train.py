"""Train the CNN: python scripts/train.py --impl {numpy,jax,torch} [--help for all flags]."""

from shared.errors import exit_process
from shared.train import main

if __name__ == "__main__":
    exit_process(main())
