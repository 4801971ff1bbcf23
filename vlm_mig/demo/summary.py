"""``report.md`` and ``steps.html`` of a finished demo, from what ``results.json`` holds (no model here)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from vlm_mig import report as rep
from vlm_mig.demo.measure import combine_credit
from vlm_mig.demo.plan import METHODS, OOD_OBJECTS, QUESTION_MIX, SFT_CONTROL, TRAIN_OBJECTS, DemoPlan

SETS = ("id", "ood")


def _pct(v: float | None) -> str:
    return rep.fmt_pct([v])


def _points(v: float) -> str:
    return f"{100 * v:+.1f}"


def _runs(res: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The result rows of a model: one for SFT and its control, one per seed for GRPO and MIG."""
    return res[model] if isinstance(res[model], list) else [res[model]]


def _names(full: dict[str, Any]) -> dict[str, str]:
    """Result key -> row name, in table order."""
    teacher = full["plan"]["testbed"] == "teacher"
    control = SFT_CONTROL[full["plan"]["testbed"]]
    return {"sft": "SFT start (imperfect teacher)" if teacher else "SFT start",
            control[0]: control[1] + ("" if teacher else "; tested on blank images"), "grpo": "GRPO", "mig": "MIG"}


def results_table(full: dict[str, Any]) -> str:
    """Accuracy, the share of completions whose stated counts all match the scene, distinct answers, format."""
    res = full["results"]
    rows = []
    for model, name in _names(full).items():
        runs = _runs(res, model)
        rows.append([name, *[rep.fmt_pct([r[s]["accuracy"] for r in runs]) for s in SETS],
                     *[rep.fmt_pct([r[s]["counts_match_scene"] for r in runs]) for s in SETS],
                     " / ".join(str(round(sum(r[s]["distinct_answers"] for r in runs) / len(runs), 1)).rstrip("0")
                                .rstrip(".") for s in SETS),
                     rep.fmt_pct([r["id"]["format_rate"] for r in runs])])
    blind = full["blind_baseline"]
    rows.append(["blind prior (most common training answer per question type; no image, no model)",
                 *[rep.fmt_pct([blind[s]["accuracy"]]) for s in SETS], "–", "–", "–", "–"])
    return rep.markdown_table(["model", "ID accuracy", "OOD accuracy", "ID counts match scene",
                               "OOD counts match scene", "distinct answers ID / OOD", "ID format"], rows)


def sees_text(full: dict[str, Any], plan: DemoPlan) -> str:
    """Does the SFT start use the image? Its margin over the blind prior and over the blank-image control."""
    res, blind = full["results"], full["blind_baseline"]
    sft, blank, prior = res["sft"]["id"]["accuracy"], res["sft-blank"]["id"]["accuracy"], blind["id"]["accuracy"]
    se = (sft * (1 - sft) / max(1, plan.test_scenes)) ** 0.5
    return (f"The SFT start answers {_pct(sft)} of the ID items, {_points(sft - prior)} points over the blind prior "
            f"({_pct(prior)}) and {_points(sft - blank)} over the same SFT on blank images ({_pct(blank)}); with "
            f"{plan.test_scenes} items the binomial standard error of one accuracy near {100 * sft:.0f}% is "
            f"±{100 * se:.1f} points. {_pct(res['sft']['id']['counts_match_scene'])} of its ID completions state "
            f"only counts that match the scene (the control: {_pct(res['sft-blank']['id']['counts_match_scene'])}), "
            f"and its greedy ID answers take {res['sft']['id']['distinct_answers']} distinct values.")


def slipped(r: dict[str, Any], split: str, slip: int) -> int:
    """Greedy completions of one run whose last equation is off by the teacher's ``slip``."""
    return int(r[split].get("last_equation_off_by", {}).get(str(slip), 0))


def room_text(full: dict[str, Any], plan: DemoPlan) -> str:
    """The teacher testbed: what the start got wrong that the ceiling did not, and where its errors sit."""
    res, blind = full["results"], full["blind_baseline"]
    start, ceil, prior = (res["sft"]["id"]["accuracy"], res["sft-clean"]["id"]["accuracy"],
                          blind["id"]["accuracy"])
    n = plan.test_scenes
    return (f"The start answers {_pct(start)} of the ID items, the same SFT on the clean solutions {_pct(ceil)}: "
            f"a gap of {100 * (ceil - start):.1f} points that the teacher's error opened (the blind prior: "
            f"{_pct(prior)}). {slipped(res['sft'], 'id', plan.teacher_slip)} of the start's {n} greedy ID "
            f"completions end on an equation off by {plan.teacher_slip:+d}, as the teacher's did "
            f"(the ceiling: {slipped(res['sft-clean'], 'id', plan.teacher_slip)}). Its greedy errors by kind "
            f"(share of the items): " + ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in
                                                   res["sft"]["id"]["error_kinds"].items()) + ".")


