"""Time the three implementations side by side: python scripts/benchmark.py [--help]."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.benchmark import main

        exit_process(main())
