"""Data loaders and the benchmark registry, on tiny files in the published formats.

Images are small PNGs written with PIL at test time (no binary fixtures); every error path checks
that the message names the file and the line (or the scene index, for JSON scene files).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from vlm_mig.data.benchmarks import (
    BENCHMARKS,
    find_datasets_dir,
    get_benchmark,
    gsm8k_gold,
    last_boxed,
    list_benchmarks,
    load_benchmark,
)
from vlm_mig.data.loaders import (
    COUNT_QUESTION,
    FieldMap,
    SampleList,
    answer_span,
    extract_answer_tag,
    format_number,
    load_hf_dataset,
    load_jsonl,
    load_r1v_jsonl,
    load_superclevr,
)
from vlm_mig.data.schema import DataError, Sample

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def png(path: Path, color: str = "red", size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped) or raw strings (written as they are, to make bad lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_located(err: pytest.ExceptionInfo, path: Path, line: int | str) -> None:
    msg = str(err.value)
    assert path.name in msg, msg
    assert f"{path.name}:{line}" in msg if isinstance(line, int) else line in msg, msg


@pytest.fixture
def r1v_dir(tmp_path: Path) -> Path:
    png(tmp_path / "images" / "a.png", "red")
    png(tmp_path / "images" / "b.png", "blue")
    return tmp_path


# --------------------------------------------------------------------------------------------
# small helpers of the loaders
# --------------------------------------------------------------------------------------------


def test_format_number_and_answer_tag():
    assert format_number(27.0) == "27"
    assert format_number(-1.0) == "-1"
    assert format_number(2.5) == "2.5"
    assert format_number(4) == "4"
    assert extract_answer_tag("<answer> 3 </answer>") == "3"
    assert extract_answer_tag("<think>x</think><answer>a</answer> <answer>b</answer>") == "b"
    assert extract_answer_tag("  7 ") == "7"
    # an unclosed opening tag before the last pair is skipped, as the graders skip it
    assert extract_answer_tag("<answer>a<answer>b</answer>") == "b"


def test_loaders_and_graders_share_one_answer_parser():
    """A gold field and a completion with the same tags give the same answer (one parser, two callers)."""
    from vlm_mig.rewards import extract_answer

    for text in [
        "<answer> 3 </answer>",
        "<think>x</think><answer>a</answer> <answer>b</answer>",
        "<answer>a<answer>b</answer>",
        "<answer>\n12\n</answer> trailing",
    ]:
        assert extract_answer_tag(text) == extract_answer(text)
    assert answer_span("no tags") is None and extract_answer_tag(" no tags ") == "no tags"
    assert answer_span("<answer>open only") is None


# --------------------------------------------------------------------------------------------
# R1-V / VLM-R1 jsonl
# --------------------------------------------------------------------------------------------


def test_r1v_superclevr_prompt_file(r1v_dir: Path):
    # The exact shape of R1-V's superclevr_test200_counting_problems.jsonl (int ground truth).
    path = write_jsonl(
        r1v_dir / "counting.jsonl",
        [
            {"image_path": "./images/a.png", "question": COUNT_QUESTION, "ground_truth": 4},
            {"image_path": "./images/b.png", "question": COUNT_QUESTION, "ground_truth": 10},
        ],
    )
    samples = load_r1v_jsonl(path)
    assert isinstance(samples, SampleList) and len(samples) == 2
    s = samples[0]
    assert isinstance(s, Sample)
    assert (s.id, s.task, s.question, s.answer) == ("counting-1", "count", COUNT_QUESTION, "4")
    assert s.images == [str((r1v_dir / "images" / "a.png").resolve())]
    assert s.meta["source"].endswith("counting.jsonl:1")
    assert samples[1].answer == "10"
    assert samples.report.loaded == 2 and samples.report.skipped == []


def test_r1v_problem_solution_with_answer_tags_lists_and_extras(r1v_dir: Path):
    path = write_jsonl(
        r1v_dir / "train.jsonl",
        [
            {
                "id": 7,
                "image": ["images/a.png", "images/b.png"],
                "problem": "How many objects are there in total?",
                "solution": "<answer> 3 </answer>",
                "answer_variants": ["three", 3.0],
                "difficulty": "easy",
            }
        ],
    )
    (s,) = load_r1v_jsonl(path, task="count")
    assert s.id == "7" and s.answer == "3"
    assert s.variants == ["3", "three"]
    assert len(s.images) == 2 and s.images[1].endswith("b.png")
    assert s.meta["difficulty"] == "easy"


def test_r1v_image_root_and_task(tmp_path: Path):
    png(tmp_path / "imgs" / "x.png")
    path = write_jsonl(
        tmp_path / "meta" / "geo.jsonl",
        [{"image": "x.png", "problem": "Find the angle.", "solution": "<answer>30</answer>"}],
    )
    (s,) = load_r1v_jsonl(path, task="math", image_root=tmp_path / "imgs")
    assert s.task == "math" and s.images == [str((tmp_path / "imgs" / "x.png").resolve())]
    with pytest.raises(DataError, match="unknown task type"):
        load_r1v_jsonl(path, task="counting")


def test_vlmr1_conversations(r1v_dir: Path):
    path = write_jsonl(
        r1v_dir / "vlmr1.jsonl",
        [
            {
                "id": 1,
                "image": "images/a.png",
                "conversations": [
                    {"from": "human", "value": "<image>What number of purple metallic balls are there?"},
                    {"from": "gpt", "value": "0"},
                ],
            },
            {
                "id": 2,
                "image": ["images/a.png", "images/b.png"],
                "conversations": [
                    {"from": "human", "value": "Left: <image> Right: <image> How many red cubes in total?"},
                    {"from": "gpt", "value": "<answer>2</answer>"},
                ],
            },
        ],
    )
    first, second = load_r1v_jsonl(path)
    assert first.question == "What number of purple metallic balls are there?" and first.answer == "0"
    # Tags inside the text fix where each image goes, so the prompt becomes chat messages.
    assert second.question is None and second.answer == "2"
    assert second.messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Left:"},
                {"type": "image"},
                {"type": "text", "text": "Right:"},
                {"type": "image"},
                {"type": "text", "text": "How many red cubes in total?"},
            ],
        }
    ]


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an image at all")


def _truncated(path: Path) -> None:
    png(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GOOD = {"image_path": "images/a.png", "question": "How many?", "ground_truth": 3}

R1V_BAD_ROWS = [
    ("malformed", '{"image_path": "images/a.png", "question": ', "malformed JSON"),
    ("not_object", "[1, 2, 3]", "expected a JSON object"),
    ("no_image_field", {"question": "q", "ground_truth": 1}, "missing field 'image' or 'image_path'"),
    (
        "no_question",
        {"image_path": "images/a.png", "ground_truth": 1},
        "missing field 'problem' or 'question'",
    ),
    (
        "no_answer",
        {"image_path": "images/a.png", "question": "q"},
        "missing field 'solution' or 'ground_truth'",
    ),
    ("empty_answer", {**GOOD, "ground_truth": "  "}, "empty answer"),
    ("empty_tag", {**GOOD, "ground_truth": "<answer> </answer>"}, "empty answer"),
    ("bool_answer", {**GOOD, "ground_truth": True}, "string or a number"),
    ("missing_image", {**GOOD, "image_path": "images/nope.png"}, "image not found"),
    ("corrupt_image", {**GOOD, "image_path": "images/corrupt.png"}, "corrupt image"),
    ("truncated_image", {**GOOD, "image_path": "images/truncated.png"}, "corrupt image"),
    ("duplicate_id", {**GOOD, "id": "a"}, "duplicate id 'a'"),
]


@pytest.mark.parametrize(
    "bad,expected", [(b, e) for _, b, e in R1V_BAD_ROWS], ids=[n for n, _, _ in R1V_BAD_ROWS]
)
def test_r1v_bad_row_names_file_and_line(r1v_dir: Path, bad, expected):
    _corrupt(r1v_dir / "images" / "corrupt.png")
    _truncated(r1v_dir / "images" / "truncated.png")
    # Line 2 is blank (allowed); the bad row is line 4.
    path = write_jsonl(r1v_dir / "bad.jsonl", [{**GOOD, "id": "a"}, "", {**GOOD, "id": "b"}, bad])
    with pytest.raises(DataError, match=expected) as err:
        load_r1v_jsonl(path)
    assert_located(err, path, 4)


def test_invalid_utf8_line(r1v_dir: Path):
    path = r1v_dir / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_r1v_jsonl(path)
    assert_located(err, path, 2)


def test_format_sniffing_names_a_bad_encoding_on_its_line(r1v_dir: Path):
    """``data.format: auto`` reads the first row to tell R1-V from generic jsonl: a non-UTF-8 byte there (or later)
    is the loader's ``file:line`` error, not a traceback."""
    from vlm_mig.data.sources import load_source

    first = r1v_dir / "bad-first.jsonl"
    first.write_bytes(b'{"question": "caf\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_source(str(first), task="count", cache_dir=r1v_dir / "cache")
    assert_located(err, first, 1)
    later = r1v_dir / "bad-later.jsonl"
    later.write_bytes(json.dumps(GOOD).encode() + b"\n" * 5 + b'{"problem": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_source(str(later), task="count", cache_dir=r1v_dir / "cache", image_root=str(r1v_dir))
    assert_located(err, later, 6)


def _corrupt_stream_png(path: Path) -> Path:
    """A PNG whose header and every chunk checksum are right but whose compressed pixel stream is not: PIL's
    ``verify()`` passes it, decoding fails."""
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
    data = bytearray(path.read_bytes())
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4 : i])[0]
    body = bytearray(data[i + 4 : i + 4 + n])
    body[2:] = bytes(len(body) - 2)  # keep the zlib header, zero the deflate stream
    data[i + 4 : i + 4 + n] = body
    data[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_an_image_that_cannot_be_decoded_fails_at_load_with_its_path(r1v_dir: Path):
    from PIL import Image

    bad = _corrupt_stream_png(r1v_dir / "images" / "broken.png")
    with Image.open(bad) as im:
        im.verify()  # checksums alone pass it
    rows = r1v_dir / "rows.jsonl"
    rows.write_text(json.dumps({**GOOD, "image_path": "images/broken.png"}) + "\n")
    with pytest.raises(DataError, match="corrupt image .*broken.png") as err:
        load_r1v_jsonl(rows)
    assert_located(err, rows, 1)
    Image.new("RGB", (800, 2), (0, 0, 0)).save(r1v_dir / "images" / "strip.png")
    rows.write_text(json.dumps({**GOOD, "image_path": "images/strip.png"}) + "\n")
    with pytest.raises(DataError, match="800x2: an aspect ratio above 200:1"):
        load_r1v_jsonl(rows)


def test_an_empty_training_file_is_named(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_jsonl(empty, "count")


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="file not found") as err:
        load_r1v_jsonl(tmp_path / "absent.jsonl")
    assert "absent.jsonl" in str(err.value)


def test_missing_image_hints_at_image_root(r1v_dir: Path):
    path = write_jsonl(r1v_dir / "sub" / "x.jsonl", [GOOD])
    with pytest.raises(DataError, match="image_root") as err:
        load_r1v_jsonl(path)
    assert_located(err, path, 1)
    assert len(load_r1v_jsonl(path, image_root=r1v_dir)) == 1


def test_r1v_skip_bad_reports_every_skipped_row(r1v_dir: Path, caplog):
    _corrupt(r1v_dir / "images" / "corrupt.png")
    rows = [
        GOOD,
        "{not json",
        {**GOOD, "image_path": "images/corrupt.png"},
        {**GOOD, "ground_truth": ""},
        {**GOOD, "image_path": "images/b.png", "ground_truth": 5},
    ]
    path = write_jsonl(r1v_dir / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vlm_mig.data.loaders"):
        samples = load_r1v_jsonl(path, skip_bad=True)
    assert [s.answer for s in samples] == ["3", "5"]
    assert samples.report.loaded == 2 and samples.report.n_skipped == 3
    for line, reason in zip((2, 3, 4), samples.report.skipped):
        assert f"mixed.jsonl:{line}" in reason
    assert "skipped 3 bad row(s)" in caplog.text
    assert "loaded 2, skipped 3" in str(samples.report)


def test_limit_counts_kept_samples(r1v_dir: Path):
    path = write_jsonl(
        r1v_dir / "l.jsonl", ["{bad", GOOD, {**GOOD, "ground_truth": 4}, {**GOOD, "ground_truth": 5}]
    )
    samples = load_r1v_jsonl(path, skip_bad=True, limit=2)
    assert [s.answer for s in samples] == ["3", "4"] and samples.report.n_skipped == 1
    assert load_r1v_jsonl(path, skip_bad=True, limit=0) == []


# --------------------------------------------------------------------------------------------
# Super-CLEVR / CLEVR scenes
# --------------------------------------------------------------------------------------------


def _objects(n: int) -> list[dict]:
    return [{"shape": "car", "color": "red"} for _ in range(n)]


def test_superclevr_per_image_scene_files(tmp_path: Path):
    for i in range(2):
        png(tmp_path / "images" / f"superCLEVR_new_{i:06d}.png")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    # One scene names its image, the other relies on the scene file's name.
    (scenes / "superCLEVR_new_000000.json").write_text(
        json.dumps({"image_index": 0, "image_filename": "superCLEVR_new_000000.png", "objects": _objects(3)})
    )
    (scenes / "superCLEVR_new_000001.json").write_text(json.dumps({"objects": _objects(7)}))
    samples = load_superclevr(tmp_path)
    assert [(s.id, s.answer, s.task) for s in samples] == [
        ("superCLEVR_new_000000", "3", "count"),
        ("superCLEVR_new_000001", "7", "count"),
    ]
    assert all(
        s.question == COUNT_QUESTION == "How many different items are there in the image?" for s in samples
    )
    assert samples[0].meta["image_index"] == 0 and Path(samples[1].images[0]).is_file()


def test_superclevr_single_scenes_file(tmp_path: Path):
    for name in ("s0.png", "s1.png", "s2.png"):
        png(tmp_path / "images" / name)
    data = {
        "info": {},
        "scenes": [{"image_filename": f"s{i}.png", "objects": _objects(i + 3)} for i in range(3)],
    }
    (tmp_path / "superCLEVR_scenes.json").write_text(json.dumps(data))
    samples = load_superclevr(tmp_path)
    assert [s.answer for s in samples] == ["3", "4", "5"]
    # The scenes file itself is accepted as the root, and limit stops early.
    assert [s.id for s in load_superclevr(tmp_path / "superCLEVR_scenes.json", limit=2)] == ["s0", "s1"]


def test_clevr_layout_with_split_subfolder(tmp_path: Path):
    png(tmp_path / "images" / "val" / "CLEVR_val_000000.png")
    scenes = {"scenes": [{"split": "val", "image_filename": "CLEVR_val_000000.png", "objects": _objects(6)}]}
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "CLEVR_val_scenes.json").write_text(json.dumps(scenes))
    (s,) = load_superclevr(tmp_path)
    assert s.answer == "6" and s.images[0].endswith("val/CLEVR_val_000000.png")


def test_superclevr_errors_name_file_and_scene(tmp_path: Path):
    png(tmp_path / "images" / "s0.png")
    path = tmp_path / "scenes.json"
    path.write_text(
        json.dumps(
            {"scenes": [{"image_filename": "s0.png", "objects": _objects(2)}, {"image_filename": "s0.png"}]}
        )
    )
    with pytest.raises(DataError, match="missing field 'objects'") as err:
        load_superclevr(tmp_path)
    assert_located(err, path, "scenes.json [scenes[1]]")

    path.write_text(json.dumps({"scenes": [{"image_filename": "gone.png", "objects": []}]}))
    with pytest.raises(DataError, match="image not found") as err:
        load_superclevr(tmp_path)
    assert_located(err, path, "scenes[0]")

    path.write_text('{"scenes": [\n  {"objects": []},\n  {"objects": [}\n]}')
    with pytest.raises(DataError, match="malformed JSON") as err:
        load_superclevr(tmp_path)
    assert_located(err, path, 3)

    with pytest.raises(DataError, match="no scene JSON"):
        load_superclevr(tmp_path / "images")


def test_superclevr_skip_bad(tmp_path: Path):
    png(tmp_path / "images" / "a.png")
    _corrupt(tmp_path / "images" / "bad.png")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "a.json").write_text(json.dumps({"objects": _objects(4)}))
    (scenes / "b.json").write_text("{oops")
    (scenes / "bad.json").write_text(json.dumps({"objects": _objects(1)}))
    samples = load_superclevr(tmp_path, skip_bad=True)
    assert [s.answer for s in samples] == ["4"]
    assert samples.report.n_skipped == 2
    assert "b.json:1" in samples.report.skipped[0] and "corrupt image" in samples.report.skipped[1]


