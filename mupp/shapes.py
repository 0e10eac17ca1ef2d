"""Width bookkeeping: which dimensions of each parameter grow with width, and its role.

``set_base_shapes(model, base, delta)`` compares a model with a base model (and optionally a
delta model of a third width) and records, per parameter, a :class:`WidthInfo`: shape, base
shape, width dimensions, ``fan_in``/``fan_out`` and their multipliers, and the role
(paper App. F.5, F.7):

- ``input``: only ``fan_out`` grows (first layer, biases, normalization gains, embeddings);
- ``hidden``: both grow (hidden Linear/Conv, attention projections incl. fused qkv);
- ``output``: only ``fan_in`` grows (readout);
- ``fixed``: neither grows.

The record is findable from each Parameter (a weak registry plus a ``p.infshape`` view that code
written for microsoft/mup understands) and from the model (``model._mupp_shapes``, keyed by
name), so :func:`reattach` restores it after ``copy.deepcopy`` or loading.
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .choices import ROLES, check_choice
from .mup_interop import InfDim, InfShape, read_bsh, write_bsh

# How a role was found: "override" (declared by the user), "layer" (the layout of a known layer
# type: Linear, Conv, Embedding, norms, attention, Hugging Face Conv1D), "vector" (a tensor of
# at most one dimension), "mup" (microsoft/mup's convention for a tensor seen without its
# module), "guess" (a free tensor of 2+ dimensions whose layout no module declares).
ROLE_SOURCES = ("override", "layer", "vector", "mup", "guess")
_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_REGISTRY = WeakIdKeyDictionary()  # Parameter -> WidthInfo, by identity


def strip_prefixes(name: str) -> str:
    """Remove wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile,
    ``_fsdp_wrapped_module.`` of FSDP, ``_checkpoint_wrapped_module.`` of activation
    checkpointing), wherever they stand in the name."""
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre) :], True
            name = name.replace("." + pre, ".")
    return name


# ---------------------------------------------------------------------------------------------
# WidthInfo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WidthInfo:
    """Width metadata of one parameter (see module docstring)."""

    name: str
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    width_dims: tuple[bool, ...]
    fan_in: int
    fan_out: int
    base_fan_in: int
    base_fan_out: int
    role: str
    is_norm: bool = False
    layer_role: str = ""  # role of the owning module's weight (a readout's bias: "output")
    source: str = "layer"  # how the role was found: see ROLE_SOURCES
    # exponent ``a`` of the weight multiplier ``m^-a`` that the model's forward pass applies to
    # this tensor (App. F.6): 1 for a readout with output multiplier 1/m (mup's MuReadout)
    multiplier: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def fan_in_mult(self) -> float:
        """``fan_in / base_fan_in``."""
        return self.fan_in / self.base_fan_in

    @property
    def fan_out_mult(self) -> float:
        """``fan_out / base_fan_out``."""
        return self.fan_out / self.base_fan_out

    @property
    def width_mult(self) -> float:
        """The multiplier ``m`` of the role's width dimension: ``fan_out`` for input-like,
        ``fan_in`` for hidden- and output-like (mup's convention), 1 for fixed."""
        if self.role == "input":
            return self.fan_out_mult
        if self.role in ("hidden", "output"):
            return self.fan_in_mult
        return 1.0

    @property
    def infshape(self) -> InfShape:
        """A mup-style ``InfShape`` view of this record (for code written against mup)."""
        view = InfShape(
            InfDim(b if w else None, s)
            for b, s, w in zip(self.base_shape, self.shape, self.width_dims)
        )
        view.info = self  # travels with copies and pickles of the parameter
        return view


def _is_hf_conv1d(module: nn.Module | None) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2 family): a linear layer whose weight is (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _fan_dims(
    module: nn.Module | None, pname: str, ndim: int, width: tuple[bool, ...] = ()
) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """(fan_in dims, fan_out dims, source) of a parameter tensor (source: see ROLE_SOURCES).

    Known layer types declare their layout.  A free tensor of 2+ dimensions (a ``cls_token``
    1×1×D, a ``pos_embed`` 1×N×D, a raw weight matrix) has none: it follows microsoft/mup's
    convention, that a tensor with exactly one width dimension is vector-like (an embedding,
    input-like: that dimension is its fan_out), and otherwise PyTorch's (out, in, ...) layout.
    """
    if ndim == 0:
        return (), (), "vector"
    if ndim == 1:
        return (), (0,), "vector"
    rest = tuple(range(1, ndim))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and pname == "weight":
        return (0,), (1,), "layer"
    if _is_hf_conv1d(module) and pname == "weight":
        return (0,), (1,), "layer"
    if isinstance(module, nn.modules.conv._ConvNd) and pname == "weight":
        if module.transposed:  # (in, out / groups, *kernel)
            return (0,) + tuple(range(2, ndim)), (1,), "layer"
        return rest, (0,), "layer"
    if isinstance(module, (nn.Linear, nn.Bilinear)) and pname == "weight":
        return rest, (0,), "layer"
    if isinstance(module, nn.MultiheadAttention) and pname.endswith("_weight"):
        return rest, (0,), "layer"
    grows = [i for i in range(ndim) if i < len(width) and width[i]]
    source = "guess" if module is not None else "mup"
    if len(grows) == 1:
        return tuple(i for i in range(ndim) if i != grows[0]), (grows[0],), source
    return rest, (0,), source


def _role(fan_in_grows: bool, fan_out_grows: bool) -> str:
    if fan_in_grows and fan_out_grows:
        return "hidden"
    if fan_out_grows:
        return "input"
    if fan_in_grows:
        return "output"
    return "fixed"


def _named_params(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module, str]]:
    """(name, param, owning module, local name), first occurrence of tied parameters."""
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{mname}.{pname}" if mname else pname, p, module, pname))
    return out


