"""The benchmark scripts' CPU paths run (their numbers are reported by the scripts, never asserted here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _clevr_config(tmp_path: Path, tiny_vl_dir) -> tuple[Path, Path]:
    """A small CLEVR-like set with scenes and an RL config on the tiny VLM (what the RL benches take)."""
    from vlm_mig.data.clevr import write_clevr

    write_clevr(tmp_path / "data", 8, seed=3, question_mix="multistep", list_objects=False)
    cfg = tmp_path / "rl.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_vl_dir)}, "data": {"train": str(tmp_path / "data" / "data.jsonl"),
                                                              "format": "jsonl", "validation": None},
        "rollout": {"num_generations": 2, "max_new_tokens": 12}, "loss": {"kl_coef": 0.0},
        "trainer": {"prompts_per_step": 2, "micro_batch_size": 4, "report_to": [], "progress": False},
        "eval": {"batch_size": 8}}))
    return cfg, tmp_path / "data" / "data.jsonl"


def test_rl_headroom_reports_samples_errors_and_gradient_signal(tmp_path, tiny_vl_dir):
    cfg, data = _clevr_config(tmp_path, tiny_vl_dir)
    out = tmp_path / "headroom.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "rl_headroom.py"), "--config", str(cfg), "--test",
                          str(data), "--samples", "2", "--limit", "4", "--json", str(out)],
                         capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    h = data["headroom"]
    assert h["n"] == 4 and h["samples"] == 2 and set(h["pass_at_k"]) == {"1", "2"}
    assert sum(h["error_kinds"].values()) == pytest.approx(100 - h["greedy"], abs=0.1)
    assert set(data["signal"]) == {"outcome", "process", "configured"} and data["signal"]["outcome"]["groups"] == 8
    assert "| pass@2 (T = 1) |" in res.stdout and "cosine, two halves" in res.stdout


def test_mig_credit_compares_the_process_reward_variants(tmp_path, tiny_vl_dir):
    cfg, _ = _clevr_config(tmp_path, tiny_vl_dir)
    out = tmp_path / "credit.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "mig_credit.py"), "--config", str(cfg), "--prompts",
                          "4", "--batch", "2", "--json", str(out)],
                         capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["rollouts"] == 8 and set(data["variants"]) == {"mean/all", "mean/kept", "margin/all", "margin/kept",
                                                                "mean/raw"}
    assert data["variants"]["mean/kept"]["noise"]["groups"] == 4
    assert "| mean/kept |" in res.stdout


# TRL is the bench extra: looked for, never imported here (only the bench script's subprocess imports it).
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra (trl)")
def test_step_cost_runs_every_part_on_cpu(tmp_path, tiny_vl_dir):
    grpo, _ = _clevr_config(tmp_path, tiny_vl_dir)
    mig = tmp_path / "mig.yaml"
    mig.write_text(grpo.read_text())
    recipe = yaml.safe_load(grpo.read_text())
    recipe["loss"].update(alpha=0.0, gamma=0.0)
    grpo.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cost.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "step_cost.py"), "--config-grpo", str(grpo),
                          "--config-mig", str(mig), "--pairs", "1", "--warmup", "0", "--G", "2", "--new-tokens", "4",
                          "--json", str(out)],
                         capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp_path), "VLM_MIG_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["p2"]["mig_over_grpo"]["pairs"] == 1 and data["p2"]["lr"] == 0
    assert data["p2"]["phases"]["mig"]["score"] > 0 and data["p2"]["same_completion_lengths_every_pair"]
    assert data["p3"]["same_prompts_every_pair"] and data["p3"]["ours_over_trl"]["pairs"] == 1
    assert data["p3"]["prompt_tokens"]["trl"] == sorted(set(data["p3"]["prompt_tokens"]["ours"]))
    assert data["gen"]["engine_seeded_over_bare"]["ratio_median"] > 0
    calls = data["upd"]["decoder_calls"]  # [rows, tokens], with gradient, seconds: one call per micro-batch or two
    assert data["upd"]["mig_over_grpo"]["pairs"] == 1 and all(grad for _, grad, _ in calls["mig_one_call"])
    assert "| P3 our GRPO step / TRL GRPOTrainer step |" in res.stdout
