"""Moved to :mod:`mupp.lab.train` (the experiment layer); this path keeps old imports working."""

import sys

from .lab import train as _module

sys.modules[__name__] = _module
