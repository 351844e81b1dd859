"""`vita eval duplex`'s dialogues and its table (the live runs are in tests/e2e/test_converse_turns.py)."""

from __future__ import annotations

import pytest

from vita.eval.duplex import CATEGORIES, PAUSES_S, Outcome, dialogues, markdown, summarize


def test_dialogues_place_the_speech_and_measure_the_hesitation():
    items = dialogues(3)
    assert [d.category for d in items] == [c for c in CATEGORIES for _ in range(3)]
    for d in items:
        assert 0.25 < d.speech_start_s < d.speech_end_s < len(d.audio) / 16000 - 1.4  # lead and trailing silence
        assert d.during_answer == (d.category in ("interrupt_query", "interrupt_word", "background"))
    pauses = [d for d in items if d.category == "pause"]
    for d, asked in zip(pauses, PAUSES_S, strict=True):
        assert d.speech_start_s < d.resume_s < d.speech_end_s
        assert asked - 0.05 <= d.pause_s <= asked + 0.35  # espeak adds its own clause pause to the break


def test_summary_and_table_per_variant():
    rows = [Outcome("pause", "p0", "x", False, False, answered=True, variant="default"),
            Outcome("pause", "p0", "x", True, True, answered=True, split=True, variant="off"),
            Outcome("interrupt_word", "w0", "stop", True, True, stop_latency_s=0.5, variant="default"),
            Outcome("interrupt_word", "w0", "stop", False, False, variant="off"),
            Outcome("others", "o0", "y", True, False, variant="default")]
    metrics = {v: summarize([o for o in rows if o.variant == v]) for v in ("default", "off")}
    assert metrics["default"]["pause"] == {"n": 1, "takeover_rate": 0.0, "answered_rate": 1.0, "split_rate": 0.0}
    assert metrics["off"]["pause"]["takeover_rate"] == 1.0
    assert metrics["default"]["interrupt_word"]["stop_latency_s"] == pytest.approx(0.5)
    assert metrics["default"]["others"]["no_response_rate"] == 0.0 and "others" not in metrics["off"]
    table = markdown(metrics)
    assert "| VITA default (measured) | VITA off (measured) |" in table
    assert "| pause | 1 | pause handling: takeover rate (turn taken in a mid-sentence pause) | lower | 0.000 | 1.000 " \
           "| GPT-Realtime 0.010 |" in table
    assert "| 0.500 |  |" in table  # a latency only one variant has
