"""The OpenAI-Realtime-compatible endpoint through the process stack on the duplex fine-tuned tiny model.

The client is the official `openai` SDK's realtime client (code no one here wrote) pointed at our gateway, or a raw
`websockets` client for what the SDK would never send. Speech is espeak-ng, the answers' voice too; every decision
(query or not, the answer) is the model's. The stored session in Redis shows what Converse recorded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI

from vita.bus.streams import BusConfig
from vita.realtime.tts import DEFAULT_VOICE, EspeakTTS, resample_pcm16
from vita.stack import LocalStack
from vita.v1.session_pb2 import SessionState, SessionTurn

pytestmark = pytest.mark.slow
TOKEN = f"test-{uuid.uuid4().hex}"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def stack(duplex_model_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"# accepted API keys\n\n{TOKEN}\n")
    with LocalStack(model_dir=str(duplex_model_dir), prefix=f"rt{uuid.uuid4().hex[:8]}", realtime=True,
                    extra_args={"realtime": ["--api-tokens", str(tokens)]},
                    log_dir=str(tmp_path_factory.mktemp("logs"))) as running:
        yield running


def port(stack: LocalStack) -> int:
    return stack.service("realtime").grpc_port


def sdk(stack: LocalStack, key: str = TOKEN) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{port(stack)}/v1", api_key=key)


def stored(redis, stack, session_id: str) -> SessionState:
    return SessionState.FromString(redis.get(BusConfig(prefix=stack.prefix).session(session_id)))


def pcm16(samples: np.ndarray, rate: int = 16000, *, to_rate: int = 16000, silence_s: float = 0.8) -> bytes:
    """Float samples (plus trailing silence, so the VAD sees the end) as PCM16 at `to_rate`."""
    padded = np.concatenate([samples, np.zeros(round(silence_s * rate), np.float32)])
    pcm = (np.clip(padded, -1, 1) * 32767).astype("<i2").tobytes()
    return resample_pcm16(pcm, rate, to_rate)


def chunks(pcm: bytes, rate: int, ms: int = 100):
    step = rate * ms // 1000 * 2
    for offset in range(0, len(pcm), step):
        yield base64.b64encode(pcm[offset:offset + step]).decode()


class Events:
    """What a connection received, in order; `until` reads on to the next event of a type."""

    def __init__(self, conn) -> None:
        self.conn, self.seen = conn, []

    async def until(self, kind: str, where=lambda e: True):
        while True:
            event = await asyncio.wait_for(self.conn.recv(), TIMEOUT_S)
            self.seen.append(event)
            if _type(event) == kind and where(event):
                return event

    async def probe(self, session: dict):
        """A session.update and its session.updated: what the server sent before it (what follows a response.done)
        has arrived, without waiting on an event that may not come."""
        await self.conn.session.update(session=session)
        return await self.until("session.updated")

    def of(self, kind: str) -> list:
        return [e for e in self.seen if _type(e) == kind]

    def types(self) -> list[str]:
        return [_type(e) for e in self.seen]


def _type(event) -> str:
    return event["type"] if isinstance(event, dict) else event.type


def _field(event, name: str):
    if isinstance(event, dict):
        return event.get(name)
    value = getattr(event, name, None)
    return value if value is not None else (event.model_extra or {}).get(name)


def _session_id(created) -> str:
    return _field(created.session, "id").removeprefix("sess_")


def _text_item(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------------------------------------
# The official SDK


def test_sdk_spoken_query_at_24khz_is_answered_with_audio_and_transcript_then_a_typed_one_with_text(
        stack, redis, query_clip, trained_answer):
    # The spoken question is the one the fine-tune answers (its answer is known and speakable); what a typed
    # question gets from the tiny model is arbitrary (once only ":", which has no sound), so the typed turn checks
    # the text path only.
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            created = await ev.until("session.created")
            assert created.session.audio.output.format.rate == 24000
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                               "max_output_tokens": 12})
            await ev.until("session.updated")
            for chunk in chunks(pcm16(query_clip, to_rate=24000), 24000):
                await conn.input_audio_buffer.append(audio=chunk)
            done = await ev.until("response.done")
            await ev.probe({"type": "realtime"})
            spoken = ev.seen[:]
            await conn.conversation.item.create(item=_text_item("And of Italy?"))
            user = await ev.until("conversation.item.added")
            await conn.response.create(response={"output_modalities": ["text"]})
            done_text = await ev.until("response.done")
            await ev.probe({"type": "realtime"})
            return created, user, done, spoken, done_text, ev

    created, user, done, spoken, done_text, ev = run(main())
    kinds = [_type(e) for e in spoken]
    # GA items: conversation.item.added, then .done (the beta API's conversation.item.created is not sent)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done", "response.created",
             "response.done", "rate_limits.updated", "session.updated"]
    seen = [k for k in kinds[kinds.index(order[0]):] if k in order]  # (from the speech: session.updated before it)
    assert seen[:6] == order[:6] and seen[-3:] == order[-3:]
    assert "conversation.item.created" not in ev.types()
    committed = next(e for e in spoken if _type(e) == "input_audio_buffer.committed")
    started = next(e for e in spoken if _type(e) == "input_audio_buffer.speech_started")
    assert committed.item_id == started.item_id
    added, item_done = (next(e for e in spoken if _type(e) == kind) for kind in ("conversation.item.added",
                                                                                  "conversation.item.done"))
    assert type(added).__name__ == "ConversationItemAdded" and type(item_done).__name__ == "ConversationItemDone"
    for event in (added, item_done):  # the user's spoken item, on commit
        assert (event.item.id, event.item.role, event.item.content[0].type) == (
            committed.item_id, "user", "input_audio")
        assert event.previous_item_id == committed.previous_item_id
    assert user.item.role == "user" and user.item.content[0].text == "And of Italy?"
    # after each response.done, rate_limits.updated (empty: no per-response limit applies, docs/realtime.md)
    for k, kind in enumerate(ev.types()):
        if kind == "response.done":
            assert ev.types()[k + 1] == "rate_limits.updated" and ev.seen[k + 1].rate_limits == []

    first = [e for e in spoken if getattr(e, "response_id", None) == done.response.id]
    kinds = [e.type for e in first]
    assert kinds[:2] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                          "response.content_part.done", "response.output_item.done"]
    transcript = "".join(e.delta for e in first if e.type == "response.output_audio_transcript.delta")
    audio = b"".join(base64.b64decode(e.delta) for e in first if e.type == "response.output_audio.delta")
    assert transcript.startswith(trained_answer.split()[0])  # the fine-tuned answer, from the model
    assert len(audio) > 24000  # more than half a second of speech at 24 kHz PCM16
    samples = np.frombuffer(audio, "<i2")
    assert np.abs(samples).max() > 1000  # sound, not silence
    # max_output_tokens 12 cuts the trained answer: `incomplete`, as OpenAI's
    assert done.response.status == "incomplete" and done.response.usage.output_tokens == 12
    assert done.response.status_details.reason == "max_output_tokens"
    assert done.response.output[0].content[0].transcript == transcript

    assert user.item.role == "user" and user.item.content[0].text == "And of Italy?"
    assert done_text.response.output_modalities == ["text"]
    assert done_text.response.status == ("incomplete" if done_text.response.usage.output_tokens == 12 else "completed")
    text = "".join(e.delta for e in ev.of("response.output_text.delta"))
    assert text and not [e for e in ev.seen if e.type == "response.output_audio.delta"
                         and e.response_id == done_text.response.id]
    turns = stored(redis, stack, _session_id(created)).turns
    assert [(t.role, t.content) for t in turns][1:] == [
        (SessionTurn.BOT, transcript), (SessionTurn.USER, "And of Italy?"), (SessionTurn.BOT, text)]
    assert turns[0].role == SessionTurn.USER


def test_sdk_items_are_added_then_done_and_rate_limits_follow_the_response(stack):
    """The GA API announces an item with `conversation.item.added` and finishes it with `conversation.item.done`
    (the assistant's with its final content); GA clients were sent the beta API's `conversation.item.created`, which
    GA-written clients do not listen for. After `response.done`, `rate_limits.updated` (as OpenAI sends it)."""
    question = "What is the capital of France?"

    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            await ev.until("session.created")
            await conn.conversation.item.create(item=_text_item(question))
            await conn.response.create(response={"output_modalities": ["text"]})
            await ev.until("response.done")
            await ev.probe({"type": "realtime"})
            return ev

    ev = run(main())
    types = ev.types()
    assert "conversation.item.created" not in types and "error" not in types, types
    added, done = ev.of("conversation.item.added"), ev.of("conversation.item.done")
    assert all(type(e).__name__ == "ConversationItemAdded" for e in added)
    assert all(type(e).__name__ == "ConversationItemDone" for e in done)
    user_added, answer_added = added
    user_done, answer_done = done
    # the user's item: complete as added
    assert user_added.item.role == user_done.item.role == "user" and user_added.item.id == user_done.item.id
    assert user_added.item.content[0].text == user_done.item.content[0].text == question
    assert user_added.previous_item_id is None
    # the assistant's: added in progress as the response starts, done with the answer as it ended
    response = ev.of("response.done")[0].response
    assert answer_added.item.id == answer_done.item.id == response.output[0].id
    assert answer_added.item.role == "assistant" and answer_added.item.status == "in_progress"
    assert answer_added.previous_item_id == answer_done.previous_item_id == user_added.item.id
    assert answer_done.item.status == response.output[0].status and response.status in ("completed", "incomplete")
    assert answer_done.item.content[0].text == response.output[0].content[0].text
    assert answer_done.item.content[0].text  # (the answer's text, not the empty one it started with)
    assert types[types.index("response.output_item.added") + 1] == "conversation.item.added"
    tail = ["response.output_item.done", "conversation.item.done", "response.done", "rate_limits.updated",
            "session.updated"]
    assert types[-5:] == tail
    limits = ev.seen[-2]
    assert type(limits).__name__ == "RateLimitsUpdatedEvent" and limits.rate_limits == []


def test_speech_not_meant_for_the_assistant_gets_no_response(stack, other_clip):
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            await ev.until("session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}})
            await ev.until("session.updated")
            for chunk in chunks(pcm16(other_clip), 16000):
                await conn.input_audio_buffer.append(audio=chunk)
            ignored = await ev.until("vita.utterance.ignored")
            before = ev.types()
            # Nothing was answered: the next response is the one a typed message asks for.
            await conn.conversation.item.create(item=_text_item("hello"))
            await conn.response.create(response={"output_modalities": ["text"]})
            await ev.until("response.done")
            return ignored, before, ev

    ignored, before, ev = run(main())
    assert _field(ignored, "state_token") != "<1>"
    assert _field(ignored, "item_id") == ev.of("input_audio_buffer.speech_started")[0].item_id
    assert "input_audio_buffer.speech_stopped" in before
    assert not [k for k in before if k.startswith("response.") or k == "input_audio_buffer.committed"]
    assert len(ev.of("response.created")) == 1


def test_spoken_interruption_cancels_the_answer_and_truncate_keeps_what_was_played(stack, redis, query_clip):
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            created = await ev.until("session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}})
            await ev.until("session.updated")
            for chunk in chunks(pcm16(query_clip), 16000):  # the trained answer: ~25 s of speech
                await conn.input_audio_buffer.append(audio=chunk)
            first = await ev.until("response.created")
            await ev.until("response.output_audio.delta")
            for chunk in chunks(pcm16(query_clip), 16000):  # the user cuts in while the answer plays
                await conn.input_audio_buffer.append(audio=chunk)
            cancelled = await ev.until("response.done", lambda e: e.response.id == first.response.id)
            after_cancel = stored(redis, stack, _session_id(created)).turns[1]
            second = await ev.until("response.created")
            await ev.until("response.output_audio.delta", lambda e: e.response_id == second.response.id)
            item_id = cancelled.response.output[0].id
            received_ms = sum(len(base64.b64decode(e.delta)) for e in ev.of("response.output_audio.delta")
                              if e.response_id == first.response.id) // 48
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=received_ms // 2)
            truncated = await ev.until("conversation.item.truncated")
            await conn.response.cancel()  # the second answer: not needed to the end
            await ev.until("response.done")
            await conn.response.cancel()  # nothing is in progress now
            error = await ev.until("error")
            return created, first, cancelled, second, after_cancel, truncated, error, ev, received_ms

    created, first, cancelled, second, after_cancel, truncated, error, ev, received_ms = run(main())
    assert cancelled.response.status == "cancelled"
    assert cancelled.response.status_details.reason == "turn_detected"
    assert second.response.id != first.response.id
    # No audio of the first answer after its response.done.
    done_at = ev.seen.index(cancelled)
    assert not [e for e in ev.seen[done_at:] if e.type == "response.output_audio.delta"
                and e.response_id == first.response.id]
    sent = "".join(e.delta for e in ev.seen if e.type == "response.output_audio_transcript.delta"
                   and e.response_id == first.response.id)
    assert cancelled.response.output[0].content[0].transcript == sent
    # The stored answer is what went out as audio (its audio is paced: not all of it) ...
    assert after_cancel.role == SessionTurn.BOT and after_cancel.interrupted and after_cancel.content == sent
    # ... and after the client's truncate, what it played: half the audio it got, whole words, a prefix.
    assert truncated.item_id == cancelled.response.output[0].id and truncated.audio_end_ms == received_ms // 2
    turn = stored(redis, stack, _session_id(created)).turns[1]
    assert sent.startswith(turn.content) and len(turn.content) < len(sent)
    # cut at a word boundary: after a word, or after the space that ends a whole played sentence ("Sure. ")
    assert not turn.content or turn.content[-1].isspace() or sent[len(turn.content):][:1] in (" ", "")
    assert error.error.code == "response_cancel_not_active"


def test_response_cancel_stops_the_spoken_answer(stack, redis, query_clip, trained_answer):
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            created = await ev.until("session.created")
            for chunk in chunks(pcm16(query_clip, to_rate=24000), 24000):
                await conn.input_audio_buffer.append(audio=chunk)
            await ev.until("response.output_audio.delta")
            await conn.response.cancel()
            done = await ev.until("response.done")
            return created, done, ev

    created, done, ev = run(main())
    assert done.response.status == "cancelled" and done.response.status_details.reason == "client_cancelled"
    sent = "".join(e.delta for e in ev.of("response.output_audio_transcript.delta"))
    assert sent and len(sent) < len(trained_answer)
    turns = stored(redis, stack, _session_id(created)).turns
    assert turns[0].state_token == "<1>" and turns[1].interrupted and turns[1].content == sent


def test_session_update_reaches_converse_and_bad_settings_are_refused(stack, redis):
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            created = await ev.until("session.created")
            await conn.session.update(session={
                "type": "realtime", "instructions": "You are terse.", "audio": {"input": {"turn_detection": {
                    "type": "server_vad", "threshold": 0.6, "silence_duration_ms": 700, "prefix_padding_ms": 200}}}})
            updated = await ev.until("session.updated")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "server_vad", "threshold": 1.5}}}})
            bad = await ev.until("error")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "manual"}}}})
            unsupported = await ev.until("error")
            await conn.conversation.item.create(item=_text_item("hi"))
            await conn.response.create(response={"output_modalities": ["text"]})
            await ev.until("response.done")
            return created, updated, bad, unsupported

    created, updated, bad, unsupported = run(main())
    td = updated.session.audio.input.turn_detection
    assert (td.threshold, td.silence_duration_ms, td.prefix_padding_ms) == (0.6, 700, 200)
    config = stored(redis, stack, _session_id(created)).config
    assert config.system_prompt == "You are terse."
    assert (round(config.vad.start_threshold, 3), config.vad.end_silence_ms, config.vad.speech_pad_ms) == (0.6, 700, 200)
    assert bad.error.type == "invalid_request_error" and "threshold" in bad.error.message
    assert bad.error.param == "session.audio.input.turn_detection"
    assert unsupported.error.code == "unsupported_parameter"


def test_a_voice_espeak_ng_does_not_have_is_refused_and_the_answer_is_spoken_in_the_previous_one(stack, query_clip):
    """It was taken (session.updated), then every sentence of the answer was an error `tts_failed`, without audio,
    and the response still ended `completed`."""
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            await ev.until("session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"output": {"voice": "en-gb"}}})
            updated = await ev.until("session.updated")
            await conn.session.update(session={"type": "realtime", "audio": {"output": {
                "voice": "nosuchvoice_xyz"}}})
            refused = await ev.until("error")
            for chunk in chunks(pcm16(query_clip, to_rate=24000), 24000):
                await conn.input_audio_buffer.append(audio=chunk)
            await ev.until("response.output_audio.delta")
            await conn.response.cancel()  # the answer is spoken: the rest of it is not needed
            done = await ev.until("response.done")
            return updated, refused, done, ev

    updated, refused, done, ev = run(main())
    assert updated.session.audio.output.voice == "en-gb"
    assert (refused.error.type, refused.error.param) == ("invalid_request_error", "session.audio.output.voice")
    assert "nosuchvoice_xyz" in refused.error.message
    assert done.response.audio.output.voice == "en-gb"
    assert len(ev.of("error")) == 1 and not ev.of("session.updated")[1:]  # no tts_failed, no second update
    audio = b"".join(base64.b64decode(e.delta) for e in ev.of("response.output_audio.delta"))
    assert np.abs(np.frombuffer(audio, "<i2")).max() > 1000


def test_an_answer_cut_by_max_output_tokens_ends_incomplete(stack, query_clip, trained_answer):
    """As OpenAI's: status `incomplete`, reason `max_output_tokens` (it was `completed`)."""
    async def main():
        async with sdk(stack).realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            await ev.until("session.created")
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 3})
            await ev.until("session.updated")
            for chunk in chunks(pcm16(query_clip, to_rate=24000), 24000):
                await conn.input_audio_buffer.append(audio=chunk)
            return await ev.until("response.done"), ev

    done, ev = run(main())
    assert done.response.status == "incomplete"
    assert (done.response.status_details.type, done.response.status_details.reason) == (
        "incomplete", "max_output_tokens")
    assert done.response.usage.output_tokens == 3 and done.response.output[0].status == "incomplete"
    transcript = done.response.output[0].content[0].transcript
    assert transcript and len(transcript) < len(trained_answer) and trained_answer.startswith(transcript.strip())
    assert not ev.of("error")


