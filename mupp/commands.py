"""Subcommands beyond data/theory: models, coordcheck, train, demo (registered into the CLI)."""

from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> int:
    from .models import build, count_params

    specs = {
        "mlp": dict(widths=args.widths or [64, 256, 1024, 4096], base=64),
        "resnet18": dict(widths=args.widths or [0.5, 1, 2, 4], base=0.5),
        "resnet10": dict(widths=args.widths or [0.5, 1, 2], base=0.5),
        "resnet8": dict(widths=args.widths or [0.25, 0.5, 1], base=0.5),
        "vit": dict(widths=args.widths or [192, 384, 768], base=384),
    }
    print(f"{'model':<10} {'width':>8} {'parameters':>14}")
    for name, spec in specs.items():
        for w in spec["widths"]:
            import torch

            with torch.device("meta"):
                n = count_params(build(name, w, None))
            print(f"{name:<10} {w:>8g} {n:>14,}")
    return 0


def load_factory(spec: str):
    """``"package.module:function"`` -> the function (a user's width -> model factory)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must be mlp, resnet, vit or MODULE:FUNCTION; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--model {spec}: {module_name} has no function {attr!r}")
    return fn


def _user_coordcheck(args: argparse.Namespace) -> dict:
    """``coordcheck --model pkg.mod:make``: the user's ``make(width)`` with SGD-based SAM on the
    chosen dataset (images flattened with ``--flatten``)."""
    import torch

    from . import data
    from .diagnostics.coordcheck import coord_data, sgd_sam

    make = load_factory(args.model)
    ds = data.load(args.dataset, args.data_dir)

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield from data.batches(
                ds.train,
                args.batch_size,
                shuffle=True,
                generator=gen,
                name=ds.name,
                flatten=args.flatten,
                drop_last=True,
            )

    def make_optimizer(model):
        return sgd_sam(model, args.parameterization, args.variant, args.rule, args.lr, args.rho)

    config = dict(
        model=args.model,
        parameterization=args.parameterization,
        variant=args.variant,
        rule=args.rule,
        lr=args.lr,
        rho=args.rho,
        dataset=args.dataset,
    )
    return coord_data(
        make,
        args.widths,
        make_optimizer,
        batches,
        steps=args.steps,
        seeds=args.seeds,
        progress=True,
        config=config,
    )


def cmd_coordcheck(args: argparse.Namespace) -> int:

    from .diagnostics import coordcheck, format_tables, last_layer_equivalence

    if ":" in args.model:
        if args.compare_last_layer:
            raise ValueError("--compare-last-layer runs on the built-in models only")
        result = _user_coordcheck(args)
        print(format_tables(result))
        _write_coordcheck(result, args)
        return 0
    widths = [
        int(w) if float(w).is_integer() and args.model != "resnet" else w for w in args.widths
    ]
    common = dict(
        base_width=args.base_width,
        steps=args.steps,
        seeds=args.seeds,
        lr=args.lr,
        rho=args.rho,
        batch_size=args.batch_size,
        dataset=args.dataset,
        data_dir=args.data_dir,
    )
    if args.compare_last_layer:
        res = last_layer_equivalence(args.model, widths, **common)
        print(
            "μP-global SAM vs last-layer SAM (App. H.1): gap = ||f_SAM - f_LL|| / ||f_SAM - f_SGD||"
        )
        for w, g in zip(res["widths"], res["gap"]):
            print(f"  width {w:>8g}: gap {g:.4f}")
        print(f"  width exponent of the gap: {res['slope']:+.2f}")
        return 0
    result = coordcheck(
        args.model,
        widths,
        parameterization=args.parameterization,
        variant=args.variant,
        rule=args.rule,
        **common,
    )
    print(format_tables(result))
    _write_coordcheck(result, args)
    return 0


def _write_coordcheck(result: dict, args: argparse.Namespace) -> None:
    import json

    from .diagnostics import plot

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    from .diagnostics.statistics import format_statistics, run_statistics

    results = [
        run_statistics(r, data_dir=args.data_dir, probe_size=args.probe_size) for r in args.runs
    ]
    print(format_statistics(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def add_sam_args(p: argparse.ArgumentParser) -> None:
    """The SAM options shared by coordcheck, train and sweep."""
    from .optim.groups import PARAMETERIZATIONS
    from .optim.perturbation import RULES, VARIANTS

    p.add_argument("--parameterization", default="mupp", choices=PARAMETERIZATIONS)
    p.add_argument("--variant", default="sam", choices=VARIANTS)
    p.add_argument("--rule", default="LP", choices=RULES)


# ------------------------------------------------------------------------------ train / sweep

TRAIN_FLAGS = {
    # flag: (type, help)
    "model": (str, "mlp | resnet18 | resnet10 | resnet8 | vit"),
    "width": (float, "hidden width (ResNets: width multiplier)"),
    "base_width": (float, "base width of the μP scaling"),
    "dataset": (str, "cifar10 | cifar100 | synthetic"),
    "data_dir": (str, "where the dataset lives"),
    "train_subset": (int, "use the first N training images"),
    "test_subset": (int, "use the first N test images"),
    "optimizer": (str, "sgd | adamw"),
    "lr": (float, "base learning rate η"),
    "rho": (float, "perturbation radius ρ (0: base optimizer only)"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "weight decay"),
    "schedule": (str, "constant | cosine"),
    "warmup_epochs": (float, "linear warmup epochs"),
    "label_smoothing": (float, "label smoothing"),
    "batch_size": (int, "batch size"),
    "epochs": (int, "epochs"),
    "seed": (int, "seed"),
    "device": (str, "cpu | cuda"),
}


def _parse_value(text: str):
    import json

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


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, load_config_file, train

    config = load_config_file(args.config) if args.config else {}
    config = dict(config.get("train", config))
    for name in TRAIN_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            config[name] = v
    for flag in ("parameterization", "variant", "rule"):
        if getattr(args, flag) is not None:
            config[flag] = getattr(args, flag)
    if args.nesterov:
        config["nesterov"] = True
    if args.augment:
        config["augment"] = True
    _apply_sets(config, args.set)
    cfg = TrainConfig.from_dict(config)
    if args.resume and args.restart:
        raise ValueError("give either --resume or --restart, not both")
    if args.restart and args.out:
        _discard_checkpoint(args.out)
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        progress=not args.no_progress,
        stop_after_epochs=args.stop_after_epochs,
    )
    from .distributed import world

    if world()[0] != 0:
        return 0
    print(
        f"best test acc {result['best_test_acc']:.4f} (epoch {result['best_epoch']}), final "
        f"{result['final_test_acc']:.4f}, diverged {result['diverged']}, {result['wall_time']:.1f}s"
    )
    if args.out:
        print(f"wrote {args.out}/result.json")
    return 0


def _discard_checkpoint(out: str) -> None:
    """``--restart``: remove the run's checkpoint (file or sharded directory) and record."""
    import shutil
    from pathlib import Path

    from .distributed import world

    if world()[0] != 0:
        return
    folder = Path(out)
    for name in ("checkpoint.pt", "checkpoint.pt.tmp", "result.json"):
        (folder / name).unlink(missing_ok=True)
    for name in ("checkpoint", "checkpoint.tmp"):
        shutil.rmtree(folder / name, ignore_errors=True)


