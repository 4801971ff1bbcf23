"""Can the embedded tiny Qwen2-VL learn the synthetic CLEVR-like counting task on 2 CPU cores in minutes?

Supervised warm start on gold step-by-step solutions (loss on completion tokens only), through the same
packed teacher-forced pass the RL scorer uses, then greedy held-out accuracy (graded by ``vlm_mig.rewards``)
at fixed wall-clock checkpoints. The random patch embedding is frozen (see README: it otherwise blows up
under AdamW and the image is ignored).

    python bench/tiny_learnability.py [--minutes 4] [--eval-every 60] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from vlm_mig.data.loaders import load_jsonl
from vlm_mig.data.synthetic import write_clevr
from vlm_mig.mig import ScoreRow, packed_forward, prompt_rows
from vlm_mig.models import build_tiny, load_model, load_processor
from vlm_mig.processing import encode_prompts, tokenizer_of
from vlm_mig.prompts import format_solution
from vlm_mig.rewards import extract_answer, grade, is_well_formatted
from vlm_mig.rollout import RolloutConfig, make_engine


def sft_loss(model, processor, samples) -> torch.Tensor:
    tok = tokenizer_of(processor)
    batch = encode_prompts(processor, samples)
    prompts = prompt_rows(model, batch)
    rows = []
    for p, s in zip(prompts, samples):
        ids = tok.encode(format_solution(s.gold_steps, s.answer) + tok.eos_token, add_special_tokens=False)
        rows.append(ScoreRow(completion_ids=torch.tensor(ids), cuts=[], variants=[], **p))
    scores = packed_forward(model, rows, torch.zeros(0, dtype=torch.long))
    return -torch.cat([s.completion_logprobs for s in scores]).mean()


def evaluate(model, processor, samples) -> dict:
    engine = make_engine(RolloutConfig(num_generations=1, temperature=0.0, max_new_tokens=96), model, processor)
    correct = fmt = 0
    for i in range(0, len(samples), 25):
        chunk = samples[i : i + 25]
        r = engine.generate(chunk)
        for s, text in zip(chunk, r.texts):
            pred = extract_answer(text)
            correct += pred is not None and grade(pred, s.variants, s.task)
            fmt += is_well_formatted(text)
    return {"accuracy": correct / len(samples), "format": fmt / len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evaluations")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_clevr(tmp / "train", n=args.n_train, condition="A", seed=1)
        write_clevr(tmp / "test", n=args.n_test, condition="A", seed=2)
        train = load_jsonl(tmp / "train" / "data.jsonl", task="count")
        test = load_jsonl(tmp / "test" / "data.jsonl", task="count")
        print(f"data: {len(train)} train / {len(test)} test scenes in {time.perf_counter() - t0:.1f} s")
        model_dir = build_tiny(tmp / "tiny", arch="qwen2-vl", seed=0)
        model = load_model(model_dir)
        processor = load_processor(model_dir)
        n_params = sum(p.numel() for p in model.parameters())
        model.model.visual.patch_embed.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        rng = random.Random(0)
        curve = [{"train_s": 0.0, "step": 0, **evaluate(model, processor, test)}]
        print(f"model: {n_params / 1e6:.2f}M parameters; step 0: {curve[-1]}", flush=True)
        step, train_s, next_eval = 0, 0.0, args.eval_every
        while train_s < args.minutes * 60:
            t = time.perf_counter()
            model.train()
            loss = sft_loss(model, processor, rng.sample(list(train), args.batch_size))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            train_s += time.perf_counter() - t
            step += 1
            if train_s >= next_eval or train_s >= args.minutes * 60:
                model.eval()
                curve.append({"train_s": round(train_s, 1), "step": step, "loss": round(loss.item(), 4),
                              **evaluate(model, processor, test)})
                print(curve[-1], flush=True)
                next_eval += args.eval_every
        print(f"\n{step} steps of batch {args.batch_size} in {train_s:.0f} s ({train_s / step:.3f} s/step)")
        if args.json:
            Path(args.json).write_text(json.dumps({"params": n_params, "curve": curve, **vars(args)}, indent=2))


if __name__ == "__main__":
    main()
