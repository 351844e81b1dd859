"""Duplex latencies on the local stack: scripted interruptions, non-query speech and fresh questions.

Every trial opens a Converse session on the duplex fine-tuned tiny model, starts a long answer (a text question,
ignore_eos), and while it streams speaks (in real time, like a microphone) either a held-out question for the
assistant or held-out talk meant for someone else. Measured, from the client's side of the gRPC stream:

- query end -> generator stopped: from the end of the interrupting speech (the last voiced sample sent) to the
  AnswerInterrupted event, which the server sends once the generator has confirmed its stop. Negative when the
  early judgement stopped it while the user was still speaking. Also from the VAD's cut (what the server reports).
- query end -> first token of the new answer.
- time to first token of a fresh spoken question (no answer streaming), from the end of speech.
- Full-Duplex-Bench-style counts: takeover rate (interrupting queries that stopped the answer and got one of
  their own) and false takeovers (non-query speech that stopped the answer).

The VAD needs silence to know the turn ended: `complete_silence_ms` (160 ms) after speech that sounds finished,
`end_silence_ms` (400 ms) when it cannot tell; numbers "from the end of speech" include it. With preemptive
generation (the default) the answer is judged and generated during that silence and released when the VAD confirms
the end. `--compare` runs four settings side by side in one stack, each trial in turn: before (no shortened
silence, no preemption: the defaults until both came), the shortened silence alone, both (the defaults), and both
with a still shorter silence (not a default: it shows how much of what is left is the silence).
Figures and the command are appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


# name -> (VadParams.complete_silence_ms, SessionConfig.preemptive_generation); None: the server's default
SETTINGS = {
    "before: 400 ms silence, no preemption": (-1, False),
    "160 ms silence when finished, no preemption": (None, False),
    "160 ms silence when finished + preemptive generation (defaults)": (None, None),
    "96 ms silence when finished + preemptive generation (for comparison: what the silence costs)": (96, None),
}
DEFAULTS = "defaults"


@dataclass
class Results:
    stop_from_speech_end: list[float] = field(default_factory=list)
    stop_from_cut: list[float] = field(default_factory=list)
    first_token_from_speech_end: list[float] = field(default_factory=list)
    speech_ended_from_speech_end: list[float] = field(default_factory=list)  # the VAD's end of turn, as received
    speech_ended_sent_from_speech_end: list[float] = field(default_factory=list)  # ... as sent (server clock)
    first_token_from_speech_ended: list[float] = field(default_factory=list)  # what follows the end of turn
    fresh_ttft_from_speech_end: list[float] = field(default_factory=list)
    fresh_speech_ended_from_speech_end: list[float] = field(default_factory=list)
    fresh_ttft_from_speech_ended: list[float] = field(default_factory=list)
    early: int = 0
    takeovers: int = 0
    queries: int = 0
    false_takeovers: int = 0
    others: int = 0
    missed_answer_ended: int = 0  # the answer finished before the speech could interrupt it (trial void)
    splits: int = 0  # the question was cut into two or more segments (trial void for the latencies)
    fresh: int = 0
    fresh_rejected: int = 0  # a fresh question judged not meant for the assistant (no answer, no latency)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def ms(values: list[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.0f}"


def voiced_end_s(samples, threshold: float = 0.02) -> float:
    """Where the speech in a clip really ends (espeak pads a little silence)."""
    import numpy as np

    loud = np.flatnonzero(np.abs(samples) > threshold)
    return (loud[-1] + 1) / 16000 if loud.size else len(samples) / 16000


def config(setting: tuple[int | None, bool | None], **kwargs):
    from vita.client import session_config

    event = session_config(**kwargs)
    complete_silence_ms, preemptive = setting
    if complete_silence_ms is not None:
        event.config.vad.complete_silence_ms = complete_silence_ms
    if preemptive is not None:
        event.config.preemptive_generation = preemptive
    return event


def interruption_trial(client, speech, query: bool, results: Results, max_tokens: int,
                       setting: tuple[int | None, bool | None] = (None, None)) -> None:
    from vita.client import ConverseSession, speech_events, text_event

    arrivals: dict[int, float] = {}
    with ConverseSession(client, config(setting, max_tokens=max_tokens, ignore_eos=True),
                         on_event=lambda e: arrivals.setdefault(id(e), time.perf_counter())) as s:
        s.send(text_event("Tell me a long story."))
        first = s.wait("answer_started").turn_id
        s.wait("delta", turn_id=first)
        spoke_at, spoke_wall = time.perf_counter(), time.time()
        s.stream(speech_events(speech, realtime=True))
        speech_end = spoke_at + voiced_end_s(speech)
        judged = s.wait("judged", timeout_s=30, where=lambda e: e.judged.outcome == 1 or not e.judged.early)
        if query:
            results.queries += 1
            try:
                stopped = s.wait("interrupted", turn_id=first, timeout_s=10)
                new = s.wait("delta", timeout_s=30, where=lambda e: e.turn_id != first)
            except (TimeoutError, EOFError):
                if s.of("completed", first):
                    results.missed_answer_ended += 1
                return
            results.takeovers += 1
            results.early += judged.judged.early
            ends = s.of("speech_ended")  # received before the new answer's first token
            if len(ends) != 1:
                results.splits += 1
                return
            results.stop_from_speech_end.append(arrivals[id(stopped)] - speech_end)
            results.stop_from_cut.append(stopped.interrupted.stop_latency_s)
            results.first_token_from_speech_end.append(arrivals[id(new)] - speech_end)
            results.speech_ended_from_speech_end.append(arrivals[id(ends[0])] - speech_end)
            results.speech_ended_sent_from_speech_end.append(ends[0].timestamp_s - spoke_wall - voiced_end_s(speech))
            results.first_token_from_speech_ended.append(arrivals[id(new)] - arrivals[id(ends[0])])
        else:
            results.others += 1
            results.false_takeovers += judged.judged.outcome == 1  # judged a query: it would take the turn
        s.cancel()


def fresh_trial(client, speech, results: Results, setting: tuple[int | None, bool | None] = (None, None)) -> None:
    from vita.client import ConverseSession, speech_events

    arrivals: dict[int, float] = {}
    with ConverseSession(client, config(setting),
                         on_event=lambda e: arrivals.setdefault(id(e), time.perf_counter())) as s:
        spoke_at, spoke_wall = time.perf_counter(), time.time()
        s.stream(speech_events(speech, realtime=True))
        results.fresh += 1
        judged = s.wait("judged", timeout_s=30, where=lambda e: e.judged.outcome == 1 or not e.judged.early)
        if judged.judged.outcome != 1:  # the monitor took the question for speech not meant for it: no answer
            results.fresh_rejected += 1
            s.cancel()
            return
        first = s.wait("delta", timeout_s=30)
        ends = s.of("speech_ended")
        if len(ends) != 1:
            results.splits += 1
            s.cancel()
            return
        ended = ends[0]
        speech_end = spoke_at + voiced_end_s(speech)
        results.fresh_ttft_from_speech_end.append(arrivals[id(first)] - speech_end)
        results.fresh_speech_ended_from_speech_end.append(arrivals[id(ended)] - speech_end)
        results.speech_ended_sent_from_speech_end.append(ended.timestamp_s - spoke_wall - voiced_end_s(speech))
        results.fresh_ttft_from_speech_ended.append(arrivals[id(first)] - arrivals[id(ended)])
        s.cancel()


def vad_end_of_turn(clip, complete_silence_ms: int | None) -> tuple[float, float]:
    """Offline, the VAD alone: seconds from the clip's last loud sample to the pause it reports and to its end of
    turn, pushed in 20 ms chunks as the trials stream it (no machine load in it: the floor of the live figures)."""
    import numpy as np

    from vita.processing.vad import StreamingVAD, VADConfig

    defaults = VADConfig()
    silence = defaults.complete_silence_ms if complete_silence_ms is None else max(0, complete_silence_ms)
    vad = StreamingVAD(VADConfig(complete_silence_ms=silence))
    vad.report_pauses = True
    samples = np.concatenate([np.zeros(8000, np.float32), clip, np.zeros(24000, np.float32)])
    paused = ended = None
    for i in range(0, len(samples), 320):
        for event in vad.push(samples[i : i + 320]):
            if event.kind == "paused":
                paused = vad.position_s
            elif event.kind == "ended" and ended is None:
                ended = vad.position_s
    end = 0.5 + voiced_end_s(clip)
    return paused - end, ended - end


def rows(name: str, r: Results) -> list[str]:
    def row(what: str, values: list[float]) -> str:
        return f"| {name} | {what} | {ms(values, .5)} | {ms(values, .99)} | {len(values)} |"

    return [
        row("query end (last voiced sample) -> generator stopped", r.stop_from_speech_end),
        row("query cut by the VAD or early judgement -> generator stopped (server)", r.stop_from_cut),
        row("**query end -> first token of the new answer**", r.first_token_from_speech_end),
        row("query end -> SpeechEnded (the VAD's end of turn, as the client gets it)", r.speech_ended_from_speech_end),
        row("SpeechEnded -> first token of the new answer", r.first_token_from_speech_ended),
        row("any spoken question: end -> SpeechEnded sent (server clock, same machine)",
            r.speech_ended_sent_from_speech_end),
        row("**fresh spoken question: end of speech -> first token**", r.fresh_ttft_from_speech_end),
        row("fresh spoken question: end of speech -> SpeechEnded", r.fresh_speech_ended_from_speech_end),
        row("fresh spoken question: SpeechEnded -> first token", r.fresh_ttft_from_speech_ended),
    ]


def counts(name: str, r: Results) -> list[str]:
    return [
        f"- {name}: takeover rate on interrupting questions {r.takeovers}/{r.queries} "
        f"({r.takeovers / max(1, r.queries):.0%}), judged early (before the end of speech) {r.early}, answer "
        f"finished before the question could interrupt it {r.missed_answer_ended}; false takeovers on non-query "
        f"speech {r.false_takeovers}/{r.others}; fresh questions judged not meant for the assistant (no answer) "
        f"{r.fresh_rejected}/{r.fresh}; questions cut into two turns (left out of the latencies) {r.splits}",
    ]


def scrape(port: int, name: str) -> dict[str, float]:
    """Samples of one Prometheus metric, by their label text."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split("{", 1)[1].split("}", 1)[0] if "{" in line else "": float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--interruptions", type=int, default=20, help="trials with an interrupting question")
    parser.add_argument("--others", type=int, default=10, help="trials with non-query speech during an answer")
    parser.add_argument("--fresh", type=int, default=10, help="spoken questions with no answer streaming")
    parser.add_argument("--max-tokens", type=int, default=600, help="length of the answer that gets interrupted")
    parser.add_argument("--compare", action="store_true",
                        help="run every trial under each setting of SETTINGS in turn (before, the shortened "
                             "silence alone, with preemptive generation), side by side in one stack")
    parser.add_argument("--vad-only", action="store_true",
                        help="print, per setting, when the VAD alone reports the pause and ends the turn after the "
                             "last loud sample of each held-out question (offline, no stack), and exit")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)

    from vita.client import VitaClient
    from vita.stack import LocalStack
    from vita.training.duplex import build_duplex_checkpoint
    from vita.training.speech import OTHER_HELD_OUT, QUERY_HELD_OUT, espeak, prefetch

    model_dir = build_duplex_checkpoint()
    prefetch([(t, "query") for t in QUERY_HELD_OUT] + list(OTHER_HELD_OUT))
    queries = [espeak(t, "query") for t in QUERY_HELD_OUT]
    others = [espeak(t, v) for t, v in OTHER_HELD_OUT]
    settings = SETTINGS if args.compare or args.vad_only else {DEFAULTS: (None, None)}
    if args.vad_only:
        for name, (complete_silence_ms, _) in settings.items():
            paused, ended = zip(*(vad_end_of_turn(q, complete_silence_ms) for q in queries))
            print(f"{name}: pause reported {pct(paused, .5) * 1000:.0f} ms, end of turn {pct(ended, .5) * 1000:.0f} "
                  f"ms after the last loud sample (median of {len(queries)}; each: "
                  f"{', '.join(f'{e * 1000:.0f}' for e in ended)})")
        return 0
    results = {name: Results() for name in settings}
    names = list(settings)

    def each(k: int):  # every setting once per trial, in an order that rotates (no setting always goes first)
        return [names[(k + i) % len(names)] for i in range(len(names))]

    total = (args.interruptions + args.others + args.fresh) * len(settings)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as logs, \
            LocalStack(model_dir=str(model_dir), prefix=f"duplex{os.getpid()}", log_dir=logs, metrics=True) as stack, \
            VitaClient(stack.target, timeout_s=None) as client, tqdm(total=total, desc="trials") as bar:
        for name in names:
            fresh_trial(client, queries[0], Results(), settings[name])  # warm-up
        for k in range(args.interruptions):
            for name in each(k):
                interruption_trial(client, queries[k % len(queries)], True, results[name], args.max_tokens,
                                   settings[name])
                bar.update()
        for k in range(args.others):
            for name in each(k):
                interruption_trial(client, others[k % len(others)], False, results[name], args.max_tokens,
                                   settings[name])
                bar.update()
        for k in range(args.fresh):
            for name in each(k):
                fresh_trial(client, queries[k % len(queries)], results[name], settings[name])
                bar.update()
        preemptive = scrape(stack.service("orchestrator").metrics_port, "vita:preemptive_answers_total")
    load_after = os.getloadavg()

    command = "python benchmarks/duplex_latency.py" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv) if (sys.argv[1:] if argv is None else argv) else "")
    released = preemptive.get('outcome="released"', 0)
    discarded = preemptive.get('outcome="discarded"', 0)
    section = "\n".join([
        f"## Duplex latency: interruptions on the local stack ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
        "UTC)", "", f"Command: `{command}`", "",
        "Duplex fine-tuned tiny model (vita/training/duplex.py), every service a process on 127.0.0.1, Redis 7; "
        "speech is held-out espeak-ng phrases streamed in real time (20 ms chunks); VAD defaults (end after 160 ms "
        "of silence when the speech sounds finished, 400 ms when it cannot be judged, 800 ms when it sounds "
        "unfinished; early judgement at 600 ms of speech); "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load "
        f"average {load_before[0]:.1f} before the run, {load_after[0]:.1f} after.", "",
        "| setting | latency | p50 ms | p99 ms | n |", "|---|---|---:|---:|---:|",
        *[line for name in names for line in rows(name, results[name])], "",
        *[line for name in names for line in counts(name, results[name])],
        f"- preemptive answers (all settings, warm-ups included): {released:.0f} released at the end of the turn, "
        f"{discarded:.0f} discarded (speech resumed, or the history changed)", "",
    ])
    print(section)
    if not args.no_write:
        with args.output.open("a") as f:
            f.write("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
