"""bench/step_validity.py: its statistics, the GSM8K corruption, and the ``--quick`` run end to end (deterministic).

The study's numbers are reported by the script (README, "Does MIG credit the right steps?"), never asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "step_validity.py"


@pytest.fixture(scope="module")
def sv():
    spec = importlib.util.spec_from_file_location("step_validity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_rank_statistics_match_their_definitions(sv):
    assert sv.rankdata(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    assert sv.spearman(x, x**3) == pytest.approx(1.0)
    assert sv.spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(sv.spearman(x, np.ones(5)))
    # Spearman with ties = Pearson on tie-averaged ranks (the textbook definition).
    y = np.array([2, 0, 1, 2, 1])
    rx, ry = sv.rankdata(x), sv.rankdata(y)
    assert sv.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    # AUC = P(pos > neg) + P(tie) / 2, counted pair by pair.
    rng = np.random.default_rng(0)
    score, pos = rng.integers(0, 4, 40).astype(float), rng.random(40) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in score[pos] for b in score[~pos]]
    assert sv.auc(score, pos) == pytest.approx(np.mean(pairs))
    assert sv.auc(np.zeros(6), np.array([1, 0, 1, 0, 0, 1], bool)) == 0.5


def test_bootstrap_resamples_whole_groups_deterministically(sv):
    groups = np.repeat(np.arange(30), 3)
    values = np.repeat(np.arange(30, dtype=float), 3)
    a = sv.bootstrap(groups, lambda ix: values[ix].mean(), 200, seed=1)
    assert a == sv.bootstrap(groups, lambda ix: values[ix].mean(), 200, seed=1)
    assert a[0] == pytest.approx(14.5) and a[1] < a[0] < a[2]
    # Each resample keeps the 3 rows of a drawn group together: row counts stay multiples of 3.
    assert sv.bootstrap(groups, lambda ix: float(len(ix) % 3), 50, seed=2) == (0.0, 0.0, 0.0)


def test_corrupt_changes_one_number_of_one_step_keeping_its_format(sv):
    steps = ["The cost came out to 80,000+50,000=$130,000", "He pays 2.5 per day", "So he made it"]
    for seed in range(30):
        j, new, old, repl = sv.corrupt(steps, random.Random(seed))
        assert j in (0, 1) and old in ("130,000", "2.5") and repl != old
        assert [i for i in range(3) if new[i] != steps[i]] == [j]
        i = steps[j].rindex(old)
        assert new[j] == steps[j][:i] + repl + steps[j][i + len(old):]
        if old == "130,000":
            assert "," in repl and abs(int(repl.replace(",", "")) - 130000) <= 9
        else:
            assert len(repl.split(".")[1]) == 1 and float(repl) >= 0
        assert sv.corrupt(steps, random.Random(seed)) == (j, new, old, repl)
    assert sv.corrupt(["no numbers here"], random.Random(0)) is None


def test_synthetic_step_table_labels_every_step(sv):
    samples, meta = sv.synthetic_samples(5, seed=0)
    assert len(samples) == 20 and {m["variant"] for m in meta} == {"correct", "redundant", "wrong_local",
                                                                   "wrong_propagated"}
    assert samples == sv.synthetic_samples(5, seed=0)[0]
    def fake(s, m):
        K = len(m["labels"])
        ls = {mode: [float(k) * (2 if mode == "sum" else 1) for k in range(K + 1)] for mode in ("mean", "sum",
                                                                                               "digits", "margin")}
        return {"id": s.id, "steps": [f"so {s.answer} now"] * K, "l_by_answer_score": ls,
                "l0_by_context": {"empty_think": {m_: 0.0 for m_ in ls}, "opener": {m_: 0.5 for m_ in ls}}}

    tab = sv.step_table([fake(s, m) for s, m in zip(samples, meta)], meta, [s.answer for s in samples])
    assert len(tab["g:MIG g_k"]) == sum(len(m["labels"]) for m in meta)
    assert set(tab["label"]) == {"correct", "redundant", "wrong"}
    # l_k = k: every raw difference and gain is 1 (2 under the sequence log-prob); the opener's l_0 = 0.5
    # halves the first gain; every step states the gold, so its first digit matches.
    assert (tab["g:raw l_k - l_{k-1}"] == 1).all() and (tab["g:MIG, answer sum"] == 2).all()
    first = tab["k"] == 1
    assert (tab["g:MIG, l_0 after the opener"][first] == 0.5).all()
    assert (tab["g:MIG, l_0 after the opener"][~first] == 1).all()
    assert tab["first_digit"].all() and (tab["pos"] > 0).all() and (tab["pos"] <= 1).all()
    # steps after a propagated error are flagged, and only those
    for m in meta:
        rows = (tab["problem"] == m["problem"]) & (tab["variant"] == m["variant"])
        expect = [m["variant"] == "wrong_propagated" and k > m["error_at"] for k in range(len(m["labels"]))]
        assert tab["downstream"][rows].tolist() == expect


def _run(*args):
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", *args], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_quick_run_end_to_end_and_deterministic(sv, tmp_path):
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    work, assets = tmp_path / "work", tmp_path / "assets"
    stdout = _run("--work-dir", str(work), "--assets", str(assets), "--json", str(out1))
    r1 = json.loads(out1.read_text())
    syn = r1["synthetic"]["all steps (library labels)"]
    assert set(syn["rows"]) == {*sv.OPTIONS, "position k/K", "MIG 1[g_k > 0]"}
    assert syn["by_label"]["wrong last step, same first digit as the gold"]["n"] + syn["by_label"][
        "wrong last step, another first digit"]["n"] == syn["by_label"]["wrong, last step (states a wrong answer)"]["n"]
    for name, row in syn["rows"].items():
        for point, lo, hi in (row["spearman"], row["auc"]):
            # After 6 SFT steps a gain floor can leave a score constant (no correlation to measure): NaN.
            assert (lo <= point <= hi and -1 <= point <= 1) or (name != "MIG g_k" and np.isnan(point)), name
    assert set(syn["label_counts"]) == {"correct", "redundant", "wrong"} and all(syn["label_counts"].values())
    assert (assets / "step_validity_synthetic.png").is_file()
    assert "Spearman with label" in stdout and "total" in stdout.splitlines()[-1]
    gsm = r1["gsm8k"]
    if "skipped" not in gsm:  # SmolLM2 present (make test installs it)
        assert gsm["n_problems"] == 2 and (assets / "step_validity_gsm8k.png").is_file()
        assert 0 <= gsm["rows"]["all"]["l_K gold higher"][0] <= 1
        for row in r1["gsm8k_rows"]:  # gold and corrupted solutions share every l_k before the corrupted step
            j = row["corrupted_step"]
            assert row["l_gold"][:j] == pytest.approx(row["l_corrupted"][:j], abs=1e-5)
    # Retrain from scratch with the same seed: same weights, same scores, same statistics.
    _run("--work-dir", str(work), "--assets", str(assets), "--json", str(out2), "--retrain", "--skip-gsm8k")
    r2 = json.loads(out2.read_text())
    assert r2["train"]["final_loss"] == r1["train"]["final_loss"]
    assert r2["synthetic"]["all steps (library labels)"] == syn
    assert r2["synthetic"]["by_checkpoint"] == r1["synthetic"]["by_checkpoint"]