def preset_names() -> list[str]:
    """The experiments shipped in ``mupp/presets``."""
    from importlib import resources

    folder = resources.files("mupp") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    from importlib import resources

    from .train import load_config_file

    path = resources.files("mupp") / "presets" / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"preset must be one of {preset_names()}; got {name!r}")
    return load_config_file(str(path))


def _sweep_spec(args: argparse.Namespace) -> tuple[dict, dict, list | None]:
    """(base config, grid, queue order) of a sweep from --preset/--config, --set, --grid."""
    from .train import load_config_file

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
        from pathlib import Path

        base["data_dir"] = str(Path(args.data_dir).expanduser().resolve())
    _apply_sets(base, args.set)
    for item in args.grid or []:
        if "=" not in item:
            raise ValueError(f"--grid expects KEY=V1,V2,...; got {item!r}")
        k, v = item.split("=", 1)
        grid[k.strip()] = [_parse_value(x) for x in v.split(",")]
    if not grid:
        raise ValueError(
            "the sweep has no grid: use --preset, a --config with a [grid] table, or --grid"
        )
    from .sweep import expand_point, grid_points
    from .train import TrainConfig

    order = spec.get("sweep", {}).get("order")
    if order is not None:
        order = [k for k in order if k in grid] + [k for k in grid if k not in order]
    for point in grid_points(grid, order):  # every point is valid before any work starts
        try:
            TrainConfig.from_dict({**base, **expand_point(point)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid point {point}: {e}") from None
    return base, grid, order


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import data
    from .sweep import grid_points, run_sweep

    base, grid, order = _sweep_spec(args)
    if base.get("dataset", "cifar10") != "synthetic":  # before any worker starts
        data.load(base.get("dataset", "cifar10"), base.get("data_dir"))
    import os

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
    )
    total = len(grid_points(grid))
    if len(results) < total:
        print(
            f"sweep incomplete: {len(results)} of {total} grid points have results in "
            f"{args.out}; the others are queued or running in another worker. A killed worker's "
            "trial is re-queued once its heartbeat is stale (about 10 s): rerun this command to "
            "resume."
        )
        return 0 if args.allow_partial else 3
    print(f"sweep finished: {len(results)} of {total} grid points have results in {args.out}")
    return 0


def _rows(args: argparse.Namespace) -> list[dict]:
    from pathlib import Path

    from .analysis import rows_from_records
    from .sweep import load_results, storage_url

    if args.storage is None and not (Path(args.out) / "sweep.db").exists():
        raise ValueError(
            f"no sweep in {args.out}: expected {Path(args.out) / 'sweep.db'}, or pass --storage URL"
        )
    try:
        records = load_results(storage_url(args.out, args.storage))
    except KeyError:
        raise ValueError(f"the storage for {args.out} holds no mupp sweep") from None
    if not records:
        raise ValueError(f"no finished runs in the sweep at {args.out}")
    rows = rows_from_records(records)
    seeds = getattr(args, "seeds", None)
    if seeds is not None:
        rows = [r for r in rows if r["seed"] in seeds]
        if not rows:
            raise ValueError(f"--seeds {seeds}: no finished runs with these seeds in {args.out}")
    return rows


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .analysis import plot_sweep

    paths = plot_sweep(_rows(args), str(Path(args.out) / "sweep"))
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    import json

    from .analysis import format_transfer, transfer_summary

    summary = transfer_summary(_rows(args))
    print(format_transfer(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The overfitting regime in miniature (preset ``mlp-cifar10-demo``): ρ-slices at one η for
    μP² and μP-global across widths, 2 seeds, SAM's gain with 95% intervals."""
    import json
    import time
    from pathlib import Path

    from . import data
    from .analysis import format_transfer, plot_sweep, rows_from_records, transfer_summary
    from .sweep import run_sweep

    spec = load_preset("mlp-cifar10-demo")
    base, grid = dict(spec["train"]), {k: list(v) for k, v in spec["grid"].items()}
    try:
        data.load("cifar10", args.data_dir)
        base["data_dir"] = str(Path(args.data_dir).resolve()) if args.data_dir else None
    except FileNotFoundError as e:
        print(f"mupp demo: CIFAR-10 not found, using synthetic data instead.\n{e}")
        base["dataset"] = "synthetic"
        base.pop("train_subset", None)
        base.pop("test_subset", None)
    t0 = time.time()
    n_runs = len(grid["width"]) * len(grid["rho"]) * len(grid["setting"]) * len(grid["seed"])
    print(
        f"mupp demo: {n_runs} grid points ({', '.join(grid['setting'])}; widths "
        f"{grid['width']}; rho {grid['rho']} at lr {base['lr']}; seeds {grid['seed']}), "
        f"{base['epochs']} epochs each; output in {args.out}"
    )
    records = run_sweep(
        grid,
        base,
        args.out,
        workers=args.workers,
        progress=not args.no_progress,
        order=spec.get("sweep", {}).get("order"),
        keep_checkpoints=args.keep_checkpoints,
    )
    rows = rows_from_records(records)
    paths = plot_sweep(rows, str(Path(args.out) / "sweep"))
    summary = transfer_summary(rows)
    (Path(args.out) / "transfer.json").write_text(json.dumps(summary, indent=1, default=str))
    print(format_transfer(summary))
    print(f"figures: {', '.join(paths)}")
    print(f"transfer table: {Path(args.out) / 'transfer.json'}; wall time {time.time() - t0:.0f}s")
    return 0


def _add_sweep_io(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/sweep", help="output directory (runs, SQLite storage, figures)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: SQLite in --out; 'journal:PATH' for a journal file)",
    )


def _add_seed_filter(p: argparse.ArgumentParser) -> None:
    def seed_list(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seeds like 0,1; got {text!r}") from None

    p.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="only these seeds, e.g. 0 (a study in progress: compare cells on the same seeds)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import float_list

    t = sub.add_parser("train", help="one training run from flags or a TOML/YAML config")
    t.add_argument("--config", default=None, help="TOML/YAML file (a [train] table or flat keys)")
    for name, (typ, hlp) in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hlp)
    t.add_argument("--parameterization", default=None)
    t.add_argument("--variant", default=None)
    t.add_argument("--rule", default=None)
    t.add_argument("--nesterov", action="store_true")
    t.add_argument("--augment", action="store_true", help="random crop + horizontal flip")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help='any training option, e.g. model_kwargs={"output_mult": 0.5}',
    )
    t.add_argument("--out", default=None, help="directory for checkpoint.pt and result.json")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument(
        "--restart",
        action="store_true",
        help="discard the checkpoint and record in --out and start the run over",
    )
    t.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        metavar="N",
        help="end this call after N epochs (time-boxed jobs); continue later with --resume",
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sweep", help="grid sweep through Optuna storage (resumable, multi-worker)")
    s.add_argument(
        "--preset",
        default=None,
        help="a built-in experiment: " + " | ".join(preset_names()),
    )
    s.add_argument("--config", default=None, help="TOML/YAML with [train] and [grid] tables")
    s.add_argument(
        "--grid", action="append", metavar="KEY=V1,V2", help="add or replace a grid axis"
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training option")
    s.add_argument("--data-dir", default=None)
    _add_sweep_io(s)
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local worker processes, one thread each (default: one per CPU core, the layout "
        "that trained the most study runs per hour: benchmarks/study_run.py)",
    )
    s.add_argument(
        "--reclaim-running",
        action="store_true",
        help="re-run trials left RUNNING by killed workers now (no other worker alive)",
    )
    s.add_argument("--no-progress", action="store_true")
    s.add_argument(
        "--allow-partial",
        action="store_true",
        help="exit 0 even when grid points are still queued or running elsewhere (default: 3)",
    )
    s.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished run's weights (default: only its record; interrupted runs "
        "always keep their checkpoint to resume from)",
    )
    s.add_argument(
        "--vectorize",
        choices=["auto", "on", "off"],
        default="auto",
        help="train MLP grid points that differ only in lr/rho together (auto: on CUDA only)",
    )
    s.set_defaults(func=cmd_sweep)

    pl = sub.add_parser("plot", help="Fig. 1-style heatmaps and slices of a sweep (PNG + PDF)")
    _add_sweep_io(pl)
    _add_seed_filter(pl)
    pl.set_defaults(func=cmd_plot)

    tr = sub.add_parser("transfer", help="optimum per width, shift, transfer regret, SAM gain")
    _add_sweep_io(tr)
    _add_seed_filter(tr)
    tr.add_argument("--json", default=None)
    tr.set_defaults(func=cmd_transfer)

    d = sub.add_parser(
        "demo", help="SAM's gain across widths in the overfitting regime, in miniature (~10 min)"
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--keep-checkpoints", action="store_true", help="keep each run's weights")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("coordcheck", help="perturbation and update coordinate check across widths")
    c.add_argument(
        "--model",
        default="mlp",
        help="mlp | resnet | vit, or MODULE:FUNCTION, your width -> model factory (base shapes "
        "set), e.g. mypkg.models:make",
    )
    c.add_argument(
        "--flatten", action="store_true", help="with MODULE:FUNCTION: feed images as vectors"
    )
    add_sam_args(c)
    c.add_argument("--widths", type=float_list, default=[64, 128, 256, 512])
    c.add_argument("--base-width", type=float, default=None)
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--seeds", type=int, default=2)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--rho", type=float, default=0.1)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--dataset", default="synthetic", choices=["cifar10", "cifar100", "synthetic"])
    c.add_argument("--data-dir", default=None)
    c.add_argument("--json", default=None, help="write the result as JSON")
    c.add_argument("--plot", default=None, help="write a log-log plot (PNG)")
    c.add_argument(
        "--compare-last-layer",
        action="store_true",
        help="instead: how far μP-global SAM is from last-layer SAM, relative to SGD, per width",
    )
    c.set_defaults(func=cmd_coordcheck)

    st = sub.add_parser(
        "stats", help="Fig. H.1 statistics of finished runs (perturbations, updates, Hessian)"
    )
    st.add_argument("runs", nargs="+", help="run directories (with checkpoint.pt)")
    st.add_argument("--data-dir", default=None, help="dataset location (default: the run's)")
    st.add_argument("--probe-size", type=int, default=512, help="training images in the probe")
    st.add_argument("--json", default=None, help="write the statistics as JSON")
    st.set_defaults(func=cmd_stats)

    m = sub.add_parser("models", help="list the models with parameter counts at given widths")
    m.add_argument("--widths", type=lambda s: [float(x) for x in s.split(",")], default=None)
    m.set_defaults(func=cmd_models)