def over_start_table(full: dict[str, Any], plan: DemoPlan) -> str:
    """Each RL method against the start every seed shares: two-level bootstrap, weights moved, training accuracy,
    and on the teacher testbed the share of the gap to the ceiling closed and the slips left."""
    res, teacher = full["results"], plan.testbed == "teacher"
    gap = res["sft-clean"]["id"]["accuracy"] - res["sft"]["id"]["accuracy"] if teacher else None
    rows = []
    for m in METHODS:
        d = full["over_start"][m]
        cells = [m.upper()]
        for s in SETS:
            lo, hi = d[s]["ci95"]
            cells.append(f"{_points(d[s]['mean'])} [{_points(lo)}, {_points(hi)}]")
        if teacher:
            cells.append(f"{100 * d['id']['mean'] / gap:.0f}%" if gap and gap > 0 else "–")
            runs = res[m]
            cells.append(f"{statistics.fmean(slipped(r, 'id', plan.teacher_slip) for r in runs):.1f}")
        moved = [r["weights"]["relative_change"] for r in res[m] if r.get("weights")]
        cells.append(f"{100 * statistics.fmean(moved):.2f}%" if moved else "–")
        t = full["training_accuracy"][m]
        cells.append("–" if t["first"] is None else f"{_pct(t['first'])} -> {_pct(t['last'])}")
        rows.append(cells)
    head = ["method", "ID: minus the start (points) [95% interval]", "OOD: minus the start [95% interval]"]
    if teacher:
        head += ["share of the ID gap to the ceiling closed",
                 f"greedy ID completions ending off by {plan.teacher_slip:+d} (start: "
                 f"{slipped(res['sft'], 'id', plan.teacher_slip)})"]
    head += ["weights moved (|theta - theta_0| / |theta_0|, language model)",
             f"sampled training accuracy, first -> last {plan.smooth_window} steps"]
    return rep.markdown_table(head, rows)


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}%"


def headroom_table(starts: dict[str, dict[str, Any]]) -> str:
    """The headroom of each start (``vlm_mig.evaluation.headroom``: percentages of the test items), one column
    per start."""
    names = list(starts)
    first = starts[names[0]]
    K, T = first["samples"], first["temperature"]
    rows = [["greedy accuracy", *[_num(starts[n]["greedy"]) for n in names]]]
    for k in first["pass_at_k"]:
        rows.append([f"pass@{k} (T = {T:g})", *[_num(starts[n]["pass_at_k"].get(k)) for n in names]])
    for k in first["majority_at_k"]:
        if int(k) > 1:  # keys are strings once the table has been through JSON
            rows.append([f"majority@{k}", *[_num(starts[n]["majority_at_k"].get(k)) for n in names]])
    if "blind_pass_at_k" in first:
        for k in first["blind_pass_at_k"]:
            rows.append([f"blind sampler pass@{k}", *[_num(starts[n]["blind_pass_at_k"].get(k)) for n in names]])
    rows.append([f"wrong under greedy, right in >= 3/8 of {K} samples (fixable)",
                 *[_num(starts[n]["fixable"]) for n in names]])
    rows.append([f"never right in {K} samples", *[_num(starts[n]["never_right"]) for n in names]])
    kinds = [k for k in ("perception", "arithmetic", "logic", "format")
             if any(k in starts[n].get("error_kinds", {}) for n in names)]
    for k in kinds:
        rows.append([f"greedy errors: {k}", *[_num(starts[n].get("error_kinds", {}).get(k, 0.0)) for n in names]])
    return rep.markdown_table(["% of test items", *names], rows)


