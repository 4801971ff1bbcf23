"""configs/accelerate/*.yaml through accelerate's own readers; the DeepSpeed ones through DeepSpeedPlugin, and one
real single-process ZeRO optimizer step on the CPU.

The DeepSpeed cases skip (with the reason) where deepspeed is not installed; `make install` installs it
(`DS_BUILD_OPS=0`: pure Python, no CUDA ops compiled).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ACCELERATE_DIR = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
FILES = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
ZERO = {"zero2": 2, "zero3": 3}

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed, as `make install` does)",
)

#: deepspeed_config keys of an accelerate file that are DeepSpeedPlugin arguments (the rest are launcher
#: settings such as deepspeed_multinode_launcher).
PLUGIN_KEYS = ("zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device",
               "offload_param_device", "zero3_init_flag", "zero3_save_16bit_model")


@pytest.fixture(autouse=True)
def _no_accelerate_env(monkeypatch):
    """DeepSpeedPlugin falls back to ACCELERATE_* variables: start from none."""
    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)


def _cluster(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ACCELERATE_DIR / f"{name}.yaml"))


def _plugin_from_file(name: str):
    from accelerate.utils import DeepSpeedPlugin

    cluster = _cluster(name)
    plugin = DeepSpeedPlugin(**{k: v for k, v in cluster.deepspeed_config.items() if k in PLUGIN_KEYS})
    plugin.set_mixed_precision(cluster.mixed_precision)  # what Accelerator does with the file's precision
    return plugin


def test_the_three_files_exist():
    assert sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml")) == sorted(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_accelerate_reads_each_file(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    cluster = _cluster(name)  # what `accelerate launch --config_file` reads; unknown keys would raise
    assert isinstance(cluster, ClusterConfig)
    assert cluster == ClusterConfig.from_yaml_file(str(ACCELERATE_DIR / f"{name}.yaml"))
    assert cluster.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert cluster.distributed_type == DistributedType(FILES[name])
    assert (cluster.num_processes, cluster.num_machines, cluster.mixed_precision) == (8, 1, "bf16")
    assert cluster.use_cpu is False
    if name == "ddp":
        assert cluster.deepspeed_config == {}
    else:
        ds = cluster.deepspeed_config
        assert ds["zero_stage"] == ZERO[name]
        assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (1, 1.0)
        assert (ds["offload_optimizer_device"], ds["offload_param_device"]) == ("none", "none")
        assert ds["zero3_init_flag"] is (name == "zero3")
        assert ds.get("zero3_save_16bit_model", False) is (name == "zero3")


@needs_deepspeed
@pytest.mark.parametrize("name", sorted(ZERO))
def test_deepspeed_plugin_from_each_file(name):
    plugin = _plugin_from_file(name)
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == ZERO[name] and ds["zero_optimization"]["stage"] == ZERO[name]
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert plugin.zero3_init_flag is (name == "zero3")
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (name == "zero3")


@needs_deepspeed
@pytest.mark.parametrize("name", sorted(ZERO))
def test_accelerate_launch_exports_the_same_settings(name, monkeypatch):
    """The environment `accelerate launch --config_file FILE` gives its workers builds the same plugin."""
    try:
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.utils.launch import prepare_deepspeed_cmd_env
    except ImportError as e:  # private helpers of accelerate's launcher
        pytest.skip(f"this accelerate version moved its launcher helpers: {e}")
    from accelerate.utils import DeepSpeedPlugin

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_DIR / f"{name}.yaml"), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed and args.num_processes == 8 and args.mixed_precision == "bf16"
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    args.main_process_port = 0  # a free port: the launcher checks that its port is unused
    _, env = prepare_deepspeed_cmd_env(args)
    exported = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    assert exported["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert exported["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(ZERO[name])
    for key, value in exported.items():
        monkeypatch.setenv(key, value)
    from_env = DeepSpeedPlugin()  # what each worker's Accelerator builds
    from_env.set_mixed_precision(exported["ACCELERATE_MIXED_PRECISION"])
    assert from_env.deepspeed_config == _plugin_from_file(name).deepspeed_config
    assert from_env.zero3_init_flag is (name == "zero3")


# One real optimizer step, single process, CPU. DeepSpeed runs ZeRO on its CPU accelerator over gloo; the
# script runs in its own interpreter so that torch.distributed, DeepSpeed and accelerate state stay out of
# the rest of the test session.
STEP_SCRIPT = r"""
import importlib, json, sys
import torch
torch.set_num_threads(1)
# DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (a C++ build of ~70 s on 2 cores, cached
# after). One process never all-reduces with a peer, so leave it out: DeepSpeed then uses plain gloo.
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin

path, keys = sys.argv[1], sys.argv[2].split(",")
cluster = load_config_from_file(path)
plugin = DeepSpeedPlugin(**{k: v for k, v in cluster.deepspeed_config.items() if k in keys})
acc = Accelerator(deepspeed_plugin=plugin, mixed_precision=cluster.mixed_precision)
# No dataloader goes through prepare(), so DeepSpeed's micro-batch size must be given.
acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
# SGD with lr 1: the update equals the clipped gradient, so its norm shows the clipping.
engine, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
x = torch.randn(2, 4) * 100
loss = engine(x.to(engine.module.weight.dtype)).float().pow(2).mean()
acc.backward(loss)  # under DeepSpeed: backward, clipping and the optimizer step
grad_norm = float(acc.clip_grad_norm_(engine.parameters(), 1.0))  # the engine's pre-clipping global norm
opt.step()
opt.zero_grad()
after = torch.cat([p.detach().flatten().float() for p in acc.unwrap_model(engine).parameters()])
print(json.dumps({
    "engine": type(engine).__name__, "world": acc.num_processes, "stage": engine.zero_optimization_stage(),
    "bf16": engine.bfloat16_enabled(), "clipping": engine.gradient_clipping(), "steps": engine.global_steps,
    "grad_norm": grad_norm, "update_norm": float((after - before.float()).norm()),
}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_deepspeed
@pytest.mark.parametrize("name", sorted(ZERO))
def test_one_real_zero_step_on_cpu(name):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    # A single process still joins a torch.distributed group: tell it where (what torchrun would set).
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(ACCELERATE_DIR / f"{name}.yaml"),
                          ",".join(PLUGIN_KEYS)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["engine"] == "DeepSpeedEngine" and out["world"] == 1
    assert out["stage"] == ZERO[name] and out["bf16"] is True and out["clipping"] == 1.0
    assert out["steps"] == 1
    # the raw gradient is large (inputs x100); the step applied it clipped to norm 1 (bf16 rounding aside)
    assert out["grad_norm"] > 100
    assert out["update_norm"] == pytest.approx(1.0, rel=2e-2)
