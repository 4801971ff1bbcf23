"""Unusable output locations: every command says so in one line naming the option and the path, exits 2, and
writes nothing (no model is loaded first, no stray temporary file is left)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlm_mig.cli import main
from vlm_mig.data.schema import DataError
from vlm_mig.outputs import check_output


@pytest.fixture()
def places(tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    return {"file": a_file, "under_file": a_file / "sub" / "out", "folder": a_folder}


def _fails(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err  # one line, no traceback
    for w in words:
        assert w in err, (w, err)
    return err


def test_check_output_by_hand(places, tmp_path):
    assert check_output(tmp_path / "new" / "deeper", "--out", folder=True) == tmp_path / "new" / "deeper"
    assert check_output(places["folder"], "--out", folder=True) == places["folder"]
    assert check_output(tmp_path / "x.jsonl", "--out", folder=False) == tmp_path / "x.jsonl"
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_output(places["file"], "--out", folder=True)
    with pytest.raises(DataError, match="is a folder; give a file path"):
        check_output(places["folder"], "--out", folder=False)
    with pytest.raises(DataError, match="a_file.txt is a file, so nothing can be written under it"):
        check_output(places["under_file"], "--out", folder=True)
    assert not (tmp_path / "new").exists()  # nothing is created


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_an_unwritable_folder_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(DataError, match="is not writable"):
        check_output(locked / "out", "--out", folder=True)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_folder_outputs_of_every_command(where, places, capsys, tiny_vl_dir, tmp_path):
    out = str(places[where])
    _fails(["data", "clevr", "--n", "2", "--out", out], capsys, "--out", out)
    _fails(["build-tiny", "--out", out, "--warmup-steps", "0"], capsys, "--out", out)
    _fails(["eval", "--model", str(tiny_vl_dir), "--task", "gsm8k", "--limit", "1", "--out", out], capsys, "--out", out)
    _fails(["demo", "--quick", "--out", out], capsys, "--out", out)
    for cmd in ("sft", "train"):
        _fails([cmd, f"model.name_or_path={tiny_vl_dir}", f"trainer.output_dir={out}"], capsys,
               "trainer.output_dir", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt", "a_folder"]


def test_file_outputs_of_every_command(places, capsys, tiny_vl_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "What is 2 + 2?", "completion": "<answer>4</answer>", "answer": "4"}\n')
    for out in (places["folder"], places["under_file"]):
        _fails(["data", "arithmetic", "--n", "2", "--out", str(out)], capsys, "--out", str(out))
        _fails(["score", "--model", str(tiny_vl_dir), "--data", str(rows), "--out", str(out)], capsys, "--out",
               str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt", "a_folder", "rows.jsonl"]
    assert list(Path(places["folder"]).iterdir()) == []  # no <out>.tmp beside or inside it


def test_a_model_path_that_does_not_exist_is_named(capsys, tmp_path, places):
    """Not a traceback about hub repo ids, and no run folder left behind."""
    from vlm_mig.models import check_model_path

    lost = str(tmp_path / "no" / "such" / "model")
    out = tmp_path / "run"
    for cmd in ("sft", "train"):
        _fails([cmd, f"model.name_or_path={lost}", f"trainer.output_dir={out}"], capsys, "model.name_or_path", lost,
               "no such folder")
    _fails(["eval", "--model", lost, "--task", "gsm8k", "--limit", "1", "--out", str(tmp_path / "ev")], capsys,
           "--model", lost)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "2 + 2?", "completion": "<answer>4</answer>", "answer": "4"}\n')
    _fails(["score", "--model", lost, "--data", str(rows), "--out", str(tmp_path / "s.jsonl")], capsys, "--model")
    assert not out.exists() and not (tmp_path / "ev").exists() and not (tmp_path / "s.jsonl").exists()
    with pytest.raises(DataError, match="not a model folder"):
        check_model_path(places["folder"], "--model")
    with pytest.raises(DataError, match="is a file"):
        check_model_path(places["file"], "--model")
    check_model_path("Qwen/Qwen2-VL-2B-Instruct", "--model")  # a hub id: left to from_pretrained
