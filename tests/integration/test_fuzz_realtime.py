"""Fuzzing the OpenAI-Realtime WebSocket gateway (vita/realtime/) with hypothesis: arbitrary JSON and non-JSON text
frames, binary frames, every client event type (and others) with fields of any type, audio appends that are not
base64, odd-length, or large.

The gateway is the real process (`python -m vita.realtime`) in front of the whole serving stack in-process on the
tiny model (tests/bus_stack.py). After each example's frames, a `session.update` probe must be answered: the
connection stays usable. Every message the server sent must be a JSON event, and every `error` event must have the
Realtime API's shape. The server must stay up, and a whole valid session must succeed afterwards. Example counts
come from the hypothesis profile (tests/conftest.py: `ci`, derandomized).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import subprocess
import sys
import uuid

import numpy as np
import pytest
import websockets
from conftest import delete_prefix
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests.bus_stack import stack_in_thread
from vita.bus.streams import BusConfig
from vita.inference import VitaPipeline
from vita.orchestrator.service import OrchestratorConfig
from vita.realtime.protocol import UNSUPPORTED_EVENTS
from vita.runtime.ports import free_port
from vita.stack import ServiceProcess, wait_healthy

pytestmark = pytest.mark.slow
CALL_S = 60.0  # the longest any answer may take: a hang is a failure, not a slow machine
ERROR_KEYS = {"type", "code", "message", "param", "event_id"}
ERROR_TYPES = {"invalid_request_error", "server_error", "rate_limit_error"}


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory):
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
    config = OrchestratorConfig(default_max_tokens=4, encode_timeout_s=20, token_timeout_s=20, judge_timeout_s=20)
    log = tmp_path_factory.mktemp("realtime") / "realtime.log"
    try:
        with stack_in_thread(VitaPipeline.load(tiny_model_dir), tiny_model_dir, bus, config) as target:
            port = free_port()
            argv = [sys.executable, "-m", "vita.realtime", "--orchestrator", target, "--port", str(port),
                    "--plain-logs"]
            with open(log, "wb") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_healthy(ServiceProcess("realtime", argv, port, str(log), pid=proc.pid, health="http"), 120)
                yield f"ws://127.0.0.1:{port}/v1/realtime", proc
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        delete_prefix(bus.prefix)


async def next_event(ws) -> dict:
    event = json.loads(await asyncio.wait_for(ws.recv(), CALL_S), parse_constant=_not_json)
    check_event(event)
    return event


def _not_json(name: str) -> None:
    raise AssertionError(f"the server sent {name}, which JSON does not have")


def check_event(event: object) -> None:
    """A server event: a JSON object with a type and an event id; an error in the Realtime API's shape."""
    assert isinstance(event, dict) and isinstance(event.get("type"), str) and isinstance(event.get("event_id"), str)
    if event["type"] == "error":
        assert set(event) == {"type", "event_id", "error"}, event
        error = event["error"]
        assert set(error) == ERROR_KEYS and error["type"] in ERROR_TYPES, event
        assert isinstance(error["message"], str) and error["message"], event
        for key in ("code", "param", "event_id"):
            assert error[key] is None or isinstance(error[key], str), event


async def session(url: str, frames: list[str | bytes]) -> list[dict]:
    """Connect, send `frames` after session.created, then a probe that must be answered; the events until then."""
    nonce = uuid.uuid4().hex
    async with websockets.connect(url, max_size=None) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        for frame in frames:
            await ws.send(frame)
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": nonce}}))
        seen = []
        while True:
            event = await next_event(ws)  # a closed connection raises ConnectionClosed: the test fails
            seen.append(event)
            if event["type"] == "session.updated" and event["session"]["instructions"] == nonce:
                return seen


def whole_session_succeeds(url: str) -> None:
    async def main() -> dict:
        async with websockets.connect(url) as ws:
            assert (await next_event(ws))["type"] == "session.created"
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}}))
            await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            while (event := await next_event(ws))["type"] != "response.done":
                pass
            return event

    # (the orchestrator's default_max_tokens=4 may cut the answer: `incomplete`, reason `max_output_tokens`)
    assert asyncio.run(main())["response"]["status"] in ("completed", "incomplete")


