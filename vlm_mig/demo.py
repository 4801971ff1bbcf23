"""``vlm-mig demo``: the whole method, for real, on 2 CPU cores with no downloads.

1. the embedded tiny Qwen2-VL (built once into the cache, then reused);
2. CLEVR-like counting data: a training set and an in-distribution (ID) test set under CLEVR-CoGenT
   condition A with 1-6 objects, and a zero-shot out-of-distribution (OOD) test set under condition B
   (cube/cylinder colours swapped) with 5-8 objects (7 and 8 never occur in training);
3. one SFT warm start on the gold step-by-step solutions (shared by every seed: all RL runs start from the
   same checkpoint, so the seeds measure the spread of RL, not of SFT);
4. RL from that checkpoint twice per seed, with identical seeds, data order and budget: GRPO
   (``loss.alpha=0 loss.gamma=0``) and MIG (SPEC defaults alpha 1, beta 1, gamma 0.1, trajectory credit);
   ``loss.kl_coef=0`` for both (no reference model on the CPU). With 2 or more cores the two runs of a seed
   go side by side, one process each (every training process uses one torch thread, so the numbers do not
   depend on the machine's cores or load);
5. greedy evaluation of SFT, GRPO and MIG on the ID and OOD test sets, next to a blind prior (the most
   common training answer per question type: what a model that ignores the image can reach), and where
   the process reward goes on the test completions;
6. ``report.md``, ``curves.png``, ``steps.html`` (per-step credit viewer), ``results.json``, and the run
   folders (``runs/``), with the exact config of every run in ``configs/`` (each reruns by hand with
   ``vlm-mig sft|train --config``).

``--quick`` runs the same pipeline at toy sizes (a smoke test: its numbers mean nothing). ``--seeds N``
repeats step 4 with trainer seeds 0..N-1 and reports mean ± std.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlm_mig import report as rep

TRAIN_OBJECTS = (1, 6)
OOD_OBJECTS = (5, 8)
TRAIN_SEED, ID_SEED, OOD_SEED = 1, 1001, 2001
METHODS = ("grpo", "mig")
#: The loss switches that make the two methods (everything else in their configs is identical).
METHOD_LOSS = {"grpo": {"alpha": 0.0, "gamma": 0.0}, "mig": {"alpha": 1.0, "gamma": 0.1}}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run."""

    name: str
    train_scenes: int  #: training scenes (condition A, 1-6 objects; one question each)
    test_scenes: int  #: scenes in each of the ID and OOD test sets
    val_scenes: int  #: in-loop validation: the first N scenes of the ID test set
    sft_steps: int
    sft_batch: int
    sft_lr: float
    rl_steps: int
    prompts_per_step: int
    generations: int  #: G
    max_new_tokens: int  #: rollouts and evaluation
    rl_lr: float
    eval_every: int  #: in-loop validation every N RL steps
    sample_log_steps: int  #: training rollouts (with l_k) logged every N steps
    smooth_window: int  #: trailing window of the training-curve smoothing
    viewer_examples: int  #: completions per section of steps.html
    eval_batch: int = 50
    warmup_steps: int = 1500  #: vision warm-up steps of the tiny model (built once, cached)


DEFAULT = DemoPlan(
    name="default", train_scenes=3000, test_scenes=200, val_scenes=100,
    sft_steps=400, sft_batch=16, sft_lr=2e-3,
    rl_steps=80, prompts_per_step=4, generations=8, max_new_tokens=112, rl_lr=1e-4,
    eval_every=20, sample_log_steps=10, smooth_window=10, viewer_examples=4,
)
QUICK = DemoPlan(
    name="quick", train_scenes=160, test_scenes=24, val_scenes=8,
    sft_steps=40, sft_batch=8, sft_lr=2e-3,
    rl_steps=4, prompts_per_step=2, generations=4, max_new_tokens=48, rl_lr=1e-4,
    eval_every=2, sample_log_steps=1, smooth_window=2, viewer_examples=2, eval_batch=24, warmup_steps=20,
)


# --------------------------------------------------------------------------------------------------
# Small helpers


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