# --------------------------------------------------------------------------------------------
# Generic jsonl
# --------------------------------------------------------------------------------------------


def test_generic_jsonl_fields_and_meta(tmp_path: Path):
    png(tmp_path / "img.png")
    path = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {
                "id": "q1",
                "question": "What is 2 + 3 * 4?",
                "answer": 14,
                "answer_variants": ["14.0"],
                "gold_steps": "3 * 4 = 12\n\n2 + 12 = 14",
                "images": "img.png",
                "level": 2,
                "meta": {"origin": "synthetic"},
            },
            {"question": "Say hi", "answer": "hi", "gold_steps": ["greet"]},
        ],
    )
    first, second = load_jsonl(path, "numeric")
    assert (first.id, first.task, first.answer, first.variants) == ("q1", "numeric", "14", ["14", "14.0"])
    assert first.gold_steps == ["3 * 4 = 12", "2 + 12 = 14"]
    assert first.images == [str((tmp_path / "img.png").resolve())]
    assert first.meta["level"] == 2 and first.meta["origin"] == "synthetic" and "meta" not in first.meta
    assert second.id == "gen-2" and second.images == [] and second.gold_steps == ["greet"]


def test_generic_jsonl_field_map(tmp_path: Path):
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"uid": 5, "prompt": "Pick one: A or B", "target": "B"}])
    for fields in (
        {"question": "prompt", "answer": "target", "id": "uid"},
        FieldMap(question="prompt", answer="target", id="uid"),
    ):
        (s,) = load_jsonl(path, "mc", fields=fields)
        assert (s.id, s.question, s.answer, s.task) == ("5", "Pick one: A or B", "B", "mc")
    with pytest.raises(DataError, match="unknown field-map keys"):
        load_jsonl(path, "mc", fields={"prompt": "question"})


