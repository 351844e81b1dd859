"""`Assistant/ModelMetadata`: what the orchestrator serves, from what it already holds (the model config it enforces
the context with, its own settings and input limits), in the manner of KServe v2's (Triton's) ModelMetadata.
No worker is asked, so it answers as fast as the access checks let it.
"""

from __future__ import annotations

from pathlib import Path

from vita.model.config import PRESETS, VitaConfig
from vita.orchestrator.config import OrchestratorConfig
from vita.orchestrator.limits import InputLimits
from vita.processing.video import LONG_FRAMES
from vita.v1.assistant_pb2 import (
    AudioMetadata,
    GenerateLimits,
    ImageMetadata,
    ModelMetadataResponse,
    VideoMetadata,
)


def model_metadata(model: VitaConfig, config: OrchestratorConfig) -> ModelMetadataResponse:
    llm = model.llm
    context = llm.max_position_embeddings
    response = ModelMetadataResponse(
        name=Path(config.model_dir).name if config.model_dir else "",
        architecture="MixtralForCausalLM" if model.vision is None and model.audio is None else "VitaForCausalLM",
        preset=preset_of(model), context_length=context, max_prompt_tokens=context - 1,
        default_max_tokens=config.default_max_tokens, max_tokens_limit=context - 1, vocab_size=llm.vocab_size,
        modalities=["text"], generate_limits=generate_limits(config.limits),
        converse_limits=config.limits.converse())
    if model.vision is not None:
        vision = model.vision
        thumbnail = vision.use_thumbnail and vision.max_tiles > 1
        response.modalities.extend(["image", "video"])
        response.image.CopyFrom(ImageMetadata(
            tile_size=vision.image_size, tokens_per_tile=vision.tokens_per_tile, max_tiles=vision.max_tiles,
            thumbnail=thumbnail, max_tokens=(vision.max_tiles + thumbnail) * vision.tokens_per_tile))
        response.video.CopyFrom(VideoMetadata(max_frames=LONG_FRAMES, tokens_per_frame=vision.tokens_per_tile))
    if model.audio is not None:
        audio = model.audio
        response.modalities.append("audio")
        response.audio.CopyFrom(AudioMetadata(sample_rate_hz=audio.sample_rate, max_seconds=audio.max_seconds,
                                              tokens_per_second=audio.sample_rate / audio.samples_per_token))
    return response


def generate_limits(limits: InputLimits) -> GenerateLimits:
    return GenerateLimits(max_text_chars=limits.max_text_chars, max_images=limits.max_images,
                          max_image_pixels=limits.max_image_pixels, max_audio_clips=limits.max_audio_clips,
                          max_audio_seconds=limits.max_audio_s, max_video_seconds=limits.max_video_s,
                          max_video_frames=limits.max_video_frames)


def preset_of(model: VitaConfig) -> str:
    """The preset whose config `model` equals, field for field; "" when none does."""
    return next((name for name, make in PRESETS.items() if make() == model), "")
