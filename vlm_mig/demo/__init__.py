"""``vlm-mig demo``: the whole method, for real, on 2 CPU cores with no downloads.

1. the embedded tiny Qwen2-VL, its vision tower warmed up on synthetic scenes (built once into the cache);
2. CLEVR-like data with multi-step questions (count all, by one attribute, filter chains, add, subtract,
   compare) whose gold steps state the intermediate counts: a training set and an in-distribution (ID) test
   set under CLEVR-CoGenT condition A with 1-6 objects, a zero-shot out-of-distribution (OOD) test set under
   condition B (cube/cylinder colours swapped) with 5-8 objects (7 and 8 never occur in training);
3. the SFT start and the SFT run beside it, by testbed (``--plan``): ``teacher`` (default) trains the start on
   an imperfect teacher's solutions (the last computed result one too low in 3 of 4 solutions;
   ``vlm_mig.data.teacher``) and, beside it, the same SFT on the clean solutions: the ceiling repairing the
   error can reach. ``clean`` (the previous demo) trains the start on the gold solutions and, beside it, the
   same SFT on blank-image twins of the data: the control that shows what the model learns without seeing.
   All RL runs start from the one start, so the seeds measure the spread of RL, not of SFT;
4. the headroom of the start (and the ceiling) before any RL: samples at the rollout temperature (pass@k,
   majority@k), a blind sampler, greedy error kinds read against the scene JSON, the gradient signal-to-noise
   of one RL step;
5. RL from the start twice per seed, with identical seeds, data order and budget: GRPO
   (``loss.alpha=0 loss.gamma=0``) and MIG (SPEC defaults alpha 1, beta 1, gamma 0.1, trajectory credit);
   ``loss.kl_coef=0`` for both (no reference model on the CPU). With 2 or more cores the two jobs of a phase
   go side by side, one process each (every training process uses one torch thread, so the numbers do not
   depend on the machine's cores or load);
6. greedy evaluation of every model on the ID and OOD test sets, next to a blind prior (the most common
   training answer per question type), whether the counts each completion states match the scene, each method
   against the start and MIG against GRPO with two-level (seeds x items) bootstrap intervals, the weights'
   movement, and where the process reward goes within training groups;
7. ``report.md``, ``curves.png``, ``steps.html`` (per-step credit viewer), ``results.json``, and the run
   folders (``runs/``), with the exact config of every run in ``configs/`` (each reruns by hand with
   ``vlm-mig sft|train --config``).

``--quick`` runs the same pipeline at toy sizes (a smoke test: its numbers mean nothing). ``--seeds N``
repeats step 5 with trainer seeds 0..N-1 and reports mean ± std.

Modules: ``plan`` (testbeds, sizes, recipes), ``data`` (sets, blank twins, blind prior), ``jobs`` (training
and headroom jobs and the process runner), ``measure`` (evaluation and statistics), ``summary`` (report.md,
steps.html), ``run`` (the pipeline and the command line).
"""

from typing import Any

from vlm_mig.demo.plan import CLEAN, DEFAULT, PLANS, QUICK, TEACHER, DemoPlan

__all__ = ["CLEAN", "DEFAULT", "PLANS", "QUICK", "TEACHER", "DemoPlan", "add_demo_command", "demo_command", "main",
           "run_demo"]

_FROM_RUN = ("add_demo_command", "demo_command", "main", "run_demo")


def __getattr__(name: str) -> Any:
    """The pipeline's names, imported on first use: importing the package must not import ``run`` (and through
    it ``jobs``), or ``python -m vlm_mig.demo.jobs`` (a job's child process) finds its module already imported
    and runpy warns."""
    if name in _FROM_RUN:
        from vlm_mig.demo import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
