"""Per-rollout seeded sampling: a completion depends on its own seed, not on what else is in the batch.

``model.generate`` samples every row from one global RNG stream, so the tokens of a rollout change with
the batch size, the order of prompts and the number of processes. ``SeededSampling`` instead adds Gumbel
noise drawn from a generator seeded by (rollout seed, position) to the tempered, top-p-filtered logits and
lets greedy decoding take the argmax: by the Gumbel-max trick that is an exact sample from the same
distribution, and it is reproducible per rollout. That makes a 2-process run equal a 1-process run with
the same global batch, and a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LogitsProcessor


def rollout_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (e.g. run seed, step, sample id, copy index)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the token that crosses top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class SeededSampling(LogitsProcessor):
    """Temperature, top-p, then per-row Gumbel noise; use with greedy decoding (``do_sample=False``)."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("seeded sampling needs temperature > 0 (use greedy decoding for temperature 0)")
        self.seeds = list(seeds)
        self.temperature = temperature
        self.top_p = top_p
        self._prompt_width: int | None = None  # padded prompt width, set on the first call of a generate

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.seeds)} seeds")
        logits = top_p_filter(scores.float() / self.temperature, self.top_p)
        # Count generated tokens only: the padded prompt width depends on the other prompts of the batch.
        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1]
        step = input_ids.shape[1] - self._prompt_width
        noise = torch.empty_like(logits)
        gen = torch.Generator(device=logits.device)
        for i, seed in enumerate(self.seeds):
            gen.manual_seed((seed + step * 0x9E3779B97F4A7C15) % (2**63))
            u = torch.rand(logits.shape[1], generator=gen, device=logits.device, dtype=torch.float32)
            noise[i] = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
        return logits + noise
