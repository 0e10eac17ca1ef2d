"""Interoperability with microsoft/mup: its ``InfShape`` view of a parameter's width
dimensions, and its ``.bsh`` base-shapes file format (YAML: a base size per width dimension,
``null`` for a finite one).  Plain data only: :mod:`mupp.shapes` builds the views and tables
from a model (``save_base_shapes``, ``load_base_shapes``, ``set_base_shapes(model, "x.bsh")``).
"""

from __future__ import annotations

import os


class InfDim:
    """One dimension; ``base_dim is None`` for a finite (non-width) dimension (as in mup)."""

    def __init__(self, base_dim: int | None, dim: int):
        self.base_dim = base_dim
        self.dim = dim

    def isinf(self) -> bool:
        """Whether this dimension grows with width (mup's name)."""
        return self.base_dim is not None

    def width_mult(self) -> float:
        """``dim / base_dim`` (1 for a fixed dimension)."""
        return self.dim / self.base_dim if self.isinf() else 1.0

    def __repr__(self) -> str:
        return f"InfDim({self.base_dim}, {self.dim})"


class InfShape(tuple):
    """Tuple of :class:`InfDim` with the methods mup's optimizers call (``ninf``,
    ``width_mult``, ``fanin_fanout``, ``fanin_fanout_mult_ratio``)."""

    def ninf(self) -> int:
        """How many dimensions grow with width."""
        return sum(d.isinf() for d in self)

    def width_mult(self) -> float:
        """The multiplier of the last width-growing dimension (mup's convention)."""
        for d in reversed(self):
            if d.isinf():
                return d.width_mult()
        return 1.0

    def fanin_fanout(self) -> tuple[InfDim, InfDim]:
        """The fan-in and fan-out dimensions (mup's convention)."""
        if len(self) < 2:
            raise ValueError("fanin_fanout needs a tensor with at least 2 dimensions")
        return self[1], self[0]

    def fanin_fanout_mult_ratio(self) -> float:
        """``fan_in_mult / fan_out_mult``."""
        fi, fo = self.fanin_fanout()
        return fi.width_mult() / fo.width_mult()

    def base_shape(self) -> list[int | None]:
        """The shape at base width."""
        return [d.base_dim for d in self]

    def shape(self) -> list[int]:
        """The shape at this width."""
        return [d.dim for d in self]


_BSH_HEADER = (
    "# Base shapes (format of the mup package, YAML):\n"
    "# null = finite dimension; a number = base size of a width dimension\n"
)


def write_bsh(table: dict[str, list[int | None]], path: str | os.PathLike) -> None:
    """Write ``{name: base shape}`` (``None`` for a finite dimension) as a mup ``.bsh`` file."""
    import yaml  # only here: `import mupp` stays free of optional file formats

    with open(path, "w") as f:
        f.write(_BSH_HEADER + yaml.safe_dump(table, default_flow_style=None, sort_keys=False))


def read_bsh(path: str | os.PathLike) -> dict[str, tuple[int | None, ...]]:
    """Read a mup ``.bsh`` file: ``{name: base shape}`` as written, ``None`` for finite
    dimensions."""
    import yaml  # only here: `import mupp` stays free of optional file formats

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a base-shapes file (expected a YAML mapping)")
    return {k: tuple(v) for k, v in data.items()}
