"""The transformers ``generate`` backend: one call samples every completion of a batch of groups."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList

from vlm_mig.data.schema import Sample
from vlm_mig.processing import PromptTemplate, encode_prompts, rope_position_ids, tokenizer_of
from vlm_mig.rollout.base import RolloutConfig, RolloutEngine, Rollouts, repeat_prompts
from vlm_mig.rollout.sampling import SeededSampling, rollout_seed


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS of each row (all ones if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return (seen_before == 0).long()


class HFRolloutEngine(RolloutEngine):
    """Sampling with ``model.generate`` on left-padded prompts; old log-probs from a teacher-forced fp32 pass."""

    def __init__(self, model: Any, processor: Any, config: RolloutConfig | None = None,
                 template: PromptTemplate | None = None):
        self.model = model
        self.processor = processor
        self.config = config or RolloutConfig()
        self.template = template or PromptTemplate()
        tok = tokenizer_of(processor)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        self.eos_ids = eos
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

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
        P = repeated.input_ids.shape[1]
        completion = out[:, P:].cpu()
        mask = completion_mask(completion, self.eos_ids)
        completion = completion.masked_fill(mask == 0, self.pad_id)
        tok = tokenizer_of(self.processor)
        texts = tok.batch_decode([c[m.bool()] for c, m in zip(completion, mask)], skip_special_tokens=True)
        rollouts = Rollouts(
            samples=list(samples),
            prompts=batch,
            group=torch.arange(len(samples)).repeat_interleave(cfg.num_generations),
            prompt_ids=repeated.input_ids.cpu(),
            prompt_mask=repeated.attention_mask.cpu(),
            completion_ids=completion,
            completion_mask=mask,
            texts=texts,
        )
        grid = None
        if batch.image_grid_thw is not None:
            grid = repeated.image_grid_thw.cpu()
        mm = rollouts.mm_token_type_ids
        rollouts.position_ids = rope_position_ids(
            self.model, torch.cat([rollouts.prompt_ids, completion], 1), rollouts.attention_mask, mm, grid
        )
        if cfg.compute_logprobs:
            from vlm_mig.mig import teacher_forced_logprobs

            rollouts.old_logprobs = teacher_forced_logprobs(self.model, rollouts)
        return rollouts
