"""The scripts in examples/ run as a user would run them (a few seconds each)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process and subprocess runs

ROOT = Path(__file__).resolve().parents[1]


def run(script, *need):
    for mod in need:
        pytest.importorskip(mod, reason="pip install -e '.[integrations]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_timm_style_vit_example():
    out = run("timm_style_vit.py")
    assert "cls_token" in out and "pos_embed" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["cls_token"][2:4] == ["input", "override"]
    assert "pert_rms" in out and "step 2: loss" in out


def test_hf_gpt2_example():
    out = run("hf_gpt2_samtrainer.py", "transformers", "accelerate")
    assert "trained 4 SAM steps; skipped 0" in out
    assert "verify: μP" in out  # prepare made the stock GPT-2 μP
    assert "transformer.h.0.attn.c_attn.weight  128x384  hidden  layer   128     384" in out


def test_hf_llama_example():
    out = run("hf_llama_sam.py", "transformers")
    assert "stock + set_base_shapes: " in out and "problems" in out.split("prepare:")[0]
    assert "prepare: μP" in out and "weight multipliers: {'output': 1.0}" in out
    assert "step 2: loss" in out


def test_lightning_example():
    out = run("lightning_sam.py", "lightning")
    assert "Automatic: 5 steps" in out and "Manual: 5 steps" in out


def test_coordcheck_cli_on_a_user_model(tmp_path):
    from mupp.lab.cli import main

    sys.path.insert(0, str(ROOT))
    try:
        js = tmp_path / "cc.json"
        argv = ["coordcheck", "--model", "examples.timm_style_vit:make", "--widths", "32,64"]
        assert main(argv + ["--steps", "1", "--seeds", "1", "--json", str(js)]) == 0
    finally:
        sys.path.remove(str(ROOT))
    import json

    res = json.loads(js.read_text())
    assert res["config"]["model"] == "examples.timm_style_vit:make"
    assert "head" in res["layers"] and res["widths"] == [32, 64]
    assert main(["coordcheck", "--model", "nosuchpkg:make", "--widths", "32,64"]) == 2
