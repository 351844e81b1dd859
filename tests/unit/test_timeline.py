"""The printed Converse timeline: answers on one line, cut at a length, narration between events."""

import io
import re

from vita.timeline import Timeline
from vita.v1.assistant_pb2 import AnswerCompleted, AnswerStarted, Completed, ServerEvent, TextDelta


def lines(events, **kwargs) -> list[str]:
    out = io.StringIO()
    timeline = Timeline(out, **kwargs)
    for event in events:
        if isinstance(event, str):
            timeline.note(event)
        else:
            timeline.print(event)
    return [re.sub(r"^ *[\d.]+ ms  turn \d+  ", "", line) for line in out.getvalue().splitlines()]


def delta(turn: int, text: str) -> ServerEvent:
    return ServerEvent(turn_id=turn, delta=TextDelta(text=text))


def test_an_answer_is_cut_once_across_lines_and_narration_ends_its_line():
    got = lines([delta(1, "abcdef"), "narration", delta(1, "ghijkl"), delta(1, "mn"), delta(2, "xyz")],
                max_answer_chars=10)
    assert got == ["answer: abcdef", "  > narration", "answer: ghij...", "answer: xyz"]


def test_limits_and_finish_reasons_are_shown():
    got = lines([ServerEvent(turn_id=3, answer_started=AnswerStarted(
                    state_token="<3>", max_tokens=14, history_turns_dropped=2, frames_dropped=4)),
                 ServerEvent(turn_id=3, completed=AnswerCompleted(finish_reason=Completed.CONTEXT_LENGTH))])
    assert got[0] == ("answer started (<3>; up to 14 tokens, 2 oldest turns left out of the prompt, "
                      "4 camera frames dropped)")
    assert got[1].startswith("answer completed (context_length): 0 tokens")
