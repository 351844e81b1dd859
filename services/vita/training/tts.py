"""Text to speech behind an interface: stage 3 turns typed questions into spoken ones with whatever `TTS` it is given.

Locally that is `EspeakTTS` (the `espeak-ng` binary: no download, many languages, deterministic output); a cluster
run can pass a neural TTS with the same one-method interface.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vita.errors import VitaError

SAMPLE_RATE = 16000


class TTS(Protocol):
    def synthesize(self, text: str, voice: str) -> np.ndarray:
        """`text` spoken in `voice`: 1-D float32 samples in [-1, 1] at 16 kHz."""
        ...


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: language/variant (`-v`), pitch 0-99 (`-p`) and words per minute (`-s`)."""

    name: str
    language: str = "en"
    pitch: int = 50
    speed: int = 160

    def args(self) -> list[str]:
        return ["-v", self.name, "-p", str(self.pitch), "-s", str(self.speed)]


# Named voices the curriculum draws from; `language` is the ISO code of what the voice should be given to say.
VOICES: dict[str, Voice] = {
    "en-m": Voice("en-us", "en", 50, 160),
    "en-m-slow": Voice("en-us+m3", "en", 40, 130),
    "en-f": Voice("en-us+f2", "en", 60, 170),
    "en-gb": Voice("en-gb", "en", 45, 150),
    "en-f-fast": Voice("en+f3", "en", 90, 200),
    "en-m-low": Voice("en+m7", "en", 20, 175),
    "de": Voice("de+f2", "de", 90, 175),
    "fr": Voice("fr+f2", "fr", 80, 180),
    "zh": Voice("cmn", "zh", 50, 150),
    "zh-f": Voice("cmn+f3", "zh", 70, 170),
}


class EspeakTTS:
    """espeak-ng, resampled to 16 kHz; results are cached per (text, voice) for the life of the object."""

    def __init__(self, voices: dict[str, Voice] | None = None) -> None:
        if shutil.which("espeak-ng") is None:
            raise VitaError("espeak-ng is missing: install it (`make setup`) to make synthetic speech")
        self.voices = dict(VOICES if voices is None else voices)
        self._cached = functools.lru_cache(maxsize=4096)(self._run)

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        if voice not in self.voices:
            raise ValueError(f"unknown voice {voice!r}; choose one of {', '.join(sorted(self.voices))}")
        return self._cached(text, voice).copy()

    def _run(self, text: str, voice: str) -> np.ndarray:
        command = ["espeak-ng", *self.voices[voice].args(), "--stdout", text]
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0 or not result.stdout:
            raise VitaError(f"espeak-ng failed for voice {voice!r}: {result.stderr.decode(errors='replace').strip()}")
        samples = _to_16k(result.stdout)  # espeak writes 22.05 kHz WAV
        samples.setflags(write=False)
        return samples


def _to_16k(wav: bytes) -> np.ndarray:
    """Decodes and resamples with libswresample (PyAV): no torch threads in the curriculum's render workers."""
    import av

    with av.open(io.BytesIO(wav)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.clip(np.concatenate(chunks), -1.0, 1.0).astype(np.float32)
