"""The benchmark scripts' CPU paths run (their numbers are reported by the scripts, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_tiny_runs_the_same_code_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--tiny", "--json", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"rollout_tokens_per_s", "packed_s", "naive_s", "max_abs_delta_l", "train_step_s"} <= data.keys()
    assert data["max_abs_delta_l"] < 1e-4  # fp32 on CPU: packed equals naive
    assert data["rescore_max_abs_delta_l"] < 1e-4 and data["rescore_max_abs_delta_logp"] < 1e-4  # sampled rows too
    assert data["backend"] == "hf" and data["weight_syncs"] == 2  # one sync per train step
    assert "train step" in res.stdout.splitlines()[-1]


def test_tiny_learnability_quick_reports_the_controls(tmp_path):
    out = tmp_path / "learn.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "tiny_learnability.py"), "--quick", "--out",
                          str(tmp_path / "run"), "--eval-every", "20", "--json", str(out)],
                         capture_output=True, text=True, env={**os.environ, "VLM_MIG_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"sft", "sft-blank"}
    assert data["validation_curves"]["sft"][0] == [20, 40]  # validated every 20 of the 40 quick SFT steps
    assert "over the blind prior" in res.stdout and "| blind prior" in res.stdout
