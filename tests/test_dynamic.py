"""Dynamic sampling (SPEC 4.1): which groups are flat, how a step fills its batch from several draws, and that a
batch joined from the groups of several draws scores exactly as its parts did."""

from __future__ import annotations

import pytest
import torch

from vlm_mig.adapter import adapter_for
from vlm_mig.advantages import AdvantageConfig, flat_groups
from vlm_mig.config import MigConfig
from vlm_mig.data.schema import Sample
from vlm_mig.mig import encode_probe
from vlm_mig.models import load_model, load_processor
from vlm_mig.processing import PromptTemplate, encode_prompts, tokenizer_of
from vlm_mig.rewards import DEFAULT_REWARD_SPECS
from vlm_mig.rl import stages
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rl.dynamic import Draws, fill_batch
from vlm_mig.rollout.base import assemble_rollouts, eos_and_pad
from vlm_mig.steps import StepConfig

G = 2


class OneProcess:
    num_processes, process_index, device = 1, 0, torch.device("cpu")


class FirstOfTwo:
    """Process 0 of two, its partner's values scripted: each ``reduce`` adds the partner's next list."""

    num_processes, process_index, device = 2, 0, torch.device("cpu")

    def __init__(self, partner: list[list[float]]):
        self.partner = list(partner)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        assert reduction == "sum"
        return tensor + torch.tensor(self.partner.pop(0))


def test_flat_groups_by_hand():
    # four groups of two: outcome flat / spread, process spread 0 / 0.05 / 0.5
    r_out = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.0, 0.0])
    r_proc = torch.tensor([0.0, 0.5, 0.3, 0.3, 0.20, 0.25, 0.1, 0.1])
    flat = lambda signal: flat_groups(r_out, r_proc, 2, signal, min_spread=0.1).tolist()  # noqa: E731
    assert flat("none") == [False] * 4
    assert flat("outcome") == [True, False, True, True]
    # group 0: R_proc spreads 0.5 (kept); group 2: 0.05 < 0.1 (dropped); group 3: none
    assert flat("outcome_and_process") == [False, False, True, True]
    # totals: (1, 1.5) 0.5; (0.3, 1.3) 1.0; (2.2, 2.25) 0.05 < 0.1; (0.1, 0.1) 0
    assert flat("total") == [False, False, True, True]
    # one summed reward: a gain in R_proc that cancels a loss in R_out is flat in total, not in the other two
    assert flat_groups(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 2, "total", 0.1).tolist() == [True]
    assert flat_groups(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 2, "outcome_and_process", 0.1).tolist() \
        == [False]
    assert flat_groups(r_out, None, 2, "outcome", 0.1).tolist() == flat("outcome")
    with pytest.raises(ValueError, match="reads R_proc"):
        flat_groups(r_out, None, 2, "total", 0.1)
    with pytest.raises(ValueError, match="filter_groups must be one of"):
        flat_groups(r_out, r_proc, 2, "acc", 0.1)


# ----------------------------------------------------------------------------------------------
# Real batches of the tiny VLM: hand-written completions, so the rows have steps, answers and l_k


@pytest.fixture(scope="module")
def parts(tiny_vl_dir, tmp_path_factory):
    """Three draws of two prompts (images of three sizes, so the prompts differ in length), G = 2 completions each
    (the draws differ in completion width), through the segment, reward and score stages."""
    from PIL import Image

    model, proc = load_model(tiny_vl_dir).eval(), load_processor(tiny_vl_dir)
    tok = tokenizer_of(proc)
    folder = tmp_path_factory.mktemp("images")
    sizes = [(112, 112), (168, 112), (112, 196)]
    template, mig = PromptTemplate(), MigConfig()
    scorer = stages.Scorer(model=model, processor=proc, template=template, mig=mig,
                           probe_ids=encode_probe(tok, mig.probe), step_scores=True, old_logprobs=True)
    step_cfg = StepConfig.of(mig, atomic_pairs=adapter_for(model).atomic_pairs)
    eos, pad = eos_and_pad(model, proc)
    out = []
    for d in range(3):
        samples = []
        for j in range(2):
            path = folder / f"d{d}-{j}.png"
            Image.new("RGB", sizes[(d + j) % 3], (40 * d, 90, 30 * j)).save(path)
            samples.append(Sample(id=f"d{d}-{j}", question="How many objects are there?" + " Count." * j,
                                  answer=str(2 + j), task="count", images=[str(path)]))
        texts = []
        for j in range(2):
            for k in range(G):
                steps = "".join(f"Step {s + 1}: I see {s + k} cubes.\n" for s in range(1 + d + k))
                texts.append(f"<think>\n{steps}</think>\n<answer>{2 + j + k}</answer>" + (tok.eos_token or ""))
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        width = max(map(len, ids))
        completion = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
        batch = RLBatch(rollouts=assemble_rollouts(proc, samples, encode_prompts(proc, samples, template),
                                                   completion, eos, pad))
        stages.segment(batch, tok, step_cfg)
        stages.reward(batch, DEFAULT_REWARD_SPECS)
        stages.score(batch, scorer)
        out.append(batch)
    assert len({b.width for b in out}) == 3 and len({b.rollouts.prompt_ids.shape[1] for b in out}) > 1
    return out, (tok, step_cfg, scorer, pad)


def _rows(batch: RLBatch, group: int) -> list[int]:
    return list(range(group * G, (group + 1) * G))


