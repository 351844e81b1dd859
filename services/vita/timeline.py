"""A Converse session printed as a timeline: each server event with its time since the session started."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from vita.v1.assistant_pb2 import Completed, ServerEvent, UtteranceJudged


class Timeline:
    """Text deltas of one answer are joined on one line (cut after `max_answer_chars`, when given); everything
    else gets its own line."""

    def __init__(self, out: TextIO = sys.stdout, max_answer_chars: int | None = None) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.events: list[tuple[float, ServerEvent]] = []
        self.max_answer_chars = max_answer_chars
        self._in_answer = False
        self._answer_turn = -1
        self._printed = 0

    def note(self, text: str) -> None:
        """A line of narration between events (it ends an answer's line first)."""
        if self._in_answer:
            self.out.write("\n")
            self._in_answer = False
        self.out.write(f"  > {text}\n")
        self.out.flush()

    def print(self, event: ServerEvent) -> None:
        t = (time.perf_counter() - self.start) * 1000
        self.events.append((t, event))
        kind = event.WhichOneof("event")
        if kind == "delta":
            if self._in_answer and event.turn_id != self._answer_turn:
                self.out.write("\n")
                self._in_answer = False
            if not self._in_answer:
                self.out.write(f"{t:9.1f} ms  turn {event.turn_id}  answer: ")
                self._in_answer = True
            if event.turn_id != self._answer_turn:  # the cut counts per answer, across lines
                self._answer_turn, self._printed = event.turn_id, 0
            text, before = event.delta.text, self._printed
            self._printed += len(text)
            if self.max_answer_chars is not None and self._printed > self.max_answer_chars:
                room = max(0, self.max_answer_chars - before)  # "..." once, where the cut falls
                text = text[:room] + "..." if before <= self.max_answer_chars else ""
            self.out.write(text)
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
        limits = [f"up to {e.max_tokens} tokens"] if e.max_tokens else []
        if e.history_turns_dropped:
            limits.append(f"{e.history_turns_dropped} oldest turns left out of the prompt")
        if e.frames_dropped:
            limits.append(f"{e.frames_dropped} camera frames dropped")
        return f"answer started ({e.state_token}{'; ' if limits else ''}{', '.join(limits)})"
    if kind == "interrupted":
        return (f"answer interrupted after {e.tokens_sent} tokens sent ({e.tokens_generated} generated); "
                f"generator stopped {e.stop_latency_s * 1000:.0f} ms after the query")
    if kind == "completed":
        reason = Completed.FinishReason.Name(e.finish_reason).lower()
        return (f"answer completed ({reason}): {e.usage.completion_tokens} tokens, first token "
                f"{e.timings.time_to_first_token_s * 1000:.0f} ms after the query, total {e.timings.total_s:.2f} s")
    if kind == "error":
        return f"error {e.code}: {e.message}"
    return kind or "empty event"
