"""Synthetic data generators: determinism, scene validity, answers recomputed independently, step labels."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlm_mig.data.schema import DataError, Sample
from vlm_mig.data.synthetic import (
    COLORS,
    CONDITIONS,
    COUNT_ALL_QUESTION,
    MATERIALS,
    QUESTION_MIXES,
    SHAPES,
    SIZES,
    ArithmeticProblem,
    Scene,
    check_claims,
    correct_solution,
    count_claims,
    make_arithmetic,
    make_clevr_example,
    render_scene,
    sample_question,
    sample_scene,
    solution_variants,
    with_redundant_step,
    with_wrong_step,
    write_arithmetic,
    write_clevr,
)
from vlm_mig.prompts import format_solution

# ------------------------------------------------------------------------------------------ helpers


def parse_solution(text: str) -> tuple[list[str], str]:
    """Independent parser of the reasoning format: the step texts and the answer."""
    m = re.fullmatch(r"<think>\n(.*)\n</think>\n<answer>(.*)</answer>", text, re.DOTALL)
    assert m, text
    lines = m.group(1).split("\n")
    steps = []
    for i, line in enumerate(lines, start=1):
        h = re.fullmatch(r"### Step (\d+): (.+)", line)
        assert h and int(h.group(1)) == i, line
        steps.append(h.group(2))
    return steps, m.group(2)


def check_gold_steps(steps: list[str], answer: str) -> None:
    """Steps survive format_solution, are one line each, long enough not to be merged (SPEC: 8 chars)."""
    assert steps
    parsed, parsed_answer = parse_solution(format_solution(steps, answer))
    assert parsed == steps and parsed_answer == answer
    for s in steps:
        assert "\n" not in s and "### Step" not in s and len(s) >= 8


_VOCAB = {**{c: "color" for c in COLORS}, **{s: "size" for s in SIZES}, **{m: "material" for m in MATERIALS}}


def parse_phrase(phrase: str) -> dict[str, str]:
    """ "large red cubes" (or "large red cube") -> {'size': 'large', 'color': 'red', 'shape': 'cube'}."""
    *adjectives, noun = phrase.split()
    flt = {_VOCAB[w]: w for w in adjectives}
    assert len(flt) == len(adjectives)
    if noun not in ("objects", "object"):
        shape = noun if noun in SHAPES else noun[:-1]  # "1 cube", "2 cubes"
        assert shape in SHAPES, phrase
        flt["shape"] = shape
    return flt


def count(objects: list[dict], flt: dict[str, str]) -> int:
    return sum(all(o[a] == v for a, v in flt.items()) for o in objects)


def answer_from_question(question: str, objects: list[dict]) -> int:
    """Recompute a CLEVR answer from the question text and the scene json alone."""
    if question == COUNT_ALL_QUESTION:
        return len(objects)
    m = re.fullmatch(r"How many more (.+) than (.+) are there\?", question)
    if m:
        return count(objects, parse_phrase(m.group(1))) - count(objects, parse_phrase(m.group(2)))
    m = re.fullmatch(r"How many (.+) and (.+) are there in total\?", question)
    if m:
        a, b = parse_phrase(m.group(1)), parse_phrase(m.group(2))
        assert a.keys() == b.keys() and len(a) == 1 and a != b, question  # disjoint sets
        return count(objects, a) + count(objects, b)
    m = re.fullmatch(r"How many objects are not (\w+)\?", question)
    if m:
        word = m.group(1)
        return len(objects) - count(objects, {_VOCAB[word]: word} if word in _VOCAB else parse_phrase(word))
    m = re.fullmatch(r"How many (.+) are there\?", question)
    assert m, question
    return count(objects, parse_phrase(m.group(1)))


def assert_scene_valid(scene_json: dict, condition: str) -> None:
    """Objects inside the image, bounding boxes apart, colours allowed by the condition."""
    size = scene_json["image_size"][0]
    objs = scene_json["objects"]
    for o in objs:
        x0, y0, x1, y1 = o["bbox"]
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert o["shape"] in SHAPES and o["size"] in SIZES and o["material"] in MATERIALS
        assert o["color"] in CONDITIONS[condition][o["shape"]]
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            ax0, ay0, ax1, ay1 = a["bbox"]
            bx0, by0, bx1, by1 = b["bbox"]
            separated = ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
            assert separated, (a, b)


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------- CLEVR


def test_clevr_files_are_byte_identical_for_a_seed(tmp_path: Path) -> None:
    write_clevr(tmp_path / "a", 10, condition="A", seed=3)
    write_clevr(tmp_path / "b", 10, condition="A", seed=3)
    write_clevr(tmp_path / "c", 10, condition="A", seed=4)
    a, b, c = (read_tree(tmp_path / d) for d in "abc")
    assert len(a) == 2 * 10 + 1 and a == b
    assert a["data.jsonl"] != c["data.jsonl"]
    assert all(a[k] != c[k.replace("_3_", "_4_")] for k in a if k.startswith("images/"))


def test_clevr_layout_and_answers(tmp_path: Path) -> None:
    samples = write_clevr(tmp_path, 24, condition="B", seed=1, questions_per_scene=2)
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    assert len(lines) == len(samples) == 48
    kinds = set()
    for line, sample in zip(lines, samples):
        s = Sample.from_dict(json.loads(line))
        assert s == sample and s.task == "count" and s.question
        scene = json.loads((tmp_path / s.meta["scene"]).read_text())
        assert scene["image_filename"] == Path(s.images[0]).name
        with Image.open(tmp_path / s.images[0]) as im:
            assert im.size == (112, 112)
        assert_scene_valid(scene, "B")
        assert 1 <= len(scene["objects"]) <= 6
        assert int(s.answer) == answer_from_question(s.question, scene["objects"]) >= 0
        check_gold_steps(s.gold_steps, s.answer)
        assert s.answer in s.gold_steps[-1]
        kinds.add(s.meta["question_type"])
    assert kinds == {"count_all", "count_attr", "count_two_attr", "compare"}


def test_render_reproduces_the_png_from_the_scene_json(tmp_path: Path) -> None:
    write_clevr(tmp_path, 3, seed=9)
    for scene_file in sorted((tmp_path / "scenes").glob("*.json")):
        d = json.loads(scene_file.read_text())
        with Image.open(tmp_path / "images" / d["image_filename"]) as im:
            png = np.asarray(im)
        assert np.array_equal(np.asarray(render_scene(Scene.from_json(d))), png)


def test_prefix_of_a_set_is_the_smaller_set() -> None:
    small = [make_clevr_example(i, seed=2).samples for i in range(3)]
    assert small == [make_clevr_example(i, seed=2).samples for i in range(3)]
    assert make_clevr_example(0, seed=2).samples != make_clevr_example(0, seed=2, condition="B").samples


@pytest.mark.parametrize("size", [112, 224])
def test_objects_are_drawn_with_their_colour_and_material(size: int) -> None:
    """Each object's centre is off the ground colour; metal shows a near-white highlight, rubber never."""
    for i in range(12):
        ex = make_clevr_example(i, seed=5, image_size=size, num_objects=(3, 6))
        px = np.asarray(ex.image).astype(int)
        for o in ex.scene.objects:
            cx, cy = int(o.x), int(o.y)
            assert np.abs(px[cy, cx] - [150, 150, 148]).max() > 20
            x0, y0, x1, y1 = (round(v) for v in o.bbox)
            white = (px[y0:y1, x0:x1].min(axis=-1) > 170).any()
            assert white == (o.material == "metal"), o


