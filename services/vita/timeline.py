"""A Converse session printed as a timeline: each server event with its time since the session started."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vita.v1.assistant_pb2 import ServerEvent, UtteranceJudged


class Timeline:
    """Text deltas of one answer are joined on one line; everything else gets its own line."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.events: list[tuple[float, ServerEvent]] = []
        self._in_answer = False

    def print(self, event: ServerEvent) -> None:
        t = (time.perf_counter() - self.start) * 1000
        self.events.append((t, event))
        kind = event.WhichOneof("event")
        if kind == "delta":
            if not self._in_answer:
                self.out.write(f"{t:9.1f} ms  turn {event.turn_id}  answer: ")
                self._in_answer = True
            self.out.write(event.delta.text)
            self.out.flush()
            return
        if self._in_answer:
            self.out.write("\n")
            self._in_answer = False
        self.out.write(f"{t:9.1f} ms  turn {event.turn_id}  {describe(event)}\n")
        self.out.flush()


def describe(event: ServerEvent) -> str:
    kind = event.WhichOneof("event")
    e = getattr(event, kind) if kind else None
    if kind == "session_started":
        return f"session {event.session_id} {'resumed' if e.resumed else 'started'} ({e.history_turns} turns)"
    if kind == "speech_started":
        return f"speech started at {e.audio_start_s:.2f} s"
    if kind == "speech_ended":
        return f"speech ended ({e.audio_start_s:.2f}-{e.audio_end_s:.2f} s)"
    if kind == "judged":
        outcome = UtteranceJudged.Outcome.Name(e.outcome).lower()
        return (f"judged {outcome} ({e.state_token!r}{', early' if e.early else ''}) "
                f"in {e.latency_s * 1000:.0f} ms")
    if kind == "answer_started":
        return f"answer started ({e.state_token})"
    if kind == "interrupted":
        return (f"answer interrupted after {e.tokens_sent} tokens sent ({e.tokens_generated} generated); "
                f"generator stopped {e.stop_latency_s * 1000:.0f} ms after the query")
    if kind == "completed":
        return (f"answer completed: {e.usage.completion_tokens} tokens, first token "
                f"{e.timings.time_to_first_token_s * 1000:.0f} ms after the query, total {e.timings.total_s:.2f} s")
    if kind == "error":
        return f"error {e.code}: {e.message}"
    return kind or "empty event"
