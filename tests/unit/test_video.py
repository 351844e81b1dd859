import io
import math
import wave
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vita.errors import InvalidInputError
from vita.model.config import VisionConfig
from vita.processing.image import to_pixel_values
from vita.processing.video import (
    VideoClip,
    decode_video,
    sample_frames,
    sample_timestamps,
    video_to_pixel_values,
)

WIDTH, HEIGHT, BITS = 64, 48, 8
STRIPE = WIDTH // BITS


def striped(index: int) -> np.ndarray:
    """Frame `index` as 8 black/white vertical stripes (bit b of the index = stripe b): survives lossy coding."""
    bits = (index >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, STRIPE).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (HEIGHT, WIDTH, 3)))


def index_of(image: Image.Image) -> int:
    centres = np.asarray(image.convert("L"))[HEIGHT // 2, STRIPE // 2 :: STRIPE]
    return sum(int(value > 128) << bit for bit, value in enumerate(centres))


def write_video(path, n_frames: int, fps: int, *, fmt: str | None = None, first_pts: int = 0, rotation: int = 0):
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(striped(i), format="rgb24")
            frame.pts, frame.time_base = first_pts + i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(
    ("duration", "fps", "expected"),
    [
        (1.0, 20, [k / 4 for k in range(4)]),
        (3.9, 20, [k / 4 for k in range(16)]),
        (4.0, 5, [0.0, 1.0, 2.0, 3.0]),
        (10.0, 5, [float(k) for k in range(10)]),
        (16.0, 5, [float(k) for k in range(16)]),
        (60.0, 2, [1.875 + 3.75 * k for k in range(16)]),
    ],
)
def test_decode_video_samples_by_duration(tmp_path, duration, fps, expected):
    path = write_video(tmp_path / "clip.mp4", round(duration * fps), fps)
    clip = decode_video(path)
    assert clip.timestamps == pytest.approx(expected)
    # Expected frame: nearest in time; at 60 s / 2 fps the targets fall between frames (3.75 + 7.5k frames).
    assert all(abs(t * fps - math.floor(t * fps) - 0.5) > 0.1 for t in expected)
    assert [index_of(frame) for frame in clip.frames] == [round(t * fps) for t in expected]
    assert all(frame.size == (WIDTH, HEIGHT) and frame.mode == "RGB" for frame in clip.frames)


def test_decode_video_from_bytes(tmp_path):
    data = write_video(tmp_path / "clip.mkv", 20, 5).read_bytes()
    clip = decode_video(data)
    assert clip.timestamps == [0.0, 1.0, 2.0, 3.0]
    assert [index_of(frame) for frame in clip.frames] == [0, 5, 10, 15]


def test_duration_falls_back_to_packet_times_without_metadata(tmp_path):
    path = write_video(tmp_path / "raw.m4v", 31, 8, fmt="m4v")  # raw MPEG-4 stream: no duration anywhere
    with av.open(str(path)) as container:
        assert not container.streams.video[0].duration and not container.duration
    clip = decode_video(path)  # 31 frames at 8 fps last 3.875 s (not 3.75, the last frame's time): 4 per second
    assert clip.timestamps == [k / 4 for k in range(16)]
    assert [index_of(frame) for frame in clip.frames] == [2 * k for k in range(16)]


def test_times_are_relative_to_the_first_frame(tmp_path):
    clip = decode_video(write_video(tmp_path / "late.mp4", 8, 4, first_pts=10))  # starts at 2.5 s
    assert clip.timestamps == [k / 4 for k in range(8)]
    assert [index_of(frame) for frame in clip.frames] == list(range(8))


def test_display_rotation_is_applied(tmp_path):
    clip = decode_video(write_video(tmp_path / "portrait.mp4", 4, 4, rotation=90))
    assert all(frame.size == (HEIGHT, WIDTH) for frame in clip.frames)
    # 90 degrees counterclockwise, as ffmpeg's autorotate shows it: undoing it recovers the stripes.
    assert [index_of(frame.rotate(-90, expand=True)) for frame in clip.frames] == [0, 1, 2, 3]


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_a_still_image_is_no_video_file(tmp_path, fmt):
    """FFmpeg reads a still image as a one-frame video stream; it passed for a one-frame clip. An animated GIF is
    a video (FFmpeg's gif demuxer, not an image pipe)."""
    out = io.BytesIO()
    Image.fromarray(striped(3)).save(out, format=fmt)
    path = tmp_path / f"still.{fmt.lower()}"
    path.write_bytes(out.getvalue())
    for source in (out.getvalue(), path):
        with pytest.raises(InvalidInputError, match=f"the video file is a {fmt} image, not a video: send an image "
                                                    "as an Image"):
            decode_video(source)
    gif = io.BytesIO()
    frames = [Image.fromarray(striped(k)) for k in range(4)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=250)
    assert len(decode_video(gif.getvalue()).frames) == 4  # 4 frames of 250 ms: 1 s at 4 fps


def test_bad_video_input_raises_invalid_input(tmp_path):
    empty = tmp_path / "empty.avi"
    with av.open(str(empty), "w") as container:  # a video stream, but not a single frame
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    cases = [
        (b"", "empty"),
        (b"this is not a video file" * 10, "could not be decoded"),
        (write_video(tmp_path / "ok.mp4", 10, 5).read_bytes()[:100], "could not be decoded"),
        (wav_bytes(), "no video stream"),
        (empty, "no frames"),
        (tmp_path / "missing.mp4", "not found"),
        (42, "must be bytes or a path"),
    ]
    for source, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            decode_video(source)


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (0.0, [0.0]),
        (0.1, [0.0]),
        (0.3, [0.0, 0.25]),
        (3.99, [k / 4 for k in range(16)]),
        (4.0, [0.0, 1.0, 2.0, 3.0]),
        (4.0000000001, [0.0, 1.0, 2.0, 3.0]),
        (4.5, [0.0, 1.0, 2.0, 3.0, 4.0]),
        (16.0, [float(k) for k in range(16)]),
        (16.8, [(k + 0.5) * 1.05 for k in range(16)]),
        (3600.0, [(k + 0.5) * 225 for k in range(16)]),
    ],
)
def test_sample_timestamps(duration, expected):
    assert sample_timestamps(duration) == pytest.approx(expected)