# ------------------------------------------------------------------------------------------------------------------
# Strategies


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 20, 20)).save(out, format="PNG")
    return out.getvalue()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)
_speech = (np.sin(np.arange(4800) / 3) * 20000).astype("<i2").tobytes()
# Values a field is set to: any JSON, and the kinds of value each field is checked for (numbers at the edges of
# the int32, uint32 and int64 fields behind them, words the fields take, containers where scalars belong).
_value = st.one_of(
    _json,
    st.sampled_from([0, -1, 1, 255, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 63, -(2 ** 31) - 1, 10 ** 30, 0.5,
                     1.5, -0.5, 1e300]),
    st.sampled_from(["", "inf", "auto", "low", "semantic_vad", "server_vad", "realtime", "audio/pcm", "user",
                     "message", "input_text", "input_image", "alloy", "nope!"]),
    st.sampled_from([[], {}, ["text"], ["audio"], [1], {"type": "server_vad"}, [{"type": "input_text"}]]),
    st.sampled_from(["data:image/png;base64,", "data:image/png;base64,%%", "https://example.com/x.png",
                     "data:image/png;base64," + _b64(_png())]),
).map(copy.deepcopy)  # (fields below a drawn container may be set later)
_audio = st.one_of(
    st.binary(max_size=512).map(_b64), st.just(_b64(_speech)),
    st.just(_b64(b"\0\0" * 240_000)),  # 10 s of silence in one append
    st.sampled_from(["", "%%%", "AAA", "AAAA=", "====", "AQ==", "data:audio/pcm;base64,AAAA"]), _value)
# A valid event of each type; the fuzzing sets some of its fields (or fields below them) to other values.
_BASE = {
    "session.update": {"session": {}},
    "input_audio_buffer.append": {"audio": _b64(_speech)},
    "input_audio_buffer.commit": {}, "input_audio_buffer.clear": {},
    "conversation.item.create": {"item": {"type": "message", "role": "user",
                                          "content": [{"type": "input_text", "text": "Hi."}]}},
    "conversation.item.truncate": {"item_id": "item_1", "content_index": 0, "audio_end_ms": 0},
    "response.create": {"response": {"output_modalities": ["text"]}}, "response.cancel": {},
}
_PATHS = {
    "session.update": [
        ("session",), ("session", "type"), ("session", "instructions"), ("session", "output_modalities"),
        ("session", "modalities"), ("session", "max_output_tokens"), ("session", "tools"), ("session", "audio"),
        ("session", "audio", "input"), ("session", "audio", "input", "format"),
        ("session", "audio", "input", "format", "type"), ("session", "audio", "input", "format", "rate"),
        ("session", "audio", "input", "transcription"), ("session", "audio", "input", "turn_detection"),
        *(("session", "audio", "input", "turn_detection", key) for key in (
            "type", "eagerness", "threshold", "silence_duration_ms", "prefix_padding_ms", "create_response",
            "interrupt_response", "idle_timeout_ms")),
        ("session", "audio", "output"), ("session", "audio", "output", "format"),
        ("session", "audio", "output", "voice"), ("session", "audio", "output", "voice", "id"),
        ("session", "audio", "output", "speed")],
    "input_audio_buffer.append": [("audio",)],
    "conversation.item.create": [
        ("item",), ("item", "type"), ("item", "role"), ("item", "id"), ("item", "content"), ("item", "content", 0),
        ("item", "content", 0, "type"), ("item", "content", 0, "text"), ("item", "content", 0, "image_url"),
        ("item", "content", 1), ("item", "status"), ("item", "object"), ("item", "bogus"),
        ("item", "content", 0, "detail"), ("item", "content", 0, "bogus")],
    "conversation.item.truncate": [("item_id",), ("content_index",), ("audio_end_ms",)],
    "response.create": [("response",), ("response", "output_modalities"), ("response", "conversation"),
                        ("response", "input"), ("response", "instructions"), ("response", "max_output_tokens"),
                        ("response", "metadata"), ("response", "metadata", "k"), ("response", "tools"),
                        ("response", "tool_choice"), ("response", "audio"), ("response", "audio", "output"),
                        ("response", "audio", "output", "voice"), ("response", "audio", "output", "format")],
    "response.cancel": [("response_id",)],
}


