"""A stand-in for the pretrained audio encoder, for tiny runs: teach the tiny encoder which words it hears.

At full size VITA's audio encoder learns words in stage 2 from ~20,000 hours of ASR (WenetSpeech, GigaSpeech), so
what it hands the LLM carries them, and stage 3 teaches the LLM to answer them and to stay silent when the speech
is not meant for it. The tiny stage 2 runs 20 steps, no pretrained tiny encoder can be downloaded here, and a random
(or briefly ASR-aligned) tiny encoder does not carry words: stage 3 tiny could not learn which speech to answer, because the
curriculum's questions and its chatter come in close English voices and only the words tell them apart
(docs/training.md, "Staying silent"). This step gives the tiny encoder what ASR pretraining gives the real one,
on recordings of its own: it speaks sentences with the curriculum's TTS and voices (`curriculum.speech_clip`: the
same silences, gains and background noise) and trains the encoder with four heads on every output frame:

- `words`: which words of the pretraining vocabulary the utterance holds (a softmax over the vocabulary against
  the bag of its words), the keyword-spotting view of ASR; each frame tells the whole utterance, as the vision
  stand-in's tokens tell the whole picture, so the LLM can read any of them;
- `intent`: what an English sentence asks (a colour, a shape, a count, a word, a direction, a sum, a fact) or that
  it asks nothing (a statement), the spoken-language-understanding view;
- `language`: English, German, French, Chinese, or no speech (noise);
- `speaker`: whether the voice is one of the curriculum's query voices (the person the assistant serves) or another's,
  so that the frames keep who speaks as well as what is said (`speaker_head`, the recipe since the curriculum's aside
  questions; off, the three heads before: docs/training.md, "Who speaks").

The sentences are the curriculum's question wordings (spoken questions share them between its splits), sums of
its *training* pairs only, its facts, sentences from its ASR templates (some of which its held-out ASR split may
hold too: its WER is reported, not a target), and everyday sentences of this module's own in the four languages;
never the curriculum's chatter, so neither split's chatter is heard here. The heads are dropped; the
encoder (its global CMVN included, fitted on these recordings first, as WeNet does) is written in WeNet's
parameter names, which is what a stage's `init.audio_encoder` loads.

    vita pretrain-audio --preset tiny-112 --output .artifacts/train-tiny/audio-encoder

Writes `model.safetensors`, `config.json` (its AudioConfig and these settings), `metrics.jsonl` (loss per logged
step) and `probe.json` (held-out word recall, intent, language and speaker accuracy on recordings from another
seed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita.errors import InvalidInputError
from vita.model.audio import AudioEncoder, compute_cmvn_stats, length_mask
from vita.model.checkpoint import load_pretrained_encoder, save_sharded
from vita.model.config import AudioConfig, VitaConfig
from vita.processing.audio import audio_features
from vita.training import curriculum as cur
from vita.training.stand_in import reused_summary, train_loop
from vita.training.tts import TTS, EspeakTTS

log = logging.getLogger("vita.training")

VERSION = 3  # bump when the recordings or the objective change, so a saved encoder is not reused
LANGUAGES = ("en", "de", "fr", "zh", "none")
INTENTS = ("colour", "shape", "count", "word", "direction", "sum", "fact", "statement")
IGNORE = -100  # a clip without English has no intent
# Everyday sentences of this module's own (not the curriculum's chatter): what the encoder hears besides questions.
EVERYDAY = {
    "en": ("the train leaves at nine", "I like this song a lot", "we should paint the kitchen", "it looks like rain",
           "my phone is almost out of battery", "the soup needs more salt", "he forgot his umbrella again",
           "let me know when you are ready", "the shop closes early on sunday", "she plays the piano every day",
           "open the window please", "our neighbours have a new puppy", "I will call you back later",
           "the children are asleep upstairs", "this coffee is really good", "we are out of bread"),
    "de": ("heute regnet es den ganzen Tag", "ich habe keine Zeit", "das Auto ist in der Werkstatt",
           "wir gehen morgen schwimmen", "mein Bruder wohnt in Hamburg", "die Katze schläft auf dem Sofa"),
    "fr": ("le train part à neuf heures", "j'aime beaucoup cette chanson", "il pleut depuis ce matin",
           "ma sœur habite à Lyon", "le chat dort sur le canapé", "nous mangeons à midi"),
    "zh": ("今天下雨了", "我喜欢这首歌", "火车九点出发", "我妹妹住在上海", "猫在沙发上睡觉", "我们中午吃饭"),
}
ENGLISH_VOICES = (*cur.QUERY_VOICES, *cur.CHATTER_VOICES["en"])


@dataclass
class AudioPretrainConfig:
    """What `pretrain_audio_encoder` does; the defaults are `make train-tiny`'s."""

    preset: str = "tiny-112"
    seed: int = 0  # the encoder's random init (torch.manual_seed), as stage 1's init.seed
    data_seed: int = 2_000_003  # the recordings' seed: not the curriculum's (0)
    clips: int = 2400  # recorded once and drawn from at random
    noise_share: float = 0.08  # clips of noise alone (language "none", no words)
    steps: int = 700
    batch_size: int = 16  # 32 was no better per second: its activations cross glibc's mmap threshold (page faults)
    lr: float = 2e-3  # peak of a one-cycle schedule (10% warmup, cosine down)
    weight_decay: float = 0.01
    probe_clips: int = 300  # scored after training, from data_seed + 1
    threads: int | None = None
    log_every: int = 25
    # A fourth head: whether the voice is one of the curriculum's query voices (the person the assistant serves) or
    # another's, so that the frames keep who speaks as well as what is said (docs/training.md, "Who speaks"; the
    # recipe since curriculum version 4's aside questions: "Questions asked of someone else").
    speaker_head: bool = True

    def key(self) -> dict[str, Any]:
        """What decides the weights: an output directory holding the same key is reused as is (`speaker_head`
        off leaves the key as encoders trained before the head carry, so `--no-speaker-head` reuses them)."""
        d = dataclasses.asdict(self)
        d.pop("threads"), d.pop("log_every")
        if not d["speaker_head"]:
            d.pop("speaker_head")
        return {"version": VERSION, **d}


