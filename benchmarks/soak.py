"""Soak: 16 concurrent Converse sessions for N minutes on the local process stack, over a private redis-server.

Each client thread runs sessions of 8 turns (typed questions, every fourth one spoken, so both encoders and the
monitor work too), then hangs up and starts a new session, until the time is up. Every `--sample-s` the benchmark
samples, per service process, RSS, open file descriptors, OS threads and asyncio tasks (`vita:asyncio_tasks`);
Redis' used memory, expired keys and its key count by kind. Growth is measured from the sample taken after the
warm-up (a fifth of the run, at least a minute) to the last one. At the end it reports each TTL'd key kind's count,
mean size and time since its TTL was last set, and the memory it levels off at (measured creation rate x TTL x
size), the keys without a TTL and the job streams' lengths, and checks that no call and no generation is left open
(the orchestrator's `vita:converse_active_sessions` and the llm pools' `vita:num_requests_running` gauges are 0).
With `--heap-trace-s`, the orchestrator traces its heap (vita.telemetry.heap) and the report adds its log.
The figures are appended to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MiB), open fds and OS threads of one process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


def key_kind(name: str, prefix: str) -> str:
    """`reply`, `emb`, `session`, `session:frames`, `jobs`, ... of a key under `prefix:`."""
    parts = name.removeprefix(prefix + ":").split(":")
    return "session:" + parts[-1] if parts[0] == "session" and len(parts) > 2 else parts[0]


def redis_sample(redis, prefix: str) -> dict[str, object]:
    info = redis.info()
    kinds = collections.Counter(key_kind(k.decode(), prefix) for k in redis.scan_iter(match=f"{prefix}:*", count=1000))
    return {"used_mib": info["used_memory"] / 2**20, "expired": info["expired_keys"], "evicted": info["evicted_keys"],
            "keys": dict(sorted(kinds.items()))}


@dataclass
class KindReport:
    """Keys of one kind and TTL at the end: how many, how big, how long since each one's TTL was last set, and
    the count and memory they level off at."""

    kind: str
    ttl_s: float
    count: int = 0
    mean_bytes: float = 0.0
    ages_s: list[float] = field(default_factory=list)  # ttl - remaining: time since the last write that set it

    def rate_per_s(self, window_s: float) -> float:
        """Keys (re)written per second over the last `window_s` (<= ttl_s, so none of them has expired): the
        creation rate for keys written once or within seconds (replies, embeddings), an upper bound for keys
        written again while they live (sessions and their history's embeddings)."""
        return sum(age <= window_s for age in self.ages_s) / window_s

    def plateau(self, window_s: float) -> tuple[float, float]:
        """(keys, MiB) where the count levels off: every key lives ttl_s after its last write."""
        keys = self.rate_per_s(window_s) * self.ttl_s
        return keys, keys * self.mean_bytes / 2**20


def key_report(redis, prefix: str, ttls: dict[str, tuple[float, ...]], sample: int = 200
               ) -> tuple[list[KindReport], dict]:
    """A KindReport per kind and TTL (sizes from MEMORY USAGE of up to `sample` keys each), and the keys without a
    TTL with their length and size (the MAXLEN-trimmed job streams).

    `ttls`: the TTLs a kind's keys may be given, e.g. an embedding 600 s when written and the session's 1800 s once
    in a history; a key's is taken to be the shortest not below its remaining TTL (exact while the run is shorter
    than the gap between two of them).
    """
    reports: dict[tuple[str, float], KindReport] = {}
    sizes: dict[tuple[str, float], list[int]] = collections.defaultdict(list)
    no_ttl = {}
    for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        name = key.decode()
        kind, pttl = key_kind(name, prefix), redis.pttl(key)
        if pttl == -1:
            length = redis.xlen(key) if redis.type(key) == b"stream" else None
            no_ttl[name] = {"length": length, "kib": round((redis.memory_usage(key) or 0) / 1024, 1)}
            continue
        if kind not in ttls or pttl < 0:
            continue
        ttl = min((t for t in ttls[kind] if t * 1000 >= pttl), default=max(ttls[kind]))
        report = reports.setdefault((kind, ttl), KindReport(kind, ttl))
        report.count += 1
        report.ages_s.append(max(0.0, ttl - pttl / 1000))
        if len(sizes[kind, ttl]) < sample:
            sizes[kind, ttl].append(redis.memory_usage(key) or 0)
    for group, report in reports.items():
        report.mean_bytes = statistics.fmean(sizes[group])
    return sorted(reports.values(), key=lambda r: (r.kind, r.ttl_s)), no_ttl


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def heap_lines(log_path: Path) -> list[dict]:
    """The "heap growth" records of a service's JSON log (vita.telemetry.heap)."""
    records = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"heap growth"' in line:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by the process's end
                records.append(json.loads(line))
    return records


def heap_report(records: list[dict]) -> list[str]:
    if not records:
        return ["- heap trace: no record in the orchestrator's log (the run was shorter than --heap-trace-s?)"]
    lines = ["Orchestrator heap (tracemalloc, after a full gc; baseline = the first record, one interval after "
             "start), Python heap (since the baseline) / malloc in use / malloc free: "
             + ", ".join(f"{r['heap_mib']:.1f} MiB ({r['since_baseline_kib']:+.0f} KiB) / {r['malloc_in_use_mib']} / "
                         f"{r['malloc_free_mib']}" for r in records),
             "", "Allocation sites grown most since the baseline, at the last record:", ""]
    lines += [f"- {s['kib']:+.1f} KiB in {s['blocks']:+d} blocks: `{s['where']}`" for s in records[-1]["sites"]]
    lines += ["", f"Object types grown most since the baseline (live count): {records[-1]['types']}", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=16, help="concurrent Converse sessions")
    parser.add_argument("--max-tokens", type=int, default=24, help="per answer")
    parser.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--heap-trace-s", type=float, default=0.0,
                        help="the orchestrator logs its heap growth this often (slows it; 0: off)")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)

    import torch
    from redis import Redis

    from vita.bus.streams import BusConfig
    from vita.client import ConverseSession, VitaClient, session_config, speech_events, text_event
    from vita.stack import LocalStack, RedisServer
    from vita.tiny import build_tiny_checkpoint
    from vita.training.speech import espeak

    model_dir = args.model or str(build_tiny_checkpoint())
    clip = espeak("what is in this picture", "query")
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    bus = BusConfig()  # the stack runs with the defaults
    ttls = {"reply": (bus.reply_ttl_s,), "emb": (bus.embedding_ttl_s, bus.session_ttl_s),
            "cancel": (bus.cancel_ttl_s,), **dict.fromkeys(("session", "session:frames", "session:images"),
                                                          (bus.session_ttl_s,))}
    total_s = args.minutes * 60
    warmup_s = max(60.0, total_s / 5)
    turns: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    stop = threading.Event()
    extra = {"orchestrator": ["--heap-trace-s", str(args.heap_trace_s)]} if args.heap_trace_s else {}

    with tempfile.TemporaryDirectory(prefix="vita-soak-") as tmp, RedisServer(f"{tmp}/redis") as server, \
            LocalStack(model_dir=model_dir, redis_url=server.url, prefix=prefix, log_dir=f"{tmp}/logs",
                       metrics=True, extra_args=extra) as stack, Redis.from_url(server.url) as redis:

        def client_loop(k: int) -> None:
            with VitaClient(stack.target, timeout_s=None) as client:
                while not stop.is_set():
                    try:
                        with ConverseSession(client, session_config(max_tokens=args.max_tokens)) as s:
                            for turn in range(8):
                                if stop.is_set():
                                    break
                                if turn % 4 == 3:
                                    s.send(*speech_events(clip, realtime=False, chunk_ms=100))
                                    judged = s.wait("judged", timeout_s=300)
                                    turns["spoken"] += 1
                                    if judged.judged.outcome != judged.judged.QUERY:
                                        continue
                                    turn_id = judged.turn_id
                                else:
                                    s.send(text_event(f"Client {k}, question {turn}: tell me something."))
                                    turn_id = s.wait("answer_started", timeout_s=300).turn_id
                                    turns["typed"] += 1
                                s.wait("completed", turn_id=turn_id, timeout_s=300)
                            s.close(timeout_s=300)
                            turns["sessions"] += 1
                    except Exception as e:  # counted and reported; the client starts a new session
                        at = (time.monotonic() - start) / 60
                        errors.append(f"{at:.1f} min, client {k}: {type(e).__name__}: {e}"[:300])

        services = {s.name: (s.pid, s.metrics_port) for s in stack.services}

        def sample(t: float) -> dict:
            procs = {name: {**proc_sample(pid), "tasks": scrape(port, "vita:asyncio_tasks"),
                            "malloc_mib": scrape(port, "vita:malloc_in_use_bytes") / 2**20,
                            "malloc_free_mib": scrape(port, "vita:malloc_free_bytes") / 2**20}
                     for name, (pid, port) in services.items()}
            return {"t": t, "procs": procs, "redis": redis_sample(redis, prefix),
                    "turns": sum(turns[k] for k in ("typed", "spoken"))}

        threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(args.sessions)]
        start = time.monotonic()
        for t in threads:
            t.start()
        times = sorted({*(i * args.sample_s for i in range(1, int(total_s // args.sample_s) + 1)), warmup_s,
                        total_s})
        samples = []
        for at in times:
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            samples.append(sample(at))
        warm = next(s for s in samples if s["t"] == warmup_s)
        end = samples[-1]
        kinds, no_ttl = key_report(redis, prefix, ttls)
        stop.set()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - start
        orch, gen, mon = (stack.service(n).metrics_port for n in ("orchestrator", "llm-generator", "llm-monitor"))
        deadline = time.monotonic() + 60
        while scrape(orch, "vita:converse_active_sessions") and time.monotonic() < deadline:
            time.sleep(0.2)
        open_calls = scrape(orch, "vita:converse_active_sessions")
        running = scrape(gen, "vita:num_requests_running") + scrape(mon, "vita:num_requests_running")
        idle = sample(elapsed)
        heap = heap_lines(Path(stack.service("orchestrator").log_path)) if args.heap_trace_s else []

    measured_turns = sum(turns[k] for k in ("typed", "spoken")) - warm["turns"]
    command = "python benchmarks/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = []
    for name in services:
        w, e, a = warm["procs"][name], end["procs"][name], idle["procs"][name]
        growth = 100 * (e["rss_mib"] - w["rss_mib"]) / w["rss_mib"]
        rows.append(f"| {name} | {w['rss_mib']:.0f} | {e['rss_mib']:.0f} | {growth:+.1f}% | "
                    f"{w['fds']} / {e['fds']} / {a['fds']} | {w['threads']} / {e['threads']} / {a['threads']} | "
                    f"{w['tasks']:g} / {e['tasks']:g} / {a['tasks']:g} | "
                    f"{w['malloc_mib']:.0f} / {e['malloc_mib']:.0f} / {a['malloc_mib']:.0f} |")
    names = list(services)
    timeline = [f"| {s['t'] / 60:.1f}{' (warm)' if s is warm else ''} | {s['turns']} | "
                + " | ".join(f"{s['procs'][n]['rss_mib']:.0f}" for n in names)
                + " | {tasks:g} | {malloc_mib:.1f} / {malloc_free_mib:.1f}".format(**s["procs"]["orchestrator"])
                + f" | {s['redis']['used_mib']:.1f} | {s['redis']['expired']} | "
                + ", ".join(f"{k} {v}" for k, v in s["redis"]["keys"].items()) + " |" for s in samples]
    window_s = end["t"] - warm["t"]
    kind_rows, bound_mib = [], 0.0
    for k in kinds:
        w = min(window_s, k.ttl_s)
        keys, mib = k.plateau(w)
        bound_mib += mib
        ages = sorted(k.ages_s)
        kind_rows.append(f"| {k.kind} | {k.ttl_s:g} | {k.count} | {k.mean_bytes / 1024:.1f} | "
                         f"{ages[0]:.0f} / {statistics.median(ages):.0f} / {ages[-1]:.0f} | "
                         f"{k.rate_per_s(w):.2f} | {keys:.0f} | {mib:.1f} |")
    streams_kib = sum(v["kib"] for v in no_ttl.values())
    # A job stream keeps its acknowledged entries up to MAXLEN: at this run's mean entry size, what it holds then.
    streams_cap_mib = sum(v["kib"] / v["length"] * bus.jobs_maxlen / 1024 for v in no_ttl.values() if v["length"])
    lines = [
        f"## Soak: {args.sessions} concurrent Converse sessions ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "", f"Command: `{command}`", "",
        f"Tiny model, every service a process on 127.0.0.1, a private redis-server; torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other work. {elapsed / 60:.1f} min in all, "
        f"warm-up {warmup_s / 60:.1f} min; {turns['sessions']} sessions closed, {turns['typed']} typed and "
        f"{turns['spoken']} spoken turns ({measured_turns} after the warm-up); {len(errors)} client errors.", "",
        "| process | RSS after warm-up MiB | RSS at end MiB | growth | fds warm / end / idle | "
        "threads warm / end / idle | asyncio tasks warm / end / idle | malloc in use MiB warm / end / idle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Samples (RSS in MiB; Redis keys by kind):", "",
        "| min | turns | " + " | ".join(names) + " | orchestrator tasks | orchestrator malloc in use / free MiB "
        "| Redis MiB | expired keys | keys |",
        "|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|---|", *timeline, "",
        f"Keys with a TTL at the end (age: seconds since the TTL was last set; rate: keys written per second over the "
        f"last {window_s:.0f} s or the TTL if shorter; plateau: rate x TTL, where the count levels off):", "",
        "| kind | TTL s | keys | mean KiB | age min / median / max s | rate /s | plateau keys | plateau MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *kind_rows, "",
        f"- computed bound of the keys' data: {bound_mib:.1f} MiB for the TTL'd kinds at this load; job streams "
        f"{streams_kib / 1024:.1f} MiB now, {streams_cap_mib:.0f} MiB once each holds MAXLEN ~ {bus.jobs_maxlen} "
        f"entries of this run's mean size; Redis used memory {warm['redis']['used_mib']:.1f} MiB after warm-up, "
        f"{end['redis']['used_mib']:.1f} MiB at the end",
        f"- keys without a TTL at the end (streams bounded by MAXLEN instead): {no_ttl}",
        f"- after the clients hung up: open Converse calls {open_calls:g}, generations running {running:g}", "",
    ]
    if heap:
        lines += heap_report(heap)
    if errors:
        lines += ["Client errors (first 5):", "", *(f"- {e}" for e in errors[:5]), ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with args.output.open("a") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