def test_generic_jsonl_messages(tmp_path: Path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    chat = [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"}, {"type": "image"}]},
    ]
    inline = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Count."}]}
    ]
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": chat, "images": ["a.png", "b.png"], "answer": "A"},
            {"messages": inline, "answer": "2"},
        ],
    )
    first, second = load_jsonl(path, "mc")
    assert first.messages == chat and [Path(p).name for p in first.images] == ["a.png", "b.png"]
    # Paths written in the image parts (qwen-vl-utils style) move to ``images``.
    assert second.messages[0]["content"][0] == {"type": "image"} and Path(second.images[0]).name == "a.png"


GENERIC_BAD_ROWS = [
    (
        "both_prompts",
        {"question": "q", "messages": [{"role": "user", "content": "q"}], "answer": "1"},
        "exactly one",
    ),
    ("no_prompt", {"answer": "1"}, "exactly one"),
    ("no_answer", {"question": "q"}, "missing field 'answer'"),
    ("bad_messages", {"messages": [{"text": "q"}], "answer": "1"}, "'role' and 'content'"),
    (
        "image_count",
        {"messages": [{"role": "user", "content": [{"type": "image"}]}], "answer": "1"},
        "1 image part",
    ),
    ("missing_image", {"question": "q", "images": ["nope.png"], "answer": "1"}, "image not found"),
    ("bad_meta", {"question": "q", "answer": "1", "meta": [1]}, "must be an object"),
]


