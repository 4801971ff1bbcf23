"""``vlm-mig score`` end to end on the tiny model: outputs, --explain re-check, bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_mig.cli import main
from vlm_mig.models import load_model


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_cli_outputs_and_explain_sequences_recheck(tiny_vl_dir, make_image, tmp_path):
    make_image("scene.png")
    completion = ("<think>\n### Step 1: I see 2 red cubes.\n### Step 2: I see 1 blue sphere.\n"
                  "### Step 3: In total 2 + 1 = 3 objects.\n</think>\n<answer>3</answer>")
    rows = [
        {"id": "r1", "question": "How many different items are there in the image?", "image": "scene.png",
         "completion": completion, "answer": "3", "answer_variants": ["three"]},
        {"question": "What is 2 + 2?", "completion": "<answer>4</answer>", "answer": "4", "extra": 7},
    ]
    data = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(tiny_vl_dir), "--data", str(data), "--out", str(out), "--explain"]) == 0
    res = [json.loads(line) for line in out.read_text().splitlines()]
    r1, r2 = res
    assert r1["id"] == "r1" and r1["image"] == "scene.png" and r2["extra"] == 7  # input fields kept as given
    assert len(r1["steps"]) == 3 and len(r1["l"]) == 4 and len(r1["gains"]) == 3
    # records kept (the default): the running best of l, capped at l_K
    assert r1["watermark"] == [min(max(r1["l"][: k + 1]), r1["l"][-1]) for k in range(4)]
    assert r1["process_reward"] == pytest.approx(sum(r1["gains"]), abs=1e-5)
    assert r1["process_reward"] == pytest.approx(r1["watermark"][-1] - r1["watermark"][0], abs=1e-5)
    assert r2["steps"] == [] and r2["gains"] == [] and r2["process_reward"] == 0.0  # no think span: K = 0
    # Re-check l_k with a plain forward over the explained token ids (images go with the sequence).
    from vlm_mig.data.schema import Sample
    from vlm_mig.models import load_processor
    from vlm_mig.processing import encode_prompts

    model = load_model(tiny_vl_dir)
    prompt = encode_prompts(load_processor(tiny_vl_dir), [Sample(id="x", question=rows[0]["question"],
                                                                   images=[str(tmp_path / "scene.png")], answer="3")])
    for k, seq in enumerate(r1["sequences"]):
        ids = torch.tensor([seq["input_ids"]])
        mm = (ids == model.config.image_token_id).int()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                           pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw).logits[0]
        a = seq["answer_start"]
        lp = logits[a - 1 : -1].float().log_softmax(-1).gather(-1, ids[0, a:, None]).squeeze(-1).mean()
        assert abs(lp.item() - r1["l"][k]) < 1e-4


def test_score_bad_row_names_the_line(tiny_text_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "completion": "c", "answer": "1"}) + "\n"
                    + json.dumps({"question": "q", "answer": "1", "completion": 5}) + "\n")
    assert main(["score", "--model", str(tiny_text_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def _check_joint_tokenization(model_dir, probe: str, answer: str, first_answer_token: str):
    """Each explained sequence is prompt + prefix_k + tok(probe + answer) as ONE text, the answer starting at
    the first token that ends past the seam, and l_k is the plain forward's mean log-prob from there."""
    from vlm_mig.data.schema import Sample
    from vlm_mig.models import load_processor
    from vlm_mig.processing import encode_prompts, tokenizer_of
    from vlm_mig.score import ScoreConfig, score_samples

    model, processor = load_model(model_dir), load_processor(model_dir)
    tok = tokenizer_of(processor)
    completion = "<think>\n### Step 1: Half of it is what we need.\n### Step 2: That is the result.\n</think>"
    sample = Sample(id="j", question="What is half of one?", answer=answer, task="text",
                    meta={"completion": completion})
    (rec,) = score_samples(model, processor, [sample], ScoreConfig(probe=probe), explain=True, progress=False)
    prompt = encode_prompts(processor, [sample]).input_ids[0].tolist()
    comp = tok.encode(completion, add_special_tokens=False)
    joint = tok.encode(probe + answer, add_special_tokens=False)
    assert len(rec["sequences"]) == len(rec["l"]) == 3
    for k, seq in enumerate(rec["sequences"]):
        ids, a = seq["input_ids"], seq["answer_start"]
        cut = len(ids) - len(joint) - len(prompt)
        assert ids == prompt + comp[:cut] + joint
        assert tok.convert_ids_to_tokens(ids[a]) == first_answer_token
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0]
        lp = logits[a - 1 : -1].float().log_softmax(-1).gather(-1, t[0, a:, None]).squeeze(-1).mean()
        assert abs(lp.item() - rec["l"][k]) < 1e-4


def test_probe_and_answer_are_tokenized_as_one_text(tiny_text_dir):
    # The tiny BPE writes "So the" as S|o|Ġthe: the space of the probe "So " goes into the answer's token.
    _check_joint_tokenization(tiny_text_dir, "</think>\nSo ", "the", "Ġthe")


@pytest.mark.real_weights
def test_latex_answer_tokenized_with_the_probe_on_smollm2(smollm2_dir):
    # SmolLM2 merges the probe's ">" with a LaTeX answer's leading backslash: <, answer, >\, frac.
    _check_joint_tokenization(smollm2_dir, "</think>\n<answer>", "\\frac{1}{2}", ">\\")


def test_score_cli_rejects_a_negative_min_gain(tiny_text_dir, tmp_path, capsys):
    data = _write(tmp_path / "in.jsonl", [{"question": "q", "completion": "c", "answer": "1"}])
    args = ["score", "--model", str(tiny_text_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "--min-gain", "-1"]) == 2
    assert "min_gain must be >= 0" in capsys.readouterr().err
    assert main([*args, "--answer-score", "digits", "--l0-context", "opener", "--no-watermark"]) == 0


def test_a_row_longer_than_max_tokens_is_refused_before_the_pass(tiny_vl_dir, tmp_path, capsys):
    """A 100k-character completion used to build a dense [L x L] mask (14 GB before it was killed)."""
    rows = [{"id": "long", "question": "What is 2 + 2?", "completion": "<think>" + "### Step 1: 2 + 2 = 4. " * 4000,
             "answer": "4"}]
    data = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(tiny_vl_dir), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 'long'" in err and "exceed the 8192 a row may have" in err and "--max-tokens" in err
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()
    assert main(["score", "--model", str(tiny_vl_dir), "--data", str(data), "--out", str(out), "--max-tokens",
                 "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
