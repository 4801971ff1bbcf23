"""The demo pipeline (``run_demo``) and its command line (``vlm-mig demo``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vlm_mig import report as rep
from vlm_mig.demo import data as dd
from vlm_mig.demo.jobs import run_jobs
from vlm_mig.demo.measure import credit_over_training, learning_speed, paired_difference, training_trend
from vlm_mig.demo.plan import (
    DEFAULT,
    ID_SEED,
    METHODS,
    OOD_OBJECTS,
    OOD_SEED,
    PLANS,
    QUESTION_MIX,
    SFT_CONTROL,
    TRAIN_OBJECTS,
    TRAIN_SEED,
    DemoPlan,
    quick_of,
    rl_recipe,
    sft_recipe,
    write_recipe,
)
from vlm_mig.demo.summary import report_md, results_table, training_examples, write_viewer
from vlm_mig.outputs import check_output
from vlm_mig.timing import StageClock


def machine() -> dict[str, Any]:
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
    return {"cpu": cpu, "cores": usable, "load_average_1min": load[0], "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _job(kind: str, label: str, config: Path, run: Path, sets: dict[str, Path], plan: DemoPlan, out: Path,
         threads: int, who: str, viewer: bool, score_gold: bool = False, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "label": label, "config": str(config), "run": str(run),
            "sets": {k: str(v) for k, v in sets.items()}, "out": str(out), "threads": threads, "who": who,
            "max_new_tokens": plan.max_new_tokens, "eval_batch": plan.eval_batch,
            "viewer_examples": plan.viewer_examples if viewer else 0, "score_gold": score_gold, **extra}


def run_demo(out: str | Path = "out/demo", quick: bool = False, seeds: int = 1, plan: DemoPlan | str | None = None,
             threads: int | None = None, parallel: bool | None = None) -> dict[str, Any]:
    """Run the demo; returns what ``results.json`` holds.

    ``plan``: a ``DemoPlan`` or the name of one in ``PLANS`` (default ``teacher``); ``quick`` runs its testbed at
    toy sizes. ``parallel`` (default: with 2 or more cores, except ``quick``): the two jobs of a phase (the SFT
    start and its companion run; the headroom of start and ceiling; GRPO and MIG of a seed) run side by side in
    two processes; for a model this small a second thread buys little, so two 1-thread jobs take about as long
    as one 2-thread job. ``threads``: torch threads per training process (default 1: the thread count changes
    the floating-point reduction order, and the numbers must not depend on the machine's cores or load).
    """
    from transformers.utils import logging as hf_logging

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if plan is None or isinstance(plan, str):
        name = plan or DEFAULT.name
        if name not in PLANS:
            raise ValueError(f"unknown demo plan {name!r}; expected one of {tuple(PLANS)}")
        plan = quick_of(PLANS[name]) if quick else PLANS[name]
    out = check_output(out, "--out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("runs", "eval", "configs"):  # everything but the (seeded, cached) data is recomputed
        shutil.rmtree(out / stale, ignore_errors=True)
    hf_logging.disable_progress_bar()  # keep the terminal to the demo's own bars
    report_to = [] if plan.quick else ["tensorboard"]
    base = plan.name.removesuffix("-quick")
    command = (f"vlm-mig demo --out {out}" + (f" --plan {base}" if base != DEFAULT.name else "")
               + (" --quick" if plan.quick else "") + (f" --seeds {seeds}" if seeds != 1 else ""))
    timer = StageClock()
    per_job: dict[str, float] = {}
    machine_at_start = machine()
    if parallel is None:  # --quick: starting two fresh processes (~10 s of imports) costs more than it saves
        parallel = (machine_at_start["cores"] or 1) >= 2 and not plan.quick
    threads = threads or 1
    t_start = time.perf_counter()
    n_phases = 5 + seeds
    phase = iter(range(1, n_phases + 1))
    side = "side by side" if parallel else "one after the other"

    dd.say(f"== [{next(phase)}-{next(phase)}/{n_phases}] the embedded tiny Qwen2-VL, vision warmed up for "
           f"{plan.warmup_steps} steps (built once, cached), and the CLEVR-like data ({QUESTION_MIX} questions)"
           + (", side by side" if parallel else ""))
    model_path, warmup, paths = model_and_data(plan, out / "data", parallel, timer)
    train_path, id_path, ood_path = paths["train"], paths["id"], paths["ood"]
    blind = dd.blind_baseline_of(paths)

    what = ("the imperfect teacher's solutions (the RL start), and the clean gold ones (the ceiling)"
            if plan.testbed == "teacher" else "gold solutions, and the same SFT on blank images")
    dd.say(f"== [{next(phase)}/{n_phases}] SFT on {what} ({side})")
    results: dict[str, Any] = {"grpo": [], "mig": []}
    viewer: dict[str, list[rep.CreditExample]] = {}
    t0 = time.perf_counter()
    sft_phase(plan, paths, out, threads, report_to, parallel, results, viewer, timer, per_job)
    if parallel:
        timer.add("SFT runs side by side", time.perf_counter() - t0)
    sft_ckpt = out / "runs" / "sft" / f"checkpoint-{plan.sft_steps}"

    dd.say(f"== [{next(phase)}/{n_phases}] headroom before RL: {plan.headroom_samples} samples per ID item at the "
           f"rollout temperature, error kinds, the gradient signal of one RL step ({side})")
    t0 = time.perf_counter()
    headroom = headroom_phase(plan, paths, out, threads, parallel, timer, per_job)
    if parallel:
        timer.add("headroom side by side", time.perf_counter() - t0)

    runs: dict[str, list[Path]] = {m: [] for m in METHODS}
    for seed in range(seeds):
        dd.say(f"== [{next(phase)}/{n_phases}] seed {seed}: GRPO and MIG, {plan.rl_steps} RL steps each of "
               f"{plan.prompts_per_step} prompts x G = {plan.generations}, from {sft_ckpt} ({side})")
        jobs = []
        for method in METHODS:
            label = f"{method}-seed{seed}"
            run_dir = out / "runs" / label
            cfg = out / "configs" / f"{label}.yaml"
            write_recipe(rl_recipe(plan, method, seed, sft_ckpt, train_path, id_path, run_dir, threads, report_to),
                         cfg, f"{method.upper()} run of vlm-mig demo ({plan.name}), seed {seed}; rerun: vlm-mig train "
                         "--config <this file>")
            jobs.append(_job("rl", label, cfg, run_dir, {"id": id_path, "ood": ood_path}, plan, out, threads,
                             method.upper(), viewer=seed == 0, score_gold=seed == 0 and method == "mig",
                             start=str(sft_ckpt)))
            runs[method].append(run_dir)
        t0 = time.perf_counter()
        for job, res in zip(jobs, run_jobs(jobs, parallel)):
            _collect(job, res, results, viewer, timer, per_job, parallel, seed=seed)
        if parallel:
            timer.add(f"seed {seed}: GRPO and MIG side by side", time.perf_counter() - t0)

    dd.say(f"== [{next(phase)}/{n_phases}] report")
    t0 = time.perf_counter()
    metrics = {m: [rep.read_jsonl(d / "metrics.jsonl") for d in runs[m]] for m in METHODS}
    speed = learning_speed(metrics, plan.smooth_window)
    paired = {s: paired_difference([r[s]["correct"] for r in results["grpo"]],
                                   [r[s]["correct"] for r in results["mig"]], plan.bootstrap) for s in ("id", "ood")}
    # Each method against the start every seed shares (the same row for every seed).
    over_start = {m: {s: paired_difference([results["sft"][s]["correct"]] * seeds, [r[s]["correct"] for r in
                                                                                   results[m]], plan.bootstrap)
                      for s in ("id", "ood")} for m in METHODS}
    credit = {m: [credit_over_training(rows) for rows in metrics[m]] for m in METHODS}
    rep.plot_curves(metrics, out / "curves.png", window=plan.smooth_window, reach=speed,
                    sft_val=_sft_val(metrics), title=f"vlm-mig demo ({plan.name}): tiny Qwen2-VL, CLEVR-like "
                    f"multi-step counting, {seeds} seed{'s' if seeds > 1 else ''}, same SFT start")
    train_examples, when = training_examples(runs["mig"][0], plan.viewer_examples,
                                             {s.id: s.images[0] for s in dd.load(train_path) if s.images})
    write_viewer(out / "steps.html", viewer, train_examples, when, plan)
    timer.add("report", time.perf_counter() - t0)
    total = time.perf_counter() - t_start  # wall time: phases run side by side overlap, so not timer.total
    full = {
        "command": command, "machine": machine_at_start, "load_average_1min_at_end": machine()["load_average_1min"],
        "plan": dataclasses.asdict(plan), "seeds": list(range(seeds)), "threads": threads, "parallel": parallel,
        "model": str(model_path), "warmup": warmup,
        "data": {"train": str(train_path), "test_id": str(id_path), "test_ood": str(ood_path),
                 "question_mix": QUESTION_MIX, "train_objects": TRAIN_OBJECTS, "ood_objects": OOD_OBJECTS,
                 **({"blank": {k: str(paths[f"blank_{k}"]) for k in ("train", "id", "ood")}}
                    if plan.testbed == "clean" else {})},
        "sft_checkpoint": str(sft_ckpt), "results": results, "blind_baseline": blind, "headroom": headroom,
        "paired": paired, "over_start": over_start, "speed": speed,
        "training_accuracy": training_trend(metrics, plan.smooth_window),
        "credit": credit, "wall_time_s": {**timer.rounded(2), "total": round(total, 2)},
        "run_time_s": {k: round(v, 2) for k, v in per_job.items()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (out / "results.json").write_text(json.dumps(full, indent=1) + "\n")
    (out / "report.md").write_text(report_md(full, plan))
    dd.say(f"demo finished in {rep.fmt_seconds(total)}: {out / 'report.md'}, {out / 'curves.png'}, "
           f"{out / 'steps.html'}, {out / 'results.json'}")
    dd.say(results_table(full))
    return full


def model_and_data(plan: DemoPlan, root: Path, parallel: bool,
                   timer: StageClock) -> tuple[Path, dict[str, Any] | None, dict[str, Path]]:
    """The tiny VLM with its vision warm-up (built once, cached; its report) and the data (``make_data``).

    Both are single-threaded CPU work with nothing in common, so with ``parallel`` the model is built by
    ``vlm-mig build-tiny`` in a second process while this one renders the scenes."""
    from vlm_mig.models import tiny_model_dir

    build = None
    t0 = time.perf_counter()
    if parallel:
        cmd = [sys.executable, "-m", "vlm_mig.cli", "build-tiny", "--arch", "qwen2-vl", "--warmup-steps",
               str(plan.warmup_steps)]
        build = subprocess.Popen(cmd, env={**os.environ, "TQDM_POSITION": "1", "PYTHONUNBUFFERED": "1"})
    try:
        paths = timer.run("data", make_data, plan, root)
        if build is not None and build.wait() != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with code {build.returncode}")
    finally:
        if build is not None and build.poll() is None:
            build.terminate()
            build.wait()
    path = tiny_model_dir("qwen2-vl", plan.warmup_steps, progress=True)  # built above, or here when not parallel
    timer.add("model (vision warm-up)" + (", beside the data" if parallel else ""),
              time.perf_counter() - t0 - (0 if parallel else timer.times["data"]))
    dd.say(f"  {path}")
    return path, json.loads((path / "vlm_mig_tiny.json").read_text()).get("vision_warmup"), paths


def make_data(plan: DemoPlan, root: Path) -> dict[str, Path]:
    """The training, ID and OOD sets (written once), and for the clean testbed their blank-image twins:
    ``train``, ``id``, ``ood`` (and ``blank_train``, ``blank_id``, ``blank_ood``) -> data.jsonl."""
    paths = {"train": dd.write_set(root, "train", plan.train_scenes, "A", TRAIN_SEED, TRAIN_OBJECTS, QUESTION_MIX),
             "id": dd.write_set(root, "test-id", plan.test_scenes, "A", ID_SEED, TRAIN_OBJECTS, QUESTION_MIX),
             "ood": dd.write_set(root, "test-ood", plan.test_scenes, "B", OOD_SEED, OOD_OBJECTS, QUESTION_MIX)}
    if plan.testbed != "clean":
        return paths
    return {**paths, **{f"blank_{k}": dd.blank_twin(v) for k, v in paths.items()}}


def sft_phase(plan: DemoPlan, paths: dict[str, Path], out: Path, threads: int, report_to: list[str], parallel: bool,
              results: dict[str, Any], viewer: dict, timer: StageClock, per_job: dict[str, float],
              validate_every: int = 0) -> None:
    """The SFT start and its companion run (side by side when ``parallel``), each evaluated on its own test sets;
    results go under ``sft`` and ``plan.control``. Testbed ``teacher``: the start learns the imperfect teacher's
    solutions, the companion the clean gold ones (the ceiling); ``clean``: the start learns the gold solutions,
    the companion the same on blank images. ``validate_every``: also validate on the ID set (real or blank)
    every N steps (the learning curve; the demo skips it)."""
    jobs = sft_jobs(plan, paths, out, threads, report_to, validate_every)
    for job, res in zip(jobs, run_jobs(jobs, parallel)):
        _collect(job, res, results, viewer, timer, per_job, parallel)


def sft_jobs(plan: DemoPlan, paths: dict[str, Path], out: Path, threads: int, report_to: list[str],
             validate_every: int = 0) -> list[dict[str, Any]]:
    """The two SFT jobs of ``sft_phase``, their recipes written to ``out/configs``."""
    teacher = plan.testbed == "teacher"
    runs = [("sft", "SFT start" + (" (imperfect teacher)" if teacher else ""), "", teacher),
            (plan.control, SFT_CONTROL[plan.testbed][1], "" if teacher else "blank_", False)]
    jobs = []
    for label, who, blank, slips in runs:
        run_dir = out / "runs" / label
        cfg = out / "configs" / f"{label}.yaml"
        recipe = sft_recipe(plan, paths[f"{blank}train"], run_dir, threads, report_to, label, teacher=slips)
        if validate_every:
            recipe["data"]["validation"] = str(paths[f"{blank}id"])
            recipe["trainer"]["eval_steps"] = validate_every
            recipe["eval"]["limit"] = plan.val_scenes
        write_recipe(recipe, cfg, f"{who} of vlm-mig demo ({plan.name}); rerun: vlm-mig sft --config <this file>")
        jobs.append(_job("sft", label, cfg, run_dir, {"id": paths[f"{blank}id"], "ood": paths[f"{blank}ood"]}, plan,
                         out, threads, who, viewer=label == "sft"))
    return jobs


def headroom_phase(plan: DemoPlan, paths: dict[str, Path], out: Path, threads: int, parallel: bool, timer: StageClock,
                   per_job: dict[str, float]) -> dict[str, Any]:
    """The headroom of the start (and, on the teacher testbed, of the ceiling) on the ID set: the same RL recipe
    (MIG's, so l_k are scored) reads its samples and one step's gradients; nothing is trained."""
    labels = ["sft"] + ([plan.control] if plan.testbed == "teacher" else [])
    jobs = []
    for label in labels:
        ckpt = out / "runs" / label / f"checkpoint-{plan.sft_steps}"
        cfg = out / "configs" / f"headroom-{label}.yaml"
        recipe = rl_recipe(plan, "mig", 0, ckpt, paths["train"], paths["id"], out / "runs" / f"headroom-{label}",
                           threads, [])
        recipe["data"]["validation"] = None
        write_recipe(recipe, cfg, f"headroom of {label} in vlm-mig demo ({plan.name}): the RL recipe it is measured "
                     "with (nothing is trained)")
        jobs.append(_job("headroom", f"headroom-{label}", cfg, out / "runs" / f"headroom-{label}",
                         {"id": paths["id"]}, plan, out, threads, label, viewer=False,
                         samples_k=plan.headroom_samples, greedy=str(out / "eval" / label / "id.jsonl")))
    found = {}
    for job, label, res in zip(jobs, labels, run_jobs(jobs, parallel)):
        found[label] = res["headroom"]
        _file_times(job["label"], res["times"], timer, per_job, parallel)
    return found


def _file_times(label: str, times: dict[str, float], timer: StageClock, per_job: dict[str, float],
                parallel: bool) -> None:
    """A job's phase times: beside the others when jobs ran side by side (they overlap), else in the total."""
    for k, v in times.items():
        if parallel:
            per_job[f"{label} {k}"] = v
        else:
            timer.add(f"{label} {k}", v)


def _collect(job: dict[str, Any], res: dict[str, Any], results: dict[str, Any], viewer: dict, timer: StageClock,
             per_job: dict[str, float], parallel: bool, seed: int | None = None) -> None:
    """File one job's results: evaluation under its model's key, credit cards, times."""
    label = job["label"]
    if seed is None:
        results[label] = res["ev"]
    else:
        results[label.rsplit("-seed", 1)[0]].append({"seed": seed, "run": job["run"], **res["ev"],
                                                     "weights": res.get("weights")})
    viewer.update(res["viewer"])
    _file_times(label, res["times"], timer, per_job, parallel)


def _sft_val(metrics: dict[str, list[list[dict[str, Any]]]]) -> float | None:
    """The SFT start's validation accuracy (step 0 of the RL runs)."""
    steps, vals = rep.series(metrics["grpo"][0], "val/accuracy") if metrics["grpo"] else ([], [])
    return vals[0] if steps and steps[0] == 0 else None


# --------------------------------------------------------------------------------------------------
# Command line


def demo_command(args: argparse.Namespace) -> int:
    run_demo(out=args.out, quick=args.quick, seeds=args.seeds, plan=args.plan)
    return 0


def add_demo_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``vlm-mig demo`` to the ``vlm-mig`` subparsers (handler: :func:`demo_command`, returns an int)."""
    from vlm_mig import demo

    p = subparsers.add_parser(
        "demo", help="SFT (with a blank-image control), then GRPO and MIG side by side on the tiny VLM (CPU, "
                     "offline), with a report",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--plan", default=DEFAULT.name, choices=tuple(PLANS),
                   help="teacher (default): SFT on an imperfect teacher's solutions, the clean SFT as the ceiling; "
                        "clean: SFT on the gold solutions, with the blank-image control")
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
    sys.exit(main())
