"""Diagnostics that show the width scaling on a model (Fig. 2, App. H.1)."""

from .coordcheck import (
    METRICS,
    coord_data,
    coordcheck,
    format_tables,
    last_layer_equivalence,
    measure_model,
    measure_perturbation,
    measure_updates,
    plot,
    slope,
)
from .layers import apply_weight, capture, spectral_norm, weight_layers
from .probes import feature_rank, grad_norm, hessian_top_eigenvalue, hessian_trace

__all__ = [
    "METRICS",
    "coord_data",
    "coordcheck",
    "measure_model",
    "last_layer_equivalence",
    "format_tables",
    "plot",
    "slope",
    "measure_perturbation",
    "measure_updates",
    "apply_weight",
    "capture",
    "spectral_norm",
    "weight_layers",
    "grad_norm",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "feature_rank",
]
