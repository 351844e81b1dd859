"""The input limits an orchestrator runs with reach its Converse clients in SessionStarted, and the Realtime gateway
checks client items against them (it checked against its own defaults: an orchestrator started with a larger
`--max-text-chars` still had Realtime clients refused at 32768, one started with a smaller limit refused them only
after `conversation.item.added`).

- the real `ConverseCall` on the real session store (Redis) states its config's limits in SessionStarted;
- real processes: two orchestrators (`python -m vita.orchestrator`, the tiny model's config and tokenizer) started
  with `--max-*` flags above and below the defaults, each with a gateway (`python -m vita.realtime`) in front; a
  Converse call reads each one's SessionStarted, and a Realtime client's items are taken or refused at the
  orchestrator's limits. No pool runs: nothing here needs an answer (a typed query's fate is the orchestrator's
  error event or the lack of one).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import uuid
from collections.abc import Iterator

import grpc
import pytest
import websockets
from conftest import REDIS_URL, delete_prefix
from PIL import Image
from redis.asyncio import Redis

from tests.service_process import running
from vita.bus.streams import BusConfig
from vita.client import END, session_config
from vita.orchestrator.config import OrchestratorConfig
from vita.orchestrator.converse import ConverseCall
from vita.orchestrator.limits import InputLimits
from vita.orchestrator.sessions import MAX_PENDING_IMAGES, SessionStore
from vita.processing.tokenizer import VitaTokenizer
from vita.runtime.ports import free_port
from vita.stack import ServiceProcess
from vita.telemetry.metrics import Metrics
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import ConverseLimits

DEFAULT = InputLimits()
LARGER = DEFAULT.max_text_chars + 8_000
SMALLER, SMALLER_PIXELS = 200, 32 * 32
EVENT_S = 60.0  # the longest one event may take on a busy machine: a hang is a failure


def _limits(limits: ConverseLimits) -> tuple[int, int, int]:
    return limits.max_text_chars, limits.max_image_pixels, limits.max_images


# ------------------------------------------------------------------------------------------------------------------
# The orchestrator states its limits


def test_session_started_carries_the_orchestrators_limits(tiny_model_dir, redis_prefix):
    tokenizer = VitaTokenizer.from_file(tiny_model_dir)

    async def started(config: OrchestratorConfig):
        redis = Redis.from_url(REDIS_URL)
        try:
            call = ConverseCall(None, tokenizer, SessionStore(redis, BusConfig(prefix=redis_prefix)), config,
                                Metrics())  # (no pool is asked anything before a turn)

            async def requests():
                yield session_config()
                yield END

            return [event async for event in call.run(requests())]
        finally:
            await redis.aclose()

    limits = InputLimits(max_text_chars=1234, max_image_pixels=5678, max_images=3)
    stated = asyncio.run(started(OrchestratorConfig(limits=limits)))
    default = asyncio.run(started(OrchestratorConfig()))
    for events, expected in ((stated, (1234, 5678, MAX_PENDING_IMAGES)),
                             (default, (DEFAULT.max_text_chars, DEFAULT.max_image_pixels, MAX_PENDING_IMAGES))):
        assert events[0].WhichOneof("event") == "session_started"
        assert _limits(events[0].session_started.limits) == expected  # (max_images: a turn's, not Generate's 3)


# ------------------------------------------------------------------------------------------------------------------
# Through the processes: orchestrator flags -> SessionStarted -> the gateway's checks


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, tuple[str, str]]]:
    """{"larger" | "smaller": (orchestrator address, gateway WebSocket URL)}."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    logs = tmp_path_factory.mktemp("logs")
    flags = {"larger": ["--max-text-chars", str(LARGER)],
             "smaller": ["--max-text-chars", str(SMALLER), "--max-image-pixels", str(SMALLER_PIXELS)]}
    planned = []
    for name, extra in flags.items():
        port, ws_port = free_port(), free_port()
        planned.append(ServiceProcess(f"orchestrator-{name}", [
            sys.executable, "-m", "vita.orchestrator", "--model", str(tiny_model_dir), "--redis", REDIS_URL,
            "--prefix", prefix, "--grpc-port", str(port), "--plain-logs", *extra], port, str(logs / f"{name}.log")))
        planned.append(ServiceProcess(f"realtime-{name}", [
            sys.executable, "-m", "vita.realtime", "--orchestrator", f"127.0.0.1:{port}", "--port", str(ws_port),
            "--plain-logs"], ws_port, str(logs / f"realtime-{name}.log"), health="http"))
    try:
        with running(*planned):
            yield {name: (f"127.0.0.1:{planned[2 * k].grpc_port}",
                          f"ws://127.0.0.1:{planned[2 * k + 1].grpc_port}/v1/realtime") for k, name in enumerate(flags)}
    finally:
        delete_prefix(prefix)


