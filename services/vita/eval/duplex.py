"""`vita eval duplex`: turn-taking of a live Converse session on synthetic dialogues, in the style of
Full-Duplex-Bench (Lin et al., 2025: pause handling, user interruption; v1.5: talking to others, background speech).

Every dialogue is a fresh Converse session on a running stack; the user's side is espeak-ng speech
(`vita.training.speech`: held-out phrases the duplex fine-tune never saw) streamed in real time, 20 ms chunks, as a
microphone would. Five categories:

- `pause`: a question with a hesitation mid-sentence (0.5-0.7 s, SSML break): taking the turn in the pause (a query
  judged on the words before it) is a takeover; lower is better. Also reported: how often the question was answered.
- `interrupt_query`: a question spoken while an answer streams: the takeover rate (the answer is cut), the latency
  from the interrupting speech's onset to the cut (AnswerInterrupted) and to the new answer's first token, and from
  the end of the interrupting speech to that first token (Full-Duplex-Bench's interruption latency).
- `interrupt_word`: a brisk barge-in word ("stop", "no", ...) in a voice the model never heard, during an answer:
  the takeover rate and the latency to the cut.
- `others`: someone talking to someone else (other voices, other languages), nothing streaming: the no-response
  rate (no answer started); higher is better.
- `background`: quieter talk mixed with pink noise while an answer streams: the no-response rate (the answer goes
  on, nothing new is answered).

Latencies are the client's wall clock: onset = when the chunk holding the first voiced sample was sent, end =
when the last voiced one was; events are timed on arrival. The end of a dialogue is an event, not a timer: after
its audio (and 1.5 s of silence) the client sends a TruncateAnswer for a turn that cannot exist, which goes through
the session's turn worker behind every segment the audio produced, so its error event comes after all of their
judgements.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vita.client import ConverseSession, VitaClient, session_config, speech_events, text_event
from vita.training import speech
from vita.v1.assistant_pb2 import CancelAnswer, ClientEvent, ServerEvent, TruncateAnswer, UtteranceJudged

SAMPLE_RATE = 16_000
CATEGORIES = ("pause", "interrupt_query", "interrupt_word", "others", "background")
PAUSES_S = (0.5, 0.6, 0.7)
BARGE_IN_WORDS = ("stop", "no", "wait", "stop please", "no no", "hold on", "stop that", "enough", "no thanks",
                  "wait a second")
LONG_ANSWER = "Tell me a long story."  # typed: the answer every interruption cuts into (max_tokens, no EOS)
ANSWER_TOKENS = 2000  # longer than any dialogue: the answer still streams when the user speaks (cancelled after)
_LEAD_S, _TRAIL_S = 0.3, 1.5
_BARRIER_TURN = 2**31 - 1  # a TruncateAnswer for this turn: an error event that orders after every judgement
_LOUD = 0.02  # a sample above this is speech (espeak's silence is exact zeros)
# Figures published for other systems (Full-Duplex-Bench), shown beside ours; never measured here.
# Session VAD settings per variant: the defaults, and (for a side-by-side run) the end-of-turn judgement and the
# barge-in rule switched off, which is how Converse took turns before them.
VARIANTS = {"default": {}, "off": {"incomplete_silence_ms": -1, "barge_in_max_ms": -1, "barge_in_min_speech_ms": 250}}
PUBLISHED = {("pause", "takeover_rate"): "GPT-Realtime 0.010",
             ("interrupt_query", "end_to_first_token_s"): "Moshi 0.257"}


@dataclass
class Dialogue:
    category: str
    id: str
    text: str
    audio: np.ndarray = field(repr=False)  # what the microphone sends after the setup, 16 kHz float32
    during_answer: bool  # an answer streams when the audio starts
    speech_start_s: float  # first voiced sample, seconds into `audio` (= the session's audio clock)
    speech_end_s: float  # last voiced sample
    resume_s: float = 0.0  # pause: where the words after the hesitation start
    pause_s: float = 0.0  # pause: the measured silence of the hesitation


@dataclass
class Outcome:
    category: str
    id: str
    text: str
    responded: bool  # an answer started, or one was cut, because of this speech
    takeover: bool  # the category's takeover (see the module docstring)
    answered: bool = False  # pause: the whole question was answered
    split: bool = False  # pause: a segment ended in the hesitation (whatever its judgement)
    variant: str = "default"
    stop_latency_s: float | None = None  # onset -> the streaming answer was cut
    first_token_latency_s: float | None = None  # onset -> the new answer's first token
    end_to_first_token_s: float | None = None  # end of speech -> the new answer's first token
    pause_s: float = 0.0
    judged: list[str] = field(default_factory=list)  # the judgements, in order: "QUERY@0.3-1.9", ...


def _voiced(samples: np.ndarray) -> tuple[int, int]:
    loud = np.flatnonzero(np.abs(samples) > _LOUD)
    return int(loud[0]), int(loud[-1]) + 1


def _dialogue(category: str, k: int, text: str, clip: np.ndarray, *, during_answer: bool,
              background: np.ndarray | None = None) -> Dialogue:
    lead, trail = np.zeros(int(_LEAD_S * SAMPLE_RATE), np.float32), np.zeros(int(_TRAIL_S * SAMPLE_RATE), np.float32)
    first, last = _voiced(clip)
    audio = np.concatenate([lead, clip, trail])
    if background is not None:
        audio = np.clip(audio + background[: len(audio)], -1.0, 1.0).astype(np.float32)
    start, end = (len(lead) + first) / SAMPLE_RATE, (len(lead) + last) / SAMPLE_RATE
    return Dialogue(category, f"{category}-{k}", text, audio, during_answer, start, end)


def dialogues(per_category: int, categories: Sequence[str] = CATEGORIES) -> list[Dialogue]:
    """`per_category` dialogues of each category, in a fixed order (phrases cycle, pauses vary)."""
    out: list[Dialogue] = []
    for category in categories:
        for k in range(per_category):
            if category == "pause":
                text = speech.QUERY_HELD_OUT[k % len(speech.QUERY_HELD_OUT)]
                pause = PAUSES_S[k % len(PAUSES_S)]
                clip = speech.hesitant(text, len(text.split()) // 2, pause)
                d = _dialogue(category, k, text, clip, during_answer=False)
                # the hesitation: the longest silent run inside the voiced part
                voiced = np.abs(d.audio) > _LOUD
                idx = np.flatnonzero(voiced)
                gaps = np.diff(idx)
                g = int(np.argmax(gaps))
                d.resume_s, d.pause_s = idx[g + 1] / SAMPLE_RATE, float(gaps[g] / SAMPLE_RATE)
            elif category == "interrupt_query":
                text = speech.QUERY_HELD_OUT[k % len(speech.QUERY_HELD_OUT)]
                d = _dialogue(category, k, text, speech.espeak(text, "query"), during_answer=True)
            elif category == "interrupt_word":
                text = BARGE_IN_WORDS[k % len(BARGE_IN_WORDS)]
                d = _dialogue(category, k, text, speech.espeak(text, "brisk"), during_answer=True)
            elif category == "others":
                text, voice = speech.OTHER_HELD_OUT[k % len(speech.OTHER_HELD_OUT)]
                d = _dialogue(category, k, text, speech.espeak(text, voice), during_answer=False)
            elif category == "background":
                text, voice = speech.OTHER_HELD_OUT[(k + 3) % len(speech.OTHER_HELD_OUT)]
                clip = 0.3 * speech.espeak(text, voice)  # about -10 dB: across the room
                seconds = _LEAD_S + len(clip) / SAMPLE_RATE + _TRAIL_S + 0.1
                hiss = speech.noise("pink", int(seconds * SAMPLE_RATE), seed=k, level=0.02)
                d = _dialogue(category, k, text, clip, during_answer=True, background=hiss)
            else:
                raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
            out.append(d)
    return out


def run_dialogue(client: VitaClient, d: Dialogue, *, variant: str = "default", timeout_s: float = 120.0) -> Outcome:
    """One dialogue in a fresh session (`variant`: a key of VARIANTS); the outcome from the events it produced."""
    arrivals: list[tuple[float, ServerEvent]] = []
    config = session_config(max_tokens=ANSWER_TOKENS if d.during_answer else 0, ignore_eos=d.during_answer)
    for name, value in VARIANTS[variant].items():
        setattr(config.config.vad, name, value)
    s = ConverseSession(client, config, on_event=lambda e: arrivals.append((time.time(), e)))
    try:
        streaming = 0
        if d.during_answer:
            s.send(text_event(LONG_ANSWER))
            streaming = s.wait("delta", timeout_s=timeout_s).turn_id
        mic = list(speech_events(d.audio, realtime=False, chunk_ms=20, trailing_silence_s=0.0))
        sent_at: list[float] = []

        def pump() -> None:
            start = time.perf_counter()
            for k, event in enumerate(mic):
                time.sleep(max(0.0, start + k * 0.02 - time.perf_counter()))
                sent_at.append(time.time())
                s.send(event)
            s.send(ClientEvent(truncate=TruncateAnswer(turn_id=_BARRIER_TURN)))

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        s.wait("error", turn_id=_BARRIER_TURN, timeout_s=timeout_s + len(mic) * 0.02)
        thread.join()
        later = [e for _, e in arrivals]
        new_answers = [e.turn_id for e in later if e.HasField("answer_started") and e.turn_id != streaming]
        if new_answers and not any(e.HasField("delta") and e.turn_id == new_answers[0] for e in later):
            s.wait("delta", turn_id=new_answers[0], timeout_s=timeout_s)
        heard = list(arrivals)  # what the dialogue caused: not the cleanup's cancel below
        s.send(ClientEvent(cancel=CancelAnswer()))
    finally:
        s.close(timeout_s=30)
    onset = sent_at[int(d.speech_start_s / 0.02)]
    end = sent_at[min(len(sent_at) - 1, int(d.speech_end_s / 0.02))]
    outcome = _score(d, heard, streaming, onset, end)
    outcome.variant = variant
    return outcome


def _score(d: Dialogue, arrivals: list[tuple[float, ServerEvent]], streaming: int, onset: float,
           end: float) -> Outcome:
    judged = [e.judged for _, e in arrivals if e.HasField("judged")]
    names = {v: k for k, v in UtteranceJudged.Outcome.items()}
    outcome = Outcome(d.category, d.id, d.text, False, False, pause_s=round(d.pause_s, 3),
                      judged=[f"{names[j.outcome]}@{j.audio_start_s:.2f}-{j.audio_end_s:.2f}" for j in judged])
    cut = next((t for t, e in arrivals if e.HasField("interrupted") and streaming and e.turn_id == streaming), None)
    new = [e.turn_id for _, e in arrivals if e.HasField("answer_started") and e.turn_id != streaming]
    first = next((t for t, e in arrivals if new and e.HasField("delta") and e.turn_id == new[0]), None)
    outcome.responded = cut is not None or bool(new)
    if cut is not None:
        outcome.stop_latency_s = round(cut - onset, 4)
    if first is not None:
        outcome.first_token_latency_s = round(first - onset, 4)
        outcome.end_to_first_token_s = round(first - end, 4)
    if d.category == "pause":
        queries = [j for j in judged if j.outcome == UtteranceJudged.QUERY]
        outcome.takeover = any(j.audio_end_s < d.resume_s for j in queries)
        outcome.split = any(j.audio_end_s < d.resume_s for j in judged)
        outcome.answered = any(j.audio_end_s >= d.speech_end_s - 0.05 for j in queries)
    elif d.category.startswith("interrupt"):
        outcome.takeover = cut is not None
    return outcome


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.fmean(kept), 4) if kept else None


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 4) if kept else None


def summarize(outcomes: Sequence[Outcome]) -> dict[str, dict[str, Any]]:
    """Per category: n and its metrics (rates in [0, 1], latencies in seconds: mean and median)."""
    metrics: dict[str, dict[str, Any]] = {}
    for category in CATEGORIES:
        rows = [o for o in outcomes if o.category == category]
        if not rows:
            continue
        m: dict[str, Any] = {"n": len(rows)}
        if category == "pause":
            m["takeover_rate"] = round(sum(o.takeover for o in rows) / len(rows), 4)
            m["answered_rate"] = round(sum(o.answered for o in rows) / len(rows), 4)
            m["split_rate"] = round(sum(o.split for o in rows) / len(rows), 4)
        elif category.startswith("interrupt"):
            m["takeover_rate"] = round(sum(o.takeover for o in rows) / len(rows), 4)
            for key in ("stop_latency_s", "first_token_latency_s", "end_to_first_token_s"):
                values = [getattr(o, key) for o in rows]
                if any(v is not None for v in values):
                    m[key] = _mean(values)
                    m[key.replace("_s", "_median_s")] = _median(values)
        else:
            m["no_response_rate"] = round(sum(not o.responded for o in rows) / len(rows), 4)
        metrics[category] = m
    return metrics


_ROWS = (  # (category, metric, what it is, better)
    ("pause", "takeover_rate", "pause handling: takeover rate (turn taken in a mid-sentence pause)", "lower"),
    ("pause", "split_rate", "pause handling: the hesitation ended a segment", "lower"),
    ("pause", "answered_rate", "pause handling: the whole question answered", "higher"),
    ("interrupt_query", "takeover_rate", "interruption by a question: takeover rate", "higher"),
    ("interrupt_query", "stop_latency_s", "... onset of the question -> answer cut, s (mean)", "lower"),
    ("interrupt_query", "first_token_latency_s", "... onset -> new answer's first token, s (mean)", "lower"),
    ("interrupt_query", "end_to_first_token_s", "... end of the question -> new answer's first token, s (mean)",
     "lower"),
    ("interrupt_word", "takeover_rate", "interruption by a brisk word (unseen voice): takeover rate", "higher"),
    ("interrupt_word", "stop_latency_s", "... onset of the word -> answer cut, s (mean)", "lower"),
    ("others", "no_response_rate", "talking to someone else: no-response rate", "higher"),
    ("background", "no_response_rate", "background speech during an answer: no-response rate", "higher"),
)


def markdown(metrics: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The results (`{variant: summarize(...)}`) as a markdown table, one column per variant, with the published
    figures of other systems where there are some."""
    variants = list(metrics)
    head = " | ".join(f"VITA {v} (measured)" for v in variants)
    lines = [f"| category | n | metric | better | {head} | published |",
             "|---|---|---|---|" + "---|" * len(variants) + "---|"]
    for category, key, what, better in _ROWS:
        cells = [metrics[v].get(category, {}).get(key) for v in variants]
        if all(c is None for c in cells):
            continue
        n = next(metrics[v][category]["n"] for v in variants if category in metrics[v])
        shown = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
        lines.append(f"| {category} | {n} | {what} | {better} | {shown} | {PUBLISHED.get((category, key), '')} |")
    return "\n".join(lines) + "\n"


