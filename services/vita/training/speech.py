"""Synthetic speech for the duplex stage: questions for the assistant, talk that is not, and noise.

Everything is made on the spot, with no download: speech by the local `espeak-ng`, noise by numpy.

- **Query speech**: English questions addressed to the assistant, in espeak-ng's default English voice
  (the voice of the test suite's `espeak` fixture).
- **Other speech**: people talking to someone else, in other voices: a high-pitched fast English voice,
  German and French. Silero VAD hears all of it as speech, so the duplex path really has to judge it.
- **Noise**: white, pink and brown noise bursts and mains hum, which a VAD may or may not let through.

Every phrase list has a training part and a held-out part that training never sees.
All clips are 16 kHz mono float32 numpy arrays in [-1, 1]; espeak output is cached per (text, voice) in the process.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vita.errors import VitaError
from vita.processing.audio import load_audio
from vita.processing.vad import VADConfig

SAMPLE_RATE = 16000

QUERY_TRAIN = (
    "what is in this picture", "tell me about the weather today", "how many cups are on the table",
    "what colour is the square", "can you describe the image", "what time is it now",
    "please read the text for me", "what is the capital of France", "how far is the moon from the earth",
    "what animal is in the video", "can you help me with my homework", "what is two plus three",
    "tell me a short story", "what should I cook for dinner", "is it going to rain tomorrow",
    "what is the name of this song", "how do I get to the station", "who painted this picture",
    "what is the person holding", "can you translate this sentence", "VITA what do you see",
    "where is the blue circle",
)
QUERY_HELD_OUT = (
    "what is on the table", "describe what you see", "how many people are in the room",
    "what colour is the car", "tell me a funny joke please", "what is the weather like in Beijing",
    "can you count the apples", "what is the dog doing", "where is the red ball", "what does this sign say",
)

# (text, voice): talk meant for someone else. The voices are espeak-ng voice names plus pitch and speed.
OTHER_TRAIN = (
    ("honey did you feed the cat", "en-high"), ("I will be home around six", "en-high"),
    ("pass me the salt please", "en-high"), ("let us go for a walk later", "en-high"),
    ("did you see the game last night", "en-high"), ("mom I cannot find my shoes", "en-high"),
    ("we need to buy more milk", "en-high"), ("the meeting was moved to Monday", "en-high"),
    ("wo ist mein Schlüssel", "de"), ("ich komme gleich wieder", "de"), ("das Essen ist fertig", "de"),
    ("hast du den Bus verpasst", "de"), ("morgen fahren wir nach Berlin", "de"),
    ("on se voit demain matin", "fr"), ("tu as vu mon téléphone", "fr"), ("il fait beau aujourd'hui", "fr"),
    ("je vais au marché", "fr"), ("ferme la porte s'il te plaît", "fr"),
)
OTHER_HELD_OUT = (
    ("can you pick up the kids after school", "en-high"), ("the dog really needs a bath today", "en-high"),
    ("I left my keys in the car", "en-high"), ("see you at the office tomorrow", "en-high"),
    ("kannst du mir bitte helfen", "de"), ("der Zug hat Verspätung", "de"), ("wir sehen uns am Abend", "de"),
    ("nous allons au cinéma ce soir", "fr"), ("le café est trop chaud", "fr"), ("où sont les enfants ce matin", "fr"),
)
NOISE_KINDS = ("white", "pink", "brown", "hum")

# espeak-ng arguments per voice name; "query" is the default English voice at the default speed.
VOICES: dict[str, tuple[str, ...]] = {
    "query": ("-s", "160"),
    "en-high": ("-v", "en+f3", "-p", "90", "-s", "200"),
    "de": ("-v", "de+f2", "-p", "90", "-s", "175"),
    "fr": ("-v", "fr+f2", "-p", "80", "-s", "180"),
    # Not used in training: a low, brisk voice the fine-tune never heard (the turn-taking tests and `vita eval
    # duplex`: barge-in words like "stop" at 260 words a minute last under 0.25 s).
    "brisk": ("-v", "en+m3", "-p", "20", "-s", "260"),
}


@dataclass(frozen=True, eq=False)
class Clip:
    """One clip and what the assistant should make of it."""

    samples: np.ndarray  # 16 kHz mono float32
    query: bool  # True: a question for the assistant (`<1>`); False: ignore it (`<2>`)
    kind: str  # "query", "other" or "noise"
    text: str = ""  # what is said, or the noise kind


def espeak(text: str, voice: str = "query") -> np.ndarray:
    """`text` spoken by espeak-ng in one of `VOICES`, at 16 kHz (cached: the same call returns the same array)."""
    return _espeak(text, voice).copy()


@functools.cache
def _espeak(text: str, voice: str, ssml: bool = False) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        raise VitaError("espeak-ng is missing: install it (`make setup`) to make synthetic speech")
    try:
        args = VOICES[voice]
    except KeyError:
        raise ValueError(f"unknown voice {voice!r}; choose one of {sorted(VOICES)}") from None
    wav = subprocess.run(["espeak-ng", *args, *(["-m"] if ssml else []), "--stdout", text], check=True,
                         capture_output=True).stdout
    samples = load_audio(wav).numpy()  # espeak writes 22.05 kHz; load_audio resamples to 16 kHz
    samples.setflags(write=False)
    return samples


def hesitant(text: str, after_words: int, pause_s: float, voice: str = "query") -> np.ndarray:
    """`text` spoken in one breath but for a pause of `pause_s` after its first `after_words` words (SSML break):
    the intonation runs on across the pause as a speaker's who hesitates mid-sentence, unlike two clips glued."""
    words = text.split()
    if not 0 < after_words < len(words):
        raise ValueError(f"after_words must be 1..{len(words) - 1} for {text!r}; got {after_words}")
    ssml = f"{' '.join(words[:after_words])} <break time=\"{round(pause_s * 1000)}ms\"/> {' '.join(words[after_words:])}"
    return _espeak(ssml, voice, ssml=True).copy()