def test_a_joined_batch_holds_its_parts_rows_and_scores_as_they_did(parts):
    draws, (tok, step_cfg, scorer, pad) = parts
    pick = [(draws[2], [1]), (draws[0], [0, 1]), (draws[1], [0])]
    joined = RLBatch.of_groups(pick, pad)
    assert joined.n == 4 * G and joined.group_size == G
    assert [s.id for s in joined.rollouts.samples] == ["d2-1", "d0-0", "d0-1", "d1-0"]
    row = 0
    for batch, groups in pick:
        for g in groups:
            for i in _rows(batch, g):
                r, j = batch.rollouts, joined.rollouts
                n = int(r.completion_lengths[i])
                assert torch.equal(j.completion_ids[row, :n], r.completion_ids[i, :n]) and j.texts[row] == r.texts[i]
                kept_prompt = j.prompt_ids[row][j.prompt_mask[row].bool()]
                assert torch.equal(kept_prompt, r.prompt_ids[i][r.prompt_mask[i].bool()])
                assert joined.spans[row] == batch.spans[i] and joined.r_out[row] == batch.r_out[i]
                assert torch.equal(joined.m_cot[row, :n], batch.m_cot[i, :n]) and not joined.m_full[row, n:].any()
                assert joined.l0_blind[row] == batch.l0_blind[i]
                row += 1
    # The stages run again on the joined rollouts give the joined fields: l_k, gains, R_proc, old log-probs.
    again = RLBatch(rollouts=joined.rollouts)
    stages.segment(again, tok, step_cfg)
    stages.reward(again, DEFAULT_REWARD_SPECS)
    stages.score(again, scorer)
    assert again.spans == joined.spans and again.rewards == joined.rewards
    for name in ("m_full", "m_cot", "r_out", "acc", "fmt"):
        assert torch.equal(getattr(again, name), getattr(joined, name)), name
    for name in ("l", "gains", "watermark", "r_proc", "old_logp"):
        a, b = getattr(again, name), getattr(joined, name)
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0), (name, (a - b).abs().max())
    assert joined.r_proc.abs().sum() > 0, "the rows must have step scores for this to test them"
    stages.advantages(again, AdvantageConfig(), 0.1, OneProcess())
    with pytest.raises(ValueError, match="join the batches before the advantages"):
        RLBatch.of_groups([(again, [0])], pad)


def _with_outcomes(batch: RLBatch, r_out: list[float], acc: list[float] | None = None) -> RLBatch:
    out = RLBatch.of_groups([(batch, [0, 1])], pad_id=0)  # a copy, so the fixture's batches stay as they are
    out.r_out = torch.tensor(r_out)
    out.acc = torch.tensor(acc if acc is not None else r_out)
    return out


def test_fill_batch_keeps_the_first_groups_that_spread_and_counts_the_rest(parts):
    draws, (*_, pad) = parts
    # draw 0: solved, spread; draw 1: unsolved, flat partial; draw 2: spread, spread
    given = [_with_outcomes(draws[0], [1, 1, 0, 1]), _with_outcomes(draws[1], [0, 0, 0.5, 0.5], [0, 0, 1, 0]),
             _with_outcomes(draws[2], [0, 1, 1, 0])]
    called = []

    def draw(i):
        called.append(i)
        return given[i]

    batch, got = fill_batch(draw, 2, "outcome", 4, 0.1, OneProcess(), pad)
    assert called == [0, 1, 2]
    assert got == Draws(draws=3, groups_drawn=6, groups_kept=2, dropped_solved=1, dropped_unsolved=1, dropped_flat=1,
                        groups_surplus=1, groups_filled=0, prompts_unused=0, rollouts_drawn=12, rollouts_correct=6)
    assert [s.id for s in batch.rollouts.samples] == ["d0-1", "d2-0"]
    assert batch.r_out.tolist() == [0, 1, 0, 1]
    assert got.metrics()["filter/groups_surplus"] == 1.0 and got.metrics()["filter/accuracy_drawn"] == 0.5


def test_fill_batch_trains_on_dropped_groups_when_the_draws_run_out(parts):
    draws, (*_, pad) = parts
    given = [_with_outcomes(draws[0], [1, 1, 0, 0]), _with_outcomes(draws[1], [0, 1, 1, 1])]
    batch, got = fill_batch(lambda i: given[i], 2, "outcome", 2, 0.1, OneProcess(), pad)
    assert (got.draws, got.groups_kept, got.groups_filled) == (2, 1, 1)
    # the kept group first, then the first dropped group drawn
    assert [s.id for s in batch.rollouts.samples] == ["d1-0", "d0-0"]
    # a first draw whose groups all spread is the batch itself, untouched
    first = _with_outcomes(draws[2], [0, 1, 1, 0])
    same, got = fill_batch(lambda i: first, 2, "outcome", 4, 0.1, OneProcess(), pad)
    assert same is first and got.draws == 1 and got.groups_kept == 2


def test_a_full_process_draws_no_more_rollouts_but_keeps_the_draw_count_of_the_others(parts):
    draws, (*_, pad) = parts
    spread = _with_outcomes(draws[0], [0, 1, 1, 0])
    called = []
    # Round 1: this process is full, its partner still needs 1 group; round 2: the partner is full too. Then the
    # counts (drawn, kept, solved, unsolved, flat, surplus, filled, unused, rollouts drawn and right) of the
    # partner are added.
    dist = FirstOfTwo([[1.0], [0.0], [4.0, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 8.0, 1.0]])
    batch, got = fill_batch(lambda i: called.append(i) or spread, 2, "outcome", 4, 0.1, dist, pad)
    assert called == [0] and batch is spread
    assert got == Draws(draws=2, groups_drawn=6, groups_kept=4, dropped_solved=0, dropped_unsolved=2,
                        dropped_flat=0, groups_surplus=0, groups_filled=0, prompts_unused=2, rollouts_drawn=12,
                        rollouts_correct=3)