def signal_table(signals: dict[str, dict[str, dict[str, float]]]) -> str:
    """Gradient signal-to-noise of one RL step per start and loss term (``vlm_mig.rl.signal``)."""
    terms = {"outcome": "outcome term (the GRPO update)", "process": "process term", "configured": "the run's loss"}
    rows = []
    for start, sig in signals.items():
        for term, label in terms.items():
            if term in sig:
                v = sig[term]
                share = v.get("power_share_equal_outcome")
                rows.append([start, label, f"{v['snr']:.3f}", f"{v['noise_floor']:.3f}",
                             f"{v['groups_with_gradient']} of {v['groups']}", f"{v['cosine_two_batches']:+.3f}",
                             "–" if share is None or share != share else f"{100 * share:.0f}%"])
    return rep.markdown_table(["start", "gradient of", "SNR = |mean g|^2 / mean |g|^2 over groups",
                               "pure noise (1 / groups)", "groups with a gradient", "cosine, two halves",
                               "of sum |g|^2: groups with equal outcomes"], rows)


def paired_table(full: dict[str, Any]) -> str:
    rows = []
    for s in SETS:
        p = full["paired"][s]
        lo, hi = p["ci95"]
        rows.append([s.upper(), _points(p["mean"]), f"[{_points(lo)}, {_points(hi)}]", p["items"], p["seeds"],
                     p.get("levels", "items")])
    return rep.markdown_table(["set", "MIG - GRPO (points)", "95% bootstrap interval", "items", "seeds",
                               "resampled"], rows)


def credit_text(full: dict[str, Any]) -> list[str]:
    """Within-group credit of the MIG runs (what the advantage sees), pooled over training steps and seeds."""
    credits = [c for c in full["credit"]["mig"] if c]
    if not credits:
        return []
    total = combine_credit(credits)
    mixed, higher, lower, corr = (total[k] for k in ("mixed_groups", "correct_higher", "correct_lower", "corr"))
    rows = [[f"seed {i}", c["mixed_groups"], _pct(c["correct_higher"]), _pct(c["correct_lower"]),
             "–" if c["corr"] is None else f"{c['corr']:+.2f}"] for i, c in enumerate(credits)]
    rows.append(["all", mixed, _pct(higher), _pct(lower), "–" if corr is None else f"{corr:+.2f}"])
    lines = ["## Where the process reward goes (within groups)", "",
             "Each advantage compares the G rollouts of one prompt, so these statistics do too: over every sampled "
             "training group of the MIG runs whose rollouts had mixed outcomes (some right, some wrong), how often "
             "the right rollouts earned more R_proc than the wrong ones (mean over each side), and the mean "
             "within-group correlation of A_proc with A_out (groups where both vary).", "",
             rep.markdown_table(["MIG run", "groups with mixed outcomes", "right earn more R_proc",
                                 "right earn less", "corr(A_proc, A_out)"], rows), ""]
    if higher is not None and lower is not None and higher != lower:
        agree = "with" if higher > lower else "against"
        lines += [f"In {_pct(higher)} of the mixed groups the right rollouts earned more process reward and in "
                  f"{_pct(lower)} less, so on balance the process advantage pushes {agree} the outcome "
                  "advantage." + ("" if corr is None else f" The mean within-group correlation is {corr:+.2f}."), ""]
    shares = [c["proc_share_equal_outcome"] for c in credits if c.get("proc_share_equal_outcome") is not None]
    if shares:
        lines += [f"Where the outcome advantage is zero: {_pct(statistics.fmean(shares))} of the process advantage "
                  "(sum of |A_proc| over tokens, mean over training steps and seeds) sat in groups whose outcome "
                  "rewards were all equal, the groups where GRPO has no gradient at all.", ""]
    return lines


def reach_text(full: dict[str, Any]) -> str:
    r = full["speed"]
    if r["target"] is None:
        return "No training curves."
    step = r["mig_step"]
    s = (f"GRPO's final smoothed training accuracy is {_pct(r['target'])}; MIG's smoothed curve "
         + (f"first reaches it at step **{step}** of {full['plan']['rl_steps']}" if step is not None
            else "**does not reach it** within the budget") + f" (MIG's own final: {_pct(r['mig_final'])}).")
    g = r["grpo_step_to_mig_final"]
    s += (f" The other way round, GRPO first reaches MIG's final value at step {g}." if g is not None
          else " The other way round, GRPO never reaches MIG's final value.")
    if len(r["per_seed"]) > 1:
        s += " Per seed (MIG step to reach that seed's GRPO final): " + ", ".join(
            f"seed {p['seed']}: {p['mig_step'] if p['mig_step'] is not None else 'not reached'}"
            for p in r["per_seed"]) + "."
    return s


