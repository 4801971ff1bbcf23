"""What the demo measures: accuracy with its controls, whether stated counts match the scene, where the
process reward goes within groups, the paired MIG - GRPO difference, and the speed of learning.

``evaluate_sets`` and ``credit_examples`` run a model; everything else is pure arithmetic on what the runs
wrote (``metrics.jsonl``) or on per-item verdicts.
"""

from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path
from typing import Any

from vlm_mig import report as rep
from vlm_mig.data.clevr import check_claims, equations, error_kind
from vlm_mig.data.schema import Sample


def evaluate_sets(model, processor, template, label: str, sets: dict[str, list[Sample]],
                  objects: dict[str, dict[str, list[dict]]], max_new_tokens: int, batch_size: int,
                  out: Path) -> dict[str, dict[str, Any]]:
    """Greedy accuracy on each set, with what the completions say about the scene; every graded completion
    goes to ``out/eval/<label>/<set>.jsonl``. ``objects[set][sample id]``: the scene's objects, against which
    the counts a completion states are checked. ``_records`` (dropped before results are saved) keeps the
    graded records for the credit viewer."""
    from vlm_mig.evaluation import evaluate

    result: dict[str, dict[str, Any]] = {}
    folder = out / "eval" / label
    folder.mkdir(parents=True, exist_ok=True)
    for name, samples in sets.items():
        res = evaluate(model, processor, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       template=template, progress=True, name=f"eval {label} {name}")
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in res.records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
        stated = right = all_right = 0
        kinds: collections.Counter = collections.Counter()
        last_eq: collections.Counter = collections.Counter()
        for s, r in zip(samples, res.records):
            n, ok = check_claims(r.completion, objects[name][s.id])
            stated, right, all_right = stated + n, right + ok, all_right + (n > 0 and ok == n)
            if not r.correct:
                kinds[error_kind(r.completion, r.extracted, r.formatted, objects[name][s.id])] += 1
            eqs = equations(r.completion)
            if eqs:  # how far the last equation's stated result is from its own left side (0: right)
                last_eq[str(eqs[-1][2] - eqs[-1][1])] += 1
        answers = collections.Counter(str(r.extracted) for r in res.records)
        hits = [bool(r.correct) for r in res.records]
        n = max(1, res.n)
        result[name] = {
            "n": res.n, "accuracy": res.accuracy, "format_rate": res.format_rate, "mean_length": res.mean_length,
            "correct": hits,
            "distinct_answers": len(answers), "answer_counts": dict(answers.most_common()),
            "distinct_completions": len({r.completion for r in res.records}),
            "counts_match_scene": all_right / n, "stated_counts_right": right / stated if stated else None,
            "stated_counts_per_completion": stated / n,
            "error_kinds": dict(kinds.most_common()), "last_equation_off_by": dict(last_eq.most_common()),
            "accuracy_by_objects": accuracy_by(hits, [s.meta.get("num_objects", "?") for s in samples]),
            "accuracy_by_question_type": accuracy_by(hits, [s.meta.get("question_type", "?") for s in samples]),
            "_records": res.records,
        }
    return result


