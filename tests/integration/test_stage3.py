"""Stage 3 data: about half of the questions spoken (real espeak-ng speech), one system prompt per data type,
state tokens, and noisy-audio negatives whose whole target is `<2>` then end-of-sequence."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from tests import training_helpers as th
from vita.processing.audio import load_audio
from vita.processing.prompt import SYSTEM_PROMPTS, DataType
from vita.training import speech
from vita.training.config import DataConfig, InitConfig, SpokenConfig, StageConfig
from vita.training.examples import IGNORE, ExampleEncoder
from vita.training.sample import Sample
from vita.training.stage3 import SpokenTransform
from vita.training.trainer import run_stage

pytestmark = pytest.mark.slow

QUESTIONS = [("What colour is the square?", "red"), ("How many cups are there?", "three"),
             ("What is two plus three?", "five"), ("图片里有几个苹果？", "三个")]


class SpeechTTS:
    """The TTS interface over `vita.training.speech.espeak` (espeak-ng, the duplex fine-tune's voices)."""

    VOICES: ClassVar[dict[str, str]] = {"en-m": "query", "en-f-fast": "en-high", "de": "de", "fr": "fr"}

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        self.calls.append((text, voice))
        return speech.espeak(text, self.VOICES[voice])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage3")


def _samples(media: Path, n: int) -> list[Sample]:
    image = th.write_image(media / "img.png", 7)
    out = []
    for k in range(n):
        q, a = QUESTIONS[k % len(QUESTIONS)]
        if k % 3 == 0 and q.isascii():
            out.append(Sample("image", [{"role": "user", "content": f"<image>\n{q}"}, {"role": "bot", "content": a}],
                              images=[image], state="<3>"))
        else:
            out.append(th.text(q, a, state="<3>"))
    return out


def _transform(media: Path, cache: str = "cache", **kw) -> SpokenTransform:
    config = SpokenConfig(**{"p_spoken": 0.5, "p_negative": 0.1, "voices": ["en-m"], "chinese_voices": [],
                             "negative_voices": ["en-f-fast"], **kw})
    return SpokenTransform(config, SpeechTTS(), media / cache, seed=0)


def test_about_half_of_the_questions_are_spoken_and_a_tenth_are_negatives(media):
    transform = _transform(media)
    samples = _samples(media, 240)
    out = [transform(s, epoch=0, index=i) for i, s in enumerate(samples)]
    english = [(s, o) for s, o in zip(samples, out) if s.conversation[0]["content"].isascii()]
    negatives = [o for _, o in english if o.state == "<2>"]
    spoken = [o for _, o in english if o.state == "<1>"]
    assert 0.04 < len(negatives) / len(english) < 0.18
    assert 0.38 < len(spoken) / (len(english) - len(negatives)) < 0.62
    # Chinese questions have no voice here (chinese_voices: []): they stay typed unless made negatives
    assert all(o.state in ("<3>", "<2>") for s, o in zip(samples, out) if not s.conversation[0]["content"].isascii())
    for o in spoken:
        assert o.conversation[-2]["content"] in ("<audio>", "<image>\n<audio>")
        assert len(o.audio) == 1 and Path(o.audio[0]).is_file()
        assert o.conversation[-1]["content"] in {a for _, a in QUESTIONS}
    # what is spoken is the question itself, in the query voice
    first = spoken[0]
    original = samples[out.index(first)].conversation[-2]["content"].replace("<image>\n", "")
    np.testing.assert_allclose(load_audio(first.audio[0]).numpy(), speech.espeak(original, "query"), atol=1e-4)


def test_choices_are_seeded_by_place_in_the_epoch(media):
    transform = _transform(media)
    samples = _samples(media, 40)
    once = [transform(s, 3, i) for i, s in enumerate(samples)]
    again = [transform(s, 3, i) for i, s in enumerate(samples)]
    assert once == again
    assert [o.state for o in once] != [transform(s, 4, i).state for i, s in enumerate(samples)]


def test_questions_asked_aside_are_the_question_in_a_negative_voice_and_leave_other_runs_as_they_were(media):
    """`p_asked_aside`: the negative's speech is the sample's own English question, spoken in a `negative_voices`
    voice (never the query voice), answered `<2>`; Chinese questions fall back to chatter. At 0 every choice is
    the one a run without the setting makes."""
    samples = _samples(media, 80)
    plain = [_transform(media, "plain", p_negative=0.5, p_noise=0.0)(s, 0, i) for i, s in enumerate(samples)]
    off = [_transform(media, "plain", p_negative=0.5, p_noise=0.0, p_asked_aside=0.0)(s, 0, i)
           for i, s in enumerate(samples)]
    assert off == plain
    transform = _transform(media, "aside", p_negative=0.5, p_noise=0.0, p_asked_aside=1.0)  # its own cache: all calls
    out = [transform(s, 0, i) for i, s in enumerate(samples)]
    negatives = [(s, o) for s, o in zip(samples, out) if o.state == "<2>"]
    assert len(negatives) > 20
    spoken = dict(transform.tts.calls)
    for s, o in negatives:
        assert o.conversation[-1]["content"] == "" and o.conversation[-2]["content"].endswith("<audio>")
        question = s.conversation[-2]["content"].replace("<image>\n", "")
        if question.isascii():
            assert spoken[question] == "en-f-fast"
            np.testing.assert_allclose(load_audio(o.audio[0]).numpy(), speech.espeak(question, "en-high"), atol=1e-4)
    assert any(not s.conversation[-2]["content"].isascii() for s, _ in negatives)
    chatter = {t for t, _ in speech.OTHER_TRAIN}
    assert set(spoken) - {q for q, _ in QUESTIONS if q.isascii()} <= chatter  # a Chinese question: chatter instead


def test_targets_state_tokens_and_system_prompts(media):
    tok = th.tokenizer()
    config = th.micro_config(tok.vocab_size)
    encoder = ExampleEncoder(tok, config, state_tokens=True)
    transform = _transform(media, p_negative=0.5, p_spoken=1.0, p_noise=0.5)
    samples = _samples(media, 40)
    seen = set()
    for i, s in enumerate(samples):
        out = transform(s, 0, i)
        example = encoder(out, i)
        targets = [t for t in example.targets if t != IGNORE]
        text = tok.decode(example.input_ids, skip_special=False)
        data_type = DataType.IMAGE if out.images else DataType.TEXT
        assert SYSTEM_PROMPTS.select(data_type, audio_question=bool(out.audio)) in text
        if out.state == "<2>":
            assert targets == [tok.state_ids["<2>"], tok.eos_id]
            seen.add(("negative", out.audio[-1]))
        elif out.state == "<1>":
            assert targets[0] == tok.state_ids["<1>"] and targets[-1] == tok.eos_id
            assert tok.decode(targets) == out.conversation[-1]["content"]
            seen.add(("spoken", data_type))
        else:
            assert targets[0] == tok.state_ids["<3>"]
            seen.add(("typed", data_type))
    assert ("spoken", DataType.IMAGE) in seen and ("spoken", DataType.TEXT) in seen
    assert len({audio for kind, audio in seen if kind == "negative"}) > 3
    # negatives are noise or chatter (training phrases only), never spoken in the query voice
    chatter = {p for p, _ in speech.OTHER_TRAIN}
    spoken_chatter = [(t, v) for t, v in transform.tts.calls if t in chatter]
    assert spoken_chatter and all(v != "en-m" for _, v in spoken_chatter)
    assert not {t for t, _ in transform.tts.calls} & {p for p, _ in speech.OTHER_HELD_OUT}


def test_stage3_trains_with_spoken_questions(media, tmp_path):
    tok = th.tokenizer()
    init = th.write_model(tmp_path / "init")
    tts = SpeechTTS()
    config = StageConfig(stage=3, init=InitConfig(model=str(init)), trainable=["llm", "audio_connector"],
                         state_tokens=True, spoken=SpokenConfig(p_spoken=0.5, p_negative=0.2, voices=["en-m"],
                                                                chinese_voices=[], negative_voices=["en-f-fast"]),
                         data=DataConfig(packing_length=1024, grad_accum=2), max_steps=2, save_every=2,
                         output_dir=str(tmp_path / "run"), progress=False)
    summary = run_stage(config, _samples(media, 12), tts=tts)
    assert summary["steps"] == 2 and tts.calls
    assert any((tmp_path / "run" / "media").glob("*.wav"))
    assert tok.vocab_size == summary["vocab_size"]
