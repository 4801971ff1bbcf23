"""Rollout backends on CPU, without vLLM: selection, the error that names the extra, the weight stream a
colocated engine loads (checked against the safetensors the checkpoint writer saves), the prompt/sampling
plumbing of the vLLM engine on real encoded prompts, and the trainer's weight sync after every step."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlm_mig import checkpoint as ckpt
from vlm_mig.config import ConfigError, load_config
from vlm_mig.data.schema import Sample
from vlm_mig.models import load_model, load_processor
from vlm_mig.processing import PromptTemplate, build_messages, encode_prompts, tokenizer_of
from vlm_mig.rollout import HFRolloutEngine, RolloutConfig, make_engine
from vlm_mig.rollout.base import assemble_rollouts
from vlm_mig.rollout.sampling import rollout_seed
from vlm_mig.rollout.vllm import (
    check_prompt_ids,
    collapse_image_tokens,
    llm_kwargs,
    pad_token_lists,
    prompt_token_ids,
    sampling_kwargs,
    vllm_prompts,
)
from vlm_mig.rollout.weights import checkpoint_weights

NO_VLLM = importlib.util.find_spec("vllm") is None


def _samples(make_image):
    two = Sample(id="two", question="How many?", answer="2",
                 images=[str(make_image("a.png")), str(make_image("b.png", (168, 112), color=(9, 9, 9)))])
    one = Sample(id="one", question="Count the objects, please.", answer="3", images=[str(make_image("c.png"))])
    return [two, one]


# ----------------------------------------------------------------------------------------------
# Configuration and selection


def test_config_validates_the_backend_and_the_vllm_settings(caplog):
    assert load_config(None, ["rollout.backend=vllm"]).rollout.backend == "vllm"
    with pytest.raises(ConfigError, match=r"rollout\.backend: invalid value 'vlm'.*did you mean 'vllm'"):
        load_config(None, ["rollout.backend=vlm"])
    with pytest.raises(ConfigError, match=r"rollout\.vllm_gpu_memory_utilization"):
        load_config(None, ["rollout.vllm_gpu_memory_utilization=0"])
    with pytest.raises(ConfigError, match=r"rollout\.vllm_dtype"):
        load_config(None, ["rollout.vllm_dtype=int8"])
    cfg = load_config(None, ["rollout.vllm_kwargs={enforce_eager: true}"])
    assert cfg.rollout.vllm_kwargs == {"enforce_eager": True}
    # A config saved before the old-log-prob pass left the engine still loads, with a warning.
    with caplog.at_level(logging.WARNING):
        assert load_config(None, ["rollout.compute_logprobs=false"]).rollout.backend == "hf"
    assert "rollout.compute_logprobs is ignored" in caplog.text


def test_make_engine_builds_hf_and_rejects_unknown_backends(tiny_vl_dir):
    model, proc = load_model(tiny_vl_dir), load_processor(tiny_vl_dir)
    assert isinstance(make_engine(RolloutConfig(), model, proc), HFRolloutEngine)
    with pytest.raises(ValueError, match="backend must be one of hf, vllm, got 'sglang'"):
        RolloutConfig(backend="sglang")
    cfg = RolloutConfig()
    cfg.backend = "sglang"  # set past the dataclass's own check: make_engine refuses it too
    with pytest.raises(ValueError, match="unknown backend 'sglang'"):
        make_engine(cfg, model, proc)


def test_nothing_imports_vllm_unless_the_backend_is_chosen():
    code = ("import sys, vlm_mig.cli, vlm_mig.trainer, vlm_mig.evaluation, vlm_mig.rollout, vlm_mig.config; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'vlm_mig.rollout.vllm'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here: the missing-extra error cannot happen")
def test_choosing_vllm_without_it_names_the_extra(tiny_vl_dir, tmp_path):
    model, proc = load_model(tiny_vl_dir), load_processor(tiny_vl_dir)
    with pytest.raises(ImportError, match=r"pip install 'vlm-mig\[vllm\]'"):
        make_engine(RolloutConfig(backend="vllm"), model, proc)
    from vlm_mig.trainer import Trainer

    cfg = load_config(None, [f"model.name_or_path={tiny_vl_dir}", f"trainer.output_dir={tmp_path}",
                             "rollout.backend=vllm", "data.validation=null", "data.synthetic_n=4",
                             "trainer.report_to=[]", "trainer.threads=1"])
    with pytest.raises(ImportError, match=r"rollout\.backend=vllm needs vLLM.*pip install 'vlm-mig\[vllm\]'"):
        Trainer(cfg, mode="rl")


# ----------------------------------------------------------------------------------------------
# The weight stream: what save_pretrained writes, which is what vLLM loads from disk


def _assert_equal_to_saved(weights: dict[str, torch.Tensor], folder):
    saved = load_file(str(folder / "model.safetensors"))
    assert sorted(weights) == sorted(saved)
    for name, tensor in saved.items():
        assert weights[name].shape == tensor.shape and torch.equal(weights[name], tensor), name


@pytest.mark.parametrize("which", ["tiny_vl_dir", "tiny_text_dir"])
def test_checkpoint_weights_equal_the_saved_checkpoint(which, request, tmp_path):
    model = load_model(request.getfixturevalue(which))
    ckpt.write_model(tmp_path, model, None)
    weights = checkpoint_weights(model)
    assert not any("lm_head" in n for n in weights)  # tied to the embeddings: saved once, like save_pretrained
    _assert_equal_to_saved(weights, tmp_path)


def test_checkpoint_weights_fold_lora_like_merge_and_unload(tiny_vl_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    policy = get_peft_model(load_model(tiny_vl_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a trained adapter is not
            torch.nn.init.normal_(p, std=0.1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    weights = checkpoint_weights(policy)
    ckpt.write_model(tmp_path, copy.deepcopy(policy).merge_and_unload(), None)
    _assert_equal_to_saved(weights, tmp_path)
    plain = checkpoint_weights(load_model(tiny_vl_dir))
    assert sum(not torch.equal(weights[n], plain[n]) for n in plain) == 2 * 4  # q and v of the 4 layers
    for n, p in policy.named_parameters():  # folding made new tensors: adapters and frozen base untouched
        assert torch.equal(p, before[n]), n


# ----------------------------------------------------------------------------------------------
# The HF engine shares the policy module; the trainer syncs after every step


def test_hf_sync_is_a_noop_that_keeps_generation_identical(tiny_vl_dir, make_image):
    model = load_model(tiny_vl_dir)
    engine = make_engine(RolloutConfig(num_generations=2, max_new_tokens=8), model, load_processor(tiny_vl_dir))
    samples = _samples(make_image)
    a = engine.generate(samples, seeds=[5, 6])
    engine.sync_weights(model)
    b = engine.generate(samples, seeds=[5, 6])
    assert engine.synced_updates == 1
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    with pytest.raises(ValueError, match="module it was built with"):
        engine.sync_weights(load_model(tiny_vl_dir))


def test_trainer_syncs_the_engine_after_each_step(tiny_vl_dir, tmp_path):
    from vlm_mig.trainer import Trainer

    cfg = load_config(None, [
        f"model.name_or_path={tiny_vl_dir}", f"trainer.output_dir={tmp_path}", "trainer.max_steps=2",
        "trainer.eval_steps=0", "trainer.progress=false", "trainer.threads=1", "trainer.report_to=[]",
        "data.synthetic_n=8", "data.validation=null", "rollout.num_generations=2", "rollout.max_new_tokens=8",
        "trainer.prompts_per_step=2", "trainer.num_iterations=2", "trainer.save_steps=100"])
    trainer = Trainer(cfg, mode="rl")
    assert trainer.engine.synced_updates == 0
    trainer.train()
    # Two optimizer updates per step (num_iterations 2), one sync per step: before the next rollouts.
    assert trainer.engine.synced_updates == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("time/sync" in r for r in rows)


# ----------------------------------------------------------------------------------------------
# The vLLM engine's plumbing, on real encoded prompts (vLLM itself is not needed for any of it)


def test_vllm_prompts_are_the_tokenizer_only_rendering_with_their_images(tiny_vl_dir, make_image):
    proc = load_processor(tiny_vl_dir)
    tok = tokenizer_of(proc)
    image_id = load_model(tiny_vl_dir).config.image_token_id
    samples = _samples(make_image)
    batch = encode_prompts(proc, samples)
    images = [["img-a", "img-b"], ["img-c"]]  # stand-ins for the PIL images: only their order matters here
    prompts = vllm_prompts(batch, images, image_id)
    for s, prompt, ids in zip(samples, prompts, prompt_token_ids(batch)):
        text = tok.apply_chat_template(build_messages(s, PromptTemplate()), add_generation_prompt=True, tokenize=False)
        assert prompt["prompt_token_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert prompt["prompt_token_ids"] == collapse_image_tokens(ids, image_id)
        assert sum(t == image_id for t in prompt["prompt_token_ids"]) == len(s.images)
    assert prompts[0]["multi_modal_data"] == {"image": ["img-a", "img-b"]}
    assert prompts[1]["multi_modal_data"] == {"image": "img-c"}
    assert vllm_prompts(batch, [[], []], image_id)[0] == {"prompt_token_ids": prompt_token_ids(batch)[0]}


def test_prompt_check_fails_loudly_on_a_differently_sized_image(tiny_vl_dir, make_image):
    proc = load_processor(tiny_vl_dir)
    image_id = load_model(tiny_vl_dir).config.image_token_id
    samples = _samples(make_image)[1:]
    ours = prompt_token_ids(encode_prompts(proc, samples))[0]
    check_prompt_ids(ours, ours, "one", image_id)
    # What vLLM reports when its processor sizes the image under a smaller pixel budget: fewer image tokens.
    smaller = prompt_token_ids(encode_prompts(proc, samples, max_pixels=56 * 56))[0]
    with pytest.raises(RuntimeError, match=r"sample 'one'.*4 image tokens instead of 16.*min_pixels/max_pixels"):
        check_prompt_ids(ours, smaller, "one", image_id)


def test_sampling_requests_carry_the_hf_backends_per_rollout_seeds():
    cfg = RolloutConfig(num_generations=3, temperature=0.7, top_p=0.9, max_new_tokens=5)
    rows = sampling_kwargs(cfg, [2, 7], seeds=[11, 22], n_samples=2)
    assert [r["seed"] for r in rows] == [rollout_seed(s, j) for s in (11, 22) for j in range(3)]
    assert rows[0] == {"n": 1, "max_tokens": 5, "stop_token_ids": [2, 7], "temperature": 0.7, "top_p": 0.9,
                       "logprobs": 0, "seed": rollout_seed(11, 0)}
    greedy = sampling_kwargs(RolloutConfig(num_generations=2, temperature=0.0), [2], seeds=[1], n_samples=1)
    assert all("seed" not in r and r["temperature"] == 0.0 for r in greedy)
    with pytest.raises(ValueError, match="1 seeds for 2 samples"):
        sampling_kwargs(cfg, [2], seeds=[1], n_samples=2)


def test_llm_arguments_of_a_colocated_engine():
    cfg = RolloutConfig(backend="vllm", vllm_gpu_memory_utilization=0.25, vllm_max_images=2,
                        vllm_kwargs={"enforce_eager": True, "seed": 7})
    kw = llm_kwargs(cfg, "/ckpt", multimodal=True, rank=1, world_size=2)
    assert kw["model"] == kw["tokenizer"] == "/ckpt" and kw["gpu_memory_utilization"] == 0.25
    assert kw["enable_sleep_mode"] is True and kw["limit_mm_per_prompt"] == {"image": 2}
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["dtype"] == "bfloat16"
    assert kw["enforce_eager"] is True and kw["seed"] == 7  # vllm_kwargs win
    assert kw["logprobs_mode"] == "processed_logprobs"  # the sampling distribution's log-probs, not the raw model's
    one = llm_kwargs(cfg, "/ckpt", multimodal=False, sleep_mode=False)
    assert "limit_mm_per_prompt" not in one and "enable_sleep_mode" not in one
    assert "distributed_executor_backend" not in one


def test_token_lists_assemble_into_the_same_rollouts_as_the_hf_engine(tiny_vl_dir, make_image):
    """The vLLM engine turns sampled token lists into Rollouts through the HF engine's own assembly."""
    model, proc = load_model(tiny_vl_dir), load_processor(tiny_vl_dir)
    engine = HFRolloutEngine(model, proc, RolloutConfig(num_generations=2, max_new_tokens=10))
    samples = _samples(make_image)
    r = engine.generate(samples, seeds=[3, 4])
    lists = [row[m.bool()].tolist() for row, m in zip(r.completion_ids, r.completion_mask)]
    batch = encode_prompts(proc, samples)
    again = assemble_rollouts(proc, samples, batch,
                              pad_token_lists(lists, engine.pad_id), engine.eos_ids, engine.pad_id)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "group"):
        assert torch.equal(getattr(again, name), getattr(r, name)), name
    assert again.texts == r.texts


