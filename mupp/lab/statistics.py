"""Network statistics of a trained run, as in the paper's Fig. H.1 / H.2 (App. H.1).

For a run directory written by :func:`mupp.lab.train.train` (its ``checkpoint.pt`` holds the config
and the final weights), :func:`run_statistics` rebuilds the initial model from the run's seed,
loads the trained weights and measures, on a fixed probe batch of training images:

per layer
    ``pert_norm`` ``||ε_l||_F`` and ``pert_rel_spec`` ``||ε_l||_F / ||W_l||_*`` of one SAM ascent
    step with the run's own optimizer settings (zero for a plain SGD run);
    ``update_spec`` ``||W_l - W_l^0||_*`` over the spectral scale ``sqrt(fan_out / fan_in)``;
    ``update_rms`` RMS of the change of the layer's output since initialization (the activation
    update normalized by the square root of the output dimension);
    ``feature_rank`` how many singular values carry 99% of the variance of the layer's output
    (Andriushchenko et al., 2023a);

for the whole model
    ``grad_norm``, ``hessian_top`` (power iteration) and ``hessian_trace`` (Hutchinson) of the
    probe-batch loss, and the run's final training accuracy and best test accuracy.

The dataset is ``dataset`` if given, else loaded from ``data_dir`` (default: the run's own).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..diagnostics.coordcheck import measure_perturbation, measure_updates
from ..diagnostics.layers import capture, weight_layers
from ..diagnostics.probes import feature_rank, grad_norm, hessian_top_eigenvalue, hessian_trace
from . import data as data_mod
from .checkpoint import CHECKPOINT_FILE, load_checkpoint
from .checks import sgd_sam
from .config import TrainConfig, make_model

LAYER_METRICS = ("pert_norm", "pert_rel_spec", "update_spec", "update_rms", "feature_rank")
MODEL_METRICS = ("grad_norm", "hessian_top", "hessian_trace", "train_acc", "best_test_acc")


def run_statistics(
    run_dir: str | os.PathLike,
    dataset: data_mod.Dataset | None = None,
    data_dir: str | os.PathLike | None = None,
    probe_size: int = 512,
    hessian_iters: int = 20,
    trace_samples: int = 10,
) -> dict[str, Any]:
    """Fig. H.1's statistics for one finished run; ``{"config", "layers": {metric: {layer:
    value}}, "model": {metric: value}}``."""
    ckpt_path = Path(run_dir) / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"run_dir {str(run_dir)!r} has no checkpoint.pt: pass a directory written by "
            "`mupp train --out`, or a sweep's runs/<key> of a sweep run with --keep-checkpoints"
        )
    if probe_size < 2:
        raise ValueError(f"probe_size must be >= 2; got {probe_size}")
    state = load_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(state["config"])
    if dataset is None:
        dataset = data_mod.load(cfg.dataset, data_dir if data_dir is not None else cfg.data_dir)
    ds = dataset
    torch.manual_seed(cfg.seed)  # as train() does: the same initial weights
    model = make_model(cfg, ds.num_classes)
    flatten = cfg.model == "mlp"
    n = min(probe_size, len(ds.train))
    x = data_mod.normalize(ds.train.x[:n], ds.name)
    x = x.flatten(1) if flatten else x
    y = ds.train.y[:n]
    layers = weight_layers(model)
    model.eval()  # BatchNorm: running statistics, so every measurement sees the same function
    with torch.no_grad(), capture(layers) as (_, outputs):
        model(x)
    init_outputs = dict(outputs)
    init_weights = {name: mod.weight.detach().clone() for name, mod in layers}
    model.load_state_dict(state["model"])

    stats: dict[str, dict[str, float]] = measure_updates(model, x, init_outputs, init_weights)
    del stats["act_rms"]
    with torch.no_grad(), capture(layers) as (_, outputs):
        model(x)
    stats["feature_rank"] = {name: feature_rank(outputs[name]) for name, _ in layers}
    stats.update(_perturbation_stats(model, cfg, layers, x, y))

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    history = state["history"]
    whole = {
        "grad_norm": grad_norm(model, loss_fn),
        "hessian_top": hessian_top_eigenvalue(model, loss_fn, iters=hessian_iters, seed=cfg.seed),
        "hessian_trace": hessian_trace(model, loss_fn, samples=trace_samples, seed=cfg.seed),
        "train_acc": history[-1]["train_acc"],
        "best_test_acc": max(h["test_acc"] for h in history),
    }
    return {
        "config": state["config"],
        "layers": {m: stats[m] for m in LAYER_METRICS},
        "model": whole,
    }


def _perturbation_stats(
    model: torch.nn.Module, cfg: TrainConfig, layers: list, x: torch.Tensor, y: torch.Tensor
) -> dict[str, dict[str, float]]:
    """``pert_norm`` and ``pert_rel_spec`` per layer of one SAM ascent step with the run's
    settings on the probe batch (zeros for a plain SGD run); the weights are restored."""
    if not cfg.uses_sam:
        zeros = {name: 0.0 for name, _ in layers}
        return {"pert_norm": zeros, "pert_rel_spec": dict(zeros)}
    opt = sgd_sam(model, cfg.parameterization, cfg.variant, cfg.rule, cfg.lr, cfg.rho)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    pert = measure_perturbation(model, opt, x)
    norms = {}
    for name, mod in layers:
        eps = opt.perturbation(mod.weight)
        norms[name] = 0.0 if eps is None else eps.norm().item()
    opt.restore()
    return {"pert_norm": norms, "pert_rel_spec": pert["pert_rel_spec"]}


def format_statistics(results: list[dict[str, Any]]) -> str:
    """One row per run: width, parameterization, variant, rho, then every statistic."""
    lines = []
    for r in results:
        c = r["config"]
        label = (
            f"width {c['width']:g} {c['parameterization']} {c['variant']} "
            f"lr {c['lr']:g} rho {c['rho']:g}"
        )
        lines.append(label)
        for metric in LAYER_METRICS:
            values = "  ".join(f"{k or 'model'}={v:.4g}" for k, v in r["layers"][metric].items())
            lines.append(f"  {metric:<14} {values}")
        lines.append("  " + "  ".join(f"{k}={v:.4g}" for k, v in r["model"].items()))
    return "\n".join(lines)
