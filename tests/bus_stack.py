"""A small stack in one event loop for tests that vary how the parts connect (tokens, TLS, Redis ACL users,
Redis TLS, Redis Cluster): the orchestrator's gRPC server, an llm generator worker and, optionally, a vision
encoder worker or every pool, all on real Redis and real loopback gRPC. `stack_in_thread` runs it with every pool
in a background event loop, for synchronous tests (the fuzzers) and clients in other processes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from conftest import REDIS_URL
from redis.asyncio import Redis

from vita.bus.cancel import CancelWatcher, cancel
from vita.bus.streams import BusConfig
from vita.client import END, image_event, session_config, text_event
from vita.encoders.__main__ import ENCODERS
from vita.encoders.base import load_encoder
from vita.encoders.worker import EncoderWorker
from vita.encoders.worker import WorkerConfig as EncoderConfig
from vita.inference import VitaPipeline
from vita.llm.backends.torch.backend import TorchBackend
from vita.llm.worker import LLMWorker, WorkerConfig
from vita.orchestrator.service import AssistantService, OrchestratorConfig
from vita.runtime.redis_client import RedisSettings, connect
from vita.runtime.server import GrpcService, ServiceServer
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import Completed, GenerateRequest
from vita.v1.bus_pb2 import GenerationJob
from vita.v1.media_pb2 import Image, SamplingParams


@dataclass
class Stack:
    server: ServiceServer
    service: AssistantService

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def running_stack(pipeline: VitaPipeline, model_dir: Path, redis: Any, bus: BusConfig, *,
                        vision: bool = False, all_pools: bool = False, config: OrchestratorConfig | None = None,
                        workers_may_fail: bool = False, **server_kwargs: Any) -> AsyncIterator[Stack]:
    """`redis` may be a Redis or a RedisCluster client; `server_kwargs` go to ServiceServer (access, tls...).
    `all_pools`: the monitor pool (on the generator's backend) and both encoders too, as Converse needs them.
    A worker that died with an error re-raises it at the end, unless `workers_may_fail`."""
    service = AssistantService(redis, bus, pipeline.model.vita_config, pipeline.tokenizer, config)
    server = ServiceServer([GrpcService("vita.v1.Assistant",
                                        lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))],
                           **server_kwargs)
    await server.start()
    backend = TorchBackend(pipeline.model, max_batch_size=4)
    await backend.start()
    roles = (GenerationJob.GENERATOR, GenerationJob.MONITOR) if all_pools else (GenerationJob.GENERATOR,)
    workers: list[Any] = [LLMWorker(redis, bus, backend, pipeline.tokenizer, WorkerConfig(role=role, max_concurrency=4))
                          for role in roles]
    for pool in ("vision-encoder",) * (vision or all_pools) + ("audio-encoder",) * all_pools:
        encoder = load_encoder(ENCODERS[pool][0], model_dir, "cpu", "float32")
        workers.append(EncoderWorker(redis, bus, encoder, EncoderConfig(max_batch=2)))
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield Stack(server, service)
    finally:
        for w in workers:
            w.stop()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        await backend.close()
        await server.drain()
        for outcome in outcomes:
            if isinstance(outcome, Exception) and not workers_may_fail:
                raise outcome


@contextlib.contextmanager
def stack_in_thread(pipeline: VitaPipeline, model_dir: Path, bus: BusConfig,
                    config: OrchestratorConfig | None = None) -> Iterator[str]:
    """`running_stack` with every pool on the shared Redis, in an event loop of its own thread; yields the
    orchestrator's address. Deleting the prefix's keys afterwards is the caller's."""
    ready, box = threading.Event(), {}

    async def main() -> None:
        box["stop"] = stop = asyncio.Event()
        redis = Redis.from_url(REDIS_URL)
        try:
            async with running_stack(pipeline, model_dir, redis, bus, all_pools=True, config=config) as stack:
                box["target"] = stack.target
                ready.set()
                await stop.wait()
        finally:
            ready.set()  # a stack that failed to start must not leave the caller waiting
            await redis.aclose()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(300) and "target" in box, "the in-process stack did not start"
    try:
        yield box["target"]
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(60)


async def generate(stub: assistant_pb2_grpc.AssistantStub, request: GenerateRequest | str, *,
                   metadata: tuple[tuple[str, str], ...] = (), max_tokens: int = 4,
                   timeout: float = 120) -> tuple[str, Completed]:
    """The whole answer and its Completed record; raises grpc.aio.AioRpcError as the call does."""
    if isinstance(request, str):
        request = GenerateRequest(text=request, sampling=SamplingParams(max_tokens=max_tokens))
    parts, done = [], None
    async for r in stub.Generate(request, metadata=metadata, timeout=timeout):
        if r.HasField("delta"):
            parts.append(r.delta.text)
        else:
            done = r.completed
    assert done is not None, "the stream ended without a Completed response"
    return "".join(parts), done


def channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    return (grpc.aio.insecure_channel(target) if credentials is None
            else grpc.aio.secure_channel(target, credentials))


async def bus_traffic(pipeline, model_dir, settings: RedisSettings, prefix: str, png: bytes):
    """Everything the services send on the bus, through a client made from `settings`."""
    client = connect(settings, socket_timeout=30)
    bus = BusConfig(prefix=prefix)
    try:
        async with running_stack(pipeline, model_dir, client, bus, vision=True) as stack, \
                channel(stack.target) as ch:
            stub = assistant_pb2_grpc.AssistantStub(ch)
            _, text_done = await generate(stub, "hello there", timeout=20)
            _, image_done = await generate(stub, GenerateRequest(
                text="what is this?", images=[Image(data=png)], sampling=SamplingParams(max_tokens=3)))

            async def converse():
                yield session_config(max_tokens=3)
                yield image_event(png)
                yield text_event("what is in the picture?")
                yield END

            events = [e async for e in stub.Converse(converse())]
            heard: list[str] = []

            async def on_cancel(request_id: str) -> None:
                heard.append(request_id)

            async with CancelWatcher(client, bus, on_cancel=on_cancel) as watcher:
                await watcher.watch("req-1")
                await cancel(client, bus, "req-1")
                while not heard:
                    await asyncio.sleep(0.01)
            return text_done, image_done, events, heard
    finally:
        await client.aclose()


def check_traffic(text_done, image_done, events, heard):
    assert text_done.usage.completion_tokens >= 1
    assert image_done.usage.image_tokens > 0 and image_done.usage.completion_tokens >= 1
    kinds = [e.WhichOneof("event") for e in events]
    assert "error" not in kinds, [e.error for e in events if e.HasField("error")]
    assert "session_started" in kinds and "completed" in kinds, kinds
    assert heard == ["req-1"]
