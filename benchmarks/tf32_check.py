"""TF32 against fp32 on one slice of the paper preset: is the accuracy unchanged?

Trains the same vectorized group (μP² at one width, ρ ∈ {0, 0.1}, seeds 0 and 1) twice, with
``torch.backends.cuda.matmul.allow_tf32`` (and cuDNN's) off and on, and prints the largest
difference in best-epoch test accuracy and the time ratio.  mupp's presets run in fp32; use
TF32 only where this shows no change.  On a CPU both runs are fp32 (the flags do nothing).

    python benchmarks/tf32_check.py [--width 1024] [--epochs 2] [--data-dir D] [--json F]
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import write_json

from mupp.lab import data
from mupp.lab.config import TrainConfig
from mupp.lab.vectorized import train_group


def run(cfgs: list[dict], ds: data.Dataset, tf32: bool) -> tuple[list[dict], float]:
    """The group's records and wall time with TF32 on or off."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    t0 = time.perf_counter()
    out = train_group([TrainConfig.from_dict(c) for c in cfgs], ds)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=None)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        ds, name = data.load("cifar10", args.data_dir), "cifar10"
    except FileNotFoundError:
        ds, name = data.synthetic(2048, 512), "synthetic"
    base = dict(
        model="mlp", width=args.width, base_width=256, dataset=name, optimizer="sgd",
        batch_size=64, epochs=args.epochs, lr=0.05, parameterization="mupp",
        train_subset=args.train_subset, test_subset=args.test_subset, device=args.device,
    )  # fmt: skip
    cfgs = [dict(base, rho=rho, seed=seed) for seed in (0, 1) for rho in (0.0, 0.1)]
    run([dict(cfgs[0], epochs=1)], ds, tf32=False)  # warm-up: kernels, allocator, data on device
    fp32, t_fp32 = run(cfgs, ds, tf32=False)
    tf32, t_tf32 = run(cfgs, ds, tf32=True)
    diff = max(abs(a["best_test_acc"] - b["best_test_acc"]) for a, b in zip(fp32, tf32))
    out = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dataset": name,
        "width": args.width,
        "epochs": args.epochs,
        "best_test_acc_fp32": [r["best_test_acc"] for r in fp32],
        "best_test_acc_tf32": [r["best_test_acc"] for r in tf32],
        "max_best_acc_diff": diff,
        "time_fp32_s": t_fp32,
        "time_tf32_s": t_tf32,
        "speedup_tf32": t_fp32 / t_tf32,
    }
    print(
        f"{out['device']}: width {args.width}, max best-accuracy difference TF32 - fp32 "
        f"{diff * 100:.2f} points; TF32 {out['speedup_tf32']:.2f}x the speed of fp32"
    )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
