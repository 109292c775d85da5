"""``python -m dtm ...``: the command line, ``dtm.cli``."""

import sys

from dtm.cli import main

if __name__ == "__main__":
    sys.exit(main())
