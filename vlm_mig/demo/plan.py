"""What the demo runs: sizes and budgets (``DemoPlan``), the data it draws, and each run's recipe.

Every training phase is a plain recipe (a dict in the shape of a YAML config) written to ``configs/`` before
it runs, so any run can be repeated by hand with ``vlm-mig sft|train --config``. GRPO and MIG recipes differ
only in the loss switches of ``METHOD_LOSS`` (and their output folders); a test checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from vlm_mig.config import Config, load_config, merge_dicts

TRAIN_OBJECTS = (1, 6)
OOD_OBJECTS = (5, 8)
TRAIN_SEED, ID_SEED, OOD_SEED = 1, 1001, 2001
#: Question types of every set: count all / by one attribute / filter chains / add / subtract / compare.
QUESTION_MIX = "multistep"
METHODS = ("grpo", "mig")
#: The loss switches that make the two methods (everything else in their configs is identical).
METHOD_LOSS = {"grpo": {"alpha": 0.0, "gamma": 0.0}, "mig": {"alpha": 1.0, "gamma": 0.1}}
#: What the RL start is SFT-trained on, and the SFT run beside it:
#: "teacher": an imperfect teacher's solutions (the last computed result moved by ``teacher_slip`` with
#: probability ``teacher_error_rate``; ``vlm_mig.data.teacher``), beside the same SFT on the clean gold solutions
#: (the ceiling RL can reach by repairing the teacher's error); "clean": the gold solutions, beside the same SFT
#: on blank images (the control for "does the model use the image?").
TESTBEDS = ("teacher", "clean")
#: The second SFT run of each testbed: its label and what it is.
SFT_CONTROL = {"teacher": ("sft-clean", "SFT on the clean gold solutions (the ceiling)"),
               "clean": ("sft-blank", "SFT on blank images (control)")}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes, budgets and testbed of one demo run."""

    name: str
    testbed: str  #: one of ``TESTBEDS``
    warmup_steps: int  #: vision warm-up steps of the tiny model (built once, cached)
    train_scenes: int  #: training scenes (condition A, 1-6 objects; one question each)
    test_scenes: int  #: scenes in each of the ID and OOD test sets
    val_scenes: int  #: in-loop validation: the first N scenes of the ID test set
    sft_steps: int
    sft_batch: int
    sft_lr: float  #: peak SFT learning rate (linear decay to 0)
    rl_steps: int
    prompts_per_step: int
    generations: int  #: G
    max_new_tokens: int  #: rollouts and evaluation
    rl_lr: float
    eval_every: int  #: in-loop validation every N RL steps
    sample_log_steps: int  #: training rollouts (with l_k) logged every N steps
    smooth_window: int  #: trailing window of the training-curve smoothing
    viewer_examples: int  #: completions per section of steps.html
    headroom_samples: int  #: completions per test item at the rollout temperature, for the headroom table
    eval_batch: int = 50
    bootstrap: int = 2000  #: resamples of the two-level (seeds x items) bootstrap
    teacher_error_rate: float = 0.75  #: testbed "teacher": how often the teacher slips
    teacher_slip: int = -1  #: testbed "teacher": the slip, added to the last computed result

    def __post_init__(self) -> None:
        if self.testbed not in TESTBEDS:
            raise ValueError(f"testbed must be one of {TESTBEDS}, got {self.testbed!r}")

    @property
    def quick(self) -> bool:
        """A smoke run at toy sizes (its numbers mean nothing)."""
        return self.name.endswith("quick")

    @property
    def control(self) -> str:
        """The label of the SFT run beside the start (``SFT_CONTROL``)."""
        return SFT_CONTROL[self.testbed][0]


#: The default: an imperfect teacher's SFT start, where RL has a shared, cheap error to repair.
TEACHER = DemoPlan(
    name="teacher", testbed="teacher", warmup_steps=1500, train_scenes=3000, test_scenes=200, val_scenes=100,
    sft_steps=600, sft_batch=16, sft_lr=2e-3,
    rl_steps=60, prompts_per_step=4, generations=8, max_new_tokens=80, rl_lr=1e-4,
    eval_every=20, sample_log_steps=10, smooth_window=10, viewer_examples=4, headroom_samples=16,
)  # fmt: skip
#: The previous demo: SFT on the clean gold solutions (a start with the gold behaviour already, where RL had
#: nothing shared to learn), with its blank-image control.
CLEAN = replace(TEACHER, name="clean", testbed="clean", rl_lr=5e-5)
PLANS = {p.name: p for p in (TEACHER, CLEAN)}
DEFAULT = TEACHER
_QUICK_SIZES = dict(
    warmup_steps=20, train_scenes=160, test_scenes=24, val_scenes=8, sft_steps=40, sft_batch=8, sft_lr=2e-3,
    rl_steps=4, prompts_per_step=2, generations=4, max_new_tokens=48, rl_lr=1e-4, eval_every=2,
    sample_log_steps=1, smooth_window=2, viewer_examples=2, headroom_samples=4, eval_batch=24, bootstrap=200,
)  # fmt: skip


