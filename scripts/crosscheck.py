"""Compare the three implementations tensor by tensor: python scripts/crosscheck.py [--help]."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.crosscheck import main

        exit_process(main())