def _set(node: dict | list, path: tuple, value: object) -> None:
    """Set `node[path]`, making the dicts and lists on the way (a list index past the end appends)."""
    key, rest = path[0], path[1:]
    if isinstance(node, list) and key >= len(node):
        node.append(None)
        key = len(node) - 1
    if not rest:
        node[key] = value
        return
    kind = list if isinstance(rest[0], int) else dict  # what the next key needs
    child = node[key] if isinstance(node, list) else node.get(key)
    if not isinstance(child, kind):
        child = node[key] = kind()
    _set(child, rest, value)


_ALL_KINDS = sorted(_BASE) * 3 + [*UNSUPPORTED_EVENTS, "no.such.event"]


@st.composite
def client_events(draw, kinds: tuple[str, ...] | list[str] = _ALL_KINDS) -> dict:
    """A valid event of one of `kinds` (default: any client event type, or one we refuse), with one to three of
    its fields set to other values of any type; now and then an event id of any type."""
    kind = draw(st.sampled_from(kinds))
    event = {"type": kind, **json.loads(json.dumps(_BASE.get(kind, {})))}
    paths = _PATHS.get(kind, [])
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3)) if paths else []:
        _set(event, path, draw(_audio if path == ("audio",) else _value))
    if draw(st.integers(0, 4)) == 0:
        event["event_id"] = draw(_value)
    return event


_frame = st.one_of(
    client_events().map(json.dumps),
    client_events().map(json.dumps),  # (twice: most frames are events)
    client_events().map(lambda e: json.dumps(e).encode()),  # the same as a binary frame
    _json.map(json.dumps),
    st.sampled_from(['{"type": "session.update", "session": {"audio": {"output": {"speed": NaN}}}}',
                     '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": '
                     '[{"type": "input_text", "text": "Hi.", "x": NaN}]}}', "[1e999]"]),
    st.text(max_size=64),
    st.binary(max_size=64),
)


# ------------------------------------------------------------------------------------------------------------------
# The fuzz tests


@given(frames=st.lists(_frame, min_size=1, max_size=4))
def test_any_frames_get_proper_events_and_the_session_goes_on(url, frames):
    address, proc = url
    asyncio.run(session(address, frames))
    assert proc.poll() is None, "the gateway exited"


@given(events=st.lists(client_events(("session.update",)), min_size=4, max_size=8))
def test_session_updates_with_fields_of_any_type_get_proper_events(url, events):
    """The session object is the deepest client input: several updates per example, a few fields each."""
    address, proc = url
    asyncio.run(session(address, [json.dumps(e) for e in events]))
    assert proc.poll() is None, "the gateway exited"


@given(events=st.lists(client_events(tuple(kind for kind in _PATHS if kind != "session.update")), min_size=2,
                       max_size=6))
def test_items_responses_and_audio_with_fields_of_any_type_get_proper_events(url, events):
    address, proc = url
    asyncio.run(session(address, [json.dumps(e) for e in events]))
    assert proc.poll() is None, "the gateway exited"


def test_a_frame_over_the_size_limit_closes_with_1009_and_the_server_stays_up(url):
    """16 MiB is the most a message may carry (the API allows 15 MiB of base64 audio per append)."""
    address, proc = url

    async def main() -> int:
        ws = await websockets.connect(address, max_size=None)  # (no `async with`: the server closes it)
        assert (await next_event(ws))["type"] == "session.created"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (17 << 20)}))
            while True:
                await next_event(ws)
        return closed.value.rcvd.code

    assert asyncio.run(main()) == 1009 and proc.poll() is None
    whole_session_succeeds(address)


def test_the_gateway_answers_after_the_fuzzing(url):
    address, proc = url
    assert proc.poll() is None
    whole_session_succeeds(address)

