"""Moved to :mod:`mupp.lab.vectorized`; this path warns and is removed in mupp 0.3.0."""

from ._moved import alias

alias(__name__, "mupp.lab.vectorized")
