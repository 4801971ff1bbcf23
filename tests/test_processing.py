"""Prompt formatting, image sizing, padding, M-RoPE ids, and the no-silent-truncation rule."""

from __future__ import annotations

import pytest
import torch

from vlm_mig.adapter import adapter_for
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.models import load_model, load_processor
from vlm_mig.processing import PromptTemplate, build_messages, encode_prompts, load_images
from vlm_mig.prompts import SYSTEM_PROMPT, format_solution


def test_messages_place_images_before_question_and_interleaved_messages_are_kept(make_image):
    s = Sample(id="q", question="How many?", images=["x.png", "y.png"], answer="3", task="count")
    msgs = build_messages(s)
    assert msgs[0]["role"] == "system" and msgs[0]["content"][0]["text"] == SYSTEM_PROMPT
    assert [p["type"] for p in msgs[1]["content"]] == ["image", "image", "text"]
    inter = Sample(id="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Left:"}, {"type": "image"}, {"type": "text", "text": "Right:"}, {"type": "image"}]}],
        images=["a.png", "b.png"], answer="1", task="count")
    assert [p["type"] for p in build_messages(inter)[1]["content"]] == ["text", "image", "text", "image"]
    bad = Sample(id="bad", messages=[{"role": "user", "content": [{"type": "image"}]}], images=[], answer="1")
    with pytest.raises(DataError, match="bad"):
        build_messages(bad)
    r1v = build_messages(Sample(id="r", question="Q?", answer="1"), PromptTemplate.r1v())
    assert r1v[0]["role"] == "user" and "<answer>" in r1v[0]["content"][-1]["text"]


def test_text_only_model_rejects_images_with_a_clear_error(tiny_text_dir):
    tok = load_processor(tiny_text_dir)
    batch = encode_prompts(tok, [Sample(id="t1", question="What is 2+3?", answer="5"),
                                 Sample(id="t2", question="Longer question: what is 12 times 3?", answer="36")])
    assert batch.pixel_values is None and batch.attention_mask[0, 0] == 0
    with pytest.raises(DataError, match="text-only"):
        encode_prompts(tok, [Sample(id="img", question="How many?", images=["a.png"], answer="1", task="count")])


def test_image_sizing_follows_min_max_pixels(make_image):
    big = Sample(id="b", question="?", images=[str(make_image("big.png", size=(448, 448)))], answer="1")
    (img,) = load_images(big, max_pixels=112 * 112)
    assert img.size == (112, 112)
    (img,) = load_images(big, min_pixels=224 * 224, max_pixels=448 * 448)
    assert img.size == (448, 448)
    small = Sample(id="s", question="?", images=[str(make_image("small.png", size=(30, 20)))], answer="1")
    (img,) = load_images(small, min_pixels=56 * 56)
    assert img.size[0] % 28 == 0 and img.size[1] % 28 == 0 and img.size[0] * img.size[1] >= 56 * 56


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips a 16-bit image at 255 (a mid-grey scene becomes white); load_images scales it."""
    import numpy as np
    from PIL import Image

    from vlm_mig.processing import to_8bit

    ramp = (np.arange(112 * 112).reshape(112, 112) * 5).astype(np.uint16)  # 0 .. 62715
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I;16")
        assert np.asarray(im.convert("RGB")).mean() > 250  # what the clipping does
    (img,) = load_images(Sample(id="g", question="?", images=[str(tmp_path / "g16.png")], answer="1"))
    got = np.asarray(img.convert("RGB"), dtype=np.float64)[..., 0]
    want = ramp.astype(np.float64) / 257
    assert img.size == (112, 112) and np.abs(got - want).max() <= 1.0 and 100 < got.mean() < 140
    # 32-bit integer images within 0-255 are 8-bit already; float images in [0, 1] are scaled by 255.
    assert np.asarray(to_8bit(Image.fromarray(np.full((4, 4), 200, dtype=np.int32)))).max() == 200
    assert np.asarray(to_8bit(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))).max() == 128
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_8bit(rgb) is rgb


def test_missing_image_names_the_sample(tiny_vl_dir, tmp_path):
    proc = load_processor(tiny_vl_dir)
    with pytest.raises(DataError, match="'lost'.*nope.png"):
        encode_prompts(proc, [Sample(id="lost", question="?", images=[str(tmp_path / "nope.png")], answer="1")])


def test_prompt_over_max_length_is_an_error_naming_the_sample(tiny_vl_dir, make_image):
    proc = load_processor(tiny_vl_dir)
    s = Sample(id="long-one", question="How many items?", images=[str(make_image())], answer="1", task="count")
    encode_prompts(proc, [s], max_prompt_length=200)
    with pytest.raises(DataError, match="long-one.*16 image tokens"):
        encode_prompts(proc, [s], max_prompt_length=40)


def test_mrope_ids_match_the_models_own_forward(tiny_vl_dir, make_image):
    model = load_model(tiny_vl_dir)
    proc = load_processor(tiny_vl_dir)
    samples = [Sample(id="a", question="How many?", images=[str(make_image("a.png"))], answer="1"),
               Sample(id="b", question="A much longer question about the objects?", images=[], answer="1")]
    batch = encode_prompts(proc, samples)
    pos = adapter_for(model).position_ids(model, batch.input_ids, batch.attention_mask, batch.mm_token_type_ids,
                                          batch.image_grid_thw)
    assert pos.shape == (3, 2, batch.input_ids.shape[1])
    real = batch.attention_mask[0].bool()
    # Image tokens share the temporal id and spread over height/width; text continues from the max.
    img = batch.mm_token_type_ids[0].bool()
    assert pos[0, 0, img].unique().numel() == 1 and pos[1, 0, img].unique().numel() == 4  # 8x8 patches merged 2x2
    assert int(pos[0, 0, real].max()) < int(real.sum())
    with torch.no_grad():
        implicit = model(**batch.model_inputs()).logits
        explicit = model(**batch.model_inputs(), position_ids=pos).logits
    m = batch.attention_mask.bool()
    assert torch.allclose(implicit[m], explicit[m], atol=1e-5)


def test_gold_solution_format():
    text = format_solution(["I see 2 cubes.", "I see 1 sphere.", "2 + 1 = 3."], "3")
    assert text.startswith("<think>\n### Step 1: I see 2 cubes.\n### Step 2:")
    assert text.endswith("</think>\n<answer>3</answer>")
