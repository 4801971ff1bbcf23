"""The ``Rollouts`` batch that flows through the pipeline, and the engine interface that makes it.

An engine only samples: it returns token ids, masks and texts. Old log-probs are never its job:
callers that need them run the trainer's own teacher-forced fp32 pass (``vlm_mig.forward.teacher_forced_logprobs``,
or the packed scoring pass), whichever backend sampled, so MIG scores and PPO ratios never depend on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vlm_mig.data.schema import Sample
from vlm_mig.fields import bounded, check_fields, choice
from vlm_mig.processing import PromptBatch, tokenizer_of

#: backend name -> "module:class" of its engine (``make_engine`` imports it only when it is chosen):
#: hf (transformers generate, CPU/GPU), vllm (GPU only: pip install 'vlm-mig[vllm]')
BACKENDS: dict[str, str] = {
    "hf": "vlm_mig.rollout.hf:HFRolloutEngine",
    "vllm": "vlm_mig.rollout.vllm:VLLMRolloutEngine",
}


@dataclass
class RolloutConfig:
    """Sampling settings (SPEC defaults for a paper-style run)."""

    num_generations: int = bounded(8, ge=1)  #: G, completions per prompt
    temperature: float = bounded(1.0, ge=0)  #: sampling temperature
    top_p: float = bounded(1.0, ge=0, le=1)  #: nucleus sampling threshold
    max_new_tokens: int = bounded(1024, ge=1)  #: max completion length
    max_prompt_length: int | None = bounded(None, ge=1)  #: longer prompts are an error naming the sample
    min_pixels: int | None = None  #: image sizing lower bound (qwen-vl-utils semantics)
    max_pixels: int | None = None  #: image sizing upper bound
    backend: str = choice("hf", BACKENDS)  #: the sampler (see ``BACKENDS``)
    vllm_gpu_memory_utilization: float = bounded(0.3, gt=0, le=1)  #: share of each GPU vLLM may take, beside training
    vllm_sleep: bool = True  #: free vLLM's GPU memory during scoring and the update (sleep level 1), where supported
    #: vLLM's weight dtype (auto: the checkpoint's); the trainer's own passes keep theirs
    vllm_dtype: str = choice("bfloat16", ("auto", "bfloat16", "float16", "float32"))
    vllm_max_model_len: int | None = bounded(None, ge=1)  #: prompt + completion room vLLM reserves; None: the model's
    vllm_max_images: int | None = bounded(None, ge=1)  #: images per prompt vLLM reserves room for; None: vLLM's default
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)  #: further vllm.LLM(...) arguments (e.g. enforce_eager)

    def __post_init__(self):
        check_fields(self)

    @property
    def logprob_temperature(self) -> float:
        """The temperature the policy's log-probs of its rollouts are computed at (the PPO ratio, old, reference
        and SFT-term log-probs): the sampling temperature, or 1 for greedy rollouts."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class Rollouts:
    """What an engine samples: one row per completion, grouped G per prompt (rows ``g*G .. g*G+G-1`` share prompt
    ``g``). The RL step's stages build on it in a ``vlm_mig.rl.RLBatch``; none re-tokenizes text."""

    samples: list[Sample]  #: the B prompts' samples
    prompts: PromptBatch  #: the B prompts, left padded, with their images (not repeated)
    group: torch.Tensor  #: [N] prompt index of each row, N = B*G
    prompt_ids: torch.Tensor  #: [N, P] left padded
    prompt_mask: torch.Tensor  #: [N, P]
    completion_ids: torch.Tensor  #: [N, T] right padded
    completion_mask: torch.Tensor  #: [N, T] 1 for every token through the first EOS
    texts: list[str]  #: decoded completions (special tokens dropped)
    #: the stop tokens the engine sampled with (``truncated`` reads them); empty: unknown (given completions)
    eos_ids: tuple[int, ...] = ()
    #: [N, T] log-prob of each completion token under the distribution that sampled it (tempered, top-p), as the
    #: sampler reports it, 0 on padding; None where the backend reports none (greedy, generate's own sampling)
    sampler_logp: torch.Tensor | None = None

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

    @property
    def truncated(self) -> torch.Tensor:
        """[N] bool: the completion hit ``max_new_tokens`` before a stop token, i.e. none of ``eos_ids`` is among its
        kept tokens (``completion_mask``); all False when ``eos_ids`` is empty (completions given, not sampled)."""
        if not self.eos_ids:
            return torch.zeros(self.completion_ids.shape[0], dtype=torch.bool)
        stop = torch.isin(self.completion_ids, torch.tensor(self.eos_ids, device=self.completion_ids.device))
        return ~(stop & self.completion_mask.bool()).any(-1)

    def sample_of(self, row: int) -> Sample:
        return self.samples[int(self.group[row])]

    @classmethod
    def grouped(cls, samples: list[Sample], prompts: PromptBatch, completion_ids: torch.Tensor,
                completion_mask: torch.Tensor, texts: list[str], eos_ids: tuple[int, ...] = (),
                sampler_logp: torch.Tensor | None = None) -> Rollouts:
        """Rows ``g*G .. g*G+G-1`` of the completions belong to prompt ``g`` of ``prompts`` (G = rows / prompts):
        the group index and the prompt rows repeated G times are laid out here, once for every maker."""
        G = completion_ids.shape[0] // max(1, len(samples))
        return cls(samples=list(samples), prompts=prompts, group=torch.arange(len(samples)).repeat_interleave(G),
                   prompt_ids=prompts.input_ids.cpu().repeat_interleave(G, dim=0),
                   prompt_mask=prompts.attention_mask.cpu().repeat_interleave(G, dim=0),
                   completion_ids=completion_ids, completion_mask=completion_mask, texts=list(texts),
                   eos_ids=tuple(eos_ids), sampler_logp=sampler_logp)

    def rows_of(self, groups: list[int]) -> list[int]:
        """The rows of prompts ``groups``, group by group in that order."""
        G = self.num_generations
        return [g * G + j for g in groups for j in range(G)]

    @classmethod
    def of_groups(cls, parts: list[tuple[Rollouts, list[int]]], pad_id: int) -> Rollouts:
        """One ``Rollouts`` of the groups ``groups`` of each part, in that order (dynamic sampling's batch of kept
        groups from several draws): prompts re-padded on the left with their images, completions re-padded on the
        right to the widest (``pad_id``, mask 0, sampler log-prob 0). The parts must share G and the stop tokens."""
        if not parts:
            raise ValueError("Rollouts.of_groups needs at least one part")
        G, eos = parts[0][0].num_generations, parts[0][0].eos_ids
        if any(r.num_generations != G or r.eos_ids != eos for r, _ in parts):
            raise ValueError("Rollouts.of_groups: the parts differ in group size or stop tokens")
        rows = [r.rows_of(groups) for r, groups in parts]
        width = max(r.completion_ids.shape[1] for r, _ in parts)

        def cat_rows(name: str, value: float) -> torch.Tensor:
            return torch.cat([F.pad(getattr(r, name)[idx], (0, width - r.completion_ids.shape[1]), value=value)
                              for (r, _), idx in zip(parts, rows)])

        return cls.grouped(
            samples=[r.samples[g] for r, groups in parts for g in groups],
            prompts=concat_prompts([select_prompts(r.prompts, groups) for r, groups in parts], pad_id),
            completion_ids=cat_rows("completion_ids", pad_id),
            completion_mask=cat_rows("completion_mask", 0),
            texts=[r.texts[i] for (r, _), idx in zip(parts, rows) for i in idx],
            eos_ids=eos,
            sampler_logp=(cat_rows("sampler_logp", 0.0)
                          if all_or_none([r for r, _ in parts], "sampler_logp", "Rollouts.of_groups") else None),
        )


