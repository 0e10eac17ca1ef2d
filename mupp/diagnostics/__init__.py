"""Measurements that show the width scaling on any model (Fig. 2, App. H.1), and a verdict
(:func:`verify`).

The built-in models' checks (``mupp coordcheck``) live in :mod:`mupp.lab.checks`, their
figures in :mod:`mupp.lab.plots`."""

from .coordcheck import (
    METRICS,
    coord_data,
    format_tables,
    measure_model,
    measure_perturbation,
    measure_updates,
    slope,
    train_steps,
)
from .layers import apply_weight, capture, spectral_norm, weight_layers
from .probes import feature_rank, grad_norm, hessian_top_eigenvalue, hessian_trace
from .verify import Report, verify

__all__ = [
    "METRICS",
    "coord_data",
    "verify",
    "Report",
    "measure_model",
    "train_steps",
    "format_tables",
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
