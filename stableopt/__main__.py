"""``python -m stableopt``: the same command line as the ``stableopt`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