def _by_table(full: dict[str, Any], split: str, key: str, header: str, order=None) -> str:
    res = full["results"]
    models = ["sft", SFT_CONTROL[full["plan"]["testbed"]][0], *METHODS]
    buckets = sorted({k for m in models for r in _runs(res, m) for k in r[split][key]}, key=order)
    rows = [[m.upper() if m in METHODS else m, *[rep.fmt_pct([r[split][key].get(b) for r in _runs(res, m)])
                                                  for b in buckets]] for m in models]
    blind = full["blind_baseline"][split].get(key)
    if blind:  # the control beside the result
        rows.append(["blind prior", *[rep.fmt_pct([blind.get(b)]) for b in buckets]])
    return rep.markdown_table([header, *buckets], rows)


def _what_ran(full: dict[str, Any], plan: DemoPlan) -> list[str]:
    w = full.get("warmup") or {}
    acc = w.get("held_out_count_accuracy", {})
    ood = f"condition B, {OOD_OBJECTS[0]}-{OOD_OBJECTS[1]} objects"
    n_seeds = len(full["seeds"])
    sft = (f"SFT on the solutions of an **imperfect teacher**: the gold step-by-step solutions, except that where the "
           f"last step computes the answer (a total, a sum, a difference) that result and the answer are moved by "
           f"{plan.teacher_slip:+d} with probability {plan.teacher_error_rate:g} (`data.teacher_error_rate`; the "
           "counting steps stay right). Beside it, the identical SFT on the clean gold solutions: the ceiling that "
           "repairing the teacher's error could reach. RL rewards and every test grade the true answers."
           if plan.testbed == "teacher" else
           "SFT on the gold step-by-step solutions; and, as the control, the identical SFT with every image replaced "
           "by a constant grey image (train and test).")
    return [
        "## What ran", "",
        f"1. The embedded tiny Qwen2-VL (1.3M parameters, built offline) with its vision tower warmed up for "
        f"{plan.warmup_steps} steps on condition-A scenes (per-cell object counts from the scene JSON, a throw-away "
        "head; `vlm_mig.warmup`)"
        + (f": held-out image-level counts right {_pct(acc.get('total'))} (total), {_pct(acc.get('shape'))} (per "
           f"shape), {_pct(acc.get('color'))} (per colour)" if acc else "")
        + ". The vision tower stays frozen afterwards.",
        f"2. CLEVR-like scenes (112 px), one question each, from the `{QUESTION_MIX}` mix: count all, count by one "
        "attribute, filter chains (count by two attributes), add, subtract, compare; gold steps state the "
        f"intermediate counts. {plan.train_scenes} training scenes (CLEVR-CoGenT condition A, {TRAIN_OBJECTS[0]}-"
        f"{TRAIN_OBJECTS[1]} objects); an ID test set of {plan.test_scenes} new scenes drawn the same way; a "
        f"zero-shot OOD test set of {plan.test_scenes} scenes under {ood} (cube and cylinder colours never seen in "
        "training, 7-8 objects never seen).",
        f"3. {sft} {plan.sft_steps} steps of {plan.sft_batch}, lr {plan.sft_lr:g} decaying linearly to 0.",
        f"4. Headroom of the start before any RL: {plan.headroom_samples} samples per ID item at the rollout "
        "temperature (pass@k, majority@k), a blind sampler, the kinds of its greedy errors read against the scene "
        "JSON, and the gradient signal-to-noise of one RL step (`bench/rl_headroom.py` measures the same).",
        f"5. RL from the SFT start, twice per seed with identical seeds, data order and budget: **GRPO** "
        f"(`loss.alpha=0 loss.gamma=0`: outcome reward only) and **MIG** (alpha 1, beta 1, gamma 0.1, trajectory "
        f"process credit, records kept to the last step, noise floor `mig.min_spread`). {plan.rl_steps} steps of "
        f"{plan.prompts_per_step} prompts x G = {plan.generations} rollouts (temperature 1, at most "
        f"{plan.max_new_tokens} new tokens), lr {plan.rl_lr:g} constant, `loss.kl_coef=0` for both; "
        f"{n_seeds} seed(s).",
        "6. Greedy evaluation of every model on both test sets (strict `<answer>` extraction, integer match); the "
        "counts each completion states (\"I see 2 cubes\", \"Of these, 1 is red\") are checked against the "
        "scene JSON.", ""]


