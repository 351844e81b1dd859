"""Small media files in real encodings for the data and eval tests (PyAV encoders, Pillow)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

RATE = 16000


def ramp_tone(seconds: float, rate: int = RATE) -> np.ndarray:
    """A 440 Hz tone whose amplitude grows linearly from 0 to 0.5: the loudness says where in the file a cut is."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t) * (t / seconds)).astype(np.float32)


def write_audio(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    """Encodes by the suffix: .flac (FLAC), .opus (Opus in Ogg, 48 kHz), .wav (PCM16)."""
    codec = {".flac": "flac", ".opus": "libopus", ".wav": "pcm_s16le"}[path.suffix]
    if codec == "libopus":
        samples = np.interp(np.arange(len(samples) * 3) / 3, np.arange(len(samples)), samples)
        rate = 48000
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        if codec == "libopus":
            stream.format = "s16"
        frame = av.AudioFrame.from_ndarray((np.clip(samples, -1, 1) * 32767).astype(np.int16)[None],
                                           format="s16", layout="mono")
        frame.rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=colour)
    image.save(path)
    return path


def write_video(path: Path, frames: int = 8, fps: int = 8, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            pixels = np.full((size, size, 3), 40 + k * 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
