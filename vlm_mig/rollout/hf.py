"""The transformers ``generate`` backend: one call samples every completion of a batch of groups.

Each prompt is prefilled once: the B distinct prompts (all but their last token) go through the model with
their images, so the vision tower and the prompt prefill run once per prompt; the KV cache (and Qwen-VL's
M-RoPE ``rope_deltas``) is then repeated to the B*G rollout rows and ``model.generate`` continues from it,
feeding each row's last prompt token first. The logits processors, stop tokens, padding of finished rows and
``max_new_tokens`` are ``generate``'s own, and the first new token is still step 0 of the seeded sampler, so the
tokens are the ones a ``generate`` on G copies of every prompt draws (up to float rounding of the different
batch shapes).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from transformers import LogitsProcessorList

from vlm_mig.adapter import adapter_for, base_model, cache_keyword
from vlm_mig.data.schema import Sample
from vlm_mig.processing import PromptBatch, PromptTemplate, encode_prompts
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

__all__ = ["HFRolloutEngine", "completion_mask", "generate_groups"]


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
        G = cfg.num_generations
        sampling = cfg.temperature > 0
        sampler = None  # only our seeded sampler reports log-probs (generate's own sampling and greedy do not)
        if sampling and seeds is not None:
            if len(seeds) != len(samples):
                raise ValueError(f"{len(seeds)} seeds for {len(samples)} samples")
            row_seeds = [rollout_seed(s, j) for s in seeds for j in range(G)]
            sampler = SeededSampling(row_seeds, cfg.temperature, cfg.top_p)
            decode = {"do_sample": False, "logits_processor": LogitsProcessorList([sampler])}
        elif sampling:
            # SPEC sampling: temperature and top_p only (top_k=0 turns off the generation config's top-k).
            decode = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        else:
            decode = {"do_sample": False}
        decode.update(max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        was_training = self.model.training
        self.model.eval()
        try:
            # A copy on the device: the rollouts keep the prompts where encode_prompts left them.
            completion = generate_groups(self.model, dataclasses.replace(batch).to(device), G, decode)
        finally:
            self.model.train(was_training)
        sampled = None if sampler is None else sampler.sampled_logprobs(completion)
        return assemble_rollouts(self.processor, samples, batch, completion, self.eos_ids, self.pad_id, sampled)


def shares_prefill(model: Any, batch: PromptBatch, times: int) -> bool:
    """Whether ``generate_groups`` prefills each prompt once: G > 1, prompts of two tokens or more, and a
    generation config that leaves ``generate`` a dynamic cache to continue from."""
    gen_cfg = getattr(base_model(model), "generation_config", None)
    return (times > 1 and batch.input_ids.shape[1] >= 2 and getattr(gen_cfg, "use_cache", True) is not False
            and getattr(gen_cfg, "cache_implementation", None) is None)


@torch.no_grad()
def generate_groups(model: Any, batch: PromptBatch, times: int, decode: dict[str, Any]) -> torch.Tensor:
    """[B*times, T] new token ids, rows ``b*times .. b*times+times-1`` continuing prompt ``b`` of ``batch``
    (left padded, on the model's device): what ``model.generate(**repeat_prompts(batch, times).model_inputs(),
    **decode)`` returns after the prompt, with the images encoded and the prompts prefilled once each.

    The prefill covers all but each prompt's last token (for left-padded rows that one is never padding or an
    image token), at the positions ``generate`` gives the full prompt (M-RoPE for a VLM); ``generate`` then
    starts from the repeated cache with the full repeated prompt, so its first forward is the last prompt token
    of every row, its logits processors see the full prompt width (step 0 of ``SeededSampling``), and
    everything after is ``generate`` as usual."""
    if not shares_prefill(model, batch, times):
        prompts = repeat_prompts(batch, times)
        out = model.generate(**prompts.model_inputs(), **decode)
        return out[:, prompts.input_ids.shape[1]:]
    ids, mask = batch.input_ids, batch.attention_mask
    adapter = adapter_for(model)
    positions = adapter.position_ids(model, ids, mask, batch.mm_token_type_ids, batch.image_grid_thw)
    prefix = {name: (value[:, :-1] if name in ("input_ids", "attention_mask", "mm_token_type_ids") else value)
              for name, value in batch.model_inputs().items()}
    prefix["position_ids"] = positions[..., :-1]
    params = inspect.signature(base_model(model).forward).parameters
    if "logits_to_keep" in params:
        prefix["logits_to_keep"] = 1  # only the cache is wanted
    cache_arg = cache_keyword(base_model(model))
    out = model(**prefix, use_cache=True, return_dict=True)
    cache = out.get(cache_arg, None)
    del out
    cache.batch_repeat_interleave(times)
    inner = getattr(base_model(model), "model", None)
    if adapter.multimodal and hasattr(inner, "rope_deltas"):
        # M-RoPE: generate continues text at 1-D position + delta, the shift the images left in each prompt;
        # the last prompt token is text, so delta = its M-RoPE id - its 1-D id. One per rollout row.
        deltas = positions[0, :, -1] - (mask.sum(-1) - 1)
        inner.rope_deltas = deltas.repeat_interleave(times)[:, None]
    out = model.generate(input_ids=ids.repeat_interleave(times, dim=0),
                         attention_mask=mask.repeat_interleave(times, dim=0), **{cache_arg: cache}, **decode)
    return out[:, ids.shape[1]:]
