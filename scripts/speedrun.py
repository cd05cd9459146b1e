"""Time to accuracy, fast recipe against the defaults: python scripts/speedrun.py [--help]."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.speedrun import main

        exit_process(main())