@pytest.mark.parametrize("size", [224, 448])
def test_image_size_is_configurable(size: int) -> None:
    ex = make_clevr_example(0, seed=0, image_size=size, num_objects=6)
    assert ex.image.size == (size, size) and len(ex.scene.objects) == 6
    assert_scene_valid(ex.scene_json, "A")


def test_condition_rules_and_shift() -> None:
    """A and B use disjoint cube/cylinder colours; 'all' produces combinations from both."""
    combos = {c: set() for c in ("A", "B", "all")}
    for c, seen in combos.items():
        for i in range(60):
            for o in sample_scene(random.Random(i), c, (4, 6)).objects:
                seen.add((o.shape, o.color))
    assert {c for s, c in combos["A"] if s == "cube"} == set(CONDITIONS["A"]["cube"])
    assert {c for s, c in combos["B"] if s == "cube"} == set(CONDITIONS["A"]["cylinder"])
    assert not {x for x in combos["A"] if x[0] != "sphere"} & {x for x in combos["B"] if x[0] != "sphere"}
    assert combos["all"] - combos["A"] and combos["all"] - combos["B"]


def test_question_mix_and_bad_arguments(tmp_path: Path) -> None:
    ex = [make_clevr_example(i, question_mix={"compare": 1.0}) for i in range(10)]
    assert {e.samples[0].meta["question_type"] for e in ex} == {"compare"}
    with pytest.raises(DataError):
        make_clevr_example(0, question_mix={"bogus": 1.0})
    with pytest.raises(DataError):
        make_clevr_example(0, condition="C")
    with pytest.raises(DataError):
        make_clevr_example(0, num_objects=(3, 2))
    with pytest.raises(DataError, match="fewer objects"):
        make_clevr_example(0, num_objects=40)


