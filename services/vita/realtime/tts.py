"""Spoken answers: text to PCM16 speech behind a one-method interface, and the text <-> audio-time bookkeeping.

An answer streams as text; `SentenceSplitter` cuts it into sentences as they complete, each is synthesized on its own
(the first audio goes out after the first sentence, not after the whole answer) and `Spoken` records which text
each stretch of audio says. When the client reports how much it played (`conversation.item.truncate`), `played_text`
maps that audio position back to the text the listener heard: whole sentences exactly, and within a sentence the
words whose share of its characters had been reached (espeak-ng reports no word timings).

The default voice is the local `espeak-ng` (no download); a neural TTS plugs in with the same `synthesize`.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol

from vita.errors import VitaError

SAMPLE_RATE = 24_000  # the Realtime API's PCM rate, both ways

# OpenAI's voice names, each mapped to an espeak-ng voice (any other name is taken as an espeak-ng voice itself).
VOICES = {
    "alloy": "en", "ash": "en-us+m3", "ballad": "en-gb", "coral": "en-us+f2", "echo": "en+m7",
    "sage": "en-us+f3", "shimmer": "en+f4", "verse": "en-us+m4", "marin": "en-us+f2", "cedar": "en-us+m2",
}
DEFAULT_VOICE = "alloy"
_WORDS_PER_MINUTE = 160  # espeak-ng's default speed, at speed 1.0


class TTS(Protocol):
    sample_rate: int

    def synthesize(self, text: str) -> bytes:
        """`text` spoken: mono little-endian PCM16 at `sample_rate` Hz (blocking; callers use a thread).

        Raises VitaError when the engine fails.
        """
        ...


class EspeakTTS:
    """espeak-ng through its command line, resampled from its 22.05 kHz to `sample_rate` with libswresample.

    The voice is checked when the engine is made (a session.update is refused then), not when the first answer is
    spoken: it must be one espeak-ng has (`espeak_voice_exists`).
    """

    def __init__(self, voice: str = DEFAULT_VOICE, speed: float = 1.0, sample_rate: int = SAMPLE_RATE) -> None:
        if shutil.which("espeak-ng") is None:
            raise VitaError("espeak-ng is missing: install it (`make setup`) for spoken answers")
        name = VOICES.get(voice, voice)
        if not espeak_voice_exists(name):
            raise VitaError(f"unknown voice {voice!r}: not one of the OpenAI voice names ({', '.join(VOICES)}) nor "
                            "an espeak-ng voice (`espeak-ng --voices`, optionally +variant from "
                            "`espeak-ng --voices=variant`)")
        self.voice, self.speed, self.sample_rate = name, speed, sample_rate

    def synthesize(self, text: str) -> bytes:
        words_per_minute = str(max(80, min(450, round(_WORDS_PER_MINUTE * self.speed))))
        command = ["espeak-ng", "-v", self.voice, "-s", words_per_minute, "--stdout", text]
        try:
            result = subprocess.run(command, capture_output=True, check=False, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:  # gone since start-up, or hung
            raise VitaError(f"espeak-ng failed (voice {self.voice!r}): {e}") from None
        if result.returncode != 0 or not result.stdout:
            raise VitaError(f"espeak-ng failed (voice {self.voice!r}): "
                            f"{result.stderr.decode(errors='replace').strip() or 'no audio'}")
        try:
            return resample_wav(result.stdout, self.sample_rate)
        except Exception as e:  # a WAV av cannot read: the engine failed, whatever av raises
            raise VitaError(f"espeak-ng failed (voice {self.voice!r}): its audio could not be read: {e}") from None


_VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}(/[A-Za-z0-9_-]{1,40})?")


def espeak_voice_exists(name: str) -> bool:
    """Whether espeak-ng speaks with `name`: a voice of `espeak-ng --voices` (its language, as `en-us`, or its file,
    as `gmw/en` or `en`; espeak-ng also takes a tag of a language it has, as `de-de`), optionally `+variant` of
    `espeak-ng --voices=variant` (as `en-us+f2`).

    espeak-ng silently ignores a variant it does not have, and a voice it lists may still fail (an MBROLA voice
    without its data): the lists are read once, and a voice whose language is on them is tried (a short synthesis,
    remembered).
    """
    base, plus, variant = name.partition("+")
    if not _VOICE_NAME.fullmatch(base) or (plus and variant not in _espeak_variants()):
        return False
    base = base.lower()
    if base not in _espeak_voices() and base.split("-", 1)[0] not in _espeak_voices():
        return False
    return _espeak_speaks(base)


def _espeak_list(kind: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(language, file, other languages) of each voice `espeak-ng --voices[=kind]` lists."""
    command = ["espeak-ng", f"--voices={kind}" if kind else "--voices"]
    try:
        out = subprocess.run(command, capture_output=True, check=False, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.decode(errors="replace").splitlines()[1:]:  # Pty Language Age/Gender VoiceName File Other
        fields = line.split()
        if len(fields) >= 5:
            rows.append((fields[1], fields[4], re.findall(r"\(([^ ()]+) \d+\)", " ".join(fields[5:]))))
    return rows


@functools.cache
def _espeak_voices() -> frozenset[str]:
    """What `-v` takes, lower-cased (espeak-ng matches voices case-insensitively): languages (the other languages a
    voice speaks too, as `zh`), files and the files' last component."""
    names = set()
    for language, path, others in _espeak_list():
        names.update((language.lower(), path.lower(), path.rsplit("/", 1)[-1].lower(), *map(str.lower, others)))
    return frozenset(names)


@functools.cache
def _espeak_variants() -> frozenset[str]:
    """Variant names (`m3`, `f2`, `Alex`, ...), as espeak-ng matches them: the file names, case and all."""
    return frozenset(path.rsplit("/", 1)[-1] for _, path, _ in _espeak_list("variant"))


@functools.lru_cache(maxsize=1024)
def _espeak_speaks(voice: str) -> bool:
    try:
        result = subprocess.run(["espeak-ng", "-v", voice, "--stdout", "a"], capture_output=True, check=False,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and len(result.stdout) > 44 and b"does not exist" not in result.stderr


def resample_wav(wav: bytes, rate: int) -> bytes:
    """A WAV file's first channel as PCM16 mono at `rate`."""
    import av

    with av.open(io.BytesIO(wav)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
        frames += resampler.resample(None)
    return b"".join(bytes(f.planes[0])[:f.samples * 2] for f in frames)


def resample_pcm16(pcm: bytes, rate: int, new_rate: int) -> bytes:
    """Mono PCM16 from `rate` to `new_rate` (libswresample), e.g. the spoken answer at the microphone's rate."""
    if rate == new_rate or not pcm:
        return pcm
    import av
    import numpy as np

    samples = np.frombuffer(pcm[:len(pcm) - len(pcm) % 2], dtype="<i2").reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="s16", layout="mono", rate=new_rate)
    frames = resampler.resample(frame) + resampler.resample(None)
    return b"".join(bytes(f.planes[0])[:f.samples * 2] for f in frames)


def make_tts(name: str, voice: str = DEFAULT_VOICE, speed: float = 1.0) -> TTS:
    """The TTS engine a session speaks with; `name` is the `--tts` flag of `vita serve realtime`."""
    if name == "espeak":
        return EspeakTTS(voice, speed)
    raise VitaError(f"unknown TTS engine {name!r}; available: espeak")


# --------------------------------------------------------------------------------------------------------------------
# Text <-> audio time

# A sentence ends at . ! ? ; (then closing quotes or brackets) followed by whitespace, or at CJK full stops.
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s+|[。！？；]\s*")
_WORD = re.compile(r"[\u3400-\u9fff]|[^\s\u3400-\u9fff]+")


class SentenceSplitter:
    """Cuts streamed text into sentences; the pieces joined are exactly the text pushed (whitespace included)."""

    def __init__(self, max_chars: int = 200) -> None:
        self.max_chars = max_chars
        self._buffer = ""

    def push(self, text: str) -> list[str]:
        """Sentences completed by `text`; a run-on longer than `max_chars` is cut at its last space."""
        self._buffer += text
        pieces = []
        while True:
            match = _SENTENCE_END.search(self._buffer)
            if match is not None:
                cut = match.end()
            elif len(self._buffer) > self.max_chars:
                space = self._buffer.rfind(" ", 0, self.max_chars)
                cut = space + 1 if space > 0 else self.max_chars
            else:
                return pieces
            pieces.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]

    def flush(self) -> str:
        """The rest of the text, at the end of the answer."""
        rest, self._buffer = self._buffer, ""
        return rest


@dataclass(frozen=True)
class Spoken:
    """A piece of the transcript and the stretch of the answer's audio that says it, in ms from its start."""

    text: str
    start_ms: float
    end_ms: float


def played_text(spoken: list[Spoken], audio_end_ms: float) -> str:
    """The transcript heard once `audio_end_ms` of the answer had played: a prefix of the pieces joined."""
    out = []
    for piece in spoken:
        if audio_end_ms >= piece.end_ms:
            out.append(piece.text)
            continue
        if audio_end_ms > piece.start_ms:
            out.append(_whole_words(piece.text, (audio_end_ms - piece.start_ms) / (piece.end_ms - piece.start_ms)))
        break
    return "".join(out)


def _whole_words(text: str, fraction: float) -> str:
    """The words of `text` that end within `fraction` of its characters (a CJK character counts as a word)."""
    limit, cut = fraction * len(text.rstrip()), 0
    for match in _WORD.finditer(text):
        if match.end() > limit:
            break
        cut = match.end()
    return text[:cut]