@pytest.mark.parametrize(
    "bad,expected", [(b, e) for _, b, e in GENERIC_BAD_ROWS], ids=[n for n, _, _ in GENERIC_BAD_ROWS]
)
def test_generic_jsonl_bad_rows(tmp_path: Path, bad, expected):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "ok", "answer": "1"}, bad])
    with pytest.raises(DataError, match=expected) as err:
        load_jsonl(path, "math")
    assert_located(err, path, 2)
    skipped = load_jsonl(path, "math", skip_bad=True)
    assert len(skipped) == 1 and skipped.report.n_skipped == 1


# --------------------------------------------------------------------------------------------
# Hugging Face datasets on local files
# --------------------------------------------------------------------------------------------


def _hf_rows(tmp_path: Path) -> dict:
    return {
        "image": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "green")],
        "problem": ["How many items?", "How many cubes?"],
        "solution": ["<answer> 3 </answer>", "<answer> 1 </answer>"],
    }


def test_hf_jsonl_with_image_paths(r1v_dir: Path):
    path = write_jsonl(
        r1v_dir / "hf.jsonl",
        [
            {"image": "images/a.png", "problem": "How many?", "solution": "<answer> 2 </answer>"},
            {
                "image": "images/b.png",
                "problem": "How many now?",
                "solution": "<answer>6</answer>",
                "id": "x",
            },
        ],
    )
    samples = load_hf_dataset(path, cache_dir=r1v_dir / "hf_cache")
    assert [(s.id, s.answer, s.task) for s in samples] == [("hf-1", "2", "count"), ("x", "6", "count")]
    assert samples[0].images == [str((r1v_dir / "images" / "a.png").resolve())]


