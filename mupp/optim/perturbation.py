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

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..shapes import WidthInfo

VARIANTS = ("sam", "asam-elem", "asam-layer", "sam-on", "last-layer", "first-layer")
RULES = ("LP", "DP", "LN", "unnormalized")

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
    raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")


@dataclass
class Bucket:
    """Parameters of one param group on one (device, dtype)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    num: float
    den: float
    rho: float


def buckets(param_groups: Iterable[dict]) -> list[Bucket]:
    """Perturbed parameters with gradients, grouped by param group and (device, dtype)."""
    out = []
    for g in param_groups:
        if not g.get("perturb", True) or g["rho"] == 0:
            continue
        by_dev: dict[tuple, Bucket] = defaultdict(
            lambda g=g: Bucket([], [], g.get("pert_num", 1.0), g.get("pert_den", 1.0), g["rho"])
        )
        for p in g["params"]:
            if p.grad is None or not p.requires_grad:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SAM does not support sparse gradients")
            b = by_dev[(p.device, p.dtype)]
            b.params.append(p)
            b.grads.append(p.grad)
        out.extend(by_dev.values())
    return out


def _directions(
    b: Bucket,
    variant: str,
    ascent_weight_decay: float,
    inplace: bool,
    grad_scale: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """(u_l, t_l, owned) of the table above; ``owned``: u may be scaled in place (it is a
    temporary, or the gradients themselves when ``inplace``).  ``grad_scale`` multiplies the
    gradients first (the inverse loss scale of a ``GradScaler``)."""
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
        norms = torch._foreach_norm(u)
        torch._foreach_mul_(u, wabs)
        return u, list(norms), True
    gnorms = torch._foreach_norm(grads)
    if variant == "asam-layer":
        wnorms = torch._foreach_norm(b.params)
        u = torch._foreach_mul(grads, torch._foreach_mul(wnorms, wnorms))
        return u, list(torch._foreach_mul(wnorms, gnorms)), True
    return grads, list(gnorms), inplace


def scales(
    rule: str,
    norms: torch.Tensor,
    num: torch.Tensor,
    den: torch.Tensor,
    rho: torch.Tensor,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scalar ``s_l`` with ``ε_l = s_l · u_l``: the normalization of each rule.

    ``norms`` holds the norm terms ``t_l`` along dim 0 (one row per tensor; further dims are
    independent problems, e.g. the configurations of a vectorized sweep); ``num``, ``den`` and
    ``rho`` broadcast against it.  ``LP``/``DP``: ``ρ num_l / sqrt(Σ_k den_k² t_k²)`` (Def. 4,
    Remark F.4); ``LN``: ``ρ num_l / t_l`` (Remark F.2); ``unnormalized``: ``ρ num_l``
    (App. F.3).  Returns ``(s, finite)``: where a norm term is not finite, that problem's
    scales are zero and ``finite`` (shape ``norms.shape[1:]``) is ``False``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    finite = torch.isfinite(norms).all(0)
    if rule in ("LP", "DP"):
        total = (den * norms).square().sum(0).sqrt()
        s = rho * num / (total + eps)
    elif rule == "LN":
        s = rho * num / (norms + eps)
    else:
        s = (rho * num).expand_as(norms)
    return torch.where(finite, s, torch.zeros_like(s)), finite


def perturb_(
    bucket_list: list[Bucket],
    *,
    rule: str,
    variant: str,
    eps: float = 1e-12,
    ascent_weight_decay: float = 0.0,
    inplace: bool = False,
    grad_scale: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Compute ε for every bucket and add it to the weights.

    ``grad_scale`` (a tensor, no host sync) multiplies the gradients before anything else: the
    inverse loss scale of mixed precision, which the normalized rules cancel but the
    unnormalized rule and ``ascent_weight_decay`` do not.

    Returns ``(params, epsilons, finite)``; ``finite`` is a 0-dim bool tensor (no host sync),
    ``False`` when a gradient was non-finite, in which case every scale is zero.  With
    ``inplace`` the gradients are overwritten (the caller discards them).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    if not bucket_list:
        return [], [], None
    dirs = [_directions(b, variant, ascent_weight_decay, inplace, grad_scale) for b in bucket_list]
    dev = bucket_list[0].params[0].device
    norms = torch.stack([t.float().to(dev, non_blocking=True) for _, ts, _ in dirs for t in ts])

    def per_tensor(attr: str) -> torch.Tensor:
        values = [getattr(b, attr) for b, (_, ts, _) in zip(bucket_list, dirs) for _ in ts]
        return torch.tensor(values, dtype=torch.float32).to(dev, non_blocking=True)

    s, finite = scales(rule, norms, per_tensor("num"), per_tensor("den"), per_tensor("rho"), eps)
    s = s.unbind()
    all_params, all_eps = [], []
    i = 0
    for b, (u, ts, owned) in zip(bucket_list, dirs):
        dtype = b.params[0].dtype
        scale = [t.to(dtype) for t in s[i : i + len(ts)]]
        i += len(ts)
        if owned:
            torch._foreach_mul_(u, scale)
        else:
            u = torch._foreach_mul(u, scale)
        all_params.extend(b.params)
        all_eps.extend(u)
    return all_params, all_eps, finite
