"""The public API's access checks over real loopback gRPC, real Redis and a real llm worker: bearer tokens,
health and reflection left open for probes, mutual TLS, the per-token rate limit and session limit, the input
limits, and the Python client and `vita` CLI sending a token."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import delete_prefix
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from tests.bus_stack import channel, generate, running_stack
from tests.certs import CertificateAuthority
from vita import cli
from vita.bus.streams import BusConfig
from vita.client import VitaClient, session_config
from vita.inference import VitaPipeline
from vita.orchestrator.limits import InputLimits
from vita.orchestrator.service import OrchestratorConfig
from vita.runtime.access import AccessPolicy
from vita.runtime.ports import free_port
from vita.runtime.tls import ServerTLS, channel_credentials
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import ClientEvent, EndOfInput, GenerateRequest
from vita.v1.media_pb2 import Image, SamplingParams, TimestampedFrame, Video

TOKENS = frozenset({"alpha-token", "beta-token"})
ALPHA = (("authorization", "Bearer alpha-token"),)
BETA = (("authorization", "Bearer beta-token"),)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


def run(pipeline, tiny_model_dir, body, *, credentials=None, config=None, **server_kwargs):
    async def main():
        redis = Redis.from_url("redis://127.0.0.1:6379/0")
        bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
        try:
            async with running_stack(pipeline, tiny_model_dir, redis, bus, config=config,
                                     **server_kwargs) as stack, channel(stack.target, credentials) as ch:
                return await body(assistant_pb2_grpc.AssistantStub(ch), ch, stack)
        finally:
            delete_prefix(bus.prefix)
            await redis.aclose()

    return asyncio.run(main())


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def test_tokens_guard_the_api_but_not_health_or_reflection(pipeline, tiny_model_dir):
    async def body(stub, ch, stack):
        missing = await refused(generate(stub, "hello"))
        wrong = await refused(generate(stub, "hello", metadata=(("authorization", "Bearer nope"),)))
        not_bearer = await refused(generate(stub, "hello", metadata=(("authorization", "Basic YWxwaGE="),)))
        _, done = await generate(stub, "hello", metadata=ALPHA)
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="vita.v1.Assistant"))
        listed = [r async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        return missing, wrong, not_bearer, done, health, listed

    missing, wrong, not_bearer, done, health, listed = run(pipeline, tiny_model_dir, body,
                                                           access=AccessPolicy(tokens=TOKENS))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in missing.details()
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and wrong.details() == "unknown bearer token"
    assert not_bearer.code() == grpc.StatusCode.UNAUTHENTICATED
    assert done.usage.completion_tokens >= 1
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    names = {s.name for s in listed[0].list_services_response.service}
    assert "vita.v1.Assistant" in names


def test_converse_needs_a_token_too_and_sessions_per_token_are_limited(pipeline, tiny_model_dir):
    async def body(stub, ch, stack):
        async def first_event(metadata):
            call = stub.Converse(metadata=metadata)
            await call.write(session_config())
            return call, await call.read()

        anonymous = await refused(first_event(()))
        one, started = await first_event(ALPHA)
        second = await refused(first_event(ALPHA))
        other, other_started = await first_event(BETA)  # another token has its own allowance
        counts = dict(stack.server.access.sessions)
        for call in (one, other):
            await call.write(ClientEvent(end=EndOfInput()))
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        while stack.server.access.sessions:  # the slots free when the calls end on the server
            await asyncio.sleep(0.02)
        again, again_started = await first_event(ALPHA)
        again.cancel()
        return anonymous, started, second, other_started, counts, again_started

    anonymous, started, second, other_started, counts, again_started = run(
        pipeline, tiny_model_dir, body, access=AccessPolicy(tokens=TOKENS, max_sessions=1))
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    assert started.HasField("session_started") and other_started.HasField("session_started")
    assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 open Converse sessions" in second.details()
    assert sorted(counts.values()) == [1, 1]
    assert again_started.HasField("session_started")


def test_rate_limit_is_per_token_with_retry_info(pipeline, tiny_model_dir):
    async def body(stub, ch, stack):
        ok = [await generate(stub, "hi", metadata=ALPHA, max_tokens=1) for _ in range(2)]
        call = stub.Generate(GenerateRequest(text="hi"), metadata=ALPHA)
        err = await refused(call.read())
        trailers = await call.trailing_metadata()
        other = await generate(stub, "hi", metadata=BETA, max_tokens=1)
        return ok, err, trailers, other

    # 0.01 calls/s: the bucket refills one call in 100 s, so the third call is refused however slow the machine.
    ok, err, trailers, other = run(pipeline, tiny_model_dir, body,
                                   access=AccessPolicy(tokens=TOKENS, rate_per_s=0.01, burst=2))
    assert len(ok) == 2 and other[1].usage.completion_tokens >= 1
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in err.details()
    details = dict(trailers)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    retry = error_details_pb2.RetryInfo()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and status.details[0].Unpack(retry)
    assert 90 <= retry.retry_delay.seconds <= 100


def test_mutual_tls_and_the_plaintext_health_port(pipeline, tiny_model_dir, tmp_path):
    ca = CertificateAuthority(tmp_path, "vita CA")
    rogue = CertificateAuthority(tmp_path, "rogue CA")
    server = ca.issue("orchestrator", server=True)
    client = ca.issue("product-backend", server=False)
    stranger = rogue.issue("stranger", server=False)
    tls = ServerTLS(str(server.cert), str(server.key), str(ca.ca_file))
    health_port = free_port()

    async def body(stub, ch, stack):
        _, done = await generate(stub, "hello", metadata=ALPHA)
        outcomes = {}
        for name, creds in {"no client certificate": channel_credentials(ca.ca_file),
                            "a certificate of another CA": channel_credentials(ca.ca_file, stranger.cert,
                                                                               stranger.key)}.items():
            async with channel(stack.target, creds) as other:
                outcomes[name] = await refused(generate(assistant_pb2_grpc.AssistantStub(other), "hi",
                                                        metadata=ALPHA))
        async with channel(stack.target) as plaintext:
            outcomes["plaintext"] = await refused(generate(assistant_pb2_grpc.AssistantStub(plaintext), "hi"))
        async with channel(f"127.0.0.1:{stack.server.health_port}") as probe:
            health = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest())

        def sync_client():  # the blocking client, as a product backend would use it
            with VitaClient(stack.target, token="alpha-token", tls_ca=ca.ca_file, tls_cert=client.cert,
                            tls_key=client.key) as c:
                return c.ask("hello", max_tokens=2)

        _, completed = await asyncio.to_thread(sync_client)
        return done, outcomes, health, completed

    done, outcomes, health, completed = run(
        pipeline, tiny_model_dir, body, credentials=channel_credentials(ca.ca_file, client.cert, client.key),
        access=AccessPolicy(tokens=TOKENS), tls=tls, health_port=health_port)
    assert done.usage.completion_tokens >= 1 and completed.usage.completion_tokens >= 1
    for name, err in outcomes.items():
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (name, err)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_sends_the_token_and_reports_a_refusal_in_one_line(pipeline, tiny_model_dir, capsys):
    async def body(stub, ch, stack):
        args = ["ask", "--target", stack.target, "--text", "hello", "--max-tokens", "2"]
        without = await asyncio.to_thread(cli.main, args)
        with_token = await asyncio.to_thread(cli.main, [*args, "--token", "beta-token"])
        return without, with_token

    without, with_token = run(pipeline, tiny_model_dir, body, access=AccessPolicy(tokens=TOKENS))
    err = capsys.readouterr().err
    assert without == cli.EXIT_FAILED and with_token == cli.EXIT_OK
    assert "vita ask: error: UNAUTHENTICATED: missing bearer token" in err
    # the answer's summary line, from the call with the token: why it ended first (an operator's try, 2026-12-04:
    # an answer cut at --max-tokens ended mid-sentence with nothing said)
    assert re.search(r"\n\[(length \(cut at max_tokens: raise --max-tokens\)|stop); \d+ prompt tokens, \d+ "
                     r"generated", err), err


def _png(tmp_path: Path, width: int, height: int) -> bytes:
    from PIL import Image as PILImage

    path = tmp_path / f"{width}x{height}.png"
    PILImage.new("RGB", (width, height), (9, 9, 9)).save(path)
    return path.read_bytes()


def test_input_limits_are_invalid_argument_and_oversized_messages_resource_exhausted(
        pipeline, tiny_model_dir, tmp_path, speech_wav):
    limits = InputLimits(max_text_chars=50, max_images=1, max_image_pixels=32 * 32, max_audio_s=0.5,
                         max_video_s=5.0, max_video_frames=4)
    small, large = _png(tmp_path, 16, 16), _png(tmp_path, 64, 64)
    frame = TimestampedFrame(image=Image(data=small))
    cases = {
        "text": (GenerateRequest(text="x" * 51), "text is 51 characters; the limit is 50"),
        "system": (GenerateRequest(text="hi", system_prompt="y" * 60), "system_prompt is 60 characters"),
        "images": (GenerateRequest(text="hi", images=[Image(data=small)] * 2), "2 images; the limit is 1"),
        "pixels": (GenerateRequest(text="hi", images=[Image(data=large)]), "image 0 is 64x64 = 4096 pixels"),
        "audio": (GenerateRequest(audio=[{"data": speech_wav.read_bytes()}]), "audio 0 is"),
        "frames": (GenerateRequest(text="hi", video=Video(frames=Video.Frames(frames=[
            TimestampedFrame(timestamp_s=t, image=frame.image) for t in range(5)]))), "5 frames; the limit is 4"),
        "span": (GenerateRequest(text="hi", video=Video(frames=Video.Frames(frames=[
            TimestampedFrame(timestamp_s=t, image=frame.image) for t in (0.0, 6.0)]))), "span 6.0 s"),
    }

    async def body(stub, ch, stack):
        errors = {}
        for name, (request, _) in cases.items():
            request.sampling.CopyFrom(SamplingParams(max_tokens=1))
            errors[name] = await refused(generate(stub, request))
        errors["message bytes"] = await refused(generate(stub, GenerateRequest(text="z" * 300_000)))
        _, done = await generate(stub, "still fine")  # the service stays usable

        async def conversation():
            yield session_config(max_tokens=1)
            yield ClientEvent(text={"text": "x" * 51})
            yield ClientEvent(image=Image(data=large))
            yield ClientEvent(text={"text": "short"})
            yield ClientEvent(end=EndOfInput())

        events = [e async for e in stub.Converse(conversation())]
        return errors, done, events

    errors, done, events = run(pipeline, tiny_model_dir, body, config=OrchestratorConfig(limits=limits),
                       max_message_bytes=256 * 1024)
    for name, (_, message) in cases.items():
        assert errors[name].code() == grpc.StatusCode.INVALID_ARGUMENT, (name, errors[name])
        assert message in errors[name].details(), (name, errors[name].details())
    assert errors["message bytes"].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert done.usage.completion_tokens >= 1
    # Converse: each refusal is an error event, and the session goes on to answer the next message.
    refusals = [(e.error.code, e.error.message) for e in events if e.HasField("error")]
    assert [code for code, _ in refusals] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2, refusals
    assert "text message is 51 characters" in refusals[0][1] and "64x64 = 4096 pixels" in refusals[1][1]
    assert [e.WhichOneof("event") for e in events].count("completed") == 1


def test_realtime_gateway_checks_and_forwards_the_token(pipeline, tiny_model_dir):
    import json

    import websockets

    from vita.realtime.server import RealtimeServer

    async def session(port: int, headers: dict) -> list[dict]:
        events = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime?model=vita",
                                      additional_headers=headers) as ws:
            try:
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                    if events[-1]["type"] in ("session.created", "error"):
                        break
            except websockets.ConnectionClosed:
                pass
        return events

    async def body(stub, ch, stack):
        outcomes = {}
        for name, tokens in {"open gateway": None, "checking gateway": TOKENS}.items():
            stop = asyncio.Event()
            server = RealtimeServer(stack.target, port=0, tokens=tokens)
            serving = asyncio.create_task(server.serve(stop))
            while not server.port:
                await asyncio.sleep(0.01)
            try:
                for who, headers in {"alpha": {"Authorization": "Bearer alpha-token"},
                                     "wrong": {"Authorization": "Bearer wrong"}}.items():
                    try:
                        outcomes[name, who] = [e["type"] if e["type"] != "error" else e["error"]["code"]
                                               for e in await session(server.port, headers)]
                    except websockets.InvalidStatus as e:
                        outcomes[name, who] = e.response.status_code
            finally:
                stop.set()
                await serving
        return outcomes

    outcomes = run(pipeline, tiny_model_dir, body, access=AccessPolicy(tokens=TOKENS))
    assert outcomes == {
        ("open gateway", "alpha"): ["session.created"],  # the gateway passed the token on; the orchestrator took it
        ("open gateway", "wrong"): ["invalid_api_key"],  # the orchestrator refused it, the client hears why
        ("checking gateway", "alpha"): ["session.created"],
        ("checking gateway", "wrong"): 401,  # refused at the handshake
    }