class _Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,) * 3
    return {"cpu": cpu, "cores": usable, "load_average_1min": load[0], "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------------------------------
# Data


def _write_set(root: Path, name: str, n: int, condition: str, seed: int, objects: tuple[int, int]) -> Path:
    """``root/<name>-<condition>-n<n>-seed<seed>-obj<lo>-<hi>/data.jsonl``, written once (reused when
    present), with a progress bar that follows the images as they are written."""
    from tqdm.auto import tqdm

    from vlm_mig.data.synthetic import write_clevr

    folder = root / f"{name}-{condition}-n{n}-seed{seed}-obj{objects[0]}-{objects[1]}"
    if (folder / "data.jsonl").is_file():
        _say(f"  reusing {folder}")
        return folder / "data.jsonl"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    error: list[BaseException] = []

    def work() -> None:
        try:
            write_clevr(tmp, n=n, condition=condition, seed=seed, num_objects=objects)
        except BaseException as e:  # re-raised below, in the caller's thread
            error.append(e)

    th = threading.Thread(target=work, daemon=True)
    desc = f"data {name} ({condition}, {objects[0]}-{objects[1]} objects)"
    with tqdm(total=n, desc=desc, unit="scene", file=sys.stderr, dynamic_ncols=True) as bar:
        th.start()
        while th.is_alive():
            th.join(0.3)
            images = tmp / "images"
            done = sum(1 for _ in images.iterdir()) if images.is_dir() else 0
            bar.update(max(0, min(n, done) - bar.n))
        bar.update(n - bar.n)
    if error:
        raise error[0]
    tmp.replace(folder)
    return folder / "data.jsonl"


def blind_baseline(train: list, sets: dict[str, list]) -> dict[str, Any]:
    """Accuracy of answering without the image: the most common training answer for each question type
    (count all / count by attribute / compare). A model at this level answers from the question alone."""
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in train:
        by_type[s.meta.get("question_type", "?")][s.answer] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    out: dict[str, Any] = {"answer_by_question_type": guess}
    for name, samples in sets.items():
        hits = [guess.get(s.meta.get("question_type", "?")) == s.answer for s in samples]
        out[name] = {"accuracy": sum(hits) / len(hits) if hits else None}
    return out


def _load(path: Path):
    from vlm_mig.data.loaders import load_jsonl

    return list(load_jsonl(path, "count"))


# --------------------------------------------------------------------------------------------------
# Configs: each phase is a plain recipe, written to out/configs/ before it runs


def _common(plan: DemoPlan, train: Path, threads: int | None, report_to: list[str]) -> dict[str, Any]:
    return {
        "model": {"dtype": "float32", "freeze_patch_embed": True},
        "data": {"train": str(train), "format": "jsonl", "task": "count"},
        "rollout": {"num_generations": plan.generations, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": plan.max_new_tokens},
        "optim": {"weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant_with_warmup", "max_grad_norm": 1.0},
        "trainer": {"threads": threads, "report_to": report_to, "progress": True, "save_total_limit": 1},
        "eval": {"max_new_tokens": plan.max_new_tokens, "batch_size": plan.eval_batch},
    }


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def sft_recipe(plan: DemoPlan, train: Path, out_dir: Path, threads: int | None, report_to: list[str]) -> dict:
    return _merge(_common(plan, train, threads, report_to), {
        "model": {"name_or_path": "tiny", "tiny_arch": "qwen2-vl", "tiny_warmup_steps": plan.warmup_steps},
        "data": {"validation": None},
        "optim": {"lr": plan.sft_lr},
        "trainer": {"output_dir": str(out_dir), "seed": 0, "max_steps": plan.sft_steps,
                    "sft_batch_size": plan.sft_batch, "micro_batch_size": plan.sft_batch,
                    "save_steps": plan.sft_steps, "eval_steps": 0, "log_steps": 10},
    })


def rl_recipe(plan: DemoPlan, method: str, seed: int, start: Path, train: Path, val: Path, out_dir: Path,
              threads: int | None, report_to: list[str]) -> dict:
    return _merge(_common(plan, train, threads, report_to), {
        "model": {"name_or_path": str(start)},
        "data": {"validation": str(val)},
        "mig": {"probe": "</think>\n<answer>", "min_step_chars": 8, "max_steps": 16},
        "advantage": {"scale": "group", "eps": 1e-4, "process_credit": "trajectory"},
        "loss": {**METHOD_LOSS[method], "beta": 1.0, "kl_coef": 0.0, "eps_clip": 0.2, "normalizer": "grpo"},
        "optim": {"lr": plan.rl_lr},
        "trainer": {"output_dir": str(out_dir), "seed": seed, "max_steps": plan.rl_steps,
                    "prompts_per_step": plan.prompts_per_step, "micro_batch_size": 16, "num_iterations": 1,
                    "save_steps": plan.rl_steps, "eval_steps": plan.eval_every, "log_steps": 1,
                    "sample_log_steps": plan.sample_log_steps},
        "eval": {"limit": plan.val_scenes},
    })


def _write_recipe(recipe: dict, path: Path, header: str):
    from vlm_mig.config import load_config

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# " + header.replace("\n", "\n# ") + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return load_config(path)


# --------------------------------------------------------------------------------------------------
# Evaluation and the credit viewer's rows


def _evaluate(model, processor, template, label: str, sets: dict[str, list], plan: DemoPlan, out: Path) -> dict:
    """Greedy accuracy on each test set; every graded completion goes to ``out/eval/<label>/<set>.jsonl``."""
    from vlm_mig.evaluation import evaluate

    result: dict[str, Any] = {}
    folder = out / "eval" / label
    folder.mkdir(parents=True, exist_ok=True)
    for name, samples in sets.items():
        res = evaluate(model, processor, samples, max_new_tokens=plan.max_new_tokens, batch_size=plan.eval_batch,
                       template=template, progress=True, name=f"eval {label} {name}")
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in res.records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        by_objects: dict[str, list[bool]] = {}
        by_type: dict[str, list[bool]] = {}
        for s, r in zip(samples, res.records):
            by_objects.setdefault(str(s.meta.get("num_objects", "?")), []).append(r.correct)
            by_type.setdefault(str(s.meta.get("question_type", "?")), []).append(r.correct)
        answers = collections.Counter(str(r.extracted) for r in res.records)
        result[name] = {
            "n": res.n, "accuracy": res.accuracy, "format_rate": res.format_rate, "mean_length": res.mean_length,
            "distinct_completions": len({r.completion for r in res.records}),
            "answer_counts": dict(answers.most_common()),
            "accuracy_by_objects": {k: sum(v) / len(v) for k, v in sorted(by_objects.items(), key=lambda x: x[0])},
            "accuracy_by_question_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        }
        result[name]["_records"] = res.records
    return result


def _score_for_viewer(model, processor, samples: list, records: list, n: int, who: str) -> list[rep.CreditExample]:
    """The first ``n`` items of a test set, their completions by this model scored by this model (l_k under
    the policy that wrote them, as in training)."""
    from vlm_mig.score import score_samples

    picked = []
    for s, r in zip(samples[:n], records[:n]):
        picked.append((dataclasses.replace(s, meta={**s.meta, "completion": r.completion}), r))
    if not picked:
        return []
    rows = score_samples(model, processor, [p for p, _ in picked], progress=False)
    out = []
    for (s, r), row in zip(picked, rows):
        out.append(rep.CreditExample(
            title=f"{who} · {s.id} ({s.meta.get('num_objects', '?')} objects, {s.meta.get('question_type', '')})",
            question=s.question or "", gold=s.answer, completion=r.completion, steps=row["steps"], l=row["l"],
            watermark=row["watermark"], gains=row["gains"], predicted=r.extracted, correct=r.correct,
            image=s.images[0] if s.images else None))
    return out


#: l_0 above this (p(answer) > 0.9 before any step) leaves no room for a step to earn a gain.
NEAR_CERTAIN = -0.105


def credit_diagnostics(rows: list[dict[str, Any]], records: list, samples: list) -> dict[str, Any]:
    """Where the process reward goes on a set of scored completions (``score_samples`` rows, the graded
    records and the samples, aligned): R_proc of correct vs wrong answers, the share of all gain earned by
    the last step, and how often l_0 (no reasoning yet) is already near-certain."""
    import statistics

    def mean(xs):
        xs = list(xs)
        return statistics.fmean(xs) if xs else None

    with_steps = [(row, r, s) for row, r, s in zip(rows, records, samples) if row["gains"]]
    total_gain = sum(sum(row["gains"]) for row, _, _ in with_steps)
    last_gain = sum(row["gains"][-1] for row, _, _ in with_steps)
    ones = [row for row, _, s in with_steps if s.answer == "1"]
    return {
        "n": len(rows), "with_steps": len(with_steps),
        "mean_K": mean(len(row["gains"]) for row, _, _ in with_steps),
        "r_proc_correct": mean(row["process_reward"] for row, r, _ in with_steps if r.correct),
        "r_proc_wrong": mean(row["process_reward"] for row, r, _ in with_steps if not r.correct),
        "zero_r_proc_rate": mean(float(row["process_reward"] <= 0) for row, _, _ in with_steps),
        "last_step_gain_share": last_gain / total_gain if total_gain > 0 else None,
        "l0_near_certain_rate": mean(float(row["l"][0] > NEAR_CERTAIN) for row, _, _ in with_steps),
        "gold_1_share": len(ones) / len(with_steps) if with_steps else None,
        "l0_near_certain_rate_gold_1": mean(float(row["l"][0] > NEAR_CERTAIN) for row in ones),
        "l0_near_certain_rate_gold_other": mean(float(row["l"][0] > NEAR_CERTAIN) for row, _, s in with_steps
                                                if s.answer != "1"),
    }


def _diagnose(model, processor, samples: list, records: list) -> dict[str, Any]:
    from vlm_mig.score import score_samples

    picked = [dataclasses.replace(s, meta={**s.meta, "completion": r.completion}) for s, r in zip(samples, records)]
    rows = score_samples(model, processor, picked, progress=False)
    return credit_diagnostics(rows, records, samples)


def _score_gold(model, processor, samples: list, n: int, who: str) -> list[rep.CreditExample]:
    from vlm_mig.prompts import format_solution
    from vlm_mig.score import score_samples

    picked = [dataclasses.replace(s, meta={**s.meta, "completion": format_solution(s.gold_steps, s.answer)})
              for s in samples[:n] if s.gold_steps]
    if not picked:
        return []
    rows = score_samples(model, processor, picked, progress=False)
    return [rep.CreditExample(
        title=f"gold solution · {s.id} ({s.meta.get('num_objects', '?')} objects), scored by {who}",
        question=s.question or "", gold=s.answer, completion=s.meta["completion"], steps=row["steps"], l=row["l"],
        watermark=row["watermark"], gains=row["gains"], image=s.images[0] if s.images else None)
        for s, row in zip(picked, rows)]


def _training_examples(run_dir: Path, n: int, images: dict[str, str]) -> tuple[list[rep.CreditExample], str]:
    """Rollouts logged by the MIG run (``samples.jsonl``: steps, l_k, gains at sampling time), from its first
    and its last logged step."""
    rows = [r for r in rep.read_jsonl(run_dir / "samples.jsonl") if r.get("l")]
    if not rows:
        return [], ""
    steps = sorted({r["step"] for r in rows})
    chosen = [r for r in rows if r["step"] == steps[0]][:n]
    if len(steps) > 1:
        chosen += [r for r in rows if r["step"] == steps[-1]][:n]
    out = []
    for r in chosen:
        out.append(rep.CreditExample(
            title=f"training rollout · step {r['step']} · {r['id']} · reward {r['reward']:.0f}",
            question=r["question"], gold=r["answer"], completion=r["completion"], steps=r["steps"], l=r["l"],
            gains=r.get("gains", []), image=images.get(r["id"])))
    return out, f"steps {steps[0]} and {steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"


# --------------------------------------------------------------------------------------------------
# The pipeline


def run_demo(out: str | Path = "out/demo", quick: bool = False, seeds: int = 1, plan: DemoPlan | None = None,
             threads: int | None = None, parallel: bool | None = None) -> dict[str, Any]:
    """Run the demo; returns what ``results.json`` holds.

    ``parallel`` (default: with 2 or more cores, except ``quick``): the GRPO and MIG runs of a seed run side
    by side in two processes (for a model this small, generation is latency-bound and gains little from a
    second thread, so two 1-thread runs take about as long as one 2-thread run).
    ``threads``: torch threads of the SFT run and of each RL run (default 1: the results then do not depend
    on the machine's core count or load).
    """
    import torch

    from vlm_mig.config import load_config
    from vlm_mig.trainer import resolve_model_path

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    plan = plan or (QUICK if quick else DEFAULT)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("runs", "eval", "configs"):  # everything but the (seeded, cached) data is recomputed
        shutil.rmtree(out / stale, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the terminal to the demo's own bars
    report_to = [] if quick else ["tensorboard"]
    command = f"vlm-mig demo --out {out}" + (" --quick" if quick else "") + (f" --seeds {seeds}" if seeds != 1 else "")
    timer = _Timer()
    per_run: dict[str, float] = {}  # times inside a side-by-side phase (they overlap, so not part of the total)
    cores = _machine()["cores"] or 1
    if parallel is None:  # --quick: starting two fresh processes (~10 s of imports) costs more than it saves
        parallel = cores >= 2 and not quick
    # One torch thread per training process by default, whatever the machine: the thread count changes the
    # floating-point reduction order, and this SFT start is sensitive to it (with 2 threads instead of 1 the
    # same 400 steps gave a start that answers every "how many items" question with 6 instead of 3: 28% ID /
    # 27% OOD instead of 35% / 12.5%), so the numbers must not depend on the cores or the load. A second
    # thread also buys little here (SFT 0.42 s/step against 0.64 on an idle 2-core machine) and costs a lot
    # when another process holds a core (1.16 s/step); the RL runs use the cores by running side by side.
    sft_threads = threads or 1
    rl_threads = threads or 1
    threads = sft_threads
    torch.set_num_threads(threads)
    machine_at_start = _machine()
    t_start = time.perf_counter()
    n_phases = 4 + seeds
    phase = iter(range(1, n_phases + 1))

    # 1. model
    _say(f"== [{next(phase)}/{n_phases}] the embedded tiny Qwen2-VL (built once into the cache)")
    model_path = timer.run("model", resolve_model_path, load_config(None, [
        "model.name_or_path=tiny", f"model.tiny_warmup_steps={plan.warmup_steps}"]))
    _say(f"  {model_path}")

    # 2. data
    _say(f"== [{next(phase)}/{n_phases}] CLEVR-like counting data")
    data_root = out / "data"

    def make_data():
        return (_write_set(data_root, "train", plan.train_scenes, "A", TRAIN_SEED, TRAIN_OBJECTS),
                _write_set(data_root, "test-id", plan.test_scenes, "A", ID_SEED, TRAIN_OBJECTS),
                _write_set(data_root, "test-ood", plan.test_scenes, "B", OOD_SEED, OOD_OBJECTS))

    train_path, id_path, ood_path = timer.run("data", make_data)
    test_sets = {"id": _load(id_path), "ood": _load(ood_path)}
    blind = blind_baseline(_load(train_path), test_sets)

    # 3. SFT warm start
    _say(f"== [{next(phase)}/{n_phases}] SFT warm start: {plan.sft_steps} steps of {plan.sft_batch} gold solutions")
    sft_dir = out / "runs" / "sft"
    cfg = _write_recipe(sft_recipe(plan, train_path, sft_dir, threads, report_to), out / "configs" / "sft.yaml",
                        f"SFT warm start of vlm-mig demo ({plan.name}); rerun: vlm-mig sft --config <this file>")
    with _bar_label("sft"):
        trainer = timer.run("sft train", _trained, cfg, "sft")
    sft_ckpt = sft_dir / f"checkpoint-{plan.sft_steps}"
    results: dict[str, Any] = {"sft": {}, "grpo": [], "mig": []}
    viewer: dict[str, list[rep.CreditExample]] = {}
    sft_eval = timer.run("sft eval", _evaluate, trainer.model, trainer.processor, trainer.template, "sft",
                         test_sets, plan, out)
    viewer["sft id"] = timer.run("steps.html scoring", _score_for_viewer, trainer.model, trainer.processor,
                                 test_sets["id"], sft_eval["id"]["_records"], plan.viewer_examples, "SFT")
    results["sft"] = _strip(sft_eval)
    results["sft"]["credit"] = timer.run("credit diagnostics", _diagnose, trainer.model, trainer.processor,
                                         test_sets["id"], sft_eval["id"]["_records"])
    del trainer
    gc.collect()

    # 4. RL: GRPO and MIG from the same checkpoint, per seed (the pair of a seed side by side when parallel)
    runs: dict[str, list[Path]] = {m: [] for m in METHODS}
    for seed in range(seeds):
        jobs = []
        for method in METHODS:
            run_dir = out / "runs" / f"{method}-seed{seed}"
            recipe = rl_recipe(plan, method, seed, sft_ckpt, train_path, id_path, run_dir, rl_threads, report_to)
            cfg_path = out / "configs" / f"{method}-seed{seed}.yaml"
            _write_recipe(recipe, cfg_path, f"{method.upper()} run of vlm-mig demo ({plan.name}), seed {seed}; "
                          "rerun: vlm-mig train --config <this file>")
            jobs.append({"method": method, "seed": seed, "config": str(cfg_path), "plan": dataclasses.asdict(plan),
                         "id": str(id_path), "ood": str(ood_path), "out": str(out), "threads": rl_threads,
                         "viewer": seed == 0, "run": str(run_dir)})
        how = (f"side by side, one process of {rl_threads} thread{'s' if rl_threads != 1 else ''} each"
               if parallel else "one after the other")
        _say(f"== [{next(phase)}/{n_phases}] seed {seed}: GRPO and MIG, {plan.rl_steps} RL steps each of "
             f"{plan.prompts_per_step} prompts x G = {plan.generations}, from {sft_ckpt} ({how})")
        t0 = time.perf_counter()
        done = _run_jobs(jobs, parallel)
        if parallel:
            timer.phases[f"seed {seed}: GRPO and MIG side by side"] = time.perf_counter() - t0
        for job, res in zip(jobs, done):
            method = job["method"]
            for k, v in res["times"].items():
                if k in ("steps.html scoring", "credit diagnostics") and not parallel:
                    timer.phases[k] = timer.phases.get(k, 0.0) + v
                else:
                    (per_run if parallel else timer.phases)[f"{method} seed {seed} {k}"] = v
            viewer.update(res["viewer"])
            results[method].append({"seed": seed, "run": job["run"], **res["ev"], "credit": res["diagnostics"]})
            runs[method].append(Path(job["run"]))

    # 5. report
    _say(f"== [{next(phase)}/{n_phases}] report")
    t0 = time.perf_counter()
    summary = _summarize(plan, runs, results)
    rep.plot_curves({m: [rep.read_jsonl(d / "metrics.jsonl") for d in runs[m]] for m in METHODS},
                    out / "curves.png", window=plan.smooth_window, reach=summary["reach"],
                    sft_val=summary["sft_val_accuracy"],
                    title=f"vlm-mig demo ({plan.name}): tiny Qwen2-VL, CLEVR-like counting, "
                          f"{seeds} seed{'s' if seeds > 1 else ''}, same SFT start")
    train_examples, when = _training_examples(runs["mig"][0], plan.viewer_examples, _train_images(train_path))
    _write_viewer(out / "steps.html", viewer, train_examples, when, plan)
    timer.phases["report"] = time.perf_counter() - t0
    timer.phases["total"] = time.perf_counter() - t_start
    full = {
        "command": command, "machine": machine_at_start,
        "load_average_1min_at_end": _machine()["load_average_1min"],
        "plan": dataclasses.asdict(plan), "seeds": list(range(seeds)),
        "data": {"train": str(train_path), "test_id": str(id_path), "test_ood": str(ood_path),
                 "train_objects": TRAIN_OBJECTS, "ood_objects": OOD_OBJECTS},
        "sft_checkpoint": str(sft_ckpt), "results": results, "blind_baseline": blind, "summary": summary,
        "wall_time_s": {k: round(v, 2) for k, v in timer.phases.items()},
        "parallel": parallel, "sft_threads": sft_threads, "rl_threads_per_run": rl_threads,
        "run_time_s": {k: round(v, 2) for k, v in per_run.items()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (out / "results.json").write_text(json.dumps(full, indent=1) + "\n")
    (out / "report.md").write_text(_report_md(full, plan))
    _say(f"demo finished in {rep.fmt_seconds(timer.phases['total'])}: {out / 'report.md'}, {out / 'curves.png'}, "
         f"{out / 'steps.html'}, {out / 'results.json'}")
    _say(_results_table(full))
    return full


def _rl_job(job: dict[str, Any]) -> dict[str, Any]:
    """One RL run (train, evaluate, and for seed 0 score the completions shown in steps.html); runs in this
    process or in a spawned child (``_run_jobs``)."""
    import torch
    from transformers.utils import logging as hf_logging

    from vlm_mig.config import load_config
    from vlm_mig.trainer import template_of

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    hf_logging.disable_progress_bar()
    plan = DemoPlan(**job["plan"])
    cfg = load_config(job["config"])
    method, seed, out = job["method"], job["seed"], Path(job["out"])
    test_sets = {"id": _load(Path(job["id"])), "ood": _load(Path(job["ood"]))}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    with _bar_label(f"{method} seed {seed}"):
        trainer = _trained(cfg, "rl")
    times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = _evaluate(trainer.model, trainer.processor, template_of(cfg), f"{method}-seed{seed}", test_sets, plan, out)
    times["eval"] = time.perf_counter() - t0
    viewer: dict[str, list[rep.CreditExample]] = {}
    if job["viewer"]:
        t0 = time.perf_counter()
        for name in ("id", "ood"):
            viewer[f"{method} {name}"] = _score_for_viewer(trainer.model, trainer.processor, test_sets[name],
                                                           ev[name]["_records"], plan.viewer_examples, method.upper())
        if method == "mig":
            viewer["gold"] = _score_gold(trainer.model, trainer.processor, test_sets["id"],
                                         max(1, plan.viewer_examples // 2), "the MIG policy")
        times["steps.html scoring"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    diagnostics = _diagnose(trainer.model, trainer.processor, test_sets["id"], ev["id"]["_records"])
    times["credit diagnostics"] = time.perf_counter() - t0
    return {"ev": _strip(ev), "viewer": viewer, "times": times, "diagnostics": diagnostics}


def _to_json(res: dict[str, Any]) -> str:
    """An RL job's result as JSON (credit examples as plain dicts): nothing is ever unpickled."""
    viewer = {k: [{**dataclasses.asdict(e), "image": None if e.image is None else str(e.image)} for e in v]
              for k, v in res.get("viewer", {}).items()}
    return json.dumps({**res, "viewer": viewer})


def _from_json(text: str) -> dict[str, Any]:
    res = json.loads(text)
    res["viewer"] = {k: [rep.CreditExample(**e) for e in v] for k, v in res.get("viewer", {}).items()}
    return res


def _child_main(job_path: str, result_path: str) -> int:
    """``python -m vlm_mig.demo --rl-job JOB.json RESULT.json``: one RL job in its own process."""
    import traceback

    try:
        text, code = '{"ok": ' + _to_json(_rl_job(json.loads(Path(job_path).read_text()))) + "}", 0
    except BaseException:  # reported by the parent, with this traceback
        text, code = json.dumps({"error": traceback.format_exc()}), 1
    Path(result_path).write_text(text)
    return code


def _run_jobs(jobs: list[dict[str, Any]], parallel: bool) -> list[dict[str, Any]]:
    """Run the jobs in this process one after the other, or side by side, each in a fresh Python process
    (``python -m vlm_mig.demo --rl-job``) with its own tqdm line (tqdm reads ``TQDM_POSITION`` at import)."""
    import subprocess

    if not parallel or len(jobs) == 1:
        return [_rl_job(j) for j in jobs]
    procs, paths = [], []
    saved_term = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum, frame):  # SIGTERM to this process: stop the runs it started too (below)
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
            procs.append(subprocess.Popen([sys.executable, "-m", "vlm_mig.demo", "--rl-job", str(job_path),
                                           str(result_path)], env=env))
            paths.append((job_path, result_path))
        for proc in procs:
            proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM or a failed start: stop the processes this call started, re-raise
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
            raise RuntimeError(f"{job['method']} seed {job['seed']}: its process exited with code {proc.returncode} "
                               "and left no result (killed for memory?)")
        res = json.loads(result_path.read_text())
        result_path.unlink()
        job_path.unlink()
        if "error" in res:
            raise RuntimeError(f"{job['method']} seed {job['seed']} failed:\n{res['error']}")
        out.append(_from_json(json.dumps(res["ok"])))
    return out


class _bar_label:
    """Name the trainer's progress bar (it is called ``rl``/``sft``) after the run, while in this block."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self):
        import tqdm.auto

        self.module, self.saved = tqdm.auto, tqdm.auto.tqdm
        label, base = self.label, self.saved

        class Labelled(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                if kwargs.get("desc") in ("rl", "sft"):
                    kwargs["desc"] = label
                super().__init__(*args, **kwargs)

        self.module.tqdm = Labelled
        return self

    def __exit__(self, *exc):
        self.module.tqdm = self.saved
        return False


def _trained(cfg, mode: str):
    """A Trainer built (model, data) and run to the end; the trained model stays in ``trainer.model``."""
    from vlm_mig.trainer import Trainer

    trainer = Trainer(cfg, mode=mode)
    trainer.train()
    return trainer


def _strip(ev: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in ev.items()}


def _train_images(train_path: Path) -> dict[str, str]:
    return {s.id: s.images[0] for s in _load(train_path) if s.images}


def _summarize(plan: DemoPlan, runs: dict[str, list[Path]], results: dict) -> dict[str, Any]:
    """Smoothed final training accuracy per method, and the step at which MIG's smoothed curve first reaches
    GRPO's final value (on the seed-mean curves, and per seed)."""
    w = plan.smooth_window
    curves = {m: [rep.series(rep.read_jsonl(d / "metrics.jsonl"), "reward/accuracy") for d in runs[m]]
              for m in METHODS}
    mean = {m: rep.mean_curve(curves[m]) for m in METHODS}
    sm = {m: rep.smooth(mean[m][1], w) for m in METHODS}
    target = sm["grpo"][-1] if sm["grpo"] else None
    reach = {"target": target, "window": w,
             "mig_step": None if target is None else rep.steps_to_reach(target, mean["mig"][0], sm["mig"], w),
             "grpo_step_to_mig_final": (None if not sm["mig"] else
                                        rep.steps_to_reach(sm["mig"][-1], mean["grpo"][0], sm["grpo"], w)),
             "mig_final": sm["mig"][-1] if sm["mig"] else None}
    per_seed = []
    for s, (g, m) in enumerate(zip(curves["grpo"], curves["mig"])):
        gs, ms = rep.smooth(g[1], w), rep.smooth(m[1], w)
        per_seed.append({"seed": s, "grpo_final": gs[-1] if gs else None, "mig_final": ms[-1] if ms else None,
                         "mig_step": rep.steps_to_reach(gs[-1], m[0], ms, w) if gs else None})
    reach["per_seed"] = per_seed
    val0 = [rep.series(rep.read_jsonl(d / "metrics.jsonl"), "val/accuracy") for d in runs["grpo"]]
    sft_val = val0[0][1][0] if val0 and val0[0][0] and val0[0][0][0] == 0 else None
    finals = {m: [rep.series(rep.read_jsonl(d / "metrics.jsonl"), "val/accuracy")[1][-1:] for d in runs[m]]
              for m in METHODS}
    return {"reach": reach, "sft_val_accuracy": sft_val,
            "final_val_accuracy": {m: [v[0] if v else None for v in finals[m]] for m in METHODS}}


def _results_table(full: dict) -> str:
    res = full["results"]
    rows = [["SFT (start)", rep.fmt_pct([res["sft"]["id"]["accuracy"]]), rep.fmt_pct([res["sft"]["ood"]["accuracy"]]),
             rep.fmt_pct([res["sft"]["id"]["format_rate"]]), rep.fmt_pct([res["sft"]["ood"]["format_rate"]])]]
    for m in METHODS:
        rs = res[m]
        rows.append([m.upper(), rep.fmt_pct([r["id"]["accuracy"] for r in rs]),
                     rep.fmt_pct([r["ood"]["accuracy"] for r in rs]), rep.fmt_pct([r["id"]["format_rate"] for r in rs]),
                     rep.fmt_pct([r["ood"]["format_rate"] for r in rs])])
    blind = full.get("blind_baseline")
    if blind:
        rows.append(["blind prior: no image, no model (most common training answer per question type)",
                     rep.fmt_pct([blind["id"]["accuracy"]]), rep.fmt_pct([blind["ood"]["accuracy"]]), "–", "–"])
    return rep.markdown_table(["model", "ID accuracy", "OOD accuracy", "ID format", "OOD format"], rows)


def _reach_text(full: dict) -> str:
    r = full["summary"]["reach"]
    if r["target"] is None:
        return "no training curves"
    step = r["mig_step"]
    s = (f"GRPO's final smoothed training accuracy is {100 * r['target']:.1f}%; MIG's smoothed curve "
         + (f"first reaches it at step **{step}** of {full['plan']['rl_steps']}" if step is not None
            else "**does not reach it** within the budget")
         + f" (MIG's own final: {100 * r['mig_final']:.1f}%).")
    g = r["grpo_step_to_mig_final"]
    s += (f" The other way round, GRPO first reaches MIG's final value at step {g}." if g is not None
          else " The other way round, GRPO never reaches MIG's final value.")
    if len(r["per_seed"]) > 1:
        s += " Per seed (MIG step to reach that seed's GRPO final): " + ", ".join(
            f"seed {p['seed']}: {p['mig_step'] if p['mig_step'] is not None else 'not reached'}" for p in r["per_seed"]
        ) + "."
    return s


def _report_md(full: dict, plan: DemoPlan) -> str:
    res, m, n_seeds = full["results"], full["machine"], len(full["seeds"])
    wt = full["wall_time_s"]
    lines = [f"# vlm-mig demo ({plan.name})", "",
             f"`{full['command']}` — finished {full['finished']}, {rep.fmt_seconds(wt['total'])} in all, on "
             f"{m['cpu']} ({m['cores']} cores, torch {m['torch']}"
             + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
             + f"; SFT with {full.get('sft_threads', m['torch_threads'])} torch thread(s), each RL run with "
             f"{full.get('rl_threads_per_run')}; 1-min load average "
             + (f"{m['load_average_1min']:.2f} at the start, {full['load_average_1min_at_end']:.2f} at the end"
                if m.get("load_average_1min") is not None else "unknown") + ").", ""]
    if plan.name == "quick":
        lines += ["**`--quick` is a smoke test of the pipeline at toy sizes: its numbers mean nothing.**", ""]
    ood = f"condition B, {OOD_OBJECTS[0]}-{OOD_OBJECTS[1]} objects"
    lines += [
        "## What ran", "",
        "1. The embedded tiny Qwen2-VL (1.3M parameters, random init, built offline; the random patch "
        "embedding stays frozen).",
        f"2. CLEVR-like counting scenes (112 px, one question each: count all / count by attribute / compare): "
        f"{plan.train_scenes} training scenes (CLEVR-CoGenT condition A, {TRAIN_OBJECTS[0]}-{TRAIN_OBJECTS[1]} "
        f"objects, seed {TRAIN_SEED}); an ID test set of {plan.test_scenes} new scenes drawn the same way (seed "
        f"{ID_SEED}); a zero-shot OOD test set of {plan.test_scenes} scenes under {ood} (seed {OOD_SEED}): "
        "cubes and cylinders take the colours they never had in training, and 7 or 8 objects never occur in "
        "training.",
        f"3. One SFT warm start on the gold step-by-step solutions: {plan.sft_steps} steps of {plan.sft_batch}, lr "
        f"{plan.sft_lr:g}. Every RL run starts from its final checkpoint (`{Path(full['sft_checkpoint']).name}`)"
        + (f"; the {n_seeds} seeds vary RL only (trainer seed: data order and rollout sampling), not SFT."
           if n_seeds > 1 else "."),
        f"4. RL from that checkpoint, twice per seed with identical seeds, data order and budget: **GRPO** "
        f"(`loss.alpha=0 loss.gamma=0`: outcome reward only) and **MIG** (SPEC defaults: alpha 1, beta 1, "
        f"gamma 0.1, trajectory process credit). {plan.rl_steps} steps of {plan.prompts_per_step} prompts x "
        f"G = {plan.generations} rollouts (temperature 1, at most {plan.max_new_tokens} new tokens), lr "
        f"{plan.rl_lr:g}, constant. `loss.kl_coef=0` for both (SPEC: 0.04): no reference model on the CPU. "
        f"Validation on the first {plan.val_scenes} ID test scenes every {plan.eval_every} steps.",
        "5. Greedy evaluation of the SFT start and of the final GRPO and MIG policies on both test sets "
        "(strict `<answer>` extraction, integer match).", "",
        "## Results", "",
        f"Accuracy of greedy answers ({plan.test_scenes} items per set"
        + (f"; mean ± sample std over {n_seeds} RL seeds" if n_seeds > 1 else "; one seed") + "):", "",
        _results_table(full), "",
    ]
    p = res["sft"]["id"]["accuracy"]
    se = (p * (1 - p) / max(1, plan.test_scenes)) ** 0.5
    lines += [f"For scale: with {plan.test_scenes} items, the binomial standard error of one accuracy near "
              f"{100 * p:.0f}% is ±{100 * se:.1f} points.", ""]
    blind = full.get("blind_baseline")
    if blind and blind["id"]["accuracy"] is not None:
        b = blind["id"]["accuracy"]
        near = abs(p - b) <= 2 * max(se, 1e-9)
        answers = res["sft"]["id"].get("answer_counts", {})
        guesses = ", ".join(f"{t}: {a}" for t, a in blind["answer_by_question_type"].items())
        lines += [f"The blind prior answers {guesses} whatever the image. The SFT start is "
                  f"{'within' if near else 'more than'} two standard errors {'of' if near else 'from'} it on the "
                  f"ID set ({100 * p:.1f}% vs {100 * b:.1f}%)"
                  + (", i.e. it answers mostly from the question, not the image" if near else "")
                  + f"; its {plan.test_scenes} greedy ID answers take {len(answers)} distinct values "
                  f"({', '.join(f'{k}: {v}' for k, v in list(answers.items())[:6])}) in "
                  f"{res['sft']['id'].get('distinct_completions', '?')} distinct completions.", ""]
    # OOD by object count
    buckets = sorted({k for r in [res["sft"], *res["grpo"], *res["mig"]] for k in r["ood"]["accuracy_by_objects"]},
                     key=lambda k: (len(k), k))
    if buckets:
        rows = [["SFT", *[rep.fmt_pct([res["sft"]["ood"]["accuracy_by_objects"].get(b)]) for b in buckets]]]
        for meth in METHODS:
            rows.append([meth.upper(), *[rep.fmt_pct([r["ood"]["accuracy_by_objects"].get(b) for r in res[meth]])
                                         for b in buckets]])
        lines += ["OOD accuracy by number of objects in the scene (7 and 8 never occur in training):", "",
                  rep.markdown_table(["model", *[f"{b} objects" for b in buckets]], rows), ""]
    lines += _credit_md(full)
    lines += ["## Speed of learning", "", _reach_text(full)
              + f" Curves are smoothed with a trailing mean of {plan.smooth_window} steps over the training "
              "accuracy of the sampled rollouts (`reward/accuracy` in `metrics.jsonl`); only points with a full "
              "window count.", "",
              "![curves](curves.png)", "",
              "`steps.html`: sample completions of each policy with every reasoning step shaded by its gain "
              "g_k, and the l_k curve with its watermark.", "",
              "## Wall time", ""]
    last = ("steps.html scoring", "credit diagnostics", "report", "total")
    order = [k for k in wt if k not in last] + [k for k in last[:3] if k in wt]
    rows = [[k, rep.fmt_seconds(wt[k])] for k in order] + [["**total**", rep.fmt_seconds(wt["total"])]]
    lines += [rep.markdown_table(["phase", "time"], rows), ""]
    if full.get("parallel") and full.get("run_time_s"):
        t = full["rl_threads_per_run"]
        lines += [f"GRPO and MIG of a seed ran side by side, one process of {t} torch thread{'s' if t != 1 else ''} "
                  "each; inside those phases (overlapping, so not added to the total):", "",
                  rep.markdown_table(["run", "time"], [[k, rep.fmt_seconds(v)] for k, v in full["run_time_s"].items()]),
                  ""]
    lines += [
              "`train` phases include in-loop validation; `eval` phases are the final test-set evaluations; "
              "`steps.html scoring` is the l_k scoring of the completions shown there.", "",
              "## Files", "",
              "- `results.json`: everything above, plus accuracy by question type and by object count per run.",
              "- `configs/*.yaml`: the exact recipe of every run (`vlm-mig sft|train --config configs/<file>` "
              "reruns it).",
              "- `runs/sft`, `runs/<method>-seed<N>`: checkpoints, `metrics.jsonl`, `samples.jsonl` (training "
              "rollouts with their steps, l_k and gains for MIG)"
              + (", TensorBoard logs" if plan.name != "quick" else "") + ".",
              "- `eval/<model>/<set>.jsonl`: every graded test completion.",
              "- `data/`: the scenes (images, scene JSON, `data.jsonl`).", ""]
    return "\n".join(lines)


def _credit_md(full: dict) -> list[str]:
    """The credit diagnostics table: where the MIG process reward goes on the ID test completions."""
    res = full["results"]

    def num(v, pct=False):
        if v is None:
            return "–"
        return f"{100 * v:.0f}%" if pct else f"{v:.2f}"

    def row(name, creds):
        creds = [c for c in creds if c]
        if not creds:
            return None

        def avg(key):
            vals = [c[key] for c in creds if c.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        return [name, num(avg("mean_K")), num(avg("r_proc_correct")), num(avg("r_proc_wrong")),
                num(avg("zero_r_proc_rate"), True), num(avg("last_step_gain_share"), True),
                num(avg("l0_near_certain_rate_gold_1"), True), num(avg("l0_near_certain_rate_gold_other"), True)]

    rows = [r for r in [row("SFT", [res["sft"].get("credit")]),
                        *[row(m.upper(), [x.get("credit") for x in res[m]]) for m in METHODS]] if r]
    if not rows:
        return []
    share = res["sft"].get("credit", {}).get("gold_1_share")
    notes = []
    for name, creds in [("SFT start", [res["sft"].get("credit")]), *[(m.upper(), [x.get("credit") for x in res[m]])
                                                                    for m in METHODS]]:
        c = [x for x in creds if x and x.get("r_proc_correct") is not None and x.get("r_proc_wrong") is not None]
        if c:
            rc = sum(x["r_proc_correct"] for x in c) / len(c)
            rw = sum(x["r_proc_wrong"] for x in c) / len(c)
            notes.append(f"{name}: R_proc is {'higher' if rw > rc else 'lower'} for wrong answers ({rw:.2f}) than "
                         f"for correct ones ({rc:.2f})")
    return ["## Where the process reward goes", "",
            "Every greedy ID-test completion with a think span, scored by the policy that wrote it (l_k, "
            "watermark, gains as in training; averaged over seeds):", "",
            rep.markdown_table(["policy", "mean K", "R_proc, correct", "R_proc, wrong", "R_proc = 0",
                                "share of all gain earned by the last step", "l_0 near-certain, gold 1",
                                "l_0 near-certain, other gold"], rows), "",
            "\"l_0 near-certain\": p(gold answer) > 0.9 before any reasoning step (l_0 > "
            f"{NEAR_CERTAIN}), so no step can set a record"
            + (f"; {100 * share:.0f}% of these items have the gold answer 1." if share is not None else "."), "",
            *([("; ".join(notes) + ". Within a group, the process advantage pushes toward whatever earns more "
                "R_proc, so where wrong answers earn more it works against the outcome reward."), ""]
              if notes else [])]


def _write_viewer(path: Path, viewer: dict[str, list[rep.CreditExample]], train: list[rep.CreditExample],
                  when: str, plan: DemoPlan) -> None:
    ood = f"condition B, {OOD_OBJECTS[0]}-{OOD_OBJECTS[1]} objects"
    same = "the first {} items of the {} test set ({}), so the policies can be compared item by item."
    sections = [
        rep.CreditSection("MIG policy (after RL), ID test", "Greedy completions of the final MIG policy (seed 0) on "
                          + same.format(plan.viewer_examples, "ID", "condition A, 1-6 objects")
                          + " Each completion is scored by the policy that wrote it, as in training.",
                          viewer.get("mig id", [])),
        rep.CreditSection("MIG policy (after RL), OOD test", "The same on " + same.format(
            plan.viewer_examples, "OOD", ood), viewer.get("mig ood", [])),
        rep.CreditSection("GRPO policy (after RL), ID test", "The GRPO baseline (seed 0) on the same ID items. GRPO "
                          "never computes l_k while training; they are computed here only to show what MIG would "
                          "have credited.", viewer.get("grpo id", [])),
        rep.CreditSection("GRPO policy (after RL), OOD test", "The GRPO baseline on the same OOD items.",
                          viewer.get("grpo ood", [])),
        rep.CreditSection("SFT start, ID test", "The common starting point of both RL runs, on the same ID items.",
                          viewer.get("sft id", [])),
        rep.CreditSection("Gold solutions scored by the MIG policy", "The reference step-by-step solutions: "
                          "a step that names the objects being counted should raise the likelihood of the right "
                          "answer.", viewer.get("gold", [])),
        rep.CreditSection(f"MIG training rollouts ({when or 'none logged'})", "Sampled rollouts (temperature 1) as "
                          "logged during MIG training (`samples.jsonl`): the l_k and gains here are the ones the "
                          "process reward used at that step.", train),
    ]
    intro = (
        "<p>For each completion, <b>l_k</b> is the length-normalised log-likelihood of the gold answer when the "
        "reasoning is cut after step k and closed with <code>&lt;/think&gt;&lt;answer&gt;</code> (k = 0: no "
        "reasoning yet). The <b>watermark</b> h_k is the best l so far; a step earns a <b>gain</b> "
        "g_k = max(0, l_k − h_{k−1}) only when it sets a new record, and the process reward is R_proc = Σ g_k = "
        "h_K − h_0. Steps are shaded by g_k: unshaded steps added nothing the model had not already "
        "reached. Hover a point of a curve for its values.</p>")
    rep.write_steps_html(sections, path, title="vlm-mig demo: which reasoning steps carried information?",
                         intro=intro)


# --------------------------------------------------------------------------------------------------
# Command line


def demo_command(args: argparse.Namespace) -> int:
    run_demo(out=args.out, quick=args.quick, seeds=args.seeds)
    return 0


def add_demo_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vlm-mig demo`` to the ``vlm-mig`` subparsers (handler: :func:`demo_command`, returns an int)."""
    p = subparsers.add_parser(
        "demo", help="SFT warm start, then GRPO and MIG side by side on the tiny VLM (CPU, offline), with a report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--quick", action="store_true", help="toy sizes, ~1-2 min: a smoke test of the whole pipeline")
    p.add_argument("--seeds", type=int, default=1, help="RL seeds (each runs GRPO and MIG); mean ± std when > 1")
    p.set_defaults(handler=demo_command)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(prog="vlm-mig")
    add_demo_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rl-job":
        sys.exit(_child_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