def test_session_update_refuses_unknown_fields_and_another_model(stack):
    """OpenAI refuses them (`unknown_parameter`); they were silently accepted."""
    async def main():
        ws = await _raw(stack)
        try:
            created = await _next(ws, "session.created")
            errors = []
            for n, session in enumerate([{"bogus_key": 1}, {"audio": {"output": {"voice": "alloy", "volume": 3}}},
                                         {"voice": "alloy"}, {"model": "gpt-realtime"}]):
                await ws.send(json.dumps({"type": "session.update", "event_id": f"e{n}", "session": session}))
                errors.append(await _next(ws, "error"))
            # What OpenAI takes is still taken: the session's own model, and the session object sent back.
            await ws.send(json.dumps({"type": "session.update", "session": {
                **created["session"], "model": "vita-tiny", "instructions": "Be brief."}}))
            updated = await _next(ws, "session.updated")
            return errors, updated
        finally:
            await ws.close()

    errors, updated = run(main())
    assert [(e["error"]["code"], e["error"]["param"], e["error"]["event_id"]) for e in errors] == [
        ("unknown_parameter", "session.bogus_key", "e0"), ("unknown_parameter", "session.audio.output.volume", "e1"),
        ("unknown_parameter", "session.voice", "e2"), ("invalid_value", "session.model", "e3")]
    assert errors[0]["error"]["message"] == "Unknown parameter: 'session.bogus_key'."
    assert updated["session"]["instructions"] == "Be brief." and updated["session"]["model"] == "vita-tiny"


