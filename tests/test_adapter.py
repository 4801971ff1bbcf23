"""The model adapter: each tiny architecture (and real SmolLM2 weights) resolves to its family's adapter, and the
adapter answers image features, image token ids, position ids, the vision tower and the packed pass's modules."""

from __future__ import annotations

import pytest
import torch

from vlm_mig.adapter import TEXT, Qwen2VLAdapter, Qwen25VLAdapter, adapter_for
from vlm_mig.data.schema import Sample
from vlm_mig.models import build_tiny, load_model, load_processor
from vlm_mig.processing import encode_prompts, tokenizer_of


@pytest.fixture(scope="module")
def tiny_dirs(tiny_vl_dir, tiny_text_dir, tmp_path_factory):
    return {"qwen2-vl": tiny_vl_dir, "qwen2": tiny_text_dir,
            "qwen2.5-vl": build_tiny(tmp_path_factory.mktemp("tiny_vl25"), arch="qwen2.5-vl", seed=0)}


def _image_batch(proc, make_image):
    samples = [Sample(id="a", question="How many?", images=[str(make_image("a.png"))], answer="1"),
               Sample(id="b", question="A longer question without an image?", images=[], answer="1")]
    return encode_prompts(proc, samples)


@pytest.mark.parametrize("arch, kind", [("qwen2-vl", Qwen2VLAdapter), ("qwen2.5-vl", Qwen25VLAdapter)])
def test_vision_language_adapters_answer_for_their_models(tiny_dirs, make_image, arch, kind):
    model, proc = load_model(tiny_dirs[arch]), load_processor(tiny_dirs[arch])
    adapter = adapter_for(model)
    assert type(adapter) is kind and adapter.multimodal and adapter.name == arch
    assert adapter_for(model.config) is adapter
    assert adapter.image_token_id(model) == tokenizer_of(proc).convert_tokens_to_ids("<|image_pad|>")
    assert ("<|vision_start|>", "<|vision_end|>") in adapter.atomic_pairs
    assert adapter.vision_tower(model) is model.model.visual
    assert adapter.patch_embedding(model) is model.model.visual.patch_embed
    batch = _image_batch(proc, make_image)
    (feats,) = adapter.image_features(model, batch.pixel_values, batch.image_grid_thw)
    n_image_tokens = int((batch.input_ids == adapter.image_token_id(model)).sum())
    assert feats.shape == (n_image_tokens, model.config.get_text_config().hidden_size)
    pos = adapter.position_ids(model, batch.input_ids, batch.attention_mask, batch.mm_token_type_ids,
                               batch.image_grid_thw)
    assert pos.shape == (3, 2, batch.input_ids.shape[1])
    with torch.no_grad():  # the ids the model's own forward derives, passed back explicitly, change nothing
        implicit = model(**batch.model_inputs()).logits
        explicit = model(**batch.model_inputs(), position_ids=pos).logits
    torch.testing.assert_close(implicit, explicit)
    # The packed pass's pieces: embeddings, decoder and head of this model.
    assert adapter.input_embeddings(model) is model.get_input_embeddings()
    assert adapter.decoder(model) is model.get_decoder()
    assert adapter.output_head(model) is model.get_output_embeddings()


def test_a_lora_wrapped_vlm_keeps_its_adapter_and_its_m_rope_positions(tiny_dirs, make_image):
    from peft import LoraConfig, get_peft_model

    model, proc = load_model(tiny_dirs["qwen2-vl"]), load_processor(tiny_dirs["qwen2-vl"])
    batch = _image_batch(proc, make_image)
    inputs = (batch.input_ids, batch.attention_mask, batch.mm_token_type_ids, batch.image_grid_thw)
    plain = adapter_for(model).position_ids(model, *inputs)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = adapter_for(wrapped)
    assert type(adapter) is Qwen2VLAdapter
    assert torch.equal(adapter.position_ids(wrapped, *inputs), plain)
    assert adapter.vision_tower(wrapped) is model.model.visual


def test_text_models_get_the_text_adapter(tiny_dirs, smollm2_dir):
    for path in (tiny_dirs["qwen2"], smollm2_dir):
        model = load_model(path)
        adapter = adapter_for(model)
        assert adapter is TEXT and not adapter.multimodal
        assert adapter.vision_tower(model) is None and adapter.patch_embedding(model) is None
        assert adapter.image_token_id(model) is None
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        assert adapter.position_ids(model, torch.ones_like(mask), mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
        with pytest.raises(ValueError, match="no vision tower"):
            adapter.image_features(model, torch.zeros(4, 8), torch.tensor([[1, 2, 2]]))
    assert type(load_model(smollm2_dir)).__name__ == "LlamaForCausalLM"


def test_an_unknown_vision_language_family_is_an_error_naming_it():
    from transformers import PretrainedConfig

    config = PretrainedConfig(vision_config={"depth": 1})
    config.model_type = "llava"
    with pytest.raises(ValueError, match="no adapter for vision-language model type 'llava'.*vlm_mig/adapter.py"):
        adapter_for(config)