class RolloutEngine(ABC):
    """Samples G completions for each prompt of a batch, in as few backend calls as the backend allows.

    Built by ``vlm_mig.rollout.make_engine``. The trainer calls ``sync_weights(policy)`` after each step's
    optimizer updates, so the next ``generate`` samples from the updated policy.
    """

    config: RolloutConfig
    #: how many times ``sync_weights`` ran (the policy version the engine samples from, counted from construction)
    synced_updates: int = 0

    @abstractmethod
    def generate(self, samples: list[Sample], seeds: list[int] | None = None) -> Rollouts:
        """Return ``len(samples) * G`` completions as one ``Rollouts`` batch; ``seeds`` (one per sample)
        make each completion reproducible on its own, whatever else the batch holds."""

    def sync_weights(self, model: Any) -> None:
        """Make later ``generate`` calls sample from ``model``'s current weights."""
        self._push_weights(model)
        self.synced_updates += 1

    @abstractmethod
    def _push_weights(self, model: Any) -> None:
        """Copy ``model``'s weights into the backend (nothing to do for a backend that runs the policy module)."""


def eos_and_pad(model: Any, processor: Any) -> tuple[list[int], int]:
    """Stop tokens (the generation config's, plus the tokenizer's EOS) and the padding id."""
    tok = tokenizer_of(processor)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    return eos, tok.pad_token_id if tok.pad_token_id is not None else eos[0]


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS of each row (all ones if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return (seen_before == 0).long()


def assemble_rollouts(processor: Any, samples: list[Sample], batch: PromptBatch, completion: torch.Tensor,
                      eos_ids: list[int], pad_id: int, sampler_logp: torch.Tensor | None = None) -> Rollouts:
    """The ``Rollouts`` of sampled ``completion`` ids ([N, T], G rows per prompt of ``batch``, in its order): masks
    through the first EOS, padding after it, texts, and the sampler's log-probs of the tokens (``sampler_logp``
    [N, T], if it reports them). Every backend ends here, so what flows downstream never depends on which one
    sampled."""
    completion = completion.cpu()
    mask = completion_mask(completion, eos_ids)
    completion = completion.masked_fill(mask == 0, pad_id)
    texts = tokenizer_of(processor).batch_decode([c[m.bool()] for c, m in zip(completion, mask)],
                                                  skip_special_tokens=True)
    return Rollouts.grouped(
        samples, batch, completion, mask, texts, eos_ids=tuple(eos_ids),
        sampler_logp=None if sampler_logp is None else sampler_logp.float().cpu().masked_fill(mask == 0, 0.0))


def given_rollouts(samples: list[Sample], prompts: PromptBatch, completions: list[torch.Tensor], texts: list[str],
                   pad_id: int) -> Rollouts:
    """``Rollouts`` of completions that were given, not sampled: one per sample (G = 1), every token of each
    counted as written (none is cut at an EOS). What ``vlm-mig score`` runs the segment and score stages on."""
    width = max([c.numel() for c in completions], default=0)
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(completions), width, dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : c.numel()], mask[i, : c.numel()] = c, 1
    return Rollouts.grouped(samples, prompts, ids, mask, texts)


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
        if len(batch.image_patches) != batch.image_grid_thw.shape[0]:
            raise ValueError("a PromptBatch with images needs image_patches (encode_prompts fills it)")
        patches = torch.tensor(batch.image_patches, dtype=torch.long)
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
        image_patches=[batch.image_patches[j] for j in image_rows] if batch.pixel_values is not None else [],
    )


