"""A run's configuration (:class:`TrainConfig`), config files, and the shipped presets."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..choices import (
    MODEL_NAMES,
    PARALLELS,
    PARAMETERIZATIONS,
    PERTURBATION_SYNCS,
    RULES,
    VARIANTS,
    Ascent,
    ModelName,
    Parallel,
    Parameterization,
    PerturbationSync,
    Reuse,
    Rule,
    Variant,
    check_choice,
)
from ..models import build
from ..optim.sam import check_schedule
from .data import DATASETS, is_text

Optimizer = Literal["sgd", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Schedule = Literal["constant", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def option(default: Any, help: str) -> Any:
    """A :class:`TrainConfig` field: its default (a callable makes a fresh one per config) and
    the help text its ``mupp train`` flag shows (:func:`train_options`)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# (model, width, base_width, model_kwargs) that TrainConfig.validate has built in this process
_BUILT_ARCHITECTURES: set[tuple] = set()


@dataclass
class TrainConfig:
    """Everything that defines a run.  ``rho = 0`` trains with the base optimizer alone."""

    model: ModelName = option("mlp", "the architecture")
    width: float = option(
        256, "the model's width: MLP hidden units, ViT embedding size, ResNet first-stage channels"
    )
    base_width: float | None = option(64, "base width of the μP scaling")
    model_kwargs: dict = option(dict, 'keyword arguments of the model, e.g. {"bias": true}')
    dataset: str = option("cifar10", " | ".join(DATASETS))
    data_dir: str | None = option(None, "where the dataset lives")
    train_subset: int | None = option(None, "use the first N training examples")
    test_subset: int | None = option(None, "use the first N test examples")
    block_size: int = option(64, "text: characters per training window (the GPT's context)")
    text_file: str | None = option(None, "text: any plain-text file as the corpus (no checksum)")
    label_noise: float = option(0.0, "fraction of training labels flipped to another class")
    label_noise_seed: int = option(0, "which labels are flipped (fixed across training seeds)")
    parameterization: Parameterization = option("mupp", "how η and ρ scale with width")
    variant: Variant = option("sam", "which SAM (App. F.4, H.1)")
    rule: Rule = option("LP", "the perturbation's normalization (Def. 4, Remark F.4)")
    optimizer: Optimizer = option("sgd", "the base optimizer")
    lr: float = option(0.1, "base learning rate η")
    rho: float = option(0.1, "perturbation radius ρ (0: base optimizer only)")
    momentum: float = option(0.0, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(0.0, "weight decay")
    schedule: Schedule = option("constant", "the learning-rate schedule")
    warmup_epochs: float = option(0.0, "linear warmup epochs")
    label_smoothing: float = option(0.0, "label smoothing")
    augment: bool = option(False, "random crop + horizontal flip")
    batch_size: int = option(64, "batch size (global, over every worker)")
    epochs: int = option(20, "epochs")
    seed: int = option(0, "seed: initialization and data order")
    device: str = option("cpu", "cpu | cuda | cuda:N")
    perturbation_sync: PerturbationSync = option(
        "sync", 'under torchrun: "sync" (one global ε) or "local" (each worker its own)'
    )
    parallel: Parallel = option("ddp", "under torchrun: DDP replicas or FSDP2 shards")
    last_layer_fast: bool = option(
        True, "last-layer SAM in one forward and one backward (one process)"
    )
    ascent: Ascent = option("gradient", "gradient (two passes) | momentum (Momentum-SAM)")
    every: int = option(1, "a full SAM step every K steps (one pass between)")
    reuse: Reuse | None = option(None, "looksam: LookSAM's reused gradient between full steps")
    reuse_scale: float = option(0.7, "LookSAM's α")

    @property
    def uses_sam(self) -> bool:
        """Whether the run perturbs at all (``rho > 0``); ``rho = 0`` is the base optimizer."""
        return self.rho > 0

    def validate(self) -> TrainConfig:
        """Check every field (the first bad one raises ``ValueError`` naming it), normalize
        ``data_dir`` to an absolute path, and build the model on the meta device so that bad
        ``model_kwargs`` fail now rather than after the data is loaded.  Returns ``self``."""
        if self.data_dir is not None:  # one dataset, one identity, however the path was written
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())
        self._check_choices()
        self._check_numbers()
        self._check_widths()
        for name in ("nesterov", "augment", "last_layer_fast"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a mapping; got {self.model_kwargs!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} is not available here (torch.cuda.is_available() is "
                "False); use device 'cpu'"
            )
        # unknown or invalid model options fail now, not after loading the data; a sweep
        # validates thousands of points that share a handful of architectures, so each
        # architecture is built (on the meta device) once per process
        key = (self.model, self.width, self.base_width, repr(sorted(self.model_kwargs.items())))
        if key not in _BUILT_ARCHITECTURES:
            try:
                with torch.device("meta"):
                    make_model(self, 10)
            except TypeError as e:
                raise ValueError(
                    f"model_kwargs {self.model_kwargs!r} do not fit the {self.model}: {e}"
                ) from None
            _BUILT_ARCHITECTURES.add(key)
        return self

    def _check_choices(self) -> None:
        check_choice("model", self.model, MODEL_NAMES)
        check_choice("dataset", self.dataset, DATASETS)
        if (self.model == "gpt") != is_text(self.dataset):
            raise ValueError(
                f"model {self.model!r} and dataset {self.dataset!r} do not fit: the gpt trains on "
                "text (dataset 'tinyshakespeare', or text_file=PATH with it), the other models on "
                "images (cifar10, cifar100, synthetic)"
            )
        if self.text_file is not None and not is_text(self.dataset):
            raise ValueError("text_file names a text corpus: use it with dataset 'tinyshakespeare'")
        if self.label_noise and is_text(self.dataset):
            raise ValueError("label_noise flips image labels; a text corpus has none")
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("rule", self.rule, RULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("perturbation_sync", self.perturbation_sync, PERTURBATION_SYNCS)
        check_choice("parallel", self.parallel, PARALLELS)
        check_schedule(self.ascent, self.every, self.reuse, self.reuse_scale)
        if self.ascent == "momentum" and self.optimizer == "sgd" and self.momentum == 0:
            raise ValueError(
                "ascent 'momentum' perturbs along SGD's momentum: set momentum > 0 (e.g. 0.9), "
                "or use optimizer 'adamw' (its first moment)"
            )

    def _check_numbers(self) -> None:
        for name in ("lr", "rho", "momentum", "weight_decay", "label_smoothing", "warmup_epochs"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative finite number; got {v!r}")
        if not (_is_number(self.label_noise) and 0 <= self.label_noise < 1):
            raise ValueError(f"label_noise must be a fraction in [0, 1); got {self.label_noise!r}")
        for name in ("batch_size", "epochs", "train_subset", "test_subset", "block_size"):
            v = getattr(self, name)
            if v is None and name.endswith("subset"):
                continue
            if not (_is_integer(v) and v >= 1):
                raise ValueError(f"{name} must be a whole number >= 1; got {v!r}")
            setattr(self, name, int(v))
        for name in ("seed", "label_noise_seed"):
            if not _is_integer(getattr(self, name)):
                raise ValueError(f"{name} must be a whole number; got {getattr(self, name)!r}")

    def _check_widths(self) -> None:
        for name in ("width", "base_width"):
            v = getattr(self, name)
            if v is None and name == "base_width":
                continue
            # a whole number in the model's own unit: mupp.models.build checks it (validate)
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number; got {v!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """A validated configuration from a mapping (an unknown key raises ``ValueError``
        naming it and the known ones)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(names)}")
        return cls(**dict(d)).validate()

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (what run records and checkpoints store)."""
        return dataclasses.asdict(self)


def with_defaults(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored configuration (a run record's or a checkpoint's) with every option it lacks set
    to its default: a record of an older mupp ran with the defaults of options added since."""
    return {**TrainConfig().to_dict(), **stored}


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between ``a`` and ``b`` (a key missing from one
    side differs)."""
    unset = object()
    return sorted(k for k in set(a) | set(b) if a.get(k, unset) != b.get(k, unset))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_integer(v: Any) -> bool:
    return _is_number(v) and float(v).is_integer()


@dataclass(frozen=True)
class TrainOption:
    """One :class:`TrainConfig` field as a command-line option: its value type (``bool``
    for a switch), its allowed values where the field is a ``Literal``, and its help."""

    name: str
    type: type
    choices: tuple[Any, ...] | None
    help: str


def train_options() -> list[TrainOption]:
    """Every :class:`TrainConfig` field that a flag can set (numbers, strings, switches and
    choices; a dict such as ``model_kwargs`` goes through ``--set``), read from the fields'
    types and help: an option is declared once, in :class:`TrainConfig`."""
    hints = get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        if get_origin(hint) in (Union, UnionType):  # X | None
            hint = next(a for a in get_args(hint) if a is not type(None))
        choices = get_args(hint) if get_origin(hint) is Literal else None
        kind = type(choices[0]) if choices else hint
        if kind in (bool, int, float, str):
            out.append(TrainOption(f.name, kind, choices, f.metadata.get("help", "")))
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict (a malformed file: ``ValueError`` naming
    the file and the problem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as e:  # the parsers' own error types (TOMLDecodeError, YAMLError)
        raise ValueError(f"config file {str(path)!r} is malformed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of options")
    _check_tables(data, path)
    return data


CONFIG_TABLES = {"train": None, "grid": None, "sweep": ("order",)}  # table -> its keys


def _check_tables(data: Mapping[str, Any], path: Path) -> None:
    """A file with tables may hold only [train], [grid] and [sweep] (a misspelled table would
    be ignored otherwise), and [sweep] only its known keys."""
    tables = [k for k, v in data.items() if isinstance(v, dict) and k != "model_kwargs"]
    if not any(k in CONFIG_TABLES for k in tables) and not any(k in CONFIG_TABLES for k in data):
        return  # a flat file of training options: TrainConfig checks every key
    unknown = [k for k in data if k not in CONFIG_TABLES]
    if unknown:
        raise ValueError(
            f"config file {str(path)!r}: unknown table(s) {unknown}; expected "
            f"{', '.join(f'[{t}]' for t in CONFIG_TABLES)}"
        )
    sweep = data.get("sweep", {})
    bad = sorted(set(sweep) - set(CONFIG_TABLES["sweep"])) if isinstance(sweep, dict) else []
    if bad:
        raise ValueError(
            f"config file {str(path)!r}: [sweep] has unknown keys {bad}; expected "
            f"{list(CONFIG_TABLES['sweep'])}"
        )


def make_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The configuration's model (:func:`mupp.models.build`) with ``num_classes`` outputs and
    base shapes set at ``base_width``."""
    kw = dict(cfg.model_kwargs)
    if cfg.model == "mlp":
        kw.setdefault("d_out", num_classes)
    elif cfg.model == "gpt":  # num_classes: the corpus's vocabulary
        kw.setdefault("vocab_size", num_classes)
        kw.setdefault("block_size", cfg.block_size)
    else:
        kw.setdefault("num_classes", num_classes)
    return build(cfg.model, cfg.width, cfg.base_width, **kw)


def preset_names() -> list[str]:
    """The experiments shipped in ``mupp/lab/presets``."""
    folder = resources.files(__package__) / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """A shipped preset (``mupp sweep --preset NAME``) as a dict: ``train``, ``grid``,
    ``sweep``; an unknown name raises ``ValueError`` listing the presets."""
    path = resources.files(__package__) / "presets" / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"preset must be one of {preset_names()}; got {name!r}")
    return load_config_file(str(path))