def prefetch(items: Iterable[tuple[str, str]], workers: int = 4) -> None:
    """Synthesises many (text, voice) pairs in parallel so later `espeak` calls hit the cache."""
    todo = [item for item in dict.fromkeys(items)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda item: _espeak(*item), todo))


def noise(kind: str, samples: int, *, seed: int = 0, level: float = 0.3) -> np.ndarray:
    """`samples` (at least 1) of white, pink (1/f), brown (1/f^2) noise or mains hum (50/60 Hz and harmonics):
    16 kHz float32, peak `level`, a function of its arguments. Raises ValueError for another `kind`.

    The length is in samples, not seconds, so a caller that adds noise to a clip asks for exactly `len(clip)`.
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(samples))
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice([50.0, 60.0])
        x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi))
                for k in range(1, 6))
    elif kind in ("white", "pink", "brown"):
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        slope = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]  # amplitude ~ 1 / f^slope
        spectrum[1:] /= freqs[1:] ** slope
        spectrum[0] = 0
        x = np.fft.irfft(spectrum, n)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    x = np.asarray(x, dtype=np.float64)
    return (level * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def query_clip(text: str) -> Clip:
    return Clip(espeak(text, "query"), True, "query", text)


def other_clip(text: str, voice: str) -> Clip:
    return Clip(espeak(text, voice), False, "other", text)


def noise_clip(kind: str, *, seconds: float = 2.0, seed: int = 0) -> Clip:
    return Clip(noise(kind, int(seconds * SAMPLE_RATE), seed=seed), False, "noise", kind)


def held_out_clips(n_noise: int = 5) -> list[Clip]:
    """The evaluation set: every held-out query and other-speech phrase, plus `n_noise` noise bursts."""
    prefetch([(t, "query") for t in QUERY_HELD_OUT] + list(OTHER_HELD_OUT))
    clips = [query_clip(t) for t in QUERY_HELD_OUT]
    clips += [other_clip(t, v) for t, v in OTHER_HELD_OUT]
    clips += [noise_clip(NOISE_KINDS[k % len(NOISE_KINDS)], seconds=1.0 + 0.4 * k, seed=10_000 + k)
              for k in range(n_noise)]
    return clips


def augment(samples: np.ndarray, rng: np.random.Generator, *, crop: float = 0.35) -> np.ndarray:
    """What a VAD segment may look like: a little silence around, another gain, faint background noise,
    and sometimes only the first part of the speech (an early judgement while the user is still talking): from
    the VAD's first partial on (`VADConfig.partial_every_ms`, 0.6 s) to 90% of the clip. Crops of 50-90% only
    left the first partial of a short question judged noise on some CPUs (tiny-duplex-v5)."""
    x = np.asarray(samples, dtype=np.float32)
    shortest = VADConfig.partial_every_ms * SAMPLE_RATE // 1000
    if rng.random() < crop and len(x) * 0.9 > shortest:
        x = x[: int(rng.uniform(shortest, len(x) * 0.9))]
    pad = (rng.uniform(0, 0.25, size=2) * SAMPLE_RATE).astype(int)
    x = np.concatenate([np.zeros(pad[0], np.float32), x, np.zeros(pad[1], np.float32)])
    x = x * rng.uniform(0.4, 1.2)
    if rng.random() < 0.3:
        x = x + rng.uniform(0.001, 0.01) * rng.standard_normal(len(x)).astype(np.float32)
    return np.clip(x, -1, 1).astype(np.float32)
