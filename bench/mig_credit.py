"""Which process-reward variant credits the steps that carry the count, not the ones that restate a number?

Rollouts of an RL run's start (its config: model, data, G, temperature) are scored once in the packed pass;
every variant of the process reward is read off the same ``l_k``:

- the answer score: ``mean`` log-prob of the gold (SPEC) or ``margin`` (the gold against its most likely
  competitor token);
- the records that earn credit: ``all`` (SPEC's watermark) or ``kept`` (capped at the last step's score, so a
  record a later step abandons earns nothing); and the raw ``l_K - l_0`` without the watermark.

Within groups (what the advantage sees), for each variant:

- ``right_over_wrong``: the share of (right, wrong) rollout pairs of one group where the right one has the
  higher R_proc (ties count half);
- ``restating_gap``: in groups with wrong rollouts that mention the gold number in their steps and wrong ones
  that do not, the mean A_proc of the first minus the second (a number stated, then not answered, should earn
  nothing: ideally 0);
- ``right_over_restating``: as ``right_over_wrong``, against the wrong rollouts that mention the gold only;
- ``positive_wrong_mentioning``: of the wrong rollouts with A_proc > 0, the share that mention the gold;
- the faulty step: for rollouts whose last step writes an equation, the last step's gain ``g_K`` and its raw
  change ``l_K - l_{K-1}`` by how far the equation's result is off (0: right; -1: the slip of the demo's
  imperfect teacher), so one can see whether the step credit points at the step that is wrong;
- noise: the R_proc spread of each group, and ``twin_gap``: |delta R_proc| between two different completions of
  one group that state the same numbers and the same answer (what wording alone moves R_proc: the noise floor
  ``mig.min_spread`` should sit above it), absolute and relative to the group's mean |l_k|.

    python bench/mig_credit.py --config RUN.yaml [--prompts 128] [--json out.json] [key=value ...]

Deterministic for a config and thread count (one thread by default).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from _common import write_json  # noqa: E402

VARIANTS = [("mean", "all"), ("mean", "kept"), ("margin", "all"), ("margin", "kept"), ("mean", "raw")]
_HEADER = re.compile(r"### Step \d+:")
_NUMBER = re.compile(r"\d+")


def stated_numbers(think: str) -> list[str]:
    """The numbers a think span states, step headers left out."""
    return _NUMBER.findall(_HEADER.sub(" ", think))


def within_group_stats(correct: list[bool], mentions: list[bool], r_proc: torch.Tensor, a_proc: torch.Tensor,
                       G: int) -> dict[str, float]:
    """The within-group statistics of one variant (see the module docstring)."""
    pairs = wins = 0.0
    rpairs = rwins = 0.0
    gaps: list[float] = []
    pos_wrong = pos_wrong_mention = 0
    for g in range(len(correct) // G):
        idx = range(g * G, (g + 1) * G)
        right = [i for i in idx if correct[i]]
        wrong = [i for i in idx if not correct[i]]
        for i, j in itertools.product(right, wrong):
            pairs += 1
            wins += 1.0 if r_proc[i] > r_proc[j] else 0.5 if r_proc[i] == r_proc[j] else 0.0
            if mentions[j]:
                rpairs += 1
                rwins += 1.0 if r_proc[i] > r_proc[j] else 0.5 if r_proc[i] == r_proc[j] else 0.0
        wm = [float(a_proc[i]) for i in wrong if mentions[i]]
        wn = [float(a_proc[i]) for i in wrong if not mentions[i]]
        if wm and wn:
            gaps.append(statistics.mean(wm) - statistics.mean(wn))
        for i in wrong:
            if a_proc[i] > 0:
                pos_wrong += 1
                pos_wrong_mention += mentions[i]
    return {"right_over_wrong": wins / pairs if pairs else float("nan"),
            "right_over_restating": rwins / rpairs if rpairs else float("nan"),
            "restating_gap": statistics.mean(gaps) if gaps else float("nan"), "restating_groups": len(gaps),
            "positive_wrong": pos_wrong,
            "positive_wrong_mentioning": pos_wrong_mention / pos_wrong if pos_wrong else float("nan")}


def noise(texts: list[str], answers: list[str | None], r_proc: torch.Tensor, l_abs: torch.Tensor,
          thinks: list[str], G: int) -> dict[str, float]:
    """Spread of R_proc per group, and the R_proc gap between different completions with the same content."""
    spreads, twin, twin_rel = [], [], []
    for g in range(len(texts) // G):
        idx = list(range(g * G, (g + 1) * G))
        rp = r_proc[idx]
        spreads.append(float(rp.max() - rp.min()))
        scale = float(l_abs[idx].mean())
        for i, j in itertools.combinations(idx, 2):
            same = stated_numbers(thinks[i]) == stated_numbers(thinks[j]) and answers[i] == answers[j]
            if same and texts[i] != texts[j]:
                d = abs(float(r_proc[i] - r_proc[j]))
                twin.append(d)
                twin_rel.append(d / scale if scale > 0 else 0.0)

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")

    return {"groups": len(spreads), "spread_median": q(spreads, 0.5),
            "groups_under": {f"{t:g}": sum(s < t for s in spreads) for t in (0.01, 0.05, 0.1, 0.2, 0.5)},
            "twin_pairs": len(twin), "twin_gap_p50": q(twin, 0.5), "twin_gap_p90": q(twin, 0.9),
            "twin_gap_p95": q(twin, 0.95), "twin_rel_p50": q(twin_rel, 0.5), "twin_rel_p90": q(twin_rel, 0.9),
            "twin_rel_p95": q(twin_rel, 0.95)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="an RL run's config (model = the start to measure)")
    ap.add_argument("--prompts", type=int, default=128, help="training prompts (G rollouts each)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vlm_mig.advantages import group_normalize
    from vlm_mig.config import load_config
    from vlm_mig.data.clevr import equations
    from vlm_mig.forward import pad_rows, rollout_rows, score_rows
    from vlm_mig.mig import encode_answers, final_score, process_reward, step_gains
    from vlm_mig.processing import tokenizer_of
    from vlm_mig.rewards import extract_answer
    from vlm_mig.rl import stages
    from vlm_mig.trainer import Trainer

    t0 = time.perf_counter()
    cfg = load_config(args.config, [*args.overrides, "loss.alpha=1", "trainer.output_dir=" +
                                    str(Path(os.environ.get("TMPDIR", "/tmp")) / "vlm-mig-mig-credit")])
    cfg.trainer.prompts_per_step = args.batch
    trainer = Trainer(cfg, mode="rl")
    tok = tokenizer_of(trainer.processor)
    G = cfg.rollout.num_generations
    rows_l: dict[str, list[torch.Tensor]] = {"mean": [], "margin": []}
    correct, mentions, texts, answers, thinks, last_off = [], [], [], [], [], []
    with torch.no_grad():
        for step in range(-(-args.prompts // args.batch)):
            samples, seeds = trainer.batch_for(step, args.batch)
            batch = stages.rollout(trainer.engine, samples, seeds)
            stages.segment(batch, trainer.tok, trainer.step_cfg)
            stages.reward(batch, trainer.reward_specs)
            r = batch.rollouts
            per_group = [encode_answers(tok, s.variants, cfg.mig.probe, cfg.mig.opener) for s in r.samples]
            cuts = [sp.prefix_ends if sp.think else [] for sp in batch.spans]
            rows = rollout_rows(trainer.model, r, cuts, [per_group[int(g)] for g in r.group])
            for sc in score_rows(trainer.model, rows, trainer.scorer.probe_ids, cfg.mig.max_tokens_per_batch):
                for mode in rows_l:
                    rows_l[mode].append(sc.l_by_score[mode].cpu())
            for i, text in enumerate(r.texts):
                sp = batch.spans[i]
                think = " ".join(sp.texts) if sp.think else ""
                gold = batch.samples[i].answer
                correct.append(bool(batch.acc[i] > 0.5))
                mentions.append(gold in stated_numbers(think))
                texts.append(text)
                thinks.append(think)
                eqs = equations(sp.texts[-1]) if sp.think and sp.texts else []
                last_off.append(eqs[-1][2] - eqs[-1][1] if eqs else None)
                answers.append(extract_answer(text))
    n = len(correct)
    n_wrong = max(1, n - sum(correct))
    out: dict = {"config": args.config, "rollouts": n, "G": G, "accuracy": sum(correct) / n,
                 "wrong_mentioning_gold": sum(m and not c for m, c in zip(mentions, correct)) / n_wrong,
                 "variants": {}}
    for score, records in VARIANTS:
        ls = rows_l[score]
        width = max(1, max(x.numel() for x in ls))
        valid = torch.arange(width) < torch.tensor([x.numel() for x in ls]).unsqueeze(1)
        L = pad_rows(ls, width)
        has_steps = valid.sum(-1) > 1
        if records == "raw":
            r_proc = torch.where(has_steps, final_score(L, valid) - L[:, 0], 0.0)
        else:
            r_proc = process_reward(L, valid, records=records)
        a_proc = group_normalize(r_proc, G)
        name = f"{score}/{records}"
        out["variants"][name] = within_group_stats(correct, mentions, r_proc, a_proc, G)
        l_abs = torch.where(valid, L.abs(), 0.0).sum(-1) / valid.sum(-1)
        out["variants"][name]["noise"] = noise(texts, answers, r_proc, l_abs, thinks, G)
        if records != "raw":
            gains = step_gains(L, valid, records=records)
            K = valid.sum(-1) - 1
            by_off: dict[str, list[tuple[float, float]]] = {}
            for i, off in enumerate(last_off):
                if off is not None and K[i] >= 1 and off in (-1, 0, 1):
                    raw = float(L[i, K[i]] - L[i, K[i] - 1])
                    by_off.setdefault(f"{off:+d}", []).append((float(gains[i, K[i] - 1]), raw))
            out["variants"][name]["last_step"] = {
                off: {"n": len(v), "gain": statistics.fmean(g for g, _ in v), "raw": statistics.fmean(r for _, r in v),
                      "share_gain_positive": sum(g > 0 for g, _ in v) / len(v)} for off, v in sorted(by_off.items())}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{n} rollouts ({n // G} groups of {G}), accuracy {out['accuracy']:.3f}; wrong rollouts that mention the "
          f"gold: {out['wrong_mentioning_gold']:.3f}")
    print("| variant | right > wrong | right > wrong-restating | restating gap (A_proc) | positive wrong that "
          "restate | spread median | groups < 0.05 | twin gap p50 / p90 / p95 | twin gap / mean abs l p90 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, v in out["variants"].items():
        nz = v["noise"]
        print(f"| {name} | {v['right_over_wrong']:.3f} | {v['right_over_restating']:.3f} | {v['restating_gap']:+.3f} "
              f"({v['restating_groups']} groups) | {v['positive_wrong_mentioning']:.3f} of {v['positive_wrong']} | "
              f"{nz['spread_median']:.3f} | {nz['groups_under']['0.05']} of {nz['groups']} | "
              f"{nz['twin_gap_p50']:.3f} / "
              f"{nz['twin_gap_p90']:.3f} / {nz['twin_gap_p95']:.3f} ({nz['twin_pairs']} pairs) | "
              f"{nz['twin_rel_p90']:.3f} |")
    print("\nthe last step, by how far its equation's result is off (mean g_K; mean l_K - l_{K-1}; share g_K > 0):")
    for name, v in out["variants"].items():
        if "last_step" in v:
            print(f"  {name}: " + "; ".join(f"off {off} ({d['n']}): g {d['gain']:.3f}, raw {d['raw']:+.3f}, "
                                          f"{d['share_gain_positive']:.2f}" for off, d in v["last_step"].items()))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
