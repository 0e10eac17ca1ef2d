"""mupp: μP² — Sharpness-Aware Minimization with layerwise perturbation scaling.

Reference implementation of Haas et al., "μP²: Effective Sharpness Aware Minimization Requires
Layerwise Perturbation Scaling" (NeurIPS 2024).  ``import mupp`` loads only torch and numpy;
the command-line tool's dependencies (matplotlib, optuna, tqdm) load on use.
"""

from . import theory
from .init import mup_init_
from .optim import SAM, MuAdamW, MuSGD, frozen_bn_stats, mup_param_groups
from .shapes import (
    WidthInfo,
    describe,
    get_info,
    load_base_shapes,
    reattach,
    save_base_shapes,
    set_base_shapes,
)

__version__ = "0.1.0"

# subpackages reachable as attributes after `import mupp`, imported on first use (PEP 562) so
# that `import mupp` stays light
_LAZY_SUBPACKAGES = ("models", "diagnostics", "distributed", "integrations")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))


__all__ = [
    "SAM",
    "MuSGD",
    "MuAdamW",
    "mup_param_groups",
    "frozen_bn_stats",
    "set_base_shapes",
    "reattach",
    "describe",
    "get_info",
    "WidthInfo",
    "save_base_shapes",
    "load_base_shapes",
    "mup_init_",
    "theory",
    "__version__",
]
