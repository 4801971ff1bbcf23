"""Rollout engine on the tiny models: batching of groups, EOS masks, left padding; old log-probs from the
teacher-forced pass callers run on the engine's rollouts."""

from __future__ import annotations

import torch

from vlm_mig.data.schema import Sample
from vlm_mig.forward import teacher_forced_logprobs
from vlm_mig.models import load_model, load_processor
from vlm_mig.processing import encode_prompts
from vlm_mig.rollout import HFRolloutEngine, RolloutConfig, repeat_prompts
from vlm_mig.rollout.hf import completion_mask


def test_completion_mask_runs_through_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_repeat_prompts_repeats_images_with_their_rows(tiny_vl_dir, make_image):
    proc = load_processor(tiny_vl_dir)
    samples = [Sample(id="two", question="?", images=[str(make_image("a.png")), str(make_image("b.png", (168, 112)))],
                      answer="1"),
               Sample(id="none", question="text only here", answer="1"),
               Sample(id="one", question="?", images=[str(make_image("c.png", color=(1, 2, 3)))], answer="1")]
    batch = encode_prompts(proc, samples)
    rep = repeat_prompts(batch, 3)
    assert rep.sample_ids == ["two"] * 3 + ["none"] * 3 + ["one"] * 3
    assert rep.image_grid_thw.shape[0] == 3 * 3
    assert rep.pixel_values.shape[0] == 3 * batch.pixel_values.shape[0]
    n0 = int(batch.image_grid_thw[:2].prod(-1).sum())
    assert torch.equal(rep.pixel_values[:n0], batch.pixel_values[:n0])
    assert torch.equal(rep.pixel_values[n0 : 2 * n0], batch.pixel_values[:n0])
    assert torch.equal(rep.pixel_values[-64:], batch.pixel_values[-64:])


def _engine(model_dir, **cfg):
    torch.manual_seed(0)
    model = load_model(model_dir)
    return HFRolloutEngine(model, load_processor(model_dir), RolloutConfig(**cfg))


def test_hf_engine_samples_groups_and_teacher_forced_logprobs(tiny_vl_dir, make_image):
    engine = _engine(tiny_vl_dir, num_generations=4, max_new_tokens=12)
    samples = [Sample(id="a", question="How many items?", images=[str(make_image("a.png"))], answer="3"),
               Sample(id="b", question="How many different items are there?", images=[str(make_image("b.png"))],
                      answer="2")]
    r = engine.generate(samples)
    assert r.completion_ids.shape[0] == 8 and r.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.completion_ids.shape[1] <= 12 and len(r.texts) == 8
    assert not hasattr(r, "old_logprobs")  # sampling only: log-probs are the caller's pass
    old = teacher_forced_logprobs(engine.model, r)
    assert old.shape == r.completion_ids.shape
    assert (old[r.completion_mask == 0] == 0).all()
    assert (old[r.completion_mask == 1] < 0).all()
    # Recompute one row's log-probs with a plain forward over its own unpadded prompt + completion.
    i = 5
    n = int(r.completion_mask[i].sum())
    one = encode_prompts(engine.processor, [samples[1]])
    ids = torch.cat([one.input_ids[0], r.completion_ids[i, :n]]).unsqueeze(0)
    mm = torch.cat([one.mm_token_type_ids[0], torch.zeros(n, dtype=one.mm_token_type_ids.dtype)]).unsqueeze(0)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                              pixel_values=one.pixel_values, image_grid_thw=one.image_grid_thw).logits[0]
    ref = logits[-n - 1 : -1].float().log_softmax(-1).gather(-1, r.completion_ids[i, :n, None]).squeeze(-1)
    assert torch.allclose(ref, old[i, :n], atol=1e-4)


