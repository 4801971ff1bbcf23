"""MIG: the watermark/gain math by hand, and the packed one-pass scorer against K+1 naive passes."""

from __future__ import annotations

import pytest
import torch

from vlm_mig.advantages import group_normalize
from vlm_mig.data.schema import Sample
from vlm_mig.forward import ScoreRow, prompt_pieces, score_rows
from vlm_mig.mig import (
    answer_scores,
    credited_watermark,
    encode_answers,
    process_reward,
    step_gains,
    watermark,
)
from vlm_mig.models import load_model, load_processor
from vlm_mig.processing import encode_prompts, tokenizer_of
from vlm_mig.prompts import DEFAULT_PROBE


def test_watermark_gains_and_process_reward_by_hand():
    l = torch.tensor([[-3.0, -2.0, -2.5, -1.0, -1.0], [-1.0, -2.0, -3.0, -0.5, 0.0]])
    assert watermark(l).tolist() == [[-3.0, -2.0, -2.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -0.5, 0.0]]
    # Row 0: +1 (new record), 0 (detour below the record), +1 (record), 0 (repeat).
    assert step_gains(l).tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    assert process_reward(l).tolist() == [2.0, 1.0]
    # Ragged K: row 1 has K = 1, and a row with K = 0 gets R_proc = 0.
    valid = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    l = torch.tensor([[0.0, 1.0, 3.0], [-1.0, 2.0, 9.0], [5.0, 9.0, 9.0]])
    assert step_gains(l, valid).tolist() == [[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]
    assert process_reward(l, valid).tolist() == [3.0, 3.0, 0.0]


def test_min_gain_and_raw_gains_by_hand():
    l = torch.tensor([-3.0, -2.98, -2.96, -2.94, -1.0, -1.02])
    # A record must beat the watermark by min_gain: three +0.02 steps are noise until they add up to 0.06.
    assert watermark(l, min_gain=0.05).tolist() == pytest.approx([-3.0, -3.0, -3.0, -2.94, -1.0, -1.0])
    assert step_gains(l, min_gain=0.05, records="all").tolist() == pytest.approx([0.0, 0.0, 0.06, 1.94, 0.0])
    assert step_gains(l, records="all").tolist() == pytest.approx([0.02, 0.02, 0.02, 1.94, 0.0])
    # Kept to the last step (-1.02): the last record keeps only what l_K keeps.
    assert step_gains(l, records="kept").tolist() == pytest.approx([0.02, 0.02, 0.02, 1.92, 0.0])
    # No watermark (the ablation): the raw difference, negative too; |d| < min_gain counts as 0.
    assert step_gains(l, use_watermark=False).tolist() == pytest.approx([0.02, 0.02, 0.02, 1.94, -0.02])
    assert step_gains(l, use_watermark=False, min_gain=0.05).tolist() == pytest.approx([0.0, 0.0, 0.0, 1.94, 0.0])
    assert float(process_reward(l, use_watermark=False)) == pytest.approx(-1.02 + 3.0)  # l_K - l_0
    valid = torch.tensor([True, True, True, False, False, False])
    assert step_gains(l, valid, min_gain=0.05).tolist() == [0.0] * 5
    assert step_gains(l, valid, use_watermark=False).tolist() == pytest.approx([0.02, 0.02, 0.0, 0.0, 0.0])


def test_kept_records_pay_only_what_the_last_step_keeps():
    """A completion that states the gold number, then answers something else, must not out-earn one that carries
    the count to its answer. Under ``records: all`` (SPEC's watermark) the restated number's record counts in
    full; under ``kept`` the watermark is capped at l_K."""
    restate = [-3.0, -0.5, -2.5]  # "I see 2 cubes" (gold 2) ... "So there is 1 large cube"
    carry = [-3.0, -2.0, -0.6]  # the counts, then "So there are 2 large cubes"
    l = torch.tensor([restate, carry])
    assert process_reward(l, records="all").tolist() == pytest.approx([2.5, 2.4])  # the defect: restate > carry
    assert process_reward(l, records="kept").tolist() == pytest.approx([0.5, 2.4])  # max(0, l_K - l_0)
    # Step credit: a record counts up to the level kept; recovering from a detour still earns nothing.
    assert step_gains(torch.tensor([0.0, 3.0, 1.0, 2.0]), records="kept").tolist() == [2.0, 0.0, 0.0]
    assert step_gains(torch.tensor([0.0, 3.0, 1.0, 2.0]), records="all").tolist() == [3.0, 0.0, 0.0]
    assert step_gains(torch.tensor([0.0, 1.0, -1.0]), records="kept").tolist() == [0.0, 0.0]
    # Ragged K: l_K is each row's last real score.
    valid = torch.tensor([[True, True, True], [True, True, False]])
    l = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, -9.0]])
    assert step_gains(l, valid, records="kept").tolist() == [[1.0, 0.0], [2.0, 0.0]]
    assert credited_watermark(l, valid, records="kept")[0].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="records"):
        step_gains(l, records="some")


