"""The orchestrator's settings reach Converse as well as Generate.

They were once copied field by field into a second config, and `--encode-timeout` never reached Converse: here no
encoder runs, so both calls must give up after the configured wait and say so (real gRPC on loopback, real Redis).
"""

import asyncio
import uuid

import grpc
from redis.asyncio import Redis

from vita.bus.streams import BusConfig
from vita.client import image_event, session_config, text_event
from vita.grpc_server import GrpcService, ServiceServer
from vita.model.vita import read_model_config
from vita.orchestrator.service import AssistantService, OrchestratorConfig
from vita.processing.tokenizer import VitaTokenizer
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import ClientEvent, EndOfInput, GenerateRequest
from vita.v1.media_pb2 import Image


def test_encode_timeout_reaches_generate_and_converse(tiny_model_dir, wide_png):
    config = OrchestratorConfig(encode_timeout_s=0.4)

    async def scenario():
        redis = Redis.from_url("redis://127.0.0.1:6379/0")
        bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
        service = AssistantService(redis, bus, read_model_config(tiny_model_dir),
                                   VitaTokenizer.from_file(tiny_model_dir), config)
        server = ServiceServer([GrpcService("vita.v1.Assistant",
                                            lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))])
        await server.start()

        async def requests():
            yield session_config()
            yield image_event(wide_png)
            yield text_event("What is in the picture?")  # its image goes to the vision pool, where nobody listens
            yield ClientEvent(end=EndOfInput())

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = assistant_pb2_grpc.AssistantStub(channel)
                events = [e async for e in stub.Converse(requests())]
                try:
                    async for _ in stub.Generate(GenerateRequest(text="What is it?",
                                                                 images=[Image(data=wide_png.read_bytes())])):
                        pass
                except grpc.aio.AioRpcError as e:
                    generate_error = e
            return events, generate_error
        finally:
            await server.drain()
            keys = [k async for k in redis.scan_iter(f"{bus.prefix}:*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()

    events, generate_error = asyncio.run(scenario())
    errors = [e.error for e in events if e.HasField("error")]
    assert [e.code for e in errors] == [grpc.StatusCode.UNAVAILABLE.value[0]], events
    assert "within 0.4 s" in errors[0].message
    assert generate_error.code() == grpc.StatusCode.UNAVAILABLE and "within 0.4 s" in generate_error.details()
