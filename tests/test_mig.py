"""MIG: the watermark/gain math by hand, and the packed one-pass scorer against K+1 naive passes."""

from __future__ import annotations

import pytest
import torch

from vlm_mig.data.schema import Sample
from vlm_mig.mig import ScoreRow, process_reward, prompt_rows, score_rows, step_gains, watermark
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
                inputs["mm_token_type_ids"] = torch.cat([batch.mm_token_type_ids[0], torch.zeros_like(tail)]).unsqueeze(0)
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
        prompts = prompt_rows(model, batch)
        rows = []
        for p, s, (steps, answer) in zip(prompts, samples, completions):
            ids, cuts = _completion(tok, steps, answer)
            variants = [torch.tensor(tok.encode(v, add_special_tokens=False)) for v in s.variants]
            rows.append(ScoreRow(completion_ids=ids, cuts=cuts, variants=variants, **p))
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
