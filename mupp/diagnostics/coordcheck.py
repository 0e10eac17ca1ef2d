"""Coordinate checks for updates *and* perturbations (Fig. 2, App. H.1; SPEC §5).

Train a model at several widths for a few SAM steps, then measure per layer:

- ``pert_rms``: RMS of ``ε_l x̃^{l-1}`` (Def. 8), the layer's own perturbation applied to its
  (perturbed) input on a fixed probe batch;
- ``pert_rel_spec``: ``||ε_l||_F / ||W_l||_*`` (Fig. 2, top);
- ``update_rms``: RMS of the change of the layer's output since initialization;
- ``update_spec``: ``||ΔW_l||_*`` divided by the spectral scale ``sqrt(fan_out/fan_in)``;
- ``act_rms``: RMS of the layer's output.

The fitted log-log slope per layer is the width exponent: μP² keeps every layer's
``pert_rms`` flat; μP-global lets input and hidden layers decay; μP-naive lets the readout grow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as data_mod
from ..models import build
from ..optim import SAM
from .layers import apply_weight, capture, rms, spectral_norm, spectral_scale, weight_layers

METRICS = ("pert_rms", "pert_rel_spec", "update_rms", "update_spec", "act_rms")
DEFAULT_BASE = {"mlp": 64, "resnet": 0.125, "vit": 32}
MODEL_NAMES = {"mlp": "mlp", "resnet": "resnet8", "vit": "vit"}


def _build(
    model: str, width: float, base: float, num_classes: int, sp: bool = False
) -> torch.nn.Module:
    """The model at ``width``; with ``sp`` the MLP gets standard (He, readout ``1/fan_in``)
    initialization instead of μP (its width metadata is still set, for the measurements)."""
    if model == "mlp":
        net = build("mlp", width, base, d_out=num_classes)
        if sp:
            net.reset_parameters(mup=False)
        return net
    if model == "resnet":
        return build("resnet8", width, base, num_classes=num_classes)
    if model == "vit":
        return build("vit", width, base, depth=2, heads=2, num_classes=num_classes, patch=8)
    raise ValueError(f"model must be one of {tuple(MODEL_NAMES)}; got {model!r}")


def measure_perturbation(
    model: torch.nn.Module, opt: SAM, probe: torch.Tensor
) -> dict[str, dict[str, float]]:
    """``pert_rms`` and ``pert_rel_spec`` per layer; call between ``first_step`` and
    ``second_step``/``restore`` (the weights are ``W + ε``)."""
    layers = weight_layers(model)
    with torch.no_grad(), capture(layers) as (inputs, _):
        model(probe)
    out: dict[str, dict[str, float]] = {"pert_rms": {}, "pert_rel_spec": {}}
    for name, mod in layers:
        eps = opt.perturbation(mod.weight)
        if eps is None:
            eps = torch.zeros_like(mod.weight)
        with torch.no_grad():
            out["pert_rms"][name] = rms(apply_weight(mod, inputs[name], eps))
            w = mod.weight.detach() - eps
            out["pert_rel_spec"][name] = eps.norm().item() / max(spectral_norm(w), 1e-30)
    return out


def measure_updates(
    model: torch.nn.Module,
    probe: torch.Tensor,
    init_outputs: dict[str, torch.Tensor],
    init_weights: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """``update_rms``, ``update_spec`` and ``act_rms`` per layer at the current weights."""
    layers = weight_layers(model)
    with torch.no_grad(), capture(layers) as (_, outputs):
        model(probe)
    out: dict[str, dict[str, float]] = {"update_rms": {}, "update_spec": {}, "act_rms": {}}
    for name, mod in layers:
        out["update_rms"][name] = rms(outputs[name] - init_outputs[name])
        out["act_rms"][name] = rms(outputs[name])
        dw = mod.weight.detach() - init_weights[name]
        out["update_spec"][name] = spectral_norm(dw) / spectral_scale(mod)
    return out


def _train(
    model_name: str,
    width: float,
    base_width: float,
    *,
    parameterization: str,
    variant: str,
    rule: str,
    steps: int,
    seed: int,
    lr: float,
    rho: float,
    batch_size: int,
    dataset: data_mod.Dataset,
    probe: torch.Tensor,
    on_init=None,
):
    """Build and train one width for ``steps`` SAM steps (``rho = 0``: plain μP SGD).
    ``on_init(model)`` runs before training (to record initial outputs)."""
    torch.manual_seed(seed)
    model = _build(model_name, width, base_width, dataset.num_classes, sp=parameterization == "sp")
    opt = SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=lr,
        rho=rho,
        parameterization=parameterization,
        variant=variant,
        rule=rule,
    )
    if on_init is not None:
        on_init(model)
    gen = torch.Generator().manual_seed(seed)
    batches = _infinite_batches(dataset, batch_size, gen, model_name == "mlp")
    model.train()
    for _ in range(steps):
        x, y = next(batches)

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    return model, opt, batches


def _probe(model_name: str, dataset: data_mod.Dataset) -> torch.Tensor:
    probe = data_mod.normalize(dataset.test.x[:64], dataset.name)
    return probe.flatten(1) if model_name == "mlp" else probe


def run_one(model_name: str, width: float, base_width: float, **kw) -> dict[str, dict[str, float]]:
    """Train one width (see :func:`_train`); returns ``{metric: {layer: value}}``."""
    probe = _probe(model_name, kw["dataset"])
    init: dict[str, Any] = {}

    def record(model):
        layers = weight_layers(model)
        model.eval()  # BatchNorm: probe measurements use running statistics
        with torch.no_grad(), capture(layers) as (_, outputs):
            model(probe)
        init["outputs"] = dict(outputs)
        init["weights"] = {n: m.weight.detach().clone() for n, m in layers}

    model, opt, batches = _train(model_name, width, base_width, probe=probe, on_init=record, **kw)
    # one more ascent step to read ε at the trained weights, then restore without stepping
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    model.eval()
    result = measure_perturbation(model, opt, probe)
    opt.restore()
    result.update(measure_updates(model, probe, init["outputs"], init["weights"]))
    return result


def last_layer_equivalence(
    model: str = "mlp",
    widths: Sequence[float] = (64, 256, 1024),
    *,
    base_width: float | None = None,
    steps: int = 50,
    seeds: int = 1,
    lr: float = 0.05,
    rho: float = 0.1,
    batch_size: int = 64,
    dataset: str = "synthetic",
    data_dir: str | None = None,
) -> dict[str, Any]:
    """App. H.1 / Prop. 2: under μP-global, SAM behaves like last-layer SAM at large width.

    Trains SAM (μP-global), last-layer SAM (μP-global) and SGD (μP) from the same init on the
    same batches and reports per width ``gap = ||f_SAM - f_LL|| / ||f_SAM - f_SGD||`` on a probe
    batch: the share of SAM's effect on the function that last-layer SAM does *not* reproduce.
    It shrinks as width grows."""
    base = DEFAULT_BASE[model] if base_width is None else base_width
    ds = data_mod.load(dataset, data_dir)
    probe = _probe(model, ds)
    gaps = []
    for w in widths:
        vals = []
        for s in range(seeds):
            outs = {}
            for name, variant, r in (
                ("sam", "sam", rho),
                ("ll", "last-layer", rho),
                ("sgd", "sam", 0.0),
            ):
                m, _, _ = _train(
                    model,
                    w,
                    base,
                    parameterization="mup-global",
                    variant=variant,
                    rule="LP",
                    steps=steps,
                    seed=s,
                    lr=lr,
                    rho=r,
                    batch_size=batch_size,
                    dataset=ds,
                    probe=probe,
                )
                m.eval()
                with torch.no_grad():
                    outs[name] = m(probe)
            vals.append(
                ((outs["sam"] - outs["ll"]).norm() / (outs["sam"] - outs["sgd"]).norm()).item()
            )
        gaps.append(float(np.mean(vals)))
    return {"widths": list(widths), "gap": gaps, "slope": slope(widths, gaps)}


def _infinite_batches(ds: data_mod.Dataset, batch_size: int, gen: torch.Generator, flatten: bool):
    while True:
        yield from data_mod.batches(
            ds.train,
            batch_size,
            shuffle=True,
            generator=gen,
            name=ds.name,
            flatten=flatten,
            drop_last=True,
        )


def slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(value)`` against ``log(width)`` (NaN if a value is <= 0)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(widths, dtype=float)), np.log(v), 1)[0])


def coordcheck(
    model: str = "mlp",
    widths: Sequence[float] = (64, 128, 256, 512),
    *,
    base_width: float | None = None,
    parameterization: str = "mupp",
    variant: str = "sam",
    rule: str = "LP",
    steps: int = 10,
    seeds: int = 2,
    lr: float = 0.1,
    rho: float = 0.1,
    batch_size: int = 64,
    dataset: str = "synthetic",
    data_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the coordinate check; returns ``{"widths", "layers", "metrics", "slopes", "config"}``
    with ``metrics[metric][layer]`` a list (one mean over seeds per width)."""
    if model not in MODEL_NAMES:
        raise ValueError(f"model must be one of {tuple(MODEL_NAMES)}; got {model!r}")
    if len(widths) < 2:
        raise ValueError(f"widths needs at least 2 entries to fit a slope; got {list(widths)}")
    if steps < 0 or seeds < 1:
        raise ValueError(f"steps must be >= 0 and seeds >= 1; got steps={steps}, seeds={seeds}")
    base = DEFAULT_BASE[model] if base_width is None else base_width
    ds = data_mod.load(dataset, data_dir)
    runs = [(w, s) for w in widths for s in range(seeds)]
    results: dict[float, list[dict]] = {w: [] for w in widths}
    iterator = runs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(runs, desc=f"coordcheck {parameterization}", unit="run")
    for w, s in iterator:
        results[w].append(
            run_one(
                model,
                w,
                base,
                parameterization=parameterization,
                variant=variant,
                rule=rule,
                steps=steps,
                seed=s,
                lr=lr,
                rho=rho,
                batch_size=batch_size,
                dataset=ds,
            )
        )
    layers = list(results[widths[0]][0]["pert_rms"].keys())
    metrics = {
        m: {
            layer: [float(np.mean([r[m][layer] for r in results[w]])) for w in widths]
            for layer in layers
        }
        for m in METRICS
    }
    slopes = {m: {layer: slope(widths, metrics[m][layer]) for layer in layers} for m in METRICS}
    config = dict(
        model=model,
        base_width=base,
        parameterization=parameterization,
        variant=variant,
        rule=rule,
        steps=steps,
        seeds=seeds,
        lr=lr,
        rho=rho,
        batch_size=batch_size,
        dataset=dataset,
    )
    return {
        "widths": list(widths),
        "layers": layers,
        "metrics": metrics,
        "slopes": slopes,
        "config": config,
    }


def format_tables(result: dict[str, Any]) -> str:
    """One table per metric: layers × widths, and the fitted width exponent."""
    widths = result["widths"]
    lines = []
    name_w = max(len(n) for n in result["layers"]) + 2
    for m in METRICS:
        lines.append(f"{m}")
        lines.append("layer".ljust(name_w) + "".join(f"{w:>11g}" for w in widths) + "      slope")
        for layer in result["layers"]:
            vals = result["metrics"][m][layer]
            s = result["slopes"][m][layer]
            lines.append(
                layer.ljust(name_w)
                + "".join(f"{v:>11.3e}" for v in vals)
                + (f"{s:>+11.2f}" if math.isfinite(s) else "        nan")
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """One log-log panel per metric, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, m in zip(axes, METRICS):
        for layer in result["layers"]:
            vals = result["metrics"][m][layer]
            if all(v > 0 for v in vals):
                s = result["slopes"][m][layer]
                ax.loglog(result["widths"], vals, "o-", label=f"{layer} ({s:+.2f})")
        ax.set_title(m)
        ax.set_xlabel("width")
        ax.legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(
        f"{cfg['model']} {cfg['parameterization']} {cfg['variant']} {cfg['rule']}: {cfg['steps']} steps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
