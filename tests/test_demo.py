"""`vlm-mig demo`: the quick run writes every output and each one parses; the report helpers on hand-made
inputs (smoothing, steps-to-reach, tables, the credit viewer)."""

from __future__ import annotations

import argparse
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vlm_mig import report as rep
from vlm_mig.demo import add_demo_command, demo_command, main

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Well-formedness (every non-void tag closed in order) and where every src/href points."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith(("data:", "#")):
                self.external.append(v)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check_html(path: Path) -> _Checker:
    c = _Checker()
    c.feed(path.read_text(encoding="utf-8"))
    c.close()
    assert not c.errors, c.errors[:5]
    assert c.stack == [], c.stack
    assert not c.external, f"external assets: {c.external[:3]}"
    return c


# --------------------------------------------------------------------------------------------------
# The command


def test_add_demo_command_parses_the_documented_flags():
    parser = argparse.ArgumentParser(prog="vlm-mig")
    add_demo_command(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["demo"])
    assert (a.out, a.quick, a.seeds, a.plan) == ("out/demo", False, 1, "teacher") and callable(a.handler)
    a = parser.parse_args(["demo", "--out", "x", "--quick", "--seeds", "3", "--plan", "clean"])
    assert (a.out, a.quick, a.seeds, a.plan) == ("x", True, 3, "clean")
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--plan", "nope"])


def test_vlm_mig_cli_has_the_demo_command():
    from vlm_mig.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "demo" in sub.choices
    args = parser.parse_args(["demo", "--quick", "--seeds", "2"])
    assert args.handler is demo_command and args.quick and args.seeds == 2


