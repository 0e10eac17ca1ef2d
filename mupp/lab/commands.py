"""What each ``mupp`` subcommand does: one ``cmd_*`` function per command, given the parsed
arguments (:mod:`mupp.lab.cli` builds the parser and reports errors)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import theory
from ..choices import MODEL_NAMES
from ..diagnostics.coordcheck import coord_data, format_tables
from ..diagnostics.verify import verify
from ..distributed import process_group, world
from ..models import build, count_params
from ..optim import SAM
from . import data, demo
from .analysis import (
    efficiency_summary,
    format_efficiency,
    format_transfer,
    rows_from_records,
    transfer_summary,
)
from .checkpoint import CHECKPOINT_FILE, SHARDED_DIR, discard_run
from .checks import (
    DEFAULT_BASE,
    check_model,
    coordcheck,
    infinite_batches,
    last_layer_equivalence,
    sgd_sam,
    token_batches,
)
from .config import TrainConfig, load_config_file, load_preset, train_options
from .grid import check_slice, grid_points, in_slice, point_key, resolve
from .plots import plot_coordcheck, plot_demo, plot_sweep
from .statistics import format_statistics, run_statistics
from .storage import StorageUnreachable, storage_retry_seconds, storage_url
from .sweep import SweepFailed, load_results, run_sweep
from .train import Preempted, train

# ------------------------------------------------------------------------------------ data


def cmd_data(args: argparse.Namespace) -> int:
    """``mupp data info|download``: a dataset's split sizes and statistics, or its archive."""
    if args.data_cmd == "info":
        ds = data.load(args.name, args.data_dir)
        print(json.dumps(data.info(ds), indent=2))
    else:
        root = args.data_dir or data.search_dirs()[-1]
        fetch = data.download_text if data.is_text(args.name) else data.download_archive
        path = fetch(args.name, root)
        print(f"downloaded {args.name} to {path}")
    return 0


# ------------------------------------------------------------------------------------ theory


def _fmt_exp(e: float | None) -> str:
    if e is None:
        return "-"
    if e == 0:
        return "1"
    return f"n^{e:g}"


