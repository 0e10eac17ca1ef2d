"""Configurations trained per hour: vectorized groups vs one run after another, in one process.

K = |lr| x |rho| configurations of the CIFAR-shaped MLP (same seed: same init and data order)
are trained once by :func:`mupp.lab.vectorized.train_group` and once by :func:`mupp.lab.train.train`
each; the script prints both throughputs, their ratio, and the largest difference between the
two sets of per-epoch test losses and accuracies.

    python benchmarks/sweep_throughput.py [--widths 64,256] [--epochs 1] [--train-subset 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from _report import write_json

from mupp.lab import data
from mupp.lab.config import TrainConfig
from mupp.lab.train import train
from mupp.lab.vectorized import train_group

LRS = [0.0125, 0.025, 0.05, 0.1, 0.2]
RHOS = [0.0, 0.025, 0.05, 0.1, 0.2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=2048)
    ap.add_argument(
        "--data-dir", default=None, help="CIFAR-10 location; synthetic data when absent"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        ds = data.load("cifar10", args.data_dir)
        name = "cifar10"
    except FileNotFoundError:
        ds, name = data.synthetic(args.train_subset, 1000), "synthetic"
    out = {
        "dataset": name,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "K": len(LRS) * len(RHOS),
        "widths": {},
    }
    for width in [int(w) for w in args.widths.split(",")]:
        base = dict(
            model="mlp",
            width=width,
            base_width=args.base_width,
            dataset=name,
            device=args.device,
            train_subset=args.train_subset,
            test_subset=1000,
            epochs=args.epochs,
            batch_size=64,
            momentum=0.9,
            seed=0,
        )
        cfgs = [dict(base, lr=lr, rho=rho) for lr in LRS for rho in RHOS]
        t0 = time.perf_counter()
        vec = train_group([TrainConfig.from_dict(c) for c in cfgs], ds)
        _sync(args.device)
        t_vec = time.perf_counter() - t0
        t0 = time.perf_counter()
        seq = [train(TrainConfig.from_dict(c), progress=False, dataset=ds, log=None) for c in cfgs]
        _sync(args.device)
        t_seq = time.perf_counter() - t0
        diff_loss = max(
            abs(a["test_loss"] - b["test_loss"]) / max(1.0, abs(b["test_loss"]))
            for v, s in zip(vec, seq)
            if not s["diverged"]
            for a, b in zip(v["history"], s["history"])
        )
        diff_acc = max(
            abs(v["best_test_acc"] - s["best_test_acc"])
            for v, s in zip(vec, seq)
            if not s["diverged"]
        )
        res = {
            "configs_per_hour_vectorized": len(cfgs) / t_vec * 3600,
            "configs_per_hour_sequential": len(cfgs) / t_seq * 3600,
            "speedup": t_seq / t_vec,
            "max_rel_test_loss_diff": diff_loss,
            "max_best_acc_diff": diff_acc,
            "diverged": sum(s["diverged"] for s in seq),
        }
        out["widths"][width] = res
        print(
            f"width {width}: vectorized {res['configs_per_hour_vectorized']:.0f} configs/h, sequential "
            f"{res['configs_per_hour_sequential']:.0f} configs/h, speedup {res['speedup']:.2f}x; "
            f"max rel. test-loss diff {diff_loss:.2e}, max best-acc diff {diff_acc:.4f}",
            flush=True,
        )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