def test_hf_save_to_disk_pil_images_are_cached(tmp_path: Path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(_hf_rows(tmp_path)).save_to_disk(str(folder))
    cache = tmp_path / "img_cache"
    samples = load_hf_dataset(folder, image_cache=cache)
    assert [s.answer for s in samples] == ["3", "1"]
    for s, color in zip(samples, ("red", "green")):
        (p,) = s.images
        assert Path(p).parent == cache.resolve()
        with Image.open(p) as im:
            assert im.convert("RGB").getpixel((0, 0)) == Image.new("RGB", (1, 1), color).getpixel((0, 0))
    # Content-hashed names: loading again reuses the same files.
    assert [s.images for s in load_hf_dataset(folder, image_cache=cache)] == [s.images for s in samples]


def test_hf_parquet_dataset_dict_and_in_memory(tmp_path: Path):
    import datasets

    ds = datasets.Dataset.from_dict(_hf_rows(tmp_path))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    cache = tmp_path / "img_cache"
    samples = load_hf_dataset(tmp_path / "train.parquet", image_cache=cache, cache_dir=tmp_path / "hf")
    assert [s.answer for s in samples] == ["3", "1"] and all(Path(s.images[0]).is_file() for s in samples)

    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    (s,) = load_hf_dataset(tmp_path / "dd", split="test", image_cache=cache)
    assert s.answer == "1"
    with pytest.raises(DataError, match="no split 'validation'"):
        load_hf_dataset(tmp_path / "dd", split="validation")

    (s, _) = load_hf_dataset(ds, image_cache=cache, task="count")
    assert s.answer == "3"

    # A hub dataset fetched with `huggingface-cli download --local-dir` is a folder of data files.
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    ds.to_parquet(str(snapshot / "data" / "train-00000-of-00001.parquet"))
    samples = load_hf_dataset(snapshot, image_cache=cache, cache_dir=tmp_path / "hf")
    assert [s.id for s in samples] == ["snapshot-1", "snapshot-2"]


def test_hf_csv_text_only(tmp_path: Path):
    path = tmp_path / "math.csv"
    path.write_text('problem,solution,level\n"What is 1+1?",2,1\n"Half of 5?",2.5,3\n')
    samples = load_hf_dataset(path, task="math", cache_dir=tmp_path / "hf")
    assert [(s.question, s.answer, s.images, s.meta["level"]) for s in samples] == [
        ("What is 1+1?", "2", [], 1),
        ("Half of 5?", "2.5", [], 3),
    ]
    with pytest.raises(DataError, match="missing field 'image'") as err:
        load_hf_dataset(path, task="math", cache_dir=tmp_path / "hf", require_image=True)
    assert_located(err, path, 1)


def test_hf_bad_rows(tmp_path: Path):
    import datasets

    rows = _hf_rows(tmp_path)
    rows["image"] = [
        {"bytes": b"garbage", "path": None},
        {"bytes": Path(png(tmp_path / "ok.png")).read_bytes(), "path": None},
    ]
    rows["solution"][1] = "<answer></answer>"
    folder = tmp_path / "bad"
    datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "problem": datasets.Value("string"),
                "solution": datasets.Value("string"),
            }
        ),
    ).save_to_disk(str(folder))
    with pytest.raises(DataError, match="corrupt embedded image") as err:
        load_hf_dataset(folder, image_cache=tmp_path / "c")
    assert_located(err, folder, 1)
    samples = load_hf_dataset(folder, image_cache=tmp_path / "c", skip_bad=True)
    assert samples == [] and samples.report.n_skipped == 2
    assert "bad:2" in samples.report.skipped[1] and "empty answer" in samples.report.skipped[1]


