"""The Realtime gateway's checks a new user ran into, without a stack: the session is driven with Converse events and
its outbox read (no connection is needed).

- an espeak-ng voice that does not exist was accepted and failed every sentence of every answer;
- a failed synthesis let the response end `completed`;
- `?session_id=` took only the bare id, not the `sess_...` that session.created reports;
- an answer cut by the token limit ended `completed` (OpenAI: `incomplete`, reason `max_output_tokens`);
- unknown session.update fields and another `model` were silently accepted (OpenAI: `unknown_parameter`).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from vita.errors import VitaError
from vita.realtime import session as session_module
from vita.realtime.protocol import RealtimeError, SessionSettings
from vita.realtime.session import RealtimeSession
from vita.realtime.tts import VOICES, EspeakTTS
from vita.v1.assistant_pb2 import (
    AnswerCompleted,
    AnswerInterrupted,
    AnswerStarted,
    AnswerTruncated,
    Completed,
    ServerEvent,
    TextDelta,
    Usage,
)

# --------------------------------------------------------------------------------------------------------------------
# Voices


@pytest.mark.parametrize("voice", ["nosuchvoice_xyz", "English", "en+nosuch", "en+M3", "mb-af1", "xx-yy", "nope!",
                                   "gmw/../../etc", ""])
def test_a_voice_espeak_ng_does_not_have_is_refused_when_the_engine_is_made(voice):
    with pytest.raises(VitaError, match="unknown voice"):
        EspeakTTS(voice)


@pytest.mark.parametrize("voice", [*VOICES, *VOICES.values(), "en", "EN", "en-us", "gmw/en", "de-de", "zh",
                                   "vi-vn-x-central", "de+Alex"])
def test_the_openai_names_and_espeak_ng_voices_are_taken(voice):
    assert EspeakTTS(voice).voice == VOICES.get(voice, voice)


def _events(session: RealtimeSession) -> list[dict]:
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


def _update(session: RealtimeSession, body: dict, event_id: str = "e1") -> list[dict]:
    asyncio.run(session._on_message(json.dumps({"type": "session.update", "event_id": event_id, "session": body})))
    return _events(session)


def test_session_update_with_an_unknown_voice_is_refused_and_the_voice_stays():
    session = RealtimeSession(None, None, SessionSettings())
    [updated] = _update(session, {"audio": {"output": {"voice": "en-gb"}}})
    assert updated["type"] == "session.updated" and updated["session"]["audio"]["output"]["voice"] == "en-gb"
    [refused] = _update(session, {"audio": {"output": {"voice": "nosuchvoice_xyz"}}}, "e2")
    assert refused["type"] == "error"
    assert (refused["error"]["type"], refused["error"]["param"], refused["error"]["event_id"]) == (
        "invalid_request_error", "session.audio.output.voice", "e2")
    assert "nosuchvoice_xyz" in refused["error"]["message"]
    assert session.settings.voice == "en-gb"


# --------------------------------------------------------------------------------------------------------------------
# Responses driven by Converse events


def _converse(session: RealtimeSession, turn: int, **event) -> None:
    session._on_converse(ServerEvent(turn_id=turn, **event))


def _completed(reason: int) -> dict:
    return {"completed": AnswerCompleted(usage=Usage(prompt_tokens=10, completion_tokens=4), finish_reason=reason)}


async def _drain_until_done(session: RealtimeSession, timeout_s: float = 30.0) -> list[dict]:
    """The session's events up to its response.done (the speaker task runs meanwhile)."""
    seen = []
    while True:
        event = await asyncio.wait_for(session._out.get(), timeout_s)
        seen.append(event)
        if event["type"] == "response.done":
            return seen


@pytest.mark.parametrize("reason, status, detail", [
    (Completed.STOP, "completed", None),
    (Completed.LENGTH, "incomplete", "max_output_tokens"),
    (Completed.CONTEXT_LENGTH, "incomplete", "max_output_tokens"),
])
@pytest.mark.parametrize("modality", ["text", "audio"])
def test_an_answer_cut_by_the_token_limit_ends_incomplete(modality, reason, status, detail):
    session = RealtimeSession(None, None, SessionSettings(output_modalities=[modality]), audio_lead_ms=60_000)

    async def main() -> list[dict]:
        _converse(session, 1, answer_started=AnswerStarted(state_token="<1>"))
        _converse(session, 1, delta=TextDelta(text="Paris is the capital"))
        _converse(session, 1, **_completed(reason))
        return await _drain_until_done(session)

    events = asyncio.run(main())
    done = events[-1]["response"]
    assert done["status"] == status
    assert done["status_details"] == {"type": status, "reason": detail, "error": None}
    item = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert item["status"] == ("completed" if status == "completed" else "incomplete")
    assert not [e for e in events if e["type"] == "error"]


def _sent(session: RealtimeSession) -> list:
    """The Converse events the session sent since the last call."""
    sent = []
    while not session._to_converse.empty():
        sent.append(session._to_converse.get_nowait())
    return sent