def cmd_theory(args: argparse.Namespace) -> int:
    """``mupp theory``: Table 1 and Table F.1, or the classification of a bcd-parameterization."""
    if args.theory_cmd == "classify":
        b, c, dl = args.b, args.c, args.dl
        if not (len(b) == len(c) == len(dl)):
            print("error: --b, --c and --dl need the same number of entries (L+1)", file=sys.stderr)
            return 2
        dl = [None if x != x else x for x in dl]  # nan -> not perturbed
        result = theory.classify(b, c, dl, args.d)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(theory.explain(result))
        return 0
    t1 = theory.table1()
    if args.json:
        print(json.dumps({"table1": t1, "table_f1": theory.table_f1()}, indent=2))
        return 0
    print("Table 1: μP² perturbation scaling per variant (global n^-d, layerwise n^-d_l)")
    head = f"{'variant':<11} {'global':>7} {'input':>7} {'hidden':>7} {'output':>7}   perturbed by global scaling"
    print(head)
    print("-" * len(head))
    for v, row in t1.items():
        pg = ", ".join(r for r, ok in row["perturbed_by_global"].items() if ok) or "none"
        print(
            f"{v:<11} {_fmt_exp(row['global']):>7} {_fmt_exp(row['input']):>7} "
            f"{_fmt_exp(row['hidden']):>7} {_fmt_exp(row['output']):>7}   {pg}"
        )
    print()
    print("Table F.1: SAM in μP, which layers can be effective / may dominate the gradient norm")
    print(f"{'d':<15} {'effective possible':<28} {'may dominate the norm'}")
    for row in theory.table_f1():
        eff = ", ".join(r for r, ok in row["effective"].items() if ok) or "none"
        dom = ", ".join(r for r, ok in row["dominate"].items() if ok)
        print(f"{row['d']:<15} {eff:<28} {dom}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``mupp models``: parameter counts of the built-in models at a few widths."""
    specs = {
        "mlp": dict(widths=args.widths or [64, 256, 1024, 4096], base=64),
        "resnet18": dict(widths=args.widths or [32, 64, 128, 256], base=32),
        "resnet10": dict(widths=args.widths or [32, 64, 128], base=32),
        "resnet8": dict(widths=args.widths or [16, 32, 64], base=32),
        "vit": dict(widths=args.widths or [192, 384, 768], base=384),
        "gpt": dict(widths=args.widths or [64, 128, 256, 512], base=64),
    }
    print(f"{'model':<10} {'width':>8} {'parameters':>14}")
    for name, spec in specs.items():
        for w in spec["widths"]:
            with torch.device("meta"):
                n = count_params(build(name, w, None))
            print(f"{name:<10} {w:>8g} {n:>14,}")
    return 0


def load_factory(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function (a user's width -> model factory)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must be one of {MODEL_NAMES} or MODULE:FUNCTION; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({e})") from None
    except SyntaxError as e:
        raise ValueError(
            f"--model {spec}: {module_name!r} has a syntax error ({e.msg}, {e.filename} line "
            f"{e.lineno})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--model {spec}: {module_name} has no function {attr!r}")
    return fn


# the knobs of `mupp coordcheck` whose defaults belong to the check that runs
_CHECK_KNOBS = ("widths", "steps", "seeds", "lr", "rho", "batch_size")


def _defaults(check: Callable) -> dict[str, Any]:
    """The defaults of a check's knobs (:data:`_CHECK_KNOBS`), read from its signature."""
    params = inspect.signature(check).parameters
    return {k: params[k].default for k in _CHECK_KNOBS}


def _user_coordcheck(args: argparse.Namespace, knobs: Mapping[str, Any]) -> dict:
    """``coordcheck --model pkg.mod:make``: the user's ``make(width)`` with SGD-based SAM on the
    chosen dataset (images flattened with ``--flatten``); ``knobs``: widths, steps, seeds, lr,
    rho and batch size."""
    make = load_factory(args.model)
    ds = data.load(args.dataset, args.data_dir)
    lr, rho = knobs["lr"], knobs["rho"]

    def batches(seed):
        return infinite_batches(
            ds, knobs["batch_size"], torch.Generator().manual_seed(seed), args.flatten
        )

    def make_optimizer(model):
        return sgd_sam(model, args.parameterization, args.variant, args.rule, lr, rho)

    config = dict(
        model=args.model,
        parameterization=args.parameterization,
        variant=args.variant,
        rule=args.rule,
        lr=lr,
        rho=rho,
        dataset=args.dataset,
    )
    try:
        return coord_data(
            lambda w: make_checked(make, w),
            list(knobs["widths"]),
            make_optimizer,
            batches,
            steps=knobs["steps"],
            seeds=knobs["seeds"],
            progress=True,
            config=config,
        )
    except RuntimeError as e:  # the model's forward on the dataset's batches
        shapes = "shapes cannot be multiplied" in str(e) or "size mismatch" in str(e)
        hint = (
            "; the model takes vectors: pass --flatten to feed the images flattened"
            if shapes and not args.flatten
            else ""
        )
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--model {args.model}: training failed ({first[:200]}){hint}") from e


# the SAM options of `mupp coordcheck` that change nothing at these values (left out of the
# record, so that a default check records what it always has)
COORDCHECK_DEFAULTS = {"ascent": "gradient", "every": 1, "reuse": None, "momentum": 0.0}


def cmd_coordcheck(args: argparse.Namespace) -> int:
    """``mupp coordcheck``: per-layer perturbation and update scaling across widths (Fig. 2), or
    the distance of μP-global SAM from last-layer SAM (``--compare-last-layer``, App. H.1)."""

    check = last_layer_equivalence if args.compare_last_layer else coordcheck
    if args.help_defaults:
        for fn in (coordcheck, last_layer_equivalence):
            print(f"{fn.__name__}: " + ", ".join(f"{k}={v}" for k, v in _defaults(fn).items()))
        return 0
    given = {k: getattr(args, k) for k in _CHECK_KNOBS if getattr(args, k) is not None}
    if "widths" in given:
        given["widths"] = [int(w) if float(w).is_integer() else w for w in given["widths"]]
    if ":" in args.model:
        if args.compare_last_layer:
            raise ValueError("--compare-last-layer runs on the built-in models only")
        result = _user_coordcheck(args, {**_defaults(coordcheck), **given})
        print(format_tables(result))
        _write_coordcheck(result, args)
        return 0
    widths = given.pop("widths", _defaults(check)["widths"])
    common = dict(given, base_width=args.base_width, dataset=args.dataset, data_dir=args.data_dir)
    if args.compare_last_layer:
        res = last_layer_equivalence(args.model, widths, **common)
        print(
            "μP-global SAM vs last-layer SAM (App. H.1): gap = ||f_SAM - f_LL|| / ||f_SAM - f_SGD||"
        )
        for w, g in zip(res["widths"], res["gap"]):
            print(f"  width {w:>8g}: gap {g:.4f}")
        print(f"  width exponent of the gap: {res['slope']:+.2f}")
        return 0
    options = dict(ascent=args.ascent, every=args.every, reuse=args.reuse, momentum=args.momentum)
    result = coordcheck(
        args.model,
        widths,
        parameterization=args.parameterization,
        variant=args.variant,
        rule=args.rule,
        sam_options={k: v for k, v in options.items() if v != COORDCHECK_DEFAULTS[k]},
        **common,
    )
    print(format_tables(result))
    _write_coordcheck(result, args)
    return 0


def _verify_setup(args: argparse.Namespace) -> tuple[Callable, Callable[[int], Any], str]:
    """``(make(width), batches(seed), optimizer)`` of ``mupp verify``: a built-in model or the
    user's factory, images or random tokens (a model whose first layer is an Embedding)."""
    if ":" in args.model:
        make = load_factory(args.model)
    elif args.model in MODEL_NAMES:
        base = DEFAULT_BASE[args.model] if args.base_width is None else args.base_width

        def make(w: float) -> torch.nn.Module:  # sp: the standard network, as coordcheck's
            return check_model(args.model, w, base, 10, sp=args.parameterization == "sp")

    else:
        raise ValueError(
            f"--model must be one of {MODEL_NAMES} or MODULE:FUNCTION; got {args.model!r}"
        )
    first = make_checked(make, args.widths[0])
    emb = next((m for m in first.modules() if isinstance(m, torch.nn.Embedding)), None)
    tokens = emb is not None if args.inputs == "auto" else args.inputs == "tokens"
    optimizer = args.optimizer
    if optimizer == "auto":
        optimizer = "adamw" if tokens or args.model == "vit" else "sgd"
    if tokens:
        if emb is None:
            raise ValueError("--inputs tokens needs a model whose first layer is an nn.Embedding")
        vocab = emb.num_embeddings

        def batches(seed: int):
            gen = torch.Generator().manual_seed(seed)
            return token_batches(vocab, args.batch_size, args.seq_len, gen)

        return make, batches, optimizer
    ds = data.load(args.dataset, args.data_dir)
    flatten = args.flatten or args.model == "mlp"

    def image_batches(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return infinite_batches(ds, args.batch_size, gen, flatten)

    return make, image_batches, optimizer


def make_checked(make: Callable, width: float) -> torch.nn.Module:
    """``make(width)``, refused in one line when it takes no width, raises or returns no
    ``nn.Module``."""
    try:
        inspect.signature(make).bind(width)
    except TypeError:
        raise ValueError(
            f"--model: the factory {getattr(make, '__name__', make)!r} must take the width as "
            "its one argument (def make(width): ...)"
        ) from None
    except ValueError:  # a builtin without a signature: call it and see
        pass
    try:
        model = make(int(width) if float(width).is_integer() else width)
    except Exception as e:  # the user's factory: any failure is theirs to see in one line
        raise ValueError(f"--model: the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"--model: the factory returned {type(model).__name__} for width {width:g}, not an "
            "nn.Module"
        )
    return model


def cmd_verify(args: argparse.Namespace) -> int:
    """``mupp verify``: is the model μP, and does μP² perturb every layer (Sec. 3, Fig. 2)?
    Exits 0 on a pass and 1 on a fail."""
    if len(args.widths) < 3:
        raise ValueError(f"--widths needs at least 3 widths; got {args.widths}")
    make, batches, optimizer = _verify_setup(args)
    base_opt = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    lr = args.lr if args.lr is not None else (3e-3 if optimizer == "adamw" else 0.05)
    extra = {"weight_decay": 0.0} if optimizer == "adamw" else {}

    def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return SAM(
            model.parameters(),
            base_opt,
            lr=lr,
            rho=args.rho,
            parameterization=args.parameterization,
            variant=args.variant,
            rule=args.rule,
            **extra,
        )

    widths = [int(w) if float(w).is_integer() else w for w in args.widths]
    report = verify(
        lambda w: make_checked(make, w),
        widths,
        make_optimizer,
        batches,
        steps=args.steps,
        seeds=args.seeds,
        progress=not args.no_progress,
    )
    print(report)
    print(
        f"(mupp verify: {optimizer} lr={lr:g}, rho={args.rho:g}, {args.parameterization}/"
        f"{args.variant}/{args.rule}, {args.steps} steps, {args.seeds} seeds)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": report.ok, "problems": report.problems, "notes": report.notes,
                       "data": report.data}, f, indent=1)  # fmt: skip
        print(f"wrote {args.json}")
    return 0 if report.ok else 1


def _write_coordcheck(result: dict, args: argparse.Namespace) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_coordcheck(result, args.plot)
        print(f"wrote {args.plot}")


def cmd_stats(args: argparse.Namespace) -> int:
    """``mupp stats``: Fig. H.1's statistics of finished runs."""
    results = [
        run_statistics(r, data_dir=args.data_dir, probe_size=args.probe_size) for r in args.runs
    ]
    print(format_statistics(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------ train / sweep


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _apply_sets(config: dict, sets: list[str] | None) -> dict:
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE; got {item!r}")
        k, v = item.split("=", 1)
        config[k.strip()] = _parse_value(v)
    return config


# `mupp train` stopped by a signal exits with 128 + the signal's number, as a shell reports a
# process killed by it (143 for SIGTERM, 130 for SIGINT), after checkpointing its position
PREEMPTED_EXIT = 128


def cmd_train(args: argparse.Namespace) -> int:
    """``mupp train``: one run from flags, a config file and ``--set`` (later ones win)."""
    config = load_config_file(args.config) if args.config else {}
    config = dict(config.get("train", config))
    for o in train_options():  # the flags given override the config file
        v = getattr(args, o.name, None)
        if v is not None:
            config[o.name] = v
    _apply_sets(config, args.set)
    cfg = TrainConfig.from_dict(config)
    if args.resume and args.restart:
        raise ValueError("give either --resume or --restart, not both")
    # under torchrun the group lives for the whole command: --restart's clean-up, the run and
    # the report all see every rank, and the group is destroyed before the interpreter exits
    with process_group(cfg.device) as (rank, _):
        if args.restart and args.out:
            _discard_checkpoint(args.out)
        elif args.out and not args.resume and _has_checkpoint(Path(args.out)):
            raise ValueError(
                f"--out {args.out} holds a run that can resume: pass --resume to continue it, "
                "or --restart to start it over"
            )
        try:
            result = train(
                cfg,
                args.out,
                resume=args.resume,
                progress=not args.no_progress,
                stop_after_epochs=args.stop_after_epochs,
            )
        except Preempted as stopped:  # SIGTERM/SIGINT: the step finished, checkpoint written
            if rank == 0:  # every rank stopped after the same step
                print(
                    f"{stopped}; `mupp train ... --out {args.out} --resume` continues", flush=True
                )
            return PREEMPTED_EXIT + stopped.signum
    if rank != 0:
        return 0
    print(
        f"best test acc {result['best_test_acc']:.4f} (epoch {result['best_epoch']}), final "
        f"{result['final_test_acc']:.4f}, diverged {result['diverged']}, {result['wall_time']:.1f}s"
    )
    if args.out:
        print(f"wrote {args.out}/result.json")
    return 0


def _has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a run's checkpoint (a file, or a sharded run's directory)."""
    names = (CHECKPOINT_FILE, SHARDED_DIR, SHARDED_DIR + ".old")
    return out.is_dir() and any((out / n).exists() for n in names)


def _discard_checkpoint(out: str) -> None:
    """``--restart``: remove the run's checkpoint (file or sharded directory) and record."""
    if world()[0] == 0:
        discard_run(out)


def _axes(flag: str, items: list[str] | None) -> dict[str, list]:
    """``{KEY: [V1, V2, ...]}`` from repeated ``flag KEY=V1,V2`` arguments (``--grid``,
    ``--only``), each value parsed as JSON where it can be."""
    axes: dict[str, list] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=V1,V2,...; got {item!r}")
        k, v = item.split("=", 1)
        axes[k.strip()] = [_parse_value(x) for x in v.split(",")]
    return axes


def _sweep_spec(args: argparse.Namespace) -> tuple[dict, dict, list | None]:
    """(base config, grid, queue order) of a sweep from --preset/--config, --set, --grid."""
    if args.preset and args.config:
        raise ValueError("give either --preset or --config, not both")
    spec = (
        load_preset(args.preset)
        if args.preset
        else load_config_file(args.config)
        if args.config
        else {}
    )
    base = dict(spec.get("train", {}))
    raw_grid = spec.get("grid", {})
    if not isinstance(raw_grid, dict):
        raise ValueError(f"[grid] must be a table of KEY = [values]; got {raw_grid!r}")
    for k, v in raw_grid.items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"[grid] {k} must be a non-empty list, e.g. {k} = [{v!r}]; got {v!r}")
    grid = {k: list(v) for k, v in raw_grid.items()}
    if args.data_dir:  # one dataset, one identity: a resumed sweep matches from any directory
        base["data_dir"] = str(Path(args.data_dir).expanduser().resolve())
    _apply_sets(base, args.set)
    grid.update(_axes("--grid", args.grid))
    if not grid:
        raise ValueError(
            "the sweep has no grid: use --preset, a --config with a [grid] table, or --grid"
        )
    order = spec.get("sweep", {}).get("order")
    if order is not None:
        unknown = [k for k in order if k not in grid]
        if unknown:
            raise ValueError(
                f"[sweep] order names {unknown}, not axes of the grid (axes: {sorted(grid)})"
            )
        order = list(order) + [k for k in grid if k not in order]
    for point in grid_points(grid, order):  # every point is valid before any work starts
        try:
            resolve(base, point)
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid point {point}: {e}") from None
    return base, grid, order


def cmd_sweep(args: argparse.Namespace) -> int:
    """``mupp sweep``: queue the grid (or its ``--only`` slice) in the sweep storage and train
    it; exit 3 while incomplete."""
    base, grid, order = _sweep_spec(args)
    only = _axes("--only", args.only)
    check_slice(grid, only)
    if args.storage_retry is not None:  # the workers (spawned) read it from the environment
        os.environ["MUPP_STORAGE_RETRY"] = str(args.storage_retry)
    storage_retry_seconds()  # a bad $MUPP_STORAGE_RETRY fails here, before any run
    if base.get("dataset", "cifar10") != "synthetic":  # before any worker starts
        data.load(base.get("dataset", "cifar10"), base.get("data_dir"))
    try:
        results = run_sweep(
            grid,
            base,
            args.out,
            storage=args.storage,
            workers=args.workers if args.workers is not None else (os.cpu_count() or 1),
            progress=not args.no_progress,
            reclaim_running=args.reclaim_running,
            vectorize={"auto": None, "on": True, "off": False}[args.vectorize],
            order=order,
            keep_checkpoints=args.keep_checkpoints,
            only=only,
        )
    except Preempted as stopped:  # this process's worker checkpointed its run and re-queued it
        print(f"sweep {stopped} of its current run; rerun this command to resume", flush=True)
        return PREEMPTED_EXIT + stopped.signum
    except (SweepFailed, StorageUnreachable) as e:  # workers died, the server stayed away
        print(f"mupp: error: {e}", file=sys.stderr)
        return 1
    wanted = {point_key(p) for p in grid_points(grid) if in_slice(p, only)}
    finished = sum(r["point"] in wanted for r in results)
    total, what = len(wanted), "points of the --only slice" if only else "grid points"
    if finished < total:
        print(
            f"sweep incomplete: {finished} of {total} {what} have results in "
            f"{args.out}; the others are queued or running in another worker. A killed worker's "
            "trial is re-queued once its heartbeat is stale (about 10 s): rerun this command to "
            "resume."
        )
        return 0 if args.allow_partial else 3
    print(f"sweep finished: {finished} of {total} {what} have results in {args.out}")
    return 0


def _sweep_rows(out: str, storage: str | None, metric: str = "acc") -> list[dict]:
    """The rows of one sweep's finished runs (:func:`rows_from_records`)."""
    if storage is None and not (Path(out) / "sweep.db").exists():
        raise ValueError(
            f"no sweep in {out}: expected {Path(out) / 'sweep.db'}, or pass --storage URL"
        )
    try:
        records = load_results(storage_url(out, storage))
    except KeyError:
        raise ValueError(f"the storage for {out} holds no mupp sweep") from None
    if not records:
        raise ValueError(f"no finished runs in the sweep at {out}")
    return rows_from_records(records, metric)


# the run fields that ``mupp plot``/``mupp transfer`` can filter on, as ``--<key>s 1,2``
RUN_FILTERS = ("seed", "lr", "rho", "width")


def _rows(args: argparse.Namespace) -> list[dict]:
    def cell(r: dict) -> tuple:
        return r["setting"], r["width"], r["lr"], r["rho"], r["seed"]

    metric = getattr(args, "metric", "acc")
    rows = _sweep_rows(args.out, args.storage, metric)
    for other in getattr(args, "also", None) or []:
        # a companion sweep's copy of a cell this analysis already has (e.g. shared SGD runs
        # in both sweeps) would count one seed twice
        have = {cell(r) for r in rows}
        rows += [r for r in _sweep_rows(other, None, metric) if cell(r) not in have]
    for key in RUN_FILTERS:
        flag = f"{key}s"
        keep = getattr(args, flag, None)
        if keep is not None:
            rows = [r for r in rows if r[key] in keep]
            if not rows:
                raise ValueError(
                    f"--{flag} {','.join(map(str, keep))}: no finished runs with these "
                    f"{flag} in {args.out}"
                )
    return rows


def cmd_plot(args: argparse.Namespace) -> int:
    """``mupp plot``: heatmaps, ρ-slices and the gain-vs-width figure of a sweep."""
    rows = _rows(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # --storage elsewhere: a new folder
    paths = plot_sweep(rows, str(Path(args.out) / "sweep"), metric=args.metric)
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """``mupp transfer``: optimum per width, its shift, transfer regret and SAM's gain, with CIs."""
    summary = transfer_summary(_rows(args), versus=args.versus)
    summary["metric"] = args.metric
    print(format_transfer(summary, by_lr=args.by_lr, metric=args.metric))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def cmd_efficiency(args: argparse.Namespace) -> int:
    """``mupp efficiency``: each setting's gain over SGD and the share of the reference
    setting's gain it keeps (cheap SAM against two-pass μP² SAM), with paired CIs."""
    if not 0 < args.goal <= 1:
        raise ValueError(f"--goal must be a share in (0, 1]; got {args.goal}")
    summary = efficiency_summary(_rows(args), reference=args.reference, goal=args.goal)
    if not any(r["setting"] == args.reference for r in summary["rows"]):
        raise ValueError(
            f"--reference {args.reference!r} has no finished SAM and SGD cells in this sweep"
        )
    print(format_efficiency(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``mupp demo``: the mechanism (the perturbation coordinate check of μP-global and μP²,
    Fig. 2), then the accuracy verdict of the overfitting regime in miniature (preset
    ``mlp-cifar10-demo``: μP² against μP-global at width 1024, paired by seed), in sentences
    and one figure (:mod:`mupp.lab.demo`)."""
    if isinstance(args.workers, bool) or args.workers < 1:
        raise ValueError(f"--workers must be a whole number >= 1; got {args.workers}")
    if args.seeds < 2:
        raise ValueError(f"--seeds must be >= 2 (an interval needs two seeds); got {args.seeds}")
    out = Path(args.out)
    _check_writable(out, "--out")
    spec = load_preset("mlp-cifar10-demo")
    base, grid = dict(spec["train"]), {k: list(v) for k, v in spec["grid"].items()}
    grid["seed"] = list(range(args.seeds))
    try:
        data.load("cifar10", args.data_dir)
    except FileNotFoundError as e:
        raise ValueError(f"mupp demo needs CIFAR-10 (its claim is about real data): {e}") from None
    base["data_dir"] = str(Path(args.data_dir).resolve()) if args.data_dir else None
    t0 = time.time()
    print("1. The mechanism (Fig. 2): the perturbation effect ||ε_l x|| per layer against width")
    mech = demo.mechanism(data_dir=base["data_dir"])
    for setting in demo.SETTINGS:
        slopes = ", ".join(f"{r} {e:+.2f}" for r, e in mech["slopes"][setting].items())
        print(f"   {setting:<11} width exponents: {slopes}")
    n_runs = len(grid["width"]) * len(grid["rho"]) * len(grid["setting"]) * len(grid["seed"])
    print(
        f"2. The accuracy: {n_runs} grid points ({', '.join(grid['setting'])}; widths "
        f"{grid['width']}; rho {grid['rho']} at lr {base['lr']}; seeds {grid['seed']}), "
        f"{base['epochs']} epochs each; output in {out}"
    )
    records = run_sweep(
        grid,
        base,
        str(out),
        workers=args.workers,
        progress=not args.no_progress,
        order=spec.get("sweep", {}).get("order"),
        keep_checkpoints=args.keep_checkpoints,
    )
    v = demo.verdict(rows_from_records(records))
    (out / "demo.json").write_text(json.dumps({"mechanism": mech, "verdict": v}, indent=1))
    figure = plot_demo(mech, v, str(out / "demo.png"))
    print("3. The verdict")
    for line in demo.sentences(v, mech):
        print(f"   {line}")
    print(f"figure: {figure}; numbers: {out / 'demo.json'}; wall time {time.time() - t0:.0f}s")
    return 0


def _check_writable(path: Path, flag: str) -> None:
    """One clear line when ``path`` cannot be created or written (before any work)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {probe} is not a writable directory")
