"""The evaluation harness: registry, suites, pass@k, reports, resume, text-only models, gold grading.

Model runs use the tiny offline models with a few items and a short completion budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest

from vlm_mig.data.loaders import COUNT_QUESTION
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.data.suites import BenchmarkSpec, load_eval_samples, spec_from_mapping
from vlm_mig.evaluation import (
    EvalOptions,
    SampleRecord,
    SampleStore,
    add_eval_command,
    evaluate,
    grade_completions,
    load_suite,
    pass_at_k,
    pass_k_values,
    summarize,
    template_from_run_config,
)
from vlm_mig.processing import PromptTemplate
from vlm_mig.prompts import SYSTEM_PROMPT
from vlm_mig.rollout import HFRolloutEngine

SMALL_SUITE = """
name: small
defaults:
  max_new_tokens: 8
  batch_size: 4
benchmarks:
  - name: gsm8k
    n: 4
  - name: clevr_cogen_b
    n: 4
"""


def run_cli(argv: list[str]) -> int:
    """``vlm-mig eval ...`` through the subparser the harness adds (as cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="vlm-mig")
    add_eval_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.handler(args)


def write_suite(tmp_path: Path, text: str = SMALL_SUITE) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(text)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class GenerateSpy:
    """Counts the items the real ``HFRolloutEngine.generate`` is asked for (it still runs)."""

    def __init__(self, monkeypatch):
        self.ids: list[str] = []
        real = HFRolloutEngine.generate
        spy = self

        def generate(engine, samples, seeds=None):
            spy.ids.extend(s.id for s in samples)
            return real(engine, samples, seeds=seeds)

        monkeypatch.setattr(HFRolloutEngine, "generate", generate)


# ----------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # fewer wrong samples than k: some draw is always right
    assert pass_at_k(8, 8, 8) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert pass_k_values(1) == [1]
    assert pass_k_values(8) == [1, 2, 4, 8]
    assert pass_k_values(6) == [1, 2, 4, 6]


def test_pass_at_k_is_the_mean_over_all_k_subsets():
    """The estimator equals the exact fraction of k-subsets holding a correct sample."""
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_summarize_averages_pass_at_k_over_items():
    samples = [Sample(id=f"q{i}", answer="1", task="count", question="?") for i in range(2)]
    correct = {"q0": [True, False, False, False], "q1": [False, False, False, False]}
    records = [
        SampleRecord("b", sid, j, "count", "p", "c", "1", "1", ok, True, 3)
        for sid, oks in correct.items()
        for j, ok in enumerate(oks)
    ]
    res = summarize("b", samples, records, 4, extraction="strict", model="m", template={}, decoding={},
                    source={}, timestamp="t")  # fmt: skip
    assert res.pass_at_k == {1: pytest.approx(0.125), 2: pytest.approx(0.25), 4: pytest.approx(0.5)}
    assert res.accuracy == pytest.approx(1 / 8)
    assert res.format_rate == 1.0 and res.mean_length == 3.0 and res.n == 2


# ----------------------------------------------------------------------------------------------
# Gold grading, registry, suites
# ----------------------------------------------------------------------------------------------


def test_math500_gold_solutions_score_100_through_the_harness():
    res = grade_completions("math500")
    assert res.n == 500
    assert res.accuracy == 1.0, [(r.gold, r.extracted) for r in res.records if not r.correct][:5]
    assert res.graders["math"]["name"] == "math-verify" and res.graders["math"]["version"] != "unknown"