def get_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a model's parameters, wrapper prefixes removed."""
    return {strip_prefixes(n): tuple(p.shape) for n, p, _, _ in _named_params(model)}


def _as_shapes(x: Any, what: str) -> dict[str, tuple[int | None, ...]]:
    if isinstance(x, nn.Module):
        return get_shapes(x)
    if isinstance(x, (str, os.PathLike)):
        return load_base_shapes(x)
    if isinstance(x, Mapping):
        return {strip_prefixes(k): tuple(v) for k, v in x.items()}
    raise TypeError(
        f"{what} must be an nn.Module, a dict of shapes or a path to a .bsh file; got {type(x).__name__}"
    )


def base_shapes_table(model: nn.Module) -> dict[str, list[int | None]]:
    """``{name: base shape}`` with ``None`` for finite dimensions: the content of a mup
    ``.bsh`` file, which :func:`set_base_shapes` takes back as ``base``."""
    data = {}
    for full_name, p, _, _ in _named_params(model):
        info = require_info(p, f"{full_name}: ")
        data[strip_prefixes(full_name)] = [
            b if w else None for b, w in zip(info.base_shape, info.width_dims)
        ]
    return data


def save_base_shapes(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's base shapes as a mup-compatible ``.bsh`` YAML file."""
    write_bsh(base_shapes_table(model), path)


def load_base_shapes(path: str | os.PathLike) -> dict[str, tuple[int | None, ...]]:
    """Read a ``.bsh`` file: ``{name: base shape}`` with ``None`` for finite dimensions."""
    return {strip_prefixes(k): v for k, v in read_bsh(path).items()}


# ---------------------------------------------------------------------------------------------
# set_base_shapes
# ---------------------------------------------------------------------------------------------


def set_base_shapes(
    model: nn.Module,
    base: nn.Module | Mapping | str | os.PathLike | None,
    delta: nn.Module | Mapping | None = None,
    overrides: Mapping[str, str | Mapping[str, Any]] | None = None,
    savefile: str | os.PathLike | None = None,
) -> nn.Module:
    """Record width metadata for every parameter of ``model`` (paper App. F.5, F.7).

    ``base``: the base model (an ``nn.Module``, ideally built on the ``meta`` device), a dict of
    shapes, or a mup ``.bsh`` file (``null`` marks a finite dimension; so does ``None`` in a
    dict).  ``delta``: a model of a third width that tells which dimensions scale where model
    and base coincide.  ``None`` for ``base`` means the model is its own base (all multipliers
    1; roles need ``delta``).

    ``overrides`` maps a parameter-name glob to a role, or to a dict with any of ``role``,
    ``fan_in_dims``, ``fan_out_dims`` (layouts the rules cannot infer) and ``multiplier`` (the
    exponent ``a`` of a weight multiplier ``m^-a`` the forward pass applies, App. F.6).  Safe to
    call twice; on an error the model is left as it was.  Returns ``model``.
    """
    records = infer_base_shapes(model, base, delta, overrides)
    _warn_guessed_roles(records)
    _warn_tied_readouts(model, records)
    attach_base_shapes(model, records)
    if savefile is not None:
        save_base_shapes(model, savefile)
    return model


def attach_base_shapes(model: nn.Module, records: Mapping[str, WidthInfo]) -> nn.Module:
    """Record ``records`` (from :func:`infer_base_shapes`) as ``model``'s width metadata."""
    model._mupp_shapes = dict(records)
    return reattach(model)


def infer_base_shapes(
    model: nn.Module,
    base: nn.Module | Mapping | str | os.PathLike | None,
    delta: nn.Module | Mapping | None = None,
    overrides: Mapping[str, str | Mapping[str, Any]] | None = None,
) -> dict[str, WidthInfo]:
    """The :class:`WidthInfo` of every parameter, by name, as :func:`set_base_shapes` would
    record it; changes nothing (App. F.5, F.7)."""
    params = _named_params(model)
    shapes = {strip_prefixes(n): tuple(p.shape) for n, p, _, _ in params}
    base_shapes = shapes if base is None else _as_shapes(base, "base")
    from_bsh = isinstance(base, (str, os.PathLike)) or any(
        d is None for v in base_shapes.values() for d in v
    )
    delta_shapes = None if delta is None else _as_shapes(delta, "delta")
    missing = sorted(set(shapes) - set(base_shapes))
    extra = sorted(set(base_shapes) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"base does not match model: parameters missing from base {missing[:5]}, "
            f"extra in base {extra[:5]}"
        )
    overrides = dict(overrides or {})
    records: dict[str, WidthInfo] = {}
    for full_name, _p, module, pname in params:
        name = strip_prefixes(full_name)
        shape = shapes[name]
        bshape, width = _width_dims(name, shape, base_shapes[name], delta_shapes, from_bsh)
        records[name] = _record(name, shape, bshape, width, module, pname, overrides)
    if not any(any(r.width_dims) for r in records.values()):
        raise ValueError(
            "set_base_shapes: no parameter has a dimension that grows with width (every shape "
            "equals the base's"
            + (" and the delta's" if delta is not None else "")
            + "): build base (or delta) at another width than the model"
        )
    if delta is None and not from_bsh:
        _check_width_ratios(records)
    _set_layer_roles(records, params)
    return records


def _check_width_ratios(records: Mapping[str, WidthInfo]) -> None:
    """Catch a base that differs from the model in more than its width, where no ``delta``
    says which dimensions scale: every dimension that differs counts as a width, so a base
    with another number of classes (100 against 10) or another input size (784 against 3072)
    makes that layer hidden.  Dimensions that shrink from base to model beside ones that grow
    are an error; dimensions that grow at another rate than most are a warning (a model may
    scale its dimensions at different rates; ``delta`` confirms it and silences this)."""
    dims: dict[float, list[str]] = {}
    for name, r in records.items():
        for i, (s, b, w) in enumerate(zip(r.shape, r.base_shape, r.width_dims)):
            if w:
                dims.setdefault(s / b, []).append(f"{name} dim {i}: {s} in the model, {b} in base")
    if len(dims) < 2:
        return
    usual = max(dims, key=lambda m: len(dims[m]))
    odd = [where for m, found in sorted(dims.items()) if m != usual for where in found]
    hint = (
        "build base with the model's input and output sizes (only the width differs), or pass "
        "delta= (a model at a third width) so that mupp sees which dimensions scale"
    )
    if min(dims) < 1 < max(dims):
        raise ValueError(
            f"set_base_shapes: base is wider than the model in some dimensions and narrower in "
            f"others ({'; '.join(odd[:3])}; most width dimensions are x{usual:g}): a dimension "
            f"that is not a width, such as the number of classes or the input size, differs. "
            + hint[0].upper()
            + hint[1:]
        )
    warnings.warn(
        f"mupp.set_base_shapes: most width dimensions are x{usual:g} the base's, but "
        f"{'; '.join(odd[:3])}"
        + (f" (and {len(odd) - 3} more)" if len(odd) > 3 else "")
        + ". If one is an input or output size, it is not a width and its layer's role is "
        f"wrong: {hint}. If the model scales these dimensions at other rates, pass delta= to "
        "confirm it.",
        UserWarning,
        stacklevel=4,
    )


def _width_dims(
    name: str,
    shape: tuple[int, ...],
    bshape: tuple[int | None, ...],
    delta_shapes: Mapping[str, tuple[int, ...]] | None,
    from_bsh: bool,
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``(base shape, which dimensions grow with width)`` of one parameter."""
    if len(bshape) != len(shape):
        raise ValueError(f"{name}: base shape {bshape} has a different rank than {shape}")
    if from_bsh:  # .bsh file: null marks finite dims
        width = tuple(b is not None for b in bshape)
        return tuple(s if b is None else b for b, s in zip(bshape, shape)), width
    width = tuple(b != s for b, s in zip(bshape, shape))
    if delta_shapes is not None:
        dshape = delta_shapes.get(name)
        if dshape is None or len(dshape) != len(shape):
            raise ValueError(f"delta does not match model at parameter {name}")
        for i, (s_, b_, d_) in enumerate(zip(shape, bshape, dshape)):
            if s_ != b_ and d_ == b_:
                raise ValueError(
                    f"{name}: dimension {i} is {s_} in the model and {b_} in base, but "
                    f"{d_} in delta, which varies only the width: does base (or delta) "
                    "have another input or output size than the model? Build them "
                    "with the model's input and output sizes"
                )
        width = tuple(w or (dd != b) for w, dd, b in zip(width, dshape, bshape))
    return tuple(bshape), width


def _record(
    name: str,
    shape: tuple[int, ...],
    bshape: tuple[int, ...],
    width: tuple[bool, ...],
    module: nn.Module,
    pname: str,
    overrides: Mapping[str, Any],
) -> WidthInfo:
    """One parameter's :class:`WidthInfo`: fans from its layer's layout (or an override)."""
    in_dims, out_dims, source = _fan_dims(module, pname, len(shape), width)
    ov = _match_override(overrides, name)
    role, multiplier = None, 0.0
    if isinstance(ov, str):
        role, source = ov, "override"
    elif ov is not None:
        unknown = set(ov) - {"role", "fan_in_dims", "fan_out_dims", "multiplier"}
        if unknown:
            raise ValueError(
                f"overrides[{name!r}]: unknown keys {sorted(unknown)}; expected role, "
                "fan_in_dims, fan_out_dims or multiplier"
            )
        in_dims = tuple(ov.get("fan_in_dims", in_dims))
        out_dims = tuple(ov.get("fan_out_dims", out_dims))
        role = ov.get("role")
        multiplier = ov.get("multiplier", 0.0)
        if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool):
            raise ValueError(
                f"overrides[{name!r}]: multiplier must be a number (the exponent a of m^-a); "
                f"got {multiplier!r}"
            )
        source = (
            "override" if ("role" in ov or "fan_in_dims" in ov or "fan_out_dims" in ov) else source
        )
    if role is not None:
        check_choice(f"overrides[{name!r}]: role", role, ROLES)
    if role is None:
        role = _role(any(width[i] for i in in_dims), any(width[i] for i in out_dims))
    return WidthInfo(
        name=name,
        shape=shape,
        base_shape=tuple(bshape),
        width_dims=width,
        fan_in=math.prod(shape[i] for i in in_dims),
        fan_out=math.prod(shape[i] for i in out_dims),
        base_fan_in=math.prod(bshape[i] for i in in_dims),
        base_fan_out=math.prod(bshape[i] for i in out_dims),
        role=role,
        is_norm=isinstance(module, _NORM_TYPES),
        source=source,
        multiplier=float(multiplier),
    )


def _set_layer_roles(records: dict[str, WidthInfo], params: list) -> None:
    """Give every parameter the role of its module's ``weight`` (its layer's role)."""
    weight_role = {}
    for full_name, _p, module, pname in params:
        if pname == "weight":
            weight_role[id(module)] = records[strip_prefixes(full_name)].role
    for full_name, _p, module, _pname in params:
        name = strip_prefixes(full_name)
        lr = weight_role.get(id(module), records[name].role)
        records[name] = replace(records[name], layer_role=lr)


def _warn_guessed_roles(records: Mapping[str, WidthInfo]) -> None:
    """Say once which roles are guesses: free tensors of 2+ dimensions, and weights given the
    readout's role that are not the model's last readout."""
    guessed = [n for n, r in records.items() if r.source == "guess"]
    outputs = [n for n, r in records.items() if r.role == "output" and len(r.shape) >= 2]
    early_outputs = [n for n in outputs[:-1] if records[n].source != "override"]
    lines = [f"  {n}: {records[n].role} (shape {records[n].shape})" for n in guessed]
    lines += [
        f"  {n}: output, but it is not the last readout ({outputs[-1]})" for n in early_outputs
    ]
    if lines:
        example = (guessed + early_outputs)[0]
        warnings.warn(
            "mupp.set_base_shapes: these roles are inferred from shapes alone, not declared by a "
            "known layer type:\n" + "\n".join(lines) + "\nIf one is wrong, declare it: "
            f"set_base_shapes(model, base, overrides={{{example!r}: 'input'}}) (roles: "
            f"{', '.join(ROLES)}); mupp.describe(model) lists every role and its source.",
            UserWarning,
            stacklevel=3,
        )


def _warn_tied_readouts(model: nn.Module, records: Mapping[str, WidthInfo]) -> None:
    """Say once when an embedding's weight is also a readout's (tied embeddings), wider than
    its base, and that readout has no output multiplier: its role is the embedding's
    (input-like), right for its learning rate, but μP also needs ``1/m`` on the logits (mup's
    ``MuSharedReadout``)."""
    wide = {
        id(p) for n, p, _, _ in _named_params(model) if records[strip_prefixes(n)].width_mult != 1.0
    }
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if isinstance(w, nn.Parameter) and id(w) in wide:
            owners.setdefault(id(w), []).append((mname, module))
    for uses in owners.values():
        if not any(isinstance(m, nn.Embedding) for _, m in uses):
            continue
        for name, m in uses:
            multiplied = getattr(m, "output_mult", 1.0) != 1.0 or hasattr(m, "_mupp_output_mult")
            if not isinstance(m, nn.Embedding) and not multiplied:
                warnings.warn(
                    f"mupp.set_base_shapes: {name} is tied to an embedding and has no 1/width "
                    "output multiplier: the logits will grow with width (not μP). Multiply its "
                    "output by 1/width_mult (Hugging Face: mupp.integrations.huggingface."
                    "prepare(model, base)); mupp.diagnostics.verify checks the result.",
                    UserWarning,
                    stacklevel=3,
                )
                return


def _match_override(overrides: Mapping[str, Any], name: str) -> Any:
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def reattach(model: nn.Module) -> nn.Module:
    """Re-register the model's name-keyed record with its (possibly new) Parameter objects.

    Needed after ``copy.deepcopy`` (which copies the record but not Parameter attributes); also
    accepts models wrapped by DDP or torch.compile.  A model prepared by the ``mup`` package
    (parameters carrying ``infshape``) is adopted without a record.
    """
    records = _records(model)
    for full_name, p, module, pname in _named_params(model):
        name = strip_prefixes(full_name)
        info = records.get(name)
        if info is None:
            info = _from_mup_infshape(name, p, module, pname)
            if info is None:
                continue
        _REGISTRY[p] = info
        try:
            p.infshape = info.infshape
        except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor subclasses
            pass
    return model


def _records(model: nn.Module) -> dict[str, WidthInfo]:
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        rec = getattr(m, "_mupp_shapes", None) if m is not None else None
        if rec:
            return rec
    return {}


def _from_mup_infshape(
    name: str, p: torch.Tensor, module: nn.Module, pname: str
) -> WidthInfo | None:
    inf = getattr(p, "infshape", None)
    if inf is None or not hasattr(inf, "ninf"):
        return None
    own = getattr(inf, "info", None)
    if isinstance(own, WidthInfo):  # mupp's own view, carried by a copy of the parameter
        return replace(own, name=name)
    bshape = tuple(d.base_dim if d.isinf() else d.dim for d in inf)
    width = tuple(bool(d.isinf()) for d in inf)
    info = _info_from_view(tuple(p.shape), bshape, width, module, pname)
    return replace(
        info,
        name=name,
        is_norm=isinstance(module, _NORM_TYPES),
        source="mup" if info.source == "guess" else info.source,
        extra={"mup_readout": type(module).__name__ == "MuReadout"},
    )


def get_info(p: torch.Tensor) -> WidthInfo | None:
    """The :class:`WidthInfo` of a parameter, or ``None`` if it has none."""
    info = _REGISTRY.get(p)
    if info is not None:
        return info
    inf = getattr(p, "infshape", None)
    if inf is not None and hasattr(inf, "ninf"):
        own = getattr(inf, "info", None)
        if isinstance(own, WidthInfo):  # our view on a copied, pickled or torch.saved parameter
            return own
        # a model prepared by the mup package, seen without its modules: mup's conventions
        bshape = tuple(d.base_dim if d.isinf() else d.dim for d in inf)
        return _info_from_view(tuple(p.shape), bshape, tuple(bool(d.isinf()) for d in inf))
    return None


def _info_from_view(
    shape, bshape, width, module: nn.Module | None = None, pname: str = ""
) -> WidthInfo:
    """A parameter's widths from mup's view of it (base shape, which dims are infinite)."""
    in_dims, out_dims, source = _fan_dims(module, pname, len(shape), width)
    return WidthInfo(
        name="",
        shape=shape,
        base_shape=bshape,
        width_dims=width,
        fan_in=math.prod(shape[i] for i in in_dims),
        fan_out=math.prod(shape[i] for i in out_dims),
        base_fan_in=math.prod(bshape[i] for i in in_dims),
        base_fan_out=math.prod(bshape[i] for i in out_dims),
        role=_role(any(width[i] for i in in_dims), any(width[i] for i in out_dims)),
        source=source,
    )


def require_info(p: torch.Tensor, where: str = "") -> WidthInfo:
    """Like :func:`get_info` but raises a ``ValueError`` that says what to do."""
    info = get_info(p)
    if info is None:
        raise ValueError(
            f"{where}a parameter of shape {tuple(p.shape)} has no width metadata: call "
            "mupp.set_base_shapes(model, base) first (or mupp.reattach(model) after "
            "copy.deepcopy), or use parameterization='sp'"
        )
    return info


# ---------------------------------------------------------------------------------------------
# describe and .bsh files
# ---------------------------------------------------------------------------------------------


class ParamTable(list):
    """List of dicts that prints as an aligned table."""

    columns = ("name", "shape", "role", "source", "fan_in", "fan_out", "width_mult")

    def __str__(self) -> str:
        rows = [[_fmt(r[c]) for c in self.columns] for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(self.columns)]
        line = "  ".join(c.ljust(w) for c, w in zip(self.columns, widths))
        out = [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v)
    return str(v)


def describe(model: nn.Module) -> ParamTable:
    """One dict per parameter: ``name, shape, role, source, fan_in, fan_out, width_mult``;
    ``source`` says whether the role was declared (``override``, a known ``layer`` type) or
    inferred (``vector``, ``mup``'s convention, or a ``guess`` from the shape alone)."""
    rows = ParamTable()
    for full_name, p, _, _ in _named_params(model):
        info = get_info(p)
        if info is None:
            reattach(model)
            info = require_info(p, f"{full_name}: ")
        rows.append(
            {
                "name": strip_prefixes(full_name),
                "shape": tuple(p.shape),
                "role": info.role,
                "source": info.source,
                "fan_in": info.fan_in,
                "fan_out": info.fan_out,
                "width_mult": info.width_mult,
            }
        )
    return rows
