"""How much of the MIG process signal is signal: l_0, the first step's share, and noise-sized groups.

The embedded tiny Qwen2-VL is SFT-trained on CLEVR-like counting as ``vlm-mig demo`` trains it (400 steps of
batch 16, lr 2e-3, 3000 condition-A scenes; cached in ``--work-dir``). Then 96 held-out prompts x G = 8
rollouts (temperature 1, 112 new tokens, seeded) are scored like the trainer scores them (the packed pass,
``pi_old`` = the sampling model), in fp32 and again under bf16 autocast (CPU) for the scoring noise.
Reported:

- mean ``l_0`` by gold answer, with ``l_0`` scored after the empty ``<think>`` (SPEC) and after each opener of
  ``--l0-openers`` (``mig.l0_context: opener``), and the share of all gain the first step earns under each;
- the spread (max - min) of ``R_proc`` within each group: how many groups fall under 0.01 / 0.05 / 0.1 /
  0.2 nats and the ``|A_proc|`` that group normalisation gives them;
- bf16 (autocast over fp32 weights, as the GPU recipes run; and bf16 weights) against fp32: ``|delta l_k|``,
  ``|delta R_proc|``, and how often a rollout's ``A_proc`` changes sign, by spread bucket (a sign the
  scoring noise can flip is no signal).

    python bench/mig_signal.py [--json out.json] [--threads 1] [--quick]

Deterministic from ``--seed`` at a fixed thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlm_mig.prompts import DEFAULT_L0_OPENER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: A content-free first step in the SPEC format: the other l_0 opener compared.
STEP_OPENER = "\n### Step 1: Let me think.\n"
SPREADS = (0.01, 0.05, 0.1, 0.2)  # the noise floors reported (nats)


@dataclass(frozen=True)
class Sizes:
    sft_steps: int
    train_scenes: int
    prompts: int
    generations: int
    max_new_tokens: int


FULL = Sizes(sft_steps=400, train_scenes=3000, prompts=96, generations=8, max_new_tokens=112)
QUICK = Sizes(sft_steps=6, train_scenes=64, prompts=4, generations=4, max_new_tokens=32)


def train_sft(sizes: Sizes, seed: int, work_dir: Path, threads: int) -> tuple[Path, float | None]:
    """The demo's SFT start (or the cached one); returns the checkpoint and the training time (None if cached)."""
    from vlm_mig.config import load_config
    from vlm_mig.trainer import Trainer

    out = work_dir / f"tiny-qwen2vl-clevr-sft-steps{sizes.sft_steps}-n{sizes.train_scenes}-seed{seed}-t{threads}"
    ckpt = out / f"checkpoint-{sizes.sft_steps}"
    if (ckpt / "model.safetensors").is_file():
        return ckpt, None
    overrides = [
        "model.name_or_path=tiny", "model.tiny_arch=qwen2-vl", "data.train=synthetic:clevr", "data.task=count",
        f"data.synthetic_n={sizes.train_scenes}", "data.validation=null", "trainer.eval_steps=0",
        f"trainer.max_steps={sizes.sft_steps}", "trainer.sft_batch_size=16", "trainer.micro_batch_size=16",
        "optim.lr=2e-3", f"trainer.save_steps={sizes.sft_steps}", "trainer.report_to=[]", "trainer.progress=false",
        f"trainer.threads={threads}", f"trainer.output_dir={out}", f"trainer.seed={seed}",
    ]
    t0 = time.perf_counter()
    Trainer(load_config(None, overrides), mode="sft", overwrite=True).train()  # an incomplete cache: train anew
    return ckpt, time.perf_counter() - t0


