"""Moved to :mod:`mupp.lab.sweep` (the experiment layer); this path keeps old imports working."""

import sys

from .lab import sweep as _module

sys.modules[__name__] = _module
