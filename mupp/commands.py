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


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list the models with parameter counts at given widths")
    m.add_argument("--widths", type=lambda s: [float(x) for x in s.split(",")], default=None)
    m.set_defaults(func=cmd_models)
