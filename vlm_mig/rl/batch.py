"""``RLBatch``: one RL step's rollouts and everything the stages derive from them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from vlm_mig.advantages import Advantages
from vlm_mig.data.schema import Sample
from vlm_mig.losses import LossInputs
from vlm_mig.rewards import Rewards
from vlm_mig.rollout import Rollouts
from vlm_mig.steps import StepSpans


@dataclass
class RLBatch:
    """One row per completion, grouped G per prompt as in ``Rollouts``. The stages of ``vlm_mig.rl.stages`` fill
    the fields in turn (rollout -> segment -> reward -> score -> advantages -> update); none re-tokenizes text.

    Tensors are on the CPU; the update moves each micro-batch's slice to the device.
    """

    rollouts: Rollouts  #: rollout: prompts, completion ids and masks, texts, position ids

    spans: list[StepSpans] = field(default_factory=list)  #: segment: steps, think and answer spans of each row
    m_full: torch.Tensor | None = None  #: segment: [N, T] bool, every completion token through EOS (M_full)
    m_cot: torch.Tensor | None = None  #: segment: [N, T] bool, the tokens of the steps S_1..S_K (M_cot)

    rewards: Rewards | None = None  #: reward: R_out and each of its components
    r_out: torch.Tensor | None = None  #: reward: [N] R_out
    acc: torch.Tensor | None = None  #: reward: [N] accuracy (0 where ungraded)
    fmt: torch.Tensor | None = None  #: reward: [N] format

    l: torch.Tensor | None = None  #: score: [N, K_max + 1] l_0..l_K, 0 past each row's K (None: not scored)
    gains: torch.Tensor | None = None  #: score: [N, K_max] g_1..g_K ([N, 0] when not scored)
    watermark: torch.Tensor | None = None  #: score: [N, K_max + 1] the watermark the gains were read from, 0 past K
    r_proc: torch.Tensor | None = None  #: score: [N] R_proc (0 when not scored)
    l0_blind: list[float | None] = field(default_factory=list)  #: score: l_0 with the images removed (None: not)
    old_logp: torch.Tensor | None = None  #: score: [N, T] log pi_old (None: the update's own detached pass)
    ref_logp: torch.Tensor | None = None  #: score: [N, T] log pi_ref (None: no reference model)

    adv: Advantages | None = None  #: advantages: sequence and token advantages
    m_proc: torch.Tensor | None = None  #: advantages: [N, T] the tokens the process advantage covers

    #: update: [N, T] the policy's entropy at each completion position (rollout temperature, the first pass's,
    #: detached), 0 on padding (None: the learner computed none)
    entropy: torch.Tensor | None = None

    @classmethod
    def of_groups(cls, parts: list[tuple[RLBatch, list[int]]], pad_id: int) -> RLBatch:
        """One batch of the groups ``groups`` of each part, in that order, with every field the parts have filled
        (dynamic sampling: the kept groups of several draws, after reward and, where the filter reads R_proc,
        score). Per-token fields are re-padded to the widest completion, step fields to the most steps (0, False:
        what the stages write on padding). Fields of the later stages (advantages, update) must still be empty."""
        rows = [torch.tensor(b.rollouts.rows_of(groups), dtype=torch.long) for b, groups in parts]

        def pick(lists: list[list]) -> list:  # the chosen rows of each part's list, in order
            return [v[i] for v, idx in zip(lists, rows) for i in idx.tolist()]

        out = cls(rollouts=Rollouts.of_groups([(b.rollouts, groups) for b, groups in parts], pad_id))
        for f in fields(cls):
            values = [getattr(b, f.name) for b, _ in parts]
            if f.name == "rollouts" or all(v is None or (isinstance(v, list) and not v) for v in values):
                continue
            if f.name in ("adv", "m_proc", "entropy"):
                raise ValueError(f"RLBatch.of_groups: {f.name} is filled; join the batches before the advantages")
            if any(v is None for v in values):
                raise ValueError(f"RLBatch.of_groups: {f.name} is filled in some parts and not in others")
            if f.name == "rewards":
                value = Rewards(total=pick([v.total for v in values]),
                                components={k: pick([v.components[k] for v in values]) for k in values[0].components})
            elif isinstance(values[0], list):
                value = pick(values)
            else:  # [N] or [N, columns]: columns padded to the widest part
                width = max(v.shape[1] for v in values) if values[0].dim() == 2 else 0
                value = torch.cat([F.pad(v[idx], (0, width - v.shape[1])) if v.dim() == 2 else v[idx]
                                   for v, idx in zip(values, rows)])
            setattr(out, f.name, value)
        return out

    @property
    def n(self) -> int:
        """Rows (completions)."""
        return self.rollouts.completion_ids.shape[0]

    @property
    def width(self) -> int:
        """T, the padded completion length."""
        return self.rollouts.completion_ids.shape[1]

    @property
    def group_size(self) -> int:
        """G, completions per prompt."""
        return self.rollouts.num_generations

    @property
    def samples(self) -> list[Sample]:
        """The prompt sample of each row."""
        return [self.rollouts.sample_of(i) for i in range(self.n)]

    @property
    def K(self) -> torch.Tensor:
        """[N] number of steps of each row."""
        return torch.tensor([sp.K for sp in self.spans])

    @property
    def cuts(self) -> list[list[int]]:
        """Per row, the completion-relative prefix ends c_0..c_K its l_k are scored at (none without a think)."""
        return [sp.prefix_ends if sp.think else [] for sp in self.spans]

    def loss_inputs(self, rows: list[int], device: torch.device, adv_out: torch.Tensor, adv_proc: torch.Tensor,
                    gate: torch.Tensor) -> LossInputs:
        """Rows ``rows`` as ``total_loss`` takes them, on ``device``: the masks, the given token advantages of those
        rows, the old and reference log-probs, the SFT ``gate`` of the whole batch (sliced here), which rows were
        truncated (``Rollouts.truncated``) and the sampler's log-probs of the tokens (``Rollouts.sampler_logp``)."""
        idx = torch.tensor(rows, dtype=torch.long)

        def on(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx].to(device)

        return LossInputs(m_full=on(self.m_full), m_cot=on(self.m_proc), adv_out=adv_out.to(device),
                          adv_proc=adv_proc.to(device), old_logp=on(self.old_logp), ref_logp=on(self.ref_logp),
                          acc=on(self.acc), fmt=on(self.fmt), r_proc=on(self.r_proc), gate=on(gate),
                          truncated=on(self.rollouts.truncated), sampler_logp=on(self.rollouts.sampler_logp))