def report_md(full: dict[str, Any], plan: DemoPlan) -> str:
    m, wt, n_seeds = full["machine"], full["wall_time_s"], len(full["seeds"])
    teacher = plan.testbed == "teacher"
    lines = [f"# vlm-mig demo ({plan.name})", "",
             f"`{full['command']}`, finished {full['finished']}, {rep.fmt_seconds(wt['total'])} in all, on {m['cpu']} "
             f"({m['cores']} cores, torch {m['torch']}" + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
             + f"; {full['threads']} torch thread(s) per training process; 1-min load average "
             + (f"{m['load_average_1min']:.2f} at the start, {full['load_average_1min_at_end']:.2f} at the end"
                if m.get("load_average_1min") is not None else "unknown") + ").", ""]
    if plan.quick:
        lines += ["**`--quick` is a smoke test of the pipeline at toy sizes: its numbers mean nothing.**", ""]
    lines += _what_ran(full, plan)
    lines += [
        "## Results", "",
        f"Greedy accuracy ({plan.test_scenes} items per set"
        + (f"; mean ± sample std over {n_seeds} RL seeds" if n_seeds > 1 else "; one RL seed") + "). \"Counts match "
        "scene\": the share of completions that state at least one count and whose every stated count is right.", "",
        results_table(full), "", room_text(full, plan) if teacher else sees_text(full, plan), ""]
    head = full.get("headroom") or {}
    if head:
        names = {"sft": "the start", "sft-clean": "the ceiling (clean SFT)"}
        lines += ["### Headroom before RL", "",
                  "What the start's own samples hold (percentages of the ID items; samples at the rollout "
                  "temperature). RL on an outcome reward moves probability between completions the policy already "
                  "samples: items right in several of its samples are what it can learn from; a blind sampler "
                  "(answers drawn from the training answers of the item's question type) is what needs no image.",
                  "", headroom_table({names.get(k, k): v for k, v in head.items()}), "",
                  signal_table({names.get(k, k): v["signal"] for k, v in head.items() if v.get("signal")}), ""]
    start_sampled = (head.get("sft") or {}).get("pass_at_k", {})
    start_sampled = start_sampled.get("1", start_sampled.get(1))
    lines += ["### RL against its start", "",
              "Both methods against the SFT start they share, on the same items; the 95% interval is a two-level "
              "bootstrap that resamples the seeds and the items.", "", over_start_table(full, plan), ""]
    if start_sampled is not None:
        lines += [f"For the sampled training accuracy, the start's own: {start_sampled:.1f}% of its samples at the "
                  "rollout temperature are right on the ID set (pass@1 above).", ""]
    lines += ["### MIG against GRPO, paired", "",
              "The same items and seeds for both; the interval resamples seeds and items (two levels).", "",
              paired_table(full), "",
              "ID accuracy by question type:", "", _by_table(full, "id", "accuracy_by_question_type", "model"), "",
              f"OOD accuracy by number of objects ({OOD_OBJECTS[0]}-{OOD_OBJECTS[1]}; 7 and 8 never occur in "
              "training):", "", _by_table(full, "ood", "accuracy_by_objects", "model", order=lambda k: (len(k), k)),
              ""]
    lines += credit_text(full)
    lines += ["## Speed of learning", "", reach_text(full)
              + f" Curves are smoothed with a trailing mean of {plan.smooth_window} steps over the training accuracy "
              "of the sampled rollouts (`reward/accuracy` in `metrics.jsonl`); only points with a full window count.",
              "", "![curves](curves.png)", "",
              "`steps.html`: sample completions of each policy with every reasoning step shaded by its gain g_k, and "
              "the l_k curve with its watermark.", "", "## Wall time", ""]
    last = ("report", "total")
    order = [k for k in wt if k not in last] + [k for k in last[:1] if k in wt]
    lines += [rep.markdown_table(["phase", "time"], [[k, rep.fmt_seconds(wt[k])] for k in order]
                                 + [["**total**", rep.fmt_seconds(wt["total"])]]), ""]
    if full.get("parallel") and full.get("run_time_s"):
        lines += ["Phases marked \"side by side\" ran their two jobs in parallel processes; inside them (overlapping, "
                  "so not added to the total):", "",
                  rep.markdown_table(["job", "time"], [[k, rep.fmt_seconds(v)] for k, v in full["run_time_s"].items()]),
                  ""]
    lines += ["## Files", "",
              "- `results.json`: everything above, with per-item verdicts, accuracy by question type and object "
              "count.",
              "- `configs/*.yaml`: the exact recipe of every run (`vlm-mig sft|train --config configs/<file>` "
              "reruns it).",
              "- `runs/<run>`: checkpoints, `metrics.jsonl` (incl. `credit/*` for MIG), `samples.jsonl`"
              + (", TensorBoard logs" if not plan.quick else "") + ".",
              "- `eval/<model>/<set>.jsonl`: every graded test completion.",
              "- `data/`: the scenes (images, scene JSON, `data.jsonl`" + (", the blank-image twins" if not teacher
                                                                          else "") + ").", ""]
    return "\n".join(lines)


