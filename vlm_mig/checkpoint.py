"""Checkpoints: a standard Hugging Face model folder (safetensors) plus the trainer state needed to resume
exactly (optimizer, scheduler, RNG states of every process, data position, step).

Written atomically: everything goes to ``checkpoint-N.tmp``, a completion marker is written last, and the folder
is renamed to ``checkpoint-N``, so a run killed while saving leaves the previous checkpoint as the newest complete
one. Deleted the other way round (marker first, then renamed aside, then removed), so a run killed while cleaning
up never leaves a half-deleted folder that counts as a checkpoint. Optimizer and scheduler
states are plain tensor/number dicts saved with ``torch.save`` and loaded with ``weights_only=True``;
RNG states are safetensors and JSON; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
#: Written last into a checkpoint (just before the folder is renamed into place) and removed first when it is
#: deleted: a folder without it is not a checkpoint, whatever else it holds.
COMPLETE_FILE = "checkpoint_complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
#: What a run writes into its output folder besides its data cache: logs and checkpoints (complete or not).
_RUN_FILES = re.compile(r"^(metrics\.jsonl|samples\.jsonl|prompts_rank\d+\.jsonl|tensorboard|"
                        r"checkpoint-\d+(\.tmp|\.deleting)?)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder`` is a complete checkpoint: its completion marker and trainer state are there."""
    folder = Path(folder)
    return (folder / COMPLETE_FILE).is_file() and (folder / STATE_FILE).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``is_complete``), oldest first. A folder whose save or deletion was interrupted is
    not one."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a checkpoint so that no interruption leaves something that looks complete: the marker goes first,
    then the folder is renamed out of the way (atomic), then removed."""
    folder = Path(folder)
    (folder / COMPLETE_FILE).unlink(missing_ok=True)
    gone = folder.with_name(folder.name + ".deleting")
    shutil.rmtree(gone, ignore_errors=True)
    if folder.exists():
        os.replace(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


def run_files(output_dir: str | Path) -> list[str]:
    """The logs and checkpoints (complete or not) a run left in ``output_dir``, by name; empty log files do not
    count. Empty when no run has written there."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if _RUN_FILES.match(p.name) and (p.is_dir() or p.stat().st_size > 0))


def clear_run(output_dir: str | Path) -> None:
    """Remove what a run left in ``output_dir`` (``run_files``; its data cache stays): checkpoints the way
    ``remove_checkpoint`` does, logs as files."""
    root = Path(output_dir)
    for name in run_files(root):
        p = root / name
        if _CKPT.match(name):
            remove_checkpoint(p)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch, CUDA) and JSON-able (python, numpy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_rng(folder: Path, rank: int) -> None:
    tensors, plain = rng_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"rng_{rank}.safetensors"))
    (folder / f"rng_{rank}.json").write_text(json.dumps(plain))


def load_rng(folder: Path, rank: int) -> None:
    tensors = load_file(str(folder / f"rng_{rank}.safetensors"))
    set_rng_state(tensors, json.loads((folder / f"rng_{rank}.json").read_text()))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: Any,
    processor: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    config: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Single-process save (the trainer calls the pieces itself under several processes)."""
    tmp = begin_checkpoint(output_dir, step)
    write_model(tmp, model, processor)
    write_trainer_state(tmp, optimizer, scheduler, state, config)
    save_rng(tmp, 0)
    return finish_checkpoint(output_dir, step, save_total_limit)


def begin_checkpoint(output_dir: str | Path, step: int) -> Path:
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_model(folder: Path, model: Any, processor: Any) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(folder)


def write_trainer_state(folder: Path, optimizer, scheduler, state: dict[str, Any],
                        config: dict[str, Any] | None = None) -> None:
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    # Last: its presence marks the folder complete.
    write_state_only(folder, state, config)


def write_state_only(folder: Path, state: dict[str, Any], config: dict[str, Any] | None = None) -> None:
    """The trainer state without optimizer/scheduler files (DeepSpeed writes its own)."""
    if config is not None:
        (folder / "run_config.json").write_text(json.dumps(config, indent=2))
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def finish_checkpoint(output_dir: str | Path, step: int, save_total_limit: int | None = None) -> Path:
    """Mark the finished temporary folder complete and rename it into place, then drop checkpoints beyond the
    limit, and any older checkpoint folder left incomplete by an interrupted save or deletion."""
    root = Path(output_dir)
    tmp = root / f"checkpoint-{step}.tmp"
    final = checkpoint_dir(output_dir, step)
    (tmp / COMPLETE_FILE).write_text(f"{step}\n")  # last write: the folder holds everything now
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    if save_total_limit:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            remove_checkpoint(old)
        for p in list(root.iterdir()):
            m = _CKPT.match(p.name)
            if p.name.endswith(".deleting"):
                shutil.rmtree(p, ignore_errors=True)
            elif m and int(m.group(1)) < step and not is_complete(p):
                remove_checkpoint(p)
    return final


def load_trainer_state(folder: str | Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer and scheduler from ``folder``; return the saved state dict (step, data position...)."""
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: not a complete checkpoint (its save or deletion was interrupted)")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
    if scheduler is not None and (folder / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())
