"""`python -m attnlab ...`: the same CLI as the `attnlab` command (attnlab/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
