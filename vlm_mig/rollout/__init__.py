"""Rollouts: sample G completions per prompt and return one ``Rollouts`` batch.

``make_engine(config, model, processor, template)`` builds the engine ``config.backend`` names: ``hf``
(transformers ``generate``, CPU/GPU) or ``vllm`` (GPU, colocated with training; optional extra, imported only
when chosen). Every engine has ``generate(samples, seeds) -> Rollouts`` and ``sync_weights(model)``.
"""

from vlm_mig.rollout.base import RolloutConfig, RolloutEngine, Rollouts, repeat_prompts, select_prompts
from vlm_mig.rollout.factory import BACKENDS, make_engine
from vlm_mig.rollout.hf import HFRolloutEngine

__all__ = ["BACKENDS", "HFRolloutEngine", "RolloutConfig", "RolloutEngine", "Rollouts", "make_engine",
           "repeat_prompts", "select_prompts"]
