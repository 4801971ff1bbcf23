"""GPU smoke benchmark at Qwen2-VL-2B size (random init, bf16), or the same code on CPU with ``--tiny``.

Measures, in one run, with the rollout backend ``--backend hf|vllm`` (vLLM: colocated on the same GPU):
1. rollout tokens/s: 2 prompts x G = 8 x 256 new tokens with 448x448 images, seeded sampling, through the
   trainer's own engine (for vLLM: including its wake-up before and sleep after the generation);
2. the packed MIG pass vs K+1 naive passes at K = 8 on synthetic step completions: time and max |delta l|
   (fp32 log-softmax over bf16 forwards);
3. the same check on the completions the backend sampled (cuts spread over each completion): max |delta l|
   and max |delta log p| of the completion tokens, packed pass vs separate plain HF forwards. MIG scores and
   old log-probs come from the trainer's own pass whichever backend sampled;
4. with ``--backend vllm``: vLLM's own log-probs of its sampled tokens vs the trainer's teacher-forced ones
   on the same tokens (why the trainer never uses vLLM's), and greedy HF vs greedy vLLM on the same prompts
   (identical rows; a wrong image-token layout would diverge at the first token);
5. one full train step (rollout, packed scoring, rewards, advantages, loss, backward, optimizer, weight
   sync): time and peak GPU memory, through the real ``Trainer`` with bf16 autocast and gradient checkpointing.

It prints a short table last and writes JSON (``--json``).

    python bench/gpu_smoke.py --backend hf   --json gpu_smoke_hf.json     # on a GPU
    python bench/gpu_smoke.py --backend vllm --json gpu_smoke_vllm.json   # on a GPU, pip install '.[vllm]'
    python bench/gpu_smoke.py --tiny                                      # CPU, the tiny model (a test runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import step_completion  # noqa: E402

from vlm_mig.config import load_config  # noqa: E402
from vlm_mig.data.loaders import load_jsonl  # noqa: E402
from vlm_mig.data.synthetic import write_clevr  # noqa: E402
from vlm_mig.forward import ScoreRow, prompt_pieces, rollout_rows, score_rows  # noqa: E402
from vlm_mig.models import build_processor, build_tiny, build_tiny_tokenizer  # noqa: E402
from vlm_mig.processing import encode_prompts, tokenizer_of  # noqa: E402
from vlm_mig.prompts import DEFAULT_PROBE  # noqa: E402
from vlm_mig.rollout import make_engine  # noqa: E402
from vlm_mig.trainer import Trainer  # noqa: E402


def build_2b(out: Path) -> Path:
    """A random-init Qwen2-VL with the 2B architecture, saved as an ordinary HF folder (bf16 safetensors)."""
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    tok = build_tiny_tokenizer(seed=0)
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id,
                     "tie_word_embeddings": True},
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4},
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    build_processor(tok, "qwen2-vl", min_pixels=448 * 448, max_pixels=448 * 448).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def naive_scores(model, processor, template, samples, rows, probe, pixels, device) -> list[tuple]:
    """Plain HF forwards, one per cut (and one for the completion log-probs) of each row
    ``(sample index, completion ids, cuts, answer ids)``: what the packed pass must equal."""
    out = []
    with torch.no_grad():
        for i, comp, cuts, answer in rows:
            one = encode_prompts(processor, [samples[i]], template, min_pixels=pixels, max_pixels=pixels)

            def logits_of(tail, one=one):
                ids = torch.cat([one.input_ids[0], tail]).unsqueeze(0).to(device)
                kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if one.pixel_values is not None:
                    mm = torch.cat([one.mm_token_type_ids[0], torch.zeros_like(tail)]).unsqueeze(0).to(device)
                    kw.update(mm_token_type_ids=mm, pixel_values=one.pixel_values.to(device),
                              image_grid_thw=one.image_grid_thw.to(device))
                return ids[0], model(**kw).logits[0]

            def mean_logp(tail, n):
                ids, logits = logits_of(tail)
                return logits[-n - 1 : -1].float().log_softmax(-1).gather(-1, ids[-n:, None]).squeeze(-1)

            ls = [float(mean_logp(torch.cat([comp[:cut], probe, answer]), answer.numel()).mean()) for cut in cuts]
            out.append((torch.tensor(ls), mean_logp(comp, comp.numel()).cpu()))
    return out


def spread_cuts(n: int, K: int) -> list[int]:
    """Up to K+1 distinct prefix ends spread over a completion of n tokens (0 and n included)."""
    return sorted({round(n * k / K) for k in range(K + 1)})


def rescore_rollouts(model, processor, template, samples, r, probe, K, pixels, device, acc, rows=4) -> dict:
    """The packed pass on the backend's own completions vs plain forwards on the same completions."""
    picks = list(range(min(rows, r.completion_ids.shape[0])))
    lengths = r.completion_lengths.tolist()
    cuts = [spread_cuts(lengths[i], K) if i in picks else [] for i in range(len(lengths))]
    tok = tokenizer_of(processor)
    answers = [torch.tensor(tok.encode(r.sample_of(i).answer, add_special_tokens=False)) for i in range(len(lengths))]
    with torch.no_grad(), acc.autocast():
        packed = score_rows(model, rollout_rows(model, r, cuts, [{"variants": [a]} for a in answers]), probe)
        naive = naive_scores(model, processor, template, samples,
                             [(int(r.group[i]), r.completion_ids[i, : lengths[i]], cuts[i], answers[i]) for i in picks],
                             probe, pixels, device)
    dl = max(float((packed[i].l.float().cpu() - naive[j][0]).abs().max()) for j, i in enumerate(picks))
    dp = max(float((packed[i].completion_logprobs.float().cpu() - naive[j][1]).abs().max())
             for j, i in enumerate(picks))
    return {"rescore_rows": len(picks), "rescore_max_abs_delta_l": dl, "rescore_max_abs_delta_logp": dp}


