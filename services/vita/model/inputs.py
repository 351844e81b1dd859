"""What the model takes for one prompt: expanded token ids plus the media tensors that fill the placeholder slots.

The processor (`vita.processing.processor`) makes these from a request; the model only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class MultimodalInputs:
    """One prompt after placeholder expansion: token ids plus the media whose embeddings fill the slots."""

    input_ids: Tensor  # (L,) with image/video/audio ids repeated once per embedding slot
    image_pixels: Tensor | None = None  # (tiles, 3, 448, 448): every tile of every image, in prompt order
    video_pixels: Tensor | None = None  # (frames, 3, 448, 448): every frame of every video, in prompt order
    # One (frames, num_mel_bins) filterbank per clip, in prompt order: what the audio tower reads
    # (`vita.processing.audio.audio_features` makes them from waveforms).
    audio_features: list[Tensor] = field(default_factory=list)
    # The 16 kHz mono waveforms the features came from, in prompt order; the model does not read them.
    audio_waveforms: list[Tensor] = field(default_factory=list)


@dataclass
class SlotIds:
    """Token ids whose positions receive encoder embeddings (from the tokenizer)."""

    image: int
    video: int
    audio: int
