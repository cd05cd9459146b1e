"""Train the CNN: python scripts/train.py --impl {numpy,jax,torch} [--help for all flags]."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.train import main

        exit_process(main())