def test_count_all_steps_example() -> None:
    """The count-all solution lists each shape group and sums them."""
    for i in range(40):
        s = make_clevr_example(i, question_mix={"count_all": 1.0}, num_objects=(4, 6)).samples[0]
        *groups, total = s.gold_steps
        numbers = [int(re.match(r"I see (\d+) ", g).group(1)) for g in groups]
        assert sum(numbers) == int(s.answer)
        if len(groups) > 1:
            assert total == f"In total {' + '.join(map(str, numbers))} = {s.answer} objects."


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**40), condition=st.sampled_from(["A", "B", "all"]),
       mix=st.sampled_from(["counting", "multistep"]))
def test_scenes_and_questions_over_seeds(seed: int, condition: str, mix: str) -> None:
    rng = random.Random(seed)
    scene = sample_scene(rng, condition, (1, 8), 112)
    d = scene.to_json("x.png")
    assert_scene_valid(d, condition)
    for _ in range(4):
        q = sample_question(rng, scene, mix)
        assert q.answer == answer_from_question(q.text, d["objects"]) >= 0
        check_gold_steps(list(q.steps), str(q.answer))
        check_step_counts(q.steps, q.answer, d["objects"])


_SEE = re.compile(r"I see (no|\d+) (.+?)(?: in total)?(?:: (.+))?\.")
_OF_THESE = re.compile(r"Of these, (none|\d+) (?:is|are) (\w+)(?:: (.+))?\.")
_SUM = re.compile(r"(?:In total|The difference is|So) (\d+) ([-+]) (\d+) = (\d+)(?: objects)?\.")


def check_step_counts(steps: tuple[str, ...] | list[str], answer: int | str, objects: list[dict]) -> None:
    """Every gold step is true of the scene json: each stated count (and the objects it lists) matches the
    scene, each sum or difference is right, and the last step states the answer."""
    last: dict[str, str] | None = None
    stated: list[int] = []
    for step in steps:
        see, of_these, arith = _SEE.fullmatch(step), _OF_THESE.fullmatch(step), _SUM.fullmatch(step)
        if see or of_these:
            m = see or of_these
            if see:
                flt = parse_phrase(m.group(2))
            else:
                assert last is not None, steps
                flt = {**last, _VOCAB[m.group(2)]: m.group(2)}
            n = 0 if m.group(1) in ("no", "none") else int(m.group(1))
            assert n == count(objects, flt), (step, objects)
            if m.group(3):  # the listed objects: n descriptions, each matching the filter
                listed = re.split(r", | and ", m.group(3))
                assert len(listed) == n and all(all(v in d.split() for v in flt.values() if v not in SHAPES)
                                                for d in listed), step
            last = flt
            stated.append(n)
        elif arith:
            a, op, b, c = int(arith.group(1)), arith.group(2), int(arith.group(3)), int(arith.group(4))
            assert (a + b if op == "+" else a - b) == c, step
            assert [a, b] == stated[-2:], (step, stated)  # combines the two counts just stated
        else:
            m = re.fullmatch(r"(?:So there (?:is|are)|In total .* =) (\d+) .+\.", step)
            assert m, step
    assert str(answer) in steps[-1]