def test_vllm_shaped_log_probs_become_the_rollouts_sampler_log_probs():
    """What vLLM returns per completion (``outputs[0].logprobs``: per position, token id -> Logprob, the sampled
    token always among them) becomes ``Rollouts.sampler_logp``, 0 on padding."""
    from types import SimpleNamespace

    from vlm_mig.rollout.vllm import sampled_logprobs

    lp = lambda v: SimpleNamespace(logprob=v, rank=1)  # noqa: E731
    ids = [5, 9, 2]
    reported = [{5: lp(-0.5), 7: lp(-1.0)}, {9: lp(-2.25)}, {2: -0.125}]  # a plain float is taken too
    assert sampled_logprobs(ids, reported) == [-0.5, -2.25, -0.125]
    with pytest.raises(ValueError, match="log-probs for 2 of 3"):
        sampled_logprobs(ids, reported[:2])
    with pytest.raises(ValueError, match="SamplingParams.logprobs"):
        sampled_logprobs(ids, None)


def test_the_hf_samplers_log_probs_are_the_trainers(tiny_vl_dir, make_image):
    """On the HF backend the sampler is the policy itself: the log-probs it reports equal the trainer's teacher-forced
    ones at the rollout temperature (ratio 1), with top-p their renormalised share; greedy reports none."""
    from vlm_mig.forward import teacher_forced_logprobs

    model, proc = load_model(tiny_vl_dir), load_processor(tiny_vl_dir)
    samples = _samples(make_image)
    for temperature, top_p in ((0.7, 1.0), (1.0, 0.9)):
        engine = HFRolloutEngine(model, proc, RolloutConfig(num_generations=3, max_new_tokens=12,
                                                            temperature=temperature, top_p=top_p))
        r = engine.generate(samples, seeds=[3, 4])
        ours = teacher_forced_logprobs(model, r, temperature=temperature)
        m = r.completion_mask.bool()
        assert r.sampler_logp.shape == r.completion_ids.shape and (r.sampler_logp[~m] == 0).all()
        if top_p == 1.0:
            assert torch.allclose(r.sampler_logp[m], ours[m], atol=1e-4)
        else:  # the kept tokens' probabilities renormalised: never below the full softmax's
            assert (r.sampler_logp[m] >= ours[m] - 1e-4).all() and (r.sampler_logp[m] <= 0).all()
    greedy = HFRolloutEngine(model, proc, RolloutConfig(num_generations=2, max_new_tokens=6, temperature=0.0))
    assert greedy.generate(samples, seeds=[3, 4]).sampler_logp is None
