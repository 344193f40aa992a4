"""``python -m specdec ...`` runs the command line, exactly as the ``specdec`` console script does."""

import sys

from specdec.cli import main

if __name__ == "__main__":
    sys.exit(main())
