"""What one run of the overfitting study costs, and how to lay runs out on the cores.

1. Per width: the time of one training epoch (4096 images, μP² SAM) and of one evaluation on
   the 10,000 test images, the old way (normalize every batch every epoch, autograd off) and
   the new way (inputs prepared once per run, inference mode), with their accuracies compared.
2. Runs per hour of a batch of short study runs, one process with all threads against one
   process per core with one thread each.

    python benchmarks/study_run.py --data-dir ../shared/datasets [--widths 64,256,1024]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch
import torch.nn.functional as F
from _report import write_json

from mupp.lab import data as data_mod
from mupp.lab.config import TrainConfig, make_model
from mupp.lab.train import (
    epoch_batches,
    eval_inputs,
    evaluate,
    make_optimizer,
    splits,
    train,
)

STUDY = dict(
    model="mlp", base_width=64, dataset="cifar10", train_subset=4096, optimizer="sgd",
    schedule="constant", batch_size=64, lr=0.05, rho=0.2, parameterization="mupp",
)  # fmt: skip


@torch.no_grad()
def evaluate_old(model, split, name, flatten):
    """The evaluation before this change: every batch normalized again, every epoch."""
    model.eval()
    correct, total = [], 0.0
    for x, y in data_mod.batches(split, 500, shuffle=False, name=name, flatten=flatten):
        out = model(x)
        total += F.cross_entropy(out, y, reduction="sum").item()
        correct.append(out.argmax(1) == y)
    model.train()
    c = torch.cat(correct)
    return c.float().mean().item(), total / len(c)


def epoch_costs(width: int, ds: data_mod.Dataset, repeats: int = 3) -> dict:
    cfg = TrainConfig.from_dict(dict(STUDY, width=width, data_dir=None))
    train_split, test_split = splits(cfg, ds)
    torch.manual_seed(0)
    model = make_model(cfg, 10)
    opt = make_optimizer(cfg, model)
    t0 = time.perf_counter()
    for x, y in epoch_batches(cfg, train_split, ds.name, 0):
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y).backward())
        opt.zero_grad()
    t_train = time.perf_counter() - t0
    old, new, acc_old, acc_new = [], [], None, None
    t0 = time.perf_counter()
    prepared = eval_inputs(test_split, ds.name, True)  # once per run
    t_prepare = time.perf_counter() - t0
    for _ in range(repeats):
        t0 = time.perf_counter()
        acc_old = evaluate_old(model, test_split, ds.name, True)
        old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        acc_new = evaluate(model, *prepared)[:2]
        new.append(time.perf_counter() - t0)
    return {
        "train_epoch_s": t_train,
        "eval_old_s": min(old),
        "eval_new_s": min(new),
        "prepare_once_s": t_prepare,
        "eval_share_old": min(old) / (t_train + min(old)),
        "eval_share_new": min(new) / (t_train + min(new)),
        "acc_old": acc_old,
        "acc_new": acc_new,
    }


def _run(args):
    cfg, threads, ds = args
    torch.set_num_threads(threads)
    train(TrainConfig.from_dict(cfg), progress=False, log=None, dataset=ds)


def runs_per_hour(width: int, ds, n_runs: int, epochs: int) -> dict:
    cfgs = [dict(STUDY, width=width, epochs=epochs, seed=s, data_dir=None) for s in range(n_runs)]
    out = {}
    t0 = time.perf_counter()
    for c in cfgs:
        _run((c, os.cpu_count() or 1, ds))
    out["1 process x all threads"] = n_runs * 3600 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    workers = os.cpu_count() or 1
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_run, [(c, 1, ds) for c in cfgs])
    out[f"{workers} processes x 1 thread"] = n_runs * 3600 / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--widths", default="64,256,1024")
    ap.add_argument("--layout-runs", type=int, default=4)
    ap.add_argument("--layout-epochs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ds = data_mod.load("cifar10", args.data_dir)
    widths = [int(w) for w in args.widths.split(",")]
    res = {"threads": torch.get_num_threads(), "costs": {}, "layout": {}}
    for w in widths:
        res["costs"][w] = c = epoch_costs(w, ds)
        print(
            f"width {w:>5}: train epoch {c['train_epoch_s']:.2f}s; evaluation {c['eval_old_s']:.2f}s "
            f"-> {c['eval_new_s']:.2f}s (share of an epoch {c['eval_share_old']:.0%} -> "
            f"{c['eval_share_new']:.0%}; inputs prepared once in {c['prepare_once_s']:.2f}s); "
            f"accuracy {c['acc_old'][0]:.4f} / {c['acc_new'][0]:.4f}"
        )
    for w in widths if args.layout_runs > 0 else []:
        res["layout"][w] = r = runs_per_hour(w, ds, args.layout_runs, args.layout_epochs)
        print(
            f"width {w:>5}: runs/hour ({args.layout_epochs}-epoch runs) "
            + ", ".join(f"{k}: {v:.0f}" for k, v in r.items())
        )
    write_json(args.json, res)


if __name__ == "__main__":
    main()
