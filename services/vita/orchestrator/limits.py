"""Limits on what one request may carry, checked before any work is queued (INVALID_ARGUMENT with the limit).

Media sizes are read from headers only (image dimensions, a WAV's data size, a container's stated duration),
so a check costs microseconds and the orchestrator never decodes media. What a header does not state (a stream
without a duration) passes here and meets the encoders' own limits when decoded. The message size is bounded
before any of this by gRPC (`--max-message-bytes`: RESOURCE_EXHAUSTED). docs/serving.md lists every limit.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from vita.errors import InvalidInputError
from vita.orchestrator.sessions import MAX_PENDING_IMAGES
from vita.processing.image import MAX_PIXELS
from vita.v1.assistant_pb2 import ConverseLimits, GenerateRequest
from vita.v1.media_pb2 import Audio, Video


@dataclass(frozen=True)
class InputLimits:
    max_text_chars: int = 32_768  # a request's text (and its system prompt), or one Converse text message
    max_images: int = 8  # images in one Generate request
    max_image_pixels: int = MAX_PIXELS  # width * height of any image or video frame
    max_audio_clips: int = 8  # audio inputs in one Generate request
    max_audio_s: float = 600.0  # each audio input (the audio encoder refuses longer clips too)
    max_video_s: float = 600.0  # a video file's stated duration, or the span of a frame sequence
    max_video_frames: int = 3_600  # frames in a frame sequence (a file is sampled to at most 16)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise InvalidInputError(f"input limit {name} must be positive; got {value}")

    def check_text(self, text: str, what: str = "text") -> None:
        if len(text) > self.max_text_chars:
            raise InvalidInputError(f"{what} is {len(text)} characters; the limit is {self.max_text_chars}")

    def check_image(self, data: bytes, what: str = "image") -> None:
        size = image_size(data)
        if size is not None and size[0] * size[1] > self.max_image_pixels:
            raise InvalidInputError(f"{what} is {size[0]}x{size[1]} = {size[0] * size[1]} pixels; the limit is "
                                    f"{self.max_image_pixels}")

    def check_audio(self, audio: Audio, what: str = "audio") -> None:
        seconds = audio_seconds(audio)
        if seconds is not None and seconds > self.max_audio_s:
            raise InvalidInputError(f"{what} is {seconds:.1f} s long; the limit is {self.max_audio_s:g} s")

    def check_video(self, video: Video) -> None:
        if video.HasField("frames"):
            frames = video.frames.frames
            if len(frames) > self.max_video_frames:
                raise InvalidInputError(f"video has {len(frames)} frames; the limit is {self.max_video_frames}")
            if frames and frames[-1].timestamp_s - frames[0].timestamp_s > self.max_video_s:
                raise InvalidInputError(f"video frames span {frames[-1].timestamp_s - frames[0].timestamp_s:.1f} s; "
                                        f"the limit is {self.max_video_s:g} s")
            for k, frame in enumerate(frames):
                self.check_image(frame.image.data, f"video frame {k}")
        elif video.file:
            seconds = video_seconds(video.file)
            if seconds is not None and seconds > self.max_video_s:
                raise InvalidInputError(f"video is {seconds:.1f} s long; the limit is {self.max_video_s:g} s")

    def check_generate(self, request: GenerateRequest) -> None:
        """Every limit on one Generate request; InvalidInputError names the first one exceeded."""
        self.check_text(request.text)
        if request.HasField("system_prompt"):
            self.check_text(request.system_prompt, "system_prompt")
        if len(request.images) > self.max_images:
            raise InvalidInputError(f"{len(request.images)} images; the limit is {self.max_images} per request")
        if len(request.audio) > self.max_audio_clips:
            raise InvalidInputError(f"{len(request.audio)} audio inputs; the limit is {self.max_audio_clips}")
        for k, image in enumerate(request.images):
            self.check_image(image.data, f"image {k}")
        for k, audio in enumerate(request.audio):
            self.check_audio(audio, f"audio {k}")
        if request.HasField("video"):
            self.check_video(request.video)

    def converse(self) -> ConverseLimits:
        """What a Converse client may check before sending (SessionStarted.limits): the limits these apply to its
        events, and the images a turn takes (a fixed MAX_PENDING_IMAGES, not `max_images`: that is Generate's)."""
        return ConverseLimits(max_text_chars=self.max_text_chars, max_image_pixels=self.max_image_pixels,
                              max_images=MAX_PENDING_IMAGES)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header (Pillow opens lazily: no pixel is decoded); None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        return (Image.MAX_IMAGE_PIXELS or 0) * 2 + 1, 1  # Pillow's own refusal: beyond twice its limit
    except Exception:  # not an image Pillow knows: the vision encoder reports what is wrong with it
        return None


def audio_seconds(audio: Audio) -> float | None:
    """Duration from the PCM16 size, the WAV header, or the container header; None if none states it."""
    data = audio.data
    if audio.encoding == Audio.PCM16:
        return len(data) / 2 / audio.sample_rate_hz if audio.sample_rate_hz > 0 else None
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return _wav_seconds(data)
    return _container_seconds(data, audio=True)


def video_seconds(data: bytes) -> float | None:
    return _container_seconds(data, audio=False)


def _wav_seconds(data: bytes) -> float | None:
    bytes_per_second, pos = None, 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        if chunk_id == b"fmt " and size >= 16 and pos + 24 <= len(data):
            _, _, _, bytes_per_second, _, _ = struct.unpack_from("<HHIIHH", data, pos + 8)
        elif chunk_id == b"data":
            available = min(size, len(data) - pos - 8)  # a streamed file's size field may overstate it
            return available / bytes_per_second if bytes_per_second else None
        pos += 8 + size + (size & 1)
    return None


def _container_seconds(data: bytes, *, audio: bool) -> float | None:
    """The first audio (or video) stream's stated duration, else the container's (audio only: for a video the
    container's may be a longer audio track's, which must not refuse a short video)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            streams = container.streams.audio if audio else container.streams.video
            if streams and streams[0].duration and streams[0].time_base:
                return float(streams[0].duration * streams[0].time_base)
            if audio and container.duration:
                return container.duration / 1_000_000  # AV_TIME_BASE
    except Exception:  # undecodable: the encoder reports it with its own message
        return None
    return None