def test_logprobs_follow_the_sampling_temperature(tiny_vl_dir, make_image):
    """At T != 1 the rollouts come from softmax(logits / T): the old log-probs (and so the ratio and the loss
    pass, which share ``packed_forward``) are taken under it, while the step scores l_k stay at T = 1."""
    from vlm_mig.forward import ScoreRow, packed_forward, prompt_pieces

    engine = _engine(tiny_vl_dir, num_generations=2, max_new_tokens=10, temperature=0.5)
    sample = Sample(id="a", question="How many items?", images=[str(make_image("a.png"))], answer="3")
    r = engine.generate([sample])
    cold = teacher_forced_logprobs(engine.model, r, temperature=0.5)
    plain = teacher_forced_logprobs(engine.model, r)
    i, n = 1, int(r.completion_mask[1].sum())
    one = encode_prompts(engine.processor, [sample])
    ids = torch.cat([one.input_ids[0], r.completion_ids[i, :n]]).unsqueeze(0)
    mm = torch.cat([one.mm_token_type_ids[0], torch.zeros(n, dtype=one.mm_token_type_ids.dtype)]).unsqueeze(0)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                              pixel_values=one.pixel_values, image_grid_thw=one.image_grid_thw).logits[0, -n - 1 : -1]
    tgt = r.completion_ids[i, :n, None]
    assert torch.allclose(cold[i, :n], (logits.float() / 0.5).log_softmax(-1).gather(-1, tgt).squeeze(-1), atol=1e-4)
    assert torch.allclose(plain[i, :n], logits.float().log_softmax(-1).gather(-1, tgt).squeeze(-1), atol=1e-4)
    assert not torch.allclose(cold[i, :n], plain[i, :n], atol=1e-3)
    # l_k of a scored row do not move with the temperature; its completion log-probs do.
    piece = prompt_pieces(engine.model, one)[0]
    row = ScoreRow(prompt=piece, completion_ids=r.completion_ids[i, :n], cuts=[0, n], variants=[torch.tensor([5])])
    with torch.no_grad():
        at1, at05 = (packed_forward(engine.model, [row], torch.tensor([6, 7]), temperature=t)[0] for t in (1.0, 0.5))
    assert torch.equal(at1.l, at05.l)
    assert torch.allclose(at05.completion_logprobs, cold[i, :n], atol=1e-5)
    assert RolloutConfig(temperature=0.0).logprob_temperature == 1.0
    assert RolloutConfig(temperature=0.7).logprob_temperature == 0.7


