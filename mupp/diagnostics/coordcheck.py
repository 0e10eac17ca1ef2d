"""Coordinate checks for updates *and* perturbations (paper Sec. 3, Fig. 2, App. H.1).

Train a model at several widths for a few SAM steps, then measure per layer:

- ``pert_rms``: RMS of ``ε_l x̃^{l-1}`` (Def. 8), the layer's own perturbation applied to its
  (perturbed) input on a fixed probe batch;
- ``pert_rel_spec``: ``||ε_l||_F / ||W_l||_*`` (Fig. 2, top);
- ``update_rms``: RMS of the change of the layer's output since initialization;
- ``update_spec``: ``||ΔW_l||_*`` divided by the spectral scale ``sqrt(fan_out/fan_in)``;
- ``act_rms``: RMS of the layer's output.

The fitted log-log slope per layer is the width exponent: μP² keeps every layer's
``pert_rms`` flat; μP-global lets input and hidden layers decay; μP-naive lets the readout grow.

For the jointly normalized rules (LP, DP) it also records the **denominator** of that ascent
step, ``sqrt(Σ_l den_l² t_l²)`` (Def. 4, Remark F.4), in total and per role.  Every layer's ε is
divided by it, so its width exponent ``s`` shifts every ``pert_rms`` exponent by ``-s``: μP²
assumes it is Θ(1) because the input-like layers dominate it at large width (their terms are
Θ(1), the hidden and output terms vanish); at narrow widths the vanishing terms may still
dominate, and then a fixed ρ perturbs more as width grows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..choices import JOINT_RULES
from ..optim import SAM
from ..shapes import get_info
from .layers import (
    apply_weight,
    attention_logits,
    capture,
    rms,
    spectral_norm,
    spectral_scale,
    weight_layers,
)

METRICS = ("pert_rms", "pert_rel_spec", "update_rms", "update_spec", "act_rms")


def measure_perturbation(
    model: torch.nn.Module, opt: SAM, probe: torch.Tensor
) -> dict[str, dict[str, float]]:
    """``pert_rms`` and ``pert_rel_spec`` per layer; call between ``first_step`` and
    ``second_step``/``restore`` (the weights are ``W + ε``)."""
    layers = weight_layers(model)
    with torch.no_grad(), capture(layers) as (inputs, _):
        _forward(model, probe)
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


def measure_denominator(opt: SAM) -> dict[str, float]:
    """The LP/DP denominator ``sqrt(Σ_l den_l² t_l²)`` of the next ascent step (Def. 4,
    Remark F.4) from the current gradients: ``"total"`` and the root sum of squares of each
    role's terms (``{}`` for the per-layer and unnormalized rules)."""
    if opt.rule not in JOINT_RULES:
        return {}
    squares: dict[str, float] = {}
    for p, term in opt.denominator_terms():
        info = get_info(p)
        role = info.role if info is not None else "unknown"
        squares[role] = squares.get(role, 0.0) + term**2
    out = {role: math.sqrt(v) for role, v in sorted(squares.items())}
    out["total"] = math.sqrt(sum(squares.values()))
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
        _forward(model, probe)
    out: dict[str, dict[str, float]] = {"update_rms": {}, "update_spec": {}, "act_rms": {}}
    for name, mod in layers:
        out["update_rms"][name] = rms(outputs[name] - init_outputs[name])
        out["act_rms"][name] = rms(outputs[name])
        dw = mod.weight.detach() - init_weights[name]
        out["update_spec"][name] = spectral_norm(dw) / spectral_scale(mod)
    return out


Batch = tuple[Any, torch.Tensor]