def test_multistep_questions_need_their_intermediate_counts() -> None:
    """Each multi-step type states two counts (or a count and a filtered count) before the answer, and both
    are true of the scene; the answer follows from them by the stated operation."""
    seen = set()
    for i in range(300):
        ex = make_clevr_example(i, seed=7, question_mix="multistep", num_objects=(1, 8), condition="B")
        s, objects = ex.samples[0], ex.scene_json["objects"]
        kind = s.meta["question_type"]
        seen.add(kind)
        assert int(s.answer) == answer_from_question(s.question, objects)
        check_step_counts(s.gold_steps, s.answer, objects)
        claims = count_claims(format_solution(s.gold_steps, s.answer))
        assert check_claims(format_solution(s.gold_steps, s.answer), objects) == (len(claims), len(claims))
        if kind in ("add", "subtract", "compare"):
            (f1, n1), (f2, n2) = claims
            assert int(s.answer) == {"add": n1 + n2, "subtract": n1 - n2, "compare": n1 - n2}[kind]
            assert f"{n1} {'+' if kind == 'add' else '-'} {n2} = {s.answer}" in s.gold_steps[-1]
        elif kind == "count_two_attr" and len(claims) == 2:
            (f1, n1), (f2, n2) = claims
            assert len(f1) == 1 and len(f2) == 2 and f1.items() <= f2.items() and n2 == int(s.answer) <= n1
    assert seen == set(QUESTION_MIXES["multistep"])


def test_count_claims_catch_wrong_counts() -> None:
    objects = [{"shape": "cube", "color": "red", "size": "large", "material": "metal"},
               {"shape": "cube", "color": "gray", "size": "small", "material": "rubber"},
               {"shape": "sphere", "color": "red", "size": "small", "material": "rubber"}]
    text = ("<think>\n### Step 1: I see 2 red objects: a large red cube and a small red sphere.\n"
            "### Step 2: Of these, 1 is large: a large red cube.\n### Step 3: I see 3 cubes: a, b and c.\n"
            "### Step 4: I see no spheres.\n### Step 5: I see 3 objects in total.\n</think>\n<answer>1</answer>")
    assert count_claims(text) == [({"color": "red"}, 2), ({"color": "red", "size": "large"}, 1),
                                  ({"shape": "cube"}, 3), ({"shape": "sphere"}, 0), ({}, 3)]
    assert check_claims(text, objects) == (5, 3)
    assert count_claims("I see 2 dogs. Of these, 1 is large. So 2 - 1 = 1.") == []
    with pytest.raises(DataError, match="question mix"):
        make_clevr_example(0, question_mix="bogus")


# ------------------------------------------------------------------------------------ imperfect teacher


