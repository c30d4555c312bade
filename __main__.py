"""``python -m fewshot_personalize …``: the command line (see kernels/cli.py)."""

import sys

from .kernels.cli import main

if __name__ == "__main__":
    sys.exit(main())