def test_entropy_of_the_packed_pass_equals_a_plain_forward_at_the_rollout_temperature(tiny_vl_dir, make_image):
    """``packed_forward(entropy=True)`` gives ``-(softmax * log_softmax).sum(-1)`` of ``logits / T`` at every
    completion position, as a plain forward over the row does; the same with gradient and probe copies (the update's
    pass, its copies on the cache), where the entropy carries no gradient and the log-probs do not move."""
    from vlm_mig.forward import ScoreRow, packed_forward, prompt_pieces

    engine = _engine(tiny_vl_dir, num_generations=2, max_new_tokens=10, temperature=0.7)
    sample = Sample(id="a", question="How many items?", images=[str(make_image("a.png"))], answer="3")
    r = engine.generate([sample])
    one = encode_prompts(engine.processor, [sample])
    piece = prompt_pieces(engine.model, one)[0]
    rows, want = [], []
    for i in range(2):
        n = int(r.completion_mask[i].sum())
        ids = torch.cat([one.input_ids[0], r.completion_ids[i, :n]]).unsqueeze(0)
        mm = torch.cat([one.mm_token_type_ids[0], torch.zeros(n, dtype=one.mm_token_type_ids.dtype)]).unsqueeze(0)
        with torch.no_grad():
            logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                                  pixel_values=one.pixel_values,
                                  image_grid_thw=one.image_grid_thw).logits[0, -n - 1 : -1].float() / 0.7
        want.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
        rows.append(ScoreRow(prompt=piece, completion_ids=r.completion_ids[i, :n], cuts=[0, n],
                             variants=[torch.tensor([5])]))
    assert not torch.allclose(want[0], want[0].mean())  # a real per-token quantity
    with torch.no_grad():
        plain = packed_forward(engine.model, rows, torch.tensor([6, 7]), temperature=0.7)
        cold = packed_forward(engine.model, rows, torch.tensor([6, 7]), temperature=0.7, entropy=True)
    engine.model.train()
    try:  # the update's pass: with gradient, the copies in a call of their own on the cache
        hot = packed_forward(engine.model, rows, torch.tensor([6, 7]), temperature=0.7, entropy=True)
    finally:
        engine.model.eval()
    for i in range(2):
        assert plain[i].completion_entropy is None
        assert torch.allclose(cold[i].completion_entropy, want[i], atol=1e-4)
        assert torch.allclose(hot[i].completion_entropy, want[i], atol=1e-4)
        assert not hot[i].completion_entropy.requires_grad and hot[i].completion_logprobs.requires_grad
        assert torch.equal(cold[i].completion_logprobs, plain[i].completion_logprobs)
        assert torch.equal(cold[i].l, plain[i].l)
    # chunks of 3 rows give what one chunk gives, with the rivals beside the entropy
    from vlm_mig.adapter import adapter_for
    from vlm_mig.forward import token_logprobs

    h = torch.randn(7, adapter_for(engine.model).output_head(engine.model).weight.shape[1])
    tgt = torch.randint(0, 10, (7,))
    lp, rival, ent = token_logprobs(engine.model, h, tgt, chunk=3, temperature=0.7, rival=True, entropy=True)
    lp1, ent1 = token_logprobs(engine.model, h, tgt, temperature=0.7, entropy=True)
    assert torch.allclose(lp, lp1, atol=1e-6) and torch.allclose(ent, ent1, atol=1e-5) and rival.shape == (7,)
    assert (ent1 >= 0).all()


def test_hf_engine_text_model_greedy_is_deterministic(tiny_text_dir):
    engine = _engine(tiny_text_dir, num_generations=2, max_new_tokens=8, temperature=0.0)
    r = engine.generate([Sample(id="t", question="What is 2 + 3?", answer="5")])
    assert torch.equal(r.completion_ids[0], r.completion_ids[1])
    assert r.prompts.pixel_values is None


def test_seeded_sampling_is_per_rollout_and_matches_the_distribution(tiny_vl_dir, make_image):
    from vlm_mig.rollout.sampling import SeededSampling, top_p_filter

    engine = _engine(tiny_vl_dir, num_generations=2, max_new_tokens=10)
    a = Sample(id="a", question="How many items?", images=[str(make_image("a.png"))], answer="3")
    b = Sample(id="b", question="Count the objects, please.", images=[str(make_image("b.png", color=(9, 9, 9)))],
               answer="2")
    long = Sample(id="c", question="A much longer question that pads every other prompt of its batch on the left?",
                  images=[str(make_image("c.png", color=(50, 9, 9)))], answer="2")
    both = engine.generate([a, b], seeds=[11, 22])
    alone = engine.generate([b], seeds=[22])
    padded = engine.generate([long, b], seeds=[33, 22])
    assert padded.prompt_mask[2, 0] == 0, "b is left padded in this batch"
    n = int(alone.completion_mask[0].sum())
    # b's rollouts are identical alone, after a, or padded next to a longer prompt; its two copies differ.
    assert torch.equal(both.completion_ids[2, :n], alone.completion_ids[0, :n])
    assert torch.equal(padded.completion_ids[2, :n], alone.completion_ids[0, :n])
    assert not torch.equal(both.completion_ids[2], both.completion_ids[3])
    # Gumbel-max on tempered, top-p-filtered logits samples softmax(logits / T) restricted to the nucleus.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    for s in range(4000):
        counts[SeededSampling([s], temperature=0.7)(torch.zeros(1, 3, dtype=torch.long), logits).argmax()] += 1
    assert torch.allclose(counts / 4000, (logits[0] / 0.7).softmax(-1), atol=0.03)
    kept = top_p_filter(logits, 0.8)
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