def test_imperfect_teacher_slips_only_the_last_result_and_keeps_every_count_right() -> None:
    """The demo's testbed: each solution whose last step computes its answer is, at the given rate, rewritten
    with that result (and the answer) moved by the slip; every counting step stays right against the scene."""
    from vlm_mig.data.clevr import equations
    from vlm_mig.data.teacher import imperfect_teacher, slip_result

    examples = [make_clevr_example(i, seed=5, question_mix="multistep", list_objects=False) for i in range(300)]
    rows = [ex.samples[0] for ex in examples]
    objects = {ex.samples[0].id: ex.scene_json["objects"] for ex in examples}
    taught = imperfect_teacher(rows, 0.75, seed=0, slip=-1)
    eligible = slipped = 0
    for gold, t in zip(rows, taught):
        computes = slip_result(gold.gold_steps, gold.answer, -1) is not None
        eligible += computes
        if "teacher" not in t.meta:
            assert t == gold  # untouched rows are the gold rows
            continue
        slipped += 1
        assert computes and t.meta == {**gold.meta, "gold_answer": gold.answer, "teacher": "last result -1"}
        assert t.answer == str(int(gold.answer) - 1) and t.gold_steps[:-1] == gold.gold_steps[:-1]
        # The counting steps are the gold ones, right against the scene; the last equation is off by the slip.
        counts = format_solution(t.gold_steps[:-1], t.answer)
        n, right = check_claims(counts, objects[t.id])
        assert n > 0 and right == n
        (left, value, stated), = equations(t.gold_steps[-1])
        assert value == int(gold.answer) and stated == value - 1 == int(t.answer)
    assert eligible > 150 and abs(slipped / eligible - 0.75) < 0.08
    # A row's fate is its own: the same for a subset in another order, and a seed draws others.
    assert imperfect_teacher(rows[::-1][:50], 0.75, seed=0, slip=-1) == taught[::-1][:50]
    assert imperfect_teacher(rows, 0.75, seed=1, slip=-1) != taught
    assert imperfect_teacher(rows, 0.0) == rows
    everyone = imperfect_teacher(rows, 1.0, slip=+1)  # a result of 0 can slip up, not down
    assert sum("teacher" in t.meta for t in everyone) == sum(slip_result(g.gold_steps, g.answer, 1) is not None
                                                             for g in rows) > eligible
    # A result of 0 cannot slip below 0; a last step that computes nothing never slips.
    assert slip_result(["I see 2 cubes.", "So 2 - 2 = 0."], "0", -1) is None
    assert slip_result(["I see 2 cubes.", "So there are 2 cubes."], "2", 1) is None
    assert slip_result(["I see 1 cube.", "In total 1 + 2 = 3 objects."], "3", 1) == (
        ["I see 1 cube.", "In total 1 + 2 = 4 objects."], "4")
    with pytest.raises(DataError, match="teacher_slip"):
        imperfect_teacher(rows, 0.5, slip=0)
    with pytest.raises(DataError, match="teacher_error_rate"):
        imperfect_teacher(rows, 1.5)


# --------------------------------------------------------------------------------------- arithmetic

