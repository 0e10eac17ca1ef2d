"""Old import paths of the modules that moved into :mod:`mupp.lab` (the experiment layer)."""

from __future__ import annotations

import importlib
import sys
import warnings

REMOVED_IN = "0.3.0"  # the release that drops the old paths


def alias(old: str, new: str) -> None:
    """Make the module ``old`` (being imported) the module ``new``, with a
    ``DeprecationWarning`` that names the new path and the release that removes the old."""
    warnings.warn(
        f"{old} has moved to {new}; import it from there (the old path is removed in mupp "
        f"{REMOVED_IN})",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
