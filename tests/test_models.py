"""The embedded default model: offline build, stock loading, determinism, save/reload round trip."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlm_mig.data.schema import Sample
from vlm_mig.models import build_tiny, load_model, load_processor
from vlm_mig.processing import encode_prompts


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen2"])
def test_build_tiny_is_deterministic_and_loads_with_stock_classes(tmp_path, arch):
    a = build_tiny(tmp_path / "a", arch=arch, seed=3)
    b = build_tiny(tmp_path / "b", arch=arch, seed=3)
    c = build_tiny(tmp_path / "c", arch=arch, seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(a / name) == _digest(b / name), name
    assert _digest(a / "model.safetensors") != _digest(c / "model.safetensors")
    if arch == "qwen2":
        model = AutoModelForCausalLM.from_pretrained(a)
        tok = AutoTokenizer.from_pretrained(a)
    else:
        model = AutoModelForImageTextToText.from_pretrained(a)
        tok = AutoProcessor.from_pretrained(a).tokenizer
    assert model.config.get_text_config().vocab_size == len(tok)
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert len(tok.tokenize(special)) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")
    assert not list(a.glob("*.bin")), "weights must be safetensors only"


def test_round_trip_two_images_generate_save_reload_identical_logits(tiny_vl_dir, make_image, tmp_path):
    torch.manual_seed(0)
    model = load_model(tiny_vl_dir)
    processor = load_processor(tiny_vl_dir)
    samples = [
        Sample(id="two", question="Which picture has more objects?", images=[str(make_image("a.png")),
               str(make_image("b.png", size=(168, 112), color=(10, 200, 10)))], answer="1", task="count"),
        Sample(id="one", question="How many items?", images=[str(make_image("c.png"))], answer="2", task="count"),
    ]
    batch = encode_prompts(processor, samples)
    # 168x112 is over max_pixels: scaled to 112x84
    assert batch.image_grid_thw.tolist() == [[1, 8, 8], [1, 6, 8], [1, 8, 8]]
    image_id = model.config.image_token_id
    assert (batch.input_ids[0] == image_id).sum() == 16 + 12 and (batch.input_ids[1] == image_id).sum() == 16
    assert batch.attention_mask[1, 0] == 0, "prompts are left padded"
    out = model.generate(**batch.model_inputs(), max_new_tokens=8, do_sample=True)
    assert out.shape[1] > batch.input_ids.shape[1]

    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    batch2 = encode_prompts(load_processor(tmp_path / "saved"), samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    with torch.no_grad():
        l1 = model(**batch.model_inputs()).logits
        l2 = reloaded(**batch2.model_inputs()).logits
    assert torch.equal(l1, l2)
