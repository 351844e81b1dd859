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

The VAD needs `end_silence_ms` (400 ms by default) of silence to know speech ended; numbers "from the end of
speech" include it unless the judgement came early. Figures and the command are appended to BENCHMARKS.md.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


@dataclass
class Results:
    stop_from_speech_end: list[float] = field(default_factory=list)
    stop_from_cut: list[float] = field(default_factory=list)
    first_token_from_speech_end: list[float] = field(default_factory=list)
    fresh_ttft_from_speech_end: list[float] = field(default_factory=list)
    early: int = 0
    takeovers: int = 0
    queries: int = 0
    false_takeovers: int = 0
    others: int = 0
    missed_answer_ended: int = 0  # the answer finished before the speech could interrupt it (trial void)


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


def interruption_trial(client, speech, query: bool, results: Results, max_tokens: int) -> None:
    from vita.client import ConverseSession, session_config, speech_events, text_event

    arrivals: dict[int, float] = {}
    with ConverseSession(client, session_config(max_tokens=max_tokens, ignore_eos=True),
                         on_event=lambda e: arrivals.setdefault(id(e), time.perf_counter())) as s:
        s.send(text_event("Tell me a long story."))
        first = s.wait("answer_started").turn_id
        s.wait("delta", turn_id=first)
        spoke_at = time.perf_counter()
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
            results.stop_from_speech_end.append(arrivals[id(stopped)] - speech_end)
            results.stop_from_cut.append(stopped.interrupted.stop_latency_s)
            results.first_token_from_speech_end.append(arrivals[id(new)] - speech_end)
        else:
            results.others += 1
            results.false_takeovers += judged.judged.outcome == 1  # judged a query: it would take the turn
        s.cancel()


def fresh_trial(client, speech, results: Results) -> None:
    from vita.client import ConverseSession, speech_events

    arrivals: dict[int, float] = {}
    with ConverseSession(client, on_event=lambda e: arrivals.setdefault(id(e), time.perf_counter())) as s:
        spoke_at = time.perf_counter()
        s.stream(speech_events(speech, realtime=True))
        first = s.wait("delta", timeout_s=30)
        results.fresh_ttft_from_speech_end.append(arrivals[id(first)] - (spoke_at + voiced_end_s(speech)))
        s.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--interruptions", type=int, default=20, help="trials with an interrupting question")
    parser.add_argument("--others", type=int, default=10, help="trials with non-query speech during an answer")
    parser.add_argument("--fresh", type=int, default=10, help="spoken questions with no answer streaming")
    parser.add_argument("--max-tokens", type=int, default=600, help="length of the answer that gets interrupted")
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
    results = Results()
    total = args.interruptions + args.others + args.fresh
    with tempfile.TemporaryDirectory() as logs, \
            LocalStack(model_dir=str(model_dir), prefix=f"duplex{os.getpid()}", log_dir=logs) as stack, \
            VitaClient(stack.target, timeout_s=None) as client, tqdm(total=total, desc="trials") as bar:
        fresh_trial(client, queries[0], Results())  # warm-up
        for k in range(args.interruptions):
            interruption_trial(client, queries[k % len(queries)], True, results, args.max_tokens)
            bar.update()
        for k in range(args.others):
            interruption_trial(client, others[k % len(others)], False, results, args.max_tokens)
            bar.update()
        for k in range(args.fresh):
            fresh_trial(client, queries[k % len(queries)], results)
            bar.update()

    r = results
    rows = [
        "| latency | p50 ms | p99 ms | n |", "|---|---:|---:|---:|",
        f"| query end (last voiced sample) -> generator stopped | {ms(r.stop_from_speech_end, .5)} | "
        f"{ms(r.stop_from_speech_end, .99)} | {len(r.stop_from_speech_end)} |",
        f"| query cut by the VAD or early judgement -> generator stopped (server) | {ms(r.stop_from_cut, .5)} | "
        f"{ms(r.stop_from_cut, .99)} | {len(r.stop_from_cut)} |",
        f"| query end -> first token of the new answer | {ms(r.first_token_from_speech_end, .5)} | "
        f"{ms(r.first_token_from_speech_end, .99)} | {len(r.first_token_from_speech_end)} |",
        f"| fresh spoken question: end of speech -> first token | {ms(r.fresh_ttft_from_speech_end, .5)} | "
        f"{ms(r.fresh_ttft_from_speech_end, .99)} | {len(r.fresh_ttft_from_speech_end)} |",
    ]
    counts = [
        f"- takeover rate on interrupting questions: {r.takeovers}/{r.queries} "
        f"({r.takeovers / max(1, r.queries):.0%}); judged early (before the end of speech): {r.early}; "
        f"answer finished before the question could interrupt it: {r.missed_answer_ended}",
        f"- false takeovers on non-query speech: {r.false_takeovers}/{r.others}",
    ]
    command = "python benchmarks/duplex_latency.py" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv) if (sys.argv[1:] if argv is None else argv) else "")
    section = "\n".join([
        f"## Duplex latency: interruptions on the local stack ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} "
        "UTC)", "", f"Command: `{command}`", "",
        "Duplex fine-tuned tiny model (vita/training/duplex.py), every service a process on 127.0.0.1, Redis 7; "
        "speech is held-out espeak-ng phrases streamed in real time (20 ms chunks); VAD defaults (end after 400 ms "
        f"of silence, early judgement at 600 ms of speech); torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.", "",
        *rows, "", *counts, "",
    ])
    print(section)
    if not args.no_write:
        with args.output.open("a") as f:
            f.write("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
