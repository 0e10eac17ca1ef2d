"""``python -m mupp``: the command-line tool."""

import sys

from .lab.cli import main

sys.exit(main())