def _forward(model: torch.nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return getattr(out, "logits", out)


def train_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator[Batch],
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> None:
    """``steps`` optimizer steps on ``batches`` with ``step(closure)`` (SAM: both passes)."""
    model.train()
    for _ in range(steps):
        x, y = next(batches)

        def closure(x=x, y=y):
            loss = loss_fn(_forward(model, x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()


def measure_model(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterator[Batch],
    probe: Any,
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, dict[str, float]]:
    """Train ``model`` for ``steps`` steps, then measure every metric of :data:`METRICS` per
    layer (Def. 8, Fig. 2): the updates against the model at the call, and the perturbation
    of one more ascent step on the next batch (a :class:`mupp.SAM` ``opt``; other optimizers
    report zero perturbation), restored without stepping; and, for LP/DP, that step's
    denominator (:func:`measure_denominator`) under ``"denominator"``."""
    layers = weight_layers(model)
    if not layers:
        raise ValueError(
            "the model has no weight with width metadata: call mupp.set_base_shapes in the "
            "model factory"
        )
    model.eval()  # BatchNorm: probe measurements use running statistics
    with torch.no_grad(), capture(layers) as (_, outputs), attention_logits() as attention0:
        logits0 = _forward(model, probe)
    init_outputs = dict(outputs)
    init_weights = {n: m.weight.detach().clone() for n, m in layers}
    train_steps(model, opt, batches, steps, loss_fn)
    if isinstance(opt, SAM):
        x, y = next(batches)
        loss_fn(_forward(model, x), y).backward()
        denominator = measure_denominator(opt)
        opt.first_step(zero_grad=True)
        model.eval()
        result = measure_perturbation(model, opt, probe)
        opt.restore()
    else:
        zero = {n: 0.0 for n, _ in layers}
        result = {"pert_rms": dict(zero), "pert_rel_spec": dict(zero)}
        denominator = {}
    result.update(measure_updates(model, probe, init_outputs, init_weights))
    result["denominator"] = denominator
    model.eval()
    with torch.no_grad(), attention_logits() as attention:
        logits = _forward(model, probe)
    result["outputs"] = output_metrics(logits0, logits, attention0, attention)
    return result


def output_metrics(
    logits0: torch.Tensor, logits: torch.Tensor, attention0: list[float], attention: list[float]
) -> dict[str, float]:
    """The model's output (the logits) at initialization, after training and its change, and
    the RMS of each attention call's logits at both times (:func:`attention_logits`)."""
    out = {
        "logits at init": rms(logits0),
        "logits": rms(logits),
        "logits change": rms(logits - logits0),
    }
    for i, (a0, a) in enumerate(zip(attention0, attention)):
        out[f"attention logits {i} at init"] = a0
        out[f"attention logits {i}"] = a
    return out


def coord_data(
    make_model: Callable[[float], torch.nn.Module],
    widths: Sequence[float],
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    batches: Callable[[int], Iterator[Batch]] | Iterable[Batch],
    *,
    steps: int = 10,
    seeds: int = 2,
    probe: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: bool = False,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The coordinate check on any model (after microsoft/mup's ``get_coord_data``).

    ``make_model(width)`` returns the model at that width with its base shapes set
    (:func:`mupp.set_base_shapes`); ``make_optimizer(model)`` its optimizer, typically a
    :class:`mupp.SAM`; ``batches`` yields ``(inputs, targets)`` (a tensor, or a dict of keyword
    arguments for the model) and is either an iterable, read afresh for every width and seed,
    or a function ``seed -> iterator``.  ``probe`` (default: the first batch's inputs) is where
    the layers are measured.  For each width and seed (``torch.manual_seed(seed)`` before the
    model is built): ``steps`` training steps, then every metric of :data:`METRICS` per layer.

    Returns ``{"widths", "layers", "metrics", "slopes", "denominator", "outputs", "config"}``:
    ``metrics[metric][layer]`` holds one mean over seeds per width, ``slopes`` the fitted width
    exponents; the paper's prediction for μP² is an exponent of 0 for ``pert_rms`` in every
    layer (Sec. 3, Fig. 2).  ``denominator`` (LP/DP only, else empty) holds the ascent step's
    joint norm per role and in total, ``{"values": {key: [mean per width]}, "slopes": {...}}``
    (:func:`measure_denominator`).  ``outputs`` holds the model's logits at initialization,
    after training and their change, and each attention call's logits
    (:func:`output_metrics`), in the same form.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"widths needs at least 2 entries to fit a slope; got {widths}")
    if steps < 0 or seeds < 1:
        raise ValueError(f"steps must be >= 0 and seeds >= 1; got steps={steps}, seeds={seeds}")

    def stream(seed: int) -> Iterator[Batch]:
        if callable(batches):
            return iter(batches(seed))
        return itertools.cycle(list(batches))

    if probe is None:
        probe = next(stream(0))[0]
    runs = [(w, s) for w in widths for s in range(seeds)]
    iterator: Iterable = runs
    if progress:
        iterator = tqdm(runs, desc="coordcheck", unit="run")
    results: dict[float, list[dict]] = {w: [] for w in widths}
    for w, s in iterator:
        torch.manual_seed(s)
        model = make_model(w)
        opt = make_optimizer(model)
        results[w].append(measure_model(model, opt, stream(s), probe, steps, loss_fn))
    layers = list(results[widths[0]][0]["pert_rms"].keys())
    for w in widths[1:]:
        if list(results[w][0]["pert_rms"].keys()) != layers:
            raise ValueError(f"the model at width {w:g} has other layers than at {widths[0]:g}")
    metrics = {
        m: {
            layer: [float(np.mean([r[m][layer] for r in results[w]])) for w in widths]
            for layer in layers
        }
        for m in METRICS
    }
    slopes = {m: {layer: slope(widths, metrics[m][layer]) for layer in layers} for m in METRICS}
    keys = list(results[widths[0]][0]["denominator"])
    values = {
        k: [float(np.mean([r["denominator"].get(k, 0.0) for r in results[w]])) for w in widths]
        for k in keys
    }
    denominator = {"values": values, "slopes": {k: slope(widths, v) for k, v in values.items()}}
    out_keys = list(results[widths[0]][0]["outputs"])
    out_values = {
        k: [float(np.mean([r["outputs"].get(k, 0.0) for r in results[w]])) for w in widths]
        for k in out_keys
    }
    outputs = {"values": out_values, "slopes": {k: slope(widths, v) for k, v in out_values.items()}}
    cfg = {"steps": steps, "seeds": seeds, **dict(config or {})}
    return {
        "widths": widths,
        "layers": layers,
        "metrics": metrics,
        "slopes": slopes,
        "denominator": denominator,
        "outputs": outputs,
        "config": cfg,
    }


def slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(value)`` against ``log(width)`` (NaN if a value is <= 0)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(widths, dtype=float)), np.log(v), 1)[0])


def _table(
    title: str, head: str, widths: Sequence[float], rows: Mapping[str, Sequence[float]], slopes
) -> list[str]:
    name_w = max(len(n) for n in [head, *rows]) + 2
    lines = [title, head.ljust(name_w) + "".join(f"{w:>11g}" for w in widths) + "      slope"]
    for name, vals in rows.items():
        s = slopes[name]
        lines.append(
            name.ljust(name_w)
            + "".join(f"{v:>11.3e}" for v in vals)
            + (f"{s:>+11.2f}" if math.isfinite(s) else "        nan")
        )
    return lines + [""]


def format_tables(result: dict[str, Any]) -> str:
    """One table per metric: layers × widths, and the fitted width exponent; then the LP/DP
    denominator per role (when recorded)."""
    widths = result["widths"]
    lines = []
    for m in METRICS:
        rows = {layer: result["metrics"][m][layer] for layer in result["layers"]}
        lines += _table(m, "layer", widths, rows, result["slopes"][m])
    outs = result.get("outputs") or {}
    if outs.get("values"):
        title = "model outputs (RMS on the probe batch; attention logits: scale · q kᵀ)"
        lines += _table(title, "quantity", widths, outs["values"], outs["slopes"])
    den = result.get("denominator") or {}
    if den.get("values"):
        title = "denominator (joint norm of the ascent step, Def. 4: every ε is divided by it)"
        lines += _table(title, "role", widths, den["values"], den["slopes"])
        lines += denominator_verdict(widths, den["values"]["total"])
    return "\n".join(lines)


def denominator_verdict(widths: Sequence[float], total: Sequence[float]) -> list[str]:
    """One line on what the denominator's drift does to ε at a fixed ρ (Def. 4), and what to
    do when it drifts: LP's μP² exponents (Thm 11) assume it is width-independent."""
    ratio = total[0] / total[-1]
    span = f"from width {widths[0]:g} to {widths[-1]:g}"
    if abs(math.log(ratio)) < math.log(1.25):
        return [f"denominator: flat within 25% {span}: ρ's effect does not drift through it", ""]
    return [
        f"denominator: changes {1 / ratio:.2f}x {span}, so a fixed ρ perturbs {ratio:.2f}x as "
        "much at the widest model from this alone; under μP² (LP) the best ρ will drift: use a "
        "wider base width (where the input-like terms dominate) or rule='DP' (Remark F.4)",
        "",
    ]
