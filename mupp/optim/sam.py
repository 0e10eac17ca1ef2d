"""``mupp.SAM``: a drop-in ``torch.optim`` optimizer for SAM under SP, μP and μP².

Two passes per step (Foret et al.; paper Sec. 1): ``first_step`` adds ε (the perturbation rule
of :mod:`mupp.optim.perturbation`, scaled per layer by :mod:`mupp.scaling` with exponents from
:mod:`mupp.theory`), the user recomputes the gradient at ``W + ε``, and ``second_step`` restores
the exact saved weights and lets the base optimizer step with that gradient.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import scaling
from ..choices import (
    ASCENTS,
    JOINT_RULES,
    NONFINITE,
    PARAMETERIZATIONS,
    REUSES,
    RULES,
    VARIANTS,
    Ascent,
    NonFinite,
    Parameterization,
    Reuse,
    Rule,
    Variant,
    check_choice,
    check_nonneg,
    check_positive_int,
)
from ..shapes import get_info, reattach
from . import perturbation
from .groups import momentum_state_key, mup_param_groups, optimizer_kind, split_groups
from .perturbation import THEORY_VARIANT

# the base optimizer's state entry of LookSAM's reused direction (saved with its state dict)
REUSE_KEY = "looksam_direction"
REUSE_NORM_KEY = "looksam_direction_norm"  # its Frobenius norm, a 0-dim tensor

WEIGHT_MULTIPLIER_PRESETS = {
    "mup": {"output": 1.0},  # microsoft/mup's MuReadout multiplier 1/m (Lemma F.12)
    "a-mupp": {"input": -0.5, "output": 0.5},  # (a-μP²), Remark 12 / Lemma F.11
}


def check_schedule(ascent: Any, every: Any, reuse: Any, reuse_scale: Any) -> None:
    """Check the options of cheap SAM (``ascent``, ``every``, ``reuse``, ``reuse_scale`` of
    :class:`SAM`) and their combination; raises ``ValueError`` naming the argument."""
    check_choice("ascent", ascent, ASCENTS)
    check_positive_int("every", every)
    check_nonneg("reuse_scale", reuse_scale)
    if reuse is not None:
        check_choice("reuse", reuse, REUSES)
        if every == 1:
            raise ValueError(
                f"reuse={reuse!r} reuses the last full SAM step's change of the gradient on the "
                "steps between full steps: it needs every=k with k >= 2 (LookSAM uses every=5)"
            )
    if ascent == "momentum" and every != 1:
        raise ValueError(
            f"every={every!r} schedules full gradient-ascent steps; ascent='momentum' already "
            "takes one pass per step: use every=1 with it"
        )


def _check_arguments(
    base_optimizer: Any,
    *,
    lr: Any,
    rho: Any,
    parameterization: Any,
    rule: Any,
    variant: Any,
    nonfinite: Any,
    ascent_weight_decay: Any,
    norm_eps: Any,
    weight_multipliers: Mapping[str, float] | str | None,
    ascent: Any,
    every: Any,
    reuse: Any,
    reuse_scale: Any,
    base_kwargs: Mapping[str, Any],
) -> dict[str, float]:
    """Check :class:`SAM`'s arguments before anything is built; returns the weight multipliers
    as ``{role: a}`` (a preset name resolved)."""
    check_nonneg("lr", lr)
    check_nonneg("rho", rho)
    check_nonneg("ascent_weight_decay", ascent_weight_decay)
    check_nonneg("norm_eps", norm_eps)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    check_choice("rule", rule, RULES)
    check_choice("variant", variant, VARIANTS)
    check_choice("nonfinite", nonfinite, NONFINITE)
    check_schedule(ascent, every, reuse, reuse_scale)
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise ValueError(
            f"base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD); "
            f"got {base_optimizer!r}"
        )
    if variant.startswith("asam") and rule != "LP":
        raise ValueError(
            f"rule {rule!r} is defined for variant 'sam' and its subsets; {variant!r} needs rule='LP'"
        )
    accepted = inspect.signature(base_optimizer).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    if "eps" in base_kwargs and "eps" not in accepted and not takes_any:
        raise ValueError(
            f"eps: {base_optimizer.__name__} takes no eps; the stabilizer of SAM's ascent norm "
            f"is norm_eps (SAM(..., norm_eps={base_kwargs['eps']!r}))"
        )
    if isinstance(weight_multipliers, str):
        check_choice("weight_multipliers", weight_multipliers, tuple(WEIGHT_MULTIPLIER_PRESETS))
        weight_multipliers = WEIGHT_MULTIPLIER_PRESETS[weight_multipliers]
    return dict(weight_multipliers or {})


@dataclass
class PendingStep:
    """SAM's state between :meth:`SAM.first_step` and :meth:`SAM.second_step` (or
    :meth:`SAM.restore`): what the ascent step changed, and how to undo it exactly.

    Attributes:
        kind: what ε was built along: ``"gradient"`` (two-pass SAM, LookSAM's full steps),
            ``"momentum"`` (Momentum-SAM) or ``"none"`` (a step between ``every=k`` full steps,
            or the first Momentum-SAM step: no ε).
        params: the perturbed tensors, at ``W + ε`` (the local shards under FSDP2).
        owners: the parameter each of ``params`` belongs to (for :meth:`SAM.perturbation`).
        saved: the weights ``W``: the original storages when ``swapped``, else copies.
        swapped: restore by swapping storages back (no copy) instead of copying ``saved``.
        finite: 0-dim bool tensor, ``False`` when an ascent direction was not finite (the
            whole step is then skipped); ``None`` when nothing was perturbed.
        kept: LookSAM's full step: ``(parameter, reuse buffer)`` pairs holding the gradient
            at ``W``, turned into the reused component after the descent pass.
    """

    kind: str
    params: list[torch.Tensor]
    owners: list[torch.Tensor]
    saved: list[torch.Tensor]
    swapped: bool
    finite: torch.Tensor | None
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization with layerwise perturbation scaling (Def. 4, Thm 11).

    Args:
        params: parameters or param groups (a group may set its own ``rho``).
        base_optimizer: a ``torch.optim.Optimizer`` class (SGD, AdamW, ...); ``base_kwargs`` go
            to it.  Its μP learning-rate factors follow from its kind (SGD-like or Adam-like).
        lr: base learning rate η (at base width).
        rho: perturbation radius ρ (at base width).
        parameterization: ``"sp"`` (no width scaling), ``"mup-naive"`` (μP learning rates, ε
            unscaled: unstable at large width, Prop. 1), ``"mup-global"`` (``ρ m^{-1/2}``,
            only the readout is effectively perturbed, Prop. 2) or ``"mupp"`` (μP², Thm 11).
        rule: ``"LP"`` (Def. 4), ``"DP"`` (Remark F.4, Algorithm 1), ``"LN"`` (Remark F.2),
            ``"unnormalized"`` (App. F.3).
        variant: ``"sam"``, ``"asam-elem"``, ``"asam-layer"``, ``"sam-on"``, ``"last-layer"``,
            ``"first-layer"`` (Table 1, App. F.4, H.1, Example F.1).
        perturb: general form: a set of roles, or a predicate on
            :class:`~mupp.shapes.WidthInfo`, naming the parameters perturbed effectively; the
            exponents follow App. F.1 and the others are not perturbed.
        weight_multipliers: ``{role: a}`` for models with weight multipliers ``m^-a`` (App. F.6),
            or ``"mup"`` (readout multiplier of microsoft/mup) / ``"a-mupp"``.
        ascent_weight_decay: adds ``wd * W`` to the gradient used for ε only.
        norm_eps: added to the norm that normalizes the ascent direction (the paper's
            ``N``), so that a zero gradient gives ``ε = 0``.  (``eps`` goes to the base
            optimizer, e.g. Adam's ``eps``.)
        nonfinite: what to do when a gradient of either pass is non-finite: ``"skip"`` the
            step (weights restored, base optimizer untouched, ``skipped_steps`` incremented),
            ``"raise"`` ``FloatingPointError`` after restoring, or ``"ignore"`` (no check; the
            check is the only host synchronization of a step).
        same_randomness: in :meth:`step`, replay the RNG state for the second closure call so
            dropout masks are the same in both passes.
        ascent: where ε points: ``"gradient"`` (a fresh gradient at ``W``: two passes) or
            ``"momentum"`` (Momentum-SAM, Becker et al. 2024: ``u_l = -v_l``, the base
            optimizer's momentum, SGD's ``momentum_buffer`` or Adam's first moment; one
            forward and one backward per step, at ``W + ε``).  Either way ε is scaled by the
            same layerwise factors (Def. 4): ``v_l`` is a fixed linear combination of past
            gradients, so it has the gradient's width exponents.
        every: a full two-pass SAM step every ``every`` steps (``ascent="gradient"``); the
            steps between take one pass at ``W``, with ``reuse``.
        reuse: what the steps between full steps add to their gradient: ``None`` (nothing: a
            base step) or ``"looksam"`` (LookSAM, Liu et al. 2022, per layer: the component
            ``g_v,l`` of the last full step's SAM gradient orthogonal to its gradient, as
            ``g_l + reuse_scale · ||g_l|| g_v,l / ||g_v,l||``; see :meth:`second_step`).
        reuse_scale: LookSAM's α (0.7 in Liu et al.).
        model: optional; re-attaches width metadata (after ``copy.deepcopy`` or sharding).

    Param groups are shared with the base optimizer (so LR schedulers work on either) and are
    saved by :meth:`state_dict`.  Besides the base optimizer's keys, each group carries:

    - ``rho``: the group's base perturbation radius (editable, like ``lr``);
    - ``lr_factor``, ``wd_factor``: the μP factors of the group's learning rate and weight
      decay relative to base width (:mod:`mupp.scaling`; ``lr`` already includes them);
    - ``perturb``: whether the group is perturbed at all (the variant's choice, App. F.1);
    - ``pert_num``, ``pert_den``: the layerwise numerator and denominator factors of the rule
      (:func:`mupp.scaling.perturbation_factors`): ``ε_l = ρ pert_num u_l / N`` with
      ``N = sqrt(Σ pert_den² t_k²)`` for LP/DP (:mod:`mupp.optim.perturbation`).

    :meth:`load_state_dict` refuses a state dict whose ``perturb``/``pert_*`` or state shapes
    differ (another width).
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        lr: float,
        rho: float,
        parameterization: Parameterization = "mupp",
        rule: Rule = "LP",
        variant: Variant = "sam",
        perturb: perturbation.Perturb = None,
        weight_multipliers: Mapping[str, float] | str | None = None,
        ascent_weight_decay: float = 0.0,
        norm_eps: float = 1e-12,
        nonfinite: NonFinite = "skip",
        same_randomness: bool = False,
        ascent: Ascent = "gradient",
        every: int = 1,
        reuse: Reuse | None = None,
        reuse_scale: float = 0.7,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        weight_multipliers = _check_arguments(
            base_optimizer,
            lr=lr,
            rho=rho,
            parameterization=parameterization,
            rule=rule,
            variant=variant,
            nonfinite=nonfinite,
            ascent_weight_decay=ascent_weight_decay,
            norm_eps=norm_eps,
            weight_multipliers=weight_multipliers,
            ascent=ascent,
            every=every,
            reuse=reuse,
            reuse_scale=reuse_scale,
            base_kwargs=base_kwargs,
        )
        if model is not None:
            reattach(model)
        self.parameterization = parameterization
        self.rule = rule
        self.variant = variant
        self.norm_eps = norm_eps
        self.nonfinite = nonfinite
        self.same_randomness = same_randomness
        self.ascent_weight_decay = ascent_weight_decay
        self.weight_multipliers = weight_multipliers
        self.ascent = ascent
        self.every = every
        self.reuse = reuse
        self.reuse_scale = reuse_scale
        self.skipped_steps = 0
        self._step: PendingStep | None = None  # between first_step and second_step

        groups = mup_param_groups(
            params,
            lr,
            optimizer_kind(base_optimizer),
            "sp" if parameterization == "sp" else "mupp",
            base_kwargs.pop("weight_decay", None),
            self.weight_multipliers,
        )
        for g in groups:
            g.setdefault("rho", rho)
            check_nonneg("rho (param group)", g["rho"])
            g["rho"] = float(g["rho"])  # a 0-dim tensor too: one type from here on
            if every > 1:
                g.setdefault("sam_step", 0)
        if reuse is not None and any(
            perturbation._is_dtensor(p) for g in groups for p in g["params"]
        ):
            raise ValueError(
                f"reuse={reuse!r} keeps a per-layer direction in the optimizer state that mupp "
                "does not shard yet; under FSDP2 use reuse=None or ascent='momentum'"
            )
        super().__init__(
            self._perturbation_groups(groups, perturb),
            dict(lr=lr, rho=float(rho), **base_kwargs),
        )
        self.base_optimizer = base_optimizer(self.param_groups, lr=lr, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        # the state entry of the momentum (refuses an optimizer without one, before any step)
        self._momentum_key = (
            momentum_state_key(self.base_optimizer) if ascent == "momentum" else None
        )

    def _perturbation_groups(self, groups: list[dict], perturb: perturbation.Perturb) -> list[dict]:
        """Split ``groups`` so that every group has one ``perturb``, ``pert_num`` and
        ``pert_den`` (the layerwise factors of the rule, App. F.1); sets ``self.exponents``
        (``None`` under SP) and ``self.global_mult`` (the model's width multiplier ``M``)."""
        all_params = [p for g in groups for p in g["params"]]
        infos = {id(p): get_info(p) for p in all_params}
        selected = {
            id(p): perturbation.is_perturbed(infos[id(p)], self.variant, perturb)
            for p in all_params
        }
        if all_params and not any(selected.values()):
            raise ValueError(
                f"variant {self.variant!r} perturbs no parameter of this model (last-layer: no "
                "output-like readout; a readout tied to the input embedding is input-like, so "
                "untie it to perturb the readout alone; sam-on: no normalization layer); "
                "check the roles with mupp.describe(model)"
            )
        theory_variant, roles = THEORY_VARIANT[self.variant]
        if perturb is not None:
            roles = {infos[id(p)].role for p in all_params if selected[id(p)]} - {"fixed"}
        self.exponents = None
        # a multiplier recorded with the base shapes (a prepared readout) counts as if given
        self.weight_multipliers = scaling.model_multipliers(infos.values(), self.weight_multipliers)
        if self.parameterization != "sp":
            self.exponents = scaling.perturbation_exponents(
                theory_variant, self.parameterization, roles or None, self.weight_multipliers
            )
        self.global_mult = max([i.width_mult for i in infos.values() if i is not None] or [1.0])

        def key(p: torch.Tensor, g: dict) -> tuple:
            info = infos[id(p)]
            num, den = 1.0, 1.0
            if self.exponents is not None and info is not None:
                num, den = scaling.perturbation_factors(
                    info,
                    rule=self.rule,
                    parameterization=self.parameterization,
                    exponents=self.exponents,
                    global_mult=self.global_mult,
                    weight_multipliers=self.weight_multipliers,
                )
            return (("perturb", selected[id(p)]), ("pert_num", num), ("pert_den", den))

        return split_groups(groups, key)

    # ------------------------------------------------------------------ the two passes

    @property
    def needs_ascent_gradient(self) -> bool:
        """Whether the next step is a full two-pass step, whose :meth:`first_step` perturbs
        along a fresh gradient at ``W`` (run that backward pass first).  ``False`` for
        ``ascent="momentum"`` and for the steps between the full steps of ``every=k``: their
        :meth:`first_step` needs no gradient, and the step takes one forward and one backward
        pass, after it.  :meth:`step` with a closure asks this itself."""
        if self.ascent != "gradient":
            return False
        return self.every == 1 or self.param_groups[0].get("sam_step", 0) % self.every == 0

    def _direction_source(self) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """What the next :meth:`first_step` perturbs along, for :func:`perturbation.buckets`:
        the gradient, the momentum, or ``None`` (no perturbation: between full steps)."""
        if self.ascent == "momentum":
            state, key = self.base_optimizer.state, self._momentum_key
            return lambda p: state[p].get(key) if p in state else None
        if not self.needs_ascent_gradient:
            return None
        return lambda p: p.grad

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: Any = None) -> None:
        """Perturb the weights: save each perturbed ``W`` and set ``W <- W + ε``.

        On a full step (:attr:`needs_ascent_gradient`) ε is built from the gradients at ``W``;
        under ``ascent="momentum"`` from the base optimizer's momentum (nothing at the first
        step, when there is none yet); between the full steps of ``every=k`` there is no ε.
        With ``zero_grad=True`` the gradients are consumed in place (no extra memory) and
        zeroed afterwards, ready for the second backward pass.  With a ``torch.amp.GradScaler``
        as ``scaler`` (gradients of ``scaler.scale(loss)``), ε is built from the unscaled
        gradients: every rule and variant then equals the unscaled computation (the
        unnormalized rule and ``ascent_weight_decay`` depend on the gradient's scale).
        """
        if self._step is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are already perturbed"
            )
        source = self._direction_source()
        kind = "none" if source is None else self.ascent
        bl = [] if source is None else perturbation.buckets(self.param_groups, source)
        kept = (
            self._keep_ascent_gradients() if kind == "gradient" and self.reuse is not None else []
        )
        momentum = kind == "momentum"
        # ε along the momentum cannot be built in the gradients' storage: it goes into
        # buffers kept for the next step (no allocation per step)
        into = None
        if momentum:
            into = [
                _buffer(self.state[o], "eps", t) for b in bl for o, t in zip(b.owners, b.params)
            ]
        params, eps, finite = perturbation.perturb_(
            bl,
            rule=self.rule,
            variant=self.variant,
            norm_eps=self.norm_eps,
            ascent_weight_decay=self.ascent_weight_decay,
            inplace=zero_grad and not momentum,  # a momentum buffer is the base optimizer's
            grad_scale=None if momentum else _inverse_scale(scaler),  # the state is unscaled
            sign=-1.0 if momentum else 1.0,  # Momentum-SAM perturbs against the momentum
            into=into,
        )
        # With zero_grad the ε tensors are the consumed gradients (or temporaries): turn them
        # into W + ε in place and swap storages, so W itself is the saved copy and restoring
        # is a pointer swap (no copies).  Slices of larger storages take the copy path.
        owners = [p for b in bl for p in b.owners]
        swap = (
            (zero_grad or momentum)  # the momentum's W + ε sits in SAM's own buffers
            and bool(params)
            and not any(b.sharded for b in bl)  # FSDP2 reads its own shard buffers: copy
            and all(
                type(e) is torch.Tensor
                and _owns_storage(e)  # not a slice of e.g. a DDP gradient bucket
                and _owns_storage(p)  # not a slice of e.g. an FSDP flat parameter
                and e.stride() == p.stride()
                for p, e in zip(params, eps)
            )
        )
        if swap:
            if not momentum:  # ε -> W + ε (the momentum path wrote W + ε already)
                torch._foreach_add_(eps, params)
            saved = [p.data for p in params]
            for p, e in zip(params, eps):
                if not momentum:
                    p.grad = None  # its storage is now the weights
                p.data = e
        else:
            saved = [_buffer(self.state[owner], "w_saved", p) for owner, p in zip(owners, params)]
            if params:
                torch._foreach_copy_(saved, params)
                if momentum:
                    torch._foreach_copy_(params, eps)  # eps holds W + ε here
                else:
                    torch._foreach_add_(params, eps)
        self._step = PendingStep(kind, params, owners, saved, swap, finite, kept)
        if zero_grad:
            self.zero_grad()

    def _keep_ascent_gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """LookSAM's full step: copy every gradient at ``W`` (not only the perturbed
        parameters': every layer's SAM gradient changes) into its reuse buffer, which
        :meth:`_update_reuse` turns into ``g_v`` in place (no allocation after the first).
        Returns ``(parameter, buffer)`` pairs."""
        base = self.base_optimizer.state
        return [
            (p, _buffer(base[p], REUSE_KEY, p.grad).copy_(p.grad))
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]

    def _update_reuse(self, kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """LookSAM's full step, after the descent pass: per tensor, the component of the SAM
        gradient ``g_s`` orthogonal to the gradient ``g`` at ``W``,
        ``g_v = g_s - (<g_s, g> / ||g||²) g``, kept in the base optimizer's state under
        :data:`REUSE_KEY` (so it is saved with the state dict).  After a non-finite step the
        direction is zero: the steps until the next full step are base steps."""
        kept = [(p, d) for p, d in kept if p.grad is not None]
        if not kept:
            return
        ds = [d for _, d in kept]
        gss = [p.grad for p, _ in kept]
        dots = [torch.dot(d.flatten(), gs.flatten()) for d, gs in zip(ds, gss)]
        norms = torch._foreach_norm(ds)
        coeff = torch._foreach_div(
            dots, torch._foreach_add(torch._foreach_mul(norms, norms), 1e-30)
        )
        torch._foreach_neg_(coeff)
        torch._foreach_mul_(ds, coeff)
        torch._foreach_add_(ds, gss)
        dnorms = torch._foreach_norm(ds)
        if self.nonfinite != "ignore":  # the step's own check synchronizes anyway
            if not bool(torch.isfinite(torch.stack([n.float() for n in dnorms])).all()):
                torch._foreach_zero_(ds)
                dnorms = [torch.zeros_like(n) for n in dnorms]
        base = self.base_optimizer.state
        for (p, _), n in zip(kept, dnorms):  # ||g_v,l||, read by every step until the next
            base[p][REUSE_NORM_KEY] = n

    def _apply_reuse(self) -> None:
        """LookSAM between full steps: ``g_l <- g_l + α ||g_l|| g_v,l / ||g_v,l||`` for every
        tensor with a kept direction.  The added component has each layer's gradient norm
        times α, so it has the gradient's width exponents in every layer and the base
        optimizer's μP learning rates apply to it unchanged."""
        base, grads, dirs, dnorms = self.base_optimizer.state, [], [], []
        for g in self.param_groups:
            for p in g["params"]:
                st = base[p] if p in base else {}
                if p.grad is not None and REUSE_KEY in st and REUSE_NORM_KEY in st:
                    grads.append(p.grad)
                    dirs.append(st[REUSE_KEY])
                    dnorms.append(st[REUSE_NORM_KEY])
        if not grads:
            return
        scale = torch._foreach_div(
            torch._foreach_mul(torch._foreach_norm(grads), self.reuse_scale),
            torch._foreach_add(dnorms, self.norm_eps),
        )
        torch._foreach_addcmul_(grads, dirs, scale)  # no gradient-sized temporaries

    @torch.no_grad()
    def denominator_terms(self) -> list[tuple[torch.Tensor, float]]:
        """``(parameter, den_l t_l)`` for every perturbed parameter, from the directions of the
        next :meth:`first_step` (the current gradients: call after ``backward`` and before
        it; under ``ascent="momentum"`` the momentum; none between full steps): the terms
        whose root sum of squares divides every layer's ε under the LP and DP rules (Def. 4,
        Remark F.4).  μP² is built on this sum staying Θ(1) with width; over finite widths
        it may not yet, and then the effective ρ drifts (see
        :func:`mupp.diagnostics.coord_data`)."""
        if self.rule not in JOINT_RULES:
            raise ValueError(
                f"denominator_terms() needs a jointly normalized rule (LP or DP); this SAM "
                f"uses rule={self.rule!r}"
            )
        source = self._direction_source()
        terms = perturbation.denominator_terms(
            [] if source is None else perturbation.buckets(self.param_groups, source),
            variant=self.variant,
            ascent_weight_decay=self.ascent_weight_decay,
        )
        return [(p, float(t)) for p, t in terms]

    @torch.no_grad()
    def perturbation(self, p: torch.Tensor) -> torch.Tensor | None:
        """ε of parameter ``p`` while a :meth:`first_step` is pending (``None`` if ``p`` is
        not perturbed), for diagnostics."""
        step = self._step
        if step is None:
            raise RuntimeError(
                "perturbation() is only available between first_step() and second_step()"
            )
        for owner, q, saved in zip(step.owners, step.params, step.saved):
            if owner is p:
                return q.detach() - saved
        return None

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the exact weights saved by :meth:`first_step` (no base step)."""
        step = self._step
        if step is None:
            raise RuntimeError(
                "second_step()/restore() called before first_step(): nothing to restore"
            )
        if step.swapped:
            for p, w in zip(step.params, step.saved):
                p.data = w
        elif step.params:
            torch._foreach_copy_(step.params, step.saved)
        self._step = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: Any = None) -> None:
        """Restore the saved weights, then step the base optimizer with the gradient at ``W + ε``.

        With a ``torch.amp.GradScaler`` as ``scaler`` the base step goes through
        ``scaler.step``, which skips it when either pass overflowed (call ``scaler.update()``
        afterwards).
        """
        pending = self._step
        self.restore()  # raises when nothing is pending
        finite1 = pending.finite
        if self.reuse == "looksam":
            if pending.kind == "gradient":
                self._update_reuse(pending.kept)
            else:
                self._apply_reuse()
        if self.every > 1:  # the position in the cycle of full steps (saved with the groups)
            for g in self.param_groups:
                g["sam_step"] = g.get("sam_step", 0) + 1
        grads = [
            perturbation.local_tensor(p.grad)
            for g in self.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        if finite1 is not None and grads and (scaler is not None or self.nonfinite != "ignore"):
            # an overflow in the ascent pass poisons the descent gradient, so that every
            # finiteness check downstream (ours or GradScaler's) skips the whole step
            poison = torch.where(finite1, 1.0, float("nan")).to(grads[0].device)
            _foreach_by_device(grads, lambda gs, dev: torch._foreach_mul_(gs, poison.to(dev)))
        self._opt_called = True  # what an LR scheduler attached to SAM checks for a step
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            if self.nonfinite != "ignore" and grads and not _all_finite(grads):
                self.skipped_steps += 1
                if zero_grad:
                    self.zero_grad()
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        "SAM: non-finite gradient; the step was not taken and the weights are unchanged"
                    )
                return
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """PyTorch convention: ``closure`` zeroes nothing, computes the loss and calls
        ``backward()``; it is evaluated at ``W`` and again at ``W + ε``.  Returns the first
        loss.

        With a :meth:`first_step` pending (manual loops: the descent gradient at ``W + ε`` is
        already in ``.grad``), ``step`` completes it as :meth:`second_step`; a closure given
        then is evaluated once first, at ``W + ε`` (frameworks such as Lightning pass one that
        only runs their hooks), and its value is returned.
        """
        if self._step is not None:
            return self._finish(closure)
        if closure is None:
            raise RuntimeError(
                "SAM.step() needs a closure that computes the loss and calls backward() "
                "(or call first_step() and second_step() yourself; in the Hugging Face Trainer "
                "use mupp.integrations.huggingface.SAMTrainer)"
            )
        closure = torch.enable_grad()(closure)
        if not self.needs_ascent_gradient:  # one pass, at W + ε (momentum) or W (between)
            self.first_step(zero_grad=True)
            return self._finish(closure)
        rng = _rng_state() if self.same_randomness else None
        with self.ascent_pass():
            loss = closure()
        self.first_step(zero_grad=True)
        if rng is not None:
            _set_rng_state(rng)
        self._finish(closure)
        return loss

    def _finish(self, closure: Callable[[], Any] | None) -> Any:
        """Evaluate ``closure`` (if any) at the pending ``W + ε``, restoring the weights if it
        fails, then :meth:`second_step`; returns its value."""
        loss = None
        if closure is not None:
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore()
                raise
        self.second_step()
        return loss

    @contextlib.contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """Run the ascent forward/backward inside this block: parameters that are not
        perturbed (other layers of last-layer SAM, SAM-ON's weights, groups with ``rho = 0``)
        stop requiring gradients, so autograd skips their weight gradients and, for
        last-layer SAM, the whole backward below the readout (Remark 3).  ``step(closure)``
        uses it automatically.  Not for DDP-wrapped models (DDP expects every gradient)."""
        frozen = [
            p
            for g in self.param_groups
            if not perturbation.group_perturbs(g)
            for p in g["params"]
            if p.requires_grad and self.reuse is None  # LookSAM keeps every gradient at W
        ]
        trainable = sum(p.requires_grad for g in self.param_groups for p in g["params"])
        if len(frozen) == trainable:  # nothing perturbed: keep the closure's backward valid
            frozen = []
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum, Adam moments) and the shared param groups
        (with ``rho`` and the per-group scale factors)."""
        return self.base_optimizer.state_dict()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group while SAM is being built (``torch.optim.Optimizer``'s constructor calls
        this); afterwards a new group is refused: its μP learning-rate and perturbation
        factors depend on the whole model's widths and roles (Def. 4), which were fixed when
        SAM was built.  Build SAM with every group instead (a frozen group can start at
        ``lr=0`` and ``rho=0``)."""
        if getattr(self, "base_optimizer", None) is not None:
            raise ValueError(
                "SAM.add_param_group after construction is not supported: a new group's μP "
                "learning-rate and perturbation factors come from the whole model; build SAM "
                "with every param group (a group to unfreeze later can start at lr=0, rho=0)"
            )
        check_nonneg("rho (param group)", param_group.get("rho", self.defaults.get("rho", 0.0)))
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`, after checking that it belongs to this model: the same
        per-group scale factors (``lr``'s μP factor aside, which schedulers change) and state
        tensors of the parameters' shapes.  A state dict of another width is refused, since
        its momentum or Adam moments and factors would silently mismatch."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state_dict has {len(groups)} param groups, this SAM has "
                f"{len(self.param_groups)}: it belongs to another model, width or configuration"
            )
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            check_nonneg(f"optimizer state_dict: param group {i} rho", saved.get("rho", 0.0))
            for key in ("perturb", "pert_num", "pert_den"):
                if key in saved and key in mine and saved[key] != mine[key]:
                    raise ValueError(
                        f"optimizer state_dict: param group {i} has {key}={saved[key]!r}, this "
                        f"SAM {mine[key]!r}: it was saved at another width or parameterization"
                    )
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in state_dict.get("state", {}).items():
            if not isinstance(idx, int) or idx >= len(params):
                continue
            for name, value in st.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if tuple(value.shape) != tuple(params[idx].shape):
                        raise ValueError(
                            f"optimizer state_dict: {name!r} of parameter {idx} has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(params[idx].shape)}: it "
                            "was saved for another width"
                        )
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    def __repr__(self) -> str:
        return (
            f"SAM(base={type(self.base_optimizer).__name__}, parameterization={self.parameterization!r}, "
            f"rule={self.rule!r}, variant={self.variant!r}, groups={len(self.param_groups)})"
        )


def _inverse_scale(scaler: Any) -> torch.Tensor | None:
    """``1 / scale`` of a ``torch.amp.GradScaler`` as a tensor (no host sync), or ``None``."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # before the first scaler.scale(): nothing was scaled
        return None
    return scale.double().reciprocal().float()


def _buffer(state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    """``state[key]``, (re)allocated like ``like`` unless it already has its shape, dtype and
    device: SAM's per-step buffers live as long as the optimizer."""
    buf = state.get(key)
    if (
        buf is None
        or buf.shape != like.shape
        or buf.dtype != like.dtype
        or buf.device != like.device
    ):
        buf = state[key] = torch.empty_like(like, memory_format=torch.preserve_format)
    return buf


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is its storage's only content (swapping it cannot affect other tensors)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _foreach_by_device(tensors: list[torch.Tensor], fn: Callable) -> None:
    """``fn(tensors_of_one_device_and_dtype, device)`` per group of :func:`perturbation.by_device`."""
    for (dev, _), ts in perturbation.by_device(tensors).items():
        fn(ts, dev)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """All finite, on every worker: under torch.distributed the flag is all-reduced, so that
    workers whose ascent passes differed (local perturbations) still agree to skip."""
    flags = []
    _foreach_by_device(
        tensors,
        lambda ts, dev: flags.append(torch.isfinite(torch.stack(torch._foreach_norm(ts))).all()),
    )
    ok = torch.stack([f.to(tensors[0].device) for f in flags]).all().to(torch.int32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _disable_running_stats(model: torch.nn.Module) -> dict:
    saved = {}
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            saved[m] = m.track_running_stats
            m.track_running_stats = False
    return saved


def _enable_running_stats(model: torch.nn.Module, saved: dict) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = saved.get(m, True)


@contextlib.contextmanager
def frozen_bn_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with frozen_bn_stats(model): loss(model(x)).backward()`` keeps the perturbed pass from
    touching BatchNorm running statistics (``num_batches_tracked`` included); normalization
    still uses the batch statistics.  Each layer's setting is restored on exit."""
    saved = _disable_running_stats(model)
    try:
        yield model
    finally:
        _enable_running_stats(model, saved)
