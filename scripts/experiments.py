"""Rerun the lab's claims as controlled comparisons: python scripts/experiments.py [--quick]."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.experiments import main

        exit_process(main())
