"""The ``mupp`` command-line tool.  Heavy dependencies are imported inside each command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def float_list(text: str) -> list[float]:
    """argparse type: comma-separated numbers, fractions allowed (``-1,1/2,0.5``)."""
    try:
        return [float(eval_fraction(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def eval_fraction(t: str) -> float:
    t = t.strip()
    if "/" in t:
        num, den = t.split("/", 1)
        return float(num) / float(den)
    return float(t)


# ------------------------------------------------------------------------------------ data


def cmd_data(args: argparse.Namespace) -> int:
    from . import data

    if args.data_cmd == "info":
        ds = data.load(args.name, args.data_dir)
        print(json.dumps(data.info(ds), indent=2))
    else:
        root = args.data_dir or data.search_dirs()[-1]
        path = data.download_archive(args.name, root)
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
    from . import theory

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


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="mupp", description="μP² for Sharpness-Aware Minimization")
    p.add_argument("--version", action="version", version=f"mupp {__version__}")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also: environment variable MUPP_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("data", help="dataset info and download")
    dsub = d.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    di = dsub.add_parser("info", help="print split sizes, class counts, channel statistics (JSON)")
    dd = dsub.add_parser("download", help="download the official archive (needs a network)")
    for q in (di, dd):
        q.add_argument("name", choices=["cifar10", "cifar100"])
        q.add_argument("--data-dir", default=None)
    d.set_defaults(func=cmd_data)

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
    t.set_defaults(func=cmd_theory)

    from . import commands

    commands.register(sub)
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


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
