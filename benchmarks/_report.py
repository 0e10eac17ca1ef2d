"""What every benchmark script does with its numbers: write them as JSON where asked."""

from __future__ import annotations

import json
from typing import Any


def write_json(path: str | None, data: Any) -> None:
    """Write ``data`` to ``path`` as indented JSON and say so (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=str)
        print(f"wrote {path}")
