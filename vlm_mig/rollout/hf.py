"""The transformers ``generate`` backend: one call samples every completion of a batch of groups."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList

from vlm_mig.data.schema import Sample
from vlm_mig.processing import PromptTemplate, encode_prompts
from vlm_mig.rollout.base import (
    RolloutConfig,
    RolloutEngine,
    Rollouts,
    assemble_rollouts,
    completion_mask,
    eos_and_pad,
    repeat_prompts,
)
from vlm_mig.rollout.sampling import SeededSampling, rollout_seed

__all__ = ["HFRolloutEngine", "completion_mask"]


class HFRolloutEngine(RolloutEngine):
    """Sampling with ``model.generate`` on left-padded prompts, from the policy module itself."""

    def __init__(self, model: Any, processor: Any, config: RolloutConfig | None = None,
                 template: PromptTemplate | None = None):
        self.model = model
        self.processor = processor
        self.config = config or RolloutConfig()
        self.template = template or PromptTemplate()
        self.eos_ids, self.pad_id = eos_and_pad(model, processor)

    def _push_weights(self, model: Any) -> None:
        # generate runs the policy module itself, so it always sees the newest weights.
        if model is not self.model:
            raise ValueError("HFRolloutEngine samples from the module it was built with; sync that module")

    @torch.no_grad()
    def generate(self, samples: list[Sample], seeds: list[int] | None = None) -> Rollouts:
        """Sample G completions per sample. With ``seeds`` (one per sample), completion ``j`` of sample ``i``
        is drawn from its own stream ``(seeds[i], j)``: independent of batch composition and world size."""
        cfg = self.config
        device = next(self.model.parameters()).device
        batch = encode_prompts(self.processor, samples, self.template, cfg.max_prompt_length, cfg.min_pixels,
                               cfg.max_pixels)
        repeated = repeat_prompts(batch, cfg.num_generations).to(device)
        sampling = cfg.temperature > 0
        if sampling and seeds is not None:
            if len(seeds) != len(samples):
                raise ValueError(f"{len(seeds)} seeds for {len(samples)} samples")
            row_seeds = [rollout_seed(s, j) for s in seeds for j in range(cfg.num_generations)]
            decode = {"do_sample": False, "logits_processor": LogitsProcessorList(
                [SeededSampling(row_seeds, cfg.temperature, cfg.top_p)])}
        elif sampling:
            # SPEC sampling: temperature and top_p only (top_k=0 turns off the generation config's top-k).
            decode = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        else:
            decode = {"do_sample": False}
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                **repeated.model_inputs(),
                **decode,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
            )
        finally:
            self.model.train(was_training)
        completion = out[:, repeated.input_ids.shape[1]:]
        return assemble_rollouts(self.model, self.processor, samples, batch, repeated, completion, self.eos_ids,
                                 self.pad_id)
