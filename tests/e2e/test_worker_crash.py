"""`kill -9` of the llm worker mid-answer: another worker reclaims the job and the client gets the whole answer."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid

import grpc
import pytest
from conftest import delete_prefix
from redis.asyncio import Redis

from vita.bus.streams import BusConfig
from vita.inference import GenerationRequest, VitaPipeline
from vita.model.generation import SamplingParams
from vita.orchestrator.service import AssistantService
from vita.runtime.ports import free_port
from vita.runtime.server import GrpcService, ServiceServer
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import Completed, GenerateRequest
from vita.v1.media_pb2 import SamplingParams as SamplingProto

MAX_TOKENS = 200


def long_prompt(pipeline) -> tuple[str, list[int]]:
    """A prompt whose greedy answer runs the full length, so the kill lands mid-answer."""
    for i in range(20):
        text = f"Tell me a long story number {i}."
        events = list(pipeline.stream(GenerationRequest(text=text, sampling=SamplingParams(MAX_TOKENS))))
        tokens = [t for e in events for t in e.token_ids]
        if len(tokens) == MAX_TOKENS:
            return text, tokens
    pytest.fail("no prompt with a full-length greedy answer on the tiny model")


def start_worker(model_dir, prefix) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vita.llm", "--role", "generator", "--model", str(model_dir), "--prefix", prefix,
         "--reclaim-idle-ms", "1500", "--grpc-port", str(free_port()), "--max-batch", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_killed_worker_job_is_reclaimed_and_completed(tiny_model_dir):
    pipeline = VitaPipeline.load(tiny_model_dir)
    text, expected = long_prompt(pipeline)
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    first = start_worker(tiny_model_dir, prefix)
    second = None

    async def main():
        nonlocal second
        redis = Redis.from_url("redis://127.0.0.1:6379/0")
        bus = BusConfig(prefix=prefix, reclaim_idle_ms=1500)
        service = AssistantService(redis, bus, pipeline.model.vita_config, pipeline.tokenizer)
        server = ServiceServer([GrpcService("vita.v1.Assistant",
                                            lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))])
        await server.start()
        tokens, done = [], None
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = assistant_pb2_grpc.AssistantStub(channel)
                call = stub.Generate(GenerateRequest(text=text, sampling=SamplingProto(max_tokens=MAX_TOKENS)),
                                     timeout=120)
                async for r in call:
                    if r.HasField("delta"):
                        tokens += list(r.delta.token_ids)
                        if len(tokens) == 20 and second is None:
                            os.kill(first.pid, signal.SIGKILL)  # mid-answer, no chance to ack or clean up
                            first.wait()
                            second = start_worker(tiny_model_dir, prefix)
                    else:
                        done = r.completed
        finally:
            await server.drain()
            delete_prefix(prefix)
            await redis.aclose()
        return tokens, done

    try:
        tokens, done = asyncio.run(main())
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    assert second is not None, "the worker was never killed: the answer ended too soon"
    assert tokens == expected  # no token lost, none repeated: the rerun's events already relayed are dropped
    assert done.finish_reason == Completed.LENGTH and done.usage.completion_tokens == MAX_TOKENS
