"""The server events of a session, validated against the `openai` SDK's models (the ground truth clients parse
against): a GA session's against `openai.types.realtime`, a beta one's (`OpenAI-Beta: realtime=v1`) against
`openai.types.beta.realtime`. Driven without a stack: the session's outbox read directly, Converse's events handed in.

- GA: items are announced by `conversation.item.added` and finished by `conversation.item.done` (the assistant's
  with its final content); beta: `conversation.item.created`, once, and no `.done`;
- `rate_limits.updated` follows each `response.done`, with an empty list (no per-response limit applies);
- a field a `conversation.item.create` item or content part does not have is refused by name.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from vita.realtime.protocol import SessionSettings
from vita.realtime.session import RealtimeSession
from vita.v1.assistant_pb2 import AnswerCompleted, AnswerStarted, Completed, ServerEvent, TextDelta


def _text_turn(beta: bool) -> list[dict]:
    """A typed question and its text answer ("Hello there."): every event the session sent."""
    session = RealtimeSession(None, None, SessionSettings(output_modalities=["text"]), beta=beta)

    async def main() -> None:
        await session._on_message(json.dumps({"type": "conversation.item.create", "item": {
            "id": "item_q", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi?"}]}}))
        await session._on_message(json.dumps({"type": "response.create"}))
        session._on_converse(ServerEvent(turn_id=1, answer_started=AnswerStarted(state_token="<3>")))
        for piece in ("Hello ", "there."):
            session._on_converse(ServerEvent(turn_id=1, delta=TextDelta(text=piece)))
        session._on_converse(ServerEvent(turn_id=1, completed=AnswerCompleted(finish_reason=Completed.STOP)))

    asyncio.run(main())
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


def test_a_ga_session_announces_items_added_then_done_and_rate_limits_after_the_response():
    events = _text_turn(beta=False)
    parsed = [TypeAdapter(RealtimeServerEvent).validate_python(e) for e in events]  # each one the SDK's model
    assert [type(p).__name__ for p in parsed] == [
        "ConversationItemAdded", "ConversationItemDone", "ResponseCreatedEvent", "ResponseOutputItemAddedEvent",
        "ConversationItemAdded", "ResponseContentPartAddedEvent", "ResponseTextDeltaEvent", "ResponseTextDeltaEvent",
        "ResponseTextDoneEvent", "ResponseContentPartDoneEvent", "ResponseOutputItemDoneEvent",
        "ConversationItemDone", "ResponseDoneEvent", "RateLimitsUpdatedEvent"]
    user_added, user_done, answer_added, answer_done = (e for e in events if e["type"].startswith("conversation."))
    assert user_added["item"] == user_done["item"] and user_added["item"]["id"] == "item_q"
    assert user_added["previous_item_id"] is user_done["previous_item_id"] is None
    answer_id = events[-2]["response"]["output"][0]["id"]
    assert answer_added["item"]["id"] == answer_done["item"]["id"] == answer_id
    assert answer_added["previous_item_id"] == answer_done["previous_item_id"] == "item_q"
    assert answer_added["item"]["status"] == "in_progress"
    assert answer_done["item"] == events[-2]["response"]["output"][0]  # the final item, as response.done has it
    assert answer_done["item"]["content"][0]["text"] == "Hello there."
    assert events[-1]["rate_limits"] == []


def test_a_beta_session_announces_each_item_once_as_created():
    events = _text_turn(beta=True)
    parsed = [TypeAdapter(BetaServerEvent).validate_python(e) for e in events]
    assert [type(p).__name__ for p in parsed] == [
        "ConversationItemCreatedEvent", "ResponseCreatedEvent", "ResponseOutputItemAddedEvent",
        "ConversationItemCreatedEvent", "ResponseContentPartAddedEvent", "ResponseTextDeltaEvent",
        "ResponseTextDeltaEvent", "ResponseTextDoneEvent", "ResponseContentPartDoneEvent",
        "ResponseOutputItemDoneEvent", "ResponseDoneEvent", "RateLimitsUpdatedEvent"]
    created = [e for e in events if e["type"] == "conversation.item.created"]
    assert [e["previous_item_id"] for e in created] == [None, "item_q"]


@pytest.mark.parametrize(("beta", "item", "param"), [
    (False, {"bogus": 1}, "item.bogus"),
    (False, {"call_id": "c1"}, "item.call_id"),  # (a function call's field, not a message's)
    (False, {"content": [{"type": "input_text", "text": "Hi", "colour": "red"}]}, "item.content[0].colour"),
    (True, {"bogus": 1}, "item.bogus"),
    (True, {"content": [{"type": "input_text", "text": "Hi", "colour": "red"}]}, "item.content[0].colour"),
])
def test_an_unknown_item_field_is_refused_by_name(beta, item, param):
    session = RealtimeSession(None, None, SessionSettings(), beta=beta)
    event = {"type": "conversation.item.create", "event_id": "e1", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}], **item}}
    asyncio.run(session._on_message(json.dumps(event)))
    [error] = [session._out.get_nowait() for _ in range(session._out.qsize())]
    assert error["type"] == "error" and session.last_item_id is None and session.pending_text == []
    assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (
        "unknown_parameter", param, "e1")
    # the beta API's item has a function call's fields beside a message's: taken there
    if beta:
        asyncio.run(session._on_message(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}], "call_id": "c"}})))
        assert session._out.get_nowait()["type"] == "conversation.item.created"