def test_response_create_refuses_fields_by_name_and_a_corrected_one_answers_with_its_metadata(stack, redis):
    """Every field of `response` but `input`, `conversation` and `output_modalities` was silently ignored: a field
    the API does not have is refused as in session.update (`unknown_parameter`), one this server cannot do for one
    response by name (`unsupported_parameter`); nothing reaches the orchestrator, and the text still waits for the
    corrected response.create, whose metadata comes back in its response."""
    question = "What is the capital of France?"
    refused = [({"frobnicate": 1}, "unknown_parameter", "response.frobnicate"),
               ({"audio": {"output": {"voice": "alloy", "volume": 3}}}, "unknown_parameter",
                "response.audio.output.volume"),
               ({"instructions": "answer in French"}, "unsupported_parameter", "response.instructions"),
               ({"max_output_tokens": 5}, "unsupported_parameter", "response.max_output_tokens"),
               ({"tools": [{"type": "function", "name": "lookup"}]}, "unsupported_parameter", "response.tools"),
               ({"metadata": {"attempt": 1}}, "invalid_value", "response.metadata.attempt")]

    async def main():
        ws = await _raw(stack)
        try:
            created = await _next(ws, "session.created")
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item(question)}))
            await _next(ws, "conversation.item.done")
            answers = []
            for n, (response, _, _) in enumerate(refused):
                await ws.send(json.dumps({"type": "response.create", "event_id": f"e{n}",
                                          "response": {"output_modalities": ["text"], **response}}))
                answers.append(await _until_any(ws, {"error", "response.created"}))
            metadata = {"topic": "geography", "attempt": "2"}
            await ws.send(json.dumps({"type": "response.create", "event_id": "ok", "response": {
                "output_modalities": ["text"], "metadata": metadata, "tools": [], "tool_choice": "auto",
                "max_output_tokens": created["session"]["max_output_tokens"]}}))
            answered = await _until_any(ws, {"response.done"})
            return created, answers, answered, metadata
        finally:
            await ws.close()

    created, answers, answered, metadata = run(main())
    for n, ((_, code, param), events) in enumerate(zip(refused, answers, strict=True)):
        assert [e["type"] for e in events] == ["error"], events
        assert (events[0]["error"]["code"], events[0]["error"]["param"], events[0]["error"]["event_id"]) == (
            code, param, f"e{n}")
    assert answers[0][0]["error"]["message"] == "Unknown parameter: 'response.frobnicate'."
    assert "session.update" in answers[2][0]["error"]["message"]
    assert not [e for e in answered if e["type"] == "error"]
    response_created = next(e for e in answered if e["type"] == "response.created")["response"]
    done = answered[-1]["response"]
    assert response_created["metadata"] == done["metadata"] == metadata
    assert done["status"] in ("completed", "incomplete") and done["output"][0]["content"][0]["text"]
    turns = stored(redis, stack, created["session"]["id"].removeprefix("sess_")).turns
    assert [(t.role, t.content) for t in turns][:1] == [(SessionTurn.USER, question)] and len(turns) == 2


