"""Moved to :mod:`mupp.lab.vectorized` (the experiment layer); this path keeps old imports working."""

import sys

from .lab import vectorized as _module

sys.modules[__name__] = _module