def test_trajectory_credit_ranks_by_the_best_l_k_whatever_the_watermark_does():
    # l_0 is shared by the group (same prompt, same think opener), so under records "all" R_proc = max_k l_k - l_0
    # and A_proc is the group-normalised max_k l_k: detours below the record change nothing under trajectory
    # credit. Under "kept" (the default) it is max(0, l_K - l_0): what the completion ends on.
    l = torch.tensor([[-2.0, -1.0, -3.0, -0.5], [-2.0, -2.5, -1.5, -1.6], [-2.0, -0.2, -2.2, -2.1]])
    a = group_normalize(process_reward(l, records="all"), 3)
    assert torch.allclose(a, group_normalize(l.max(-1).values, 3), atol=1e-6)
    kept = group_normalize(process_reward(l), 3)
    assert torch.allclose(kept, group_normalize((l[:, -1] - l[:, 0]).clamp(min=0), 3), atol=1e-6)
    # Without the watermark it is the last score that counts.
    assert torch.allclose(group_normalize(process_reward(l, use_watermark=False), 3),
                          group_normalize(l[:, -1], 3), atol=1e-6)


def test_answer_scores_by_hand():
    # Two copies: "120" (3 digit tokens, one number) and "1 kg" (a number, then a word token).
    lp = torch.tensor([-0.1, -3.0, -0.3, -0.2, -1.0])
    copy = torch.tensor([0, 0, 0, 1, 1])
    unit = torch.tensor([0, 0, 0, 0, 1])
    assert answer_scores(lp, copy, 2, "mean", unit).tolist() == pytest.approx([-3.4 / 3, -0.6])
    assert answer_scores(lp, copy, 2, "sum", unit).tolist() == pytest.approx([-3.4, -1.2])
    # digits: a number counts once, as its least likely token; other tokens count one each.
    assert answer_scores(lp, copy, 2, "digits", unit).tolist() == pytest.approx([-3.0, -0.6])
    assert answer_scores(lp, copy, 2, "digits").tolist() == pytest.approx([-3.4 / 3, -0.6])  # no units: mean
    with pytest.raises(ValueError, match="answer score"):
        answer_scores(lp, copy, 2, "median")


def test_encode_answers_splits_at_the_seam_and_marks_numbers(tiny_text_dir):
    tok = tokenizer_of(load_processor(tiny_text_dir))
    enc = encode_answers(tok, ["120,000", "3 kg", "the"], "So ", opener="\n")
    for v, probe, ans in zip(["120,000", "3 kg", "the"], enc["probes"], enc["variants"]):
        assert torch.cat([probe, ans]).tolist() == tok.encode("So " + v, add_special_tokens=False)
    # "So the" is S|o|Ġthe: the probe's space belongs to the answer's first token.
    assert tok.convert_ids_to_tokens(enc["variants"][2].tolist()) == ["Ġthe"]
    assert enc["units"][0].tolist() == [0] * 7  # 1 2 0 , 0 0 0: one number
    assert enc["units"][1].tolist()[0] != enc["units"][1].tolist()[-1]  # "3" and "kg" are separate units
    assert torch.cat([enc["l0_probes"][0], enc["variants"][0]]).tolist() == tok.encode(
        "\nSo 120,000", add_special_tokens=False)
    with pytest.raises(ValueError, match="empty"):
        encode_answers(tok, [""], "So ")


