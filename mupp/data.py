"""Moved to :mod:`mupp.lab.data` (the experiment layer); this path keeps old imports working."""

import sys

from .lab import data as _module

sys.modules[__name__] = _module
