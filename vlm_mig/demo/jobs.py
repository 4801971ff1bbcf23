"""The demo's training jobs, run in this process or side by side in fresh Python processes.

A job is a JSON-able dict (``kind``: ``sft``, ``rl`` or ``headroom``, its config file, its test sets, ...); its
result is JSON too (credit-viewer cards as plain dicts), so nothing is ever unpickled between processes. A child
runs ``child_main(JOB.json, RESULT.json)`` (what ``python -m vlm_mig.demo.jobs JOB.json RESULT.json`` does), with
its own progress line (tqdm reads ``TQDM_POSITION``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from vlm_mig import report as rep
from vlm_mig.demo.data import load, scene_objects
from vlm_mig.demo.measure import credit_examples, evaluate_sets, headroom_of, strip_private, weight_movement
from vlm_mig.timing import StageClock


def _trained(config_path: str, mode: str):
    """A Trainer built from the recipe and run to the end; the trained model stays in ``trainer.model``."""
    from vlm_mig.config import load_config
    from vlm_mig.trainer import Trainer

    trainer = Trainer(load_config(config_path), mode=mode, overwrite=True)  # each job's run folder is its own
    trainer.train()
    return trainer


def _sets(job: dict[str, Any]) -> tuple[dict[str, list], dict[str, dict[str, list[dict]]]]:
    """The job's test sets (``job["sets"]``: name -> data.jsonl) and each item's scene objects (the real
    scene, also for a blank-image twin: what a model says about it is checked against what was there)."""
    sets, objects = {}, {}
    for name, path in job["sets"].items():
        sets[name] = load(Path(path))
        objects[name] = scene_objects(Path(path), sets[name])
    return sets, objects


def run_headroom(job: dict[str, Any]) -> dict[str, Any]:
    """The headroom of a start (``job["config"]``: an RL recipe from it; nothing is trained): its samples on the
    ID set beside its greedy answers (``job["greedy"]``: the graded records of its evaluation), and the gradient
    signal-to-noise of one RL step."""
    from vlm_mig.config import load_config
    from vlm_mig.evaluation import SampleRecord
    from vlm_mig.rl.signal import gradient_signal
    from vlm_mig.trainer import Trainer

    sets, objects = _sets(job)
    trainer = Trainer(load_config(job["config"]), mode="rl")
    clock = StageClock()
    with clock("gradient signal"):
        signal = gradient_signal(trainer)
    with clock("samples"):
        greedy = [SampleRecord.from_json(json.loads(line)) for line in Path(job["greedy"]).read_text().splitlines()]
        r = trainer.cfg.rollout
        table = headroom_of(trainer.model, trainer.processor, trainer.template, sets["id"], objects["id"],
                            trainer.train_data, samples_k=job["samples_k"], temperature=r.temperature, top_p=r.top_p,
                            max_new_tokens=r.max_new_tokens, batch_size=job["eval_batch"], greedy=greedy)
    return {"headroom": {**table, "signal": signal}, "times": clock.times, "viewer": {}}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (SFT or RL), evaluate on the job's sets, and score the completions the credit viewer shows; or
    measure a start's headroom (kind ``headroom``)."""
    import torch
    from transformers.utils import logging as hf_logging

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    hf_logging.disable_progress_bar()
    if job["kind"] == "headroom":
        return run_headroom(job)
    sets, objects = _sets(job)
    clock = StageClock()
    with clock("train"):
        trainer = _trained(job["config"], job["kind"])
    with clock("eval"):
        ev = evaluate_sets(trainer.model, trainer.processor, trainer.template, job["label"], sets, objects,
                           job["max_new_tokens"], job["eval_batch"], Path(job["out"]))
    weights = weight_movement(trainer.model, Path(job["start"])) if job.get("start") else None
    viewer: dict[str, list[rep.CreditExample]] = {}
    if job["viewer_examples"]:
        with clock("steps.html scoring"):
            _score_viewer(job, trainer, sets, ev, viewer)
    return {"ev": strip_private(ev), "viewer": viewer, "times": clock.times, "weights": weights}