def test_opener_and_answer_scores_equal_naive_passes(tiny_text_dir):
    """Rows from encode_answers (joint probe+answer ids, copy 0 behind the opener): every answer score of the
    packed pass equals the same reduction of naive per-sequence log-probs."""
    model, processor = load_model(tiny_text_dir), load_processor(tiny_text_dir)
    tok = tokenizer_of(processor)
    sample = Sample(id="t", question="Tom has 5 apples and buys 3. How many?", answer="18", task="numeric",
                    answer_variants=["18 apples"])
    ids, cuts = _completion(tok, ["5 + 3 = 8.", "So Tom has 18 apples."], "18")
    batch = encode_prompts(processor, [sample])
    with torch.no_grad():
        (p,) = prompt_pieces(model, batch)
        enc = encode_answers(tok, sample.variants, DEFAULT_PROBE, opener="\n")
        row = ScoreRow(prompt=p, completion_ids=ids, cuts=cuts, **enc)
        no_probe = torch.zeros(0, dtype=torch.long)  # every copy's context comes from enc
        packed = {m: score_rows(model, [row], no_probe, answer_score=m)[0] for m in ("mean", "sum", "digits", "margin")}
    for k, c in enumerate(cuts):
        for j, v in enumerate(enc["variants"]):
            ctx = enc["l0_probes"][j] if k == 0 else enc["probes"][j]
            seq = torch.cat([batch.input_ids[0], ids[:c], ctx, v]).unsqueeze(0)
            with torch.no_grad():
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].float()
            logp = logits[-v.numel() - 1 : -1].log_softmax(-1)
            lp = logp.gather(-1, v.unsqueeze(-1)).squeeze(-1)
            # margin: each answer token against the most likely other token at its position.
            rival = logp.scatter(-1, v.unsqueeze(-1), float("-inf")).max(-1).values
            for mode, res in packed.items():
                want = answer_scores(lp - rival if mode == "margin" else lp, torch.zeros_like(v), 1, mode,
                                     enc["units"][j])[0]
                assert abs(float(want) - float(res.l_variants[k, j])) < 1e-4, (k, j, mode)
                assert torch.equal(res.l_by_score[mode], res.l)
    # The four scores differ on a multi-token answer, and copy 0 sits behind the opener.
    assert len({round(float(r.l[1]), 4) for r in packed.values()}) == 4
    assert enc["l0_probes"][0].numel() == enc["probes"][0].numel() + 1


def _completion(tok, steps: list[str], answer: str):
    """Completion ids built piecewise so the step boundaries (cuts) are known exactly."""
    pieces = ["<think>\n"] + [f"### Step {i + 1}: {s}\n" for i, s in enumerate(steps)] + [
        f"</think>\n<answer>{answer}</answer>", "<|im_end|>"]
    ids, cuts = [], []
    for j, p in enumerate(pieces):
        ids += tok.encode(p, add_special_tokens=False)
        if j <= len(steps):
            cuts.append(len(ids))
    return torch.tensor(ids), cuts


def naive_scores(model, processor, sample, completion, cuts, variants, probe_ids):
    """Reference: one ordinary forward per (k, v) on prompt + completion[:c_k] + probe + v."""
    batch = encode_prompts(processor, [sample])
    out = torch.empty(len(cuts), len(variants))
    for k, c in enumerate(cuts):
        for j, v in enumerate(variants):
            tail = torch.cat([completion[:c], probe_ids, v])
            inputs = batch.model_inputs()
            inputs["input_ids"] = torch.cat([batch.input_ids[0], tail]).unsqueeze(0)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if batch.mm_token_type_ids is not None:
                zeros = torch.zeros_like(tail)
                inputs["mm_token_type_ids"] = torch.cat([batch.mm_token_type_ids[0], zeros]).unsqueeze(0)
            with torch.no_grad():
                logits = model(**inputs).logits[0].float()
            n = v.numel()
            lp = logits[-n - 1 : -1].log_softmax(-1).gather(-1, v.unsqueeze(-1)).squeeze(-1)
            out[k, j] = lp.mean()
    return out


def naive_completion_logprobs(model, processor, sample, completion):
    batch = encode_prompts(processor, [sample])
    inputs = batch.model_inputs()
    inputs["input_ids"] = torch.cat([batch.input_ids[0], completion]).unsqueeze(0)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if batch.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = torch.cat([batch.mm_token_type_ids[0], torch.zeros_like(completion)]).unsqueeze(0)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    T = completion.numel()
    return logits[-T - 1 : -1].log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)


