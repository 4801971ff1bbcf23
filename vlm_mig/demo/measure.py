"""What the demo measures: accuracy with its controls, whether stated counts match the scene, where the
process reward goes within groups, the paired MIG - GRPO difference, and the speed of learning.

``evaluate_sets`` and ``credit_examples`` run a model; everything else is pure arithmetic on what the runs
wrote (``metrics.jsonl``) or on per-item verdicts.
"""

from __future__ import annotations

import collections
import json
import random
import statistics
from pathlib import Path
from typing import Any

from vlm_mig import report as rep
from vlm_mig.data.clevr import check_claims
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
        for s, r in zip(samples, res.records):
            n, ok = check_claims(r.completion, objects[name][s.id])
            stated, right, all_right = stated + n, right + ok, all_right + (n > 0 and ok == n)
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
            "accuracy_by_objects": accuracy_by(hits, [s.meta.get("num_objects", "?") for s in samples]),
            "accuracy_by_question_type": accuracy_by(hits, [s.meta.get("question_type", "?") for s in samples]),
            "_records": res.records,
        }
    return result


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
    (and less), and the mean within-group correlation of A_proc with A_out. None when the run logged none (GRPO
    never computes R_proc)."""
    steps = [{k.removeprefix("credit/"): v for k, v in m.items() if k.startswith("credit/")} for m in metrics]
    steps = [c for c in steps if c.get("mixed_groups") is not None]
    pooled = combine_credit(steps)
    return None if pooled is None else {"steps": len(steps), **pooled}


def paired_difference(a: list[list[bool]], b: list[list[bool]], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean of ``b - a`` over seeds and items, with a 95% bootstrap interval over items.

    ``a[s][i]``, ``b[s][i]``: whether method a / b answered item i right in seed s (the same items, the same
    seeds). Items are resampled with replacement, the same resample for every seed, so the interval keeps
    both the pairing by item and the spread over seeds."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)) or not a or not a[0]:
        raise ValueError("paired_difference needs the same seeds and items for both methods")
    n = len(a[0])
    per_item = [statistics.fmean(float(y[i]) - float(x[i]) for x, y in zip(a, b)) for i in range(n)]
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(per_item[rng.randrange(n)] for _ in range(n)) for _ in range(n_boot))
    lo, hi = boots[int(0.025 * (n_boot - 1))], boots[int(0.975 * (n_boot - 1))]
    return {"mean": statistics.fmean(per_item), "ci95": [lo, hi], "items": n, "seeds": len(a), "n_boot": n_boot}


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
