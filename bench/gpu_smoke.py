"""GPU smoke benchmark at Qwen2-VL-2B size (random init, bf16), or the same code on CPU with ``--tiny``.

Measures, in one run:
1. rollout tokens/s: 2 prompts x G = 8 x 256 new tokens with 448x448 images (HF generate, bf16 autocast);
2. the packed MIG pass vs K+1 naive passes at K = 8: time and max |delta l| (fp32 logits over bf16 forwards);
3. one full train step (rollout, packed scoring, rewards, advantages, loss, backward, optimizer): time and
   peak GPU memory, through the real ``Trainer`` with bf16 autocast and gradient checkpointing.

It prints a short table last and writes JSON (``--json``).

    python bench/gpu_smoke.py --json gpu_smoke.json     # on a GPU
    python bench/gpu_smoke.py --tiny                    # CPU, the tiny model (a test runs this)
"""

from __future__ import annotations

import argparse
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
from vlm_mig.mig import ScoreRow, prompt_rows, score_rows  # noqa: E402
from vlm_mig.models import build_processor, build_tiny, build_tiny_tokenizer  # noqa: E402
from vlm_mig.processing import encode_prompts  # noqa: E402
from vlm_mig.prompts import DEFAULT_PROBE  # noqa: E402
from vlm_mig.rollout import HFRolloutEngine, RolloutConfig  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny model, small sizes (the same code path)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU path")
    new_tokens = args.new_tokens or (16 if args.tiny else 256)
    image_size = 112 if args.tiny else 448
    G, K = (4, 8) if args.tiny else (8, 8)
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "G": G, "K": K, "new_tokens": new_tokens, "image_size": image_size}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    t0 = time.perf_counter()
    model_dir = build_tiny(tmp / "model", seed=0) if args.tiny else build_2b(tmp / "model")
    res["build_s"] = time.perf_counter() - t0
    write_clevr(tmp / "data", n=2, seed=0, image_size=image_size, num_objects=(3, 6))
    samples = list(load_jsonl(tmp / "data" / "data.jsonl", "count"))

    # The trainer loads the model the way users do; its model/processor serve the measurements below.
    overrides = [f"model.name_or_path={model_dir}", f"trainer.output_dir={tmp / 'run'}", "trainer.max_steps=2",
                 "trainer.eval_steps=0", "trainer.progress=false", "trainer.report_to=[]", "data.validation=null",
                 f"data.train={tmp / 'data' / 'data.jsonl'}", f"rollout.num_generations={G}",
                 f"rollout.max_new_tokens={new_tokens}", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
                 "loss.kl_coef=0", "trainer.save_steps=1000000"]
    if not args.tiny:
        overrides += ["trainer.bf16=true", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
                      f"rollout.max_pixels={448 * 448}", f"rollout.min_pixels={448 * 448}"]
    trainer = Trainer(load_config(None, overrides), mode="rl")
    model, processor, acc = trainer.model, trainer.processor, trainer.acc
    res["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6

    # 1. Rollout throughput.
    engine = HFRolloutEngine(model, processor, RolloutConfig(num_generations=G, max_new_tokens=new_tokens,
                                                             compute_logprobs=False, max_pixels=image_size ** 2,
                                                             min_pixels=image_size ** 2))
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

    # 2. Packed vs naive at K = 8 (fp32 logits).
    tok = trainer.tok
    probe = torch.tensor(tok.encode(DEFAULT_PROBE, add_special_tokens=False))
    batch = encode_prompts(processor, samples, trainer.template, min_pixels=image_size ** 2,
                           max_pixels=image_size ** 2)
    comps = [step_completion(tok, K, seed=i, answer=s.answer) for i, s in enumerate(samples)]
    variants = [[torch.tensor(tok.encode(s.answer, add_special_tokens=False))] for s in samples]

    def packed():
        with torch.no_grad(), acc.autocast():
            pieces = prompt_rows(model, batch.to(device))
            rows = [ScoreRow(completion_ids=c.to(device), cuts=cuts, variants=[v.to(device) for v in vs], **p)
                    for p, (c, cuts), vs in zip(pieces, comps, variants)]
            return score_rows(model, rows, probe.to(device))

    def naive():
        out = torch.empty(len(samples), K + 1)
        with torch.no_grad(), acc.autocast():
            for i, ((c, cuts), vs) in enumerate(zip(comps, variants)):
                one = encode_prompts(processor, [samples[i]], trainer.template, min_pixels=image_size ** 2,
                                     max_pixels=image_size ** 2)
                for k, cut in enumerate(cuts):
                    tail = torch.cat([c[:cut], probe, vs[0]])
                    ids = torch.cat([one.input_ids[0], tail]).unsqueeze(0).to(device)
                    mm = torch.cat([one.mm_token_type_ids[0], torch.zeros_like(tail)]).unsqueeze(0).to(device)
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                                   pixel_values=one.pixel_values.to(device),
                                   image_grid_thw=one.image_grid_thw.to(device)).logits[0]
                    n = vs[0].numel()
                    lp = logits[-n - 1 : -1].float().log_softmax(-1).gather(-1, ids[0, -n:, None]).squeeze(-1)
                    out[i, k] = lp.mean().cpu()
        return out

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

    # 3. One full train step through the trainer (the first one warms up).
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
    res["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{'gpu_smoke':-^72}")
    print(f"device                 {res['device']}  (torch {res['torch']})")
    print(f"model                  {res['params_M']:.0f}M parameters, {'tiny' if args.tiny else 'Qwen2-VL-2B arch'}, "
          f"{res['image_tokens']} image tokens per prompt")
    print(f"rollout                2 prompts x G={G} x {new_tokens} new: {res['rollout_tokens']} tokens in "
          f"{res['rollout_s']:.2f} s = {res['rollout_tokens_per_s']:.0f} tok/s")
    print(f"MIG scoring, K={K}      packed {t_packed * 1e3:.0f} ms, naive K+1 passes {t_naive * 1e3:.0f} ms "
          f"({res['naive_over_packed']:.1f}x), max |delta l| {delta:.2e}")
    mem = f", peak memory {res['peak_memory_GiB']:.1f} GiB" if res["peak_memory_GiB"] is not None else ""
    print(f"train step             {res['train_step_s']:.2f} s {res['train_step_phases_s']}{mem}")


if __name__ == "__main__":
    main()
