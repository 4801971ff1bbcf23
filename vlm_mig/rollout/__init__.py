"""Rollouts: sample G completions per prompt and return one ``Rollouts`` batch.

The engine interface is ``RolloutEngine.generate(samples) -> Rollouts``; ``HFRolloutEngine`` (transformers
``generate``, CPU/GPU) is the built-in backend.
"""

from vlm_mig.rollout.base import RolloutConfig, RolloutEngine, Rollouts, repeat_prompts, select_prompts
from vlm_mig.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutConfig", "RolloutEngine", "Rollouts", "repeat_prompts", "select_prompts"]
