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


def test_one_vlm_test_and_the_processor_side_answer_for_every_kind_of_handle(tiny_dirs, make_image):
    """``is_multimodal`` takes a model, its config, its checkpoint folder or its processor; the processor resolves
    to its family's adapter, which sizes the images and says how many pixel rows each holds."""
    from vlm_mig.adapter import is_multimodal
    from vlm_mig.rollout import select_prompts

    for arch, vlm in (("qwen2-vl", True), ("qwen2.5-vl", True), ("qwen2", False)):
        model, proc = load_model(tiny_dirs[arch]), load_processor(tiny_dirs[arch])
        for handle in (model, model.config, tiny_dirs[arch], str(tiny_dirs[arch]), proc):
            assert is_multimodal(handle) is vlm, (arch, type(handle).__name__)
        assert adapter_for(proc) is adapter_for(model)
    assert not is_multimodal(tokenizer_of(load_processor(tiny_dirs["qwen2-vl"])))
    proc = load_processor(tiny_dirs["qwen2-vl"])
    samples = [Sample(id=f"s{i}", question="How many?", answer="1",
                      images=[str(make_image(f"{i}.png", size=(56 * (i + 1), 56)))]) for i in range(3)]
    batch = encode_prompts(proc, samples)
    assert batch.image_patches == batch.image_grid_thw.prod(-1).tolist() and sum(batch.image_patches) == len(
        batch.pixel_values)
    picked = select_prompts(batch, [2, 0, 2])  # images of different sizes, reordered and repeated
    alone = [encode_prompts(proc, [samples[i]]) for i in (2, 0, 2)]
    assert torch.equal(picked.pixel_values, torch.cat([b.pixel_values for b in alone]))
    assert picked.image_patches == [b.image_patches[0] for b in alone]


def test_text_continues_positions_where_the_family_says():
    three = torch.tensor([[0, 1, 2, 2, 3], [0, 1, 2, 5, 6], [0, 1, 2, 4, 5]])  # an image ran the w axis ahead
    assert Qwen2VLAdapter().text_positions(three, 2).tolist() == [[7, 8]] * 3
    assert TEXT.text_positions(torch.tensor([0, 1, 2]), 2).tolist() == [3, 4]
    assert TEXT.text_positions(torch.zeros(0, dtype=torch.long), 1).tolist() == [0]