def test_hf_unreadable_file(tmp_path: Path):
    path = write_jsonl(tmp_path / "broken.jsonl", [{"problem": "q", "solution": "1"}, "{broken"])
    with pytest.raises(DataError, match="datasets could not load it") as err:
        load_hf_dataset(path, cache_dir=tmp_path / "hf")
    assert "broken.jsonl" in str(err.value)
    with pytest.raises(DataError, match="unknown data file type"):
        load_hf_dataset(png(tmp_path / "x.png"))


# --------------------------------------------------------------------------------------------
# Shipped benchmarks
# --------------------------------------------------------------------------------------------


def test_last_boxed_balances_braces():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{x^{2}+1}") == "x^{2}+1"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert last_boxed("no box here") is None


def test_gsm8k_gold():
    gold, steps = gsm8k_gold("He pays 2*1,000 = <<2*1000=2000>>2000.\n\n#### 2,000")
    assert gold == "2000" and steps == ["He pays 2*1,000 = 2000."]
    with pytest.raises(ValueError):
        gsm8k_gold("no final answer")


@pytest.mark.parametrize(
    "name,rows,task", [(b.name, b.rows, b.task) for b in BENCHMARKS.values()], ids=list(BENCHMARKS)
)
def test_benchmark_row_counts(name: str, rows: int, task: str):
    samples = load_benchmark(name)
    assert len(samples) == rows and samples.report.n_skipped == 0
    assert all(s.task == task and s.question and s.answer for s in samples)
    assert len({s.id for s in samples}) == rows


