"""Fault drills, N trials per kind, on the local process stack over a private redis-server (a free loopback port,
append-only file with fsync on every write; the shared 127.0.0.1:6379 is never touched).

Kinds: kill -9 mid-job of each worker kind (audio encoder, vision encoder, generator, monitor: a second replica
takes over), kill -9 of the orchestrator mid-answer (the session resumes on its restart), kill -9 of the
orchestrator while a Generate and a Converse answer stream (each worker stops its orphaned generation once the
orchestrator's lease on it expires), Redis stalled 5 s
(SIGSTOP), Redis down 5 s and restarted with its data, Redis restarted without its data, and a generator pool that
stops consuming while requests with a 4 s deadline arrive. Each drill is `vita.drills.Drills`; the test suite
(tests/e2e/test_faults.py) runs one trial of each. Counts "k of N" are appended to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
KINDS = ["audio-encoder", "vision-encoder", "llm-generator", "llm-monitor", "orchestrator", "orphaned-generations",
         "redis-stall", "redis-down-restart", "redis-restart-empty", "slow-consumer"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per kind")
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)

    import torch

    from vita.drills import LEASE_MARGIN_S, Drills, drill_stack
    from vita.stack import RedisServer
    from vita.tiny import build_tiny_checkpoint
    from vita.training.speech import espeak

    model_dir = args.model or str(build_tiny_checkpoint())
    counts: dict[str, list[bool]] = collections.defaultdict(list)
    failures: list[str] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vita-faults-") as tmp, \
            RedisServer(f"{tmp}/redis", persistent=True) as server, \
            drill_stack(model_dir, server, f"{tmp}/logs", prefix=f"faults{uuid.uuid4().hex[:8]}") as stack:
        drills = Drills(stack, server, espeak("what is in this picture", "query"))
        runs = {
            "orchestrator": drills.kill_orchestrator_mid_answer,
            "orphaned-generations": drills.orphaned_generations,
            "redis-stall": lambda: drills.redis_stall(5.0),
            "redis-down-restart": lambda: drills.redis_restart(keep_data=True, down_s=5.0),
            "redis-restart-empty": lambda: drills.redis_restart(keep_data=False),
            "slow-consumer": drills.slow_consumer,
        }
        for kind in args.kinds:
            for trial in range(args.trials):
                run = runs.get(kind) or (lambda kind=kind: drills.kill_worker_mid_job(kind))
                try:
                    outcome = run()
                    ok, detail = outcome.ok, outcome.detail
                except Exception as e:  # a drill that raised is a failed trial, reported, not a crash
                    ok, detail = False, f"{type(e).__name__}: {e}"
                counts[kind].append(ok)
                print(f"{kind} trial {trial + 1}: {'ok' if ok else 'FAILED'} ({detail})", flush=True)
                if not ok:
                    failures.append(f"{kind} trial {trial + 1}: {detail}")
    total_s = time.monotonic() - start
    command = "python benchmarks/faults.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"## Fault drills ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)", "",
        f"Command: `{command}`", "",
        f"Tiny model, every service a process on 127.0.0.1, a private redis-server {_redis_version()} (AOF, fsync "
        f"always); torch {torch.__version__}, {platform.machine()}, reclaim after 1.5 s, dead consumers removed "
        f"after 3 s; {total_s / 60:.1f} min in all. A trial passes when every request completed or ended with a "
        "clear status before its deadline, the session resumed (or, with the data lost, was refused NOT_FOUND and "
        "a new one was answered), the next request was answered, (kills) the dead consumer left its group, and "
        "(orphaned generations) each worker ended the killed orchestrator's generation CANCELLED within the "
        f"lease bound plus {LEASE_MARGIN_S:g} s of the kill.", "",
        "| fault | passed |", "|---|---:|",
        *(f"| {kind} | {sum(oks)} of {len(oks)} |" for kind, oks in counts.items()), "",
    ]
    if failures:
        lines += ["Failures:", "", *(f"- {f}" for f in failures), ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with args.output.open("a") as out:
            out.write("\n" + text)
    return 0 if not failures else 1


def _redis_version() -> str:
    import subprocess

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")


if __name__ == "__main__":
    sys.exit(main())
