"""``python -m specdec ...`` runs the command line, exactly as the ``specdec`` console script does."""

import sys

from specdec.cli import main

sys.exit(main())