def quick_of(plan: DemoPlan) -> DemoPlan:
    """``plan``'s testbed at toy sizes."""
    return replace(plan, name=f"{plan.name}-quick", **_QUICK_SIZES)


QUICK = quick_of(DEFAULT)


def _common(plan: DemoPlan, train: Path, threads: int | None, report_to: list[str]) -> dict[str, Any]:
    return {
        # The warmed-up vision tower stays frozen: the language model learns to read it.
        "model": {"dtype": "float32", "freeze_vision": True},
        # The chat template's short default system turn: the format is learnt from the gold solutions, and the
        # project's long format instruction would be a third of every sequence of this small model.
        "data": {"train": str(train), "format": "jsonl", "task": "count", "system_prompt": None},
        "rollout": {"num_generations": plan.generations, "temperature": 1.0, "top_p": 1.0,
                    "max_new_tokens": plan.max_new_tokens},
        "optim": {"weight_decay": 0.0, "warmup_steps": 0, "max_grad_norm": 1.0},
        "trainer": {"threads": threads, "report_to": report_to, "progress": True, "save_total_limit": 1},
        "eval": {"max_new_tokens": plan.max_new_tokens, "batch_size": plan.eval_batch},
    }


def sft_recipe(plan: DemoPlan, train: Path, out_dir: Path, threads: int | None, report_to: list[str],
               label: str = "sft", teacher: bool = False) -> dict[str, Any]:
    """The SFT warm start on step-by-step solutions (a linear decay: the end of SFT settles the model): the gold
    ones, or with ``teacher`` the imperfect teacher's (``data.teacher_error_rate``)."""
    errors = {"teacher_error_rate": plan.teacher_error_rate, "teacher_slip": plan.teacher_slip} if teacher else {}
    return merge_dicts(_common(plan, train, threads, report_to), {
        "model": {"name_or_path": "tiny", "tiny_arch": "qwen2-vl", "tiny_warmup_steps": plan.warmup_steps},
        "data": {"validation": None, **errors},
        "optim": {"lr": plan.sft_lr, "schedule": "linear"},
        # The vision tower is frozen, so each prompt's image features are computed once (``cache_prompts``).
        "trainer": {"output_dir": str(out_dir), "seed": 0, "max_steps": plan.sft_steps, "cache_prompts": True,
                    "sft_batch_size": plan.sft_batch, "micro_batch_size": plan.sft_batch,
                    "save_steps": plan.sft_steps, "eval_steps": 0, "log_steps": 10, "progress_desc": label},
    })


def rl_recipe(plan: DemoPlan, method: str, seed: int, start: Path, train: Path, val: Path, out_dir: Path,
              threads: int | None, report_to: list[str]) -> dict[str, Any]:
    """GRPO or MIG from the SFT checkpoint; the two differ only in ``METHOD_LOSS``."""
    return merge_dicts(_common(plan, train, threads, report_to), {
        "model": {"name_or_path": str(start)},
        "data": {"validation": str(val)},
        "advantage": {"scale": "group", "process_credit": "trajectory"},
        "loss": {**METHOD_LOSS[method], "beta": 1.0, "kl_coef": 0.0, "eps_clip": 0.2, "normalizer": "grpo"},
        "optim": {"lr": plan.rl_lr, "schedule": "constant_with_warmup"},
        "trainer": {"output_dir": str(out_dir), "seed": seed, "max_steps": plan.rl_steps,
                    "prompts_per_step": plan.prompts_per_step, "micro_batch_size": 16, "num_iterations": 1,
                    "save_steps": plan.rl_steps, "eval_steps": plan.eval_every, "log_steps": 1,
                    "sample_log_steps": plan.sample_log_steps, "progress_desc": f"{method} seed {seed}"},
        "eval": {"limit": plan.val_scenes},
    })


def write_recipe(recipe: dict[str, Any], path: Path, header: str) -> Config:
    """Write ``recipe`` as a commented YAML file and return it loaded (so a bad recipe fails here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# " + header.replace("\n", "\n# ") + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return load_config(path)
