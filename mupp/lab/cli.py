"""The ``mupp`` command-line tool: the argument parser and the error reporting of ``main``;
:mod:`mupp.lab.commands` does the work."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..choices import ASCENTS, METRICS, MODEL_NAMES, PARAMETERIZATIONS, REUSES, RULES, VARIANTS
from . import commands
from .config import preset_names, train_options
from .storage import parse_seconds


def float_list(text: str) -> list[float]:
    """argparse type: comma-separated numbers, fractions allowed (``-1,1/2,0.5``)."""
    try:
        return [float(eval_fraction(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def eval_fraction(t: str) -> float:
    """A number or a fraction (``1/2``) from the command line."""
    t = t.strip()
    if "/" in t:
        num, den = t.split("/", 1)
        return float(num) / float(den)
    return float(t)


# ------------------------------------------------------------------------------------ parser


def add_sam_args(p: argparse.ArgumentParser) -> None:
    """The SAM options shared by coordcheck, train and sweep."""
    p.add_argument("--parameterization", default="mupp", choices=PARAMETERIZATIONS)
    p.add_argument("--variant", default="sam", choices=VARIANTS)
    p.add_argument("--rule", default="LP", choices=RULES)


def _add_sweep_io(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/sweep", help="output directory (runs, SQLite storage, figures)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: SQLite in --out; 'journal:PATH' for a journal file)",
    )


# how each ``--<key>s`` filter of :data:`commands.RUN_FILTERS` parses and explains itself
_FILTER_ARGS = {
    "lr": (
        float,
        "learning rates",
        "0.05,0.1",
        "only these learning rates, e.g. 0.05 (a study in progress: the η that every seed has "
        "finished)",
    ),
    "rho": (
        float,
        "rho values",
        "0,0.1",
        "only these rho values, e.g. 0,0.1 (a rho chosen on some seeds, judged on others; keep "
        "0 for SGD's side of the gain)",
    ),
    "width": (
        int,
        "widths",
        "64,256",
        "only these widths, e.g. 64,256 (a study in progress: the widths every seed has finished)",
    ),
    "seed": (
        int,
        "seeds",
        "0,1",
        "only these seeds, e.g. 0 (a study in progress: compare cells on the same seeds)",
    ),
}


def _number_list(cast: type, what: str, example: str) -> Callable[[str], list]:
    """An argparse ``type`` for comma-separated numbers, naming what it expected on bad input."""

    def parse(text: str) -> list:
        try:
            return [cast(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what} like {example}; got {text!r}"
            ) from None

    return parse


def _retry_seconds(text: str) -> float:
    """The argparse ``type`` of ``--storage-retry`` (:func:`~.storage.parse_seconds`)."""
    try:
        return parse_seconds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_run_filters(p: argparse.ArgumentParser) -> None:
    """``--seeds``, ``--lrs``, ``--rhos``, ``--widths`` (keep only these runs) and ``--also``
    (add another sweep's runs), shared by ``mupp plot`` and ``mupp transfer``."""
    for key in commands.RUN_FILTERS:
        cast, what, example, help_text = _FILTER_ARGS[key]
        p.add_argument(
            f"--{key}s", type=_number_list(cast, what, example), default=None, help=help_text
        )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="DIR",
        help="add the finished runs of another sweep's directory (repeatable), e.g. a companion "
        "sweep of another setting; a run it shares with an earlier sweep counts once",
    )


def _add_data(sub: argparse._SubParsersAction) -> None:
    """``mupp data info|download``."""
    d = sub.add_parser("data", help="dataset info and download")
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    di = dsub.add_parser("info", help="print split sizes, class counts, channel statistics (JSON)")
    dd = dsub.add_parser("download", help="download the official archive (needs a network)")
    for q in (di, dd):
        q.add_argument("name", choices=["cifar10", "cifar100", "tinyshakespeare"])
        q.add_argument("--data-dir", default=None)
    d.set_defaults(func=commands.cmd_data)


