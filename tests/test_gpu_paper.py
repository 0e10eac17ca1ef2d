"""benchmarks/gpu_paper.sh, the one call prepared for a lent GPU, runs end to end on the CPU at
a tiny size (--tiny) and leaves every part's output under $OUT."""

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process and subprocess runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_paper_script_runs_every_part_at_a_tiny_size(tmp_path):
    pytest.importorskip("pytorch_optimizer", reason="pip install -e '.[dev]'")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_paper.sh"), "--tiny"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = dict(line.split() for line in (out / "status.txt").read_text().splitlines())
    assert status == {k: "0" for k in
                      ("sam_step", "sweep_throughput", "tf32_check", "sweep", "transfer", "plot")}  # fmt: skip
    assert json.loads((out / "device.json").read_text())["torch"]
    step = json.loads((out / "sam_step.json").read_text())
    assert {"ratio_mupp_over_sgd", "ratio_last_layer_over_sgd", "ratio_mupp_over_peer"} <= set(step)
    thru = json.loads((out / "sweep_throughput.json").read_text())
    assert thru["device"] == "cpu" and thru["widths"]["32"]["max_best_acc_diff"] < 0.01
    tf32 = json.loads((out / "tf32_check.json").read_text())
    assert tf32["max_best_acc_diff"] == 0.0  # on a CPU both runs are fp32
    db = out / "mlp-cifar10-paper" / "sweep.db"
    with sqlite3.connect(db) as con:
        (done,) = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()
    assert done == 8  # 2 widths x 2 settings x 2 rho x 1 seed
    assert (out / "mlp-cifar10-paper" / "transfer.json").exists()
    assert (out / "mlp-cifar10-paper" / "sweep_gain.png").exists()


def test_gpu_paper_script_refuses_unknown_arguments(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_paper.sh"), "--huge"],
        capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2 and "usage: OUT=DIR" in proc.stderr
