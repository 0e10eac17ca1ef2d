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
from typing import Any, Literal, get_args

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


# (model, width, base_width, model_kwargs) that TrainConfig.validate has built in this process
_BUILT_ARCHITECTURES: set[tuple] = set()


@dataclass
class TrainConfig:
    """Everything that defines a run.  ``rho = 0`` trains with the base optimizer alone."""

    model: ModelName = "mlp"
    width: float = 256
    base_width: float | None = 64
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "cifar10"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    block_size: int = 64  # text: characters per training window (the GPT's context)
    text_file: str | None = None  # text: any plain-text file as the corpus (no checksum)
    label_noise: float = 0.0  # fraction of training labels flipped to another class
    label_noise_seed: int = 0  # which labels: fixed across training seeds by default
    parameterization: Parameterization = "mupp"
    variant: Variant = "sam"
    rule: Rule = "LP"
    optimizer: Optimizer = "sgd"
    lr: float = 0.1
    rho: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False
    batch_size: int = 64
    epochs: int = 20
    seed: int = 0
    device: str = "cpu"
    perturbation_sync: PerturbationSync = (
        "sync"  # under torchrun: "sync" (global ε) or "local" (per worker)
    )
    parallel: Parallel = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 shards)
    # last-layer SAM in one forward and one backward (mupp.optim.lastlayer), on one process
    last_layer_fast: bool = True
    # cheap SAM (mupp.SAM's options of the same names): "momentum" perturbs along the momentum
    # (one pass); every=k takes a full SAM step every k steps, reuse="looksam" (LookSAM) between
    ascent: Ascent = "gradient"
    every: int = 1
    reuse: Reuse | None = None
    reuse_scale: float = 0.7

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
