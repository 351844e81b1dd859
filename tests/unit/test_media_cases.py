"""Kinds of media that users of similar stacks reported breaking their pipelines (issue 11, ../shared/cases/media).

Every input is made here, in several containers and codecs; the shared sample files are also checked when the
checkout has them.
"""

import io
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from vita.processing.audio import decode_audio_bytes, load_audio
from vita.processing.video import decode_video

CASES = Path(__file__).resolve().parents[3] / "shared" / "cases" / "media"
RATE = 16000


# ----------------------------------------------------------------------------------------------------------------
# Audio whose channel layout or sample rate changes mid-stream


def encoded(fmt: str, codec: str, rate: int, channels: np.ndarray) -> bytes:
    """`channels` (C, n) float in [-1, 1] encoded as a whole file of `fmt`."""
    layout = {1: "mono", 2: "stereo"}[channels.shape[0]]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        pcm = np.ascontiguousarray(channels, dtype=np.float32)
        for pts in range(0, pcm.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(pcm[:, pts : pts + frame_size], format="fltp", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def dominant_hz(wave: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave))))


# (format, codec, first part's rate, second part's rate): files joined as bytes, as the reported ones were. Each MP3
# part opens with an ID3 tag and a Xing frame, which the decoder rejects mid-stream: skipped, as ffmpeg skips them.
JOINED = [
    ("adts", "aac", 22050, 22050),
    ("adts", "aac", 22050, 44100),
    ("mp3", "libmp3lame", 22050, 22050),
    ("mp3", "libmp3lame", 44100, 24000),
    ("ac3", "ac3", 48000, 48000),
    ("mp2", "mp2", 32000, 48000),
]


@pytest.mark.parametrize(("fmt", "codec", "rate1", "rate2"), JOINED)
def test_layout_and_rate_change_mid_stream_is_downmixed_to_one_rate(fmt, codec, rate1, rate2):
    mono = tone(440, 1.5, rate1)[None]
    stereo_tone = tone(880, 1.5, rate2)
    stereo = np.stack([stereo_tone, stereo_tone])  # the same in both channels: a downmix keeps its level
    data = encoded(fmt, codec, rate1, mono) + encoded(fmt, codec, rate2, stereo)

    samples, rate = decode_audio_bytes(data)
    assert samples.shape[0] == 1 and rate in (rate1, rate2)  # one channel, one rate (a decoded frame's)

    wave = load_audio(data).numpy()
    # Codec priming and padding add up to a few frames per part; nothing is dropped or duplicated.
    assert abs(len(wave) / RATE - 3.0) < 0.2
    first, second = wave[int(0.3 * RATE) : int(1.1 * RATE)], wave[int(1.9 * RATE) : int(2.7 * RATE)]
    assert dominant_hz(first) == pytest.approx(440, abs=5)
    assert dominant_hz(second) == pytest.approx(880, abs=5)
    assert rms(second) == pytest.approx(0.5 / np.sqrt(2), rel=0.15)  # L = R: the downmix is (L + R) / 2


def test_opposite_channels_cancel_as_in_ffmpegs_downmix():
    left = tone(660, 1.0, 44100)
    data = encoded("adts", "aac", 44100, tone(440, 1.0, 44100)[None]) + encoded(
        "adts", "aac", 44100, np.stack([left, -left]))
    wave = load_audio(data).numpy()
    assert rms(wave[int(0.2 * RATE) : int(0.8 * RATE)]) > 0.25
    assert rms(wave[int(1.2 * RATE) : int(1.8 * RATE)]) < 0.01


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg tool is not installed")
@pytest.mark.parametrize(("fmt", "codec", "rate1", "rate2"), JOINED[:4])
def test_length_matches_the_ffmpeg_tool(tmp_path, fmt, codec, rate1, rate2):
    stereo = tone(880, 1.0, rate2)
    path = tmp_path / f"joined.{fmt}"
    path.write_bytes(encoded(fmt, codec, rate1, tone(440, 1.0, rate1)[None])
                     + encoded(fmt, codec, rate2, np.stack([stereo, stereo])))
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(RATE), "-f", "f32le", "-"],
                         capture_output=True, check=True).stdout
    reference = np.frombuffer(raw, np.float32)
    wave = load_audio(path).numpy()
    assert abs(len(wave) - len(reference)) <= RATE // 100  # within 10 ms (two resamplers round differently)


@pytest.mark.parametrize("name", ["monostereo.aac", "monostereo_noid3.mp3"])
def test_shared_layout_change_cases(name):
    path = CASES / name
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    wave = load_audio(path).numpy()
    assert 4.0 < len(wave) / RATE < 4.3  # the `ffmpeg` tool decodes 4.18 s (92160 samples at 22.05 kHz)
    assert np.isfinite(wave).all() and rms(wave) > 0.01