def test_benchmark_expected_sizes():
    assert {n: BENCHMARKS[n].rows for n in list_benchmarks()} == {
        "math500": 500,
        "gsm8k": 1319,
        "svamp": 1000,
        "aime24": 30,
        "amc23": 40,
        "minerva_math": 272,
    }


def test_benchmark_gold_answers():
    gsm = load_benchmark("gsm8k")
    assert gsm[0].answer == "18" and gsm[0].task == "numeric"
    assert gsm[0].gold_steps == [
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.",
    ]
    assert not any("<<" in step for s in gsm for step in s.gold_steps or [])
    assert all("," not in s.answer for s in gsm) and "2125" in {s.answer for s in gsm}

    svamp = load_benchmark("svamp", limit=2)
    assert svamp[0].answer == "145" and svamp[0].id == "svamp-chal-777"
    assert svamp[0].question == (
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups "
        "and oranges are organized into 93 groups How big is each group of bananas?"
    )

    math500 = load_benchmark("MATH-500", limit=1)[0]
    assert math500.answer == r"\left( 3, \frac{\pi}{2} \right)" and math500.task == "math"
    assert math500.meta["solution"].endswith(r"$\boxed{\left( 3, \frac{\pi}{2} \right)}.$")
    assert math500.meta["subject"] == "Precalculus"

    aime = load_benchmark("aime24")
    assert (aime[0].id, aime[0].answer) == ("aime24-60", "204")
    amc = load_benchmark("amc23")
    assert [s.answer for s in amc[:3]] == ["27", "36", "45"] and amc[15].answer == "-1"

    minerva = load_benchmark("minerva", limit=1)[0]
    assert minerva.answer == "1.6" and minerva.meta["solution"].startswith("Start with:")


def test_benchmark_lookup_and_location(tmp_path: Path, monkeypatch):
    assert get_benchmark("GSM8K").name == "gsm8k"
    with pytest.raises(DataError, match="unknown benchmark 'mmlu'"):
        load_benchmark("mmlu")
    assert len(load_benchmark("aime24", limit=5)) == 5
    assert find_datasets_dir() == Path(__file__).resolve().parents[1] / "datasets"

    # An override folder is used as-is, and a bad row there is reported with file and line.
    bad = write_jsonl(
        tmp_path / "gsm8k" / "test.jsonl",
        [{"question": "q", "answer": "1\n#### 1"}, {"question": "q", "answer": "no hashes"}],
    )
    monkeypatch.setenv("VLM_MIG_DATASETS", str(tmp_path))
    with pytest.raises(DataError, match="no '####'") as err:
        load_benchmark("gsm8k")
    assert_located(err, bad, 2)
    with pytest.raises(DataError, match="benchmark file missing"):
        load_benchmark("svamp")
    monkeypatch.setenv("VLM_MIG_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="benchmark folder not found"):
        load_benchmark("gsm8k")
    assert (
        len(load_benchmark("amc23", datasets_dir=find_datasets_dir(Path(__file__).parents[1] / "datasets")))
        == 40
    )
