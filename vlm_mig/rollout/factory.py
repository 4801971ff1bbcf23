"""``make_engine``: the rollout backend a config names, imported only when it is chosen.

vLLM is an optional GPU extra that pins its own torch build: nothing on the CPU path (or in CI) may import it,
so backends are registered by import path and resolved on demand.
"""

from __future__ import annotations

import importlib
from typing import Any

from vlm_mig.processing import PromptTemplate
from vlm_mig.rollout.base import BACKENDS, RolloutConfig, RolloutEngine

__all__ = ["BACKENDS", "make_engine"]


def make_engine(config: RolloutConfig, model: Any, processor: Any,
                template: PromptTemplate | None = None) -> RolloutEngine:
    """The ``config.backend`` engine sampling from ``model`` (the policy, or any model to evaluate)."""
    target = BACKENDS.get(config.backend)
    if target is None:
        raise ValueError(f"rollout.backend: unknown backend {config.backend!r}; expected one of "
                         f"{', '.join(BACKENDS)}")
    module, _, name = target.partition(":")
    engine_cls = getattr(importlib.import_module(module), name)
    return engine_cls(model, processor, config, template)
