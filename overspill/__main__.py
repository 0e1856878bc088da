"""`python -m overspill`: the same entry point, arguments and exit codes as the `overspill` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
