"""``vlm-mig demo``: the whole method, for real, on 2 CPU cores with no downloads.

1. the embedded tiny Qwen2-VL, its vision tower warmed up on synthetic scenes (built once into the cache);
2. CLEVR-like data with multi-step questions (count all, by one attribute, filter chains, add, subtract,
   compare) whose gold steps state the intermediate counts: a training set and an in-distribution (ID) test
   set under CLEVR-CoGenT condition A with 1-6 objects, a zero-shot out-of-distribution (OOD) test set under
   condition B (cube/cylinder colours swapped) with 5-8 objects (7 and 8 never occur in training), and the
   blank-image twin of each (every image a constant grey);
3. SFT on the gold step-by-step solutions, and the identical SFT on the blank twins: the control that shows
   what the model learns without seeing (all RL runs start from the real SFT checkpoint, so the seeds
   measure the spread of RL, not of SFT);
4. RL from that checkpoint twice per seed, with identical seeds, data order and budget: GRPO
   (``loss.alpha=0 loss.gamma=0``) and MIG (SPEC defaults alpha 1, beta 1, gamma 0.1, trajectory credit);
   ``loss.kl_coef=0`` for both (no reference model on the CPU). With 2 or more cores the two jobs of a phase
   go side by side, one process each (every training process uses one torch thread, so the numbers do not
   depend on the machine's cores or load);
5. greedy evaluation of every model on the ID and OOD test sets, next to a blind prior (the most common
   training answer per question type), whether the counts each completion states match the scene, the paired
   MIG - GRPO difference with a bootstrap interval, and where the process reward goes within training groups;
6. ``report.md``, ``curves.png``, ``steps.html`` (per-step credit viewer), ``results.json``, and the run
   folders (``runs/``), with the exact config of every run in ``configs/`` (each reruns by hand with
   ``vlm-mig sft|train --config``).

``--quick`` runs the same pipeline at toy sizes (a smoke test: its numbers mean nothing). ``--seeds N``
repeats step 4 with trainer seeds 0..N-1 and reports mean ± std.

Modules: ``plan`` (sizes, recipes), ``data`` (sets, blank twins, blind prior), ``jobs`` (training jobs and the
process runner), ``measure`` (evaluation and statistics), ``summary`` (report.md, steps.html), ``run`` (the
pipeline and the command line).
"""

from vlm_mig.demo.plan import DEFAULT, QUICK, DemoPlan
from vlm_mig.demo.run import add_demo_command, demo_command, main, run_demo

__all__ = ["DEFAULT", "QUICK", "DemoPlan", "add_demo_command", "demo_command", "main", "run_demo"]
