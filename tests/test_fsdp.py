"""SAM under FSDP2 (``fully_shard``, parameters as DTensors sharded on dim 0), 2 processes on
CPU with gloo: the perturbation is built from whole-tensor norms, applied to the local shards,
restored exactly, and 2 processes equal 1 process on the concatenated batch.  ``mupp train``
with ``parallel="fsdp"`` checkpoints through torch.distributed.checkpoint and resumes
bit-identically on the same ranks, and on another number of ranks."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
import torch.nn.functional as F
from builders import gloo_group, mlp, prepared_mlp, step_data, tiny_llama

import mupp
from mupp.distributed import sam_passes

pytestmark = pytest.mark.slow  # multi-process and subprocess runs

fsdp = pytest.importorskip("torch.distributed.fsdp")
STEPS = 3
# (rule, variant, parameterization, set_base_shapes after sharding)
CASES = [
    ("LP", "sam", "mupp", False),
    ("DP", "sam", "mupp", False),
    ("LP", "last-layer", "mup-global", False),
    ("LP", "asam-layer", "mupp", False),
    ("LP", "sam", "mupp", True),
]


data = step_data


def make_sam(model, rule, variant, parameterization):
    return mupp.SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=0.05,
        rho=0.1,
        rule=rule,
        variant=variant,
        parameterization=parameterization,
        momentum=0.9,
        model=model,
    )


def _one_case(rank, rule, variant, parameterization, shapes_after):
    torch.manual_seed(0)
    model = prepared_mlp(32, 8) if not shapes_after else mlp(32)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    if shapes_after:  # roles and fans from the global shapes of the DTensors
        mupp.set_base_shapes(model, mlp(8), delta=mlp(16))
    opt = make_sam(model, rule, variant, parameterization)
    for step in range(STEPS):
        x, y = data(step, rank)
        sam_passes(model, opt, lambda x=x, y=y: F.cross_entropy(model(x), y))
    # a non-finite gradient on one rank only: every rank skips the step
    x, y = data(STEPS, rank)
    if rank == 1:
        x[0, 0] = float("inf")
    sam_passes(model, opt, lambda x=x, y=y: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="not available under FSDP2"):
        sam_passes(model, opt, lambda x=x, y=y: F.cross_entropy(model(x), y), "local")
    # SAM's own communication: one all-reduce of the squared norms in first_step, one of the
    # finiteness flag in second_step (FSDP2's all-gathers and reduce-scatters aside)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        F.cross_entropy(model(x * 0), y).backward()
        opt.first_step(zero_grad=True)
        n_first = len(calls)
        F.cross_entropy(model(x * 0), y).backward()
        opt.second_step(zero_grad=True)
    finally:
        dist.all_reduce = real
    return {
        "all_reduces": (n_first, len(calls) - n_first),
        "params": [p.full_tensor().detach() for p in model.parameters()],
        "skipped": opt.skipped_steps,
        "roles": [r["role"] for r in mupp.describe(model)],
    }


def _worker(rank, world, init_file, out_file):
    with gloo_group(rank, world, init_file):
        results = [_one_case(rank, *case) for case in CASES]
        if rank == 0:
            torch.save(results, out_file)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    tmp.spawn(_worker, args=(2, str(d / "init"), str(d / "out.pt")), nprocs=2)
    return torch.load(d / "out.pt")


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_fsdp2_equals_one_process_on_the_concatenated_batch(fsdp_results, case):
    rule, variant, parameterization, _ = CASES[case]
    got = fsdp_results[case]
    torch.manual_seed(0)
    model = prepared_mlp(32, 8)
    opt = make_sam(model, rule, variant, parameterization)
    for step in range(STEPS):
        x, y = data(step)
        sam_passes(model, opt, lambda x=x, y=y: F.cross_entropy(model(x), y))
    assert (
        got["skipped"] == 2
    )  # + the step in the communication count, whose x*0 is nan  # both ranks skipped the step with the non-finite gradient
    assert got["roles"] == ["input", "hidden", "output"]
    assert got["all_reduces"] == (1, 1)
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def torchrun(nproc, out, *extra, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "mupp", "train", "--dataset", "synthetic"]
    cmd += ["--width", "64", "--base-width", "32", "--epochs", "2", "--momentum", "0.9"]
    cmd += ["--set", "train_subset=256", "--set", "test_subset=128", "--set", 'parallel="fsdp"']
    cmd += ["--out", str(out), "--no-progress", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """An uninterrupted 2-epoch FSDP2 run's history, and a run stopped after epoch 1 (its
    sharded checkpoint in ``part/checkpoint``)."""
    d = tmp_path_factory.mktemp("sharded")
    torchrun(2, d / "full")
    torchrun(2, d / "part", "--stop-after-epochs", "1")
    return json.loads((d / "full" / "result.json").read_text())["history"], d / "part"


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(
        b ^ 0xFF for b in data[len(data) // 2 :][:64]
    )
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped": lambda ckpt: _flip(sorted(ckpt.glob("*.distcp"))[0]),
    "truncated": lambda ckpt: sorted(ckpt.glob("*.distcp"))[1].write_bytes(b"\0" * 10),
    "deleted": lambda ckpt: sorted(ckpt.glob("*.distcp"))[0].unlink(),
    "random-metadata": lambda ckpt: (ckpt / ".metadata").write_bytes(os.urandom(512)),
    "malformed-manifest": lambda ckpt: (ckpt / "mupp.json").write_text("{not json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_sharded_checkpoint_is_refused_in_one_line(sharded_runs, tmp_path, damage):
    """Every file of a sharded checkpoint has its digest in the manifest: a changed,
    truncated or missing shard, a replaced .metadata and a malformed manifest each stop
    --resume on every rank with the same one line (exit 2), and nothing is trained."""
    _, part = sharded_runs
    run = tmp_path / "run"
    shutil.copytree(part, run)
    manifest = json.loads((run / "checkpoint" / "mupp.json").read_text())
    files = sorted(f.name for f in (run / "checkpoint").iterdir() if f.name != "mupp.json")
    assert sorted(manifest["files"]) == files  # every shard and the .metadata
    record = (run / "result.json").read_text()
    DAMAGE[damage](run / "checkpoint")
    proc = torchrun(2, run, "--resume", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "mupp: error:" in line]
    assert (
        len(errors) == 2
        and errors[0].split("mupp: error:")[1] == errors[1].split("mupp: error:")[1]
    )
    what = "not a mupp checkpoint manifest" if damage == "malformed-manifest" else "is corrupt"
    assert what in errors[0] and "--restart" in errors[0], errors[0]
    assert "exitcode: 2" in proc.stderr or "exitcode  : 2" in proc.stderr
    assert (run / "result.json").read_text() == record  # nothing trained


def test_a_crash_between_the_renames_resumes_from_the_last_good_copy(sharded_runs, tmp_path):
    """Killed after the old checkpoint was moved aside and before the new one took its
    place: --resume finds checkpoint.old/, puts it back and resumes bit-identically."""
    want, part = sharded_runs
    run = tmp_path / "run"
    shutil.copytree(part, run)
    os.replace(run / "checkpoint", run / "checkpoint.old")
    torchrun(2, run, "--resume")
    assert json.loads((run / "result.json").read_text())["history"] == want
    assert not (run / "checkpoint.old").exists()


def test_mupp_train_fsdp_sharded_checkpoints_resume(sharded_runs, tmp_path):
    want, stopped = sharded_runs
    ckpt = stopped / "checkpoint"
    assert (ckpt / ".metadata").is_file() and (ckpt / "mupp.json").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    part, other = tmp_path / "part", tmp_path / "other"
    shutil.copytree(stopped, part)
    shutil.copytree(stopped, other)
    out = torchrun(2, part, "--resume")
    assert out.count("best test acc") == 1  # rank 0 reports
    assert json.loads((part / "result.json").read_text())["history"] == want  # bit-identical
    torchrun(1, other, "--resume")  # the 2-rank checkpoint, resharded onto 1 rank
    got = json.loads((other / "result.json").read_text())["history"]
    assert got[0] == want[0] and len(got) == 2
    assert got[1]["train_loss"] == pytest.approx(want[1]["train_loss"], rel=1e-4)


# --------------------------------------------------------------------------------------------
# a Hugging Face model made μP by prepare, sharded with mupp.distributed.shard_model
# --------------------------------------------------------------------------------------------


def _hf_model(tie):
    from mupp.integrations.huggingface import prepare

    def llama(w):
        return tiny_llama(w, vocab=32, heads=2, kv_heads=1, tie=tie, positions=16)

    torch.manual_seed(0)
    model = llama(32)
    with torch.device("meta"):
        base, delta = llama(8), llama(16)
    return prepare(model, base, delta, zero_init=False)


def _hf_batch(step, rank=None):
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(step))
    return ids if rank is None else ids[rank * 2 : (rank + 1) * 2]


def _hf_sam(model):
    return mupp.SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.1, rule="DP", model=model)


def _hf_sharded_run(rank, tie):
    """The full parameters after STEPS SAM steps of the sharded model on ``rank``'s half."""
    from mupp.distributed import shard_model

    model = shard_model(_hf_model(tie))
    opt = _hf_sam(model)
    for step in range(STEPS):
        ids = _hf_batch(step, rank)
        sam_passes(model, opt, lambda ids=ids: model(input_ids=ids, labels=ids).loss)
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _hf_worker(rank, world, init_file, out_file, tie):
    with gloo_group(rank, world, init_file):
        full = _hf_sharded_run(rank, tie)  # the sharded model is gone before the group
        if rank == 0:
            torch.save(full, out_file)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fsdp2_on_a_prepared_hf_model_equals_one_process(tmp_path, tie):
    pytest.importorskip("transformers")
    tmp.spawn(_hf_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt"), tie), nprocs=2)
    got = torch.load(tmp_path / "out.pt")
    model = _hf_model(tie)
    opt = _hf_sam(model)
    for step in range(STEPS):
        ids = _hf_batch(step)
        sam_passes(model, opt, lambda ids=ids: model(input_ids=ids, labels=ids).loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-5)
