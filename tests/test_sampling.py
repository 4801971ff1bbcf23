"""Seeded sampling without a per-row loop (counter-based Gumbel noise), and the HF engine's one prefill per
prompt: the same tokens as ``generate`` on G copies of every prompt, with the vision tower and the prompt
prefill run once per prompt."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList

from vlm_mig.adapter import adapter_for
from vlm_mig.data.schema import Sample
from vlm_mig.models import load_model, load_processor
from vlm_mig.processing import encode_prompts
from vlm_mig.rollout import HFRolloutEngine, RolloutConfig, repeat_prompts
from vlm_mig.rollout import sampling as sampling_module
from vlm_mig.rollout.sampling import SeededSampling, gumbel_noise, mix64, rollout_seed, top_p_filter

GOLDEN = 0x9E3779B97F4A7C15


def _reference_noise(seed: int, step: int, token: int) -> float:
    """The documented hash in plain Python integers: splitmix64 output ``token + 1`` of the stream keyed by
    ``mix64(seed + mix64(step + 1))``, its top 52 bits as ``(b + 0.5) / 2**52``, then ``-log(-log(u))``."""
    key = mix64(seed + mix64(step + 1))
    bits = mix64(key + (token + 1) * GOLDEN) >> 12
    return -math.log(-math.log((bits + 0.5) * 2.0**-52))


def _call(seeds: list[int], logits: torch.Tensor, step: int = 0, temperature: float = 1.0, top_p: float = 1.0):
    """One ``SeededSampling`` call at generated position ``step`` (prompt width 3)."""
    proc = SeededSampling(seeds, temperature=temperature, top_p=top_p)
    proc(torch.zeros(len(seeds), 3, dtype=torch.long), logits.clone())  # fixes the prompt width
    if step == 0:
        return SeededSampling(seeds, temperature=temperature, top_p=top_p)(
            torch.zeros(len(seeds), 3, dtype=torch.long), logits.clone())
    return proc(torch.zeros(len(seeds), 3 + step, dtype=torch.long), logits.clone())


def test_noise_is_the_documented_hash():
    # Seeds near 2**63 make negative int64 intermediates: the shifts must stay logical.
    seeds = [0, 1, 2**63 - 1, 2**62 + 12345, rollout_seed(7, 3)]
    noise = gumbel_noise(torch.tensor(seeds), 5, 40)
    ref = torch.tensor([[_reference_noise(s, 5, v) for v in range(40)] for s in seeds], dtype=torch.float64)
    assert torch.allclose(noise.double(), ref, rtol=1e-6, atol=1e-6)  # float32 rounding only
    assert noise.dtype == torch.float32 and torch.isfinite(gumbel_noise(torch.arange(64), 0, 4096)).all()
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        SeededSampling([2**63])


def test_cpu_column_blocks_give_the_same_noise(monkeypatch):
    whole = gumbel_noise(torch.arange(7), 3, 1000)
    monkeypatch.setattr(sampling_module, "_CPU_BLOCK", 50)  # 7 columns a block, the last one short
    assert torch.equal(gumbel_noise(torch.arange(7), 3, 1000), whole)


def test_a_rows_noise_is_the_same_alone_in_a_batch_and_in_any_order():
    seeds = [rollout_seed(1, j) for j in range(6)]
    batch = gumbel_noise(torch.tensor(seeds), 2, 300)
    for i, s in enumerate(seeds):
        assert torch.equal(gumbel_noise(torch.tensor([s]), 2, 300)[0], batch[i])
    order = [4, 1, 5, 0, 3, 2]
    assert torch.equal(gumbel_noise(torch.tensor([seeds[i] for i in order]), 2, 300), batch[order])
    # Another step or another seed draws other noise.
    assert not torch.equal(gumbel_noise(torch.tensor(seeds), 3, 300), batch)
    assert (batch[0] != batch[1]).all()


def test_seeded_sampling_rows_do_not_depend_on_the_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    seeds = [11, 22, 33, 44, 55]
    for step in (0, 4):
        full = _call(seeds, logits, step, temperature=0.8, top_p=0.9)
        assert torch.equal(_call(seeds[2:3], logits[2:3], step, 0.8, 0.9)[0], full[2])
        perm = [3, 0, 4, 2, 1]
        assert torch.equal(_call([seeds[i] for i in perm], logits[perm], step, 0.8, 0.9), full[perm])


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_seeded_samples_follow_the_tempered_softmax():
    """Gumbel-max over many fixed seeds: the token frequencies match softmax(logits / T) (chi-square with
    3 degrees of freedom, bound at its 99.9% quantile 16.3; the seeds are fixed, so this cannot flake), at
    the first and a later position, and jointly across two positions of one rollout (independence)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = (logits / 0.7).softmax(-1)
    n = 20000
    seeds = [rollout_seed("chi", i) for i in range(n)]
    first = _call(seeds, logits.expand(n, 4), 0, temperature=0.7).argmax(-1)
    later = _call(seeds, logits.expand(n, 4), 9, temperature=0.7).argmax(-1)
    for tokens in (first, later):
        assert _chi_square(torch.bincount(tokens, minlength=4).float(), probs) < 16.3
    joint = torch.bincount(first * 4 + later, minlength=16).float()
    assert _chi_square(joint, torch.outer(probs, probs).flatten()) < 37.7  # 15 dof, 99.9%
    # Top-p: only the nucleus, in proportion.
    kept = _call(seeds, logits.expand(n, 4), 0, temperature=0.7, top_p=0.8).argmax(-1)
    nucleus = probs[:2] / probs[:2].sum()
    counts = torch.bincount(kept, minlength=4).float()
    assert counts[2:].sum() == 0
    assert float(((counts[:2] - nucleus * n) ** 2 / (nucleus * n)).sum()) < 10.8  # 1 dof, 99.9%
    assert torch.isinf(top_p_filter(logits[None], 0.8)[0, 2:]).all()


