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


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def cmd_coordcheck(args: argparse.Namespace) -> int:
    import json

    from .diagnostics import coordcheck, format_tables, plot

    widths = [
        int(w) if float(w).is_integer() and args.model != "resnet" else w for w in args.widths
    ]
    result = coordcheck(
        args.model,
        widths,
        base_width=args.base_width,
        parameterization=args.parameterization,
        variant=args.variant,
        rule=args.rule,
        steps=args.steps,
        seeds=args.seeds,
        lr=args.lr,
        rho=args.rho,
        batch_size=args.batch_size,
        dataset=args.dataset,
        data_dir=args.data_dir,
    )
    print(format_tables(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_sam_args(p: argparse.ArgumentParser) -> None:
    """The SAM options shared by coordcheck, train and sweep."""
    from .optim.groups import PARAMETERIZATIONS
    from .optim.perturbation import RULES, VARIANTS

    p.add_argument("--parameterization", default="mupp", choices=PARAMETERIZATIONS)
    p.add_argument("--variant", default="sam", choices=VARIANTS)
    p.add_argument("--rule", default="LP", choices=RULES)


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("coordcheck", help="perturbation and update coordinate check across widths")
    c.add_argument("--model", default="mlp", choices=["mlp", "resnet", "vit"])
    add_sam_args(c)
    c.add_argument("--widths", type=_float_list, default=[64, 128, 256, 512])
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
    c.set_defaults(func=cmd_coordcheck)

    m = sub.add_parser("models", help="list the models with parameter counts at given widths")
    m.add_argument("--widths", type=lambda s: [float(x) for x in s.split(",")], default=None)
    m.set_defaults(func=cmd_models)
