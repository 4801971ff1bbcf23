"""The policy's weights as a checkpoint on disk names them: what a separate inference engine loads.

vLLM builds its model from the safetensors ``save_pretrained`` writes and maps those names onto its own
(fused) parameters in ``load_weights``. Pushing updated weights must therefore use the very names, and the
very set of tensors, that ``save_pretrained`` would write: without tied duplicates, with transformers'
load-time renamings reverted, with LoRA adapters folded into their base weights (into new tensors: the
trained adapters and the frozen base stay untouched) and peft's wrapper names removed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch

from vlm_mig.adapter import base_model

__all__ = ["base_model", "checkpoint_weights", "gathered_parameters"]

# peft's adapter parameters: dropped, since they are folded into the base weight they wrap.
_ADAPTER_PARAM = re.compile(r"(^|\.)lora_[^.]*\.")


@torch.no_grad()
def checkpoint_weights(model: Any) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` as ``model.save_pretrained`` (of the LoRA-merged model) would write them.

    Tensors are the live parameters where nothing needs merging (no copy), new tensors for LoRA-merged
    weights. Under DeepSpeed ZeRO-3 call it inside ``gathered_parameters(model)``.
    """
    base = base_model(model)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if _ADAPTER_PARAM.search(name) or ".original_module." in name:
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))
        state[name] = tensor
    if base is not model:
        _fold_lora(base, state)
    return _as_saved(base, state)


def _fold_lora(base: Any, state: dict[str, torch.Tensor]) -> None:
    """Replace each LoRA-wrapped weight by ``W + sum of the active adapters' deltas`` (a new tensor)."""
    from peft.tuners.lora import LoraLayer

    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue  # a merged layer already holds W + delta in its base weight
        adapters = [a for a in module.active_adapters
                    if a in module.lora_A or a in getattr(module, "lora_embedding_A", {})]
        if not adapters:
            continue
        key = f"{name}.weight"
        weight = state[key]
        state[key] = weight + sum(module.get_delta_weight(a).to(weight.dtype) for a in adapters)


def _as_saved(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply what ``save_pretrained`` does to a state dict before writing it (transformers 5)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # older transformers: tied copies are skipped by the loader anyway
        remove_tied_weights_from_state_dict = None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers without load-time renaming: module names are the checkpoint's
        revert_weight_conversion = None
    if remove_tied_weights_from_state_dict is not None:
        state = remove_tied_weights_from_state_dict(state, model)
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    return state


@contextlib.contextmanager
def gathered_parameters(model: Any) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3, every parameter gathered on each process for the duration (else nothing).

    The whole model is gathered at once: LoRA merging and transformers' renaming need all weights together.
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield
