"""Video input: MISSION.md's frame sampling for files and live cameras; every kept frame is one 448 tile.

At most 16 frames are ever kept (16 x 256 = 4096 tokens), whatever the length of the video.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import av
import torch
from av.container import InputContainer
from av.video.stream import VideoStream
from PIL import Image

from vita.errors import InvalidInputError, ffmpeg_reason, naming_file
from vita.model.config import VisionConfig
from vita.processing.image import load_image, to_pixel_values

SHORT_S = 4.0  # below this: SHORT_FPS frames per second
LONG_S = 16.0  # up to this (inclusive): one frame per second; above it: LONG_FRAMES frames in all
SHORT_FPS = 4
LONG_FRAMES = 16

T = TypeVar("T")


@dataclass
class VideoClip:
    """Sampled frames; `timestamps` are the sampling times in seconds from the first frame."""

    timestamps: list[float]
    frames: list[Image.Image]


def sample_timestamps(duration_s: float) -> list[float]:
    """Sampling times (s) for a clip of `duration_s` seconds.

    d < 4: k/4 for k < ceil(4d); 4 <= d <= 16: k for k < ceil(d); d > 16: (k + 1/2) * d/16 for k < 16, the
    centres of 16 equal segments. So 3.9 s gives 16 frames, 4.0 s gives 4 (0..3), 16.0 s gives 16 (0..15);
    a zero-length clip (a single still frame) gives [0.0]. The duration is first rounded to the millisecond,
    so float noise in a computed one (4.0000000001 s) does not add a frame.
    """
    if not math.isfinite(duration_s) or duration_s < 0:
        raise InvalidInputError(f"video duration must be a finite number of seconds >= 0, got {duration_s}")
    duration_s = round(duration_s, 3)
    if duration_s > LONG_S:
        return [(k + 0.5) * duration_s / LONG_FRAMES for k in range(LONG_FRAMES)]
    fps = SHORT_FPS if duration_s < SHORT_S else 1
    return [k / fps for k in range(max(1, math.ceil(fps * duration_s)))]


def decode_video(source: bytes | str | Path) -> VideoClip:
    """Decodes a video file once, front to back; only the (at most 16) kept frames are converted to RGB.

    The span sampled is the video stream's own: its duration when the stream states one, else the first packet's
    start to the last one's end (a container's duration may come from a longer audio track). Frames without
    timestamps (raw H.264/HEVC/MPEG-4 elementary streams) are timed by the stream's frame rate.
    """
    with naming_file(source):
        return _decode(source)


def _decode(source: bytes | str | Path) -> VideoClip:
    try:
        with _open(source) as container:
            stream = _video_stream(container)
            duration = _stream_duration(stream)
            if duration is not None:
                return _sample(container, stream, duration)
            duration = _packet_duration(container, stream)
        with _open(source) as container:  # the packet scan consumed the demuxer; reopening beats seeking
            return _sample(container, _video_stream(container), duration)
    except av.FFmpegError as e:
        raise InvalidInputError(f"video could not be decoded: {ffmpeg_reason(e)}") from None


def check_video(source: bytes | str | Path) -> None:
    """Opens a video and decodes its first frame, without sampling the clip: a quick check that `decode_video`
    can read it (what `vita eval` runs over a benchmark's files before loading the model). InvalidInputError
    otherwise, with the reason `decode_video` would give (an image as a video file, no video stream, no frame)."""
    try:
        with _open(source) as container:
            if next(container.decode(_video_stream(container)), None) is None:
                raise InvalidInputError("video has no frames")
    except av.FFmpegError as e:
        raise InvalidInputError(f"video could not be decoded: {ffmpeg_reason(e)}") from None


def sample_frames(frames: Sequence[tuple[float, Image.Image]]) -> VideoClip:
    """Samples a live camera's (timestamp, frame) pairs, on any clock and at any spacing, as a file would be.

    Each frame stands for one average frame period, as in a file: n frames spanning s seconds last
    s * n / (n - 1) seconds, so 120 frames at 30 fps count as 4 s, like the same 4 s recorded to disk.
    """
    if not frames:
        raise InvalidInputError("no video frames given")
    times = [t for t, _ in frames]
    if not all(math.isfinite(t) and t >= 0 for t in times):
        raise InvalidInputError("frame timestamps must be finite and >= 0")
    if any(later <= earlier for earlier, later in pairwise(times)):
        raise InvalidInputError("frame timestamps must be strictly increasing")
    span = times[-1] - times[0]
    duration = span * len(times) / (len(times) - 1) if len(times) > 1 else 0.0
    targets = sample_timestamps(duration)
    picked = _pick_nearest(((t - times[0], image) for t, image in frames), targets)
    return VideoClip(targets, [load_image(image) for image in picked])


def video_to_pixel_values(clip: VideoClip, config: VisionConfig) -> torch.Tensor:
    """(F, 3, 448, 448): each whole frame resized to one tile, never tiled further, so 256 tokens per frame."""
    if not clip.frames:
        raise InvalidInputError("video clip has no frames")
    return to_pixel_values(clip.frames, config)


def _open(source: bytes | str | Path) -> InputContainer:
    if isinstance(source, bytes):
        if not source:
            raise InvalidInputError("video data is empty")
        return av.open(io.BytesIO(source))
    if isinstance(source, str | Path):
        if not Path(source).is_file():
            raise InvalidInputError(f"video file not found: {source}")
        return av.open(str(source))
    raise InvalidInputError(f"video must be bytes or a path, not {type(source).__name__}")


def _video_stream(container: InputContainer) -> VideoStream:
    _check_not_an_image(container)
    if not container.streams.video:
        raise InvalidInputError("file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _check_not_an_image(container: InputContainer) -> None:
    """A still image is no video: FFmpeg reads one (PNG, JPEG, WebP, BMP, TIFF, ...: its `*_pipe` and `image2`
    demuxers) as a one-frame video stream, which would pass for a clip of one frame. Animated formats (GIF, APNG)
    are videos."""
    name = container.format.name
    if name == "image2" or name.endswith("_pipe"):
        kind = "an image" if name == "image2" else f"a {name.removesuffix('_pipe').upper()} image"
        raise InvalidInputError(f"the video file is {kind}, not a video: send an image as an Image "
                                f"(GenerateRequest.images), camera frames as Video.frames")


def _stream_duration(stream: VideoStream) -> float | None:
    """The video stream's own duration, if its header states one (MP4/MOV do; Matroska, WebM and raw streams
    do not). Never the container's: that is the longest stream's, often an audio track that outlasts the video."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _packet_duration(container: InputContainer, stream: VideoStream) -> float:
    """The video packets' span: from the first one's start to the last one's end.

    Raw elementary streams carry no timestamps at all: there the packets' durations add up, or failing those
    the packet count is divided by the frame rate.
    """
    start, end = math.inf, -math.inf
    untimed, untimed_s = 0, 0.0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        if packet.pts is not None:
            start = min(start, packet.pts)
            end = max(end, packet.pts + (packet.duration or 0))
        else:
            untimed += 1
            untimed_s += float((packet.duration or 0) * stream.time_base) if stream.time_base else 0.0
    if end >= start:
        return float((end - start) * stream.time_base)
    if not untimed:
        raise InvalidInputError("video has no frames")
    return untimed_s or untimed * _frame_period(stream)


