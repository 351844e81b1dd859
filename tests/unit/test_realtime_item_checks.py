"""Refusals a new user met after the item was already `created` (with `event_id: null`), and truncations past the
audio: driven without a stack, the session's outbox and Converse queue read directly.

- an `input_image` that is no image, and an `input_text` over the orchestrator's text limit, are refused at
  `conversation.item.create` with the client's event_id and a `param`, never enter the chain, reach no Converse;
- the limit is the one the orchestrator states in SessionStarted (its `--max-*` flags), not the gateway's default:
  larger or smaller, for text, image size, images per item and instructions (a limit it does not state keeps the
  default);
- what only the orchestrator can refuse (an orchestrator with smaller limits) comes back with the client's
  event_id, the refused items leave the chain (`conversation.item.deleted`) and the response ends `failed`;
- `conversation.item.truncate` beyond the audio sent, or later than an earlier truncation, is refused;
- a `response.create` whose `response` has a field refused is answered by an `error` naming it, sends nothing to
  Converse and leaves the user text waiting; the fields it can have apply to that response (its voice speaks it,
  its metadata is echoed).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import grpc
from PIL import Image

from vita.orchestrator.limits import InputLimits
from vita.realtime.protocol import SessionSettings
from vita.realtime.session import RealtimeSession, Response
from vita.realtime.tts import DEFAULT_VOICE, EspeakTTS, Spoken
from vita.v1.assistant_pb2 import (
    AnswerCompleted,
    AnswerStarted,
    Completed,
    ConverseLimits,
    ErrorEvent,
    ServerEvent,
    SessionStarted,
    TextDelta,
)

LIMIT = InputLimits().max_text_chars


def _session() -> RealtimeSession:
    return RealtimeSession(None, None, SessionSettings(output_modalities=["text"]))


def _send(session: RealtimeSession, event: dict) -> list[dict]:
    asyncio.run(session._on_message(json.dumps(event)))
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


def _converse_sent(session: RealtimeSession) -> list:
    sent = []
    while not session._to_converse.empty():
        sent.append(session._to_converse.get_nowait())
    return sent


def _text(text: str, event_id: str, item_id: str | None = None) -> dict:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    if item_id:
        item["id"] = item_id
    return {"type": "conversation.item.create", "event_id": event_id, "item": item}


def _image(url: str, event_id: str, item_id: str | None = None) -> dict:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                                           {"type": "input_image", "image_url": url}]}
    if item_id:
        item["id"] = item_id
    return {"type": "conversation.item.create", "event_id": event_id, "item": item}


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _error(events: list[dict]) -> dict:
    [error] = [e for e in events if e["type"] == "error"]
    return error["error"]


def test_an_image_that_does_not_decode_is_refused_with_the_event_id_and_never_enters_the_chain():
    session = _session()
    first = _send(session, _text("hello", "e0", "item_first"))
    assert [e["type"] for e in first] == ["conversation.item.added", "conversation.item.done"]
    _converse_sent(session)
    events = _send(session, _image("data:image/png;base64,AAAA", "e1", "item_bad"))
    assert [e["type"] for e in events] == ["error"]
    error = _error(events)
    assert (error["event_id"], error["param"]) == ("e1", "item.content[1].image_url")
    assert "not in a supported image format" in error["message"]
    assert _converse_sent(session) == []  # nothing reached the orchestrator
    created, _ = _send(session, _image(_png(), "e2", "item_good"))
    assert created["type"] == "conversation.item.added" and created["previous_item_id"] == "item_first"
    assert [e.WhichOneof("event") for e in _converse_sent(session)] == ["image"]


def test_text_over_the_orchestrators_limit_is_refused_at_item_create():
    session = _session()
    events = _send(session, _text("x" * 240_000, "L1"))
    assert [e["type"] for e in events] == ["error"]
    error = _error(events)
    assert (error["event_id"], error["param"]) == ("L1", "item.content")
    assert f"the limit is {LIMIT}" in error["message"] and "240000" in error["message"]
    assert session.last_item_id is None and session.pending_text == []
    # response.create then has nothing to answer: refused with its own event_id, no response starts
    events = _send(session, {"type": "response.create", "event_id": "L2"})
    assert _error(events)["event_id"] == "L2" and _error(events)["code"] == "no_user_input"
    assert _converse_sent(session) == []


def test_texts_that_together_exceed_the_limit_are_refused_at_the_item_that_crosses_it():
    session = _session()
    assert _send(session, _text("a" * (LIMIT - 10), "t1"))[0]["type"] == "conversation.item.added"
    error = _error(_send(session, _text("b" * 20, "t2")))
    assert error["event_id"] == "t2" and f"the limit is {LIMIT}" in error["message"]
    assert len(session.pending_text) == 1


def _started(session: RealtimeSession, limits: InputLimits | None) -> None:
    """SessionStarted from an orchestrator with `limits` (None: one that states none), as `run` hands it over."""
    stated = SessionStarted(limits=limits.converse()) if limits is not None else SessionStarted()
    session._started(ServerEvent(session_id="s1", session_started=stated))
    [created] = _events(session)
    assert created["type"] == "session.created" and created["session"]["id"] == "sess_s1"


def _events(session: RealtimeSession) -> list[dict]:
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


def _png_of(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_an_orchestrator_with_a_larger_text_limit_raises_the_gateways():
    """The gateway refused any text over its default (32768), whatever the orchestrator ran with."""
    session = _session()
    _started(session, InputLimits(max_text_chars=LIMIT * 2))
    created, _ = _send(session, _text("x" * (LIMIT + 1000), "big", "item_big"))
    assert created["type"] == "conversation.item.added" and session.pending_items == ["item_big"]
    assert _send(session, {"type": "response.create", "event_id": "r"}) == []
    [sent] = [e for e in _converse_sent(session) if e.HasField("text")]
    assert len(sent.text.text) == LIMIT + 1000


def test_an_orchestrator_with_smaller_limits_has_the_gateway_refuse_at_its_limits():
    session = _session()
    _started(session, InputLimits(max_text_chars=100, max_image_pixels=32 * 32))
    error = _error(_send(session, _text("y" * 101, "t1")))
    assert (error["event_id"], error["param"], error["code"]) == ("t1", "item.content", "string_above_max_length")
    assert "101 characters; the limit is 100" in error["message"]
    big = {"type": "conversation.item.create", "event_id": "i1", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": _png_of(40, 40)}]}}
    error = _error(_send(session, big))
    assert (error["event_id"], error["param"], error["code"]) == ("i1", "item.content[0].image_url", "invalid_image")
    assert "1600 pixels, more than the limit of 1024" in error["message"]
    refused = _send(session, {"type": "session.update", "event_id": "u1", "session": {"instructions": "z" * 101}})
    error = _error(refused)
    assert (error["event_id"], error["param"]) == ("u1", "session.instructions")
    assert "the limit is 100" in error["message"] and session.settings.instructions == ""
    assert _converse_sent(session) == [] and session.last_item_id is None  # nothing went out, nothing was created
    created, _ = _send(session, _image(_png_of(32, 32), "ok", "item_ok"))  # at the limits: taken
    assert created["type"] == "conversation.item.added" and created["previous_item_id"] is None


def test_a_limit_the_orchestrator_does_not_state_keeps_the_default():
    older = _session()
    _started(older, None)  # an orchestrator from before SessionStarted.limits
    partly = _session()  # one that states only the image size (0, "not stated", for the rest)
    partly._started(ServerEvent(session_id="s2", session_started=SessionStarted(
        limits=ConverseLimits(max_image_pixels=64))))
    _events(partly)
    for session, pixels in ((older, InputLimits().max_image_pixels), (partly, 64)):
        limits = session.limits
        assert (limits.max_text_chars, limits.max_image_pixels, limits.max_images) == (LIMIT, pixels, 8)
        error = _error(_send(session, _text("x" * (LIMIT + 1), "t")))
        assert f"the limit is {LIMIT}" in error["message"]


def test_an_item_with_more_images_than_a_turn_takes_is_refused():
    session = _session()
    _started(session, InputLimits())
    many = {"type": "conversation.item.create", "event_id": "m1", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": _png()}] * 9}}
    error = _error(_send(session, many))
    assert (error["event_id"], error["param"], error["code"]) == ("m1", "item.content", "array_above_max_length")
    assert "9 images; the limit is 8" in error["message"]
    assert _converse_sent(session) == [] and session.last_item_id is None


def _converse_error(session: RealtimeSession, code: grpc.StatusCode, message: str) -> list[dict]:
    session._on_converse(ServerEvent(turn_id=1, error=ErrorEvent(code=code.value[0], message=message)))
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


def test_a_text_the_orchestrator_refuses_fails_its_response_with_the_event_id_and_leaves_the_chain():
    session = _session()
    _send(session, _text("first", "e0", "item_a"))
    session.pending_text, session.pending_items = [], []  # (answered earlier)
    _send(session, _text("y" * 100, "L1", "item_b"))
    assert _send(session, {"type": "response.create", "event_id": "L2"}) == []
    events = _converse_error(session, grpc.StatusCode.INVALID_ARGUMENT,
                             "text message is 100 characters; the limit is 50")
    assert [e["type"] for e in events] == ["error", "conversation.item.deleted", "response.created",
                                           "response.done", "rate_limits.updated"]
    assert events[0]["error"]["event_id"] == "L2" and events[0]["error"]["code"] == "invalid_argument"
    assert events[1]["item_id"] == "item_b"
    done = events[3]["response"]
    assert done["status"] == "failed" and done["status_details"]["error"]["code"] == "invalid_argument"
    assert events[2]["response"]["id"] == done["id"]
    assert session.pending_modality is None
    created, _ = _send(session, _text("again", "e3", "item_c"))
    assert created["previous_item_id"] == "item_a"


def test_an_image_the_orchestrator_refuses_comes_back_with_its_event_id():
    session = _session()
    _send(session, _image(_png(), "i1", "item_1"))
    _send(session, _image(_png(), "i2", "item_2"))
    events = _converse_error(session, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             "8 images already wait for the next turn; this one was not kept")
    assert [e["type"] for e in events] == ["error", "conversation.item.deleted"]
    assert (events[0]["error"]["event_id"], events[0]["error"]["param"]) == ("i1", "item.content[1].image_url")
    # a typed query answered: the images before it were taken, a later error is not theirs
    session.pending_modality = "text"
    session._on_converse(ServerEvent(turn_id=2, answer_started=AnswerStarted(state_token="<3>")))
    assert not session.sent


def _spoken_answer(session: RealtimeSession, sent_ms: float = 1000.0) -> Response:
    r = Response("resp_1", "item_answer", 1, "audio", text=["Hello there. "], finished=True, converse_done=True)
    r.spoken = [Spoken("Hello there. ", 0.0, sent_ms)]
    r.audio_ms = r.sent_ms = sent_ms
    session.items[r.item_id] = r
    return r


def _truncate(session: RealtimeSession, end_ms: int, event_id: str) -> list[dict]:
    return _send(session, {"type": "conversation.item.truncate", "event_id": event_id, "item_id": "item_answer",
                           "content_index": 0, "audio_end_ms": end_ms})


def test_truncate_beyond_the_audio_sent_is_refused():
    session = RealtimeSession(None, None, SessionSettings())
    _spoken_answer(session)
    error = _error(_truncate(session, 1_000_000_000, "t1"))
    assert (error["event_id"], error["param"], error["code"]) == ("t1", "audio_end_ms", "invalid_value")
    assert "1000 ms" in error["message"]
    assert _converse_sent(session) == [] and not session.truncations
    assert _truncate(session, 1000, "t2") == []  # all of it: taken
    assert [e.WhichOneof("event") for e in _converse_sent(session)] == ["truncate"]


def test_a_second_truncation_to_a_later_point_is_refused():
    session = RealtimeSession(None, None, SessionSettings())
    _spoken_answer(session)
    assert _truncate(session, 900, "t1") == []
    for end_ms, event_id in ((1_000_000_000, "t2"), (950, "t3")):
        error = _error(_truncate(session, end_ms, event_id))
        assert (error["event_id"], error["param"]) == (event_id, "audio_end_ms")
    assert "already truncated at 900 ms" in _error(_truncate(session, 950, "t4"))["message"]
    assert _truncate(session, 900, "t5") == [] and _truncate(session, 400, "t6") == []  # the same or earlier: taken
    assert len(_converse_sent(session)) == 3


def test_an_orchestrator_truncate_refusal_carries_the_client_event_id():
    session = RealtimeSession(None, None, SessionSettings())
    _spoken_answer(session)
    _truncate(session, 500, "t1")
    events = _converse_error(session, grpc.StatusCode.INVALID_ARGUMENT,
                             "truncate: the content is not a prefix of turn 1's answer")
    [error] = events
    assert (error["error"]["event_id"], error["error"]["param"]) == ("t1", "audio_end_ms")


def test_a_refused_response_create_sends_nothing_and_leaves_the_text_for_a_corrected_one():
    """Every field of `response` but three was silently ignored (and the text sent): each is refused by name now,
    before anything goes to Converse, and the text still waits for the corrected response.create."""
    session = _session()
    _send(session, _text("What is the capital of France?", "e0", "item_q"))
    _converse_sent(session)
    refused = [({"frobnicate": 1}, "unknown_parameter", "response.frobnicate"),
               ({"audio": {"output": {"volume": 3}}}, "unknown_parameter", "response.audio.output.volume"),
               ({"instructions": "answer in French"}, "unsupported_parameter", "response.instructions"),
               ({"max_output_tokens": 5}, "unsupported_parameter", "response.max_output_tokens"),
               ({"tools": [{"type": "function", "name": "f"}]}, "unsupported_parameter", "response.tools"),
               ({"audio": {"output": {"voice": "nosuchvoice_xyz"}}}, "invalid_value", "response.audio.output.voice"),
               ({"metadata": {"k": 1}}, "invalid_value", "response.metadata.k")]
    for n, (response, code, param) in enumerate(refused):
        events = _send(session, {"type": "response.create", "event_id": f"r{n}", "response": response})
        assert [e["type"] for e in events] == ["error"]
        assert (events[0]["error"]["code"], events[0]["error"]["param"], events[0]["error"]["event_id"]) == (
            code, param, f"r{n}")
    assert _converse_sent(session) == [] and session.pending_modality is None
    assert session.pending_text == ["What is the capital of France?"] and session.pending_items == ["item_q"]
    assert _send(session, {"type": "response.create", "event_id": "ok", "response": {
        "metadata": {"topic": "geography"}, "instructions": "", "max_output_tokens": "inf", "tools": []}}) == []
    [sent] = _converse_sent(session)
    assert sent.text.text == "What is the capital of France?" and session.pending_text == []
    # a response the orchestrator then fails still carries its metadata
    events = _converse_error(session, grpc.StatusCode.INVALID_ARGUMENT, "text message is too long")
    done = next(e for e in events if e["type"] == "response.done")["response"]
    assert done["status"] == "failed" and done["metadata"] == {"topic": "geography"}


def test_a_response_create_voice_speaks_that_response_only_and_its_metadata_is_echoed():
    """`response.audio.output.voice` was ignored (the session's voice spoke) and `metadata` came back null."""
    session = RealtimeSession(None, None, SessionSettings(), audio_lead_ms=600_000)  # (audio sent unpaced)

    async def answer(turn: int, response: dict) -> list[dict]:
        await session._on_message(json.dumps(_text("Say something.", f"e{turn}")))
        await session._on_message(json.dumps({"type": "response.create", "event_id": f"r{turn}",
                                              "response": response}))
        session._on_converse(ServerEvent(turn_id=turn, answer_started=AnswerStarted(state_token="<3>")))
        session._on_converse(ServerEvent(turn_id=turn, delta=TextDelta(text="Hello there, my friend.")))
        session._on_converse(ServerEvent(turn_id=turn, completed=AnswerCompleted(finish_reason=Completed.STOP)))
        await session.response.speaker
        out = []
        while not session._out.empty():
            out.append(session._out.get_nowait())
        return out

    async def main() -> tuple[list[dict], list[dict]]:
        return (await answer(1, {"audio": {"output": {"voice": "en-us"}}, "metadata": {"order": "1"}}),
                await answer(2, {}))

    asked, plain = asyncio.run(main())
    sentence = "Hello there, my friend."
    for events, voice, metadata in ((asked, "en-us", {"order": "1"}), (plain, DEFAULT_VOICE, None)):
        assert not [e for e in events if e["type"] == "error"]
        created, done = (next(e for e in events if e["type"] == kind)["response"]
                         for kind in ("response.created", "response.done"))
        for response in (created, done):
            assert response["audio"]["output"]["voice"] == voice and response["metadata"] == metadata
        assert done["status"] == "completed"
        audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
        assert audio == EspeakTTS(voice).synthesize(sentence)  # spoken in that voice
    assert EspeakTTS("en-us").synthesize(sentence) != EspeakTTS(DEFAULT_VOICE).synthesize(sentence)
    assert session.settings.voice == DEFAULT_VOICE  # the session's is unchanged


def test_audio_appends_split_inside_a_sample_reach_converse_whole():
    """Converse refuses odd-length PCM16 chunks; a client may split its stream anywhere. Without the echo guard
    (which keeps the odd byte itself) the gateway joins a trailing half sample to the next append: Converse gets the
    same bytes, in whole samples, and no error goes back."""
    import base64

    for echo_guard in (False, True):
        session = RealtimeSession(None, None, SessionSettings(output_modalities=["text"]), echo_guard=echo_guard)
        pcm = bytes(range(1, 200))  # 199 bytes: a stream split at odd offsets
        out = []
        for part in (pcm[:3], pcm[3:4], pcm[4:101], pcm[101:]):
            out += _send(session, {"type": "input_audio_buffer.append", "audio": base64.b64encode(part).decode()})
        chunks = [event.audio.pcm16 for event in _converse_sent(session)]
        assert out == [] and all(len(c) % 2 == 0 for c in chunks)
        if not echo_guard:
            assert b"".join(chunks) == pcm[:198]  # the last byte waits for its other half