def test_response_create_voice_speaks_that_response_only(stack):
    """`response.audio.output.voice` was ignored: the session's voice spoke, and the response object said so."""
    async def main():
        ws = await _raw(stack)
        try:
            await _next(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 8}}))
            await _next(ws, "session.updated")
            responses = []
            for n, response in enumerate([{"audio": {"output": {"voice": "en-us"}}}, {}]):
                await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("Hello there!")}))
                await ws.send(json.dumps({"type": "response.create", "event_id": f"e{n}", "response": response}))
                responses.append(await _until_any(ws, {"response.done"}))
            return responses
        finally:
            await ws.close()

    for events, voice in zip(run(main()), ("en-us", DEFAULT_VOICE), strict=True):
        assert not [e for e in events if e["type"] == "error"]
        created = next(e for e in events if e["type"] == "response.created")["response"]
        done = events[-1]["response"]
        assert created["audio"]["output"]["voice"] == done["audio"]["output"]["voice"] == voice
        # the audio is that voice's speech of each sentence of the transcript
        tts = EspeakTTS(voice)
        expected = b"".join(tts.synthesize(e["delta"].strip()) for e in events
                            if e["type"] == "response.output_audio_transcript.delta" and re.search(r"\w", e["delta"]))
        audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
        assert audio == expected  # (the unit test checks this on a known sentence)


# ------------------------------------------------------------------------------------------------------------------
# Raw WebSocket: malformed events and authentication


async def _raw(stack, headers=None, subprotocols=None):
    return await websockets.connect(f"ws://127.0.0.1:{port(stack)}/v1/realtime?model=vita-tiny",
                                    additional_headers=headers if headers is not None else
                                    {"Authorization": f"Bearer {TOKEN}"}, subprotocols=subprotocols)


async def _next(ws, kind: str) -> dict:
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))
        if event["type"] == kind:
            return event


def test_malformed_events_get_error_events_and_the_session_goes_on(stack):
    async def main():
        ws = await _raw(stack)
        try:
            # Audio before session.created arrived: taken in order, like the API does (no error).
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(
                b"\0\0" * 2400).decode()}))
            created = await _next(ws, "session.created")
            errors = []
            for message in ["{not json", json.dumps({"type": "no.such.event", "event_id": "e1"}),
                            json.dumps({"type": "input_audio_buffer.append", "audio": "%%%", "event_id": "e2"}),
                            json.dumps({"event_id": "e3"}), json.dumps([1, 2]),
                            json.dumps({"type": "conversation.item.create", "event_id": "e4",
                                        "item": {"type": "message", "role": "assistant", "content": []}}),
                            json.dumps({"type": "response.create", "event_id": "e5"}),
                            json.dumps({"type": "conversation.item.truncate", "event_id": "e6",
                                        "item_id": "item_nope", "content_index": 0, "audio_end_ms": 10})]:
                await ws.send(message)
                errors.append(await _next(ws, "error"))
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("still there?")}))
            await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            done = await _next(ws, "response.done")
            return created, errors, done
        finally:
            await ws.close()

    created, errors, done = run(main())
    assert created["session"]["type"] == "realtime"
    for error in errors:
        assert set(error) == {"type", "event_id", "error"} and error["event_id"]
        assert set(error["error"]) == {"type", "code", "message", "param", "event_id"}
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    codes = [(e["error"]["code"], e["error"]["param"], e["error"]["event_id"]) for e in errors]
    assert codes == [("invalid_json", None, None), ("invalid_value", "type", "e1"), ("invalid_base64", "audio", "e2"),
                     ("missing_required_parameter", "type", "e3"), ("invalid_json", None, None),
                     ("unsupported_parameter", "item.role", "e4"), ("no_user_input", None, "e5"),
                     ("item_not_found", "item_id", "e6")]
    assert done["response"]["status"] == "completed"


