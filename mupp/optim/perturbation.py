"""The perturbation rule: every SAM variant and normalization rule, in one file.

For the parameters ``W_l`` with gradients ``g_l`` at the current weights, SAM adds

    ε_l = ρ · num_l · u_l / N,

where ``u_l`` is the variant's ascent direction and ``t_l`` its norm term

==============  =========================  ================================
variant         ``u_l``                    ``t_l``
==============  =========================  ================================
sam, sam-on,    ``g_l``                    ``||g_l||_F``
last/first
asam-elem       ``|W_l| ⊙ |W_l| ⊙ g_l``    ``|| |W_l| ⊙ g_l ||_F``   (F.4)
asam-layer      ``||W_l||_F^2 g_l``        ``||W_l||_F ||g_l||_F``  (F.6)
==============  =========================  ================================

and the normalization ``N`` depends on the rule: ``LP``/``DP`` normalize jointly,
``N = sqrt(Σ_k den_k² t_k²)`` (Def. 4, Remark F.4); ``LN`` per layer, ``N = t_l``
(Remark F.2); ``unnormalized`` uses ``N = 1`` (App. F.3).  The factors ``num_l``, ``den_l``
come from :func:`mupp.scaling.perturbation_factors` and are stored per param group.

Which parameters are perturbed at all is decided by :func:`is_perturbed`.  The computation
uses ``torch._foreach_*`` kernels per (device, dtype) and never synchronizes with the host:
a non-finite gradient yields a zero scale and a ``False`` finiteness flag (a tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..choices import JOINT_RULES, RULES, VARIANTS, check_choice
from ..shapes import WidthInfo

# variant -> (variant of mupp.theory whose exponents apply, roles perturbed effectively)
THEORY_VARIANT = {
    "sam": ("sam", None),
    "asam-elem": ("asam-elem", None),
    "asam-layer": ("asam-layer", None),
    "sam-on": ("sam-on", {"input"}),
    "last-layer": ("sam", {"output"}),
    "first-layer": ("sam", {"input"}),
}

Perturb = None | set | frozenset | Sequence[str] | Callable[[WidthInfo], bool]


def is_perturbed(info: WidthInfo | None, variant: str, perturb: Perturb = None) -> bool:
    """Whether a parameter is perturbed at all (App. F.1: the others get ε = 0 by design).

    ``perturb`` (the general form) overrides the variant's choice: a set of roles
    (``{"hidden", "output"}``) or a predicate on :class:`~mupp.shapes.WidthInfo`.
    """
    if perturb is not None:
        if info is None:
            raise ValueError("perturb= needs width metadata: call mupp.set_base_shapes first")
        if callable(perturb):
            return bool(perturb(info))
        return info.role in set(perturb)
    if variant in ("sam", "asam-elem", "asam-layer"):
        return True
    if info is None:
        raise ValueError(
            f"variant {variant!r} needs width metadata: call mupp.set_base_shapes first"
        )
    layer = info.layer_role or info.role
    if variant == "sam-on":
        return info.is_norm
    if variant == "last-layer":
        return layer == "output"
    if variant == "first-layer":
        return layer == "input" and not info.is_norm
    check_choice("variant", variant, VARIANTS)
    raise AssertionError(variant)  # every variant is handled above


@dataclass
class Bucket:
    """Parameters of one param group on one (device, dtype)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    num: float
    den: float
    rho: float
    # sharded tensors (FSDP2 DTensors): ``params``/``grads`` hold the local shards, and norms
    # are summed over these process groups (the mesh dimensions the tensors are sharded on)
    shard_groups: tuple = ()
    owners: list = field(default_factory=list)  # the parameters themselves (not their shards)

    @property
    def sharded(self) -> bool:
        """Whether the bucket holds FSDP2 shards (norms then need an all-reduce)."""
        return bool(self.shard_groups)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (FSDP2 parameters and gradients), ``t`` otherwise.
    In-place changes to the shard change the DTensor."""
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _shard_groups(p: torch.Tensor) -> tuple:
    if not _is_dtensor(p):
        return ()
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError("SAM needs parameters that are sharded or replicated, not partial")
    return tuple(p.device_mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard())


def _gradient(p: torch.Tensor) -> torch.Tensor | None:
    return p.grad


def device_key(t: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The unit of one fused ``torch._foreach_*`` call: the SAM step's one grouping key
    (:func:`by_device`; :func:`buckets` refines it by param group and sharding)."""
    return t.device, t.dtype