def _add_theory(sub: argparse._SubParsersAction) -> None:
    """``mupp theory [classify]``."""
    t = sub.add_parser("theory", help="Table 1 / Table F.1, or classify a bcd-parameterization")
    t.add_argument("--json", action="store_true")
    tsub = t.add_subparsers(dest="theory_cmd", metavar="ACTION")
    tc = tsub.add_parser("classify", help="stability, effective/vanishing layers (Sec. 4)")
    tc.add_argument("--b", type=float_list, required=True, help="init exponents b_l, e.g. 0,0.5,1")
    tc.add_argument("--c", type=float_list, required=True, help="lr exponents c_l, e.g. -1,0,1")
    tc.add_argument(
        "--dl",
        type=float_list,
        required=True,
        help="layerwise perturbation exponents d_l (nan: not perturbed)",
    )
    tc.add_argument("--d", type=eval_fraction, required=True, help="global perturbation exponent d")
    tc.add_argument("--json", action="store_true")
    t.set_defaults(func=commands.cmd_theory)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``mupp train``: every TrainConfig field as a flag, plus ``--set``."""
    t = sub.add_parser("train", help="one training run from flags or a TOML/YAML config")
    t.add_argument("--config", default=None, help="TOML/YAML file (a [train] table or flat keys)")
    for o in train_options():  # declared once, in TrainConfig
        flag = "--" + o.name.replace("_", "-")
        if o.type is bool:
            t.add_argument(
                flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None, help=o.help
            )
        else:  # choices are checked by TrainConfig, whose error is one line naming them
            hlp = o.help + (f": {' | '.join(map(str, o.choices))}" if o.choices else "")
            t.add_argument(flag, dest=o.name, type=o.type, default=None, help=hlp)
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
    t.set_defaults(func=commands.cmd_train)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    """``mupp sweep``."""
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
    s.add_argument(
        "--only",
        action="append",
        metavar="KEY=V1,V2",
        help="queue only the grid points with these values (a slice run first: the stored grid "
        "stays whole, and a later run without --only queues the rest)",
    )
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
        "--storage-retry",
        type=_retry_seconds,
        default=None,
        metavar="SECONDS",
        help="how long to wait for a database server that went away before failing "
        "(default: $MUPP_STORAGE_RETRY or 60; 0: fail at once)",
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
        help="train MLP grid points that differ only in lr/rho/seed together (auto: on CUDA only)",
    )
    s.set_defaults(func=commands.cmd_sweep)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    """``mupp plot``."""
    pl = sub.add_parser("plot", help="Fig. 1-style heatmaps and slices of a sweep (PNG + PDF)")
    _add_sweep_io(pl)
    _add_run_filters(pl)
    _add_metric(pl)
    pl.set_defaults(func=commands.cmd_plot)


def _add_transfer(sub: argparse._SubParsersAction) -> None:
    """``mupp transfer``."""
    tr = sub.add_parser("transfer", help="optimum per width, shift, transfer regret, SAM gain")
    _add_sweep_io(tr)
    _add_run_filters(tr)
    tr.add_argument("--json", default=None)
    tr.add_argument(
        "--by-lr",
        action="store_true",
        help="under each width, one line per learning rate: its best rho and SAM's gain there",
    )
    tr.add_argument(
        "--versus",
        metavar="SETTING",
        default=None,
        help="also each other setting's best cell minus this setting's (e.g. mupp), per width, "
        "paired by seed",
    )
    _add_metric(tr)
    tr.set_defaults(func=commands.cmd_transfer)


def _add_metric(p: argparse.ArgumentParser) -> None:
    """``--metric`` of the sweep analyses (``mupp transfer``, ``mupp plot``)."""
    p.add_argument(
        "--metric",
        default="acc",
        choices=list(METRICS),
        help="acc: best-epoch test accuracy; loss: the best validation loss (language models; "
        "transfer shows it negated so that higher is better and a gain is a reduction)",
    )


def _add_efficiency(sub: argparse._SubParsersAction) -> None:
    """``mupp efficiency``."""
    e = sub.add_parser(
        "efficiency", help="share of two-pass μP² SAM's gain each (cheap) setting keeps"
    )
    _add_sweep_io(e)
    _add_run_filters(e)
    e.add_argument("--reference", default="mupp", help="the setting whose gain is 100%%")
    e.add_argument("--goal", type=float, default=0.75, help="the share to test for")
    e.add_argument("--json", default=None)
    e.set_defaults(func=commands.cmd_efficiency)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """``mupp demo``."""
    d = sub.add_parser(
        "demo",
        help="the mechanism and the accuracy verdict of μP² against μP-global (~10 min, 2 cores)",
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--seeds", type=int, default=8, help="seeds per cell (more: tighter intervals)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--keep-checkpoints", action="store_true", help="keep each run's weights")
    d.set_defaults(func=commands.cmd_demo)


def _add_coordcheck(sub: argparse._SubParsersAction) -> None:
    """``mupp coordcheck``."""
    c = sub.add_parser("coordcheck", help="perturbation and update coordinate check across widths")
    c.add_argument(
        "--model",
        default="mlp",
        help=" | ".join(MODEL_NAMES) + ", or MODULE:FUNCTION, your width -> model factory (base "
        "shapes set), e.g. mypkg.models:make",
    )
    c.add_argument(
        "--flatten", action="store_true", help="with MODULE:FUNCTION: feed images as vectors"
    )
    add_sam_args(c)
    # left unset, each takes the default of the check that runs (one default, in Python):
    # mupp.lab.checks.coordcheck, or last_layer_equivalence with --compare-last-layer
    check = "(default: the check's own; --help-defaults lists them)"
    c.add_argument("--widths", type=float_list, default=None, help=f"e.g. 64,256,1024 {check}")
    c.add_argument("--base-width", type=float, default=None)
    c.add_argument("--steps", type=int, default=None, help=check)
    c.add_argument("--seeds", type=int, default=None, help=check)
    c.add_argument("--lr", type=float, default=None, help=check)
    c.add_argument("--rho", type=float, default=None, help=check)
    c.add_argument("--batch-size", type=int, default=None, help=check)
    c.add_argument(
        "--help-defaults",
        action="store_true",
        help="print the defaults of coordcheck and --compare-last-layer, and exit",
    )
    c.add_argument("--dataset", default="synthetic", choices=["cifar10", "cifar100", "synthetic"])
    c.add_argument("--data-dir", default=None)
    c.add_argument("--json", default=None, help="write the result as JSON")
    c.add_argument("--plot", default=None, help="write a log-log plot (PNG)")
    c.add_argument("--ascent", default="gradient", choices=ASCENTS, help="momentum: Momentum-SAM")
    c.add_argument("--every", type=int, default=1, help="a full SAM step every K steps")
    c.add_argument("--reuse", default=None, choices=REUSES, help="looksam: LookSAM between")
    c.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    c.add_argument(
        "--compare-last-layer",
        action="store_true",
        help="instead: how far μP-global SAM is from last-layer SAM, relative to SGD, per width",
    )
    c.set_defaults(func=commands.cmd_coordcheck)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    """``mupp verify``."""
    v = sub.add_parser(
        "verify", help="is the model μP, and does μP² perturb every layer? (exit 0 pass, 1 fail)"
    )
    v.add_argument(
        "--model",
        default="gpt",
        help=" | ".join(MODEL_NAMES) + ", or MODULE:FUNCTION, your width -> model factory (base "
        "shapes set; Hugging Face: mupp.integrations.huggingface.prepare), e.g. mypkg.models:make",
    )
    v.add_argument("--widths", type=float_list, default=[64, 128, 256, 512])
    v.add_argument("--base-width", type=float, default=None, help="built-in models only")
    v.add_argument("--parameterization", default="mupp", choices=PARAMETERIZATIONS)
    v.add_argument("--variant", default="sam", choices=VARIANTS)
    v.add_argument("--rule", default="DP", choices=RULES)
    v.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "adamw", "sgd"],
        help="base optimizer (auto: AdamW for token models and the ViT, else SGD)",
    )
    v.add_argument("--lr", type=float, default=None, help="default: 3e-3 (AdamW), 0.05 (SGD)")
    v.add_argument("--rho", type=float, default=0.05)
    v.add_argument("--steps", type=int, default=5)
    v.add_argument("--seeds", type=int, default=2)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument(
        "--inputs",
        default="auto",
        choices=["auto", "images", "tokens"],
        help="auto: random tokens if the model has an Embedding, else --dataset's images",
    )
    v.add_argument("--seq-len", type=int, default=16, help="token inputs: sequence length")
    v.add_argument("--dataset", default="synthetic", choices=["cifar10", "cifar100", "synthetic"])
    v.add_argument("--data-dir", default=None)
    v.add_argument("--flatten", action="store_true", help="feed images as vectors")
    v.add_argument("--json", default=None, help="write the report and measurements as JSON")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=commands.cmd_verify)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    """``mupp stats``."""
    st = sub.add_parser(
        "stats", help="Fig. H.1 statistics of finished runs (perturbations, updates, Hessian)"
    )
    st.add_argument("runs", nargs="+", help="run directories (with checkpoint.pt)")
    st.add_argument("--data-dir", default=None, help="dataset location (default: the run's)")
    st.add_argument("--probe-size", type=int, default=512, help="training images in the probe")
    st.add_argument("--json", default=None, help="write the statistics as JSON")
    st.set_defaults(func=commands.cmd_stats)


def _add_models(sub: argparse._SubParsersAction) -> None:
    """``mupp models``."""
    m = sub.add_parser("models", help="list the models with parameter counts at given widths")
    m.add_argument("--widths", type=float_list, default=None)
    m.set_defaults(func=commands.cmd_models)


def build_parser() -> argparse.ArgumentParser:
    """The ``mupp`` argument parser: one subcommand per function of :mod:`mupp.lab.commands`."""
    p = argparse.ArgumentParser(prog="mupp", description="μP² for Sharpness-Aware Minimization")
    p.add_argument("--version", action="version", version=f"mupp {__version__}")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also: environment variable MUPP_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_data,
        _add_theory,
        _add_models,
        _add_coordcheck,
        _add_verify,
        _add_stats,
        _add_train,
        _add_sweep,
        _add_plot,
        _add_transfer,
        _add_efficiency,
        _add_demo,
    ):
        add(sub)
    return p


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let ``--c -1,0,1`` mean ``--c=-1,0,1`` (argparse takes '-1,0,1' for an option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            tok in ("--b", "--c", "--dl", "--d")
            and nxt
            and nxt.startswith("-")
            and nxt[1:2].isdigit()
        ):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


# what to do about the operating-system errors a long run meets
_OS_REMEDIES = {
    errno.ENOSPC: "free some space (finished runs keep only result.json), then rerun with "
    "--resume: the last complete checkpoint is intact",
    errno.EDQUOT: "free some space within your quota, then rerun with --resume",
    errno.EROFS: "the file system is read-only: choose an --out on a writable one",
    errno.EACCES: "permission denied: choose an --out (or --data-dir) you can write, or fix "
    "its permissions",
    errno.EPERM: "operation not permitted: choose an --out (or --data-dir) you can write",
}


def os_error_line(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, what to do."""
    where = f" ({e.filename})" if e.filename else ""
    what = e.strerror or str(e)
    remedy = _OS_REMEDIES.get(e.errno, "check the path and rerun (--debug shows the traceback)")
    return f"{what}{where}: {remedy}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mupp`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 2 for
    bad input (one line on stderr; ``--debug`` or ``MUPP_DEBUG=1`` shows the traceback)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_join_negative_values(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        # bad input, understood where it was found: one clear line (--debug: the traceback)
        if args.debug or os.environ.get("MUPP_DEBUG"):
            raise
        print(f"mupp: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mupp models | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # the file system refused: a full disk, a read-only mount, permissions
        if args.debug or os.environ.get("MUPP_DEBUG"):
            raise
        print(f"mupp: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a training loop: one line, the shell's code
        if args.debug or os.environ.get("MUPP_DEBUG"):
            raise
        print("mupp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