def test_the_job_entry_runs_without_a_runpy_warning():
    """``python -m vlm_mig.demo.jobs`` (each side-by-side job's process) starts clean: importing the package does
    not import ``jobs`` first, so runpy has nothing to warn about (a warning is an error here)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "vlm_mig.demo.jobs"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "usage: python -m vlm_mig.demo.jobs" in res.stderr, res.stderr
    assert "RuntimeWarning" not in res.stderr and "Traceback" not in res.stderr
    code = "import sys, vlm_mig.demo; print('vlm_mig.demo.jobs' in sys.modules, 'vlm_mig.demo.run' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]


def test_quick_demo_writes_every_output_and_each_parses(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["command"] == f"vlm-mig demo --out {out} --quick"
    assert results["plan"]["testbed"] == "teacher"
    for model in ("sft", "sft-clean"):
        for split in ("id", "ood"):
            r = results["results"][model][split]
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["counts_match_scene"] <= 1.0
            assert len(r["correct"]) == results["plan"]["test_scenes"] and r["distinct_answers"] >= 0
            assert sum(r["error_kinds"].values()) == round((1 - r["accuracy"]) * len(r["correct"]))
    for split in ("id", "ood"):
        p = results["paired"][split]
        assert p["items"] == results["plan"]["test_scenes"] and p["ci95"][0] <= p["mean"] <= p["ci95"][1]
        for method in ("grpo", "mig"):
            d = results["over_start"][method][split]
            assert d["ci95"][0] <= d["mean"] <= d["ci95"][1] and d["seeds"] == 1
    # the headroom of the start and the ceiling: samples at the rollout temperature and one step's gradients
    for label in ("sft", "sft-clean"):
        h = results["headroom"][label]
        K = results["plan"]["headroom_samples"]
        assert h["samples"] == K and h["n"] == results["plan"]["test_scenes"] and h["temperature"] == 1.0
        assert h["greedy"] == pytest.approx(100 * results["results"][label]["id"]["accuracy"], abs=0.01)
        assert set(h["pass_at_k"]) == {str(k) for k in (1, 2, 4)} and set(h["blind_pass_at_k"]) == set(h["pass_at_k"])
        assert set(h["signal"]) == {"outcome", "process", "configured"}
        assert h["signal"]["outcome"]["groups"] == 4 * results["plan"]["prompts_per_step"]  # 4 steps of groups
    assert results["warmup"]["config"]["steps"] == results["plan"]["warmup_steps"]
    for method in ("grpo", "mig"):
        (run,) = results["results"][method]
        assert run["seed"] == 0 and set(run) >= {"id", "ood", "run"}
        metrics = rep.read_jsonl(Path(run["run"]) / "metrics.jsonl")
        # The weights move exactly when some step had a gradient: on the quick plan's weak start every rollout of
        # a few steps may get the same reward, and then GRPO has none (MIG's SFT and process terms may still).
        moved = any(g > 0 for g in rep.series(metrics, "optim/grad_norm")[1])
        assert (run["weights"]["relative_change"] > 0) == moved and run["weights"]["relative_change"] < 1
        assert run["weights"]["parameters"] > 0
        steps, acc = rep.series(metrics, "reward/accuracy")
        assert steps == list(range(1, results["plan"]["rl_steps"] + 1))
        assert rep.series(metrics, "val/accuracy")[0][0] == 0  # the SFT start, validated before RL
        assert (Path(run["run"]) / f"checkpoint-{results['plan']['rl_steps']}" / "model.safetensors").is_file()
        trend = results["training_accuracy"][method]
        assert trend["first"] == pytest.approx(sum(acc[:2]) / 2) and trend["last"] == pytest.approx(sum(acc[-2:]) / 2)
    assert (out / "runs" / "sft" / f"checkpoint-{results['plan']['sft_steps']}" / "model.safetensors").is_file()
    # the two runs differ only in the loss switches (and the output folder)
    import yaml

    grpo = yaml.safe_load((out / "configs" / "grpo-seed0.yaml").read_text())
    mig = yaml.safe_load((out / "configs" / "mig-seed0.yaml").read_text())
    assert (grpo["loss"]["alpha"], grpo["loss"]["gamma"], mig["loss"]["alpha"], mig["loss"]["gamma"]) == (0, 0, 1, 0.1)
    for cfg in (grpo, mig):
        cfg["loss"].pop("alpha"), cfg["loss"].pop("gamma"), cfg["trainer"].pop("output_dir")
        cfg["trainer"].pop("progress_desc")
    assert grpo == mig
    # the start and its ceiling differ only in the teacher's errors (and the output folder)
    sft = yaml.safe_load((out / "configs" / "sft.yaml").read_text())
    ceiling = yaml.safe_load((out / "configs" / "sft-clean.yaml").read_text())
    assert (sft["data"].pop("teacher_error_rate"), sft["data"].pop("teacher_slip")) == (0.75, -1)
    for cfg in (sft, ceiling):
        cfg["trainer"].pop("output_dir"), cfg["trainer"].pop("progress_desc")
    assert sft == ceiling
    assert "teacher_error_rate" not in grpo["data"]  # RL grades the true answers
    wall = results["wall_time_s"]
    assert wall["total"] > 0
    assert {"data", "sft train", "sft-clean train", "headroom-sft samples", "grpo-seed0 train",
            "mig-seed0 train"} <= set(wall)

    with Image.open(out / "curves.png") as im:
        im.verify()
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 600

    c = _check_html(out / "steps.html")
    text = " ".join(c.text)
    assert "MIG policy (after RL), ID test" in text and "GRPO policy (after RL), OOD test" in text
    assert c.counts.get("svg", 0) >= 4 and c.counts.get("img", 0) >= 4  # an l_k curve and the scene per card

    md = (out / "report.md").read_text()
    for needle in ("| model | ID accuracy | OOD accuracy", "| SFT start (imperfect teacher) |", "| GRPO |", "| MIG |",
                   "## Wall time", "curves.png", "smoke test", "| SFT on the clean gold solutions (the ceiling) |",
                   "### Headroom before RL", "| pass@4 (T = 1) |", "| blind sampler pass@1 |", "cosine, two halves",
                   "### RL against its start", "share of the ID gap to the ceiling closed", "MIG against GRPO, paired",
                   "Where the process reward goes (within groups)", "| blind prior"):
        assert needle in md, needle
    for sub in ("eval/sft/id.jsonl", "eval/sft-clean/ood.jsonl", "eval/grpo-seed0/ood.jsonl",
                "eval/mig-seed0/id.jsonl"):
        rows = rep.read_jsonl(out / sub)
        assert len(rows) == results["plan"]["test_scenes"]

    # bench/mig_ablation.py: a MIG variant from the same start, paired with this demo's runs of the seed
    import subprocess
    import sys

    ablation = out / "ablation.json"
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "mig_ablation.py"),
                          "--demo", str(out), "--seeds", "1", "--variant", "half:loss.alpha=0.5", "--serial",
                          "--json", str(ablation)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    v = json.loads(ablation.read_text())["variants"]["half"]
    assert v["overrides"] == {"loss": {"alpha": 0.5}} and v["minus_grpo"]["id"]["seeds"] == 1
    assert yaml.safe_load((out / "configs" / "ablation" / "half-seed0.yaml").read_text())["loss"]["alpha"] == 0.5
    assert "| half |" in res.stdout
    assert set(v["watched"]) >= {"loss/clip_frac_out", "adv/zero_std_out"}  # the run means of what options move


def test_the_clean_plan_trains_its_control_on_blank_images(tmp_path):
    """The previous demo stays available as ``--plan clean``: its start learns the gold solutions and its control
    the same on blank images (the recipes are written; nothing is trained here)."""
    import yaml

    from vlm_mig.demo.plan import CLEAN, PLANS, quick_of
    from vlm_mig.demo.run import make_data, sft_jobs

    plan = quick_of(CLEAN)
    assert plan.testbed == "clean" and plan.control == "sft-blank" and set(PLANS) == {"teacher", "clean"}
    paths = make_data(plan, tmp_path / "data")
    blank_rows = rep.read_jsonl(paths["blank_train"])
    assert {tuple(r["images"]) for r in blank_rows} == {("blank.png",)}
    jobs = sft_jobs(plan, paths, tmp_path, 1, [])
    assert [j["label"] for j in jobs] == ["sft", "sft-blank"]
    sft = yaml.safe_load((tmp_path / "configs" / "sft.yaml").read_text())
    blank = yaml.safe_load((tmp_path / "configs" / "sft-blank.yaml").read_text())
    assert Path(blank["data"]["train"]).name == "data-blank.jsonl" and "teacher_error_rate" not in sft["data"]
    for cfg in (sft, blank):
        cfg["data"].pop("train"), cfg["trainer"].pop("output_dir"), cfg["trainer"].pop("progress_desc")
    assert sft == blank


# --------------------------------------------------------------------------------------------------
# Report helpers


def test_smooth_is_a_trailing_mean_without_look_ahead():
    assert rep.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert rep.smooth([0, 0, 9], 1) == [0, 0, 9]
    assert rep.smooth([], 3) == []


def test_steps_to_reach_counts_only_full_windows():
    steps = [1, 2, 3, 4, 5]
    # the first point (window 1 of 2) is above the target but does not count
    assert rep.steps_to_reach(0.5, steps, [0.9, 0.2, 0.4, 0.6, 0.7], window=2) == 4
    assert rep.steps_to_reach(0.5, steps, [0.1] * 5, window=2) is None
    assert rep.steps_to_reach(0.1, steps, [0.1] * 5, window=1) == 1


def test_mean_curve_and_tables():
    steps, mean, std = rep.mean_curve([([1, 2, 3], [0.0, 1.0, 2.0]), ([2, 3], [3.0, 4.0])])
    assert steps == [2, 3] and mean == [2.0, 3.0] and std == [1.0, 1.0]
    assert rep.fmt_pct([0.5]) == "50.0%"
    assert rep.fmt_pct([0.4, 0.6]) == f"50.0 ± {100 * math.sqrt(0.02):.1f}%"
    assert rep.fmt_pct([None]) == "–"
    assert rep.markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"


def test_credit_example_fills_watermark_and_gains():
    ex = rep.CreditExample(title="t", question="q", gold="3", completion="c", steps=["a", "b", "c"],
                           l=[-2.0, -1.0, -1.5, -0.5])
    assert ex.watermark == [-2.0, -1.0, -1.0, -0.5]
    assert ex.gains == [1.0, 0.0, 0.5]


def test_steps_html_is_self_contained_and_shades_only_record_steps(tmp_path, make_image):
    good = rep.CreditExample(title="one <b>", question="How many?", gold="3", completion="<think>x</think>",
                             steps=["### Step 1: I see 2 cubes.", "### Step 2: a sphere.", "### Step 3: 2 + 1 = 3."],
                             l=[-3.0, -1.0, -2.0, -0.2], predicted="3", correct=True, image=make_image())
    empty = rep.CreditExample(title="no think", question="q", gold="1", completion="1", steps=[], l=[])
    path = rep.write_steps_html([rep.CreditSection("S", "intro", [good, empty])], tmp_path / "s.html", title="T")
    c = _check_html(path)
    doc = path.read_text()
    assert c.counts["svg"] == 2 and c.counts["img"] == 1 and 'src="data:image/png;base64,' in doc
    assert "one &lt;b&gt;" in doc  # escaped
    assert doc.count("rgba(44,160,44,0.000)") == 1  # step 2 (a detour below the record) is unshaded
    assert "K = 0, so R_proc = 0" in doc


@pytest.mark.parametrize("l", [[-1.0], [-1.0, -1.0], [-2.0, -0.5, -0.7]])
def test_l_curve_svg_parses(l):
    ex = rep.CreditExample(title="", question="", gold="", completion="", steps=["s"] * (len(l) - 1), l=l)
    svg = rep.l_curve_svg(ex.l, ex.watermark, ex.gains)
    c = _Checker()
    c.feed(svg)
    assert not c.errors and c.counts["circle"] == len(l) and c.counts["polyline"] == 2


# --------------------------------------------------------------------------------------------------
# The demo's measurements on hand-made inputs


def test_paired_difference_resamples_seeds_too():
    from vlm_mig.demo.measure import paired_difference

    # Seed 0 gains every item, seed 1 none: resampling items alone would see a constant +0.5 per item (an
    # interval of width 0); resampling the seeds too spans both outcomes.
    start = [[False] * 20] * 2
    rl = [[True] * 20, [False] * 20]
    p = paired_difference(start, rl, n_boot=400)
    assert p["mean"] == 0.5 and p["levels"] == "seeds and items" and p["seeds"] == 2
    assert p["ci95"][0] == 0.0 and p["ci95"][1] == 1.0
    one = paired_difference(start[:1], rl[:1], n_boot=50)
    assert one["levels"] == "items" and one["ci95"] == [1.0, 1.0]


def test_paired_difference_by_hand():
    from vlm_mig.demo.measure import paired_difference

    grpo = [[True, False, False, True], [True, True, False, False]]
    mig = [[True, True, False, True], [False, True, True, False]]
    # per item, mean over the two seeds of mig - grpo: (0 - 1) / 2, (1 + 0) / 2, (0 + 1) / 2, 0 -> mean +0.125
    p = paired_difference(grpo, mig, n_boot=500)
    assert p["mean"] == 0.125 and p["items"] == 4 and p["seeds"] == 2
    lo, hi = p["ci95"]
    assert -0.5 <= lo < 0.125 < hi <= 0.5  # resample means lie in [-0.5, 0.5]
    same = paired_difference(grpo, grpo, n_boot=100)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        paired_difference(grpo, mig[:1], n_boot=10)


def test_credit_over_training_pools_steps_as_counts():
    from vlm_mig.demo.measure import combine_credit, credit_over_training

    rows = [{"step": 1, "credit/mixed_groups": 1.0, "credit/correct_higher": 1.0, "credit/correct_lower": 0.0,
             "credit/corr_groups": 1.0, "credit/corr": 0.5},
            {"step": 2, "credit/mixed_groups": 3.0, "credit/correct_higher": 0.0, "credit/correct_lower": 2 / 3,
             "credit/corr_groups": 3.0, "credit/corr": -0.5},
            {"step": 3, "credit/mixed_groups": 0.0, "credit/correct_higher": None, "credit/correct_lower": None,
             "credit/corr_groups": 0.0, "credit/corr": None}]
    c = credit_over_training(rows)
    assert c["mixed_groups"] == 4 and c["steps"] == 3
    assert c["correct_higher"] == pytest.approx(0.25) and c["correct_lower"] == pytest.approx(0.5)
    assert c["corr"] == pytest.approx((0.5 - 1.5) / 4)
    assert credit_over_training([{"step": 1, "reward/accuracy": 0.5}]) is None  # a GRPO run logs no credit
    # runs (seeds) pool the same way: step 1 alone as a second run adds 1 group, all right-higher
    both = combine_credit([c, credit_over_training(rows[:1]), None])
    assert both["mixed_groups"] == 5 and both["correct_higher"] == pytest.approx(2 / 5)
    assert both["corr"] == pytest.approx((0.5 - 1.5 + 0.5) / 5)


def test_blank_twin_keeps_rows_and_greys_every_image(tmp_path):
    from PIL import Image

    from vlm_mig.data.clevr import write_clevr
    from vlm_mig.demo.data import blank_twin

    write_clevr(tmp_path, 4, seed=2, question_mix="multistep")
    twin = blank_twin(tmp_path / "data.jsonl")
    real, blank = rep.read_jsonl(tmp_path / "data.jsonl"), rep.read_jsonl(twin)
    assert [{**r, "images": None} for r in real] == [{**r, "images": None} for r in blank]
    with Image.open(tmp_path / blank[0]["images"][0]) as im:
        assert im.size == (112, 112) and im.getextrema() == ((128, 128),) * 3