# -- one prefill per prompt ----------------------------------------------------------------------------------


def _samples(make_image, vision: bool) -> list[Sample]:
    img = (lambda *a, **k: [str(make_image(*a, **k))]) if vision else (lambda *a, **k: [])
    return [Sample(id="a", question="How many items?", images=img("a.png"), answer="3"),
            Sample(id="long", question="A much longer question that pads every other prompt of its batch on the left?",
                   images=(img("b.png", (168, 112), color=(9, 9, 9)) + img("c.png", color=(50, 9, 9))) if vision
                   else [], answer="2"),
            Sample(id="text", question="Count.", answer="1")]


def _old_path(engine: HFRolloutEngine, samples: list[Sample], seeds: list[int] | None) -> torch.Tensor:
    """The engine before one prefill per prompt: ``generate`` on G copies of every prompt, images included."""
    cfg = engine.config
    G = cfg.num_generations
    prompts = repeat_prompts(encode_prompts(engine.processor, samples, engine.template), G)
    if cfg.temperature > 0 and seeds is not None:
        decode = {"do_sample": False, "logits_processor": LogitsProcessorList(
            [SeededSampling([rollout_seed(s, j) for s in seeds for j in range(G)], cfg.temperature, cfg.top_p)])}
    elif cfg.temperature > 0:
        decode = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    else:
        decode = {"do_sample": False}
    engine.model.eval()
    with torch.no_grad():
        out = engine.model.generate(**prompts.model_inputs(), **decode, max_new_tokens=cfg.max_new_tokens,
                                    eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)
    return out[:, prompts.input_ids.shape[1]:]


@pytest.mark.parametrize("arch", ["vl", "text"])
def test_one_prefill_per_prompt_draws_the_old_paths_tokens(arch, tiny_vl_dir, tiny_text_dir, make_image):
    """Seeded, unseeded (same global seed) and greedy, G = 3 and G = 1, left padding, an image-less prompt in
    a VLM batch: the same completions as ``generate`` on the repeated prompts, and the same rollouts."""
    model_dir = tiny_vl_dir if arch == "vl" else tiny_text_dir
    model, proc = load_model(model_dir), load_processor(model_dir)
    samples = _samples(make_image, arch == "vl")
    for G, temperature, top_p, seeds in [(3, 0.7, 0.9, [4, 5, 6]), (3, 1.0, 1.0, None), (3, 0.0, 1.0, None),
                                         (1, 1.0, 1.0, [7, 8, 9])]:
        engine = HFRolloutEngine(model, proc, RolloutConfig(num_generations=G, max_new_tokens=10,
                                                            temperature=temperature, top_p=top_p))
        model.train()
        torch.manual_seed(0)
        r = engine.generate(samples, seeds=seeds)
        assert model.training, "generation switches to eval and back"
        torch.manual_seed(0)
        old = _old_path(engine, samples, seeds)
        case = (G, temperature, seeds)
        assert old.shape == r.completion_ids.shape, case
        assert torch.equal(old.masked_fill(r.completion_mask == 0, engine.pad_id), r.completion_ids), case
        assert r.prompts.input_ids.device.type == "cpu" and r.prompt_ids.shape[0] == 3 * G
        batch = encode_prompts(proc, samples)
        assert torch.equal(r.prompt_ids, repeat_prompts(batch, G).input_ids)
        assert torch.equal(r.prompts.input_ids, batch.input_ids)
    # A batch without images after one with them (the VLM keeps the last batch's M-RoPE offsets).
    text_only = [s for s in samples if not s.images] + [Sample(id="q", question="What is 2 + 3 * 4?", answer="14")]
    engine = HFRolloutEngine(model, proc, RolloutConfig(num_generations=2, max_new_tokens=10))
    seeds = list(range(len(text_only)))
    r = engine.generate(text_only, seeds=seeds)
    old = _old_path(engine, text_only, seeds)
    assert torch.equal(old.masked_fill(r.completion_mask == 0, engine.pad_id), r.completion_ids)


def test_vision_tower_and_prompt_prefill_run_once_per_prompt(tiny_vl_dir, make_image):
    model, proc = load_model(tiny_vl_dir), load_processor(tiny_vl_dir)
    samples = _samples(make_image, True)
    engine = HFRolloutEngine(model, proc, RolloutConfig(num_generations=4, max_new_tokens=6))
    images, forwards = [], []
    tower = adapter_for(model).vision_tower(model)
    decoder = adapter_for(model).decoder(model)
    hooks = [tower.register_forward_pre_hook(lambda m, a, kw: images.append(len(kw.get("grid_thw", a[1:2])[0])),
                                             with_kwargs=True),
             decoder.register_forward_pre_hook(lambda m, a, kw: forwards.append(tuple(kw["inputs_embeds"].shape[:2])),
                                               with_kwargs=True)]
    try:
        r = engine.generate(samples, seeds=[1, 2, 3])
    finally:
        for h in hooks:
            h.remove()
    P = r.prompt_ids.shape[1]
    assert images == [3]  # the 3 images of 3 prompts, once
    assert forwards[0] == (3, P - 1)  # the prefill: each distinct prompt once
    assert all(shape == (12, 1) for shape in forwards[1:])  # then one token per rollout row and step
    assert len(forwards) == 1 + r.completion_ids.shape[1]
