"""The omni-modal model: placeholder slots filled by the towers, whole-model checkpoints, streaming."""

import json

import pytest
import torch

from vita.errors import CheckpointError, InvalidInputError
from vita.inference import GenerationRequest, VitaPipeline
from vita.model.generation import SamplingParams
from vita.model.inputs import MultimodalInputs, SlotIds
from vita.model.vita import VitaForCausalLM
from vita.processing.audio import audio_features


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


def test_slots_are_overwritten_by_tower_outputs(pipeline, wide_png, speech_wav):
    inputs, _ = pipeline.processor("Describe.", images=[wide_png], audio=[speech_wav])
    slots = pipeline.processor.slot_ids
    embeds = pipeline.model.embed_multimodal(inputs, slots)[0]
    ids = inputs.input_ids
    with torch.inference_mode():
        vision = pipeline.model.vision_tower(inputs.image_pixels).flatten(0, 1)
        audio = pipeline.model.audio_tower.encode_features(
            audio_features(inputs.audio_waveforms, pipeline.model.vita_config.audio))[0]
        text = pipeline.model.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[ids == slots.image], vision)
    torch.testing.assert_close(embeds[ids == slots.audio], audio)
    is_text = (ids != slots.image) & (ids != slots.audio)
    torch.testing.assert_close(embeds[is_text], text[is_text])


def test_slot_count_mismatch(pipeline):
    slots = pipeline.processor.slot_ids
    ids = torch.tensor([1, slots.image, slots.image, 5])
    with pytest.raises(InvalidInputError, match="2 image slots but the image inputs give 0"):
        pipeline.model.embed_multimodal(MultimodalInputs(input_ids=ids), slots)


def test_streaming_matches_one_shot_greedy(pipeline, wide_png):
    request = GenerationRequest(text="What is this?", images=[wide_png],
                                sampling=SamplingParams(max_new_tokens=12))
    events = list(pipeline.stream(request))
    usage = events[-1].usage
    streamed = [t for e in events for t in e.token_ids]
    assert usage.completion_tokens >= len(streamed) > 0
    assert usage.finish_reason in ("stop", "length")
    # Same prompt through plain greedy generate on inputs_embeds gives the same tokens.
    inputs, _ = pipeline.processor("What is this?", images=[wide_png])
    embeds = pipeline.model.embed_multimodal(inputs, pipeline.processor.slot_ids)
    from vita.model.generation import stream_generate

    reference = list(stream_generate(pipeline.model, inputs_embeds=embeds, params=SamplingParams(max_new_tokens=12)))
    assert streamed == reference[: len(streamed)]
    assert "".join(e.text for e in events) == pipeline.tokenizer.decode(streamed)


def test_whole_model_round_trip_sharded(pipeline, tmp_path):
    pipeline.model.save_pretrained(tmp_path, tokenizer=pipeline.tokenizer, max_shard_bytes=8 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names  # HF Mixtral names for the LLM
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("audio_tower.") for n in names)
    assert len(set(index["weight_map"].values())) > 1
    loaded = VitaForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(pipeline.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_loading_names_what_is_wrong(pipeline, tmp_path):
    from safetensors.torch import load_file, save_file

    pipeline.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    weights["audio_tower.extra"] = torch.zeros(1)
    weights["lm_head.weight"] = weights["lm_head.weight"][:10]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        VitaForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "model.norm.weight" in msg and "audio_tower.extra" in msg and "lm_head.weight" in msg


def test_truncated_checkpoint(pipeline, tmp_path):
    pipeline.model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        VitaForCausalLM.from_pretrained(tmp_path)


def test_text_only_model_rejects_images(tmp_path):
    from vita.model.config import LLMConfig, VitaConfig

    model = VitaForCausalLM(VitaConfig(llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=4,
                                                     num_key_value_heads=2), vision=None, audio=None))
    ids = torch.tensor([1, 60, 60])
    with pytest.raises(InvalidInputError, match="no vision tower"):
        model.embed_multimodal(MultimodalInputs(ids, image_pixels=torch.zeros(1, 3, 448, 448)),
                               SlotIds(image=60, video=61, audio=62))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mixtral"
