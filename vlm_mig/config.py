"""Typed configuration: one dataclass per section, SPEC defaults, YAML files plus ``section.key=value`` overrides.

    cfg = load_config("configs/tiny_clevr_mig.yaml", ["trainer.max_steps=20", "loss.alpha=0"])

Unknown keys, values of the wrong type, values outside a field's fixed set of choices or its bounds (declared
beside the field with ``vlm_mig.fields.choice`` / ``bounded``) are errors that name the full dotted key
(``trainer.max_step: unknown key; did you mean trainer.max_steps?``). Sections that belong to one stage reuse that
stage's own dataclass (``rollout``, ``mig``, ``advantage``, ``loss``), so a default lives in exactly one place.
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

from vlm_mig.advantages import AdvantageConfig
from vlm_mig.data.arithmetic import NUM_STEPS
from vlm_mig.data.clevr import CONDITIONS, DEFAULT_CONDITION, DEFAULT_MIX, NUM_OBJECTS, QUESTION_MIXES
from vlm_mig.data.schema import TASK_TYPES
from vlm_mig.data.sources import FORMATS
from vlm_mig.fields import allowed, bounded, choice
from vlm_mig.losses import LossConfig
from vlm_mig.mig import MigOptions
from vlm_mig.model_options import ARCHES, DTYPE_NAMES, WarmupConfig
from vlm_mig.rollout.base import RolloutConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    name_or_path: str = "tiny"  #: folder or hub id; "tiny" builds (and caches) the embedded tiny Qwen2-VL
    tiny_arch: str = choice("qwen2-vl", ARCHES)  #: architecture of the "tiny" model
    tiny_warmup_steps: int = bounded(WarmupConfig.steps, ge=0)  #: vision warm-up steps of the "tiny" VLM (0: random)
    dtype: str = choice("float32", DTYPE_NAMES)  #: parameter dtype (use bfloat16 on GPU)
    attn_implementation: str | None = None  #: None lets transformers pick (sdpa); eager | sdpa | flash_attention_2
    gradient_checkpointing: bool = False  #: trade compute for memory on long sequences
    freeze_vision: bool = False  #: freeze the whole vision tower (features can then be reused across passes)
    freeze_patch_embed: bool = True  #: freeze the patch embedding (a random one collapses under AdamW)
    lora_r: int = bounded(0, ge=0)  #: LoRA rank through peft; 0 trains all (unfrozen) weights
    lora_alpha: int = 16  #: LoRA scaling numerator
    lora_dropout: float = 0.0  #: LoRA dropout
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    trust_remote_code: bool = False  #: opt in to custom modelling code from the checkpoint


@dataclass
class DataConfig:
    """Where prompts come from (train and validation)."""

    train: str = "synthetic:clevr"  #: a path, a shipped benchmark name, or synthetic:clevr | synthetic:arithmetic
    format: str = choice("auto", FORMATS)  #: how to read ``train``/``validation`` paths
    task: str = choice("count", TASK_TYPES)  #: task type of the rows (grader)
    validation: str | None = "synthetic:clevr"  #: held-out set for in-loop validation; None disables it
    image_root: str | None = None  #: base folder for relative image paths
    synthetic_n: int = bounded(2000, ge=1)  #: number of synthetic training prompts
    #: CLEVR-CoGenT condition of synthetic training scenes
    synthetic_condition: str = choice(DEFAULT_CONDITION, tuple(CONDITIONS))
    synthetic_seed: int = 1  #: seed of the synthetic training set (validation uses seed + 1000)
    validation_n: int = bounded(64, ge=1)  #: size of a synthetic validation set
    max_objects: int = bounded(NUM_OBJECTS[1], ge=1)  #: synthetic CLEVR scenes hold 1..max_objects objects
    synthetic_mix: str = choice(DEFAULT_MIX, tuple(QUESTION_MIXES))  #: synthetic CLEVR question types (multistep: all)
    synthetic_list_objects: bool = True  #: synthetic CLEVR gold steps list the objects they count (else counts only)
    arithmetic_steps: list[int] = field(default_factory=lambda: list(NUM_STEPS))  #: synthetic arithmetic chain lengths
    system_prompt: str | None = "default"  #: "default" = the project's system prompt; None = chat template's
    question_suffix: str = ""  #: appended to every question (train and eval alike)
    skip_bad: bool = False  #: skip (and report) malformed rows instead of failing on the first one
    limit: int | None = bounded(None, ge=1)  #: use only the first N training rows
    #: vlm-mig sft only: the SFT targets of an imperfect teacher (vlm_mig.data.teacher): with this probability a
    #: training row whose last step computes its answer gets that result and answer moved by teacher_slip
    teacher_error_rate: float = bounded(0.0, ge=0, le=1)
    teacher_slip: int = -1  #: how far the teacher's wrong result is from the right one (not 0)
    teacher_seed: int = 0  #: seed of the teacher's slips (each row's draw is keyed on it and the row id)


@dataclass
class MigConfig(MigOptions):
    """The process reward (SPEC sections 1-2): the scoring options, plus the noise floor of the process advantage."""

    #: groups whose R_proc spread (max - min, nats) is below this get A_proc = 0: about the R_proc gap between two
    #: completions of a group that state the same numbers and answer (measured, SPEC section 4)
    min_spread: float = bounded(0.1, ge=0)


@dataclass
class RewardConfig:
    """The outcome reward R_out = sum of weighted terms (SPEC section 3)."""

    accuracy_weight: float = 1.0  #: w_acc
    format_weight: float = 1.0  #: w_fmt
    plugins: list[str] = field(default_factory=list)  #: extra TRL-style rewards "module:function=weight"
    fallback_extraction: bool = False  #: grade untagged answers too (off: untagged answers earn nothing)
    #: DAPO's soft overlong penalty (SPEC section 3): L_cache, the last tokens before ``rollout.max_new_tokens``
    #: over which the ``overlong`` term of R_out ramps from 0 down to ``-overlong_penalty`` (0: off)
    overlong_buffer: int = bounded(0, ge=0)
    overlong_penalty: float = bounded(1.0, ge=0)  #: the overlong term's value at the cap (DAPO's penalty factor)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = bounded(1e-6, ge=0)  #: peak learning rate (SPEC paper-style default)
    weight_decay: float = bounded(0.0, ge=0)  #: AdamW weight decay
    adam_beta1: float = 0.9  #: AdamW beta1
    adam_beta2: float = 0.999  #: AdamW beta2
    warmup_steps: int = bounded(0, ge=0)  #: linear warm-up steps
    schedule: str = "constant_with_warmup"  #: any transformers scheduler name (constant_with_warmup, cosine, ...)
    max_grad_norm: float = bounded(1.0, ge=0)  #: gradient clipping (0 disables)


@dataclass
class TrainerConfig:
    """The loop: sizes, cadence, outputs."""

    output_dir: str = "runs/default"  #: checkpoints, metrics.jsonl, TensorBoard logs, samples
    seed: int = 0  #: seeds data order, rollouts (per prompt) and initialisation
    max_steps: int = bounded(100, ge=0)  #: optimisation steps (one rollout batch each)
    prompts_per_step: int = bounded(2, ge=1)  #: prompts per step on each process (x G rollouts)
    #: rollouts per forward/backward in the update (gradient accumulation); when the update scores MIG itself
    #: (``rl.stages.in_update_blocker``) it takes whole groups: the largest multiple of num_generations that fits
    micro_batch_size: int = bounded(8, ge=1)
    num_iterations: int = bounded(1, ge=1)  #: optimisation passes over each rollout batch (SPEC default 1)
    sft_batch_size: int = bounded(16, ge=1)  #: examples per step for ``vlm-mig sft``
    #: ``vlm-mig sft`` with a frozen vision tower: encode each prompt and its image features once and reuse them
    #: (memory: image tokens x hidden size x 4 bytes per training prompt, held in CPU RAM)
    cache_prompts: bool = False
    save_steps: int = bounded(50, ge=1)  #: checkpoint every N steps (and at the end)
    save_total_limit: int | None = bounded(3, ge=1)  #: keep only the newest N checkpoints
    eval_steps: int = bounded(25, ge=0)  #: in-loop validation every N steps (0 disables)
    log_steps: int = bounded(1, ge=1)  #: metrics every N steps
    sample_log_steps: int = bounded(10, ge=0)  #: write sample completions with step gains every N steps
    bf16: bool = False  #: bf16 autocast (GPU)
    report_to: list[str] = choice(options=("tensorboard", "wandb"), default_factory=lambda: ["tensorboard"])  #: loggers
    progress: bool = True  #: show a progress bar
    progress_desc: str | None = None  #: the progress bar's label (None: "sft" or "rl")
    threads: int | None = bounded(None, ge=1)  #: torch CPU threads (None: torch default)


@dataclass
class EvalConfig:
    """In-loop validation settings; its ``max_new_tokens`` and ``batch_size`` are also the defaults of
    ``vlm-mig eval`` and ``evaluate()`` (``vlm_mig.evaluation.options.EvalOptions`` reads them from here).
    """

    #: completion budget at validation and in ``vlm-mig eval``: the training rollout budget
    #: (``RolloutConfig.max_new_tokens``), so validation does not cut off answers training allows
    max_new_tokens: int = bounded(RolloutConfig.max_new_tokens, ge=1)
    limit: int | None = bounded(None, ge=1)  #: validate on the first N items
    #: prompts per generate call, here and in ``vlm-mig eval`` (16: eval may draw K completions per prompt)
    batch_size: int = bounded(16, ge=1)


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
# Building from plain data, with errors that name the key

#: Keys that no longer exist, with why: a saved config that still has one loads, with a warning.
REMOVED: dict[str, str] = {
    "rollout.compute_logprobs": "rollout engines only sample now; old log-probs come from the trainer's own "
                                "teacher-forced fp32 pass (vlm_mig.forward.teacher_forced_logprobs)",
}


def _check_allowed(value: Any, key: str, meta: Any) -> Any:
    """``value`` if the field's choices and bounds (its ``meta``) allow it, else a ConfigError naming ``key``."""
    want = allowed(value, meta)
    if want is None:
        return value
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: invalid value {value!r}; expected {want}{hint}")
    raise ConfigError(f"{key}: must be {want}, got {value!r}")


def _check_value(value: Any, tp: Any, key: str, meta: Any = types.MappingProxyType({})) -> Any:
    """``value`` converted to the annotated type ``tp``, or a ConfigError naming ``key``; ``meta`` is the field's
    metadata (its choices and bounds, checked for each item of a list)."""
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
                return _check_value(value, arg, key, meta)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, item, f"{key}[{i}]", meta) for i, v in enumerate(value)]
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
        return _check_allowed(value, key, meta)
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
        if not math.isfinite(value):  # YAML reads .inf and .nan; no setting means either
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return _check_allowed(float(value), key, meta)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return _check_allowed(value, key, meta)
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
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    names = list(meta)
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
        kwargs[key] = _check_value(value, hints[key], full, meta[key])
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
    if cfg.data.teacher_error_rate > 0 and cfg.data.teacher_slip == 0:
        raise ConfigError("data.teacher_slip: a slip of 0 changes nothing; the teacher's wrong results need one")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the full resolved config (every default spelled out) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