def _frame_period(stream: VideoStream) -> float:
    """Seconds per frame at the frame rate FFmpeg guesses (a raw H.264 stream's VUI timing, else the stated or
    the demuxer's default rate), for frames that carry neither a timestamp nor a duration."""
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    if not rate or rate <= 0:
        raise InvalidInputError("video frames have no timestamps and the stream states no frame rate")
    return float(1 / rate)


def _sample(container: InputContainer, stream: VideoStream, duration: float) -> VideoClip:
    targets = sample_timestamps(duration)
    picked = _pick_nearest(_timed_frames(container, stream), targets)
    return VideoClip(targets, [_upright(frame) for frame in picked])


def _timed_frames(
    container: InputContainer, stream: VideoStream
) -> Iterator[tuple[float, av.VideoFrame]]:
    """Frames with times relative to the first one: streams often start at a non-zero pts (e.g. MPEG-TS).

    A frame without a timestamp (raw elementary streams) starts where the previous one ends: after that frame's
    duration, or one period of the frame rate.
    """
    origin = None
    time: float | None = None
    period: float | None = None  # the previous frame's duration, when it states one
    for frame in container.decode(stream):
        if frame.time is not None:
            origin = frame.time if origin is None else origin
            time = frame.time - origin
        else:
            time = 0.0 if time is None else time + (period or _frame_period(stream))
        duration = getattr(frame, "duration", None)
        period = float(duration * frame.time_base) if duration and frame.time_base else None
        yield time, frame


def _upright(frame: av.VideoFrame) -> Image.Image:
    """RGB image turned by the display matrix, as players show it (phones record portrait video sideways)."""
    image = frame.to_image()
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


def _pick_nearest(frames: Iterable[tuple[float, T]], targets: Sequence[float]) -> list[T]:
    """For each sorted target time, the frame nearest in time (ties go to the earlier frame).

    One pass over time-ordered frames holding only the previous one; stops as soon as every target is placed.
    """
    picked: list[T] = []
    previous: tuple[float, T] | None = None
    for time, frame in frames:
        while len(picked) < len(targets) and targets[len(picked)] <= time:
            target = targets[len(picked)]
            closer_before = previous is not None and target - previous[0] <= time - target
            picked.append(previous[1] if closer_before else frame)
        if len(picked) == len(targets):
            return picked
        previous = (time, frame)
    if previous is None:
        raise InvalidInputError("video has no frames")
    return picked + [previous[1]] * (len(targets) - len(picked))