def _check_packed_equals_naive(model_dir, samples, completions, probe_text=DEFAULT_PROBE):
    torch.manual_seed(0)
    model = load_model(model_dir)
    processor = load_processor(model_dir)
    tok = tokenizer_of(processor)
    probe = torch.tensor(tok.encode(probe_text, add_special_tokens=False), dtype=torch.long)
    batch = encode_prompts(processor, samples)
    with torch.no_grad():
        prompts = prompt_pieces(model, batch)
        rows = []
        for p, s, (steps, answer) in zip(prompts, samples, completions):
            ids, cuts = _completion(tok, steps, answer)
            variants = [torch.tensor(tok.encode(v, add_special_tokens=False)) for v in s.variants]
            rows.append(ScoreRow(prompt=p, completion_ids=ids, cuts=cuts, variants=variants))
        # A tiny token budget forces several micro-batches, exercising the bounded-memory path too.
        packed = score_rows(model, rows, probe, max_tokens_per_batch=400)
    worst = 0.0
    for s, r, res in zip(samples, rows, packed):
        ref = naive_scores(model, processor, s, r.completion_ids, r.cuts, r.variants, probe)
        worst = max(worst, (ref - res.l_variants).abs().max().item())
        assert torch.equal(res.l, res.l_variants.max(-1).values)
        ref_lp = naive_completion_logprobs(model, processor, s, r.completion_ids)
        worst = max(worst, (ref_lp - res.completion_logprobs).abs().max().item())
    assert worst <= 1e-4, worst
    return worst


def test_packed_equals_naive_on_tiny_qwen2_vl_with_images(tiny_vl_dir, make_image):
    samples = [
        Sample(id="a", question="How many different items are there in the image?", task="count",
               images=[str(make_image("a.png"))], answer="3", answer_variants=["three"]),
        Sample(id="b", question="Compare the two pictures.", task="count",
               images=[str(make_image("b.png", color=(0, 90, 10))), str(make_image("c.png", size=(168, 112)))],
               answer="12"),
        Sample(id="c", question="What is 2 + 2?", answer="4"),
    ]
    completions = [
        (["I see 2 red cubes.", "I see 1 sphere.", "2 + 1 = 3."], "3"),
        (["The left one has 5.", "The right one has 7.", "5 + 7 = 12.", "So twelve.", "Done counting."], "12"),
        ([], "4"),  # K = 0: only l_0
    ]
    _check_packed_equals_naive(tiny_vl_dir, samples, completions)


def test_packed_equals_naive_on_tiny_text_model(tiny_text_dir):
    samples = [Sample(id="t", question="Tom has 5 apples and buys 3. How many?", answer="8", task="numeric",
                      answer_variants=["8.0", "eight"]),
               Sample(id="u", question="2 * 3?", answer="6")]
    completions = [(["5 + 3 = 8.", "So Tom has 8 apples.", "Check: 8 - 3 = 5."], "8"), (["2 * 3 = 6."], "6")]
    _check_packed_equals_naive(tiny_text_dir, samples, completions)


def test_empty_probe_scores_the_answer_right_after_each_prefix(tiny_text_dir):
    # With no probe the first answer token is predicted by the last token of prefix k itself, not by
    # whatever precedes the copy in the packed row (the completion's end, or the previous copy).
    samples = [Sample(id="t", question="Tom has 5 apples and buys 3. How many?", answer="8", task="numeric",
                      answer_variants=["8.0"])]
    completions = [(["5 + 3 = 8.", "So Tom has 8 apples."], "8")]
    _check_packed_equals_naive(tiny_text_dir, samples, completions, probe_text="")


@pytest.mark.real_weights
def test_packed_equals_naive_on_smollm2_real_weights(smollm2_dir):
    samples = [Sample(id="g", question="Natalia sold 48 clips in April and half as many in May. How many in total?",
                      answer="72", task="numeric", answer_variants=["72.0"])]
    completions = [(["In May she sold 48 / 2 = 24 clips.", "In total 48 + 24 = 72 clips.",
                     "The answer is 72."], "72")]
    worst = _check_packed_equals_naive(smollm2_dir, samples, completions)
    assert worst <= 1e-4
