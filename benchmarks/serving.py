"""Latency through the local service stack vs the same engine in-process, side by side in one run.

Stack: client -> orchestrator (gRPC) -> Redis stream -> llm worker (torch backend) -> Redis reply stream ->
orchestrator -> client. In-process: the same TorchBackend (same continuous-batching engine, same batch size) called
directly. Both run the same greedy text prompts at 1 and 8 concurrent clients; time to first token and
inter-token latency are measured where the client sees them. The stack's overhead per token is the ratio of mean
inter-token latencies at 8 clients. Figures are appended to BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import asyncio
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

    def add(self, arrivals: list[float], start: float) -> None:
        if arrivals:
            self.ttft.append(arrivals[0] - start)
            self.itl.extend(b - a for a, b in itertools.pairwise(arrivals))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def in_process_run(pipeline, clients: int, requests: int, max_tokens: int, bar: tqdm) -> Latencies:
    from vita.llm.backends.base import BackendRequest, PromptInput
    from vita.llm.backends.torch.backend import TorchBackend
    from vita.model.generation import SamplingParams

    backend = TorchBackend(pipeline.model, max_batch_size=8)
    await backend.start()
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
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to --output")
    args = parser.parse_args(argv)

    from vita.inference import VitaPipeline
    from vita.stack import LocalStack
    from vita.tiny import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint()
    pipeline = VitaPipeline.load(model_dir)
    import redis

    results: dict[tuple[str, int], Latencies] = {}
    cpu: dict[int, dict[str, float]] = {}  # clients -> process -> CPU ms per streamed token, stack runs
    total = 2 * len(args.concurrency) * (args.requests + 4)
    with tempfile.TemporaryDirectory() as logs, \
            LocalStack(model_dir=str(model_dir), prefix=f"bench{os.getpid()}", log_dir=logs) as stack, \
            tqdm(total=total, desc="requests", unit="req") as bar:
        for clients in args.concurrency:
            asyncio.run(stack_run(stack.target, clients, 4, args.max_tokens, bar))  # warm-up
            pids = {s.name: s.pid for s in stack.services}
            pids["redis"] = redis.Redis.from_url(stack.redis_url).info("server")["process_id"]
            pids["client (benchmark)"] = os.getpid()
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            results["stack", clients] = lat = asyncio.run(stack_run(stack.target, clients, args.requests,
                                                                    args.max_tokens, bar))
            tokens = len(lat.itl) + len(lat.ttft)
            cpu[clients] = {name: (cpu_seconds(pid) - before[name]) * 1e3 / tokens for name, pid in pids.items()}
            asyncio.run(in_process_run(pipeline, clients, 4, args.max_tokens, bar))
            results["in-process", clients] = asyncio.run(in_process_run(pipeline, clients, args.requests,
                                                                        args.max_tokens, bar))

    rows = ["| path | clients | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL mean ms |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for (path, clients), lat in results.items():
        rows.append(f"| {path} | {clients} | {pct(lat.ttft, .5) * 1e3:.1f} | {pct(lat.ttft, .99) * 1e3:.1f} | "
                    f"{pct(lat.itl, .5) * 1e3:.2f} | {pct(lat.itl, .99) * 1e3:.2f} | "
                    f"{statistics.fmean(lat.itl) * 1e3:.2f} |")
    ratios = [f"- stack / in-process mean inter-token latency at {c} clients: "
              f"{statistics.fmean(results['stack', c].itl) / statistics.fmean(results['in-process', c].itl):.2f}x"
              for c in args.concurrency]
    names = list(next(iter(cpu.values())))
    cpu_rows = ["| clients | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    cpu_rows += [f"| {c} | " + " | ".join(f"{per[n]:.3f}" for n in names) + " |" for c, per in cpu.items()]
    command = "python benchmarks/serving.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                               if (argv if argv is not None else sys.argv[1:]) else "")
    section = "\n".join([
        f"## Serving: local stack vs in-process ({datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC)", "",
        f"Command: `{command}`", "",
        f"Tiny model, greedy, {args.max_tokens} new tokens, {args.requests} text requests per level; torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Stack: "
        "orchestrator + llm worker (torch backend, batch 8) + encoders as processes on 127.0.0.1, Redis 7. "
        "In-process: the same TorchBackend called directly.", "",
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