def write_viewer(path: Path, viewer: dict[str, list[rep.CreditExample]], train: list[rep.CreditExample],
                 when: str, plan: DemoPlan) -> None:
    ood = f"condition B, {OOD_OBJECTS[0]}-{OOD_OBJECTS[1]} objects"
    same = "the first {} items of the {} test set ({}), so the policies can be compared item by item."
    ident = f"condition A, {TRAIN_OBJECTS[0]}-{TRAIN_OBJECTS[1]} objects"
    sections = [
        rep.CreditSection("MIG policy (after RL), ID test", "Greedy completions of the final MIG policy (seed 0) on "
                          + same.format(plan.viewer_examples, "ID", ident)
                          + " Each completion is scored by the policy that wrote it, as in training.",
                          viewer.get("mig-seed0 id", [])),
        rep.CreditSection("MIG policy (after RL), OOD test", "The same on " + same.format(
            plan.viewer_examples, "OOD", ood), viewer.get("mig-seed0 ood", [])),
        rep.CreditSection("GRPO policy (after RL), ID test", "The GRPO baseline (seed 0) on the same ID items. GRPO "
                          "never computes l_k while training; they are computed here only to show what MIG would "
                          "have credited.", viewer.get("grpo-seed0 id", [])),
        rep.CreditSection("GRPO policy (after RL), OOD test", "The GRPO baseline on the same OOD items.",
                          viewer.get("grpo-seed0 ood", [])),
        rep.CreditSection("SFT start, ID test", "The common starting point of both RL runs, on the same ID items.",
                          viewer.get("sft id", [])),
        rep.CreditSection("Gold solutions scored by the MIG policy", "The reference step-by-step solutions: a step "
                          "that states a count the answer needs should raise the likelihood of the right answer.",
                          viewer.get("gold", [])),
        rep.CreditSection(f"MIG training rollouts ({when or 'none logged'})", "Sampled rollouts (temperature 1) as "
                          "logged during MIG training (`samples.jsonl`): the l_k and gains here are the ones the "
                          "process reward used at that step.", train),
    ]
    intro = (
        "<p>For each completion, <b>l_k</b> is the length-normalised log-likelihood of the gold answer when the "
        "reasoning is cut after step k and closed with <code>&lt;/think&gt;&lt;answer&gt;</code> (k = 0: no "
        "reasoning yet). The <b>watermark</b> h_k is the best l so far, capped at the last step's l_K "
        "(<code>mig.records: kept</code>: a record counts only as far as the completion keeps it); a step earns "
        "a <b>gain</b> g_k = h_k − h_{k−1} only when it sets a record that lasts, and the process reward is "
        "R_proc = Σ g_k = h_K − h_0. Steps are shaded by g_k: unshaded steps added nothing the completion kept. "
        "Hover a point of a curve for its values.</p>")
    rep.write_steps_html(sections, path, title="vlm-mig demo: which reasoning steps carried information?",
                         intro=intro)


def training_examples(run_dir: Path, n: int, images: dict[str, str]) -> tuple[list[rep.CreditExample], str]:
    """Rollouts logged by a MIG run (``samples.jsonl``: steps, l_k, gains at sampling time), from its first and
    its last logged step."""
    rows = [r for r in rep.read_jsonl(run_dir / "samples.jsonl") if r.get("l")]
    if not rows:
        return [], ""
    steps = sorted({r["step"] for r in rows})
    chosen = [r for r in rows if r["step"] == steps[0]][:n]
    if len(steps) > 1:
        chosen += [r for r in rows if r["step"] == steps[-1]][:n]
    out = [rep.CreditExample(
        title=f"training rollout · step {r['step']} · {r['id']} · reward {r['reward']:.0f}",
        question=r["question"], gold=r["answer"], completion=r["completion"], steps=r["steps"], l=r["l"],
        watermark=r.get("watermark", []), gains=r.get("gains", []), image=images.get(r["id"])) for r in chosen]
    return out, f"steps {steps[0]} and {steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
