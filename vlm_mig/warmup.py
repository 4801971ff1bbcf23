"""Vision warm-up of the tiny default model: teach its vision tower to see CLEVR-like scenes, offline.

A randomly initialised 2-layer vision tower gives the language model nothing to read: trained end to end
from scratch in CPU minutes, the tiny VLM answers from the question alone (its accuracy sits at the blind
prior). Real VLMs start from a pretrained vision tower; this is the tiny model's stand-in for that
pretraining. It is supervised by the scene JSON, not by any question or answer, through two throw-away
linear heads on the merged image tokens (what the language model sees):

* **where**: the image is divided into the cells the merged tokens cover (a 112 px image: 4 x 4 cells of
  28 px, one per token); each token predicts the number of objects whose centre lies in its cell, in total
  and per attribute value (3 shapes, 8 colours, 2 sizes, 2 materials: 16 counts), by squared error;
* **how many**: each token also predicts the counts of the whole image, as "at least k" bits (k = 1..8 for
  each of the 16 counts), by binary cross-entropy. Measured: with the first head alone, the SFT'd language
  model reads the counts poorly (it has to learn to average 16 tokens exactly); with whole-image counts on
  every token, "how many objects" is read from any one token, and SFT reaches a given accuracy much sooner.
  The two losses weigh the same: a heavier whole-image loss costs the per-cell counts some accuracy, but the
  language model reads the scene better after the same SFT.

The whole vision tower is trained, patch embedding and merger included. The scenes are CLEVR-CoGenT
condition A only (the colour rules of the training data), so condition-B scenes stay a zero-shot shift for
the whole model. Deterministic for a seed on a given machine: the scenes, the initial heads, the batch order
and the thread count are all fixed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from vlm_mig.adapter import adapter_for
from vlm_mig.data.clevr import IMAGE_SIZE
from vlm_mig.model_options import WarmupConfig

logger = logging.getLogger(__name__)


def _attribute_values() -> list[tuple[str, tuple[str, ...]]]:
    from vlm_mig.data.clevr import COLORS, MATERIALS, SHAPES, SIZES

    return [("shape", SHAPES), ("color", tuple(COLORS)), ("size", SIZES), ("material", MATERIALS)]


#: Names of the 16 per-cell counts, in target order.
TARGET_NAMES = ["total"] + [f"{a}={v}" for a, vals in _attribute_values() for v in vals]
#: Whole-image counts are coded as "at least k" bits, k = 1..AT_LEAST (scenes hold at most 8 objects).
AT_LEAST = 8


def at_least_bits(counts: torch.Tensor) -> torch.Tensor:
    """[..., 16] counts -> [..., 16 * AT_LEAST] bits ``count >= k`` for k = 1..AT_LEAST."""
    ks = torch.arange(1, AT_LEAST + 1, dtype=counts.dtype)
    return (counts.unsqueeze(-1) >= ks).to(torch.float32).flatten(-2)


def decode_at_least(logits: torch.Tensor) -> torch.Tensor:
    """[..., 16 * AT_LEAST] logits -> [..., 16] counts (the number of bits predicted on)."""
    return (logits > 0).view(*logits.shape[:-1], len(TARGET_NAMES), AT_LEAST).sum(-1).float()


def cell_targets(objects: list[dict[str, Any]], image_size: int, cells: int) -> torch.Tensor:
    """[cells * cells, 16] object counts per merged-token cell (row-major, as the processor orders the
    merged tokens): the total, then one count per attribute value (``TARGET_NAMES``). ``objects`` are scene
    JSON records (``pixel_coords`` is the centre)."""
    side = image_size / cells
    out = torch.zeros(cells * cells, len(TARGET_NAMES))
    index = {name: i for i, name in enumerate(TARGET_NAMES)}
    for o in objects:
        x, y = o["pixel_coords"][:2]
        cell = min(cells - 1, int(y // side)) * cells + min(cells - 1, int(x // side))
        out[cell, 0] += 1
        for attribute, _ in _attribute_values():
            out[cell, index[f"{attribute}={o[attribute]}"]] += 1
    return out


def _scene_tensors(processor, cfg: WarmupConfig, first: int, n: int, image_size: int):
    """pixel_values [n, patches, D], the image grid, and the targets [n, cells^2, 16] of scenes first..first+n."""
    from vlm_mig.data.clevr import make_clevr_example

    examples = [make_clevr_example(i, seed=cfg.data_seed, condition=cfg.condition, image_size=image_size,
                                   num_objects=(1, cfg.max_objects)) for i in range(first, first + n)]
    enc = processor.image_processor(images=[e.image for e in examples], return_tensors="pt")
    grid = enc["image_grid_thw"]
    if not bool((grid == grid[0]).all()):
        raise ValueError("warm-up scenes must all be processed to the same grid")
    pixel_values = enc["pixel_values"].view(n, -1, enc["pixel_values"].shape[-1])
    merge = processor.image_processor.merge_size
    cells_h, cells_w = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
    if cells_h != cells_w:
        raise ValueError(f"warm-up expects square images, got a {cells_h}x{cells_w} token grid")
    targets = torch.stack([cell_targets(e.scene_json["objects"], image_size, cells_h) for e in examples])
    return pixel_values, grid[0], targets


def _features(model, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Merged image tokens [B, tokens, H] through the model's own vision path (stock forward)."""
    b = pixel_values.shape[0]
    return torch.stack(adapter_for(model).image_features(model, pixel_values.reshape(-1, pixel_values.shape[-1]),
                                                         grid.unsqueeze(0).repeat(b, 1)))


