"""The benchmark scripts' CPU paths run (their numbers are reported by the scripts, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

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


def test_sft_variants_quick_builds_the_variant_and_runs_the_demo_recipe(tmp_path):
    out = tmp_path / "variant.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sft_variants.py"), "--quick", "--name", "w05",
                          "--whole-image-weight", "0.5", "--sft-steps", "6", "--seed", "1", "--out",
                          str(tmp_path / "run"), "--json", str(out)],
                         capture_output=True, text=True, env={**os.environ, "VLM_MIG_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    model = Path(data["model"])
    assert model == tmp_path / "run" / "models" / "vision20-whole0.5"  # a variant, not the cached default
    assert json.loads((model / "vlm_mig_tiny.json").read_text())["vision_warmup"]["config"]["whole_image_weight"] == 0.5
    ran = yaml.safe_load((tmp_path / "run" / "w05" / "sft.yaml").read_text())
    assert (ran["trainer"]["max_steps"], ran["trainer"]["seed"], ran["model"]["name_or_path"]) == (6, 1, str(model))
    assert 0 <= data["id"]["accuracy"] <= 1 and data["blind_prior"]["id"] is not None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