def vllm_checks(trainer, samples, r) -> dict:
    """vLLM's own log-probs vs the trainer's teacher-forced ones on vLLM's tokens; greedy vLLM vs greedy HF."""
    from vlm_mig.forward import teacher_forced_logprobs
    from vlm_mig.processing import load_images
    from vlm_mig.rollout.base import assemble_rollouts
    from vlm_mig.rollout.vllm import pad_token_lists, prompt_token_ids, sampling_kwargs, vllm_prompts

    engine, cfg = trainer.engine, trainer.engine.config
    batch = encode_prompts(trainer.processor, samples, trainer.template, min_pixels=cfg.min_pixels,
                           max_pixels=cfg.max_pixels)
    prompts = vllm_prompts(batch, [load_images(s, cfg.min_pixels, cfg.max_pixels) for s in samples],
                           engine.image_token_id)
    params = [engine._sampling_params(**kw, logprobs=0) for kw in sampling_kwargs(cfg, engine.eos_ids, [1, 2],
                                                                                  len(samples))]
    G = cfg.num_generations
    engine._wake()
    outs = engine.llm.generate([prompts[i // G] for i in range(len(params))], sampling_params=params, use_tqdm=False)
    engine._sleep()
    assert [list(o.prompt_token_ids) for o in outs[::G]] == prompt_token_ids(batch)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    theirs = [torch.tensor([float(getattr(lp[t], "logprob", lp[t])) for t, lp in zip(tk, o.outputs[0].logprobs)])
              for tk, o in zip(toks, outs)]
    own = assemble_rollouts(trainer.processor, samples, batch,
                            pad_token_lists(toks, engine.pad_id), engine.eos_ids, engine.pad_id)
    with trainer.acc.autocast():
        ours = teacher_forced_logprobs(trainer.model, own)
    diffs = torch.cat([(ours[i, : len(t)] - t).abs() for i, t in enumerate(theirs)])

    greedy = dataclasses.replace(cfg, temperature=0.0, num_generations=1)
    hf = make_engine(dataclasses.replace(greedy, backend="hf"), trainer.model, trainer.processor, trainer.template)
    engine.config = greedy
    try:
        with trainer.acc.autocast():
            a, b = hf.generate(samples), engine.generate(samples)
    finally:
        engine.config = cfg
    same = prefix = 0.0
    for i in range(len(samples)):
        x, y = a.completion_ids[i, : int(a.completion_lengths[i])], b.completion_ids[i, : int(b.completion_lengths[i])]
        n = min(len(x), len(y))
        first = int((x[:n] != y[:n]).nonzero()[0]) if (x[:n] != y[:n]).any() else n
        same += float(len(x) == len(y) == first)
        prefix += first / max(len(x), len(y), 1)
    return {"vllm_logprob_mean_abs_diff": float(diffs.mean()), "vllm_logprob_max_abs_diff": float(diffs.max()),
            "greedy_identical_rows": same / len(samples), "greedy_mean_common_prefix": prefix / len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny model, small sizes (the same code path)")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="rollout backend (vllm: GPU only)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU path")
    if args.tiny and args.backend == "vllm":
        sys.exit("--backend vllm needs a GPU (drop --tiny)")
    new_tokens = args.new_tokens or (16 if args.tiny else 256)
    image_size = 112 if args.tiny else 448
    pixels = image_size ** 2
    G, K = (4, 8) if args.tiny else (8, 8)
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "backend": args.backend, "G": G, "K": K, "new_tokens": new_tokens,
                 "image_size": image_size}
    if args.backend == "vllm":
        import vllm

        res["vllm"] = vllm.__version__
    tmp = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    t0 = time.perf_counter()
    model_dir = build_tiny(tmp / "model", seed=0) if args.tiny else build_2b(tmp / "model")
    res["build_s"] = time.perf_counter() - t0
    write_clevr(tmp / "data", n=2, seed=0, image_size=image_size, num_objects=(3, 6))
    samples = list(load_jsonl(tmp / "data" / "data.jsonl", "count"))

    # The trainer loads the model the way users do and builds the engine; both serve the measurements below.
    overrides = [f"model.name_or_path={model_dir}", f"trainer.output_dir={tmp / 'run'}", "trainer.max_steps=2",
                 "trainer.eval_steps=0", "trainer.progress=false", "trainer.report_to=[]", "data.validation=null",
                 f"data.train={tmp / 'data' / 'data.jsonl'}", f"rollout.num_generations={G}",
                 f"rollout.max_new_tokens={new_tokens}", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
                 "loss.kl_coef=0", "trainer.save_steps=1000000", f"rollout.backend={args.backend}",
                 f"rollout.max_pixels={pixels}", f"rollout.min_pixels={pixels}"]
    if not args.tiny:
        overrides += ["trainer.bf16=true", "model.dtype=bfloat16", "model.gradient_checkpointing=true"]
    if args.backend == "vllm":
        overrides += ["rollout.vllm_max_model_len=4096", "rollout.vllm_max_images=1"]
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, overrides), mode="rl")
    res["trainer_init_s"] = time.perf_counter() - t0
    model, processor, acc, engine = trainer.model, trainer.processor, trainer.acc, trainer.engine
    res["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6

    # 1. Rollout throughput, through the trainer's engine.
    with acc.autocast():
        engine.generate(samples[:1], seeds=[0])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        r = engine.generate(samples, seeds=[1, 2])
        sync(device)
    dt = time.perf_counter() - t0
    n_tok = int(r.completion_mask.sum())
    res.update(rollout_s=dt, rollout_tokens=n_tok, rollout_tokens_per_s=n_tok / dt,
               image_tokens=int((r.prompts.input_ids == model.config.image_token_id).sum()) // len(samples))

    # 2. Packed vs naive at K = 8 on synthetic step completions (fp32 log-softmax).
    tok = trainer.tok
    probe = torch.tensor(tok.encode(DEFAULT_PROBE, add_special_tokens=False))
    batch = encode_prompts(processor, samples, trainer.template, min_pixels=pixels, max_pixels=pixels)
    comps = [step_completion(tok, K, seed=i, answer=s.answer) for i, s in enumerate(samples)]
    variants = [[torch.tensor(tok.encode(s.answer, add_special_tokens=False))] for s in samples]

    def packed():
        with torch.no_grad(), acc.autocast():
            pieces = prompt_pieces(model, batch.to(device))
            rows = [ScoreRow(prompt=p, completion_ids=c.to(device), cuts=cuts, variants=[v.to(device) for v in vs])
                    for p, (c, cuts), vs in zip(pieces, comps, variants)]
            return score_rows(model, rows, probe.to(device))

    def naive():
        with acc.autocast():
            rows = [(i, c, cuts, vs[0]) for i, ((c, cuts), vs) in enumerate(zip(comps, variants))]
            return [ls for ls, _ in naive_scores(model, processor, trainer.template, samples, rows, probe, pixels,
                                                 device)]

    packed(), naive()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    p_scores = packed()
    sync(device)
    t_packed = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_scores = naive()
    sync(device)
    t_naive = time.perf_counter() - t0
    delta = max(float((s.l.float().cpu() - n_scores[i]).abs().max()) for i, s in enumerate(p_scores))
    res.update(packed_s=t_packed, naive_s=t_naive, naive_over_packed=t_naive / t_packed, max_abs_delta_l=delta)

    # 3. The same pass on the completions this backend sampled; 4. vLLM-only cross-checks.
    res.update(rescore_rollouts(model, processor, trainer.template, samples, r, probe, K, pixels, device, acc))
    if args.backend == "vllm":
        res.update(vllm_checks(trainer, samples, r))

    # 5. One full train step through the trainer (the first one warms up).
    trainer.rl_step()
    trainer.step += 1
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    metrics = trainer.rl_step()
    sync(device)
    res["train_step_s"] = time.perf_counter() - t0
    res["train_step_phases_s"] = {k[5:]: round(v, 3) for k, v in metrics.items() if k.startswith("time/")
                                  and k != "time/tokens_per_s"}
    res["weight_syncs"] = engine.synced_updates
    res["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if device == "cuda":  # the whole device (a sleeping vLLM keeps only what sleep mode leaves mapped)
        free, total = torch.cuda.mem_get_info()
        res["device_memory_in_use_GiB"] = (total - free) / 2**30

    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{'gpu_smoke (' + args.backend + ')':-^72}")
    versions = f"torch {res['torch']}" + (f", vllm {res['vllm']}" if "vllm" in res else "")
    print(f"device                 {res['device']}  ({versions})")
    print(f"model                  {res['params_M']:.0f}M parameters, {'tiny' if args.tiny else 'Qwen2-VL-2B arch'}, "
          f"{res['image_tokens']} image tokens per prompt")
    print(f"{'trainer + engine init':23s}{res['trainer_init_s']:.1f} s")
    print(f"{'rollout (' + args.backend + ')':23s}2 prompts x G={G} x {new_tokens} new: {res['rollout_tokens']} tokens "
          f"in {res['rollout_s']:.2f} s = {res['rollout_tokens_per_s']:.0f} tok/s")
    print(f"MIG scoring, K={K}      packed {t_packed * 1e3:.0f} ms, naive K+1 passes {t_naive * 1e3:.0f} ms "
          f"({res['naive_over_packed']:.1f}x), max |delta l| {delta:.2e}")
    print(f"re-scored rollouts     {res['rescore_rows']} of the sampled completions, packed vs plain forwards: "
          f"max |delta l| {res['rescore_max_abs_delta_l']:.2e}, max |delta log p| "
          f"{res['rescore_max_abs_delta_logp']:.2e}")
    if args.backend == "vllm":
        print(f"vLLM log-probs         vs the trainer's teacher-forced ones on vLLM's tokens: mean |diff| "
              f"{res['vllm_logprob_mean_abs_diff']:.2e}, max {res['vllm_logprob_max_abs_diff']:.2e}")
        print(f"greedy HF vs vLLM      identical rows {res['greedy_identical_rows']:.0%}, mean common prefix "
              f"{res['greedy_mean_common_prefix']:.0%}")
    mem = (f", peak memory {res['peak_memory_GiB']:.1f} GiB (device in use after: "
           f"{res['device_memory_in_use_GiB']:.1f} GiB)") if device == "cuda" else ""
    print(f"train step             {res['train_step_s']:.2f} s {res['train_step_phases_s']}{mem}")


if __name__ == "__main__":
    main()
