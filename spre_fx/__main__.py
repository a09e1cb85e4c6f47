"""`python -m spre_fx ...`: the `spre-fx` command line (spre_fx/cli.py, docs/cli.md)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
