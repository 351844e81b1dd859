"""End-of-turn judgement and barge-in words: the real Silero VAD on espeak-ng speech (vita.processing.turn)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vita.errors import InvalidInputError
from vita.processing.turn import END_OF_TURN_RATIO, final_pitch_ratio, sounds_finished
from vita.processing.vad import StreamingVAD, VADConfig
from vita.training.speech import QUERY_HELD_OUT, espeak, hesitant

SR = 16_000
HESITANT = ("what is the weather like in Beijing", 3, 0.55)  # "what is the ... weather like in Beijing"


def _pad(wave: np.ndarray, before: float = 0.5, after: float = 1.5) -> np.ndarray:
    return np.concatenate([np.zeros(int(before * SR), np.float32), wave, np.zeros(int(after * SR), np.float32)])


def _ended(clip: np.ndarray, config: VADConfig | None = None, *, answering: bool = False) -> list:
    vad = StreamingVAD(config)
    vad.answering = answering
    events = []
    for i in range(0, len(clip), 320):
        events += vad.push(clip[i : i + 320])
    return [e for e in events + vad.flush() if e.kind == "ended"]


def _first_words(text: str, pause_s: float = 0.55) -> np.ndarray:
    """The words before the hesitation, as the VAD has them when the pause begins."""
    wave = hesitant(text, len(text.split()) // 2, pause_s)
    quiet = np.flatnonzero(np.convolve(np.abs(wave), np.ones(1600) / 1600, "same") < 0.003)
    return wave[: quiet[quiet > 3200][0]]


@pytest.mark.parametrize("text", QUERY_HELD_OUT)
def test_whole_questions_sound_finished_and_their_first_halves_do_not(text):
    assert sounds_finished(espeak(text))
    ratio = final_pitch_ratio(_first_words(text))
    assert ratio is not None and ratio > END_OF_TURN_RATIO


def test_too_little_voiced_speech_counts_as_finished():
    assert final_pitch_ratio(np.zeros(SR, np.float32)) is None and sounds_finished(np.zeros(SR, np.float32))
    rng = np.random.default_rng(0)
    assert sounds_finished((0.1 * rng.standard_normal(SR)).astype(np.float32))


def test_a_hesitation_mid_sentence_is_one_segment_unless_the_judgement_is_off():
    clip = _pad(hesitant(*HESITANT))
    assert len(_ended(clip)) == 1
    assert len(_ended(clip, VADConfig(incomplete_silence_ms=0))) == 2  # silence alone: two turns
    # The hold is bounded: a pause longer than incomplete_silence_ms still ends the turn.
    assert len(_ended(_pad(hesitant("what is the weather like in Beijing", 3, 1.5)))) == 2


def test_finished_speech_ends_after_the_short_silence_not_end_silence_or_the_hold():
    clip = _pad(espeak("what is the weather like in Beijing"), 0.5, 1.0)
    voiced_end = (np.flatnonzero(np.abs(clip) > 0.02)[-1] + 1) / SR
    decided = {}
    for complete_ms in (160, 0):  # 0: the shortening off, end_silence_ms for all speech
        vad = StreamingVAD(VADConfig(complete_silence_ms=complete_ms))
        events = []
        for i in range(0, len(clip), 320):
            events += vad.push(clip[i : i + 320])
            if any(e.kind == "ended" for e in events):
                break
        assert [e.kind for e in events if e.kind != "partial"] == ["started", "ended"]
        decided[complete_ms] = vad.position_s - voiced_end  # silence heard when the turn was ended
    # Silero drops below end_threshold a window or two after the last loud sample.
    assert 0.16 <= decided[160] < 0.3 and 0.4 <= decided[0] < 0.55
    assert decided[0] - decided[160] == pytest.approx(0.24, abs=0.04)  # 400 - 160 ms


def test_pauses_are_reported_on_request_and_the_ended_speech_is_the_last_paused_audio():
    clip = _pad(hesitant(*HESITANT))
    plain = StreamingVAD()
    assert not any(e.kind in ("paused", "resumed") for e in plain.push(clip) + plain.flush())
    vad = StreamingVAD()
    vad.report_pauses = True
    events = []
    for i in range(0, len(clip), 320):
        events += vad.push(clip[i : i + 320])
    kinds = [e.kind for e in events if e.kind != "partial"]
    assert kinds[0] == "started" and kinds[-2:] == ["paused", "ended"]
    assert kinds.count("resumed") >= 1  # the hesitation: paused, then the speech went on
    assert all(b in ("resumed", "ended") for a, b in itertools.pairwise(kinds) if a == "paused")
    paused = [e for e in events if e.kind == "paused"][-1]
    ended = events[-1]
    assert len({e.segment for e in events}) == 1 and paused.start_s == ended.start_s
    assert np.array_equal(ended.audio[: len(paused.audio)], paused.audio)  # the same speech ...
    assert 0 < ended.end_s - paused.end_s <= VADConfig().speech_pad_ms / 1000  # ... and the rest of the padding


def test_unfinished_speech_waits_for_the_longer_silence():
    vad = StreamingVAD()
    events = vad.push(_pad(_first_words("what is the weather like in Beijing"), 0.5, 0.6))
    assert [e.kind for e in events if e.kind != "partial"] == ["started"]  # held: no end yet
    assert vad.segment_open and vad.end_silence_s == pytest.approx(0.8)
    assert [e.kind for e in vad.push(np.zeros(int(0.4 * SR), np.float32))] == ["ended"]


@pytest.mark.parametrize("word", ["no", "stop"])
def test_a_brisk_word_is_heard_only_while_an_answer_plays(word):
    no = espeak(word, "brisk")
    assert np.count_nonzero(np.abs(no) > 0.02) < 0.25 * SR  # shorter than min_speech_ms
    clip = _pad(no)
    assert _ended(clip) == []  # a click-length word outside an answer: dropped as before
    heard = _ended(clip, answering=True)
    assert len(heard) == 1 and heard[0].end_s - heard[0].start_s <= VADConfig().barge_in_max_ms / 1000


def test_turn_taking_settings_are_checked():
    with pytest.raises(InvalidInputError, match="incomplete_silence_ms"):
        VADConfig(incomplete_silence_ms=-1)
    with pytest.raises(InvalidInputError, match="complete_silence_ms"):
        VADConfig(complete_silence_ms=-1)
    with pytest.raises(InvalidInputError, match="end_of_turn_ratio"):
        VADConfig(end_of_turn_ratio=0.0)
