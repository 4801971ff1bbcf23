"""Samples -> model inputs, for Qwen2-VL / Qwen2.5-VL and text-only models through one API.

Images may sit anywhere in the user turn (several per sample); they are loaded and sized as the model family's
adapter says (``adapter.size_image``; Qwen-VL: qwen-vl-utils, ``min_pixels``/``max_pixels``, sides rounded to
multiples of 28). Prompts are left padded.
A prompt longer than ``max_prompt_length`` is an error naming the sample: truncating it would cut the
system prompt or the image tokens, which the model then can't match with ``pixel_values``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_mig.adapter import ADAPTERS, adapter_for
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.prompts import QUESTION_SUFFIX, SYSTEM_PROMPT


@dataclass
class PromptTemplate:
    """How a ``Sample`` becomes a chat: the same at train and eval time unless a config says otherwise."""

    system_prompt: str | None = SYSTEM_PROMPT  #: system turn; None keeps the chat template's default
    question_suffix: str = ""  #: appended to a plain ``question`` (e.g. ``prompts.QUESTION_SUFFIX``, R1-V style)

    @classmethod
    def r1v(cls) -> PromptTemplate:
        """The R1-V/VLM-R1 convention: instruction after the question, default system prompt."""
        return cls(system_prompt=None, question_suffix=QUESTION_SUFFIX)


def tokenizer_of(processor: Any):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)


def build_messages(sample: Sample, template: PromptTemplate | None = None, multimodal: bool = True) -> list[dict]:
    """The chat for ``sample``: system turn, then the user turn with its images (before the question).

    ``messages`` samples keep their own turns; ``{"type": "image"}`` parts mark where images go. For a
    text-only model (``multimodal=False``) list contents are flattened to strings.
    """
    template = template or PromptTemplate()
    if sample.messages is not None:
        messages = copy.deepcopy(sample.messages)
        n_parts = sum(
            1 for m in messages if isinstance(m.get("content"), list) for p in m["content"] if _is_image_part(p)
        )
        if n_parts != len(sample.images):
            raise DataError(
                f"sample {sample.id!r}: {n_parts} image placeholders in 'messages' but {len(sample.images)} images"
            )
    else:
        content: list[dict] = [{"type": "image"} for _ in sample.images]
        content.append({"type": "text", "text": sample.question + template.question_suffix})
        messages = [{"role": "user", "content": content}]
    if template.system_prompt is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": template.system_prompt}]})
    if not multimodal:
        if sample.images:
            raise DataError(f"sample {sample.id!r} has {len(sample.images)} image(s) but the model is text-only")
        for m in messages:
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"])
    return messages


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") == "image" or "image" in part or "image_url" in part)


#: PIL modes with more than 8 bits per pixel: PIL's convert("RGB") (what qwen-vl-utils calls) clips them at 255.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grayscale image scaled to 8 bits (mode L); other images as they are. 16-bit values
    divide by 257 (65535 -> 255); an ``I`` image whose values stay within 0-255 is already 8-bit; a float image
    in [0, 1] is multiplied by 255, else clipped."""
    if im.mode not in _WIDE_MODES:
        return im
    import numpy as np

    a = np.asarray(im, dtype=np.float64)
    top = float(a.max()) if a.size else 0.0
    if im.mode.startswith("I;16") or (im.mode == "I" and top > 255):
        a = a / 257.0
    elif im.mode == "F" and top <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def load_images(sample: Sample, min_pixels: int | None = None, max_pixels: int | None = None,
                adapter: Any = None) -> list[Image.Image]:
    """Open and size the sample's images as the model family's processor expects them (``adapter.size_image``, by
    default Qwen-VL's: qwen-vl-utils); a missing or corrupt file names the sample. Local files are opened here
    first, so 16-bit grayscale is scaled rather than clipped (``to_8bit``)."""
    adapter = adapter or ADAPTERS["qwen2_vl"]
    out = []
    for path in sample.images:
        image: Any = str(path)
        if Path(image).is_file():
            try:
                with Image.open(image) as im:
                    if im.mode in _WIDE_MODES:
                        image = to_8bit(im)
            except Exception as e:  # PIL raises several types for unreadable files
                raise DataError(f"sample {sample.id!r}: cannot read image {path}: {e}") from e
        try:
            out.append(adapter.size_image(image, min_pixels, max_pixels))
        except Exception as e:  # qwen-vl-utils raises several types for unreadable files
            raise DataError(f"sample {sample.id!r}: cannot read image {path}: {e}") from e
    return out


@dataclass
class PromptBatch:
    """Left-padded prompts with everything later stages need; one row per sample."""

    input_ids: torch.Tensor  #: [B, P]
    attention_mask: torch.Tensor  #: [B, P]
    sample_ids: list[str]
    texts: list[str]  #: the chat-formatted prompt strings
    mm_token_type_ids: torch.Tensor | None = None  #: [B, P]; 1 image, 2 video, 0 text (VLMs only)
    pixel_values: torch.Tensor | None = None  #: [sum of patches, D] for all images of the batch, in order
    image_grid_thw: torch.Tensor | None = None  #: [num images, 3]
    images_per_sample: list[int] = field(default_factory=list)
    #: rows of ``pixel_values`` per image, in order (the model adapter's ``image_patches``)
    image_patches: list[int] = field(default_factory=list)

    @property
    def multimodal(self) -> bool:
        return self.pixel_values is not None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        for name in ("mm_token_type_ids", "pixel_values", "image_grid_thw"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to(self, device: torch.device | str) -> PromptBatch:
        for name in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def encode_prompts(
    processor: Any,
    samples: list[Sample],
    template: PromptTemplate | None = None,
    max_prompt_length: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> PromptBatch:
    """Tokenize a batch of samples (and process their images) into one left-padded ``PromptBatch``."""
    adapter = adapter_for(processor)
    multimodal = adapter.multimodal
    tok = tokenizer_of(processor)
    if tok.padding_side != "left":
        tok.padding_side = "left"
    texts, images, per_sample = [], [], []
    for s in samples:
        messages = build_messages(s, template, multimodal=multimodal)
        texts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        imgs = load_images(s, min_pixels, max_pixels, adapter) if multimodal else []
        images.extend(imgs)
        per_sample.append(len(imgs))
    if multimodal:
        enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    else:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = PromptBatch(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        sample_ids=[s.id for s in samples],
        texts=texts,
        mm_token_type_ids=enc.get("mm_token_type_ids"),
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        images_per_sample=per_sample,
        image_patches=adapter.image_patches(enc.get("image_grid_thw")),
    )
    if max_prompt_length is not None:
        check_prompt_lengths(batch, max_prompt_length)
    return batch


def check_prompt_lengths(batch: PromptBatch, max_prompt_length: int) -> None:
    """Raise, naming the sample, if a prompt would need truncation (never truncate silently)."""
    lengths = batch.attention_mask.sum(-1).tolist()
    for i, n in enumerate(lengths):
        if n > max_prompt_length:
            n_img = int((batch.mm_token_type_ids[i] > 0).sum()) if batch.mm_token_type_ids is not None else 0
            raise DataError(
                f"sample {batch.sample_ids[i]!r}: prompt has {n} tokens ({n_img} image tokens), over "
                f"max_prompt_length={max_prompt_length}; truncating would cut the prompt or its image tokens. "
                "Raise max_prompt_length or lower max_pixels."
            )
