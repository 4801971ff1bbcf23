"""A malformed-input corpus across the commands: each case is one line on stderr that names the file, line,
field or path at fault, exit code 2, no traceback, and (for the training commands) no run folder left behind."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from vlm_mig.cli import main


def _png(path: Path, size=(112, 112)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path)
    return path


def _corrupt_png(path: Path) -> Path:
    """Header and chunk checksums right, compressed stream wrong: PIL's verify() passes it."""
    _png(path, (32, 32))
    data = bytearray(path.read_bytes())
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4 : i])[0]
    body = bytes(data[i + 4 : i + 6]) + bytes(n - 2)
    data[i + 4 : i + 4 + n] = body
    data[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def _rows(path: Path, rows: list, raw: bytes | None = None) -> Path:
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"question": "How many objects?", "answer": "3", "images": ["images/a.png"]}


def _train_args(tiny, out, data, *extra):
    return ["train", f"model.name_or_path={tiny}", f"trainer.output_dir={out}", f"data.train={data}",
            "data.format=jsonl", "data.validation=null", "trainer.eval_steps=0", "trainer.report_to=[]",
            "trainer.progress=false", *extra]


Case = Callable[[Path, Path], tuple[list[str], list[str]]]


def _cases() -> dict[str, Case]:
    """name -> (tmp dir, tiny model dir) -> (argv, words the one-line error must hold)."""

    def data_case(rows=None, raw=None, *words):
        def make(tmp, tiny):
            _png(tmp / "images" / "a.png")
            data = _rows(tmp / "bad.jsonl", rows or [], raw)
            return _train_args(tiny, tmp / "run", data), ["bad.jsonl", *words]
        return make

    def cfg_case(override, *words, cmd="train"):
        def make(tmp, tiny):
            _png(tmp / "images" / "a.png")
            data = _rows(tmp / "good.jsonl", [GOOD])
            args = _train_args(tiny, tmp / "run", data, *override.split())
            args[0] = cmd
            return args, list(words)
        return make

    def image_case(make_image, *words):
        def make(tmp, tiny):
            (tmp / "images").mkdir(exist_ok=True)
            make_image(tmp / "images" / "x.png")
            data = _rows(tmp / "bad.jsonl", [{**GOOD, "images": ["images/x.png"]}])
            return _train_args(tiny, tmp / "run", data), ["bad.jsonl:1", "x.png", *words]
        return make

    def plain(argv_of, *words):
        def make(tmp, tiny):
            return argv_of(tmp, tiny), list(words)
        return make

    a_file = lambda tmp: _rows(tmp / "a_file.txt", ["x"])  # noqa: E731
    rows_file = lambda tmp: _rows(tmp / "rows.jsonl", [{"question": "2+2?", "completion": "<answer>4</answer>",  # noqa: E731
                                                         "answer": "4"}])
    return {
        # training data
        "malformed json": data_case([GOOD, '{"question": '], None, ":2", "malformed JSON"),
        "not an object": data_case(["[1, 2]"], None, ":1", "expected a JSON object"),
        "empty answer": data_case([{**GOOD, "answer": " "}], None, ":1", "empty answer"),
        "missing answer": data_case([{"question": "q?", "images": ["images/a.png"]}], None, ":1", "answer"),
        "not utf-8": data_case(None, json.dumps(GOOD).encode() + b"\n" + b'{"question": "\xff"}\n', ":2",
                               "not UTF-8"),
        "empty file": data_case(None, b"\n\n", "no rows"),
        "missing image": data_case([{**GOOD, "images": ["images/nope.png"]}], None, ":1", "image not found"),
        "corrupt image stream": image_case(_corrupt_png, "corrupt image"),
        "zero-byte image": image_case(lambda p: p.write_bytes(b""), "corrupt image"),
        "not an image": image_case(lambda p: p.write_text("hello"), "corrupt image"),
        "400:1 image": image_case(lambda p: _png(p, (800, 2)), "aspect ratio above 200:1"),
        "missing data file": cfg_case("data.train=/no/such/file.jsonl", "data source", "/no/such/file.jsonl"),
        # config values
        "unknown key": cfg_case("trainer.max_step=3", "trainer.max_step", "did you mean trainer.max_steps"),
        "unknown section": cfg_case("trainr.max_steps=3", "trainr", "unknown section"),
        "wrong type": cfg_case("trainer.max_steps=abc", "trainer.max_steps", "expected an integer"),
        "bad choice": cfg_case("loss.normalizer=dr-grpo", "loss.normalizer", "did you mean"),
        "out of bounds": cfg_case("rollout.top_p=1.5", "rollout.top_p", "in [0, 1]"),
        "infinite lr": cfg_case("optim.lr=.inf", "optim.lr", "finite"),
        "nan alpha": cfg_case("loss.alpha=.nan", "loss.alpha", "finite"),
        "negative weight": cfg_case("loss.gamma=-1", "loss.gamma", ">= 0"),
        "single-rollout groups": cfg_case("rollout.num_generations=1", "rollout.num_generations", "at least 2"),
        "teacher errors in RL": cfg_case("data.teacher_error_rate=0.5", "data.teacher_error_rate"),
        "teacher slip 0": cfg_case("data.teacher_error_rate=0.5 data.teacher_slip=0", "data.teacher_slip", cmd="sft"),
        "no such model": cfg_case("model.name_or_path=/no/such/model", "model.name_or_path", "no such folder"),
        "output under a file": plain(lambda tmp, tiny: _train_args(tiny, a_file(tmp) / "run", "synthetic:clevr"),
                                     "trainer.output_dir", "a_file.txt is a file"),
        "bad yaml": plain(lambda tmp, tiny: ["train", "--config", str(_rows(tmp / "c.yaml", ["trainer: [1, 2"]))],
                          "c.yaml", "invalid YAML"),
        "missing config": plain(lambda tmp, tiny: ["train", "--config", str(tmp / "none.yaml")],
                                "config file not found"),
        "resume from a non-checkpoint": plain(
            lambda tmp, tiny: ["sft", f"model.name_or_path={tiny}", f"trainer.output_dir={tmp / 'run'}",
                               "--resume-from", str(tmp)], "--resume-from", "not a complete checkpoint"),
        # eval
        "eval: no such model": plain(lambda tmp, tiny: ["eval", "--model", "/no/such/m", "--task", "gsm8k"],
                                     "--model", "/no/such/m"),
        "eval: out is a file": plain(lambda tmp, tiny: ["eval", "--model", str(tiny), "--task", "gsm8k", "--out",
                                                        str(a_file(tmp))], "--out", "is a file"),
        "eval: no suite": plain(lambda tmp, tiny: ["eval", "--model", str(tiny)], "--suite"),
        "eval: samples 0": plain(lambda tmp, tiny: ["eval", "--model", str(tiny), "--task", "gsm8k", "--samples",
                                                    "0"], "samples"),
        # score
        "score: out is a folder": plain(lambda tmp, tiny: ["score", "--model", str(tiny), "--data",
                                                           str(rows_file(tmp)), "--out", str(tmp)], "--out",
                                        "is a folder"),
        "score: max tokens 0": plain(lambda tmp, tiny: ["score", "--model", str(tiny), "--data", str(rows_file(tmp)),
                                                        "--out", str(tmp / "o.jsonl"), "--max-tokens", "0"],
                                     "max_tokens"),
        "score: no completion": plain(lambda tmp, tiny: ["score", "--model", str(tiny), "--data",
                                                         str(_rows(tmp / "r.jsonl", [{"question": "q", "answer": 1}])),
                                                         "--out", str(tmp / "o.jsonl")], "r.jsonl:1", "completion"),
        # data and the tiny model
        "data clevr: out is a file": plain(lambda tmp, tiny: ["data", "clevr", "--n", "2", "--out", str(a_file(tmp))],
                                           "--out", "is a file"),
        "data arithmetic: out is a folder": plain(lambda tmp, tiny: ["data", "arithmetic", "--n", "2", "--out",
                                                                     str(tmp)], "--out", "is a folder"),
        "data clevr: negative n": plain(lambda tmp, tiny: ["data", "clevr", "--n", "-1", "--out", str(tmp / "c")],
                                        "n must be >= 0"),
        "build-tiny: warm-up without vision": plain(lambda tmp, tiny: ["build-tiny", "--arch", "qwen2",
                                                                       "--warmup-steps", "5", "--out",
                                                                       str(tmp / "m")], "--warmup-steps"),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_what_is_wrong(name, tmp_path, tiny_vl_dir, capsys):
    argv, words = CASES[name](tmp_path, tiny_vl_dir)
    before = {p.name for p in tmp_path.iterdir()}
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip()
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (name, w, lines[0])
    assert not (tmp_path / "run").exists() or "run" in before, f"{name}: a run folder was left behind"


def test_the_corpus_covers_enough_kinds():
    assert len(CASES) >= 30
