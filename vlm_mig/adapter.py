"""What differs between the model families vlm-mig trains, behind one object per family.

``adapter_for(model)`` picks the adapter from the model's config: ``Qwen2VLAdapter`` (Qwen2-VL),
``Qwen25VLAdapter`` (Qwen2.5-VL) or ``TextAdapter`` (any causal LM without a vision tower: Qwen2, Llama,
SmolLM2, ...). Everything else asks it instead of reaching into a model: the image features of pixel values
(``mig``, ``warmup``), the image token id (``mig``, the vLLM engine), position ids (M-RoPE or 1-D: ``mig``,
``rollout``), the vision tower and its patch embedding (freezing in the trainer, the warm-up), the
embeddings, decoder and output head of the packed pass (``mig``), and the marker pairs whose spans a step
boundary never cuts (``steps``, via the trainer and ``score``). Supporting another family means one more
adapter here.

Adapters hold no state; they take the model (a peft wrapper is looked through) on every call.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

#: Qwen-VL's marker pairs of image/video placeholders and grounding spans (SPEC section 1: never cut).
QWEN_VL_ATOMIC_PAIRS: tuple[tuple[str, str], ...] = (
    ("<|vision_start|>", "<|vision_end|>"),
    ("<|box_start|>", "<|box_end|>"),
    ("<|object_ref_start|>", "<|object_ref_end|>"),
    ("<|quad_start|>", "<|quad_end|>"),
)


def base_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    if getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


class TextAdapter:
    """A causal LM without a vision tower: 1-D positions, no image inputs."""

    name = "text"
    multimodal = False
    #: Qwen2's text vocabulary holds the Qwen-VL markers too, so its spans stay atomic; in a vocabulary
    #: without them they never occur.
    atomic_pairs: tuple[tuple[str, str], ...] = QWEN_VL_ATOMIC_PAIRS

    def image_token_id(self, model: Any) -> int | None:
        """The id of the token each image feature row replaces (None: the model takes no images)."""
        return None

    def image_features(self, model: Any, pixel_values: torch.Tensor,
                       image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision-tower features, one [tokens, H] tensor per image."""
        raise ValueError(f"a {self.name} model has no vision tower to encode images with")

    def position_ids(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     mm_token_type_ids: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """The position ids the model gives these left-padded rows ([B, L]; padding gets 0).

        Later stages pass them explicitly, so prefixes and packed copies keep the positions of the full
        sequence instead of positions recomputed from truncated text."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def text_positions(self, before: torch.Tensor, n: int) -> torch.Tensor:
        """Position ids of ``n`` text tokens appended after tokens whose ids are ``before`` ([k], in the shape
        ``position_ids`` gives one row): where a completion or a packed probe copy continues."""
        start = int(before[-1]) + 1 if before.numel() else 0
        return torch.arange(start, start + n)

    def vision_tower(self, model: Any) -> nn.Module | None:
        """The vision encoder (None for a text model)."""
        return None

    # The processor side: how images are sized before the processor sees them, and how its pixel rows map to them

    def size_image(self, image: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
        """An image (path, URL or PIL image) opened and resized as this family's processor expects it."""
        raise ValueError(f"a {self.name} model takes no images")

    def image_patches(self, image_grid_thw: torch.Tensor | None) -> list[int]:
        """How many rows of the processor's ``pixel_values`` each image of a batch holds, in order."""
        return []

    def patch_embedding(self, model: Any) -> nn.Module | None:
        """The vision tower's first layer (frozen by default: a random one collapses under AdamW)."""
        tower = self.vision_tower(model)
        return None if tower is None else tower.patch_embed

    def input_embeddings(self, model: Any) -> nn.Module:
        return model.get_input_embeddings()

    def decoder(self, model: Any) -> nn.Module:
        """The transformer stack that maps ``inputs_embeds`` (with explicit masks and positions) to hidden states."""
        return model.get_decoder()

    def output_head(self, model: Any) -> nn.Module:
        """The LM head: hidden states -> vocabulary logits."""
        return model.get_output_embeddings()


class Qwen2VLAdapter(TextAdapter):
    """Qwen2-VL: a vision tower whose merged patch features replace the ``<|image_pad|>`` tokens, and 3D M-RoPE
    position ids (temporal, height, width) from the image grids."""

    name = "qwen2-vl"
    multimodal = True
    atomic_pairs = QWEN_VL_ATOMIC_PAIRS

    @staticmethod
    def _inner(model: Any) -> Any:
        """The vision-language backbone (``visual`` + ``language_model``) under the LM head."""
        return base_model(model).model

    def image_token_id(self, model: Any) -> int | None:
        return base_model(model).config.image_token_id

    def image_features(self, model: Any, pixel_values: torch.Tensor,
                       image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        out = self._inner(model).get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return list(out.pooler_output)

    def position_ids(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     mm_token_type_ids: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """[3, B, L] M-RoPE ids (``get_rope_index``); padding gets 0."""
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
        pos, _ = self._inner(model).get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                                   image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return pos

    def text_positions(self, before: torch.Tensor, n: int) -> torch.Tensor:
        """[3, n]: text continues from the largest id so far on all three axes (as ``get_rope_index`` does after
        an image, whose width and height ids can run past the temporal ones)."""
        start = int(before.max()) + 1 if before.numel() else 0
        return torch.arange(start, start + n).unsqueeze(0).expand(3, n)

    def vision_tower(self, model: Any) -> nn.Module | None:
        return self._inner(model).visual

    def size_image(self, image: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
        """qwen-vl-utils sizing: sides rounded to multiples of 28 within ``min_pixels``..``max_pixels``."""
        from qwen_vl_utils import fetch_image

        spec: dict[str, Any] = {"image": image}
        if min_pixels is not None:
            spec["min_pixels"] = min_pixels
        if max_pixels is not None:
            spec["max_pixels"] = max_pixels
        return fetch_image(spec)

    def image_patches(self, image_grid_thw: torch.Tensor | None) -> list[int]:
        """One row per patch: t x h x w of each image's grid."""
        return [] if image_grid_thw is None else image_grid_thw.prod(-1).tolist()


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: a window-attention vision tower behind the same interface as Qwen2-VL's (its ``get_rope_index``
    would also take video timings, which image-only prompts never need)."""

    name = "qwen2.5-vl"


#: transformers ``model_type`` -> adapter of that vision-language family
ADAPTERS: dict[str, TextAdapter] = {"qwen2_vl": Qwen2VLAdapter(), "qwen2_5_vl": Qwen25VLAdapter()}
#: transformers processor class -> the ``model_type`` it serves
PROCESSORS: dict[str, str] = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl"}
TEXT = TextAdapter()


def adapter_for(model_or_config: Any) -> TextAdapter:
    """The adapter of a model (peft-wrapped or not), of its transformers config, or of its processor (a plain
    tokenizer is a text model's)."""
    if hasattr(model_or_config, "image_processor"):
        for cls in type(model_or_config).__mro__:  # a subclass of a known processor is served alike
            if cls.__name__ in PROCESSORS:
                return ADAPTERS[PROCESSORS[cls.__name__]]
        raise ValueError(f"no adapter for processor {type(model_or_config).__name__} (known: {', '.join(PROCESSORS)}); "
                         "add one to vlm_mig/adapter.py")
    if hasattr(model_or_config, "apply_chat_template") or hasattr(model_or_config, "tokenize"):
        return TEXT
    config = getattr(base_model(model_or_config), "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(f"no adapter for vision-language model type {model_type!r} (known: {', '.join(ADAPTERS)}); "
                         "add one to vlm_mig/adapter.py")
    return TEXT


def cache_keyword(module: Any) -> str:
    """The keyword a model's (or decoder's) ``forward`` takes its key/value cache by: transformers 5.25 renamed
    ``past_key_values`` to ``cache``."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def is_multimodal(thing: Any) -> bool:
    """Whether a model, its config, a checkpoint (path or hub id) or its processor is vision-language: the one
    test every stage asks (a processor has an image processor; a model or config has an adapter that takes
    images; a plain tokenizer is text-only)."""
    if hasattr(thing, "image_processor") or hasattr(thing, "tokenize") or hasattr(thing, "apply_chat_template"):
        return adapter_for(thing).multimodal
    if isinstance(thing, (str, os.PathLike)):
        from transformers import AutoConfig

        thing = AutoConfig.from_pretrained(thing)
    # A config with a vision config is a vision-language model (``adapter_for`` names the families it knows).
    return getattr(getattr(base_model(thing), "config", thing), "vision_config", None) is not None


__all__ = ["ADAPTERS", "PROCESSORS", "QWEN_VL_ATOMIC_PAIRS", "Qwen25VLAdapter", "Qwen2VLAdapter", "TextAdapter",
           "adapter_for", "base_model", "cache_keyword", "is_multimodal"]
