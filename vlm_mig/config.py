"""Typed configuration: one dataclass per section, SPEC defaults, YAML files plus ``section.key=value`` overrides.

    cfg = load_config("configs/tiny_clevr_mig.yaml", ["trainer.max_steps=20", "loss.alpha=0"])

Unknown keys, values of the wrong type, values outside a field's fixed set of choices (``CHOICES``) or its
bounds (``BOUNDS``) are errors that name the full dotted key (``trainer.max_step: unknown key; did you mean
trainer.max_steps?``). Sections that belong to one stage reuse that stage's own dataclass (``rollout``,
``advantage``, ``loss``), so a default lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm_mig.advantages import PROCESS_CREDITS, PROCESS_MASKS, SCALES, AdvantageConfig
from vlm_mig.data.clevr import CONDITIONS
from vlm_mig.data.schema import TASK_TYPES
from vlm_mig.losses import NORMALIZERS, SFT_GATES, LossConfig
from vlm_mig.mig import ANSWER_SCORES, L0_CONTEXTS
from vlm_mig.models import ARCHES
from vlm_mig.prompts import DEFAULT_L0_OPENER, DEFAULT_PROBE
from vlm_mig.rollout.base import RolloutConfig
from vlm_mig.rollout.factory import BACKENDS
from vlm_mig.warmup import WarmupConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    name_or_path: str = "tiny"  #: folder or hub id; "tiny" builds (and caches) the embedded tiny Qwen2-VL
    tiny_arch: str = "qwen2-vl"  #: architecture of the "tiny" model: qwen2-vl | qwen2.5-vl | qwen2
    tiny_warmup_steps: int = WarmupConfig.steps  #: vision warm-up steps of the "tiny" VLM (0: random vision tower)
    dtype: str = "float32"  #: parameter dtype: float32 | bfloat16 (use bf16 on GPU)
    attn_implementation: str | None = None  #: None lets transformers pick (sdpa); eager | sdpa | flash_attention_2
    gradient_checkpointing: bool = False  #: trade compute for memory on long sequences
    freeze_vision: bool = False  #: freeze the whole vision tower (features can then be reused across passes)
    freeze_patch_embed: bool = True  #: freeze the patch embedding (a random one collapses under AdamW)
    lora_r: int = 0  #: LoRA rank through peft; 0 trains all (unfrozen) weights
    lora_alpha: int = 16  #: LoRA scaling numerator
    lora_dropout: float = 0.0  #: LoRA dropout
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trust_remote_code: bool = False  #: opt in to custom modelling code from the checkpoint


@dataclass
class DataConfig:
    """Where prompts come from (train and validation)."""

    train: str = "synthetic:clevr"  #: a path, a shipped benchmark name, or synthetic:clevr | synthetic:arithmetic
    format: str = "auto"  #: auto | jsonl | r1v | superclevr | hf (how to read ``train``/``validation`` paths)
    task: str = "count"  #: task type of the rows (grader): count | math | numeric | mc | text
    validation: str | None = "synthetic:clevr"  #: held-out set for in-loop validation; None disables it
    image_root: str | None = None  #: base folder for relative image paths
    synthetic_n: int = 2000  #: number of synthetic training prompts
    synthetic_condition: str = "A"  #: CLEVR-CoGenT condition of synthetic training scenes
    synthetic_seed: int = 1  #: seed of the synthetic training set (validation uses seed + 1000)
    validation_n: int = 64  #: size of a synthetic validation set
    max_objects: int = 6  #: synthetic CLEVR scenes hold 1..max_objects objects
    arithmetic_steps: list[int] = field(default_factory=lambda: [2, 4])  #: synthetic arithmetic chain lengths
    system_prompt: str | None = "default"  #: "default" = the project's system prompt; None = chat template's
    question_suffix: str = ""  #: appended to every question (train and eval alike)
    skip_bad: bool = False  #: skip (and report) malformed rows instead of failing on the first one
    limit: int | None = None  #: use only the first N training rows


@dataclass
class MigConfig:
    """The process reward (SPEC sections 1-2)."""

    probe: str = DEFAULT_PROBE  #: closes the reasoning and opens the answer when scoring l_k
    min_step_chars: int = 8  #: steps shorter than this merge into a neighbour
    max_steps: int = 16  #: cap on K; the tail merges into the last step
    visual_evidence: bool = False  #: also log l_0 without the image (one extra pass over the prompts, copy 0 only)
    max_tokens_per_batch: int = 16384  #: bound on padded tokens of one packed scoring pass
    l0_context: str = "empty_think"  #: where l_0 is scored: empty_think (right after <think>) | opener
    l0_opener: str = DEFAULT_L0_OPENER  #: the neutral text after <think> that l_0 follows when l0_context is opener
    answer_score: str = "mean"  #: answer token log-probs -> l_k: mean | sum (sequence log-prob) | digits
    watermark: bool = True  #: gains against the watermark (SPEC); false: raw l_k - l_{k-1} (ablation)
    min_gain: float = 0.0  #: a gain below this many nats counts as 0 (the watermark moves only past it)
    min_spread: float = 0.0  #: groups whose R_proc spread (max - min, nats) is below this get A_proc = 0


@dataclass
class RewardConfig:
    """The outcome reward R_out = sum of weighted terms (SPEC section 3)."""

    accuracy_weight: float = 1.0  #: w_acc
    format_weight: float = 1.0  #: w_fmt
    plugins: list[str] = field(default_factory=list)  #: extra TRL-style rewards "module:function=weight"
    fallback_extraction: bool = False  #: grade untagged answers too (off: untagged answers earn nothing)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-6  #: peak learning rate (SPEC paper-style default)
    weight_decay: float = 0.0  #: AdamW weight decay
    adam_beta1: float = 0.9  #: AdamW beta1
    adam_beta2: float = 0.999  #: AdamW beta2
    warmup_steps: int = 0  #: linear warm-up steps
    schedule: str = "constant_with_warmup"  #: any transformers scheduler name (constant_with_warmup, cosine, ...)
    max_grad_norm: float = 1.0  #: gradient clipping (0 disables)


@dataclass
class TrainerConfig:
    """The loop: sizes, cadence, outputs."""

    output_dir: str = "runs/default"  #: checkpoints, metrics.jsonl, TensorBoard logs, samples
    seed: int = 0  #: seeds data order, rollouts (per prompt) and initialisation
    max_steps: int = 100  #: optimisation steps (one rollout batch each)
    prompts_per_step: int = 2  #: prompts per step on each process (x G rollouts)
    micro_batch_size: int = 8  #: rollouts per forward/backward in the update (gradient accumulation)
    num_iterations: int = 1  #: optimisation passes over each rollout batch (SPEC default 1)
    sft_batch_size: int = 16  #: examples per step for ``vlm-mig sft``
    save_steps: int = 50  #: checkpoint every N steps (and at the end)
    save_total_limit: int | None = 3  #: keep only the newest N checkpoints
    eval_steps: int = 25  #: in-loop validation every N steps (0 disables)
    log_steps: int = 1  #: metrics every N steps
    sample_log_steps: int = 10  #: write sample completions with step gains every N steps
    bf16: bool = False  #: bf16 autocast (GPU)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  #: tensorboard and/or wandb
    progress: bool = True  #: show a progress bar
    progress_desc: str | None = None  #: the progress bar's label (None: "sft" or "rl")
    threads: int | None = None  #: torch CPU threads (None: torch default)


@dataclass
class EvalConfig:
    """In-loop validation and ``vlm-mig eval`` defaults."""

    max_new_tokens: int = 128  #: completion budget at validation
    limit: int | None = None  #: validate on the first N items
    batch_size: int = 32  #: prompts per generate call


@dataclass
class Config:
    """Everything a run needs; ``load_config`` builds it from YAML and overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    mig: MigConfig = field(default_factory=MigConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Allowed values, checked while building (each error names the dotted key)

#: String fields that take one of a fixed set (for list fields: each item).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.tiny_arch": ARCHES,
    "model.dtype": ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),  # what models.load_model reads
    "data.format": ("auto", "jsonl", "r1v", "superclevr", "hf"),  # what data.sources.load_source reads
    "data.task": TASK_TYPES,
    "data.synthetic_condition": tuple(CONDITIONS),
    "rollout.backend": tuple(BACKENDS),
    "rollout.vllm_dtype": ("auto", "bfloat16", "float16", "float32"),  # what vllm.LLM(dtype=...) takes
    "advantage.scale": SCALES,
    "advantage.process_credit": PROCESS_CREDITS,
    "advantage.process_mask": PROCESS_MASKS,
    "mig.l0_context": L0_CONTEXTS,
    "mig.answer_score": ANSWER_SCORES,
    "loss.normalizer": NORMALIZERS,
    "loss.sft_gates": SFT_GATES,
    "trainer.report_to": ("tensorboard", "wandb"),
}

