"""`python -m peftkit ...` runs the `peftkit` command line."""

import sys

from peftkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
