"""The sweep grammar, with no Optuna: the grid's points in queue order, the ``setting`` axis
and its pass plans, the canonical configuration of a point (equivalent points share a run),
and the keys that name points and run directories.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .config import TrainConfig


def grid_points(
    grid: Mapping[str, Sequence[Any]], order: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """All combinations, in a stable order: the queue order of a sweep.

    ``order`` names the axes from slowest- to fastest-varying (each value list in its given
    order), so that a long study finishes its most informative points first.  By default
    ``lr`` and ``rho`` vary fastest, so that consecutive queued points can train as one
    vectorized group.
    """
    for k, v in grid.items():
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"grid[{k!r}] must be a non-empty list; got {v!r}")
    if order is None:
        keys = [k for k in grid if k not in ("lr", "rho")] + [k for k in ("lr", "rho") if k in grid]
    else:
        keys = list(order)
        if sorted(keys) != sorted(grid):
            raise ValueError(
                f"order must name every grid axis once; got {keys}, grid axes {sorted(grid)}"
            )
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def check_slice(grid: Mapping[str, Sequence[Any]], only: Mapping[str, Sequence[Any]]) -> None:
    """Validate a slice of ``grid`` (``mupp sweep --only``): every key an axis, every value
    one of that axis's values."""
    for k, values in only.items():
        if k not in grid:
            raise ValueError(f"--only {k}: not an axis of the grid (axes: {sorted(grid)})")
        stray = [v for v in values if v not in grid[k]]
        if stray:
            raise ValueError(f"--only {k}: {stray} not among the grid's values {list(grid[k])}")


def in_slice(point: Mapping[str, Any], only: Mapping[str, Sequence[Any]] | None) -> bool:
    """Whether a grid point lies in the slice ``only`` (no slice: every point does)."""
    return not only or all(point[k] in values for k, values in only.items())


_PASS_OPTIONS = ("ascent", "every", "reuse")  # the TrainConfig fields a pass plan sets


def parse_pass_plan(text: str) -> dict[str, Any]:
    """The training options of a pass plan, the 4th part of a grid setting: ``"two-pass"``
    (SAM's two passes every step: no option), ``"momentum"`` (Momentum-SAM), ``"looksamK"``
    (a full step every K steps, LookSAM between) or ``"everyK"`` (a full step every K steps,
    base steps between).  Inverse of :func:`format_pass_plan`."""
    match = re.fullmatch(r"(looksam|every)([1-9][0-9]*)", text)
    if text == "two-pass":
        return {}
    if text == "momentum":
        return {"ascent": "momentum"}
    if match is None:
        raise ValueError(
            f"a setting's pass plan must be 'two-pass', 'momentum', 'looksamK' or 'everyK' "
            f"(K a positive integer); got {text!r}"
        )
    plan: dict[str, Any] = {"every": int(match.group(2))}
    if match.group(1) == "looksam":
        plan["reuse"] = "looksam"
    return plan


def format_pass_plan(config: Mapping[str, Any]) -> str:
    """The pass plan of a configuration (:func:`parse_pass_plan`'s names)."""
    if config.get("ascent", "gradient") == "momentum":
        return "momentum"
    every = config.get("every", 1)
    if every == 1:
        return "two-pass"
    return f"{'looksam' if config.get('reuse') == 'looksam' else 'every'}{every}"


def expand_point(params: Mapping[str, Any]) -> dict[str, Any]:
    """Training options of a grid point: a ``setting`` axis (``"mup-global/last-layer"``,
    ``"mupp/sam/DP"``, ``"mupp/sam/LP/looksam5"``: the names of
    :func:`mupp.lab.analysis.rows_from_records`) sets ``parameterization``, ``variant`` and
    optionally ``rule`` and a pass plan (:func:`parse_pass_plan`) together, so that a grid
    can compare settings that are not a Cartesian product."""
    out = dict(params)
    setting = out.pop("setting", None)
    if setting is not None:
        parts = setting.split("/") if isinstance(setting, str) else []
        if not 1 <= len(parts) <= 4 or not all(parts):
            raise ValueError(
                "grid setting must be 'PARAMETERIZATION', 'PARAMETERIZATION/VARIANT', "
                "'PARAMETERIZATION/VARIANT/RULE' or 'PARAMETERIZATION/VARIANT/RULE/PASSES'; "
                f"got {setting!r}"
            )
        out["parameterization"] = parts[0]
        out["variant"] = parts[1] if len(parts) > 1 else "sam"
        if len(parts) >= 3:
            out["rule"] = parts[2]
        if len(parts) == 4:
            out.update(parse_pass_plan(parts[3]))
    return out


def standard_model(config: Mapping[str, Any]) -> bool:
    """Whether a run configuration trains the standard network rather than the μP one: no base
    shapes (``base_width`` None) or a model built with ``mup=False`` (the GPT's standard
    network with its base shapes recorded).  Its setting is named ``standard-...``."""
    no_base = "base_width" in config and config["base_width"] is None
    return no_base or (config.get("model_kwargs") or {}).get("mup") is False


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration a grid point trains, with equivalent points made equal.

    Without perturbation (``rho = 0``) the variant and rule play no part and every μP
    parameterization trains the same μP SGD run; at the base width every parameterization
    reduces to standard SAM (paper Sec. 5), and the DP rule to LP (every factor of
    Remark F.4 is 1 there).  Points that coincide share one run.
    """
    cfg = dict(config)
    if cfg.get("rho") == 0:
        cfg["variant"], cfg["rule"] = "sam", "LP"
        for key in (*_PASS_OPTIONS, "reuse_scale"):  # no perturbation: no pass plan either
            cfg.pop(key, None)
        if cfg.get("parameterization") != "sp":
            cfg["parameterization"] = "mupp"
    base = cfg.get("base_width")
    if base is not None and cfg.get("width") == base:
        cfg["parameterization"] = "mupp"
        if cfg.get("rule") == "DP":
            cfg["rule"] = "LP"
    return cfg


def resolve(base: Mapping[str, Any], point: Mapping[str, Any]) -> TrainConfig:
    """The configuration a grid point trains: the sweep's base options with the point's
    (:func:`expand_point`), as a :class:`TrainConfig`; an unknown or mistyped option raises
    naming it.  Every layer after the grid passes this object, not dicts."""
    return TrainConfig.from_dict({**base, **expand_point(point)})


def canonical(cfg: TrainConfig) -> TrainConfig:
    """:func:`canonical_config` of a :class:`TrainConfig`: the run that equivalent grid
    points share."""
    return TrainConfig.from_dict(canonical_config(cfg.to_dict()))


def point_key(params: Mapping[str, Any]) -> str:
    """A short stable identifier of a grid point (16 hex digits of the SHA-1 of its sorted
    JSON): the trial's ``point`` attribute and the run directory's name."""
    return hashlib.sha1(
        json.dumps(dict(sorted(params.items())), sort_keys=True).encode()
    ).hexdigest()[:16]


def run_key(config: Mapping[str, Any]) -> str:
    """The name of a run's directory: the :func:`point_key` of the configuration's entries
    that differ from :class:`TrainConfig`'s defaults, numbers as floats, so that equal
    configurations share one directory however they were spelled (``rule = "LP"`` given or
    left out, ``rho = 0`` or ``0.0``)."""
    defaults = TrainConfig().to_dict()

    def number(v: Any) -> Any:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    return point_key(
        {k: number(v) for k, v in config.items() if k not in defaults or defaults[k] != v}
    )
