"""Export a checkpoint: python scripts/export.py CHECKPOINT --onnx FILE.onnx."""

from shared.errors import exit_process
from shared.export import main

if __name__ == "__main__":
    exit_process(main())