def headroom_of(model, processor, template, samples: list[Sample], objects: dict[str, list[dict]],
                train: list[Sample], *, samples_k: int, temperature: float, top_p: float, max_new_tokens: int,
                batch_size: int, greedy: list | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The headroom table of a start (``vlm_mig.evaluation.headroom``) on ``samples``: ``samples_k`` completions
    per item at the rollout ``temperature`` / ``top_p``, beside its greedy answers (``greedy``: their records if
    already graded, else generated here). The blind sampler draws from the answers of ``train`` with the item's
    question type; greedy errors are classified against each item's scene (``objects[sample id]``)."""
    from vlm_mig.evaluation import evaluate
    from vlm_mig.evaluation.headroom import answer_shares, headroom

    if greedy is None:
        greedy = evaluate(model, processor, samples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          template=template, progress=progress, name="headroom greedy").records
    res = evaluate(model, processor, samples, samples_k=samples_k, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, batch_size=max(1, batch_size // samples_k), template=template,
                   seed=seed, progress=progress, name=f"headroom {samples_k} samples at T = {temperature:g}")
    by_item = [res.records[i * samples_k : (i + 1) * samples_k] for i in range(len(samples))]
    shares = answer_shares(answers_by_question_type(train))
    return {
        "temperature": temperature, "top_p": top_p,
        **headroom([r.correct for r in greedy], [[r.extracted for r in rs] for rs in by_item],
                   [[r.correct for r in rs] for rs in by_item], [s.answer for s in samples],
                   [shares.get(s.meta.get("question_type", "?"), {}) for s in samples],
                   [None if r.correct else error_kind(r.completion, r.extracted, r.formatted, objects[s.id])
                    for s, r in zip(samples, greedy)]),
    }


def strip_private(ev: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``evaluate_sets`` results without the in-memory records."""
    return {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in ev.items()}


def credit_examples(model, processor, template, samples: list[Sample], completions: list[str], titles: list[str],
                    records: list | None = None) -> list[rep.CreditExample]:
    """``completions`` scored by ``model`` (l_k, watermark, gains as in training) as credit-viewer cards."""
    from vlm_mig.score import score_samples

    if not samples:
        return []
    rows = score_samples(model, processor, samples, completions=completions, template=template, progress=False)
    out = []
    for i, (s, text, row, title) in enumerate(zip(samples, completions, rows, titles)):
        r = records[i] if records else None
        out.append(rep.CreditExample(
            title=title, question=s.question or "", gold=s.answer, completion=text, steps=row["steps"], l=row["l"],
            watermark=row["watermark"], gains=row["gains"], predicted=r.extracted if r else None,
            correct=r.correct if r else None, image=s.images[0] if s.images else None))
    return out


# --------------------------------------------------------------------------------------------------
# Pure summaries


def answers_by_question_type(samples: list[Sample]) -> dict[str, list[str]]:
    """Each question type's answers, in sample order (what a blind guesser knows of the training set)."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for s in samples:
        out[s.meta.get("question_type", "?")].append(s.answer)
    return dict(out)


def accuracy_by(hits: list[bool], keys: list[Any]) -> dict[str, float]:
    """The share of ``hits`` per key (keys as strings, sorted as strings), e.g. by question type."""
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for hit, key in zip(hits, keys, strict=True):
        groups[str(key)].append(hit)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def combine_credit(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Pool within-group credit statistics (``mixed_groups``, ``correct_higher``, ``correct_lower``,
    ``corr_groups``, ``corr``) as counts: each share weighted by the number of groups it was taken over. None
    when there is nothing to pool."""
    parts = [p for p in parts if p and p.get("mixed_groups") is not None]
    if not parts:
        return None
    mixed = sum(p["mixed_groups"] for p in parts)
    corr_n = sum(p["corr_groups"] for p in parts if p.get("corr") is not None)

    def pooled(key: str, weight: str, total: float) -> float | None:
        if not total:
            return None
        return sum(p[key] * p[weight] for p in parts if p.get(key) is not None) / total

    return {"mixed_groups": int(mixed), "correct_higher": pooled("correct_higher", "mixed_groups", mixed),
            "correct_lower": pooled("correct_lower", "mixed_groups", mixed), "corr_groups": int(corr_n),
            "corr": pooled("corr", "corr_groups", corr_n)}


def credit_over_training(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``credit/*`` metrics of a MIG run, pooled over its training steps (``combine_credit``): over the
    sampled groups with mixed outcomes, the share where the right rollouts earn more R_proc than the wrong ones
    (and less), the mean within-group correlation of A_proc with A_out, and the mean share of the process
    advantage (sum of |A_proc|) that sat in groups whose outcomes were all equal. None when the run logged none
    (GRPO never computes R_proc)."""
    steps = [{k.removeprefix("credit/"): v for k, v in m.items() if k.startswith("credit/")} for m in metrics]
    steps = [c for c in steps if c.get("mixed_groups") is not None]
    pooled = combine_credit(steps)
    if pooled is None:
        return None
    # The part of the process advantage in groups whose outcomes were all equal (GRPO has no gradient there).
    share = [v for m in metrics if (v := m.get("adv/proc_share_equal_outcome")) is not None and v == v]
    return {"steps": len(steps), **pooled, "proc_share_equal_outcome": statistics.fmean(share) if share else None}


def paired_difference(a: list[list[bool]], b: list[list[bool]], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean of ``b - a`` over seeds and items, with a 95% two-level bootstrap interval over seeds and items.

    ``a[s][i]``, ``b[s][i]``: whether method a / b answered item i right in seed s (the same items, the same
    seeds; a start that every seed shares, such as the SFT checkpoint, is the same row repeated). Each resample
    draws the seeds with replacement and, independently, the items with replacement (the same items for every
    drawn seed), so the interval holds both the run-to-run variation and the finite test set while keeping the
    pairing by seed and by item. With one seed only the items vary."""
    import numpy as np

    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)) or not a or not a[0]:
        raise ValueError("paired_difference needs the same seeds and items for both methods")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # [seeds, items]
    S, n = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(n_boot, S))
    items = rng.integers(0, n, size=(n_boot, n))
    # Mean over the drawn seeds x drawn items = mean over drawn items of the drawn-seed mean of each item.
    per_item = np.stack([d[seeds[r]].mean(0) for r in range(n_boot)])  # [n_boot, items]
    boots = np.sort(np.take_along_axis(per_item, items, axis=1).mean(1))
    lo, hi = boots[int(0.025 * (n_boot - 1))], boots[int(0.975 * (n_boot - 1))]
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "items": n, "seeds": S, "n_boot": n_boot,
            "levels": "seeds and items" if S > 1 else "items"}


def weight_movement(model, start: Path) -> dict[str, float]:
    """How far training moved the trained weights from the start checkpoint: ``|theta - theta_0| / |theta_0|``
    over every parameter that trains (the language model; the frozen vision tower does not move). The start is
    loaded as a model, so parameter names match whatever the checkpoint's key layout is."""
    import torch

    from vlm_mig.models import load_model

    start_params = dict(load_model(str(start)).named_parameters())
    diff = base = 0.0
    n = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or name not in start_params:
            continue
        p0 = start_params[name].detach().to(torch.float64)
        diff += float((p.detach().cpu().to(torch.float64) - p0).square().sum())
        base += float(p0.square().sum())
        n += p.numel()
    return {"relative_change": (diff / base) ** 0.5 if base > 0 else float("nan"), "parameters": n}


def training_trend(curves: dict[str, list[list[dict[str, Any]]]], window: int) -> dict[str, Any]:
    """Sampled training accuracy (``reward/accuracy``, the rollouts' own) at the start and the end of each run:
    the mean over the first and the last ``window`` steps, per method (mean over seeds and per seed)."""
    out: dict[str, Any] = {}
    for method, runs in curves.items():
        per_seed = []
        for rows in runs:
            _, acc = rep.series(rows, "reward/accuracy")
            if acc:
                per_seed.append({"first": statistics.fmean(acc[:window]), "last": statistics.fmean(acc[-window:])})
        out[method] = {"window": window, "per_seed": per_seed,
                       "first": statistics.fmean(p["first"] for p in per_seed) if per_seed else None,
                       "last": statistics.fmean(p["last"] for p in per_seed) if per_seed else None}
    return out


def learning_speed(curves: dict[str, list[list[dict[str, Any]]]], window: int) -> dict[str, Any]:
    """Smoothed training accuracy (``reward/accuracy``) per method, and the step at which MIG's smoothed
    curve first reaches GRPO's final value (on the seed-mean curves, and per seed); also the reverse."""
    series = {m: [rep.series(rows, "reward/accuracy") for rows in runs] for m, runs in curves.items()}
    mean = {m: rep.mean_curve(series[m]) for m in series}
    sm = {m: rep.smooth(mean[m][1], window) for m in series}
    target = sm["grpo"][-1] if sm["grpo"] else None
    out: dict[str, Any] = {
        "target": target, "window": window, "mig_final": sm["mig"][-1] if sm["mig"] else None,
        "mig_step": None if target is None else rep.steps_to_reach(target, mean["mig"][0], sm["mig"], window),
        "grpo_step_to_mig_final": (None if not sm["mig"] else
                                   rep.steps_to_reach(sm["mig"][-1], mean["grpo"][0], sm["grpo"], window)),
    }
    per_seed = []
    for s, (g, m) in enumerate(zip(series["grpo"], series["mig"])):
        gs, ms = rep.smooth(g[1], window), rep.smooth(m[1], window)
        per_seed.append({"seed": s, "grpo_final": gs[-1] if gs else None, "mig_final": ms[-1] if ms else None,
                         "mig_step": rep.steps_to_reach(gs[-1], m[0], ms, window) if gs else None})
    out["per_seed"] = per_seed
    return out
