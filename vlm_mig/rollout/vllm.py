"""The vLLM backend: fast sampling on the training GPU itself (colocated), from the policy's current weights.

vLLM is imported when this engine is built, never at module import (the CPU path and CI don't have it).
What it owns and what it does not:

- **Prompts**: the trainer's own ``encode_prompts`` ids, unpadded, with each image's run of image tokens
  collapsed to one placeholder, plus the same sized images (qwen-vl-utils). vLLM expands each placeholder
  from the image itself; the prompt ids it reports back must equal ours token for token, or generation
  stops with an error naming the sample (an image-token count mismatch means vLLM sized an image
  differently, and the completions would belong to another prompt).
- **Completions**: the token ids vLLM sampled, as they are (never re-tokenized from text), right padded
  after the first EOS by the same code as the HF backend.
- **Seeds**: one request per rollout (``n=1``), seeded with the same per-rollout seed as the HF backend
  (``rollout_seed(sample seed, copy index)``), so a rollout does not depend on its batch's other requests
  through the sampler. vLLM's sampler is not our Gumbel-max sampler, so the tokens differ from HF's for the
  same seed; and vLLM's batched kernels make logits depend slightly on batch composition, so even one
  backend's rollouts are reproducible only up to near-ties (vLLM's ``VLLM_BATCH_INVARIANT=1`` mode targets
  this, at a speed cost; not tried here). Exact resume holds for the HF backend only.
- **Log-probs**: none are taken from vLLM; the trainer scores every completion with its own fp32
  teacher-forced pass, so MIG scores and PPO ratios are those of the policy itself.
- **Weights**: ``sync_weights(policy)`` loads the policy's weights (LoRA folded in, ZeRO-3 gathered) into
  vLLM's model in-process after every update, then drops vLLM's prefix and encoder caches (their KV blocks
  and image features belong to the old weights).
- **Memory**: vLLM takes ``vllm_gpu_memory_utilization`` of the GPU; with ``vllm_sleep`` (where the installed
  vLLM has sleep mode) it sleeps at level 1 between generations (weights offloaded to CPU, KV cache freed),
  so scoring and the update get the memory back. Level 2 would skip the offload but is known to corrupt
  some multimodal models on wake-up, and the weights are overwritten by the sync anyway.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import torch

from vlm_mig.adapter import adapter_for, base_model, is_multimodal
from vlm_mig.data.schema import Sample
from vlm_mig.processing import PromptBatch, PromptTemplate, encode_prompts, load_images
from vlm_mig.rollout.base import (
    RolloutConfig,
    RolloutEngine,
    Rollouts,
    assemble_rollouts,
    eos_and_pad,
)
from vlm_mig.rollout.sampling import rollout_seed
from vlm_mig.rollout.weights import checkpoint_weights, gathered_parameters

VLLM_EXTRA = "pip install 'vlm-mig[vllm]'"


def require_vllm() -> Any:
    """The vllm module, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise ImportError(f"rollout.backend=vllm needs vLLM, which is not installed here: {VLLM_EXTRA} "
                          "(GPU machines only; it brings its own torch build, see the README's 'Installing "
                          "torch'), or use rollout.backend=hf") from e


def collapse_image_tokens(ids: list[int], image_token_id: int) -> list[int]:
    """``ids`` with every run of ``image_token_id`` cut to one token: the prompt as the tokenizer alone writes
    it, which is what vLLM expects next to the images (it expands each placeholder itself)."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(t)
    return out


def prompt_token_ids(batch: PromptBatch) -> list[list[int]]:
    """Each prompt's ids without its left padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask)]