def _score_viewer(job: dict[str, Any], trainer, sets: dict[str, list], ev: dict[str, Any],
                  viewer: dict[str, list[rep.CreditExample]]) -> None:
    """The credit-viewer cards of the job's first completions per set (and, with ``score_gold``, of gold
    solutions scored by this model), into ``viewer``."""
    n = job["viewer_examples"]
    for name, samples in sets.items():
        records = ev[name]["_records"][:n]
        viewer[f"{job['label']} {name}"] = credit_examples(
            trainer.model, trainer.processor, trainer.template, samples[:n], [r.completion for r in records],
            [_title(job["who"], s) for s in samples[:n]], records)
    if job.get("score_gold"):
        from vlm_mig.prompts import format_solution

        gold = [s for s in sets["id"][: max(1, n // 2)] if s.gold_steps]
        viewer["gold"] = credit_examples(
            trainer.model, trainer.processor, trainer.template, gold,
            [format_solution(s.gold_steps, s.answer) for s in gold],
            [f"gold solution · {s.id} ({s.meta.get('num_objects', '?')} objects), scored by {job['who']}"
             for s in gold])


def _title(who: str, s) -> str:
    return f"{who} · {s.id} ({s.meta.get('num_objects', '?')} objects, {s.meta.get('question_type', '')})"


def _to_json(res: dict[str, Any]) -> str:
    viewer = {k: [{**dataclasses.asdict(e), "image": None if e.image is None else str(e.image)} for e in v]
              for k, v in res.get("viewer", {}).items()}
    return json.dumps({**res, "viewer": viewer})


def _from_json(res: dict[str, Any]) -> dict[str, Any]:
    res["viewer"] = {k: [rep.CreditExample(**e) for e in v] for k, v in res.get("viewer", {}).items()}
    return res


def child_main(job_path: str, result_path: str) -> int:
    """One job in its own process; the result (or the traceback) goes to ``result_path``."""
    import traceback

    try:
        text, code = '{"ok": ' + _to_json(run_job(json.loads(Path(job_path).read_text()))) + "}", 0
    except BaseException:  # reported by the parent, with this traceback
        text, code = json.dumps({"error": traceback.format_exc()}), 1
    Path(result_path).write_text(text)
    return code


def run_jobs(jobs: list[dict[str, Any]], parallel: bool) -> list[dict[str, Any]]:
    """Run the jobs here one after the other, or side by side, each in a fresh Python process with its own
    progress line. Ctrl-C or SIGTERM stops the processes this call started."""
    if not parallel or len(jobs) == 1:
        return [_from_json(json.loads(_to_json(run_job(j)))) for j in jobs]
    procs, paths = [], []
    saved_term = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum, frame):  # SIGTERM to this process: stop the jobs it started too (below)
            raise SystemExit(128 + signum)

        saved_term = signal.signal(signal.SIGTERM, on_term)
    try:
        for pos, job in enumerate(jobs):
            base = Path(job["run"] + ".job")
            base.parent.mkdir(parents=True, exist_ok=True)
            job_path, result_path = base.with_suffix(".json"), base.with_suffix(".result.json")
            job_path.write_text(json.dumps(job))
            result_path.unlink(missing_ok=True)
            env = {**os.environ, "TQDM_POSITION": str(pos), "PYTHONUNBUFFERED": "1"}
            procs.append(subprocess.Popen([sys.executable, "-m", "vlm_mig.demo.jobs", str(job_path), str(result_path)],
                                          env=env))
            paths.append((job_path, result_path))
        for proc in procs:
            proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM or a failed start: stop what this call started, re-raise
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    finally:
        if saved_term is not None:
            signal.signal(signal.SIGTERM, saved_term)
    sys.stderr.write("\n" * len(procs))  # below the children's progress lines
    out = []
    for job, proc, (job_path, result_path) in zip(jobs, procs, paths):
        if not result_path.is_file():
            raise RuntimeError(f"{job['label']}: its process exited with code {proc.returncode} and left no result "
                               "(killed for memory?)")
        res = json.loads(result_path.read_text())
        result_path.unlink()
        job_path.unlink()
        if "error" in res:
            raise RuntimeError(f"{job['label']} failed:\n{res['error']}")
        out.append(_from_json(res["ok"]))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vlm_mig.demo.jobs JOB.json RESULT.json")
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
