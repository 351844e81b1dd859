"""Preemptive generation (LiveKit's term): a spoken turn's answer starts when the speech pauses, not when the turn ends.

Without it, everything after the end of speech waits for the VAD's end-of-turn silence and then runs in series:
encode the speech, judge it, prefill the history, decode the first token. With it, the VAD reports the first silent
window ("paused"), the turn worker encodes and judges the speech up to there and queues its answer on the generator,
and the tokens wait on the generator's reply stream while the silence runs on. When the VAD confirms the end of the
turn, the answer is released: the history gets the turn, the relay starts and the tokens already made go out at
once. If the speech resumes first ("resumed"), the generation is cancelled on the generator and the speech goes on as
one segment, so the turn is judged and answered as a whole later (and may pause, and be preempted, again).

What the client sees does not change: no event of a preemptive answer goes out before it is released (not even its
judgement), and one that is discarded leaves no trace, neither in the events nor in the history. An answer is
released only when nothing it was made from changed: the same segment ended, with no speech after the pause, the
history, the session config and the roles as they were, and the same images and camera frames waiting (those are
taken only at the release, in one compare-and-set, `SessionStore.take_media_if`). Anything else discards it and
the turn is answered as without preemption. Preemption only starts when no answer is in flight: an answer that
streams must first be stopped by a query, which needs its judgement (early judging does that while the user
speaks; the interrupting question is then preempted at its pause like any other).

Tracing: the "converse turn" span opens at the pause, so the encode, judge and generate spans of the head start are
its children; the turn that ends as assumed continues that span, and a discarded head start's span is renamed
"converse preemptive turn" with the reason (`vita.preemption_discarded`).

This module holds the record and the decision; `converse.py` does the work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import Span

from vita.orchestrator.prompts import Prompt
from vita.processing.prompt import StateToken
from vita.v1.bus_pb2 import EmbeddingRef, GenerationJob
from vita.v1.media_pb2 import Image, TimestampedFrame
from vita.v1.session_pb2 import SessionState, SessionTurn


@dataclass(eq=False)
class Preemption:
    """The speech of `segment` paused: what its answer was started from, and how far it got."""

    segment: int
    audio: np.ndarray  # the segment's audio up to the pause
    start_s: float
    end_s: float
    cut_at: float = field(default_factory=time.perf_counter)  # when the VAD reported the pause
    resumed: bool = False  # speech came back after the pause (set by the reader): never released
    # Filled in by the turn worker as it goes:
    state: SessionState | None = None  # a copy of the session when the answer was started
    speech: EmbeddingRef | None = None
    token: str = ""  # the judgement of the speech ("<1>": a query); "" until judged
    judged_at: float = 0.0
    images: list[Image] = field(default_factory=list)  # the media waiting when it started (left in place)
    frames: list[TimestampedFrame] = field(default_factory=list)
    request_id: str = ""  # named before the job is submitted, so that a cleanup cancels it whatever happens
    job: GenerationJob | None = None
    prompt: Prompt | None = None
    user: SessionTurn | None = None  # the user turn the history gets at the release
    span: Span | None = None  # the turn's trace, opened at the pause; the turn that ends as assumed continues it

    def snapshot(self, state: SessionState) -> None:
        self.state = SessionState()
        self.state.CopyFrom(state)

    @property
    def query(self) -> bool:
        return self.token == StateToken.QUERY_AUDIO.value


def discard_reason(p: Preemption, *, segment: int, state: SessionState) -> str | None:
    """None when `p` still stands for the turn that just ended in `segment` (given the session as it is now);
    otherwise why it must be discarded. (The waiting media are checked when the answer is released.)"""
    if p.resumed:
        return "speech resumed"
    if segment != p.segment:
        return "another segment ended"
    if p.state is None or not p.token or (p.query and p.job is None):
        return "not ready"  # it failed, or the turn ended before it could start
    if p.state.turns != state.turns:
        return "history changed"
    if p.state.config != state.config:
        return "config changed"
    if p.state.generator_role != state.generator_role:
        return "roles swapped"
    return None