def vllm_prompts(batch: PromptBatch, images: list[list[Any]], image_token_id: int | None) -> list[dict[str, Any]]:
    """One vLLM prompt per sample: its token ids (image runs collapsed) and its images, in order."""
    out = []
    for ids, imgs in zip(prompt_token_ids(batch), images):
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if imgs:
            prompt["prompt_token_ids"] = collapse_image_tokens(ids, image_token_id)
            prompt["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
        out.append(prompt)
    return out


def check_prompt_ids(expected: list[int], got: list[int], sample_id: str, image_token_id: int | None) -> None:
    """Raise unless vLLM ran the very prompt the trainer scores (same ids, same number of image tokens)."""
    if list(got) == list(expected):
        return
    what = f"{len(got)} tokens instead of {len(expected)}"
    if image_token_id is not None:
        n_got, n_exp = sum(t == image_token_id for t in got), sum(t == image_token_id for t in expected)
        if n_got != n_exp:
            what += (f"; {n_got} image tokens instead of {n_exp}: vLLM's processor sized the image differently "
                     "(give the trainer's processor and vLLM the same min_pixels/max_pixels)")
    raise RuntimeError(f"sample {sample_id!r}: vLLM's prompt differs from the trainer's ({what}); its completions "
                       "would not belong to the prompt the trainer scores")


def sampling_kwargs(config: RolloutConfig, eos_ids: list[int], seeds: list[int] | None,
                    n_samples: int) -> list[dict[str, Any]]:
    """``SamplingParams`` arguments for each of the ``n_samples * G`` requests (one rollout each, in row order).

    Row ``i*G + j`` gets seed ``rollout_seed(seeds[i], j)``, the HF backend's stream of that rollout.
    """
    G = config.num_generations
    if seeds is not None and len(seeds) != n_samples:
        raise ValueError(f"{len(seeds)} seeds for {n_samples} samples")
    common: dict[str, Any] = {"n": 1, "max_tokens": config.max_new_tokens, "stop_token_ids": list(eos_ids)}
    if config.temperature > 0:
        # SPEC sampling: temperature and top_p only (vLLM's default top_k, min_p and penalties are off); logprobs=0
        # reports the sampled token's log-prob alone.
        common.update(temperature=config.temperature, top_p=config.top_p, logprobs=0)
    else:
        common.update(temperature=0.0)
    rows = []
    for i in range(n_samples):
        for j in range(G):
            kw = dict(common)
            if config.temperature > 0 and seeds is not None:
                kw["seed"] = rollout_seed(seeds[i], j)
            rows.append(kw)
    return rows


def llm_kwargs(config: RolloutConfig, path: str, multimodal: bool, rank: int = 0, world_size: int = 1,
               sleep_mode: bool = True) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for a colocated engine (``config.vllm_kwargs`` last, so they win)."""
    kw: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "dtype": config.vllm_dtype,
        "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
        "max_model_len": config.vllm_max_model_len,
        "seed": rank,  # only unseeded requests draw from it; seeded ones have their own generator
        # the log-probs a request reports are those of the distribution it samples from (after temperature and
        # top-p), not the raw model's: what the rollout/trainer mismatch correction compares with the trainer's
        "logprobs_mode": "processed_logprobs",
    }
    if sleep_mode:
        kw["enable_sleep_mode"] = config.vllm_sleep
    if multimodal and config.vllm_max_images is not None:
        kw["limit_mm_per_prompt"] = {"image": config.vllm_max_images}
    if world_size > 1:
        # Each training process holds its own engine on its own GPU, inside the process group it already has.
        kw["distributed_executor_backend"] = "external_launcher"
    kw.update(config.vllm_kwargs)
    return kw


def sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The log-prob vLLM reports for each sampled token of one completion: ``logprobs[t]`` maps token ids to
    ``Logprob`` objects (or floats), and holds the sampled token whatever the number of top log-probs asked."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM reported log-probs for {0 if logprobs is None else len(logprobs)} of "
                         f"{len(token_ids)} sampled tokens (SamplingParams.logprobs must be set)")
    return [float(getattr(logprobs[t][tok], "logprob", logprobs[t][tok])) for t, tok in enumerate(token_ids)]


def pad_token_lists(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """[N, T] right padded with ``pad_id`` (T = the longest row, at least 1)."""
    width = max([1, *(len(r) for r in rows)])
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


class VLLMRolloutEngine(RolloutEngine):
    """vLLM's ``LLM`` in this process, on this process's GPU, loaded with the policy's weights."""

    def __init__(self, model: Any, processor: Any, config: RolloutConfig | None = None,
                 template: PromptTemplate | None = None):
        vllm = require_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on this machine")
        self.model = model
        self.processor = processor
        self.config = config or RolloutConfig(backend="vllm")
        self.template = template or PromptTemplate()
        self.eos_ids, self.pad_id = eos_and_pad(model, processor)
        self.multimodal = is_multimodal(processor)
        hf_config = base_model(model).config
        self.image_token_id = adapter_for(model).image_token_id(model) if self.multimodal else None
        path = getattr(hf_config, "_name_or_path", "")
        if not path:
            raise ValueError("rollout.backend=vllm builds its engine from the policy's checkpoint folder (or hub id); "
                             "this model has none (config._name_or_path is empty)")
        # Weights are pushed by calling into vLLM's model directly: the engine core must live in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
        has_sleep = callable(getattr(vllm.LLM, "sleep", None))
        self.llm = vllm.LLM(**llm_kwargs(self.config, path, self.multimodal, rank, world, has_sleep))
        self._sampling_params = vllm.SamplingParams
        self._can_sleep = has_sleep and self.config.vllm_sleep
        self._wake_by_tag = has_sleep and "tags" in inspect.signature(self.llm.wake_up).parameters
        self._asleep: set[str] = set()
        model_config = getattr(self.llm.llm_engine, "model_config", None)
        self._dtype = getattr(model_config, "dtype", None)
        self._max_model_len = getattr(model_config, "max_model_len", None)
        # The folder holds the base weights; the policy may already differ (LoRA adapters, a resumed run).
        self._push_weights(model)
        self._sleep()

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, samples: list[Sample], seeds: list[int] | None = None) -> Rollouts:
        """Sample G completions per sample, one seeded vLLM request per completion (see the module notes)."""
        cfg = self.config
        G = cfg.num_generations
        batch = encode_prompts(self.processor, samples, self.template, cfg.max_prompt_length, cfg.min_pixels,
                               cfg.max_pixels)
        # The same sizing as encode_prompts (qwen-vl-utils), so vLLM's processor sees the same pixels.
        images = [load_images(s, cfg.min_pixels, cfg.max_pixels, adapter_for(self.processor)) if self.multimodal else []
                  for s in samples]
        prompts = vllm_prompts(batch, images, self.image_token_id)
        expected = prompt_token_ids(batch)
        longest = max(len(ids) for ids in expected)
        if self._max_model_len is not None and longest + cfg.max_new_tokens > self._max_model_len:
            # vLLM would silently cut such completions short at its context length.
            raise ValueError(f"rollout.vllm_max_model_len: vLLM holds {self._max_model_len} tokens, but a prompt of "
                             f"{longest} tokens plus max_new_tokens={cfg.max_new_tokens} needs "
                             f"{longest + cfg.max_new_tokens}")
        params = [self._sampling_params(**kw) for kw in sampling_kwargs(cfg, self.eos_ids, seeds, len(samples))]
        self._wake()
        try:
            # vLLM runs its own kernels at its own dtype: a caller's autocast region must not reach them.
            with torch.autocast("cuda", enabled=False):
                outputs = self.llm.generate([prompts[r // G] for r in range(len(params))], sampling_params=params,
                                            use_tqdm=False)
        finally:
            self._sleep()
        for r, out in enumerate(outputs):
            check_prompt_ids(expected[r // G], out.prompt_token_ids, samples[r // G].id, self.image_token_id)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        completion = pad_token_lists(tokens, self.pad_id)
        sampled = None
        if cfg.temperature > 0:
            sampled = torch.zeros(completion.shape, dtype=torch.float32)
            for r, (ids, out) in enumerate(zip(tokens, outputs)):
                sampled[r, : len(ids)] = torch.tensor(sampled_logprobs(ids, out.outputs[0].logprobs))
        return assemble_rollouts(self.processor, samples, batch, completion, self.eos_ids, self.pad_id, sampled)

    @torch.no_grad()
    def _push_weights(self, model: Any) -> None:
        self._wake("weights")
        dtype = self._dtype
        with gathered_parameters(model):
            weights = checkpoint_weights(model)
            stream = ((name, t if dtype is None else t.to(dtype)) for name, t in weights.items())
            loaded = self.llm.apply_model(lambda m: m.load_weights(stream))
        if loaded and all(isinstance(r, (set, list)) and not r for r in loaded):
            raise RuntimeError(f"vLLM's load_weights took none of the policy's {len(weights)} weights "
                               f"(e.g. {next(iter(weights), None)!r}); its model does not match the policy")
        # Cached KV blocks and image features were computed with the old weights.
        self.llm.reset_prefix_cache()
        reset_encoder_cache = getattr(self.llm.llm_engine, "reset_encoder_cache", None)
        if reset_encoder_cache is not None:
            reset_encoder_cache()

    def _sleep(self) -> None:
        if self._can_sleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        todo = [t for t in (tags or ("weights", "kv_cache")) if t in self._asleep]
        if not todo:
            return
        torch.cuda.empty_cache()  # hand the trainer's freed blocks back to the driver, for vLLM's pool to map
        if self._wake_by_tag:
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)
        else:
            self.llm.wake_up()
            self._asleep.clear()
