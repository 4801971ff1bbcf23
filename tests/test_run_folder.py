"""A run folder holds one run: checkpoints are complete only with their marker (written last, removed first),
a kill during cleanup leaves nothing that counts as a checkpoint, a new run over an old one needs --overwrite,
and --resume without a checkpoint starts over with clean logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from vlm_mig import checkpoint as ckpt
from vlm_mig.cli import main


class _Model:
    """What save_checkpoint needs of a model: a save_pretrained that writes a few files."""

    def save_pretrained(self, folder, **_):
        Path(folder, "model.safetensors").write_bytes(b"0" * 64)
        Path(folder, "config.json").write_text("{}")


def _save(out: Path, step: int, limit: int | None = None) -> Path:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    return ckpt.save_checkpoint(out, step, _Model(), None, opt, None, {"step": step}, save_total_limit=limit)


def test_completeness_is_the_marker_written_last(tmp_path):
    first = _save(tmp_path, 1)
    assert ckpt.is_complete(first) and (first / ckpt.COMPLETE_FILE).read_text() == "1\n"
    # A folder with a trainer state but no marker (an interrupted save or deletion) is not a checkpoint.
    half = tmp_path / "checkpoint-5"
    half.mkdir()
    (half / ckpt.STATE_FILE).write_text("{}")
    assert ckpt.list_checkpoints(tmp_path) == [first] and ckpt.latest_checkpoint(tmp_path) == first
    # Saving with a limit drops the checkpoints beyond it and every older incomplete folder.
    (tmp_path / "checkpoint-0.deleting").mkdir()
    newest = _save(tmp_path, 6, limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    assert ckpt.list_checkpoints(tmp_path) == [newest]
    ckpt.remove_checkpoint(newest)
    assert not newest.exists() and not newest.with_name("checkpoint-6.deleting").exists()


_KILL_DURING_CLEANUP = """
import os, signal, shutil, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
import vlm_mig.checkpoint as ckpt
from test_run_folder import _save

out = Path({out!r})
_save(out, 1)
_save(out, 2)
real = shutil.rmtree

def killed(path, *a, **k):  # the cleanup dies half way through removing the old checkpoint
    if not Path(path).exists():
        return real(path, *a, **k)
    files = sorted(Path(path).rglob("*"))
    files[0].unlink()
    os.kill(os.getpid(), signal.SIGKILL)

ckpt.shutil.rmtree = killed
_save(out, 3, limit=1)
"""


def test_a_kill_during_cleanup_leaves_no_half_deleted_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = _KILL_DURING_CLEANUP.format(tests=str(Path(__file__).parent), out=str(out))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]  # SIGKILL, in the middle of removing checkpoint-1
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-3" in names and any(n.startswith("checkpoint-1") for n in names)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert not any(ckpt.is_complete(out / n) for n in names if n.startswith("checkpoint-1"))
    _save(out, 4, limit=1)  # the next save finishes the job
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]


_KILL_DURING_SAVE = """
import os, signal, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
import vlm_mig.checkpoint as ckpt
from test_run_folder import _save

out = Path({out!r})
_save(out, 1)

def killed(*a, **k):  # the save dies after the model files, while writing the optimizer state
    os.kill(os.getpid(), signal.SIGKILL)

ckpt.torch.save = killed
_save(out, 2, limit=1)
"""


def test_a_kill_during_save_leaves_the_previous_checkpoint_newest(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE.format(tests=str(Path(__file__).parent),
                                                                        out=str(out))], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2.tmp"]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    _save(out, 2, limit=1)  # the step is saved again: the stale .tmp is replaced, the old one dropped
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


def _sft(tiny_vl_dir, out: Path, *extra: str) -> int:
    return main(["sft", f"model.name_or_path={tiny_vl_dir}", f"trainer.output_dir={out}", "trainer.max_steps=2",
                 "trainer.sft_batch_size=2", "trainer.micro_batch_size=2", "data.synthetic_n=8",
                 "data.validation=null", "trainer.eval_steps=0", "trainer.progress=false", "trainer.report_to=[]",
                 "trainer.threads=1", "trainer.log_steps=1", "trainer.save_steps=2", *extra])


def _steps(out: Path, name: str = "metrics.jsonl") -> list[int]:
    return [json.loads(line)["step"] for line in (out / name).read_text().splitlines()]


def test_a_new_run_over_an_old_one_needs_resume_or_overwrite(tiny_vl_dir, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert _sft(tiny_vl_dir, out) == 0 and _steps(out) == [1, 2]
    capsys.readouterr()
    assert _sft(tiny_vl_dir, out) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint-2, metrics.jsonl" in err and "--overwrite" in err
    assert _steps(out) == [1, 2] and ckpt.latest_checkpoint(out).name == "checkpoint-2"  # untouched
    assert _sft(tiny_vl_dir, out, "--overwrite") == 0
    assert _steps(out) == [1, 2] and _steps(out, "prompts_rank0.jsonl") == [1, 2]
    # A run killed before its first checkpoint, restarted with --resume: it says so and starts over cleanly.
    ckpt.remove_checkpoint(out / "checkpoint-2")
    with open(out / "prompts_rank0.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "ids": ["x"]}) + "\n")
    with caplog.at_level("WARNING"):
        assert _sft(tiny_vl_dir, out, "--resume") == 0
    assert "no complete checkpoint" in caplog.text and "starting from step 0" in caplog.text
    assert _steps(out) == [1, 2] and _steps(out, "prompts_rank0.jsonl") == [1, 2]
    capsys.readouterr()
    assert main(["sft", f"model.name_or_path={tiny_vl_dir}", f"trainer.output_dir={out}", "--resume-from",
                 str(tmp_path / "nowhere")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