def by_device(tensors: Iterable[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """``tensors`` grouped by :func:`device_key`."""
    out: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(device_key(t), []).append(t)
    return out


def group_perturbs(group: Mapping[str, Any]) -> bool:
    """Whether a param group is perturbed at all: its variant selects it (``perturb``) and its
    radius is not zero (``rho = 0`` is the base optimizer's step)."""
    return bool(group.get("perturb", True)) and group["rho"] != 0


def buckets(
    param_groups: Iterable[dict],
    source: Callable[[torch.Tensor], torch.Tensor | None] = _gradient,
) -> list[Bucket]:
    """Perturbed parameters with a direction, grouped by param group, (device, dtype) and
    sharding; for sharded parameters (FSDP2) the buckets hold the local shards.  ``source``
    gives a parameter's direction (``Bucket.grads``): its gradient by default, or e.g. the base
    optimizer's momentum (Momentum-SAM); parameters without one are left out."""
    out = []
    for g in param_groups:
        if not group_perturbs(g):
            continue
        by_key: dict[tuple, Bucket] = {}
        for p in g["params"]:
            direction = source(p)
            if direction is None or not p.requires_grad:
                continue
            if direction.is_sparse:
                raise RuntimeError("SAM does not support sparse gradients")
            groups = _shard_groups(p)
            key = (device_key(p), tuple(id(x) for x in groups))
            b = by_key.get(key)
            if b is None:
                b = by_key[key] = Bucket(
                    [], [], g.get("pert_num", 1.0), g.get("pert_den", 1.0), g["rho"], groups
                )
            b.owners.append(p)
            b.params.append(local_tensor(p))
            b.grads.append(local_tensor(direction))
        out.extend(by_key.values())
    return out


def _directions(
    b: Bucket,
    variant: str,
    ascent_weight_decay: float,
    inplace: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], bool]:
    """(u_l, norm parts, owned): the direction of the table above before any factor that
    needs whole-tensor norms, and the *local* Frobenius norms it needs, one list per part
    (``[||u||]``, or ``[||W||, ||g||]`` for asam-layer, whose ``t = ||W|| ||g||`` and whose
    direction takes a further ``||W||²``: :func:`_norm_terms`).  ``owned``: u may be scaled
    in place (a temporary, or the gradients themselves when ``inplace``).  ``grad_scale``
    multiplies the gradients first (the inverse loss scale of a ``GradScaler``)."""
    grads = b.grads
    if grad_scale is not None:
        scale = grad_scale.to(device=grads[0].device, dtype=grads[0].dtype)
        if inplace:
            torch._foreach_mul_(grads, scale)
        else:
            grads = torch._foreach_mul(grads, scale)
            inplace = True
    if ascent_weight_decay:
        grads = torch._foreach_add(grads, b.params, alpha=ascent_weight_decay)
        inplace = True
    if variant == "asam-elem":
        wabs = torch._foreach_abs(b.params)
        if inplace:
            torch._foreach_mul_(grads, wabs)
            u = grads
        else:
            u = torch._foreach_mul(grads, wabs)
        norms = list(torch._foreach_norm(u))
        torch._foreach_mul_(u, wabs)
        return u, [norms], True
    gnorms = list(torch._foreach_norm(grads))
    if variant == "asam-layer":
        return grads, [list(torch._foreach_norm(b.params)), gnorms], inplace
    return grads, [gnorms], inplace


def _whole_norms(bucket_list: list[Bucket], parts: list, dev: torch.device) -> list:
    """Local norms -> norms of whole tensors.  For sharded buckets (FSDP2) the squared local
    norms of every bucket and part are summed over the shard groups in one all-reduce per
    group (one in all on FSDP2's 1-D mesh).  Returns ``parts`` with whole-tensor norms."""
    pending: dict[tuple, list[tuple[int, int]]] = {}
    for i, b in enumerate(bucket_list):
        if b.sharded:
            for j in range(len(parts[i])):
                pending.setdefault(tuple(id(g) for g in b.shard_groups), []).append((i, j))
    if not pending:
        return parts
    for slots in pending.values():
        groups = bucket_list[slots[0][0]].shard_groups
        flat = torch.cat([torch.stack(parts[i][j]).float().to(dev) for i, j in slots]).square()
        for group in groups:
            dist.all_reduce(flat, group=group)
        whole = flat.sqrt().split([len(parts[i][j]) for i, j in slots])
        for (i, j), w in zip(slots, whole):
            parts[i][j] = list(w.unbind())
    return parts


def _norm_terms(variant: str, parts: list[list[torch.Tensor]]) -> tuple[list, list | None]:
    """(t_l, extra factor of u_l or None) from whole-tensor norms (the table above)."""
    if variant == "asam-layer":
        wnorms, gnorms = parts
        return list(torch._foreach_mul(wnorms, gnorms)), list(torch._foreach_mul(wnorms, wnorms))
    return parts[0], None


def _directions_and_terms(
    bucket_list: list[Bucket],
    variant: str,
    ascent_weight_decay: float,
    inplace: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[list, list]:
    """Every bucket's :func:`_directions` and its whole-tensor norm terms (:func:`_norm_terms`)."""
    dirs = [_directions(b, variant, ascent_weight_decay, inplace, grad_scale) for b in bucket_list]
    dev = bucket_list[0].params[0].device
    parts = _whole_norms(bucket_list, [p for _, p, _ in dirs], dev)
    return dirs, [_norm_terms(variant, p) for p in parts]


def denominator_terms(
    bucket_list: list[Bucket], *, variant: str, ascent_weight_decay: float = 0.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, den_l t_l)`` for every perturbed tensor: the terms whose root sum of
    squares is the joint denominator of LP and DP, ``sqrt(Σ_k den_k² t_k²)`` (Def. 4,
    Remark F.4).  μP² assumes this sum stays Θ(1) as width grows (Def. 4's gradient-norm
    condition); a total that drifts with width over the widths a user trains makes the
    effective ρ drift with it.  The gradients are left untouched (for diagnostics)."""
    if not bucket_list:
        return []
    _, terms = _directions_and_terms(bucket_list, variant, ascent_weight_decay, inplace=False)
    return [
        (owner, b.den * t)
        for b, (ts, _) in zip(bucket_list, terms)
        for owner, t in zip(b.owners, ts)
    ]


def scales(
    rule: str,
    norms: torch.Tensor,
    num: torch.Tensor,
    den: torch.Tensor,
    rho: torch.Tensor,
    norm_eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar ``s_l`` with ``ε_l = s_l · u_l``: the normalization of each rule.

    ``norms`` holds the norm terms ``t_l`` along dim 0 (one row per tensor; further dims are
    independent problems, e.g. the configurations of a vectorized sweep); ``num``, ``den`` and
    ``rho`` broadcast against it.  ``LP``/``DP``: ``ρ num_l / sqrt(Σ_k den_k² t_k²)`` (Def. 4,
    Remark F.4); ``LN``: ``ρ num_l / t_l`` (Remark F.2); ``unnormalized``: ``ρ num_l``
    (App. F.3).  Returns ``(s, finite)``: where a norm term is not finite, that problem's
    scales are zero and ``finite`` (shape ``norms.shape[1:]``) is ``False``.  ``rule`` is
    checked where it is chosen (``SAM``, ``TrainConfig``); an unknown one raises here.
    """
    finite = torch.isfinite(norms).all(0)
    if rule in JOINT_RULES:
        total = (den * norms).square().sum(0).sqrt()
        s = rho * num / (total + norm_eps)
    elif rule == "LN":
        s = rho * num / (norms + norm_eps)
    elif rule == "unnormalized":
        s = (rho * num).expand_as(norms)
    else:  # unreachable through SAM and TrainConfig, which check the rule when built
        check_choice("rule", rule, RULES)
    return torch.where(finite, s, torch.zeros_like(s)), finite


def perturb_(
    bucket_list: list[Bucket],
    *,
    rule: str,
    variant: str,
    norm_eps: float = 1e-12,
    ascent_weight_decay: float = 0.0,
    inplace: bool = False,
    grad_scale: torch.Tensor | None = None,
    sign: float = 1.0,
    into: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Compute ε for every bucket (``ε_l = sign · s_l · u_l``) to add to the weights.

    ``grad_scale`` (a tensor, no host sync) multiplies the gradients before anything else: the
    inverse loss scale of mixed precision, which the normalized rules cancel but the
    unnormalized rule and ``ascent_weight_decay`` do not.

    Returns ``(params, epsilons, finite)``; ``finite`` is a 0-dim bool tensor (no host sync),
    ``False`` when a gradient was non-finite, in which case every scale is zero.  With
    ``inplace`` the gradients are overwritten (the caller discards them); without it the
    directions are left untouched (a momentum buffer is the base optimizer's state).  ``into``
    (one tensor per parameter, in bucket order) receives the perturbed weights ``W + ε`` in
    one fused operation per tensor, and is returned in place of the epsilons.
    """
    if not bucket_list:
        return [], [], None
    dirs, terms = _directions_and_terms(
        bucket_list, variant, ascent_weight_decay, inplace, grad_scale
    )
    dev = bucket_list[0].params[0].device
    # scales in float32 for low-precision weights, float64 where a weight is float64
    wide = any(b.params[0].dtype == torch.float64 for b in bucket_list)
    sdtype = torch.float64 if wide else torch.float32
    norms = torch.stack([t.to(dev, sdtype, non_blocking=True) for ts, _ in terms for t in ts])

    def per_tensor(attr: str) -> torch.Tensor:
        values = [getattr(b, attr) for b, (ts, _) in zip(bucket_list, terms) for _ in ts]
        return torch.tensor(values, dtype=sdtype).to(dev, non_blocking=True)

    s, finite = scales(
        rule, norms, per_tensor("num"), per_tensor("den"), per_tensor("rho"), norm_eps
    )
    if sign != 1.0:  # Momentum-SAM steps against the momentum (it points along the gradient)
        s = s * sign
    s = s.unbind()
    all_params, all_eps = [], []
    i = 0
    for b, (u, _, owned), (ts, extra) in zip(bucket_list, dirs, terms):
        dtype = b.params[0].dtype
        scale = s[i : i + len(ts)]
        if extra is not None:
            scale = [a * e.to(a.device) for a, e in zip(scale, extra)]
        scale = [t.to(dtype) for t in scale]
        if into is not None:
            out = into[len(all_eps) : len(all_eps) + len(u)]
            for w, ui, si, oi in zip(b.params, u, scale, out):
                torch.addcmul(w, ui, si, out=oi)  # W + s u: one pass, no temporary
            u = out
        elif owned:
            torch._foreach_mul_(u, scale)
        else:
            u = torch._foreach_mul(u, scale)
        i += len(ts)
        all_params.extend(b.params)
        all_eps.extend(u)
    return all_params, all_eps, finite
