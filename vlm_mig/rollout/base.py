"""The ``Rollouts`` batch that flows through the pipeline, and the engine interface that makes it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from vlm_mig.data.schema import Sample
from vlm_mig.processing import PromptBatch


@dataclass
class RolloutConfig:
    """Sampling settings (SPEC defaults for a paper-style run)."""

    num_generations: int = 8  #: G, completions per prompt
    temperature: float = 1.0  #: sampling temperature
    top_p: float = 1.0  #: nucleus sampling threshold
    max_new_tokens: int = 1024  #: max completion length
    max_prompt_length: int | None = None  #: longer prompts are an error naming the sample (never truncated)
    min_pixels: int | None = None  #: image sizing lower bound (qwen-vl-utils semantics)
    max_pixels: int | None = None  #: image sizing upper bound
    compute_logprobs: bool = True  #: run the teacher-forced fp32 pass for old log-probs after sampling


@dataclass
class Rollouts:
    """One row per completion, grouped G per prompt (rows ``g*G .. g*G+G-1`` share prompt ``g``).

    Stages add fields (steps, MIG scores, rewards, advantages); none re-tokenizes text.
    """

    samples: list[Sample]  #: the B prompts' samples
    prompts: PromptBatch  #: the B prompts, left padded, with their images (not repeated)
    group: torch.Tensor  #: [N] prompt index of each row, N = B*G
    prompt_ids: torch.Tensor  #: [N, P] left padded
    prompt_mask: torch.Tensor  #: [N, P]
    completion_ids: torch.Tensor  #: [N, T] right padded
    completion_mask: torch.Tensor  #: [N, T] 1 for every token through the first EOS
    texts: list[str]  #: decoded completions (special tokens dropped)
    position_ids: torch.Tensor | None = None  #: [3, N, P+T] M-RoPE ids (VLMs) or [N, P+T], 0 on padding
    old_logprobs: torch.Tensor | None = None  #: [N, T] log pi_old of completion tokens, 0 on padding
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[N, P+T] over prompt and completion (left padding, then right padding after EOS)."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def mm_token_type_ids(self) -> torch.Tensor | None:
        """[N, P+T] modality of each token (completions are text); None for text-only models."""
        if self.prompts.mm_token_type_ids is None:
            return None
        prompt = self.prompts.mm_token_type_ids[self.group]
        return torch.cat([prompt, torch.zeros_like(self.completion_ids, dtype=prompt.dtype)], dim=1)

    @property
    def num_generations(self) -> int:
        return self.completion_ids.shape[0] // max(1, len(self.samples))

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def sample_of(self, row: int) -> Sample:
        return self.samples[int(self.group[row])]


class RolloutEngine(ABC):
    """Samples G completions for each prompt of a batch, in as few backend calls as the backend allows."""

    config: RolloutConfig

    @abstractmethod
    def generate(self, samples: list[Sample], seeds: list[int] | None = None) -> Rollouts:
        """Return ``len(samples) * G`` completions as one ``Rollouts`` batch; ``seeds`` (one per sample)
        make each completion reproducible on its own, whatever else the batch holds."""


def repeat_prompts(batch: PromptBatch, times: int) -> PromptBatch:
    """Each prompt row repeated ``times`` times in place (a, a, b, b, ...), images included."""
    if times == 1:
        return batch
    return select_prompts(batch, [i for i in range(batch.input_ids.shape[0]) for _ in range(times)])


def select_prompts(batch: PromptBatch, rows: list[int]) -> PromptBatch:
    """The prompt rows ``rows`` (any order, repeats allowed), each with its own images."""
    idx = torch.tensor(rows, dtype=torch.long)
    pixel_values = grid = None
    if batch.pixel_values is not None:
        patches = batch.image_grid_thw.prod(-1)
        starts = torch.cat([patches.new_zeros(1), patches.cumsum(0)[:-1]])
        first_image = [0]
        for n_img in batch.images_per_sample:
            first_image.append(first_image[-1] + n_img)
        image_rows, patch_rows = [], []
        for r in rows:
            for j in range(first_image[r], first_image[r + 1]):
                image_rows.append(j)
                patch_rows.append(torch.arange(int(starts[j]), int(starts[j] + patches[j])))
        grid = batch.image_grid_thw[image_rows]
        pixel_values = batch.pixel_values[torch.cat(patch_rows)] if patch_rows else batch.pixel_values[:0]
    return PromptBatch(
        input_ids=batch.input_ids[idx],
        attention_mask=batch.attention_mask[idx],
        sample_ids=[batch.sample_ids[r] for r in rows],
        texts=[batch.texts[r] for r in rows],
        mm_token_type_ids=None if batch.mm_token_type_ids is None else batch.mm_token_type_ids[idx],
        pixel_values=pixel_values,
        image_grid_thw=grid,
        images_per_sample=[batch.images_per_sample[r] for r in rows] if batch.images_per_sample else [],
    )
