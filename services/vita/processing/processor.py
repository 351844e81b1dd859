"""Turns one request (text, images, a video, spoken questions, history) into ids plus media tensors for the model.

Media go before the text, in VITA's layout: images, the video, then spoken questions. The text is plain text: a
`<image>` or `<1>` typed in it stays those characters (see `processing.prompt`). `images` and `audio` may also hold
the media of `history` turns, in prompt order: the history's placeholders take theirs first, the new turn the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vita.errors import InvalidInputError
from vita.model.config import VitaConfig
from vita.model.inputs import MultimodalInputs, SlotIds
from vita.processing.audio import audio_features, load_audio, num_audio_tokens
from vita.processing.image import preprocess_image
from vita.processing.prompt import Message, encode_prompt
from vita.processing.tokenizer import VitaTokenizer
from vita.processing.video import VideoClip, decode_video, sample_frames, video_to_pixel_values

ImageInput = bytes | str | Path | Image.Image
VideoInput = bytes | str | Path | Sequence[tuple[float, Image.Image]]
# Anything `load_audio` takes; raw arrays come as (samples, sample_rate).
AudioInput = bytes | str | Path | tuple[Any, int]


@dataclass(frozen=True)
class PromptStats:
    """What the prompt is made of, for usage reports and logs."""

    prompt_tokens: int
    image_tiles: int = 0
    image_tokens: int = 0
    video_frames: int = 0
    video_tokens: int = 0
    audio_clips: int = 0
    audio_tokens: int = 0

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.image_tokens - self.video_tokens - self.audio_tokens

    def summary(self) -> str:
        parts = [f"{self.text_tokens} text"]
        if self.image_tiles:
            parts.append(f"{self.image_tokens} image in {self.image_tiles} tiles")
        if self.video_frames:
            parts.append(f"{self.video_tokens} video in {self.video_frames} frames")
        if self.audio_clips:
            parts.append(f"{self.audio_tokens} audio in {self.audio_clips} clip(s)")
        return ", ".join(parts)


class VitaProcessor:
    """Owns the tokenizer and the media rules of one model config."""

    def __init__(self, tokenizer: VitaTokenizer, config: VitaConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    @property
    def slot_ids(self) -> SlotIds:
        t = self.tokenizer
        return SlotIds(image=t.image_id, video=t.video_id, audio=t.audio_id)

    def __call__(
        self,
        text: str = "",
        *,
        images: Sequence[ImageInput] = (),
        video: VideoInput | None = None,
        audio: Sequence[AudioInput] = (),
        history: Sequence[Message] = (),
        system: str | None = None,
        max_length: int | None = None,
    ) -> tuple[MultimodalInputs, PromptStats]:
        if not text.strip() and not images and video is None and not audio:
            raise InvalidInputError("the request is empty: give text, an image, a video or audio")
        image_pixels = [self._image(src, k) for k, src in enumerate(images)]
        video_pixels = self._video(video) if video is not None else None
        waveforms = [self._audio(src, k) for k, src in enumerate(audio)]

        tokens_per_tile = self.config.vision.tokens_per_tile if self.config.vision else 0
        image_tokens = [p.shape[0] * tokens_per_tile for p in image_pixels]
        video_tokens = [video_pixels.shape[0] * tokens_per_tile] if video_pixels is not None else []
        audio_tokens = [num_audio_tokens(w.numel(), self.config.audio) for w in waveforms]

        user = _current_turn(text, history, images=len(images), videos=len(video_tokens), audios=len(audio))
        prompt = encode_prompt(
            self.tokenizer, [*history, user], audio_question="audio" in user.media,
            image_tokens=image_tokens, video_tokens=video_tokens, audio_tokens=audio_tokens, system=system,
            max_length=max_length or self.config.llm.max_position_embeddings,
        )
        inputs = MultimodalInputs(
            input_ids=torch.tensor(prompt.input_ids, dtype=torch.long),
            image_pixels=torch.cat(image_pixels) if image_pixels else None,
            video_pixels=video_pixels,
            audio_features=audio_features(waveforms, self.config.audio),
            audio_waveforms=waveforms,
        )
        stats = PromptStats(
            prompt_tokens=len(prompt.input_ids),
            image_tiles=sum(p.shape[0] for p in image_pixels), image_tokens=sum(image_tokens),
            video_frames=0 if video_pixels is None else video_pixels.shape[0], video_tokens=sum(video_tokens),
            audio_clips=len(waveforms), audio_tokens=sum(audio_tokens),
        )
        return inputs, stats

    def _image(self, source: ImageInput, k: int) -> torch.Tensor:
        if self.config.vision is None:
            raise InvalidInputError("this model has no vision encoder: it cannot take images")
        try:
            return preprocess_image(source, self.config.vision)
        except InvalidInputError as e:
            raise InvalidInputError(f"image {k}: {e}") from None

    def _video(self, source: VideoInput) -> torch.Tensor:
        if self.config.vision is None:
            raise InvalidInputError("this model has no vision encoder: it cannot take video")
        clip: VideoClip = (decode_video(source) if isinstance(source, bytes | str | Path)
                           else sample_frames(source))
        return video_to_pixel_values(clip, self.config.vision)

    def _audio(self, source: AudioInput, k: int) -> torch.Tensor:
        if self.config.audio is None:
            raise InvalidInputError("this model has no audio encoder: it cannot take audio")
        try:
            if isinstance(source, tuple):
                samples, rate = source
                return load_audio(samples, rate)
            return load_audio(source)
        except InvalidInputError as e:
            raise InvalidInputError(f"audio {k}: {e}") from None



def _current_turn(text: str, history: Sequence[Message], **counts: int) -> Message:
    """The new user turn: the media left after the history's placeholders took theirs, in prompt order."""
    claimed = Counter(m for message in history for m in message.media)
    left = {name: n - claimed[name.removesuffix("s")] for name, n in counts.items()}
    short = [name for name, n in left.items() if n < 0]
    if short:
        name = short[0].removesuffix("s")
        raise InvalidInputError(f"the history places {claimed[name]} {name} placeholder(s) but only "
                                f"{counts[short[0]]} {name} input(s) are given")
    return Message.user(text, **left)