def test_gold_cli_writes_reports_without_a_model(tmp_path, capsys):
    out = tmp_path / "gold"
    assert run_cli(["--gold", "--suite", "ood", "--limit", "3", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {
        "math500", "gsm8k", "svamp", "aime24", "amc23", "minerva_math", "clevr_cogen_b", "arithmetic_long"
    }  # fmt: skip
    assert all(b["accuracy"] == 1.0 and b["n"] == 3 for b in results["benchmarks"].values())
    assert results["benchmarks"]["arithmetic_long"]["source"]["num_steps"] == [5, 7]


def test_shipped_suites_parse():
    ood = load_suite("ood")
    assert [b.name for b in ood.benchmarks] == [
        "math500", "gsm8k", "svamp", "aime24", "amc23", "minerva_math", "clevr_cogen_b", "arithmetic_long"
    ]  # fmt: skip
    assert ood.benchmarks[-1].source == "arithmetic" and ood.benchmarks[-1].num_steps == (5, 7)
    sc = load_suite("superclevr")
    assert sc.benchmarks[0].source == "superclevr" and sc.benchmarks[0].data is None
    assert load_suite("clevr").benchmarks[0].source == "clevr_cogen_a"
    multi = load_suite("clevr_multistep").benchmarks
    assert [(b.source, b.question_mix, b.list_objects) for b in multi] == [
        ("clevr_cogen_a", "multistep", False), ("clevr_cogen_b", "multistep", False)]
    # the demo's OOD shift: condition B with 5-8 objects
    from vlm_mig.demo.plan import OOD_OBJECTS, QUESTION_MIX, TRAIN_OBJECTS

    assert (multi[0].num_objects, multi[1].num_objects) == (TRAIN_OBJECTS, OOD_OBJECTS)
    assert multi[0].question_mix == QUESTION_MIX


def test_suite_errors_name_the_entry(tmp_path):
    bad = write_suite(tmp_path, "benchmarks:\n  - name: gsm8k\n    num_steps: [5, 7]\n")
    with pytest.raises(DataError, match=r"benchmarks\[0\].*does not use \['num_steps'\]"):
        load_suite(bad)
    bad.write_text("benchmarks:\n  - name: gsm8k\n    max_new_token: 5\n")
    with pytest.raises(DataError, match="unknown key"):
        load_suite(bad)
    bad.write_text("benchmarks:\n  - name: nope\n")
    with pytest.raises(DataError, match="unknown source 'nope'"):
        load_suite(bad)
    with pytest.raises(DataError, match="not found"):
        load_suite("no_such_suite")


def test_synthetic_sets_are_deterministic_and_prefix_stable(tmp_path):
    spec = BenchmarkSpec(name="clevr_cogen_b", n=6)
    few = load_eval_samples(spec, limit=2, cache_dir=tmp_path / "c1")
    more = load_eval_samples(spec, cache_dir=tmp_path / "c2")
    assert [s.id for s in few] == [s.id for s in more[:2]]
    assert [s.answer for s in few] == [s.answer for s in more[:2]]
    assert all(Path(p).is_file() for s in more for p in s.images)
    assert all(s.meta["condition"] == "B" for s in more)
    arith = load_eval_samples(BenchmarkSpec(name="arithmetic", n=20))
    assert all(5 <= s.meta["num_steps"] <= 7 for s in arith)


def test_clevr_benchmarks_take_the_training_question_mix(tmp_path):
    """The CoGenT sets can be drawn with the multi-step questions (and count-only steps) a model trained on
    ``data.synthetic_mix: multistep`` answers; each setting is its own cached set and part of the resume key."""
    from vlm_mig.data.clevr import QUESTION_TYPES, check_claims

    spec = spec_from_mapping({"name": "clevr_cogen_b", "n": 12, "num_objects": [5, 8], "question_mix": "multistep",
                              "list_objects": False}, "test")
    items = load_eval_samples(spec, cache_dir=tmp_path)
    plain = load_eval_samples(BenchmarkSpec(name="clevr_cogen_b", n=12), cache_dir=tmp_path)
    assert len({s.meta["question_type"] for s in items}) >= 4 and set(QUESTION_TYPES) >= {
        s.meta["question_type"] for s in items}
    assert {s.meta["question_type"] for s in plain} != {s.meta["question_type"] for s in items}
    assert all(5 <= s.meta["num_objects"] <= 8 and s.meta["condition"] == "B" for s in items)
    for s in items:  # gold steps state counts (no listing) that agree with the scene JSON
        objects = json.loads((Path(s.images[0]).parent.parent / s.meta["scene"]).read_text())["objects"]
        stated, right = check_claims("\n".join(s.gold_steps), objects)
        assert stated == right > 0 and " and a " not in " ".join(s.gold_steps)
    assert spec.describe()["question_mix"] == "multistep" and spec.describe()["list_objects"] is False
    with pytest.raises(DataError, match="question_mix 'nope'"):
        BenchmarkSpec(name="clevr_cogen_a", question_mix="nope")


def test_superclevr_both_layouts_and_missing_image(tmp_path):
    from vlm_mig.data.synthetic import write_clevr

    folder = tmp_path / "sc"
    scenes = write_clevr(folder, n=3, condition="all", seed=3)
    # Super-CLEVR layout: images/ + scenes/*.json; gold = number of objects.
    items = load_eval_samples(spec_from_mapping({"name": "superclevr", "data": str(folder)}, "test"))
    assert [s.question for s in items] == [COUNT_QUESTION] * 3
    assert [s.answer for s in items] == [str(s.meta["num_objects"]) for s in scenes]
    # R1-V layout: a jsonl naming its images, answers in <answer> tags.
    counts = [s.meta["num_objects"] for s in scenes]
    rows = [
        {"image_path": s.images[0], "problem": COUNT_QUESTION, "solution": f"<answer> {n} </answer>"}
        for s, n in zip(scenes, counts)
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r1v = load_eval_samples(BenchmarkSpec(name="superclevr", data=str(folder / "test.jsonl")))
    assert [s.answer for s in r1v] == [s.answer for s in items]
    # A missing image is an error naming it.
    missing = folder / scenes[1].images[0]
    missing.unlink()
    with pytest.raises(DataError, match=missing.name):
        load_eval_samples(BenchmarkSpec(name="superclevr", data=str(folder / "test.jsonl")))
    with pytest.raises(DataError, match="--data"):
        load_eval_samples(BenchmarkSpec(name="superclevr"))


def test_template_from_run_config(tmp_path):
    assert template_from_run_config(tmp_path) is None
    config = {"data": {"system_prompt": "default", "question_suffix": " Go."}}
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    assert template_from_run_config(tmp_path) == PromptTemplate(system_prompt=SYSTEM_PROMPT, question_suffix=" Go.")
    (tmp_path / "run_config.json").write_text(json.dumps({"data": {"system_prompt": None}}))
    assert template_from_run_config(tmp_path) == PromptTemplate(system_prompt=None)


def test_samples_follow_the_checkpoints_rollout_settings(tmp_path):
    from vlm_mig.evaluation import EvalOptions
    from vlm_mig.evaluation.options import sampling_from_run_config

    assert sampling_from_run_config(tmp_path) == {}
    (tmp_path / "run_config.json").write_text(json.dumps({"rollout": {"temperature": 1.0, "top_p": 1.0}}))
    found = sampling_from_run_config(tmp_path)
    assert found == {"sampling_temperature": 1.0, "sampling_top_p": 1.0}
    opts = EvalOptions(**found)
    assert opts.decoding() == (None, None)  # K = 1 stays greedy
    assert opts.updated({"samples": 8}, "x").decoding() == (1.0, 1.0)
    assert opts.updated({"samples": 8, "temperature": 0.3}, "x").decoding() == (0.3, None)  # a flag wins
    assert opts.updated({"samples": 8, "top_p": 0.9}, "x").decoding() == (1.0, 0.9)
    assert EvalOptions(samples=4).decoding() == (0.6, 0.95)  # no run config: the project's sampling default
    (tmp_path / "run_config.json").write_text(json.dumps({"rollout": {"temperature": 0.0}}))
    assert sampling_from_run_config(tmp_path) == {}  # greedy rollouts say nothing about sampling


def test_eval_samples_at_the_rollout_temperature_of_the_run(tiny_vl_dir, tmp_path):
    import shutil

    model = tmp_path / "ckpt"
    shutil.copytree(tiny_vl_dir, model)
    (model / "run_config.json").write_text(json.dumps({"rollout": {"temperature": 0.8, "top_p": 0.9}}))
    out = tmp_path / "out"
    rc = run_cli(["--model", str(model), "--task", "gsm8k", "--limit", "2", "--samples", "2", "--max-new-tokens",
                  "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    decoding = json.loads((out / "results.json").read_text())["benchmarks"]["gsm8k"]["decoding"]
    assert (decoding["mode"], decoding["temperature"], decoding["top_p"]) == ("sampling", 0.8, 0.9)


# ----------------------------------------------------------------------------------------------
# Model runs (tiny models)
# ----------------------------------------------------------------------------------------------


def test_short_suite_end_to_end_on_tiny_vl(tiny_vl_dir, tmp_path):
    out = tmp_path / "out"
    suite = str(write_suite(tmp_path))
    rc = run_cli(["--model", str(tiny_vl_dir), "--suite", suite, "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"] == {}
    for name in ("gsm8k", "clevr_cogen_b"):
        b = results["benchmarks"][name]
        assert b["n"] == 4 and b["samples"] == 1 and set(b["pass_at_k"]) == {"1"}
        assert 0 <= b["accuracy"] <= 1 and 0 <= b["format_rate"] <= 1 and 0 < b["mean_length"] <= 8
        assert b["decoding"] == {"mode": "greedy", "samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8}
        assert b["template"]["name"] == "default" and b["model"] == str(Path(tiny_vl_dir).resolve())
        assert b["timestamp"] and b["graders"]
    assert results["benchmarks"]["gsm8k"]["graders"]["numeric"]["name"] == "numeric-tolerance"
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 8
    for row in rows:
        assert {"prompt", "completion", "extracted", "gold", "correct", "formatted", "length"} <= set(row)
    clevr = [r for r in rows if r["benchmark"] == "clevr_cogen_b"]
    assert all(len(r["images"]) == 1 and Path(r["images"][0]).is_file() for r in clevr)
    assert "<|image_pad|>" in clevr[0]["prompt"]
    table = (out / "results.md").read_text()
    assert "| gsm8k | numeric | 4 | 1 |" in table and "| clevr_cogen_b | count | 4 | 1 |" in table


def test_text_only_model_skips_or_refuses_image_benchmarks(tiny_text_dir, tmp_path, capsys, make_image):
    out = tmp_path / "out"
    suite = str(write_suite(tmp_path))
    rc = run_cli(["--model", str(tiny_text_dir), "--suite", suite, "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == ["gsm8k"]
    assert "text-only" in results["skipped"]["clevr_cogen_b"]
    assert "skipped: benchmark 'clevr_cogen_b'" in capsys.readouterr().err
    assert not (out / "cache").exists()  # the scenes were not drawn for nothing
    # One image benchmark asked for by name is an error naming it, not a crash.
    assert run_cli(["--model", str(tiny_text_dir), "--task", "clevr_cogen_b", "--limit", "2",
                    "--out", str(tmp_path / "o2"), "--no-progress"]) == 2  # fmt: skip
    assert "benchmark 'clevr_cogen_b' shows images, but the model is text-only" in capsys.readouterr().err
    # Same for a user jsonl whose rows turn out to have images.
    make_image("a.png")
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "How many?", "image": "a.png", "answer": "1"}) + "\n")
    assert run_cli(["--model", str(tiny_text_dir), "--task", "count", "--data", str(data),
                    "--out", str(tmp_path / "o3"), "--no-progress"]) == 2  # fmt: skip
    assert "benchmark 'mine' shows images" in capsys.readouterr().err


def test_missing_image_in_user_data_names_the_file(tiny_vl_dir, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "How many?", "image": "gone.png", "answer": "1"}) + "\n")
    rc = run_cli(["--model", str(tiny_vl_dir), "--task", "count", "--data", str(data), "--out", str(tmp_path / "o"),
                  "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "mine.jsonl:1" in err and "gone.png" in err


def test_resume_regenerates_only_missing_items(tiny_vl_dir, tmp_path, monkeypatch, capsys):
    suite = write_suite(tmp_path)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_cli(["--model", str(tiny_vl_dir), "--suite", str(suite), "--out", str(full), "--no-progress"]) == 0
    lines = (full / "samples.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 8
    # Interrupted after 3 completions, in the middle of writing the 4th.
    resumed.mkdir()
    (resumed / "samples.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    spy = GenerateSpy(monkeypatch)
    assert run_cli(["--model", str(tiny_vl_dir), "--suite", str(suite), "--out", str(resumed), "--no-progress"]) == 0
    assert "torn last line" in capsys.readouterr().err
    missing = [json.loads(line)["id"] for line in lines[3:]]
    assert spy.ids == missing
    # Every line whole, each key once, and the same completions and grades as the uninterrupted run.
    rows_full, rows_resumed = read_jsonl(full / "samples.jsonl"), read_jsonl(resumed / "samples.jsonl")
    key = lambda r: (r["benchmark"], r["id"], r["sample"])  # noqa: E731
    assert len(rows_resumed) == 8 and len({key(r) for r in rows_resumed}) == 8
    # (image paths differ only by the --out folder holding the drawn scenes)
    strip = lambda r: {**r, "time": None, "images": [Path(p).name for p in r["images"]]}  # noqa: E731
    assert sorted(map(strip, rows_resumed), key=key) == sorted(map(strip, rows_full), key=key)
    res_full = json.loads((full / "results.json").read_text())["benchmarks"]
    res_resumed = json.loads((resumed / "results.json").read_text())["benchmarks"]
    for name in res_full:
        for field in ("n", "accuracy", "format_rate", "mean_length", "pass_at_k", "answered_rate"):
            assert res_full[name][field] == res_resumed[name][field]
    # A finished run resumes to nothing; other settings in the same folder are refused.
    spy.ids.clear()
    assert run_cli(["--model", str(tiny_vl_dir), "--suite", str(suite), "--out", str(resumed), "--no-progress"]) == 0
    assert spy.ids == []
    assert run_cli(["--model", str(tiny_vl_dir), "--suite", str(suite), "--out", str(resumed), "--no-progress",
                    "--max-new-tokens", "6"]) == 2  # fmt: skip
    assert "other settings" in capsys.readouterr().err


def test_sampled_pass_at_k_resumes_to_the_same_completions(tiny_text_dir, tmp_path, monkeypatch):
    """K = 3 seeded samples per item: an item cut mid-way is redrawn whole, and only its missing
    completions are kept; they equal the uninterrupted run's because each has its own stream.

    One prompt per generate call: ``SeededSampling`` keys its noise on the padded sequence length, so a
    prompt batched with different neighbours (other left padding) draws other tokens for now.
    """
    from vlm_mig.models import load_model, load_processor

    model, tok = load_model(tiny_text_dir), load_processor(tiny_text_dir)
    spec = BenchmarkSpec(name="arithmetic", n=3)
    kwargs = dict(samples_k=3, temperature=1.0, max_new_tokens=6, batch_size=1, progress=False, seed=7)
    full = evaluate(model, tok, spec, store=SampleStore(tmp_path / "a.jsonl"), **kwargs)
    assert sorted(full.pass_at_k) == [1, 2, 3] and full.decoding["top_p"] == 0.95
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_bytes(b"".join(lines[:4]))  # item 0 whole, item 1 with 1 of 3
    spy = GenerateSpy(monkeypatch)
    store = SampleStore(tmp_path / "b.jsonl")
    again = evaluate(model, tok, spec, store=store, **kwargs)
    assert spy.ids == [full.records[3].id, full.records[6].id]  # items 1 and 2 only
    assert [r.completion for r in again.records] == [r.completion for r in full.records]
    assert again.pass_at_k == full.pass_at_k
    assert len(read_jsonl(tmp_path / "b.jsonl")) == 9


def test_in_process_evaluate_on_samples_restores_training_mode(tiny_text_dir):
    """The trainer's validation path: a list of Samples, no files."""
    from vlm_mig.data.synthetic import make_arithmetic
    from vlm_mig.models import load_model, load_processor

    model, tok = load_model(tiny_text_dir), load_processor(tiny_text_dir)
    model.train()
    res = evaluate(model, tok, make_arithmetic(3, seed=5), max_new_tokens=4, batch_size=2,
                   template=PromptTemplate.r1v(), progress=False)  # fmt: skip
    assert model.training
    assert res.n == 3 and res.name == "samples" and res.template["name"] == "r1v"
    assert all(r.length <= 4 for r in res.records) and "Output the thinking process" in res.records[0].prompt


def test_eval_options_validation():
    with pytest.raises(DataError, match="unknown option"):
        EvalOptions().updated({"sample": 2}, "x")
    with pytest.raises(DataError, match="extraction"):
        EvalOptions().updated({"extraction": "loose"}, "x")
    assert EvalOptions().updated({"template": "r1v"}, "x").template == PromptTemplate.r1v()
    # K greedy copies would be identical: refused before anything is generated.
    with pytest.raises(ValueError, match="identical"):
        evaluate(None, None, [Sample(id="a", answer="1", question="q")], samples_k=2, temperature=0.0)


def test_store_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "samples.jsonl"
    good = json.dumps(SampleRecord("b", "x", 0, "count", "p", "c", None, "1", False, False, 1).to_json())
    text = good + "\n{not json\n" + good.replace('"x"', '"y"') + "\n"
    path.write_text(text)
    with pytest.raises(DataError, match=r"samples.jsonl:2"):
        SampleStore(path)
    assert path.read_text() == text  # a refused file is left as it is