_PHRASE_OPS = [
    (r"(?:buys|finds|gets) (\d+) more(?: from a friend)?", lambda v, n: v + n),
    (r"(?:gives away|loses|sells) (\d+)", lambda v, n: v - n),
    (r"doubles them", lambda v, n: v * 2),
    (r"triples them", lambda v, n: v * 3),
    (r"gives away half of them", lambda v, n: v // 2),
]


def answer_from_text(question: str) -> int:
    """Recompute an arithmetic answer from the question text alone."""
    m = re.fullmatch(r"(\w+) has (\d+) (\w+)\. (?:He|She) (.+)\. How many \3 does \1 have now\?", question)
    assert m, question
    value = int(m.group(2))
    for phrase in m.group(4).split(", then "):
        for pattern, fn in _PHRASE_OPS:
            pm = re.fullmatch(pattern, phrase)
            if pm:
                value = fn(value, int(pm.group(1)) if pm.groups() else 0)
                break
        else:
            raise AssertionError(phrase)
    return value


_EQ = re.compile(r": (\d+) ([-+*/]) (\d+) = (-?\d+)\.")


def equation_is_right(step: str) -> bool | None:
    """Whether the step's equation holds; None when the step has no equation."""
    m = _EQ.search(step)
    if not m:
        return None
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c


def check_labels(steps: list[str], labels: list[str]) -> None:
    assert len(steps) == len(labels)
    for s, label in zip(steps, labels):
        assert equation_is_right(s) == {"correct": True, "wrong": False, "redundant": None}[label], (s, label)


def test_arithmetic_answers_and_gold_steps() -> None:
    samples = make_arithmetic(200, seed=0, num_steps=(2, 4))
    assert len({s.id for s in samples}) == 200
    assert {s.meta["num_steps"] for s in samples} == {2, 3, 4}
    for s in samples:
        assert s.task == "numeric" and int(s.answer) == answer_from_text(s.question) >= 0
        assert len(s.gold_steps) == s.meta["num_steps"] and set(s.meta["step_labels"]) == {"correct"}
        check_labels(s.gold_steps, s.meta["step_labels"])
        check_gold_steps(s.gold_steps, s.answer)
        assert s.gold_steps[-1].endswith(f"has {s.answer} {s.meta['problem']['item']} now.")
        # the chain is consistent: each step starts from the previous step's result
        results = [int(_EQ.search(x).group(4)) for x in s.gold_steps]
        starts = [int(_EQ.search(x).group(1)) for x in s.gold_steps]
        assert starts[1:] == results[:-1] and results[-1] == int(s.answer)


def test_arithmetic_files_are_deterministic(tmp_path: Path) -> None:
    write_arithmetic(tmp_path / "a.jsonl", 50, seed=1, error_rate=0.5)
    write_arithmetic(tmp_path / "b.jsonl", 50, seed=1, error_rate=0.5)
    write_arithmetic(tmp_path / "c.jsonl", 50, seed=2, error_rate=0.5)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes() and a != (tmp_path / "c.jsonl").read_bytes()
    assert [Sample.from_dict(json.loads(x)) for x in a.decode().splitlines()] == make_arithmetic(
        50, seed=1, error_rate=0.5
    )


@pytest.mark.parametrize("propagate", [True, False])
def test_injected_errors_are_labelled(propagate: bool) -> None:
    clean = make_arithmetic(150, seed=4, num_steps=(1, 6))
    noisy = make_arithmetic(150, seed=4, num_steps=(1, 6), error_rate=0.6, propagate=propagate)
    injected = {s.meta["injected"] for s in noisy}
    assert injected == {"none", "redundant", "wrong"}
    for c, s in zip(clean, noisy):
        assert (c.question, c.answer) == (s.question, s.answer)  # problems do not depend on errors
        labels = s.meta["step_labels"]
        check_labels(s.gold_steps, labels)
        check_gold_steps(s.gold_steps, s.meta["solution_answer"])
        if s.meta["injected"] == "none":
            assert s.gold_steps == c.gold_steps
        elif s.meta["injected"] == "redundant":
            assert labels.count("redundant") == 1 and s.meta["solution_answer"] == s.answer
            assert [x for x, lab in zip(s.gold_steps, labels) if lab != "redundant"] == c.gold_steps
        else:
            assert labels.count("wrong") == 1
            # a wrong final step always gives a wrong answer; an earlier one only when it propagates
            last_wrong = labels[-1] == "wrong"
            assert (s.meta["solution_answer"] == s.answer) == (not propagate and not last_wrong)


def test_solution_variants() -> None:
    for sample in make_arithmetic(60, seed=8, num_steps=(1, 5)):
        problem = ArithmeticProblem.from_dict(sample.meta["problem"])
        assert problem.question == sample.question
        v = solution_variants(problem, seed=1)
        assert v == solution_variants(problem, seed=1)
        k = len(problem.ops)
        assert v["correct"] == correct_solution(problem) and v["correct"].answer == problem.answer
        assert len(v["redundant"].steps) == k + 1 and v["redundant"].answer == problem.answer
        assert (v["wrong_local"].answer == problem.answer) == (k > 1)
        assert v["wrong_propagated"].answer != problem.answer
        for sol in v.values():
            check_labels(list(sol.steps), list(sol.labels))
            steps, answer = parse_solution(sol.text())
            assert steps == list(sol.steps) and answer == str(sol.answer)


def test_redundant_step_restates_the_known_amount() -> None:
    problem = ArithmeticProblem.from_dict(make_arithmetic(1, seed=3, num_steps=3)[0].meta["problem"])
    values = problem.values()
    for pos in range(4):
        sol = with_redundant_step(problem, pos)
        assert sol.labels[pos] == "redundant"
        assert re.search(rf"\b{values[pos]} {problem.item}\.$", sol.steps[pos])
    with pytest.raises(DataError):
        with_redundant_step(problem, 5)
    with pytest.raises(DataError):
        with_wrong_step(problem, 0, 0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**40), num_ops=st.integers(1, 8))
