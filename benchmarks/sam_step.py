"""Time per training step, measured side by side in one run (CPU or CUDA).

Methods: plain SGD; mupp SAM (μP², rules LP and DP); mupp's cheap SAM (LookSAM with a full
step every 5, every-5 without reuse, Momentum-SAM: ``SAM(every=5, reuse="looksam")``,
``SAM(every=5)``, ``SAM(ascent="momentum")``); mupp last-layer SAM as `mupp train` runs
it (one forward and one backward, the first pass's features reused: mupp.optim.lastlayer) and
through the two-pass step (its ascent pass skips the backward below the readout, Remark 3);
plain SAM written the common way (Python
loop over parameters, a stored copy); pytorch-optimizer's SAM and LookSAM (k = 5, its gradient
pass skipped between full steps) when installed.  Models: the
CIFAR MLP (batch 64) at several widths and a small ResNet.  Ratios are taken against SGD and
against the common SAM of the same run.  Memory: persistent optimizer state of each SAM
implementation in units of the parameters' size.

    python benchmarks/sam_step.py [--widths 256,1024,4096] [--steps 10] [--memory] [--json out.json]

``--memory`` also measures each method's peak memory in a fresh process (RSS high-water mark on
CPU, reset before the steps, with glibc returning freed blocks of 64 KiB and more;
``max_memory_allocated`` on CUDA) beyond what the process holds after ``--memory-warmup``
steps (default 1), in units of the parameters' size.  Without a warm-up step the CPU figure
also counts the pages of libtorch's code that a method's kernels read in on first use (file
pages of the RSS; about 4 MB more for SAM's than for SGD's, at any width), not tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _report import write_json

import mupp
from mupp.models import MLP, ResNet8


class CommonSAM:
    """SAM as the popular snippets write it (for comparison only)."""

    def __init__(self, params, rho):
        self.params = [p for p in params if p.requires_grad]
        self.base = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        self.rho = rho
        self.old = {}

    def step(self, closure):
        loss = closure()
        with torch.no_grad():
            norm = torch.norm(
                torch.stack([p.grad.norm(2) for p in self.params if p.grad is not None]), 2
            )
            for p in self.params:
                if p.grad is None:
                    continue
                self.old[p] = p.data.clone()
                p.add_(p.grad * (self.rho / (norm + 1e-12)))
        self.base.zero_grad()
        closure()
        with torch.no_grad():
            for p in self.params:
                if p in self.old:
                    p.data = self.old[p]
        self.base.step()
        self.base.zero_grad()
        return loss


def make_step(method: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if method == "sgd":
        opt = mupp.MuSGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            closure()
            opt.step()
            opt.zero_grad()

        return step, opt
    if method.startswith("mupp"):
        kw = {
            "mupp-LP": {},
            "mupp-DP": {"rule": "DP"},
            "mupp-last-layer": {"variant": "last-layer"},
            "mupp-last-layer-2pass": {"variant": "last-layer"},
            "mupp-looksam5": {"every": 5, "reuse": "looksam"},
            "mupp-every5": {"every": 5},
            "mupp-momentum": {"ascent": "momentum"},
        }[method]
        opt = mupp.SAM(
            model.parameters(),
            torch.optim.SGD,
            lr=0.01,
            rho=0.05,
            momentum=0.9,
            nonfinite="ignore",
            **kw,
        )

        if method == "mupp-last-layer":
            from mupp.optim.lastlayer import LastLayerStep

            fast = LastLayerStep(model, opt)

            def step():
                fast.step(x, y, F.cross_entropy)
                opt.zero_grad()
                assert fast.fast, fast.fallback_reason

            return step, opt

        def step():
            opt.step(closure)
            opt.zero_grad()

        return step, opt
    if method == "common-sam":
        opt = CommonSAM(model.parameters(), 0.05)
        return (lambda: opt.step(closure)), opt
    if method == "pytorch-optimizer-sam":
        from pytorch_optimizer import SAM as PSAM

        opt = PSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)

        def step():
            closure()  # its step(closure) expects the first gradient to be there already
            opt.step(closure)
            opt.zero_grad()

        return step, opt
    if method == "pytorch-optimizer-looksam5":
        from pytorch_optimizer import LookSAM

        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, lr=0.01, momentum=0.9)

        def step():
            closure()
            if opt.get_step() % opt.k == 0:  # a full step: perturb, the gradient at W + ε
                opt.first_step(zero_grad=True)
                closure()
            opt.second_step(zero_grad=True)  # between: its reused component, the base step

        return step, opt
    raise ValueError(method)


def state_bytes(opt) -> int:
    """Bytes of parameter-shaped SAM state (saved weights), excluding the base optimizer's."""
    if isinstance(opt, CommonSAM):
        return sum(t.numel() * t.element_size() for t in opt.old.values())
    if isinstance(opt, torch.optim.SGD):
        return 0
    total = 0
    states = list(opt.state.values())
    base = getattr(opt, "base_optimizer", None)
    if base is not None and base.state is not opt.state:
        states += list(base.state.values())  # mupp's LookSAM direction lives there
    for st in states:
        for k, v in st.items():
            if torch.is_tensor(v) and k in SAM_STATE:
                total += v.numel() * v.element_size()
    return total