def english_sentences() -> list[str]:
    """The English sentence pool apart from the ASR templates: question wordings, training sums, facts, everyday."""
    questions = [q for table in (cur.SPOKEN_IMAGE, cur.SPOKEN_VIDEO) for qs in table.values() for q in qs]
    sums = [f"what is {cur.NUMBER_WORDS[a]} plus {cur.NUMBER_WORDS[b]}"
            for a, b in cur._split_sums("train", cur.CurriculumSizes())]
    return questions + sums + [q for q, _ in cur._SPOKEN_FACTS] + list(EVERYDAY["en"])


def vocabulary() -> tuple[str, ...]:
    """The words the `words` head spots: every word of the English pool and the ASR templates' word lists."""
    words = {w for s in english_sentences() for w in s.split()}
    for table in (cur.COLOURS, cur._THINGS, cur._PLACES, cur._CITIES, cur._WEATHER, cur._TIMES, cur._ACTIONS,
                  cur.NUMBER_WORDS):
        words |= {w for phrase in table for w in phrase.split()}
    words |= {f"{t}s" for t in cur._THINGS} | {"the", "is", "there", "are", "on", "table", "it", "in", "near"}
    return tuple(sorted(words))


def draw_utterances(n: int, seed: int, noise_share: float) -> list[tuple[str, str, str]]:
    """`n` (text, voice, language) to record; text "" is a noise clip. Deterministic in `seed`."""
    rng = random.Random(seed)
    pool = english_sentences()
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < noise_share:
            out.append(("", "", "none"))
        elif roll < noise_share + 0.15:
            language = rng.choice(("de", "fr", "zh"))
            voice = rng.choice(cur.CHATTER_VOICES[language])
            out.append((rng.choice(EVERYDAY[language]), voice, language))
        else:
            text = cur.asr_sentence(rng) if rng.random() < 0.3 else rng.choice(pool)
            out.append((text, rng.choice(ENGLISH_VOICES), "en"))
    return out


def record(utterances: list[tuple[str, str, str]], seed: int, tts: TTS, workers: int = 2) -> list[Tensor]:
    """One 16 kHz waveform per utterance (`curriculum.speech_clip`, noisy a third of the time; noise clips are
    `curriculum.noise` of 0.8-2.5 s)."""
    rng = random.Random(seed)
    plans = [(text, voice, rng.randrange(2**31), rng.random() < 0.3, rng.choice(cur.NOISE_KINDS),
              rng.uniform(0.8, 2.5), rng.uniform(0.1, 0.5)) for text, voice, _ in utterances]

    def one(plan: tuple) -> Tensor:
        text, voice, clip_seed, noisy, kind, seconds, level = plan
        if not text:
            return torch.from_numpy(cur.noise(kind, round(seconds * cur.SAMPLE_RATE), seed=clip_seed, level=level))
        return torch.from_numpy(cur.speech_clip(tts, text, voice, clip_seed, noisy))

    with ThreadPoolExecutor(max(1, workers)) as pool:  # espeak-ng runs as a subprocess: threads suffice
        return list(pool.map(one, plans))


def intent_of(text: str) -> str:
    """What an English sentence asks: a curriculum task, a sum, a fact, or nothing (a statement)."""
    for table in (cur.SPOKEN_IMAGE, cur.SPOKEN_VIDEO):
        for task, wordings in table.items():
            if text in wordings:
                return task
    if text.startswith("what is ") and " plus " in text:
        return "sum"
    if text in {q for q, _ in cur._SPOKEN_FACTS}:
        return "fact"
    return "statement"