def test_arithmetic_over_seeds(seed: int, num_ops: int) -> None:
    from vlm_mig.data.arithmetic import sample_problem

    problem = sample_problem(random.Random(seed), num_ops)
    assert answer_from_text(problem.question) == problem.answer >= 0
    assert all(v >= 0 for v in problem.values())
    for sol in solution_variants(problem, seed).values():
        check_labels(list(sol.steps), list(sol.labels))
        assert all(v >= 0 for v in map(int, re.findall(r"-?\d+", " ".join(sol.steps))))


def test_synthetic_source_takes_the_mix_and_step_style(tmp_path: Path) -> None:
    from vlm_mig.data.sources import load_source

    kw = {"task": "count", "cache_dir": tmp_path, "n": 30, "seed": 3}
    listed = load_source("synthetic:clevr", **kw)
    counts = load_source("synthetic:clevr", **kw, question_mix="multistep", list_objects=False)
    assert {s.meta["question_type"] for s in listed} <= set(QUESTION_MIXES["counting"])
    assert {s.meta["question_type"] for s in counts} - set(QUESTION_MIXES["counting"])  # add / subtract appear
    assert any(":" in step for s in listed for step in s.gold_steps)
    assert not any(":" in step for s in counts for step in s.gold_steps)
    assert len({p.name for p in tmp_path.iterdir()}) == 2  # two cached sets, one per style


def test_generator_defaults_have_one_home():
    """``vlm-mig data``, ``DataConfig``, ``load_source`` and the generators read their defaults from the module
    constants of ``data/clevr.py`` and ``data/arithmetic.py``: changing one constant changes every default."""
    import inspect

    from vlm_mig.cli import build_parser
    from vlm_mig.config import DataConfig
    from vlm_mig.data import arithmetic, clevr
    from vlm_mig.data.sources import load_source

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    for fn in (clevr.sample_scene, clevr.make_clevr_example, clevr.write_clevr):
        assert default(fn, "image_size") == clevr.IMAGE_SIZE
        assert default(fn, "num_objects") == clevr.NUM_OBJECTS
        assert default(fn, "condition") == clevr.DEFAULT_CONDITION
    for fn in (arithmetic.make_arithmetic, arithmetic.write_arithmetic):
        assert default(fn, "num_steps") == arithmetic.NUM_STEPS
    cfg = DataConfig()
    assert cfg.synthetic_condition == default(load_source, "condition") == clevr.DEFAULT_CONDITION
    assert cfg.synthetic_mix == default(load_source, "question_mix") == clevr.DEFAULT_MIX
    assert cfg.max_objects == default(load_source, "max_objects") == clevr.NUM_OBJECTS[1]
    assert tuple(cfg.arithmetic_steps) == default(load_source, "arithmetic_steps") == arithmetic.NUM_STEPS

    args = build_parser().parse_args(["data", "clevr", "--n", "1"])
    assert (args.image_size, args.condition, args.mix) == (clevr.IMAGE_SIZE, clevr.DEFAULT_CONDITION, clevr.DEFAULT_MIX)
    assert (args.min_objects, args.max_objects) == clevr.NUM_OBJECTS
    args = build_parser().parse_args(["data", "arithmetic", "--n", "1", "--out", "x.jsonl"])
    assert (args.min_steps, args.max_steps) == arithmetic.NUM_STEPS
    # the choices are the generators' own tables
    for flag, table in (("--condition", clevr.CONDITIONS), ("--mix", clevr.QUESTION_MIXES)):
        for value in table:
            assert getattr(build_parser().parse_args(["data", "clevr", "--n", "1", flag, value]),
                           flag[2:]) == value
