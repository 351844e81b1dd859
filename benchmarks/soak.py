"""Soak: 16 concurrent Converse sessions for N minutes on the local process stack, over a private redis-server.

Each client thread runs sessions of 8 turns (typed questions, every fourth one spoken, so both encoders and the
monitor work too), then hangs up and starts a new session, until the time is up. After a warm-up (a fifth of the
run, at least a minute) the benchmark samples, per service process, RSS, open file descriptors and OS threads;
Redis' used memory, its key count by kind, which keys have no TTL, and the job streams' lengths. At the end it
checks that no call and no generation is left open (the orchestrator's `vita:converse_active_sessions` and the
llm pools' `vita:num_requests_running` gauges are 0). The figures are appended to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MiB), open fds and OS threads of one process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"])}


def redis_sample(redis, prefix: str) -> dict[str, object]:
    keys = list(redis.scan_iter(match=f"{prefix}:*", count=1000))
    kinds: collections.Counter[str] = collections.Counter()
    no_ttl: collections.Counter[str] = collections.Counter()
    streams = {}
    for key in keys:
        name = key.decode()
        kind = name.removeprefix(prefix + ":").split(":")[0]
        kinds[kind] += 1
        if redis.pttl(key) == -1:
            no_ttl[":".join(name.split(":")[:3])] += 1
        if kind in ("jobs", "dead"):
            streams[name] = redis.xlen(key)
    return {"used_mib": redis.info("memory")["used_memory"] / 2**20, "keys": dict(kinds), "no_ttl": dict(no_ttl),
            "streams": streams}


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=16, help="concurrent Converse sessions")
    parser.add_argument("--max-tokens", type=int, default=24, help="per answer")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)

    import torch
    from redis import Redis

    from vita.client import ConverseSession, VitaClient, session_config, speech_events, text_event
    from vita.stack import LocalStack, RedisServer
    from vita.tiny import build_tiny_checkpoint
    from vita.training.speech import espeak

    model_dir = args.model or str(build_tiny_checkpoint())
    clip = espeak("what is in this picture", "query")
    prefix = f"soak{uuid.uuid4().hex[:8]}"
    total_s = args.minutes * 60
    warmup_s = max(60.0, total_s / 5)
    turns: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    stop = threading.Event()

    with tempfile.TemporaryDirectory(prefix="vita-soak-") as tmp, RedisServer(f"{tmp}/redis") as server, \
            LocalStack(model_dir=model_dir, redis_url=server.url, prefix=prefix, log_dir=f"{tmp}/logs",
                       metrics=True) as stack, Redis.from_url(server.url) as redis:

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
                        errors.append(f"client {k}: {type(e).__name__}: {e}"[:300])

        services = {s.name: s.pid for s in stack.services}
        threads = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(args.sessions)]
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(warmup_s)
        warm = {name: proc_sample(pid) for name, pid in services.items()}
        warm_redis = redis_sample(redis, prefix)
        warm_turns = sum(turns[k] for k in ("typed", "spoken"))
        time.sleep(max(0.0, total_s - (time.monotonic() - start)))
        end = {name: proc_sample(pid) for name, pid in services.items()}
        end_redis = redis_sample(redis, prefix)
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
        after = {name: proc_sample(pid) for name, pid in services.items()}

    measured_turns = sum(turns[k] for k in ("typed", "spoken")) - warm_turns
    command = "python benchmarks/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = []
    for name in services:
        w, e, a = warm[name], end[name], after[name]
        growth = 100 * (e["rss_mib"] - w["rss_mib"]) / w["rss_mib"]
        rows.append(f"| {name} | {w['rss_mib']:.0f} | {e['rss_mib']:.0f} | {growth:+.1f}% | "
                    f"{w['fds']} / {e['fds']} / {a['fds']} | {w['threads']} / {e['threads']} / {a['threads']} |")
    lines = [
        f"## Soak: {args.sessions} concurrent Converse sessions ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)",
        "", f"Command: `{command}`", "",
        f"Tiny model, every service a process on 127.0.0.1, a private redis-server; torch {torch.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other work. {elapsed / 60:.1f} min in all, "
        f"warm-up {warmup_s / 60:.1f} min; {turns['sessions']} sessions closed, {turns['typed']} typed and "
        f"{turns['spoken']} spoken turns ({measured_turns} after the warm-up); {len(errors)} client errors.", "",
        "| process | RSS after warm-up MiB | RSS at end MiB | growth | fds warm / end / idle | threads warm / end / idle |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"- Redis used memory: {warm_redis['used_mib']:.1f} MiB after warm-up, {end_redis['used_mib']:.1f} MiB at "
        f"the end; keys by kind after warm-up {warm_redis['keys']}, at the end {end_redis['keys']}",
        f"- job and dead-letter stream lengths at the end (MAXLEN ~ 10000): {end_redis['streams']}",
        f"- keys without a TTL at the end (streams bounded by MAXLEN instead): {end_redis['no_ttl']}",
        f"- after the clients hung up: open Converse calls {open_calls:g}, generations running {running:g}", "",
    ]
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
