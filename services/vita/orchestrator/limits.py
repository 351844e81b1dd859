"""Limits on what one request may carry, checked before any work is queued (INVALID_ARGUMENT with the limit).

Media sizes are read from headers only (image dimensions, a WAV's byte rate and the data bytes it actually holds, a
container's stated duration), so a check costs microseconds and the orchestrator never decodes media. What a header
does not state (a stream without a duration) passes here and meets the encoders' own limits when decoded. The message
size is bounded before any of this by gRPC (`--max-message-bytes`: RESOURCE_EXHAUSTED). docs/serving.md lists every
limit.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from vita.errors import InvalidInputError, VitaError
from vita.model.config import AudioConfig
from vita.orchestrator.sessions import MAX_PENDING_IMAGES
from vita.processing.audio import check_audio_encoding
from vita.processing.image import MAX_PIXELS
from vita.v1.assistant_pb2 import ConverseLimits, GenerateRequest
from vita.v1.media_pb2 import Audio, SamplingParams, Video


@dataclass(frozen=True)
class InputLimits:
    max_text_chars: int = 32_768  # a request's text (and its system prompt), or one Converse text message
    max_images: int = 8  # images in one Generate request
    max_image_pixels: int = MAX_PIXELS  # width * height of any image or video frame
    max_audio_clips: int = 8  # audio inputs in one Generate request
    # Each audio input: by default the longest clip the presets' audio encoder takes (AudioConfig.max_seconds, 200 s);
    # `vita serve orchestrator` sets the served model's (`served_audio_limit`).
    max_audio_s: float = AudioConfig().max_seconds
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
        check_audio_format(audio, what)
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
        check_sampling(request.sampling)
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


def served_audio_limit(requested: float | None, audio: AudioConfig | None) -> float:
    """`--max-audio-seconds` for the served model. By default (None) the longest clip its audio encoder takes
    (`AudioConfig.max_seconds`), so a longer one is refused on arrival from its header, not by the encoder after
    decoding it; a smaller value lowers the limit, a larger one is refused (VitaError: the encoder would refuse
    those clips anyway). A model without an audio tower keeps the value given, or the default."""
    if audio is None:
        return InputLimits.max_audio_s if requested is None else requested
    if requested is None:
        return audio.max_seconds
    if requested > audio.max_seconds:
        raise VitaError(f"--max-audio-seconds {requested:g} is above what the model's audio encoder takes "
                        f"({audio.max_seconds:g} s, {audio.max_frames} filterbank frames): give at most that, or "
                        "leave the flag out to use it")
    return requested


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
    """Duration from the PCM16 size, a WAV's data (the bytes its data chunk holds at the format chunk's byte rate:
    a size field claiming more, as a streamed file's may, is not believed), or the container header; None if none
    states it."""
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


def check_sampling(sampling: SamplingParams, what: str = "sampling") -> None:
    """The decoding controls of a Generate request or a Converse session, refused on arrival (InvalidInputError
    naming the field) by the rules the llm worker applies (`vita.model.generation.SamplingParams`), so a bad value
    never reaches a worker: temperature finite and >= 0, top_p in (0, 1] (0: 1), top_k >= 0, max_tokens >= 0 (0:
    the server default; the proto defines no negative value)."""
    from vita.model.generation import SamplingParams as Decoding

    if sampling.max_tokens < 0:
        raise InvalidInputError(f"{what}.max_tokens must be >= 0 (0: the server default), got {sampling.max_tokens}")
    try:  # the worker's own mapping (llm/worker.py sampling_from_job), with any valid token budget
        Decoding.from_message(sampling, max_new_tokens=1)
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}.{e}") from None


def check_audio_format(audio: Audio, what: str = "audio") -> None:
    """What the encoders would refuse after queuing, refused on arrival: an encoding the proto does not define
    (proto3 enums are open: any number parses), PCM16 that is not whole samples."""
    check_audio_encoding(audio, f"{what}: ")
    if audio.encoding == Audio.PCM16 and len(audio.data) % 2:
        raise InvalidInputError(f"{what}: PCM16 audio must have an even number of bytes; got {len(audio.data)}")