def test_authentication_rejects_missing_or_unknown_tokens(stack):
    async def main():
        outcomes = []
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            try:
                await _raw(stack, headers=headers)
                outcomes.append("accepted")
            except websockets.InvalidStatus as e:
                outcomes.append((e.response.status_code, json.loads(e.response.body)["error"]["code"]))
        ws = await _raw(stack, headers={}, subprotocols=["realtime", f"openai-insecure-api-key.{TOKEN}"])
        outcomes.append((ws.subprotocol, (await _next(ws, "session.created"))["type"]))
        await ws.close()
        # The key subprotocol without `realtime`: no protocol could be selected (the key one would echo the secret),
        # and a browser fails such a handshake with no reason it can show; refused with one, whatever the token.
        for key in (TOKEN, "wrong"):
            try:
                await _raw(stack, headers={}, subprotocols=[f"openai-insecure-api-key.{key}"])
                outcomes.append("accepted")
            except websockets.InvalidStatus as e:
                error = json.loads(e.response.body)["error"]
                outcomes.append((e.response.status_code, error["code"], "'realtime'" in error["message"]))
        try:
            async with sdk(stack, key="wrong").realtime.connect(model="vita-tiny") as conn:
                await conn.recv()
            outcomes.append("sdk accepted")
        except Exception as e:  # the SDK's own error for a refused handshake
            outcomes.append(("sdk refused", "401" in str(e)))
        return outcomes

    assert run(main()) == [(401, "invalid_api_key"), (401, "invalid_api_key"), ("realtime", "session.created"),
                           (400, "missing_required_parameter", True), (400, "missing_required_parameter", True),
                           ("sdk refused", True)]


# ------------------------------------------------------------------------------------------------------------------
# Echo guard: a loudspeaker next to the microphone


async def _loopback(conn, schedule, until, *, gain: float = 0.5, rate: int = 24000, chunk_ms: int = 100):
    """A client whose microphone hears its own loudspeaker at `gain` (0.5: -6 dB): every answer's audio is played
    as it arrives, back to back, and mixed into the microphone stream, which goes out in real time.

    `schedule`: (when(events, mic_s) -> bool, samples at `rate`): a person says `samples` once `when` holds.
    Runs until `until(events)`; returns the events received.
    """
    seen: list = []
    playback = bytearray()

    async def receive():
        while True:
            event = await conn.recv()
            seen.append(event)
            if event.type == "response.output_audio.delta":
                playback.extend(base64.b64decode(event.delta))

    receiver = asyncio.create_task(receive())
    loop = asyncio.get_running_loop()
    start, n, sent = loop.time(), rate * chunk_ms // 1000, 0
    person = np.zeros(0, np.float32)
    pending = list(schedule)
    try:
        while not until(seen):
            assert loop.time() - start < TIMEOUT_S, f"timed out; got {[_type(e) for e in seen][-15:]}"
            for item in list(pending):
                if item[0](seen, sent / rate):
                    person = np.concatenate([person, item[1]])
                    pending.remove(item)
            mic = np.zeros(n, np.float32)
            said, person = person[:n], person[n:]
            mic[:len(said)] += said
            played = np.frombuffer(bytes(playback[:2 * n]), "<i2").astype(np.float32) / 32768
            del playback[:2 * n]
            mic[:len(played)] += gain * played
            await conn.input_audio_buffer.append(
                audio=base64.b64encode((np.clip(mic, -1, 1) * 32767).astype("<i2").tobytes()).decode())
            sent += n
            await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    finally:
        receiver.cancel()
    return seen


def _done(seen) -> list:
    return [e for e in seen if e.type == "response.done"]


def _speech_during_answer(seen) -> bool:
    """Whether the VAD heard speech start between the first answer's creation and its end."""
    created = next(i for i, e in enumerate(seen) if e.type == "response.created")
    done = next((i for i, e in enumerate(seen) if e.type == "response.done"), len(seen))
    return any(e.type == "input_audio_buffer.speech_started" for e in seen[created:done])


def _vad_events(seen) -> list[str]:
    """What the VAD and the responses did, in order, with the audio positions: the message of a failed check."""
    kinds = ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "response.created", "response.done", "vita.utterance.ignored")
    return [f"{e.type} {getattr(e, 'audio_start_ms', '')}{getattr(e, 'audio_end_ms', '')}".strip()
            for e in seen if e.type in kinds]


def _audio_since_first_delta(seconds: float):
    """`when` for a schedule: `seconds` of microphone time after the first answer audio arrived."""
    mark: list[float] = []

    def when(seen, mic_s):
        if not mark and any(e.type == "response.output_audio.delta" for e in seen):
            mark.append(mic_s)
        return bool(mark) and mic_s >= mark[0] + seconds

    return when


def _echo_session(url: str, query24: np.ndarray, schedule, until):
    async def main():
        client = AsyncOpenAI(base_url=url, api_key=TOKEN)
        async with client.realtime.connect(model="vita-tiny") as conn:
            assert (await conn.recv()).type == "session.created"
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 40})
            assert (await conn.recv()).type == "session.updated"
            return await _loopback(conn, [(lambda seen, s: True, query24), *schedule], until)

    return run(main())


