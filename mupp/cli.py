"""Moved to :mod:`mupp.lab.cli` (the experiment layer); this path keeps old imports working."""

import sys

from .lab import cli as _module

sys.modules[__name__] = _module
