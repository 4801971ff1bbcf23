"""The trainer under DeepSpeed ZeRO-2 / ZeRO-3 (single process, CPU, fp32) equals the plain trainer, and a
ZeRO-3 run resumes from its own checkpoint. Skipped where deepspeed is not installed."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")

# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~70 s of C++) that one process never uses.
RUN = ("import importlib, sys; importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None; "
       "from vlm_mig.cli import main; sys.exit(main(sys.argv[1:]))")


def _overrides(model_dir, out, steps):
    return [f"model.name_or_path={model_dir}", f"trainer.output_dir={out}", f"trainer.max_steps={steps}",
            "trainer.eval_steps=0", "data.synthetic_n=16", "data.validation=null", "rollout.num_generations=4",
            "rollout.max_new_tokens=16", "trainer.prompts_per_step=2", "trainer.micro_batch_size=3",
            "trainer.progress=false", "trainer.threads=1", "optim.lr=1e-3", "trainer.save_steps=1",
            "trainer.report_to=[]", "loss.kl_coef=0.04"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(zero: str, *args: str, script: Path) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{zero}.yaml"), "--num_processes", "1", "--mixed_precision", "no",
           "--main_process_port", _port(), str(script), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds") / "run.py"
    path.write_text(RUN.replace("; ", "\n"))
    return path


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((x[k] - y[k]).abs().max()) for k in x if k in y)


@pytest.fixture(scope="module")
def plain_run(tiny_vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    subprocess.run([sys.executable, "-m", "vlm_mig.cli", "train", *_overrides(tiny_vl_dir, out, 3)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def test_zero2_equals_the_plain_trainer(tiny_vl_dir, tmp_path, plain_run, script):
    _launch("zero2", "train", *_overrides(tiny_vl_dir, tmp_path, 2), script=script)
    assert (tmp_path / "checkpoint-2" / "deepspeed").is_dir()
    assert _max_diff(plain_run / "checkpoint-2", tmp_path / "checkpoint-2") < 1e-5


def test_zero3_with_reference_model_resumes_and_equals_the_plain_trainer(tiny_vl_dir, tmp_path, plain_run, script):
    _launch("zero3", "train", *_overrides(tiny_vl_dir, tmp_path, 2), script=script)
    _launch("zero3", "train", "--resume", *_overrides(tiny_vl_dir, tmp_path, 3), script=script)
    assert (tmp_path / "checkpoint-3" / "deepspeed").is_dir()
    assert _max_diff(plain_run / "checkpoint-3", tmp_path / "checkpoint-3") < 1e-4