@pytest.fixture(scope="module")
def query24(query_clip) -> np.ndarray:
    pcm = resample_pcm16((query_clip * 32767).astype("<i2").tobytes(), 16000, 24000)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def test_echo_guard_no_self_interruption_while_a_real_question_still_interrupts(stack, query24):
    url = f"http://127.0.0.1:{port(stack)}/v1"
    # The answer plays to its end with its own voice in the microphone at -6 dB.
    seen = _echo_session(url, query24, [], lambda seen: bool(_done(seen)))
    done = _done(seen)[0]  # to its end, or to max_output_tokens (40): not cancelled
    assert (done.response.status, done.response.status_details.reason) in (
        ("completed", None), ("incomplete", "max_output_tokens")), done.response.status_details
    assert len([e for e in seen if e.type == "input_audio_buffer.committed"]) == 1  # only the question
    assert not _speech_during_answer(seen), _vad_events(seen)  # the echo never reached the VAD
    audio = [e for e in seen if e.type == "response.output_audio.delta"]
    assert len(audio) * 0.2 > 3  # more than 3 s of the answer went through the loudspeaker

    # A person asking over the playing answer (and its echo) still interrupts it.
    seen = _echo_session(url, query24, [(_audio_since_first_delta(1.5), query24)],
                         lambda seen: len([e for e in seen if e.type == "response.created"]) >= 2)
    first = _done(seen)[0]
    assert first.response.status == "cancelled" and first.response.status_details.reason == "turn_detected"
    assert len([e for e in seen if e.type == "input_audio_buffer.committed"]) == 2


def test_without_the_echo_guard_the_answer_interrupts_itself(stack, query24):
    """The control: the same loudspeaker, a gateway with the guard off (`--no-echo-guard`)."""
    from vita.realtime.server import RealtimeServer

    async def gateway(ready: asyncio.Future, stop: asyncio.Event):
        server = RealtimeServer(stack.target, port=0, echo_guard=False)
        task = asyncio.create_task(server.serve(stop))
        while not server.port:
            await asyncio.sleep(0.05)
        ready.set_result(server.port)
        await task

    async def main():
        ready, stop = asyncio.get_running_loop().create_future(), asyncio.Event()
        serving = asyncio.create_task(gateway(ready, stop))
        url = f"http://127.0.0.1:{await ready}/v1"
        try:
            client = AsyncOpenAI(base_url=url, api_key="unused")
            async with client.realtime.connect(model="vita-tiny") as conn:
                await conn.recv()
                await conn.session.update(session={"type": "realtime", "max_output_tokens": 40})
                await conn.recv()
                return await _loopback(conn, [(lambda seen, s: True, query24)], lambda seen: bool(_done(seen)))
        finally:
            stop.set()
            await serving

    seen = run(main())
    # The echo reaches the VAD as speech while the answer plays. Whether the model then judges that echo a query
    # before the answer ends (a self-interruption) depends on the tiny model's build and the machine's speed, so
    # the control asserts the cause the guard removes, and the interruption when the judgement came in time.
    assert _speech_during_answer(seen), [e.type for e in seen if not e.type.endswith("delta")]
    done = _done(seen)[0]
    assert done.response.status in ("completed", "incomplete", "cancelled")  # (incomplete: max_output_tokens)
    if done.response.status == "cancelled":
        assert done.response.status_details.reason == "turn_detected"


def test_resume_a_session_by_id_and_an_unknown_id_is_refused(stack, redis):
    async def main():
        ws = await _raw(stack)
        first = await _next(ws, "session.created")
        await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("remember me")}))
        await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
        await _next(ws, "response.done")
        await ws.close()
        async def resume_and_ask(session_id: str, text: str) -> dict:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port(stack)}/v1/realtime?model=m&session_id={session_id}",
                additional_headers={"Authorization": f"Bearer {TOKEN}"})
            created = await _next(ws, "session.created")
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item(text)}))
            await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            await _next(ws, "response.done")
            await ws.close()
            return created

        reported = first["session"]["id"]  # resumed with the id exactly as session.created reported it
        resumed = await resume_and_ask(reported, "and again")
        session_id = reported.removeprefix("sess_")  # the bare Converse session id resumes too
        resumed_bare = await resume_and_ask(session_id, "once more")
        unknown = await websockets.connect(
            f"ws://127.0.0.1:{port(stack)}/v1/realtime?model=m&session_id=nope{uuid.uuid4().hex}",
            additional_headers={"Authorization": f"Bearer {TOKEN}"})
        refused = await _next(unknown, "error")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(unknown.recv(), TIMEOUT_S)
        return session_id, resumed, resumed_bare, refused, closed.value

    session_id, resumed, resumed_bare, refused, closed = run(main())
    assert resumed["session"]["id"] == resumed_bare["session"]["id"] == f"sess_{session_id}"
    turns = stored(redis, stack, session_id).turns
    assert [t.content for t in turns if t.role == SessionTurn.USER] == ["remember me", "and again", "once more"]
    assert refused["error"]["code"] == "session_refused" and "does not exist" in refused["error"]["message"]
    assert closed.rcvd.code == 1008


# ------------------------------------------------------------------------------------------------------------------
# Refusals before an item is created, truncation bounds, readiness


async def _until_any(ws, kinds: set[str]) -> list[dict]:
    """Events up to and including the first whose type is in `kinds`."""
    seen = []
    while True:
        seen.append(json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S)))
        if seen[-1]["type"] in kinds:
            return seen


def test_a_bad_image_or_an_over_long_text_is_refused_with_the_event_id_and_stays_out_of_the_chain(stack):
    async def main():
        ws = await _raw(stack)
        try:
            await _next(ws, "session.created")
            first = {"type": "conversation.item.create", "event_id": "e0", "item": _text_item("Hello.")}
            await ws.send(json.dumps(first))
            created = await _next(ws, "conversation.item.added")
            await _next(ws, "conversation.item.done")
            image = {"type": "conversation.item.create", "event_id": "I1", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}}
            await ws.send(json.dumps(image))
            bad_image = await _until_any(ws, {"error", "conversation.item.added"})
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "L1",
                                      "item": _text_item("x" * 240_000)}))
            long_text = await _until_any(ws, {"error", "conversation.item.added"})
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": "e2",
                                      "item": _text_item("What is the capital of France?")}))
            after = await _next(ws, "conversation.item.added")
            await ws.send(json.dumps({"type": "response.create", "event_id": "L2",
                                      "response": {"output_modalities": ["text"]}}))
            done = await _until_any(ws, {"response.done"})
            return created, bad_image, long_text, after, done
        finally:
            await ws.close()

    created, bad_image, long_text, after, done = run(main())
    assert [e["type"] for e in bad_image] == ["error"]
    assert (bad_image[0]["error"]["event_id"], bad_image[0]["error"]["param"]) == (
        "I1", "item.content[0].image_url")
    assert "not in a supported image format" in bad_image[0]["error"]["message"]
    assert [e["type"] for e in long_text] == ["error"]
    assert (long_text[0]["error"]["event_id"], long_text[0]["error"]["param"]) == ("L1", "item.content")
    assert "240000" in long_text[0]["error"]["message"]
    assert after["previous_item_id"] == created["item"]["id"]  # neither refused item entered the chain
    assert not [e for e in done if e["type"] == "error"]
    assert done[-1]["response"]["status"] == "completed"


