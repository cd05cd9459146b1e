"""Evaluate a checkpoint on the test set: python scripts/evaluate.py CHECKPOINT [--impl jax]."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.evaluate import main

        exit_process(main())
