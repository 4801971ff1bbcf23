"""The tiny model's vision warm-up: targets line up with the processor's token order, the build is
deterministic, the result loads with stock classes, and the warm-up teaches the tower something."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_mig.data.clevr import make_clevr_example
from vlm_mig.models import build_tiny, load_model, load_processor
from vlm_mig.warmup import TARGET_NAMES, WarmupConfig, cell_targets

SMALL = WarmupConfig(steps=30, batch_size=8, scenes=48, eval_scenes=24, lr=3e-3)


def test_cell_targets_follow_the_processors_token_order(tiny_vl_dir) -> None:
    """The cell a target puts an object in is a merged token whose patches show that object (the processor
    orders patches by 2x2 merge window, row by row)."""
    proc = load_processor(tiny_vl_dir)
    merge = proc.image_processor.merge_size
    for i in range(12):
        ex = make_clevr_example(i, seed=11, num_objects=1)
        enc = proc.image_processor(images=[ex.image], return_tensors="pt")
        patches = enc["pixel_values"]  # [64, 1176] in merged-token order, merge*merge patches per token
        drawn = patches.std(-1) > 1e-3  # the ground is one flat colour; patches with the object are not
        tokens_with_object = set((drawn.nonzero().flatten() // (merge * merge)).tolist())
        cells = int(enc["image_grid_thw"][0, 1]) // merge
        t = cell_targets(ex.scene_json["objects"], 112, cells)
        (cell,) = t[:, 0].nonzero().flatten().tolist()
        assert cell in tokens_with_object, (i, cell, tokens_with_object)
        obj = ex.scene_json["objects"][0]
        for attribute in ("shape", "color", "size", "material"):
            assert t[cell, TARGET_NAMES.index(f"{attribute}={obj[attribute]}")] == 1
        assert t.sum() == 5  # the total and one value of each of the 4 attributes


def test_warmed_build_is_deterministic_and_loads_with_stock_classes(tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    a = build_tiny(tmp_path / "a", seed=2, warmup=SMALL)
    b = build_tiny(tmp_path / "b", seed=2, warmup=SMALL)
    raw = build_tiny(tmp_path / "raw", seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (raw / "model.safetensors").read_bytes()
    warm = AutoModelForImageTextToText.from_pretrained(a)
    cold = load_model(raw)
    for (name, p), (_, q) in zip(warm.named_parameters(), cold.named_parameters()):
        # Only the vision tower is trained; the language model keeps its initialisation.
        assert torch.equal(p, q) != ("visual" in name), name
    report = json.loads((a / "vlm_mig_tiny.json").read_text())["vision_warmup"]
    assert report["config"]["steps"] == 30 and report["targets"] == TARGET_NAMES
    # 30 small steps already fit the held-out counts better than the random tower, per cell and per image
    after, before = report["held_out_count_accuracy"], report["held_out_count_accuracy_before"]
    assert after["cell_mse"] < before["cell_mse"] and after["image_bce"] < before["image_bce"]


def test_text_model_has_no_vision_to_warm_up(tmp_path) -> None:
    with pytest.raises(ValueError, match="text-only"):
        build_tiny(tmp_path / "t", arch="qwen2", warmup=SMALL)


def test_patch_embedding_as_matmul_equals_the_stock_conv(tiny_vl_dir) -> None:
    from vlm_mig.warmup import patch_embedding_as_matmul

    model = load_model(tiny_vl_dir)
    proc = load_processor(tiny_vl_dir)
    enc = proc.image_processor(images=[make_clevr_example(i, seed=1).image for i in range(3)], return_tensors="pt")
    vision = model.model.visual
    stock = vision(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
    with patch_embedding_as_matmul(vision):
        fast = vision(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
        fast.sum().backward()
    assert torch.allclose(fast, stock, atol=1e-5)
    assert vision.patch_embed.proj.weight.grad is not None  # gradients reach the embedding's own weight
    assert "forward" not in vars(vision.patch_embed)  # the stock forward is back
    assert torch.equal(vision(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output, stock)


def test_whole_image_counts_round_trip_through_at_least_bits() -> None:
    from vlm_mig.warmup import AT_LEAST, at_least_bits, decode_at_least

    counts = torch.tensor([[0.0] * 15 + [8.0], [3.0] * 16])
    bits = at_least_bits(counts)
    assert bits.shape == (2, 16 * AT_LEAST) and bits[0, :AT_LEAST].sum() == 0 and bits[0, -AT_LEAST:].sum() == 8
    assert bits[1, :AT_LEAST].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert torch.equal(decode_at_least(bits * 2 - 1), counts)  # logits: positive where the bit is on