def test_unknown_item_fields_are_refused_by_name_and_the_session_goes_on(stack):
    """A `conversation.item.create` item (or content part) with a field the API does not have was taken, the field
    ignored (and a part's echoed back); OpenAI refuses it: `unknown_parameter`, `param` naming it. Beta clients
    too, by the beta API's item fields."""
    bogus = [("b1", {**_text_item("Hello."), "bogus": 1}, "item.bogus"),
             ("b2", {"type": "message", "role": "user", "content": [
                 {"type": "input_text", "text": "Hello.", "colour": "red"}]}, "item.content[0].colour"),
             ("b3", {**_text_item("Hello."), "call_id": "c1"}, "item.call_id")]  # (a beta item field)

    async def refusals(ws) -> list[list[dict]]:
        await _next(ws, "session.created")
        out = []
        for event_id, item, _ in bogus:
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": event_id, "item": item}))
            out.append(await _until_any(ws, {"error", "conversation.item.added", "conversation.item.created"}))
        return out

    async def main():
        ws = await _raw(stack)
        try:
            refused = await refusals(ws)
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                **_text_item("What is the capital of France?"), "id": "item_taken", "object": "realtime.item",
                "status": "completed"}}))  # (every field the API has)
            taken = await _next(ws, "conversation.item.added")
            await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            done = await _until_any(ws, {"response.done"})
        finally:
            await ws.close()
        beta = await _raw(stack, headers={"Authorization": f"Bearer {TOKEN}", "OpenAI-Beta": "realtime=v1"})
        try:
            beta_refused = await refusals(beta)
        finally:
            await beta.close()
        return refused, taken, done, beta_refused

    refused, taken, done, beta_refused = run(main())
    for events, (event_id, _, param) in zip(refused, bogus, strict=True):
        assert [e["type"] for e in events] == ["error"], events
        error = events[0]["error"]
        assert (error["type"], error["code"], error["param"], error["event_id"]) == (
            "invalid_request_error", "unknown_parameter", param, event_id)
        assert error["message"] == f"Unknown parameter: '{param}'."
    assert taken["item"]["id"] == "item_taken" and taken["previous_item_id"] is None  # no refused item is in the chain
    assert not [e for e in done if e["type"] == "error"] and done[-1]["response"]["status"] == "completed"
    # the beta API's item has function-call fields (call_id) beside the message's: only the others are refused
    assert [e[-1]["type"] for e in beta_refused] == ["error", "error", "conversation.item.created"]
    assert [e[-1]["error"]["param"] for e in beta_refused[:2]] == ["item.bogus", "item.content[0].colour"]


def test_a_lone_surrogate_is_invalid_json_and_does_not_wedge_the_session(stack, redis):
    # `\ud800` escapes a lone surrogate: Python's JSON reader takes it, no UTF-8 (protobuf strings, the orchestrator,
    # other clients' JSON readers) can. It used to be taken as an item, then fail response.create with a server_error
    # that left the session believing a response was on its way: every later response.create was refused.
    async def main():
        ws = await _raw(stack)
        try:
            await _next(ws, "session.created")
            await ws.send('{"type": "conversation.item.create", "event_id": "u1", "item": {"type": "message", '
                          '"role": "user", "content": [{"type": "input_text", "text": "hi \\ud800 there"}]}}')
            item = await _until_any(ws, {"error", "conversation.item.added"})
            await ws.send('{"type": "session.update", "event_id": "u2", "session": {"type": "realtime", '
                          '"instructions": "\\udfff"}}')
            update = await _until_any(ws, {"error", "session.updated"})
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("Hello \U0001F600")}))
            await _next(ws, "conversation.item.added")
            await ws.send(json.dumps({"type": "response.create", "event_id": "u3",
                                      "response": {"output_modalities": ["text"]}}))
            done = await _until_any(ws, {"response.done"})
            return item, update, done
        finally:
            await ws.close()

    item, update, done = run(main())
    for refused, event_id in ((item, "u1"), (update, "u2")):
        assert [e["type"] for e in refused] == ["error"]
        assert (refused[0]["error"]["code"], refused[0]["error"]["event_id"]) == ("invalid_json", event_id)
        assert "lone surrogate" in refused[0]["error"]["message"]
    assert not [e for e in done if e["type"] == "error"]
    assert done[-1]["response"]["status"] == "completed"  # (a surrogate pair, the emoji, is Unicode: taken)


def test_response_cancel_right_after_response_create_cancels_that_response(stack, redis):
    # OpenAI creates the response as it reads response.create, so a response.cancel sent right behind it cancels it.
    # Here the answer starts when the orchestrator has it: a cancel in between used to be refused
    # (response_cancel_not_active) and the whole answer was spoken.
    async def main():
        ws = await _raw(stack)
        try:
            created = await _next(ws, "session.created")
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("Hello.")}))
            await ws.send(json.dumps({"type": "response.create", "event_id": "c1"}))
            await ws.send(json.dumps({"type": "response.cancel", "event_id": "c2"}))
            cancelled = await _until_any(ws, {"response.done"})
            # the session goes on: a typed question is answered (in text: its deltas are never empty)
            await ws.send(json.dumps({"type": "conversation.item.create", "item": _text_item("And now?")}))
            await ws.send(json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}}))
            answered = await _until_any(ws, {"response.done"})
            return created, cancelled, answered
        finally:
            await ws.close()

    created, cancelled, answered = run(main())
    assert not [e for e in cancelled if e["type"] == "error"]
    done = cancelled[-1]["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")
    assert not [e for e in cancelled if e["type"] == "response.output_audio.delta"]  # nothing of it was spoken
    turns = stored(redis, stack, created["session"]["id"].removeprefix("sess_")).turns
    assert turns[1].interrupted and turns[1].content == ""  # the history keeps what was heard: nothing
    assert answered[-1]["response"]["status"] == "completed"
    deltas = [e["delta"] for e in answered if e["type"] == "response.output_text.delta"]
    assert deltas and all(deltas)  # OpenAI sends no empty deltas
    assert "".join(deltas) == answered[-1]["response"]["output"][0]["content"][0]["text"]