def rollouts_and_rows(model, processor, sizes: Sizes, seed: int, work_dir: Path):
    """Held-out prompts, their rollouts (one generate call per 8 prompts) and the scored rows' inputs."""
    from vlm_mig.data.sources import load_source
    from vlm_mig.forward import rollout_rows
    from vlm_mig.mig import encode_answers
    from vlm_mig.processing import PromptTemplate, tokenizer_of
    from vlm_mig.prompts import DEFAULT_PROBE, SYSTEM_PROMPT
    from vlm_mig.rewards import RewardSpec, compute_rewards
    from vlm_mig.rollout import HFRolloutEngine
    from vlm_mig.rollout.base import RolloutConfig
    from vlm_mig.rollout.sampling import rollout_seed
    from vlm_mig.steps import StepConfig, segment_batch

    tok = tokenizer_of(processor)
    samples = load_source("synthetic:clevr", task="count", cache_dir=work_dir / "data", n=sizes.prompts,
                          seed=seed + 1 + 1000)  # the trainer's held-out seed (synthetic_seed + 1000)
    engine = HFRolloutEngine(model, processor, RolloutConfig(num_generations=sizes.generations,
                                                             max_new_tokens=sizes.max_new_tokens,
                                                             compute_logprobs=False),
                             PromptTemplate(system_prompt=SYSTEM_PROMPT))
    batches = []
    for start in range(0, len(samples), 8):
        chunk = samples[start : start + 8]
        r = engine.generate(chunk, seeds=[rollout_seed(seed, 0, start + i) for i in range(len(chunk))])
        spans = segment_batch(r.completion_ids, tok, lengths=r.completion_lengths.tolist(), config=StepConfig())
        rew = compute_rewards([r.prompts.texts[int(g)] for g in r.group], r.texts,
                              [RewardSpec("accuracy", 1.0), RewardSpec("format", 1.0)],
                              answer=[r.sample_of(i).variants for i in range(len(r.texts))],
                              task=[r.sample_of(i).task for i in range(len(r.texts))])
        cuts = [sp.prefix_ends if sp.think else [] for sp in spans]
        per_group = {g: encode_answers(tok, s.variants, DEFAULT_PROBE) for g, s in enumerate(r.samples)}
        with torch.no_grad():
            rows = rollout_rows(model, r, cuts, [per_group[int(g)] for g in r.group])
        gold = [r.sample_of(i) for i in range(len(r.texts))]
        batches.append((rows, gold, [int(v or 0) for v in rew.components["accuracy"]]))
    return samples, batches


def score_all(model, rows, precision: str) -> list[torch.Tensor]:
    """l_k of every row (l_0 after the empty think) in one precision: fp32, bf16 autocast over fp32 weights
    (the GPU recipes' ``trainer.bf16``), or bf16 weights."""
    from vlm_mig.forward import score_rows

    if precision == "bf16_weights":
        model = copy.deepcopy(model).to(torch.bfloat16)
        rows = [r if r.prompt.image_embeds is None else
                replace(r, prompt=replace(r.prompt, image_embeds=r.prompt.image_embeds.to(torch.bfloat16)))
                for r in rows]
    probe = torch.zeros(0, dtype=torch.long)  # every copy's probe comes with its answer (encode_answers)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        return [s.l.float().cpu() for s in score_rows(model, rows, probe)]


def l0_after(model, tok, rows, samples, opener: str) -> list[float | None]:
    """l_0 of each row scored after ``<think>`` + ``opener`` (fp32, copy 0 alone)."""
    from vlm_mig.forward import first_copy_rows, score_rows
    from vlm_mig.mig import encode_answers
    from vlm_mig.prompts import DEFAULT_PROBE

    scored = [i for i, r in enumerate(rows) if r.cuts]
    alt = [replace(rows[i], l0_probes=encode_answers(tok, samples[i].variants, DEFAULT_PROBE, opener)["l0_probes"])
           for i in scored]
    out: list[float | None] = [None] * len(rows)
    with torch.no_grad():
        for i, s in zip(scored, score_rows(model, first_copy_rows(alt), torch.zeros(0, dtype=torch.long))):
            out[i] = float(s.l[0])
    return out