def labels_for(utterances: list[tuple[str, str, str]], vocab: tuple[str, ...]) -> dict[str, Tensor]:
    """The clips' labels: `words` (n, V) float multi-hot, `language` (n,) and `intent` (n,) class indices
    (IGNORE where a clip has no English), `speaker` (n,): 0 a query voice, 1 another's (IGNORE: noise)."""
    index = {w: k for k, w in enumerate(vocab)}
    words = torch.zeros(len(utterances), len(vocab))
    intent = torch.full((len(utterances),), IGNORE)
    for k, (text, _, language) in enumerate(utterances):
        if language == "en":
            for w in text.split():
                if w in index:
                    words[k, index[w]] = 1.0
            intent[k] = INTENTS.index(intent_of(text))
    speaker = torch.tensor([IGNORE if not voice else int(voice not in cur.QUERY_VOICES) for _, voice, _ in utterances])
    return {"words": words, "language": torch.tensor([LANGUAGES.index(lang) for _, _, lang in utterances]),
            "intent": intent, "speaker": speaker}


class UtteranceHeads(nn.Module):
    """The words, intent and language heads (and with `speaker` the speaker head), applied to every valid encoder
    frame."""

    def __init__(self, audio: AudioConfig, vocab_size: int, speaker: bool = False) -> None:
        super().__init__()
        self.words = nn.Linear(audio.hidden_size, vocab_size)
        self.intent = nn.Linear(audio.hidden_size, len(INTENTS))
        self.language = nn.Linear(audio.hidden_size, len(LANGUAGES))
        self.speaker = nn.Linear(audio.hidden_size, 2) if speaker else None

    def loss(self, frames: Tensor, lengths: Tensor, labels: dict[str, Tensor]) -> Tensor:
        """frames (B, T, H): the sum of the heads' frame-wise cross-entropies against each clip's labels.

        The words head is trained as a softmax over the vocabulary against the clip's words, each with an equal
        share (a bag-of-words target, as tag pretraining does); a binary cross-entropy per word, tried first,
        left the held-out word F1 at 0.39 after 400 steps: most words are absent from most clips."""
        keep = length_mask(lengths, frames.shape[1])  # (B, T)
        x = frames[keep]  # (N, H)
        row = torch.arange(frames.shape[0]).repeat_interleave(lengths)  # (N,) the clip of each frame
        bag = labels["words"][row]
        spoken = bag.sum(-1) > 0
        target = bag[spoken] / bag[spoken].sum(-1, keepdim=True)
        loss = -(target * F.log_softmax(self.words(x[spoken]), -1)).sum(-1).mean() if spoken.any() else x.sum() * 0
        intent = labels["intent"][row]
        if (intent != IGNORE).any():
            loss = loss + F.cross_entropy(self.intent(x), intent, ignore_index=IGNORE)
        loss = loss + F.cross_entropy(self.language(x), labels["language"][row])
        speaker = labels["speaker"][row]
        if self.speaker is not None and (speaker != IGNORE).any():
            loss = loss + F.cross_entropy(self.speaker(x), speaker, ignore_index=IGNORE)
        return loss

    @torch.no_grad()
    def scores(self, frames: Tensor, lengths: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
        """From the frames' mean logits: word recall at the clip's word count (the top-k words are its k words),
        intent and language accuracy (and the speaker's, with that head)."""
        keep = length_mask(lengths, frames.shape[1])[..., None]
        mean = (frames * keep).sum(1) / lengths[:, None]  # (B, H); the heads are linear: mean logits
        truth = labels["words"] > 0.5
        spoken = truth.any(1)
        logits = self.words(mean[spoken])
        k = truth[spoken].sum(1)
        ranks = logits.argsort(-1, descending=True).argsort(-1)  # rank of every word per clip
        hits = ((ranks < k[:, None]) & truth[spoken]).sum()
        intent = labels["intent"] != IGNORE
        scores = {"word_recall": round(hits.item() / max(1, k.sum().item()), 3),
                  "intent": round((self.intent(mean[intent]).argmax(-1) == labels["intent"][intent]).float().mean().item(), 3),
                  "language": round((self.language(mean).argmax(-1) == labels["language"]).float().mean().item(), 3)}
        if self.speaker is not None:
            said = labels["speaker"] != IGNORE
            right = self.speaker(mean[said]).argmax(-1) == labels["speaker"][said]
            scores["speaker"] = round(right.float().mean().item(), 3)
        return scores


def _features(waveforms: list[Tensor], audio: AudioConfig, chunk: int = 64) -> list[Tensor]:
    """Filterbanks of each waveform, computed `chunk` clips at a time (one padded batch of thousands would need
    gigabytes of frames)."""
    return [f for b in range(0, len(waveforms), chunk) for f in audio_features(waveforms[b : b + chunk], audio)]


def _chunks(n: int, size: int = 64) -> list[list[int]]:
    """Indices 0..n-1 in consecutive lists of at most `size`: the batches of a pass over every clip."""
    return [list(range(b, min(b + size, n))) for b in range(0, n, size)]


def _batches(features: list[Tensor], idx: list[int]) -> tuple[Tensor, Tensor]:
    feats = nn.utils.rnn.pad_sequence([features[i] for i in idx], batch_first=True)
    return feats, torch.tensor([features[i].shape[0] for i in idx])


def pretrain_audio_encoder(config: AudioPretrainConfig, output: str | Path, *, tts: TTS | None = None,
                           progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Trains the preset's audio encoder on recorded utterances, writes it under `output`, returns the summary
    (what `config.json` holds under "pretraining"). A directory that already holds this config's key is reused.

    Raises `InvalidInputError` for an unknown preset or one without an audio tower; `VitaError` when espeak-ng is
    missing and no `tts` is given.
    """
    out = Path(output)
    if not overwrite and (reused := reused_summary(out, config.key(), "audio encoder")) is not None:
        return reused
    audio = VitaConfig.preset(config.preset).audio
    if audio is None:
        raise InvalidInputError(f"preset {config.preset!r} has no audio tower")
    if config.threads:
        torch.set_num_threads(config.threads)
    tts = tts or EspeakTTS()
    start = time.perf_counter()
    vocab = vocabulary()
    utterances = draw_utterances(config.clips, config.data_seed, config.noise_share)
    features = _features(record(utterances, config.data_seed, tts), audio)
    labels = labels_for(utterances, vocab)
    record_s = time.perf_counter() - start
    torch.manual_seed(config.seed)
    encoder = AudioEncoder(audio)
    cmvn = compute_cmvn_stats(_batches(features, idx) for idx in _chunks(len(features)))
    encoder.global_cmvn.set_stats(*cmvn)
    heads = UtteranceHeads(audio, len(vocab), speaker=config.speaker_head)
    params = [*encoder.parameters(), *heads.parameters()]
    draw = random.Random(config.data_seed)
    encoder.train()

    def batch_loss(step: int) -> Tensor:
        idx = [draw.randrange(len(features)) for _ in range(config.batch_size)]
        frames, lengths = encoder(*_batches(features, idx))
        return heads.loss(frames, lengths, {k: v[idx] for k, v in labels.items()})

    train_loop(params, batch_loss, steps=config.steps, lr=config.lr, weight_decay=config.weight_decay, out=out,
               log_every=config.log_every, desc="audio encoder", progress=progress, start=start)
    encoder.eval()
    probe = probe_encoder(encoder, heads, audio, vocab, config, tts)
    summary = {"key": config.key(), "train_s": round(time.perf_counter() - start, 1), "record_s": round(record_s, 1),
               "vocabulary": len(vocab), "heldout": probe}
    save_sharded({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, out)
    (out / "probe.json").write_text(json.dumps(probe, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({"audio": dataclasses.asdict(audio), "pretraining": summary}, indent=2) + "\n")
    log.info("audio encoder written to %s: held-out %s", out, probe)
    return summary


@torch.no_grad()
def probe_encoder(encoder: AudioEncoder, heads: UtteranceHeads, audio: AudioConfig, vocab: tuple[str, ...],
                  config: AudioPretrainConfig, tts: TTS) -> dict[str, float]:
    """The heads' scores on `config.probe_clips` new recordings (seed `data_seed + 1`)."""
    utterances = draw_utterances(config.probe_clips, config.data_seed + 1, config.noise_share)
    features = _features(record(utterances, config.data_seed + 1, tts), audio)
    labels = labels_for(utterances, vocab)
    frames, lengths = zip(*(encoder(*_batches(features, idx)) for idx in _chunks(len(features))))
    width = max(f.shape[1] for f in frames)
    frames = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for f in frames])
    return heads.scores(frames, torch.cat(lengths), labels)


def load_audio_encoder(encoder: AudioEncoder, directory: str | Path) -> None:
    """Loads audio encoder weights (ours from `pretrain_audio_encoder`, or a WeNet checkpoint converted to
    safetensors, whose encoder tensors carry an `encoder.` prefix) into `encoder`, its global CMVN included.
    Raises `CheckpointError` when a tensor is missing, extra or of another shape."""
    load_pretrained_encoder(encoder, directory, prefix="encoder.", what="init.audio_encoder")


__all__ = ["LANGUAGES", "AudioPretrainConfig", "UtteranceHeads", "draw_utterances", "load_audio_encoder", "pretrain_audio_encoder",
           "vocabulary"]
