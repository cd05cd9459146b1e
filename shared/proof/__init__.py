"""The cross-check in parts: its rows, settings, kinks, comparisons and report; the command
that runs them is shared/crosscheck.py."""