def group_stats(r_proc: np.ndarray, G: int) -> dict:
    from vlm_mig.advantages import group_normalize

    a = group_normalize(torch.tensor(r_proc, dtype=torch.float32), G).numpy()
    spread = r_proc.reshape(-1, G).max(1) - r_proc.reshape(-1, G).min(1)
    out = {"groups": int(spread.size), "spread_quantiles": {q: float(np.quantile(spread, q))
                                                            for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
           "min_spread_nonzero": float(spread[spread > 0].min()) if (spread > 0).any() else None,
           "constant_groups": int((spread == 0).sum()), "below": {}}
    abs_a = np.abs(a).reshape(-1, G).max(1)
    for t in SPREADS:
        under = (spread < t) & (spread > 0)
        out["below"][t] = {"groups": int(under.sum()),
                           "max_abs_A_proc": float(abs_a[under].max()) if under.any() else None,
                           "mean_max_abs_A_proc": float(abs_a[under].mean()) if under.any() else None}
    return out, a, spread


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="toy sizes (a smoke run, numbers not meaningful)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "mig_signal"))
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--l0-openers", nargs="+", default=[DEFAULT_L0_OPENER, STEP_OPENER],
                    help="openers l_0 is also scored after (mig.l0_opener), compared with the empty think")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    from vlm_mig.mig import step_gains
    from vlm_mig.models import load_model, load_processor
    from vlm_mig.processing import tokenizer_of

    ckpt, train_s = train_sft(sizes, args.seed, Path(args.work_dir), args.threads)
    model, processor = load_model(ckpt), load_processor(ckpt)
    model.eval()
    t0 = time.perf_counter()
    _, batches = rollouts_and_rows(model, processor, sizes, args.seed, Path(args.work_dir))
    gen_s = time.perf_counter() - t0
    rows = [r for b in batches for r in b[0]]
    samples = [g for b in batches for g in b[1]]
    gold = [s.answer for s in samples]
    acc = [a for b in batches for a in b[2]]
    t0 = time.perf_counter()
    l32 = score_all(model, rows, "fp32")
    l0_open = {o: l0_after(model, tokenizer_of(processor), rows, samples, o) for o in args.l0_openers}
    low = {p: score_all(model, rows, p) for p in ("bf16_autocast", "bf16_weights")}
    score_s = time.perf_counter() - t0
    G = sizes.generations

    def proc(ls: list[torch.Tensor], l0: list[float | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """R_proc per row, and the first step's gain (0 for K = 0)."""
        r, first = np.zeros(len(ls)), np.zeros(len(ls))
        for i, l in enumerate(ls):
            if l0 is not None and l0[i] is not None:
                l = torch.cat([torch.tensor([l0[i]]), l[1:]])
            if l.numel() > 1:
                g = step_gains(l)
                r[i], first[i] = float(g.sum()), float(g[0])
        return r, first

    res: dict = {"args": vars(args), "sizes": sizes.__dict__, "rollouts": len(rows),
                 "with_think": sum(1 for r in rows if r.cuts), "with_steps": sum(1 for l in l32 if l.numel() > 1),
                 "accuracy": float(np.mean(acc)), "timing": {"sft_s": train_s, "generate_s": round(gen_s, 1),
                                                             "score_s": round(score_s, 1)}}
    has = [i for i, l in enumerate(l32) if l.numel() > 1]
    contexts = {"empty_think": None, **{f"opener {o!r}": v for o, v in l0_open.items()}}
    res["contexts"] = list(contexts)
    for name, l0 in contexts.items():
        r_proc, first = proc(l32, l0)
        l0s = [float(l32[i][0]) if l0 is None else l0[i] for i in has]
        by_gold = {}
        for g in sorted({gold[i] for i in has}, key=lambda x: (len(x), x)):
            vals = [v for v, i in zip(l0s, has) if gold[i] == g]
            by_gold[g] = {"n": len(vals), "mean_l0": float(np.mean(vals))}
        stats, a, spread = group_stats(r_proc, G)
        correct = np.array(acc, dtype=bool)
        res[name] = {"mean_l0_by_gold": by_gold, "first_step_gain_share": float(first.sum() / r_proc.sum())
                     if r_proc.sum() > 0 else None, "mean_R_proc": float(r_proc.mean()),
                     "mean_R_proc_correct": float(r_proc[correct].mean()) if correct.any() else None,
                     "mean_R_proc_wrong": float(r_proc[~correct].mean()) if (~correct).any() else None,
                     "groups": stats}
        if name != "empty_think":
            continue
        for prec, l16 in low.items():
            r16, _ = proc(l16)
            a16 = group_stats(r16, G)[1]
            dl = np.concatenate([(x - y).abs().numpy() for x, y in zip(l32, l16)])
            dr = np.abs(r_proc - r16)
            buckets = {}
            edges = (0.0, *SPREADS, float("inf"))
            for lo, hi in zip(edges, edges[1:]):
                rows_in = np.repeat((spread > 0) & (spread >= lo) & (spread < hi), G)
                moved = rows_in & (np.abs(a) > 1e-6)
                flips = np.sign(a[moved]) != np.sign(a16[moved])
                buckets[f"[{lo}, {hi})"] = {"groups": int(rows_in.sum() // G), "rollouts": int(moved.sum()),
                                            "A_proc_sign_flips": float(flips.mean()) if moved.any() else None}
            res[f"{prec}_vs_fp32"] = {
                "abs_delta_l": {"median": float(np.median(dl)), "p95": float(np.quantile(dl, 0.95)),
                                "max": float(dl.max())},
                "abs_delta_R_proc": {"median": float(np.median(dr)), "p95": float(np.quantile(dr, 0.95)),
                                     "max": float(dr.max())},
                "by_spread": buckets}
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    print_tables(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


def print_tables(res: dict) -> None:
    print(f"\n{res['rollouts']} rollouts ({res['with_think']} with a think span, {res['with_steps']} with steps), "
          f"sampled accuracy {res['accuracy']:.3f}")
    golds = list(res["empty_think"]["mean_l0_by_gold"])
    print("\n| l_0 scored after | " + " | ".join(f"gold {g}" for g in golds) + " | first step's share of all gain |")
    print("|---|" + "---|" * (len(golds) + 1))
    for name in res["contexts"]:
        r = res[name]
        share = "-" if r["first_step_gain_share"] is None else f"{r['first_step_gain_share']:.2f}"
        cells = [f"{r['mean_l0_by_gold'][g]['mean_l0']:.2f} (n={r['mean_l0_by_gold'][g]['n']})" for g in golds]
        print(f"| {name} | " + " | ".join(cells) + f" | {share} |")
    g = res["empty_think"]["groups"]
    print(f"\nR_proc spread within the {g['groups']} groups (l_0 after the empty think): quantiles "
          + ", ".join(f"{q}: {v:.3f}" for q, v in g["spread_quantiles"].items())
          + f"; {g['constant_groups']} constant; smallest non-zero {g['min_spread_nonzero']}")
    print("| spread below | groups | max abs A_proc in them | mean of each group's max abs A_proc |")
    print("|---|---|---|---|")
    for t, v in g["below"].items():
        mx = "-" if v["max_abs_A_proc"] is None else f"{v['max_abs_A_proc']:.2f}"
        mn = "-" if v["mean_max_abs_A_proc"] is None else f"{v['mean_max_abs_A_proc']:.2f}"
        print(f"| {t} | {v['groups']} | {mx} | {mn} |")
    for prec in ("bf16_autocast", "bf16_weights"):
        b = res[f"{prec}_vs_fp32"]
        print(f"\n{prec} vs fp32 scoring: |delta l_k| median {b['abs_delta_l']['median']:.4f}, p95 "
              f"{b['abs_delta_l']['p95']:.4f}, max {b['abs_delta_l']['max']:.4f}; |delta R_proc| median "
              f"{b['abs_delta_R_proc']['median']:.4f}, p95 {b['abs_delta_R_proc']['p95']:.4f}, max "
              f"{b['abs_delta_R_proc']['max']:.4f}")
        print("| group spread (nats) | groups | rollouts with A_proc != 0 | A_proc sign flipped |")
        print("|---|---|---|---|")
        for k, v in b["by_spread"].items():
            f = "-" if v["A_proc_sign_flips"] is None else f"{v['A_proc_sign_flips']:.2f}"
            print(f"| {k} | {v['groups']} | {v['rollouts']} | {f} |")
    print(f"\ntotal {res['total_s']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
