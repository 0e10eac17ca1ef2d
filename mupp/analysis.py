"""Moved to :mod:`mupp.lab.analysis` (the experiment layer); this path keeps old imports working."""

import sys

from .lab import analysis as _module

sys.modules[__name__] = _module