@dataclass
class DuplexResult:
    target: str
    per_category: int
    seconds: float
    metrics: dict[str, dict[str, dict[str, Any]]]  # variant -> category -> metric
    outcomes: list[Outcome]

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": "duplex", "target": self.target, "per_category": self.per_category,
                "seconds": round(self.seconds, 1), "metrics": self.metrics,
                "published": {f"{c}.{k}": v for (c, k), v in PUBLISHED.items()},
                "items": [asdict(o) for o in self.outcomes]}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path


def evaluate(target: str, per_category: int, *, categories: Sequence[str] = CATEGORIES,
             variants: Sequence[str] = ("default",), progress: bool = False,
             on_outcome: Callable[[Outcome], None] | None = None) -> DuplexResult:
    """Runs every dialogue, one session at a time (latencies are not shared with another session's load); with
    several variants, each dialogue runs under each in turn, so they see the same machine load."""
    start = time.perf_counter()
    items = dialogues(per_category, categories)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items) * len(variants), desc="duplex", unit="dialogue", leave=False)
    outcomes = []
    with VitaClient(target, timeout_s=None) as client:
        for d in items:
            for variant in variants:
                outcomes.append(run_dialogue(client, d, variant=variant))
                if on_outcome is not None:
                    on_outcome(outcomes[-1])
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    metrics = {v: summarize([o for o in outcomes if o.variant == v]) for v in variants}
    return DuplexResult(target, per_category, time.perf_counter() - start, metrics, outcomes)


def local_prefix() -> str:
    """A Redis key prefix of its own for a stack this evaluation starts."""
    return f"evalduplex{uuid.uuid4().hex[:8]}"
