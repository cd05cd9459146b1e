"""Export a checkpoint: python scripts/export.py CHECKPOINT --onnx FILE.onnx."""

import sys

from shared.export import main

if __name__ == "__main__":
    sys.exit(main())
