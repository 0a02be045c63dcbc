"""`python -m csdiff` is the same entry point as the `csdiff` console script."""

import sys

from csdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