# ----------------------------------------------------------------------------------------------------------------
# Video: a longer audio track in the container; raw elementary streams without timestamps

WIDTH, HEIGHT, BITS = 64, 48, 8
STRIPE = WIDTH // BITS


def striped(index: int) -> np.ndarray:
    """Frame `index` as 8 black/white vertical stripes (bit b of the index = stripe b): survives lossy coding."""
    bits = (index >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, STRIPE).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (HEIGHT, WIDTH, 3)))


def index_of(image) -> int:
    centres = np.asarray(image.convert("L"))[HEIGHT // 2, STRIPE // 2 :: STRIPE]
    return sum(int(value > 128) << bit for bit, value in enumerate(centres))


def write_av(path: Path, fmt: str, vcodec: str, fps: int, n_frames: int, acodec: str | None = None,
             audio_s: float = 0.0) -> Path:
    """`n_frames` striped frames at `fps`, plus `audio_s` seconds of quiet tone when `acodec` is given."""
    with av.open(str(path), "w", format=fmt) as container:
        video = container.add_stream(vcodec, rate=fps)
        video.width, video.height = WIDTH, HEIGHT
        video.pix_fmt = "yuvj420p" if vcodec == "mjpeg" else "yuv420p"
        video.codec_context.time_base = Fraction(1, fps)
        audio = container.add_stream(acodec, rate=48000, layout="mono") if acodec else None
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(striped(i), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            size = audio.codec_context.frame_size or 1024
            pcm = tone(220, audio_s, 48000, 0.1)[None]
            for pts in range(0, pcm.shape[1], size):
                frame = av.AudioFrame.from_ndarray(pcm[:, pts : pts + size], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 48000, pts, Fraction(1, 48000)
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode(None):
                container.mux(packet)
    return path


@pytest.mark.parametrize(
    ("fmt", "suffix", "vcodec", "acodec"),
    [
        ("matroska", "mkv", "libx264", "libopus"),
        ("matroska", "mkv", "mpeg4", "aac"),
        ("webm", "webm", "libvpx-vp9", "libopus"),
        ("webm", "webm", "libvpx", "libopus"),
        ("mp4", "mp4", "libx264", "aac"),
        ("mov", "mov", "mjpeg", "aac"),
        ("nut", "nut", "mpeg4", "mp2"),
    ],
)
def test_video_span_is_the_video_streams_not_a_longer_audio_tracks(tmp_path, fmt, suffix, vcodec, acodec):
    path = write_av(tmp_path / f"longaudio.{suffix}", fmt, vcodec, fps=20, n_frames=40, acodec=acodec,
                    audio_s=30.0)
    with av.open(str(path)) as container:
        assert container.duration / av.time_base > 25  # the container's duration is the audio's
    clip = decode_video(path)
    assert clip.timestamps == [k / 4 for k in range(8)]  # 2 s of video: 4 frames a second
    assert [index_of(frame) for frame in clip.frames] == [5 * k for k in range(8)]


@pytest.mark.parametrize(
    ("fmt", "codec", "fps", "n_frames", "expected"),
    [
        ("h264", "libx264", 25, 50, 8),  # the shared case: 2 s at 25 fps
        ("h264", "libx264", 10, 60, 6),  # 6 s at the rate in the stream's VUI (the demuxer assumes 25)
        ("hevc", "libx265", 24, 48, 8),
        ("hevc", "libx265", 10, 30, 12),
        ("mpeg2video", "mpeg2video", 10, 20, 8),
        ("m4v", "mpeg4", 10, 20, 8),
        ("mjpeg", "mjpeg", 25, 50, 8),  # MJPEG states no rate: FFmpeg's 25 fps, as its tool plays it
    ],
)
def test_raw_streams_are_timed_by_their_frame_rate(tmp_path, fmt, codec, fps, n_frames, expected):
    path = write_av(tmp_path / f"raw.{fmt}", fmt, codec, fps=fps, n_frames=n_frames)
    clip = decode_video(path)
    duration = n_frames / fps
    assert len(clip.timestamps) == expected
    # Each kept frame is the one shown at its sampling time (at most half a frame off).
    for time, frame in zip(clip.timestamps, clip.frames, strict=True):
        assert abs(index_of(frame) - time * fps) <= 0.5 + 1e-9
    assert clip.timestamps[-1] < duration


def test_raw_stream_from_bytes(tmp_path):
    data = write_av(tmp_path / "raw.h264", "h264", "libx264", fps=25, n_frames=50).read_bytes()
    clip = decode_video(data)
    assert clip.timestamps == [k / 4 for k in range(8)]


@pytest.mark.parametrize(("name", "frames"), [("longaudio.mkv", 8), ("raw.h264", 8)])
def test_shared_video_cases(name, frames):
    path = CASES / name
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    clip = decode_video(path)
    assert clip.timestamps == [k / 4 for k in range(frames)]
    assert len(clip.frames) == frames