# parameter-shaped SAM state: saved or perturbed weights, LookSAM's reused direction
SAM_STATE = ("w_saved", "old_p", "eps", "looksam_direction", "old_grad_p", "gv")


def bench(models: dict, methods: list[str], steps: int, repeats: int, device: str) -> dict:
    times: dict[str, dict[str, float]] = {m: {} for m in methods}
    mem: dict[str, dict[str, float]] = {m: {} for m in methods}
    for name, make in models.items():
        torch.manual_seed(0)
        x_shape = (64, 3072) if name.startswith("mlp") else (64, 3, 32, 32)
        x = torch.randn(*x_shape, device=device)
        y = torch.randint(0, 10, (64,), device=device)
        runners = {}
        for m in methods:
            model = make().to(device)
            runners[m] = (model, *make_step(m, model, x, y))
        samples: dict[str, list[float]] = {m: [] for m in methods}
        for m in methods:  # warm-up
            for _ in range(2):
                runners[m][1]()
        for _ in range(repeats):  # interleaved, so drift hits every method alike
            for m in methods:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    runners[m][1]()
                if device == "cuda":
                    torch.cuda.synchronize()
                samples[m].append((time.perf_counter() - t0) / steps)
        for m in methods:
            times[m][name] = statistics.median(samples[m])
            model, _, opt = runners[m]
            pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
            mem[m][name] = state_bytes(opt) / pbytes
        print(
            f"{name}: " + ", ".join(f"{m} {times[m][name] * 1e3:.1f} ms" for m in methods),
            flush=True,
        )
    return {"times": times, "state_over_params": mem}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM; ``ru_maxrss`` would carry the parent's
    peak across ``exec`` on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_file_bytes() -> int:
    """File-backed resident memory (RssFile): mapped code and data files, not tensors."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # sets the high-water mark to the current RSS (Linux)


def measure_peak(model_name: str, method: str, steps: int, device: str, warmup: int = 1) -> dict:
    """Peak memory of ``steps`` training steps beyond what the process holds after ``warmup``
    steps (model, data, optimizer state, loaded code): RSS high-water mark on CPU (this
    process measures one method only), ``max_memory_allocated`` on CUDA.  ``file_bytes``: the
    growth of file-backed RSS (code pages) during the measured steps."""
    torch.manual_seed(0)
    make = _models([int(model_name[4:])] if model_name.startswith("mlp") else [])[model_name]
    model = make().to(device)
    x_shape = (64, 3072) if model_name.startswith("mlp") else (64, 3, 32, 32)
    x = torch.randn(*x_shape, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    step, _ = make_step(method, model, x, y)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    for _ in range(warmup):
        step()
    file_before = _rss_file_bytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _reset_peak_rss()
        before = _rss_bytes()
        for _ in range(steps):
            step()
        peak = _peak_rss_bytes() - before
    return {
        "peak_bytes": peak,
        "param_bytes": params,
        "file_bytes": _rss_file_bytes() - file_before,
    }


def memory_table(
    names: list[str], methods: list[str], steps: int, device: str, warmup: int = 1
) -> dict:
    """:func:`measure_peak` for every model and method, each in a fresh process."""
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    code: dict[str, dict[str, float]] = {m: {} for m in methods}
    for n in names:
        for m in methods:
            cmd = [sys.executable, __file__, "--measure-peak", n, m, "--device", device]
            cmd += ["--memory-warmup", str(warmup)]
            # glibc keeps freed heap blocks mapped, so RSS would count memory the process no
            # longer uses; serving blocks of 64 KiB and more by mmap returns them on free
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            res = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            )
            out[m][n] = res["peak_bytes"] / res["param_bytes"]
            code[m][n] = res["file_bytes"] / 2**20
    sgd = out["sgd"]
    return {
        "warmup_steps": warmup,
        "code_pages_mb": code,
        "peak_over_params": out,
        "extra_over_sgd_in_params": {m: {n: out[m][n] - sgd[n] for n in names} for m in methods},
    }


def _print_memory(mem: dict) -> None:
    print(
        f"peak memory of 3 steps after {mem['warmup_steps']} warm-up step(s), in parameter "
        "sizes (SGD subtracted):"
    )
    for m, per in mem["extra_over_sgd_in_params"].items():
        print(f"  {m:<24}" + "".join(f"{n}: {v:+.2f}  " for n, v in per.items()))


def _models(widths: list[int]) -> dict:
    models = {f"mlp-{w}": (lambda w=w: MLP(w, base_width=64)) for w in widths}
    models["resnet8-0.5"] = lambda: ResNet8(0.5, 0.125)
    return models


def _print_ratios(out: dict, names: list[str], columns: list[tuple[str, str, int]]) -> None:
    """A table of ratios, one row per model: ``columns`` are (header, key of ``out``, width);
    a ratio the run lacks (pytorch-optimizer not installed) prints as nan."""
    print()
    print(f"{'model':<14}" + "".join(f"{h:>{w}}" for h, _, w in columns))
    for n in names:
        cells = "".join(f"{out.get(k, {}).get(n, float('nan')):>{w}.2f}" for _, k, w in columns)
        print(f"{n:<14}" + cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256,1024,4096")
    ap.add_argument(
        "--steps",
        type=int,
        default=5,
        help="steps per sample (a multiple of 5: whole every-5 cycles)",
    )
    ap.add_argument("--mlp-only", action="store_true", help="leave out the ResNet")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory per method")
    ap.add_argument(
        "--memory-warmup",
        type=int,
        default=1,
        help="steps before the memory is measured (0: also count code loaded on first use)",
    )
    ap.add_argument(
        "--memory-only", action="store_true", help="measure memory only (no step times)"
    )
    ap.add_argument("--measure-peak", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_peak:
        peak = measure_peak(
            *args.measure_peak, steps=3, device=args.device, warmup=args.memory_warmup
        )
        print(json.dumps(peak))
        return
    widths = [int(w) for w in args.widths.split(",")]
    models = _models(widths)
    if args.mlp_only:
        models = {n: m for n, m in models.items() if n.startswith("mlp")}
    methods = [
        "sgd",
        "mupp-LP",
        "mupp-DP",
        "mupp-last-layer",
        "mupp-last-layer-2pass",
        "mupp-looksam5",
        "mupp-every5",
        "mupp-momentum",
        "common-sam",
    ]
    try:
        import pytorch_optimizer  # noqa: F401

        methods += ["pytorch-optimizer-sam", "pytorch-optimizer-looksam5"]
    except ImportError:
        print("pytorch-optimizer not installed: its column is left out")
    if args.memory_only:
        mem = memory_table(list(models), methods, 3, args.device, args.memory_warmup)
        _print_memory(mem)
        write_json(args.json, {"device": args.device, "torch": torch.__version__, "memory": mem})
        return
    res = bench(models, methods, args.steps, args.repeats, args.device)
    t = res["times"]
    names = list(models)
    out = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "widths": widths,
        "models": names,
        "t_sgd": t["sgd"],
        "t_mupp": t["mupp-LP"],
        "t_mupp_dp": t["mupp-DP"],
        "t_mupp_last_layer": t["mupp-last-layer"],
        "t_common_sam": t["common-sam"],
        "ratio_mupp_over_sgd": {n: t["mupp-LP"][n] / t["sgd"][n] for n in names},
        "ratio_mupp_dp_over_sgd": {n: t["mupp-DP"][n] / t["sgd"][n] for n in names},
        "ratio_last_layer_over_sgd": {n: t["mupp-last-layer"][n] / t["sgd"][n] for n in names},
        "ratio_last_layer_2pass_over_sgd": {
            n: t["mupp-last-layer-2pass"][n] / t["sgd"][n] for n in names
        },
        "ratio_mupp_over_common_sam": {n: t["mupp-LP"][n] / t["common-sam"][n] for n in names},
        "ratio_looksam_over_sgd": {n: t["mupp-looksam5"][n] / t["sgd"][n] for n in names},
        "ratio_every5_over_sgd": {n: t["mupp-every5"][n] / t["sgd"][n] for n in names},
        "ratio_momentum_sam_over_sgd": {n: t["mupp-momentum"][n] / t["sgd"][n] for n in names},
        "state_over_params": res["state_over_params"],
    }
    if args.memory:
        out["memory"] = memory_table(names, methods, 3, args.device, args.memory_warmup)
    if "pytorch-optimizer-sam" in t:
        out["t_peer"] = t["pytorch-optimizer-sam"]
        out["ratio_mupp_over_peer"] = {
            n: t["mupp-LP"][n] / t["pytorch-optimizer-sam"][n] for n in names
        }
        out["ratio_peer_looksam_over_sgd"] = {
            n: t["pytorch-optimizer-looksam5"][n] / t["sgd"][n] for n in names
        }
    _print_ratios(
        out,
        names,
        [
            ("mupp/SGD", "ratio_mupp_over_sgd", 10),
            ("DP/SGD", "ratio_mupp_dp_over_sgd", 10),
            ("LL/SGD", "ratio_last_layer_over_sgd", 10),
            ("LL2p/SGD", "ratio_last_layer_2pass_over_sgd", 10),
            ("mupp/common", "ratio_mupp_over_common_sam", 13),
            ("mupp/peer", "ratio_mupp_over_peer", 11),
        ],
    )
    _print_ratios(
        out,
        names,
        [
            ("LookSAM5/SGD", "ratio_looksam_over_sgd", 14),
            ("every5/SGD", "ratio_every5_over_sgd", 12),
            ("MSAM/SGD", "ratio_momentum_sam_over_sgd", 10),
            ("peer LookSAM5/SGD", "ratio_peer_looksam_over_sgd", 19),
        ],
    )
    print(
        "persistent SAM state / parameter size:",
        {m: round(v[names[0]], 2) for m, v in res["state_over_params"].items()},
    )
    if args.memory:
        _print_memory(out["memory"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