def concat_prompts(batches: list[PromptBatch], pad_id: int) -> PromptBatch:
    """The rows of ``batches`` in order as one batch, each re-padded on the left (``pad_id``, mask 0, text
    modality) to the longest prompt, with their images."""
    length = max(b.input_ids.shape[1] for b in batches)

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (length - t.shape[1], 0), value=value)

    with_images = all_or_none(batches, "pixel_values", "concat_prompts")
    return PromptBatch(
        input_ids=torch.cat([left(b.input_ids, pad_id) for b in batches]),
        attention_mask=torch.cat([left(b.attention_mask, 0) for b in batches]),
        sample_ids=[s for b in batches for s in b.sample_ids],
        texts=[t for b in batches for t in b.texts],
        mm_token_type_ids=(torch.cat([left(b.mm_token_type_ids, 0) for b in batches])
                           if all_or_none(batches, "mm_token_type_ids", "concat_prompts") else None),
        pixel_values=torch.cat([b.pixel_values for b in batches]) if with_images else None,
        image_grid_thw=torch.cat([b.image_grid_thw for b in batches]) if with_images else None,
        images_per_sample=[n for b in batches for n in b.images_per_sample],
        image_patches=[n for b in batches for n in b.image_patches],
    )


def all_or_none(items: list[Any], name: str, caller: str) -> bool:
    """Whether every item has the field ``name`` set (not None); an error naming ``caller`` when only some do
    (joining them would drop the field of the others)."""
    present = [getattr(x, name) is not None for x in items]
    if any(present) and not all(present):
        raise ValueError(f"{caller}: some parts have {name} and some do not")
    return all(present)