#: Numeric fields with bounds: (minimum, maximum), either None for unbounded; both inclusive.
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "model.lora_r": (0, None),
    "model.tiny_warmup_steps": (0, None),
    "data.synthetic_n": (1, None),
    "data.validation_n": (1, None),
    "data.max_objects": (1, None),
    "data.limit": (1, None),
    "rollout.num_generations": (1, None),
    "rollout.temperature": (0, None),
    "rollout.top_p": (0, 1),
    "rollout.max_new_tokens": (1, None),
    "rollout.max_prompt_length": (1, None),
    "rollout.vllm_max_model_len": (1, None),
    "rollout.vllm_max_images": (1, None),
    "mig.min_step_chars": (0, None),
    "mig.max_steps": (1, None),
    "mig.max_tokens_per_batch": (1, None),
    "mig.min_gain": (0, None),
    "mig.min_spread": (0, None),
    "optim.lr": (0, None),
    "optim.weight_decay": (0, None),
    "optim.warmup_steps": (0, None),
    "optim.max_grad_norm": (0, None),
    "trainer.max_steps": (0, None),
    "trainer.prompts_per_step": (1, None),
    "trainer.micro_batch_size": (1, None),
    "trainer.num_iterations": (1, None),
    "trainer.sft_batch_size": (1, None),
    "trainer.save_steps": (1, None),
    "trainer.save_total_limit": (1, None),
    "trainer.eval_steps": (0, None),
    "trainer.log_steps": (1, None),
    "trainer.sample_log_steps": (0, None),
    "trainer.threads": (1, None),
    "eval.max_new_tokens": (1, None),
    "eval.limit": (1, None),
    "eval.batch_size": (1, None),
}