@contextlib.contextmanager
def patch_embedding_as_matmul(vision: nn.Module) -> Iterator[None]:
    """Run the vision tower's patch embedding as the matrix product it is, for the duration.

    The stock embedding is a ``Conv3d`` whose kernel equals its stride and its input patch, i.e. one linear map
    per patch; on the CPU its backward pass is the most expensive operation of a warm-up step (~30% of it), while
    the same product through ``F.linear`` costs a few milliseconds. Same weights, same result (to float
    rounding); the stock forward is restored on exit."""
    embed = getattr(vision, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, nn.Conv3d) or proj.kernel_size != proj.stride:
        yield  # another architecture: keep its own forward
        return

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        w = proj.weight
        return nn.functional.linear(hidden_states.to(w.dtype).reshape(-1, w[0].numel()), w.reshape(w.shape[0], -1),
                                    proj.bias)

    embed.forward = forward
    try:
        yield
    finally:
        del embed.forward  # the instance attribute: the class's forward shows through again


def count_accuracy(counts: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Image-level count accuracy of predicted ``counts`` [B, 16] against the per-cell ``targets`` [B, cells,
    16] summed over the image: by target group (total, shape, colour, size, material) and "all" (every count of
    an image right)."""
    right = (counts == targets.sum(1)).float()
    out = {"total": float(right[:, 0].mean())}
    start = 1
    for attribute, values in _attribute_values():
        out[attribute] = float(right[:, start : start + len(values)].mean())
        start += len(values)
    out["all"] = float(right.all(-1).float().mean())
    return out


def warm_up_vision(model, processor, cfg: WarmupConfig | None = None, seed: int = 0, image_size: int = IMAGE_SIZE,
                   progress: bool = False) -> dict[str, Any]:
    """Train ``model``'s vision tower (patch embedding, blocks, merger) in place on the per-cell count targets;
    return a report (config, held-out count accuracy before and after, seconds). The language model is not
    touched."""
    cfg = cfg or WarmupConfig()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with patch_embedding_as_matmul(adapter_for(model).vision_tower(model)):
            return _warm_up(model, processor, cfg, seed, image_size, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _warm_up(model, processor, cfg: WarmupConfig, seed: int, image_size: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    train_pv, grid, train_t = _scene_tensors(processor, cfg, 0, cfg.scenes, image_size)
    eval_pv, _, eval_t = _scene_tensors(processor, cfg, cfg.scenes, cfg.eval_scenes, image_size)
    data_s = time.perf_counter() - t0
    vision = adapter_for(model).vision_tower(model)
    was_training = model.training
    torch.manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    cell_head = nn.Linear(hidden, len(TARGET_NAMES))
    image_head = nn.Linear(hidden, len(TARGET_NAMES) * AT_LEAST)
    params = [*vision.parameters(), *cell_head.parameters(), *image_head.parameters()]
    for p in vision.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # A linear decay to 0 settles the tower at the end: held-out per-cell counts (shapes, materials above all)
    # came out clearly better than with a constant rate for the same steps.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / cfg.steps)
    order = torch.Generator().manual_seed(seed)

    def losses(tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bits = at_least_bits(targets.sum(1)).unsqueeze(1).expand(-1, tokens.shape[1], -1)
        return (nn.functional.mse_loss(cell_head(tokens), targets),
                nn.functional.binary_cross_entropy_with_logits(image_head(tokens), bits))

    def held_out() -> dict[str, Any]:
        vision.eval()
        with torch.no_grad():
            tokens = torch.cat([_features(model, eval_pv[i : i + 100], grid) for i in range(0, len(eval_pv), 100)])
            cell_loss, image_loss = losses(tokens, eval_t)
            # the whole-image counts as the language model can read them: from one token (the first)
            from_one_token = decode_at_least(image_head(tokens[:, 0]))
            from_cells = cell_head(tokens).sum(1).round()
        vision.train()
        return {**count_accuracy(from_one_token, eval_t), "from_cells": count_accuracy(from_cells, eval_t),
                "cell_mse": float(cell_loss), "image_bce": float(image_loss)}

    before = held_out()
    vision.train()
    t1 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="vision warm-up", disable=not progress, unit="step")
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.steps):
        idx = torch.randint(0, cfg.scenes, (cfg.batch_size,), generator=order)
        cell_loss, image_loss = losses(_features(model, train_pv[idx], grid), train_t[idx])
        loss = cell_loss + cfg.whole_image_weight * image_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t1
    after = held_out()
    model.train(was_training)
    report = {"config": asdict(cfg), "seed": seed, "targets": TARGET_NAMES, "final_loss": float(loss.detach()),
              "held_out_count_accuracy_before": before, "held_out_count_accuracy": after,
              "seconds": {"data": round(data_s, 1), "train": round(train_s, 1)}}
    logger.info("vision warm-up: held-out count accuracy %s (before: %s) in %.0f s", after, before, train_s)
    return report
