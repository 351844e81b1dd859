"""Latency through the local service stack vs the same engine in-process, side by side in one run.

Stack: client -> orchestrator (gRPC) -> Redis stream -> llm worker (torch backend) -> Redis reply stream ->
orchestrator -> client. In-process: the same torch backend (same continuous-batching engine, same batch size, the
generator service's engine settings, its engine core in a process of its own or in a thread as `--engine-process`
says for both) called directly. Both run the same greedy text prompts at 1 and 8 concurrent
clients, in rounds that alternate the two paths; time to first token and inter-token latency are measured where the
client sees them. The stack's overhead per token is the ratio of mean inter-token latencies at each level. Figures
are appended to BENCHMARKS.md with the command.

On a small machine the stack's other processes (orchestrator, Redis, the encoders, this benchmark's gRPC client)
take CPU from the engine, which the in-process run does not pay. `--isolate-engine` separates that from what the
stack adds on the token's path: the process that steps the engine (the engine core with `--engine-process`; else
the stack's llm generator and the benchmark itself for the in-process runs) runs on the first CPU with one torch
thread, every other process, Redis included, on the remaining
CPUs, as on a node where the generator has cores of its own. (Pinning only the engine's thread there and the
generator's asyncio thread elsewhere was slower: the two share the GIL, which then passes between CPUs.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


@dataclass
class Latencies:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def merge(self, other: Latencies) -> None:
        self.ttft += other.ttft
        self.itl += other.itl

    def add(self, arrivals: list[float], start: float) -> None:
        if arrivals:
            self.ttft.append(arrivals[0] - start)
            self.itl.extend(b - a for a, b in itertools.pairwise(arrivals))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` (0: this one) onto `cpus` (Linux); a thread started later inherits its
    creator's CPUs."""
    for tid in os.listdir(f"/proc/{pid or os.getpid()}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux 3.5+: /proc/PID/task/TID/children)."""
    return [int(child) for tid in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]


def local_redis_pid(client) -> int | None:
    """The Redis server's process id when it is a process of this machine we may pin (else None: Redis in a
    container or on another host, or another user's), from INFO's process_id."""
    pid = client.info("server")["process_id"]
    try:
        if not Path(f"/proc/{pid}/comm").read_text().startswith("redis"):
            return None
        os.sched_setaffinity(pid, os.sched_getaffinity(pid))  # raises PermissionError if it is not ours to pin
    except (FileNotFoundError, PermissionError):
        return None
    return pid


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def prompts(n: int) -> list[str]:
    return [f"Question {i}: describe the colour of object number {i} in one sentence." for i in range(n)]


async def stack_run(target: str, clients: int, requests: int, max_tokens: int, bar: tqdm) -> Latencies:
    import grpc

    from vita.client import build_request
    from vita.v1 import assistant_pb2_grpc

    lat = Latencies()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = assistant_pb2_grpc.AssistantStub(channel)

        async def client(k: int) -> None:
            for text in prompts(requests)[k::clients]:
                start, arrivals = time.perf_counter(), []
                async for r in stub.Generate(build_request(text, max_tokens=max_tokens)):
                    if r.HasField("delta") and r.delta.token_ids:
                        arrivals.append(time.perf_counter())
                lat.add(arrivals, start)
                bar.update()

        await asyncio.gather(*(client(k) for k in range(clients)))
    return lat


async def in_process_run(pipeline, model_dir: Path, engine_process: bool, engine_cpus: set[int] | None,
                         clients: int, requests: int, max_tokens: int, bar: tqdm) -> Latencies:
    """The same prompts on the generator's backend called directly: its engine in a thread of this process, or in
    an engine-core process of its own (`engine_process`; pinned to `engine_cpus` when given)."""
    from vita.llm.__main__ import load_backend, parse_args
    from vita.llm.backends.base import BackendRequest, PromptInput
    from vita.model.generation import SamplingParams
    from vita.telemetry.metrics import Metrics

    # The backend the llm generator builds from its own flags (chunked prefill and prefix caching on by default), so
    # both paths run the same engine.
    service = parse_args(["--role", "generator", "--threads", str(torch.get_num_threads()),
                          "--engine-process" if engine_process else "--no-engine-process"])
    backend = load_backend(service, model_dir, Metrics())
    await backend.start()
    if engine_process and engine_cpus:
        pin(backend.core.process.pid, engine_cpus)
    lat = Latencies()

    async def client(k: int) -> None:
        for i, text in enumerate(prompts(requests)[k::clients]):
            start, arrivals = time.perf_counter(), []
            inputs, _ = pipeline.processor(text)  # the same prompt template and tokenizer as the orchestrator
            request = BackendRequest(f"c{k}-{i}", PromptInput(inputs.input_ids), SamplingParams(max_tokens))
            async for out in backend.generate(request):
                if out.token_id is not None and out.token_id != pipeline.tokenizer.eos_id:
                    arrivals.append(time.perf_counter())
            lat.add(arrivals, start)
            bar.update()

    try:
        await asyncio.gather(*(client(k) for k in range(clients)))
    finally:
        await backend.close()
    return lat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="stack and in-process runs alternated this many times per level (the ratio by round "
                             "shows how much the machine's speed moved)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    parser.add_argument("--isolate-engine", action="store_true",
                        help="the engine's process (the llm generator; this one in-process) on the first CPU with one "
                             "torch thread, every other process (Redis included) on the other CPUs; needs 2+ CPUs")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="the generator's engine core in a process of its own on both paths (the llm service's "
                             "--engine-process; default: the service's default)")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="torch threads of the engine on both paths (the generator's --threads; default: "
                             "torch's choice, or 1 with --isolate-engine)")
    args = parser.parse_args(argv)
    if args.engine_process is None:
        from vita.llm.__main__ import parse_args as llm_args

        args.engine_process = llm_args([]).engine_process
    if args.rounds < 1 or args.requests < 2:
        parser.error("--rounds must be 1 or more and --requests 2 or more")
    all_cpus = os.sched_getaffinity(0)
    engine_cpus, other_cpus = {min(all_cpus)}, all_cpus - {min(all_cpus)}
    if args.isolate_engine:
        if not other_cpus:
            parser.error("--isolate-engine needs 2 or more CPUs")
        args.engine_threads = 1
    if args.engine_threads is not None:
        if args.engine_threads < 1:
            parser.error("--engine-threads must be 1 or more")
        torch.set_num_threads(args.engine_threads)

    from vita.inference import VitaPipeline
    from vita.stack import LocalStack
    from vita.tiny import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint()
    pipeline = VitaPipeline.load(model_dir)
    import redis

    results: dict[tuple[str, int], Latencies] = {}  # (path, clients) -> every round's latencies
    round_ratios: dict[int, list[float]] = {}  # clients -> stack / in-process mean ITL, one per round
    cpu: dict[int, dict[str, float]] = {}  # clients -> process -> CPU ms per streamed token, stack runs
    total = 2 * len(args.concurrency) * args.rounds * (args.requests + 4)
    extra = {"llm-generator": ["--threads", str(args.engine_threads)] * (args.engine_threads is not None)
             + ["--engine-process" if args.engine_process else "--no-engine-process"]}
    with tempfile.TemporaryDirectory() as logs, \
            LocalStack(model_dir=str(model_dir), prefix=f"bench{os.getpid()}", log_dir=logs,
                       extra_args=extra) as stack, \
            tqdm(total=total, desc="requests", unit="req") as bar:
        redis_pid = local_redis_pid(redis.Redis.from_url(stack.redis_url))
        redis_cpus = os.sched_getaffinity(redis_pid) if redis_pid else set()
        generator = next(s.pid for s in stack.services if s.name == "llm-generator")
        engine_pid = children(generator)[0] if args.engine_process else generator  # the process that steps
        if args.isolate_engine:
            for service in stack.services:
                pin(service.pid, other_cpus)
            pin(engine_pid, engine_cpus)
            if redis_pid:
                pin(redis_pid, other_cpus)
        try:
            for clients in args.concurrency:
                pids = {s.name: s.pid for s in stack.services}
                if engine_pid != generator:
                    pids["llm-generator engine core"] = engine_pid
                if redis_pid:
                    pids["redis"] = redis_pid
                pids["client (benchmark)"] = os.getpid()
                spent, tokens = dict.fromkeys(pids, 0.0), 0
                for _ in range(args.rounds):  # alternated, so a drift of the machine's speed hits both paths
                    if args.isolate_engine:
                        pin(0, other_cpus)
                    asyncio.run(stack_run(stack.target, clients, 4, args.max_tokens, bar))  # warm-up
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    stack_lat = asyncio.run(stack_run(stack.target, clients, args.requests, args.max_tokens, bar))
                    for name, pid in pids.items():
                        spent[name] += cpu_seconds(pid) - before[name]
                    tokens += len(stack_lat.itl) + len(stack_lat.ttft)
                    if args.isolate_engine and not args.engine_process:
                        pin(0, engine_cpus)
                    local = (pipeline, model_dir, args.engine_process, engine_cpus if args.isolate_engine else None)
                    asyncio.run(in_process_run(*local, clients, 4, args.max_tokens, bar))
                    local_lat = asyncio.run(in_process_run(*local, clients, args.requests, args.max_tokens, bar))
                    round_ratios.setdefault(clients, []).append(
                        statistics.fmean(stack_lat.itl) / statistics.fmean(local_lat.itl))
                    for path, lat in (("stack", stack_lat), ("in-process", local_lat)):
                        results.setdefault((path, clients), Latencies()).merge(lat)
                cpu[clients] = {name: seconds * 1e3 / tokens for name, seconds in spent.items()}
        finally:  # the machine's Redis is shared: give it back its CPUs
            if redis_pid:
                pin(redis_pid, redis_cpus)
            pin(0, all_cpus)

    rows = ["| path | clients | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL mean ms |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for (path, clients), lat in results.items():
        rows.append(f"| {path} | {clients} | {pct(lat.ttft, .5) * 1e3:.1f} | {pct(lat.ttft, .99) * 1e3:.1f} | "
                    f"{pct(lat.itl, .5) * 1e3:.2f} | {pct(lat.itl, .99) * 1e3:.2f} | "
                    f"{statistics.fmean(lat.itl) * 1e3:.2f} |")
    ratios = [f"- stack / in-process mean inter-token latency at {c} clients: "
              f"{statistics.fmean(results['stack', c].itl) / statistics.fmean(results['in-process', c].itl):.2f}x"
              + (f" over all rounds; by round {', '.join(f'{r:.2f}x' for r in round_ratios[c])}, median "
                 f"{statistics.median(round_ratios[c]):.2f}x" if args.rounds > 1 else "")
              for c in args.concurrency]
    names = list(next(iter(cpu.values())))
    cpu_rows = ["| clients | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    cpu_rows += [f"| {c} | " + " | ".join(f"{per[n]:.3f}" for n in names) + " |" for c, per in cpu.items()]
    command = "python benchmarks/serving.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                               if (argv if argv is not None else sys.argv[1:]) else "")
    section = "\n".join([
        f"## Serving: local stack vs in-process ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)", "",
        f"Command: `{command}`", "",
        f"Tiny model, greedy, {args.max_tokens} new tokens, {args.requests} text requests per level and round, "
        f"{args.rounds} round(s) alternating stack and in-process; torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Stack: "
        "orchestrator + llm worker (torch backend, batch 8) + encoders as processes on 127.0.0.1, Redis 7. "
        "In-process: the same torch backend with the generator's engine settings, called directly. "
        + ("Both with the engine core in a process of its own (--engine-process)." if args.engine_process else
           "Both with the engine in a thread of the calling process (--no-engine-process).")
        + (f" The engine's torch threads: {args.engine_threads}." if args.engine_threads else "")
        + (f" Engine isolated: the process that steps the engine (the engine core, or the llm generator's and the "
           f"in-process run's process) on CPUs {sorted(engine_cpus)} "
           f"every other process on CPUs {sorted(other_cpus)}"
           + (", Redis included." if redis_pid else "; Redis not pinned (not a process of this machine's user).")
           if args.isolate_engine else ""), "",
        *rows, "", *ratios, "",
        "CPU milliseconds per streamed token by process during the stack runs (/proc utime + stime):", "",
        *cpu_rows, "",
    ])
    print(section)
    if not args.no_write:
        with args.output.open("a") as f:
            f.write("\n" + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