#: Keys that no longer exist, with why: a saved config that still has one loads, with a warning.
REMOVED: dict[str, str] = {
    "rollout.compute_logprobs": "rollout engines only sample now; old log-probs come from the trainer's own "
                                "teacher-forced fp32 pass (vlm_mig.mig.teacher_forced_logprobs)",
}


def _field_key(key: str) -> str:
    """``trainer.report_to[1]`` -> ``trainer.report_to``."""
    return re.sub(r"(\[\d+\])+$", "", key)


def _check_allowed(value: Any, key: str) -> Any:
    base = _field_key(key)
    choices = CHOICES.get(base)
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: invalid value {value!r}; expected one of {', '.join(choices)}{hint}")
    lo, hi = BOUNDS.get(base, (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: must be {want}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Building from plain data, with errors that name the key


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the annotated type ``tp``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or value in ("None", "none")):  # Python's spelling of null too
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return _check_allowed(value, key)
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string; accept any finite float literal.
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                value = number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _check_allowed(float(value), key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return _check_allowed(value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a mapping; unknown keys are errors naming the key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    dotted = (prefix + ".") if prefix else ""
    for key, value in data.items():
        full = f"{dotted}{key}"
        if full in REMOVED:
            logger.warning("%s is ignored: %s", full, REMOVED[full])
            continue
        if key not in names:
            what = "unknown key" if prefix else "unknown section"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {dotted}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{full}: {what}{hint}")
        kwargs[key] = _check_value(value, hints[key], full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a stage's own __post_init__ validation
        # Name the field the message is about (a key that was set first), else the section.
        named = [k for k in [*kwargs, *names] if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", str(e))]
        raise ConfigError(f"{dotted}{named[0]}: {e}" if named else f"{where}: {e}") from e


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["trainer.max_steps=20", "loss.alpha=0"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from e
        _set_dotted(out, key, value)
    return out


def merge_dicts(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, section by section (nested mappings merge; other values replace)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A ``Config`` from an optional YAML file plus dotted overrides (overrides win)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = merge_dicts(data, parse_overrides(overrides or []))
    try:
        cfg = _build(Config, data)
        _check_across(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e
    return cfg


def _check_across(cfg: Config) -> None:
    """Checks that involve more than one value of a field."""
    steps = cfg.data.arithmetic_steps
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"data.arithmetic_steps: expected [min, max] with 1 <= min <= max, got {steps}")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the full resolved config (every default spelled out) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
