"""μP param groups for any base optimizer (paper App. F.5, F.7), and MuSGD / MuAdamW.

Each user param group is split by per-parameter factors (as microsoft/mup does), so a plain
``torch.optim`` optimizer and any LR scheduler that rescales ``initial_lr`` keep working.  The
factors come from :mod:`mupp.scaling`; this module only groups parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import scaling
from ..choices import PARAMETERIZATIONS, check_choice, check_nonneg
from ..shapes import require_info


def optimizer_kind(base_optimizer: type | str) -> str:
    """``"adam"`` for Adam-like optimizers (entrywise-normalized updates), else ``"sgd"``."""
    name = base_optimizer if isinstance(base_optimizer, str) else base_optimizer.__name__
    low = name.lower()
    adam_like = (
        "adam",
        "rmsprop",
        "adagrad",
        "adadelta",
        "lamb",
        "lion",
        "adafactor",
        "nadam",
        "radam",
    )
    return "adam" if any(k in low for k in adam_like) else "sgd"


def momentum_state_key(optimizer: torch.optim.Optimizer) -> str:
    """The state entry holding ``optimizer``'s momentum, the direction of Momentum-SAM:
    ``"momentum_buffer"`` for ``torch.optim.SGD`` with ``momentum > 0`` in every group, and
    ``"exp_avg"`` (the first moment) for Adam-like optimizers with ``betas[0] > 0``.  Both are
    fixed linear combinations of past gradients.  Raises ``ValueError`` for any other
    optimizer or a momentum of zero."""
    name = type(optimizer).__name__
    groups = optimizer.param_groups
    if all("betas" in g for g in groups):
        if all(g["betas"][0] > 0 for g in groups):
            return "exp_avg"
        got = f"betas[0]={min(g['betas'][0] for g in groups)}"
    elif isinstance(optimizer, torch.optim.SGD):
        if all(g.get("momentum", 0) > 0 for g in groups):
            return "momentum_buffer"
        got = f"momentum={min(g.get('momentum', 0) for g in groups)}"
    else:
        got = "no momentum mupp knows how to read"
    raise ValueError(
        f"ascent='momentum' perturbs along the base optimizer's momentum; {name} has {got}: "
        "use torch.optim.SGD with momentum > 0 (e.g. 0.9) or an Adam-like optimizer with "
        "betas[0] > 0, or ascent='gradient'"
    )


def normalize_param_groups(params: Any, defaults: Mapping[str, Any]) -> list[dict]:
    """Accept an iterable of tensors, of ``(name, tensor)`` pairs, or of dicts (param groups)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of Tensors or dicts, not a single Tensor")
    items = list(params)
    if not items:
        raise ValueError("params is an empty list: the optimizer got no parameters")
    if isinstance(items[0], dict):
        groups = [dict(g) for g in items]
    elif isinstance(items[0], tuple):
        groups = [{"params": [p for _, p in items]}]
    else:
        groups = [{"params": items}]
    for g in groups:
        if "params" not in g:
            raise ValueError("each param group needs a 'params' key")
        ps = g["params"]
        g["params"] = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for k, v in defaults.items():
            g.setdefault(k, v)
    return groups


def split_groups(
    groups: list[dict],
    key: Callable[[torch.Tensor, dict], tuple[tuple[str, Any], ...]],
) -> list[dict]:
    """Split each group so that all parameters of a new group share ``key(p, group)``; the
    key's (name, value) pairs are written into the new group."""
    out: list[dict] = []
    for g in groups:
        buckets: dict[tuple, dict] = {}
        for p in g["params"]:
            k = key(p, g)
            if k not in buckets:
                new = {kk: vv for kk, vv in g.items() if kk != "params"}
                new.update(dict(k))
                new["params"] = []
                buckets[k] = new
            buckets[k]["params"].append(p)
        out.extend(buckets.values())
    return out


def mup_param_groups(
    params: Iterable,
    lr: float,
    kind: str = "sgd",
    parameterization: str = "mupp",
    weight_decay: float | None = None,
    weight_multipliers: Mapping[str, float] | None = None,
    scale_weight_decay: bool = True,
) -> list[dict]:
    """Param groups with μP learning rates ``lr * lr_factor`` (and weight decay divided by the
    factor so that ``lr * wd`` is width-independent).  ``"sp"`` keeps every factor at 1.
    Groups record ``lr_factor`` so tools can read it back."""
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_nonneg("lr", lr)
    defaults: dict[str, Any] = {"lr": lr}
    if weight_decay is not None:
        check_nonneg("weight_decay", weight_decay)
        defaults["weight_decay"] = weight_decay
    groups = normalize_param_groups(params, defaults)

    def key(p: torch.Tensor, g: dict) -> tuple:
        if parameterization == "sp":
            return (("lr_factor", 1.0), ("wd_factor", 1.0))
        info = require_info(p)
        return (
            ("lr_factor", scaling.lr_factor(info, kind, weight_multipliers)),
            ("wd_factor", scaling.weight_decay_factor(info, kind, weight_multipliers)),
        )

    out = split_groups(groups, key)
    for g in out:
        g["lr"] = g["lr"] * g["lr_factor"]
        wd_factor = g.pop("wd_factor")
        if scale_weight_decay and "weight_decay" in g and wd_factor != 1.0:
            g["weight_decay"] = g["weight_decay"] * wd_factor
    return out


def MuSGD(
    params: Iterable, lr: float, parameterization: str = "mupp", **kwargs: Any
) -> torch.optim.SGD:
    """``torch.optim.SGD`` with μP learning rates (SGD factor ``fan_out/fan_in``, App. F.7)."""
    wm = kwargs.pop("weight_multipliers", None)
    wd = kwargs.pop("weight_decay", None)
    groups = mup_param_groups(params, lr, "sgd", parameterization, wd, wm)
    return torch.optim.SGD(groups, lr=lr, **kwargs)


def MuAdamW(
    params: Iterable, lr: float, parameterization: str = "mupp", **kwargs: Any
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with μP learning rates (Adam factor ``1/fan_in``, App. F.7); decoupled
    weight decay is divided by the same factor, so at multiplier 1 this is exactly AdamW."""
    wm = kwargs.pop("weight_multipliers", None)
    wd = kwargs.pop("weight_decay", 1e-2)
    groups = mup_param_groups(params, lr, "adam", parameterization, wd, wm)
    return torch.optim.AdamW(groups, lr=lr, **kwargs)
