"""SAM under DistributedDataParallel with gloo, 2 processes on CPU."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from builders import gloo_group, prepared_mlp, step_data

import mupp
from mupp.distributed import sam_passes

pytestmark = pytest.mark.slow  # multi-process and subprocess runs

STEPS = 4
RHO, LR = 0.1, 0.05


data = step_data


PLANS = {
    "two-pass": {},
    "momentum": dict(ascent="momentum"),
    "looksam": dict(every=3, reuse="looksam"),
    "every": dict(every=3),
}


def _ddp_run(rank, mode, parameterization, plan):
    """The parameters after STEPS SAM steps of the DDP-wrapped model on ``rank``'s half."""
    torch.manual_seed(0)
    model = prepared_mlp(32, 8)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = mupp.SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=LR,
        rho=RHO,
        parameterization=parameterization,
        momentum=0.9,
        **PLANS[plan],
    )
    for step in range(STEPS):
        x, y = data(step, rank)
        sam_passes(ddp, opt, lambda x=x, y=y, net=ddp: F.cross_entropy(net(x), y), mode)
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_file, mode, parameterization, plan):
    with gloo_group(rank, world, init_file):
        # the DDP wrapper (its reducer holds the group) is gone before the group
        params = _ddp_run(rank, mode, parameterization, plan)
        if rank == 0:
            torch.save(params, out_file)


def run_ddp(tmp_path, mode, parameterization="mupp", plan="two-pass"):
    out = tmp_path / f"{mode}.pt"
    tmp.spawn(
        _worker,
        args=(2, str(tmp_path / f"init_{mode}"), str(out), mode, parameterization, plan),
        nprocs=2,
    )
    return torch.load(out)


@pytest.fixture
def model0():
    torch.manual_seed(0)
    return prepared_mlp(32, 8)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_sync_equals_single_process_on_the_concatenated_batch(tmp_path, model0, plan):
    """Two processes against one, for two-pass SAM and each cheap plan (STEPS = 4 covers a
    full step, the steps between and the next full step of every=3)."""
    got = run_ddp(tmp_path, "sync", plan=plan)
    model = model0
    opt = mupp.SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, momentum=0.9, **PLANS[plan])
    for step in range(STEPS):
        x, y = data(step)
        sam_passes(model, opt, lambda x=x, y=y: F.cross_entropy(model(x), y))
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def test_local_equals_per_worker_perturbations_by_hand(tmp_path, model0):
    got = run_ddp(tmp_path, "local", parameterization="sp")
    model = model0
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=0.9)
    for step in range(STEPS):
        descent = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            x, y = data(step, rank)
            w = [p.detach().clone() for p in params]
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(RHO * g / (norm + 1e-12))  # this worker's own ε
            g2 = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, w0, d, g in zip(params, w, descent, g2):
                    p.copy_(w0)
                    d += g / 2  # DDP averages the descent gradient
        for p, d in zip(params, descent):
            p.grad = d
        base.step()
    for a, b in zip(got, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)
    sync = run_ddp(tmp_path, "sync", parameterization="sp")
    assert any(not torch.allclose(a, b) for a, b in zip(got, sync))  # the modes differ


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        sam_passes(torch.nn.Linear(2, 2), None, lambda: None, "global")


def test_metadata_survives_ddp_wrapping(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1
    )
    try:
        model = prepared_mlp(32, 8)
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        mupp.reattach(ddp)
        assert [r["role"] for r in mupp.describe(ddp)] == ["input", "hidden", "output"]
        assert [r["name"] for r in mupp.describe(ddp)] == ["0.weight", "2.weight", "4.weight"]
        del ddp  # before its process group (see _worker)
    finally:
        dist.destroy_process_group()


def _one_process_env(monkeypatch, port):
    for name, value in dict(
        WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    ).items():
        monkeypatch.setenv(name, value)


def test_process_group_destroys_the_group_it_created(monkeypatch):
    from mupp.distributed import process_group

    _one_process_env(monkeypatch, "29731")
    with process_group() as ranks:
        assert ranks == (0, 1) and dist.is_initialized()
    assert not dist.is_initialized()


def test_process_group_leaves_a_group_it_did_not_create(tmp_path, monkeypatch):
    from mupp.distributed import process_group

    _one_process_env(monkeypatch, "29732")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with process_group() as ranks:
            assert ranks == (0, 1)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_mupp_train_under_torchrun(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mupp",
    ]
    cmd += [
        "train",
        "--dataset",
        "synthetic",
        "--width",
        "32",
        "--base-width",
        "32",
        "--epochs",
        "2",
    ]
    cmd += [
        "--set",
        "train_subset=512",
        "--set",
        'perturbation_sync="local"',
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best test acc") == 1  # rank 0 reports
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["history"]) == 2 and result["config"]["perturbation_sync"] == "local"


# --------------------------------------------------------------------------------------------
# preemption under several ranks: a signal on one rank stops every rank after the same step
# --------------------------------------------------------------------------------------------

PREEMPT_CONFIG = dict(
    dataset="synthetic", width=32, base_width=16, epochs=2, batch_size=32, train_subset=256,
    test_subset=64, lr=0.05, rho=0.1, momentum=0.9, schedule="cosine",
)  # fmt: skip


def _preempt_worker(rank, world, init_file, out_dir, parallel, signal_at, resume):
    """Train on 2 ranks; with ``signal_at = (epoch, step)`` rank 0 alone gets SIGTERM during
    that step, and the returned record is the Preempted's fields."""
    import json
    import signal

    import mupp.lab.train as train_mod
    from mupp.lab.config import TrainConfig

    real = train_mod.epoch_batches

    def signalling(cfg_, split, name, epoch):
        for i, batch in enumerate(real(cfg_, split, name, epoch)):
            if rank == 0 and signal_at == (epoch, i):
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    train_mod.epoch_batches = signalling
    cfg = TrainConfig.from_dict(dict(PREEMPT_CONFIG, parallel=parallel))
    with gloo_group(rank, world, init_file):
        try:
            run = train_mod.train(cfg, out_dir, resume=resume, progress=False)
            result = {"history": run["history"]}
        except train_mod.Preempted as stopped:
            result = {"stopped": [stopped.epoch, stopped.step, stopped.signum]}
        finally:
            train_mod.epoch_batches = real
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)


def _preempt_run(tmp_path, name, parallel, signal_at=None, resume=False):
    import json

    out = tmp_path / name
    out.mkdir(exist_ok=True)
    init = tmp_path / f"{name}-{'resume' if resume else 'start'}.init"
    args = (2, str(init), str(out), parallel, signal_at, resume)
    tmp.spawn(_preempt_worker, args=args, nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step_and_resumes_bitwise(
    tmp_path, parallel
):
    """SIGTERM reaches rank 0 alone, inside the 4th step of epoch 2: both ranks finish that
    step, checkpoint the position (each rank's running sums), and say where they stopped;
    a resumed run's history equals an uninterrupted one's, bit for bit."""
    import signal

    full = _preempt_run(tmp_path, "full", parallel)
    stopped = _preempt_run(tmp_path, "part", parallel, signal_at=(1, 3))
    assert [r["stopped"] for r in stopped] == [[2, 4, signal.SIGTERM]] * 2
    resumed = _preempt_run(tmp_path, "part", parallel, resume=True)
    assert resumed[0]["history"] == full[0]["history"]
    assert resumed[1]["history"] == full[1]["history"]
