"""Export a checkpoint: python scripts/export.py CHECKPOINT --onnx FILE.onnx."""

from shared.errors import exit_process, stopped_in_one_line

if __name__ == "__main__":
    with stopped_in_one_line():  # from the first heavy import on
        from shared.export import main

        exit_process(main())
