"""Per-rollout seeded sampling: a completion depends on its own seed, not on what else is in the batch.

``model.generate`` samples every row from one global RNG stream, so the tokens of a rollout change with
the batch size, the order of prompts and the number of processes. ``SeededSampling`` instead adds Gumbel
noise to the tempered, top-p-filtered logits and lets greedy decoding take the argmax: by the Gumbel-max
trick that is an exact sample from the same distribution, and it is reproducible per rollout. That makes a
2-process run equal a 1-process run with the same global batch, and a resumed run equal an uninterrupted one.

The noise is counter-based: the uniform of token ``v`` at generated position ``t`` of the rollout with seed
``s`` is a splitmix64 hash of ``(s, t, v)`` (``gumbel_noise``), computed for all rows and tokens in a few
int64 tensor ops on the logits' device. No generator, no loop over rows, and nothing but the three numbers
decides a value.
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


#: splitmix64's constants (torch has no uint64 arithmetic: int64 holds the same bits, and its products wrap alike)
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_MASK64 = 2**64 - 1
_ONE_BITS = 0x3FF << 52  #: the bits of the double 1.0
#: elements per block on a CPU: the ~15 elementwise passes of the hash stay in cache instead of streaming memory
_CPU_BLOCK = 1 << 17


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    x &= _MASK64
    return x - 2**64 if x >= 2**63 else x


def mix64(z: int) -> int:
    """splitmix64's finaliser on one Python int, as an unsigned 64-bit value (the reference of ``_mix64_``)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _mix64_(z: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor, in place and bit for bit (``tmp``: scratch of z's shape).

    ``>>`` on int64 is arithmetic, so each shift is masked to a logical one before the xor."""
    tmp = torch.empty_like(z) if tmp is None else tmp
    for shift, mul in ((30, _MUL1), (27, _MUL2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - shift)) - 1))
        if mul is not None:
            z.mul_(_signed(mul))
    return z


def gumbel_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] float32 standard Gumbel noise on ``seeds``' device; entry ``(i, v)`` is a function of
    ``(seeds[i], step, v)`` alone, so a row's noise is the same in any batch, at any position in it.

    Row key ``k = mix64(seed + mix64(step + 1))``; token ``v`` takes output ``v + 1`` of the splitmix64 stream
    started at ``k``, ``x = mix64(k + (v + 1) * golden)``, whose top 52 bits ``b`` give the uniform
    ``u = (b + 0.5) / 2**52`` (exact in float64, strictly inside (0, 1)) and the noise ``-log(-log(u))``.
    All rows and tokens at once in int64 tensor ops; on a CPU in column blocks that stay in cache."""
    key = _mix64_(seeds.to(torch.long) + _signed(mix64(step + 1)))
    rows = key.shape[0]
    out = torch.empty(rows, vocab, dtype=torch.float32, device=key.device)
    if rows == 0 or vocab == 0:
        return out
    cols = vocab if key.device.type != "cpu" else min(vocab, max(1, _CPU_BLOCK // rows))
    offsets = torch.arange(1, cols + 1, dtype=torch.long, device=key.device).mul_(_signed(_GOLDEN))
    z = torch.empty(rows, cols, dtype=torch.long, device=key.device)
    tmp = torch.empty_like(z)
    for start in range(0, vocab, cols):  # one block unless on a CPU with a large vocabulary
        n = min(vocab, start + cols) - start
        zb, tb = z[:, :n], tmp[:, :n]
        torch.add(key[:, None], offsets[None, :n], out=zb)
        if start:
            zb.add_(_signed(start * _GOLDEN))
        _mix64_(zb, tb)
        # The top 52 bits as the mantissa of a double in [1, 2): 1 + b / 2**52; minus (1 - 2**-53) is exact.
        zb.bitwise_right_shift_(12).bitwise_and_((1 << 52) - 1).bitwise_or_(_ONE_BITS)
        ub = zb.view(torch.float64).sub_(1.0 - 2.0**-53).log_()  # log(u) < 0, in float64 near u = 1
        out[:, start : start + n].copy_(ub).neg_().log_().neg_()
    return out


class SeededSampling(LogitsProcessor):
    """Temperature, top-p, then per-row Gumbel noise; use with greedy decoding (``do_sample=False``).

    Row ``i``'s noise at its ``t``-th generated token depends only on ``(seeds[i], t)``: ``t`` counts the
    tokens generated so far (0 at the first call of a ``generate``), never the padded prompt width.

    It also keeps what a sampler reports: the log-prob of each sampled token under the distribution it was drawn
    from (tempered, top-p filtered), read at the next call once the token is known (``sampled_logprobs``)."""

    def __init__(self, seeds: list[int], temperature: float = 1.0, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("seeded sampling needs temperature > 0 (use greedy decoding for temperature 0)")
        self.seeds = list(seeds)
        if any(not 0 <= s < 2**63 for s in self.seeds):
            raise ValueError("seeds must lie in [0, 2**63) (see rollout_seed)")
        self.temperature = temperature
        self.top_p = top_p
        self._prompt_width: int | None = None  # padded prompt width, set on the first call of a generate
        self._seed_tensor: torch.Tensor | None = None  # the seeds on the logits' device, made once
        self._logp: torch.Tensor | None = None  # [N, V] the last call's sampling log-probs
        self._taken: list[torch.Tensor] = []  # [N] per generated token: the sampled token's log-prob

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.seeds)} seeds")
        logits = top_p_filter(scores.float() / self.temperature, self.top_p)
        # Count generated tokens only: the padded prompt width depends on the other prompts of the batch.
        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1]
        step = input_ids.shape[1] - self._prompt_width
        if step:  # the token the previous call sampled is the last input now
            self._taken.append(self._logp.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._logp = logits.log_softmax(-1)
        if self._seed_tensor is None or self._seed_tensor.device != logits.device:
            self._seed_tensor = torch.tensor(self.seeds, dtype=torch.long, device=logits.device)
        return logits.add_(gumbel_noise(self._seed_tensor, step, logits.shape[1]))

    def sampled_logprobs(self, completion: torch.Tensor) -> torch.Tensor:
        """[N, T] log-prob of each token of ``completion`` (the ids ``generate`` returned after the prompt) under
        the distribution it was sampled from; the last token's comes from the last call's distribution."""
        taken = list(self._taken)
        if self._logp is not None and len(taken) < completion.shape[1]:
            taken.append(self._logp.gather(-1, completion[:, len(taken) : len(taken) + 1].to(self._logp.device))
                         .squeeze(-1))
        if len(taken) != completion.shape[1]:
            raise ValueError(f"{len(taken)} sampled tokens recorded for a completion of {completion.shape[1]}")
        return torch.stack(taken, dim=1) if taken else torch.zeros(completion.shape, dtype=torch.float32)
