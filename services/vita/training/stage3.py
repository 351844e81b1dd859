"""Stage 3 data: spoken versions of questions, and noisy-audio negatives that teach the model to stay silent.

`SpokenTransform` rewrites a sample as it is drawn (seeded by the sample's place in the epoch, so a resumed run and
every rank make the same choice):

- with probability `p_negative` it becomes a negative: the last question is replaced by audio that is not for
  the assistant (noise, someone else's chatter in another voice or language, or with `p_asked_aside` the question
  itself asked by someone else, in a `negative_voices` voice) and the answer by nothing, so the target is `<2>`
  then end-of-sequence;
- otherwise, with probability `p_spoken`, the last question is replaced by its spoken version (`TTS.synthesize`,
  espeak-ng locally) and its answer starts with `<1>`;
- otherwise the typed question stays and its answer starts with `<3>`.

The system prompt follows the data type and whether the question is spoken (`ExampleEncoder`), one per case.
Synthesised audio is written once to `cache_dir` under a name derived from its content description, as WAV.
The duplex fine-tune (`vita.training.duplex`) can hand its samples to the same stage through `Trainer`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vita.processing.audio import write_wav
from vita.processing.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from vita.training import speech
from vita.training.config import SpokenConfig
from vita.training.sample import Sample
from vita.training.vocab import CJK

if TYPE_CHECKING:
    from vita.training.tts import TTS

SPEAKABLE_KINDS = ("text", "image", "video")
# Chatter that is not for the assistant (training phrases only): language -> voices that speak it.
CHATTER_VOICES = {"de": ("de",), "fr": ("fr",)}
_PLACEHOLDERS = re.compile("|".join(re.escape(p) for p in (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)))


def default_tts() -> TTS:
    from vita.training.tts import EspeakTTS

    return EspeakTTS()


class SpokenTransform:
    def __init__(self, config: SpokenConfig, tts: TTS, cache_dir: str | Path, seed: int = 0) -> None:
        self.config = config
        self.tts = tts
        self.cache_dir = Path(cache_dir)
        self.seed = seed

    def __call__(self, sample: Sample, epoch: int, index: int) -> Sample:
        if sample.kind not in SPEAKABLE_KINDS or sample.state == "<2>" or len(sample.conversation) < 2:
            return sample
        question = sample.conversation[-2]
        if question["role"] != "user" or AUDIO_TOKEN in question["content"]:
            return sample
        rng = np.random.default_rng([self.seed, epoch, index, 3])
        if rng.random() < self.config.p_negative:
            return self.negative(sample, rng)
        if rng.random() < self.config.p_spoken:
            return self.spoken(sample, rng)
        return sample

    def spoken(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """The last question as speech (its image/video placeholders kept), answered after `<1>`."""
        media, text = _split(sample.conversation[-2]["content"])
        if not text:
            return sample
        voices = self.config.chinese_voices if CJK.search(text) else self.config.voices
        if not voices:
            return sample
        voice = voices[int(rng.integers(len(voices)))]
        wav = self._cached(f"tts|{voice}|{text}", lambda: self.tts.synthesize(text, voice))
        return _replace_last_question(sample, media + AUDIO_TOKEN, wav, sample.conversation[-1]["content"], "<1>")

    def negative(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """The last question replaced by noise or chatter; the answer is nothing (`<2>` then eos)."""
        media, question = _split(sample.conversation[-2]["content"])
        if rng.random() < self.config.p_noise:
            kind = speech.NOISE_KINDS[int(rng.integers(len(speech.NOISE_KINDS)))]
            seconds = round(float(rng.uniform(0.8, 2.5)), 2)
            level = round(float(rng.uniform(0.05, 0.5)), 3)
            seed = int(rng.integers(1 << 30))
            wav = self._cached(f"noise|{kind}|{seconds}|{level}|{seed}",
                               lambda: speech.noise(kind, int(seconds * speech.SAMPLE_RATE), seed=seed, level=level))
        else:
            # Drawn only when asked for, so that runs without it draw what they drew before.
            aside = self.config.p_asked_aside > 0 and bool(question) and not CJK.search(question)
            if aside and rng.random() < self.config.p_asked_aside:
                text, voices = question, tuple(self.config.negative_voices)
            else:
                text, language = speech.OTHER_TRAIN[int(rng.integers(len(speech.OTHER_TRAIN)))]
                voices = CHATTER_VOICES.get(language, tuple(self.config.negative_voices))
            voice = voices[int(rng.integers(len(voices)))]
            wav = self._cached(f"tts|{voice}|{text}", lambda: self.tts.synthesize(text, voice))
        return _replace_last_question(sample, media + AUDIO_TOKEN, wav, "", "<2>")

    def _cached(self, key: str, make) -> str:
        path = self.cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.wav"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            write_wav(tmp, np.asarray(make(), dtype=np.float32))
            os.replace(tmp, path)
        return str(path)


def _split(content: str) -> tuple[str, str]:
    """(the image/video placeholders of a user turn, each followed by a newline; its text without placeholders)."""
    media = "".join(p + "\n" for p in _PLACEHOLDERS.findall(content) if p != AUDIO_TOKEN)
    return media, _PLACEHOLDERS.sub("", content).strip()


def _replace_last_question(sample: Sample, content: str, wav: str, answer: str, state: str) -> Sample:
    conversation = [dict(t) for t in sample.conversation[:-2]]
    conversation += [{"role": "user", "content": content}, {"role": "bot", "content": answer}]
    return Sample(kind=sample.kind, conversation=conversation, images=list(sample.images), video=sample.video,
                  audio=[*sample.audio, wav], state=state, meta=dict(sample.meta))