class _FailingTTS:
    sample_rate = 24_000

    def __init__(self, error: Exception) -> None:
        self.error = error

    def synthesize(self, text: str) -> bytes:
        raise self.error


@pytest.mark.parametrize("error", [VitaError("espeak-ng failed: boom"), OSError("espeak-ng vanished")])
@pytest.mark.parametrize("generating", [False, True])
def test_a_failed_synthesis_fails_the_response(monkeypatch, error, generating):
    """The speech of a sentence failed: an error event `tts_failed`, and the response ends `failed` with it (it
    ended `completed`, without audio). An answer still being generated is stopped first."""
    monkeypatch.setattr(session_module, "make_tts", lambda *args, **kwargs: _FailingTTS(error))
    session = RealtimeSession(None, None, SessionSettings(), audio_lead_ms=60_000)

    async def main() -> list[dict]:
        _converse(session, 1, answer_started=AnswerStarted(state_token="<1>"))
        _converse(session, 1, delta=TextDelta(text="Paris is the capital. And more"))
        if not generating:
            _converse(session, 1, **_completed(Completed.STOP))
        seen = []
        while not [e for e in seen if e["type"] == "error"]:
            seen.append(await asyncio.wait_for(session._out.get(), 30))
        if generating:  # the gateway asked Converse to stop the answer: it confirms
            assert [e.cancel.turn_id for e in _sent(session) if e.WhichOneof("event") == "cancel"] == [1]
            _converse(session, 1, interrupted=AnswerInterrupted(tokens_sent=5, tokens_generated=5))
        # The stored answer is cut to what was spoken (nothing), and once Converse confirms, response.done.
        assert [e.truncate.content for e in _sent(session) if e.WhichOneof("event") == "truncate"] == [""]
        _converse(session, 1, truncated=AnswerTruncated(content=""))
        return seen + await _drain_until_done(session)

    events = asyncio.run(main())
    [failure] = [e for e in events if e["type"] == "error"]
    assert (failure["error"]["type"], failure["error"]["code"]) == ("server_error", "tts_failed")
    done = events[-1]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == "tts_failed"
    assert done["output"][0]["status"] == "incomplete"
    assert not [e for e in events if e["type"] == "response.output_audio.delta"]


# --------------------------------------------------------------------------------------------------------------------
# Resuming


def test_resume_takes_the_id_session_created_reports_and_the_bare_one():
    from vita.realtime.server import resume_id

    settings = SessionSettings(session_id="0123abcd")
    reported = settings.to_api()["id"]
    assert reported == "sess_0123abcd"
    assert resume_id(reported) == "0123abcd" and resume_id("0123abcd") == "0123abcd" and resume_id("") == ""


# --------------------------------------------------------------------------------------------------------------------
# session.update fields


@pytest.mark.parametrize("body, param", [
    ({"bogus_key": 1}, "session.bogus_key"),
    ({"voice": "alloy"}, "session.voice"),  # the beta API's place: silently ignored before
    ({"turn_detection": {"type": "server_vad"}}, "session.turn_detection"),
    ({"temperature": 0.7}, "session.temperature"),
    ({"audio": {"bogus": {}}}, "session.audio.bogus"),
    ({"audio": {"input": {"bogus": 1}}}, "session.audio.input.bogus"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000, "channels": 2}}}},
     "session.audio.input.format.channels"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "treshold": 0.7}}}},
     "session.audio.input.turn_detection.treshold"),
    ({"audio": {"output": {"voice": "alloy", "volume": 2}}}, "session.audio.output.volume"),
])
def test_unknown_session_fields_are_refused_by_name(body, param):
    before = SessionSettings()
    with pytest.raises(RealtimeError) as e:
        before.updated(body)
    assert (e.value.code, e.value.param, e.value.kind) == ("unknown_parameter", param, "invalid_request_error")
    assert str(e.value).startswith(f"Unknown parameter: '{param}'.")
    assert before == SessionSettings()


def test_another_model_is_refused_and_the_sessions_own_is_taken():
    settings = SessionSettings(model="vita-tiny")
    with pytest.raises(RealtimeError) as e:
        settings.updated({"model": "gpt-realtime"})
    assert (e.value.code, e.value.param) == ("invalid_value", "session.model")
    assert settings.updated({"type": "realtime", "model": "vita-tiny"}).model == "vita-tiny"


def test_the_session_object_the_server_sent_is_taken_back():
    """Clients may send back (a changed copy of) what session.created gave them: every field of it is known."""
    settings = SessionSettings(session_id="abc", model="vita-tiny").updated(
        {"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}})
    api = settings.to_api()
    api["instructions"] = "Be brief."
    again = settings.updated(api)
    assert again.instructions == "Be brief." and again.turn_detection["eagerness"] == "high"
    # The GA fields this server does not implement are named as unsupported, not unknown, when set.
    with pytest.raises(RealtimeError) as e:
        settings.updated({"tracing": {"workflow_name": "x"}})
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "session.tracing")