@pytest.mark.slow
def test_each_orchestrator_states_the_limits_of_its_flags(served):
    async def first_event(target: str):
        async with grpc.aio.insecure_channel(target) as channel:
            call = assistant_pb2_grpc.AssistantStub(channel).Converse()
            await call.write(session_config())
            event = await asyncio.wait_for(call.read(), EVENT_S)
            call.cancel()
            return event

    larger = asyncio.run(first_event(served["larger"][0])).session_started.limits
    smaller = asyncio.run(first_event(served["smaller"][0])).session_started.limits
    assert _limits(larger) == (LARGER, DEFAULT.max_image_pixels, MAX_PENDING_IMAGES)
    assert _limits(smaller) == (SMALLER, SMALLER_PIXELS, MAX_PENDING_IMAGES)


async def _next(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), EVENT_S))


async def _until(ws, kinds: set[str]) -> list[dict]:
    """Events up to (with) the first of `kinds`."""
    seen = []
    while not seen or seen[-1]["type"] not in kinds:
        seen.append(await _next(ws))
    return seen


def _text_item(text: str, event_id: str, item_id: str) -> str:
    return json.dumps({"type": "conversation.item.create", "event_id": event_id, "item": {
        "id": item_id, "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
def test_a_larger_text_limit_lets_a_text_over_the_default_through_the_gateway(served):
    text = "word " * ((DEFAULT.max_text_chars + 1_000) // 5)  # over the default, under the orchestrator's

    async def main():
        async with websockets.connect(served["larger"][1], max_size=None) as ws:
            assert (await _next(ws))["type"] == "session.created"
            await ws.send(_text_item(text, "long", "item_long"))
            created = await _until(ws, {"conversation.item.added", "error"})
            await ws.send(json.dumps({"type": "response.create", "event_id": "answer",
                                      "response": {"output_modalities": ["text"]}}))
            # The orchestrator's own check: it takes the text (no pool runs, but the answer starts), or refuses the
            # prompt as longer than the tiny model's context; never for its length in characters.
            outcome = await _until(ws, {"response.created", "error"})
            return created, outcome

    created, outcome = asyncio.run(main())
    assert created[-1]["type"] == "conversation.item.added", created[-1]
    assert created[-1]["item"]["id"] == "item_long"
    last = outcome[-1]  # (the tiny model: "prompt is 13600 tokens; at most 4095 fit the model's context")
    assert last["type"] == "response.created" or (
        "context" in last["error"]["message"] and "characters" not in last["error"]["message"]), last


@pytest.mark.slow
def test_a_smaller_limit_has_the_gateway_refuse_before_the_item_is_created(served):
    async def main():
        async with websockets.connect(served["smaller"][1], max_size=None) as ws:
            assert (await _next(ws))["type"] == "session.created"
            await ws.send(_text_item("x" * (SMALLER + 1), "too_long", "item_too_long"))
            text_refused = await _until(ws, {"conversation.item.added", "error"})
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "too_big", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": _png(40, 40)}]}}))
            image_refused = await _until(ws, {"conversation.item.added", "error"})
            await ws.send(_text_item("x" * SMALLER, "at_limit", "item_at_limit"))
            taken = await _until(ws, {"conversation.item.added", "error"})
            return text_refused, image_refused, taken

    text_refused, image_refused, taken = asyncio.run(main())
    assert [e["type"] for e in text_refused] == ["error"]  # no conversation.item.added before it
    error = text_refused[0]["error"]
    assert (error["event_id"], error["param"], error["code"]) == ("too_long", "item.content", "string_above_max_length")
    assert f"{SMALLER + 1} characters; the limit is {SMALLER}" in error["message"]
    assert [e["type"] for e in image_refused] == ["error"]
    error = image_refused[0]["error"]
    assert (error["event_id"], error["param"]) == ("too_big", "item.content[0].image_url")
    assert f"more than the limit of {SMALLER_PIXELS}" in error["message"]
    assert taken[-1]["type"] == "conversation.item.added"  # at the limit: taken, and first in the chain
    assert taken[-1]["item"]["id"] == "item_at_limit" and taken[-1]["previous_item_id"] is None