def test_a_beta_client_gets_the_beta_api_events_and_its_session_fields_are_taken(stack):
    # `client.beta.realtime.connect` (and clients written before the GA API) send `OpenAI-Beta: realtime=v1` and speak
    # the beta API: top-level voice / input_audio_format / turn_detection / temperature, and the beta event names
    # (response.audio.delta, response.audio_transcript.delta, ...). Answered in GA terms, such a client had its usual
    # session.update refused and parsed every audio delta as some other event: it heard nothing.
    async def main():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port(stack)}/v1", api_key=TOKEN,
                             websocket_base_url=f"ws://127.0.0.1:{port(stack)}/v1")
        async with client.beta.realtime.connect(model="vita-tiny") as conn:
            ev = Events(conn)
            created = await ev.until("session.created")
            await conn.session.update(session={
                "modalities": ["text", "audio"], "voice": "alloy", "input_audio_format": "pcm16",
                "output_audio_format": "pcm16", "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                "input_audio_transcription": None, "temperature": 0.8, "max_response_output_tokens": 12})
            updated = await ev.until("session.updated")
            await conn.session.update(session={"voice": "nosuchvoice"})
            refused_voice = await ev.until("error")
            await conn.session.update(session={"input_audio_format": "g711_ulaw"})
            refused_format = await ev.until("error")
            await conn.conversation.item.create(item=_text_item("Hello."))
            await conn.response.create(response={"modalities": ["text", "audio"], "voice": "alloy"})
            done = await ev.until("response.done")
            await ev.probe({})
            return created, updated, refused_voice, refused_format, done, ev

    created, updated, refused_voice, refused_format, done, ev = run(main())
    assert type(created).__module__.startswith("openai.types.beta.realtime")
    assert (created.session.modalities, created.session.voice, created.session.input_audio_format) == (
        ["text", "audio"], DEFAULT_VOICE, "pcm16")
    session = updated.session
    assert (session.voice, session.temperature, session.max_response_output_tokens) == ("alloy", 0.8, 12)
    assert session.turn_detection.type == "server_vad" and session.turn_detection.silence_duration_ms == 600
    assert (refused_voice.error.code, refused_voice.error.param) == ("invalid_value", "session.voice")
    assert refused_format.error.param == "session.input_audio_format"
    types = ev.types()
    assert "response.audio.delta" in types and "response.audio_transcript.delta" in types
    assert not [t for t in types if t.startswith(("response.output_audio", "response.output_text"))]  # (GA names)
    assert all(type(e).__name__ == "ResponseAudioDeltaEvent" for e in ev.of("response.audio.delta"))
    transcript = "".join(e.delta for e in ev.of("response.audio_transcript.delta"))
    assert transcript and ev.of("response.audio_transcript.done")[0].transcript == transcript
    assert done.response.status in ("completed", "incomplete") and done.response.modalities == ["text", "audio"]
    assert done.response.output[0].content[0].type == "audio"  # (the GA API's output_audio)
    assert done.response.output[0].content[0].transcript == transcript
    # items as the beta API announces them: conversation.item.created, once (no GA conversation.item.added / .done)
    items = ev.of("conversation.item.created")
    assert [(e.item.role, e.item.status) for e in items] == [("user", "completed"), ("assistant", "in_progress")]
    assert items[1].item.id == done.response.output[0].id and items[1].previous_item_id == items[0].item.id
    assert not [t for t in types if t in ("conversation.item.added", "conversation.item.done")]
    assert types[-3:] == ["response.done", "rate_limits.updated", "session.updated"]
    assert ev.seen[-2].rate_limits == [] and type(ev.seen[-2]).__module__.startswith("openai.types.beta.realtime")


def test_truncate_past_the_audio_or_past_an_earlier_truncation_is_refused(stack, query_clip):
    async def main():
        ws = await _raw(stack)
        try:
            await _next(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 16000}}}, "max_output_tokens": 12}}))
            await _next(ws, "session.updated")
            for chunk in chunks(pcm16(query_clip), 16000):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            seen = await _until_any(ws, {"response.done"})
            item_id = seen[-1]["response"]["output"][0]["id"]
            sent_ms = sum(len(base64.b64decode(e["delta"])) for e in seen
                          if e["type"] == "response.output_audio.delta") // 48
            replies = []
            for event_id, end_ms in (("t1", 1_000_000_000), ("t2", sent_ms // 2), ("t3", sent_ms),
                                     ("t4", sent_ms // 4)):
                await ws.send(json.dumps({"type": "conversation.item.truncate", "event_id": event_id,
                                          "item_id": item_id, "content_index": 0, "audio_end_ms": end_ms}))
                replies.append((await _until_any(ws, {"error", "conversation.item.truncated"}))[-1])
            return sent_ms, replies
        finally:
            await ws.close()

    sent_ms, replies = run(main())
    assert sent_ms > 0
    kinds = [(r["type"], r["error"]["event_id"] if r["type"] == "error" else r["audio_end_ms"]) for r in replies]
    assert kinds == [("error", "t1"), ("conversation.item.truncated", sent_ms // 2), ("error", "t3"),
                     ("conversation.item.truncated", sent_ms // 4)]
    assert replies[0]["error"]["param"] == replies[2]["error"]["param"] == "audio_end_ms"


def _http_status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_readyz_follows_the_orchestrator_and_healthz_does_not(stack):
    import socket
    import subprocess
    import sys
    import time

    assert _http_status(f"http://127.0.0.1:{port(stack)}/readyz") == 200
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    gateway = subprocess.Popen([sys.executable, "-m", "vita.realtime", "--orchestrator", "127.0.0.1:1",
                                "--port", str(free)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                healthz = _http_status(f"http://127.0.0.1:{free}/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline and gateway.poll() is None
                time.sleep(0.1)
        assert healthz == 200
        assert _http_status(f"http://127.0.0.1:{free}/readyz") == 503
    finally:
        gateway.terminate()
        gateway.wait(30)


def test_a_failed_test_reports_every_service_with_its_stack_dump_and_the_stack_serves_on(stack):
    """What tests/conftest.py attaches to a failure on a stack: each service alive, its log, its threads and tasks
    (SIGUSR1, which no service may die of: the gateway and the four pools and the orchestrator all handle it)."""
    from conftest import services_report

    from vita.stack import wait_healthy

    report = services_report(stack)
    assert report.count("---- stack dump (SIGUSR1)") == report.count("asyncio: ") == len(stack.services) == 6
    for service in stack.services:
        assert f"==== {service.name}: pid {service.pid} alive; {service.log_path}" in report
    assert "in _report_lag" in report and "in serve" in report  # an encoder's worker task; serve()'s own
    assert stack.running() == stack.services
    for service in stack.services:
        wait_healthy(service, 30)