@pytest.mark.parametrize("duration", [-1.0, float("nan"), float("inf")])
def test_sample_timestamps_rejects_bad_durations(duration):
    with pytest.raises(InvalidInputError, match="duration"):
        sample_timestamps(duration)


def frame_image(index: int) -> Image.Image:
    return Image.fromarray(striped(index))


def test_camera_frames_at_any_start_time():
    frames = [(1000.0 + i / 30, frame_image(i)) for i in range(120)]  # 4 s of a 30 fps camera
    clip = sample_frames(frames)
    assert clip.timestamps == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert [index_of(frame) for frame in clip.frames] == [0, 30, 60, 90]


def test_camera_frames_with_irregular_spacing_pick_the_nearest():
    times = [8.0, 8.125, 8.875, 9.0, 10.25]  # span 2.25 s over 5 frames -> 2.8125 s -> 4 frames per second
    clip = sample_frames([(t, frame_image(i)) for i, t in enumerate(times)])
    assert clip.timestamps == [k / 4 for k in range(12)]
    # 0.5 s is equally far from 0.125 and 0.875: the earlier frame wins; past the last frame, the last one.
    assert [index_of(frame) for frame in clip.frames] == [0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 4, 4]


def test_camera_frames_last_one_period_each_like_a_files():
    """docs/model.md's d for a frame sequence: the span plus one average frame period, (t_last - t_first) * n /
    (n - 1). Frames at 0, 0.5, 1.0 and 1.5 s are 2 s of video, as the same 4 frames at 2 fps in a file: 8 frames at
    4 fps, each camera frame twice (0.25 s from two of them: the earlier wins)."""
    clip = sample_frames([(0.5 * i, frame_image(i)) for i in range(4)])
    assert clip.timestamps == [k / 4 for k in range(8)]
    assert [index_of(frame) for frame in clip.frames] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_single_camera_frame():
    clip = sample_frames([(5.0, frame_image(7).convert("RGBA"))])
    assert clip.timestamps == [0.0] and index_of(clip.frames[0]) == 7 and clip.frames[0].mode == "RGB"


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "no video frames"),
        ([(1.0, frame_image(0)), (0.5, frame_image(1))], "strictly increasing"),
        ([(1.0, frame_image(0)), (1.0, frame_image(1))], "strictly increasing"),
        ([(-1.0, frame_image(0)), (0.5, frame_image(1))], ">= 0"),
        ([(float("nan"), frame_image(0))], "finite"),
        ([(0.0, Image.new("RGB", (0, 3)))], "zero size"),
    ],
)
def test_bad_camera_frames_raise_invalid_input(frames, message):
    with pytest.raises(InvalidInputError, match=message):
        sample_frames(frames)


def test_each_frame_is_one_whole_tile():
    config = VisionConfig()
    wide = Image.fromarray(np.tile(striped(5), (1, 28, 1)))  # 1792x48: as an image it would be 12 tiles + a thumbnail
    clip = VideoClip([0.0, 1.0], [wide, frame_image(3)])
    pixels = video_to_pixel_values(clip, config)
    assert pixels.shape == (2, 3, 448, 448)
    expected = to_pixel_values([frame.resize((448, 448), Image.Resampling.BICUBIC) for frame in clip.frames], config)
    torch.testing.assert_close(pixels, expected)
    assert pixels.shape[0] * config.tokens_per_tile == 512
    with pytest.raises(InvalidInputError, match="no frames"):
        video_to_pixel_values(VideoClip([], []), config)
