"""How a benchmark is evaluated: decoding, the prompt template and the per-benchmark options (suite ``defaults``,
a benchmark entry and CLI flags set them)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_mig.config import EvalConfig
from vlm_mig.data.schema import DataError
from vlm_mig.processing import PromptTemplate
from vlm_mig.prompts import SYSTEM_PROMPT

#: Sampling defaults when K > 1 (the DeepSeek-R1 evaluation setting); K = 1 is greedy.
SAMPLING_TEMPERATURE = 0.6
SAMPLING_TOP_P = 0.95
EXTRACTIONS = ("strict", "fallback")


@dataclass(frozen=True)
class Decoding:
    """Resolved decoding settings (recorded in results.json and part of the resume key)."""

    samples: int  #: K completions per item
    temperature: float  #: 0 = greedy
    top_p: float
    max_new_tokens: int

    @property
    def mode(self) -> str:
        return "greedy" if self.temperature == 0 else "sampling"

    @classmethod
    def resolve(cls, samples: int, temperature: float | None, top_p: float | None, max_new_tokens: int) -> Decoding:
        """Greedy for one sample, seeded sampling for K > 1, unless ``temperature`` says otherwise."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature is None:
            temperature = 0.0 if samples == 1 else SAMPLING_TEMPERATURE
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0 and samples > 1:
            raise ValueError(f"{samples} greedy samples would be identical: set temperature > 0 for pass@k")
        if top_p is None:
            top_p = 1.0 if temperature == 0 else SAMPLING_TOP_P
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(samples, float(temperature), float(top_p), int(max_new_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, **dataclasses.asdict(self)}


def parse_template(value: Any, where: str = "template") -> PromptTemplate:
    """``default`` (the training prompt), ``r1v``, ``chat`` (no system prompt, no suffix), or a mapping
    ``{system_prompt, question_suffix}`` where ``system_prompt: default`` is the project's prompt."""
    if isinstance(value, PromptTemplate):
        return value
    if value == "default":
        return PromptTemplate()
    if value == "r1v":
        return PromptTemplate.r1v()
    if value == "chat":
        return PromptTemplate(system_prompt=None)
    if isinstance(value, dict):
        unknown = set(value) - {"system_prompt", "question_suffix"}
        if unknown:
            raise DataError(f"{where}: unknown key(s) {sorted(unknown)}; expected system_prompt, question_suffix")
        system = value.get("system_prompt", "default")
        return PromptTemplate(
            system_prompt=SYSTEM_PROMPT if system == "default" else system,
            question_suffix=str(value.get("question_suffix") or ""),
        )
    raise DataError(
        f"{where}: expected default, r1v, chat or a mapping {{system_prompt, question_suffix}}, got {value!r}"
    )


def describe_template(template: PromptTemplate) -> dict[str, Any]:
    """The template as recorded in results.json, naming the known presets."""
    preset = {
        "default": PromptTemplate(),
        "r1v": PromptTemplate.r1v(),
        "chat": PromptTemplate(system_prompt=None),
    }
    name = next((k for k, t in preset.items() if t == template), "custom")
    return {"name": name, "system_prompt": template.system_prompt, "question_suffix": template.question_suffix}


def sampling_from_run_config(model_dir: str | os.PathLike) -> dict[str, float]:
    """The rollout temperature and top-p a checkpoint was trained (or would be RL-trained) with, from its
    ``run_config.json`` (``rollout.temperature``, ``rollout.top_p``), as ``EvalOptions`` fields
    (``sampling_temperature``, ``sampling_top_p``); empty when there is none or the rollouts were greedy."""
    path = Path(model_dir) / "run_config.json"
    if not path.is_file():
        return {}
    try:
        rollout = json.loads(path.read_text()).get("rollout") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: cannot read the training config: {e}") from None
    t, p = rollout.get("temperature"), rollout.get("top_p")
    if not isinstance(t, (int, float)) or t <= 0:
        return {}
    return {"sampling_temperature": float(t), **({"sampling_top_p": float(p)} if isinstance(p, (int, float)) else {})}


def template_from_run_config(model_dir: str | os.PathLike) -> PromptTemplate | None:
    """The prompt a checkpoint was trained with, from the ``run_config.json`` the trainer saves next to
    the weights (``data.system_prompt`` / ``data.question_suffix``); None when there is none.

    This is what keeps train-time and eval-time prompts the same without the user repeating them.
    """
    path = Path(model_dir) / "run_config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text()).get("data") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: cannot read the training config: {e}") from None
    if "system_prompt" not in data and "question_suffix" not in data:
        return None
    return parse_template(
        {"system_prompt": data.get("system_prompt", "default"), "question_suffix": data.get("question_suffix", "")},
        str(path),
    )


@dataclass
class EvalOptions:
    """Per-benchmark evaluation options (suite ``defaults``, a benchmark entry and CLI flags set them)."""

    samples: int = 1  #: K completions per item (1: greedy pass@1)
    temperature: float | None = None  #: None: 0 for K = 1, ``sampling_temperature`` for K > 1
    top_p: float | None = None  #: None: 1 for greedy, ``sampling_top_p`` for sampling
    #: K > 1 without a temperature samples at this: a checkpoint's rollout temperature when its run_config.json
    #: has one (``vlm-mig eval``), else SAMPLING_TEMPERATURE
    sampling_temperature: float = SAMPLING_TEMPERATURE
    sampling_top_p: float = SAMPLING_TOP_P  #: the nucleus threshold that goes with ``sampling_temperature``
    #: completion budget; default from ``EvalConfig`` (the one home of this default: the training rollout budget)
    max_new_tokens: int = EvalConfig.max_new_tokens
    #: prompts per generate call (each with K completions); default from ``EvalConfig``
    batch_size: int = EvalConfig.batch_size
    limit: int | None = None  #: first N items of each benchmark
    seed: int = 0  #: sampling seed (each item's stream derives from it, its benchmark and id)
    extraction: str = "strict"  #: strict (tagged answers only, as the training reward) | fallback
    template: PromptTemplate | None = None  #: None: the model's training prompt if saved, else PromptTemplate()

    def decoding(self) -> tuple[float | None, float | None]:
        """``(temperature, top_p)`` to generate with: as set, or for K > 1 without a temperature the sampling
        defaults (``Decoding.resolve`` fills what stays None)."""
        if self.samples > 1 and self.temperature is None:
            return self.sampling_temperature, self.sampling_top_p if self.top_p is None else self.top_p
        return self.temperature, self.top_p

    def updated(self, changes: dict[str, Any], where: str) -> EvalOptions:
        """A copy with ``changes`` applied; unknown keys and bad values are errors naming ``where``."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise DataError(f"{where}: unknown option(s) {unknown}; options are {names}")
        changes = dict(changes)
        if changes.get("template") is not None:
            changes["template"] = parse_template(changes["template"], f"{where}.template")
        if changes.get("extraction") is not None and changes["extraction"] not in EXTRACTIONS:
            raise DataError(f"{where}.extraction: expected one of {EXTRACTIONS}, got {changes['extraction']!r}")
        for key in ("samples", "max_new_tokens", "batch_size", "limit", "seed"):
            value = changes.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise DataError(f"{where}.{key}: expected an integer, got {value!r}")
            if value is not None and key != "seed" and value < 1:
                raise DataError(f"{where}.{key}: must be >= 1, got {value}")
        return dataclasses.replace(self, **changes)
