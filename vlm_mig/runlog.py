"""A run's logs: metrics.jsonl, TensorBoard (wandb when asked) and sample completions, main process only."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from vlm_mig.config import Config
from vlm_mig.rl.batch import RLBatch

logger = logging.getLogger(__name__)


class RunLog:
    """metrics.jsonl + TensorBoard (+ wandb when installed and asked) + sample completions, main process only."""

    def __init__(self, out: Path, cfg: Config, enabled: bool = True):
        self.enabled = enabled
        self.out = out
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if "tensorboard" in cfg.trainer.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in cfg.trainer.report_to:
            try:
                import wandb

                self.wandb = wandb.init(project="vlm-mig", config=cfg.to_dict(), dir=str(out))
            except ImportError:
                logger.warning("report_to has wandb but wandb is not installed (pip install 'vlm-mig[wandb]')")

    def truncate_after(self, step: int, rank_files: str) -> None:
        names = [rank_files] + (["metrics.jsonl", "samples.jsonl"] if self.enabled else [])
        for name in names:
            path = self.out / name
            if not path.is_file():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
            path.write_text("".join(x + "\n" for x in keep))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def samples(self, step: int, batch: RLBatch, limit: int = 4) -> None:
        """The first ``limit`` completions of a batch with their steps, rewards, l_k and gains."""
        if not self.enabled:
            return
        r = batch.rollouts
        with open(self.out / "samples.jsonl", "a") as f:
            for i in range(min(limit, len(r.texts))):
                s, sp = r.sample_of(i), batch.spans[i]
                rec = {"step": step, "id": s.id, "question": s.question, "answer": s.answer,
                       "completion": r.texts[i], "steps": sp.texts, "reward": batch.rewards.total[i],
                       "process_reward": float(batch.r_proc[i])}
                if batch.l is not None and sp.think is not None:
                    rec["l"] = [round(float(x), 5) for x in batch.l[i, : sp.K + 1]]
                    rec["gains"] = [round(float(x), 5) for x in batch.gains[i, : sp.K]]
                    rec["watermark"] = [round(float(x), 5) for x in batch.watermark[i, : sp.K + 1]]
                    if batch.l0_blind[i] is not None:
                        rec["visual_evidence_gain"] = round(float(batch.l[i, 0]) - batch.l0_blind[i], 5)
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
