"""The Realtime gateway's pure parts: event parsing, session settings, sentence cutting, played text, echo guard."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from vita.realtime.echo import EchoGuard
from vita.realtime.protocol import (
    RealtimeError,
    SessionSettings,
    b64decode,
    parse_client_event,
    response_params,
)
from vita.realtime.session import RealtimeSession
from vita.realtime.tts import DEFAULT_VOICE, EspeakTTS, SentenceSplitter, Spoken, played_text


@pytest.mark.parametrize("raw, code, param", [
    ("{oops", "invalid_json", None),
    ("[1]", "invalid_json", None),
    ('{"event_id": "x"}', "missing_required_parameter", "type"),
    ('{"type": "bogus"}', "invalid_value", "type"),
    ('{"type": "conversation.item.delete"}', "unsupported_event", "type"),
    ('{"type": "response.create", "event_id": 7}', "invalid_value", "event_id"),
    # Not JSON, though Python reads them (they came back to clients in echoed items and session values):
    ('{"type": "session.update", "session": {"audio": {"output": {"speed": NaN}}}}', "invalid_json", None),
    ('{"type": "conversation.item.create", "item": {"x": Infinity}}', "invalid_json", None),
    ('{"type": "conversation.item.create", "item": {"x": 1e999}}', "invalid_json", None),
])
def test_bad_client_events_are_named(raw, code, param):
    with pytest.raises(RealtimeError) as e:
        parse_client_event(raw)
    assert (e.value.code, e.value.param) == (code, param) and str(e.value)


def test_base64_is_strict():
    assert b64decode("AAE=", "audio") == b"\0\1"
    with pytest.raises(RealtimeError) as e:
        b64decode("AA E=!", "audio")
    assert e.value.code == "invalid_base64" and e.value.param == "audio"


def test_session_update_maps_server_vad_to_converse_vad_params():
    s = SessionSettings().updated({"type": "realtime", "instructions": "Be brief.", "max_output_tokens": 64,
                                   "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},
                                                       "turn_detection": {"type": "server_vad", "threshold": 0.7,
                                                                          "silence_duration_ms": 600,
                                                                          "prefix_padding_ms": 300}}}})
    config = s.to_converse()
    assert config.system_prompt == "Be brief." and config.audio_sample_rate_hz == 16000
    assert config.sampling.max_tokens == 64
    assert (round(config.vad.start_threshold, 3), round(config.vad.end_threshold, 3)) == (0.7, 0.55)
    assert (config.vad.end_silence_ms, config.vad.speech_pad_ms) == (600, 300)
    api = s.to_api()["audio"]["input"]["turn_detection"]
    assert (api["threshold"], api["silence_duration_ms"], api["prefix_padding_ms"]) == (0.7, 600, 300)
    # Unset fields keep their values; instructions "" restores the model's own prompts.
    again = s.updated({"instructions": ""})
    assert again.input_rate == 16000 and not again.to_converse().HasField("system_prompt")


def test_semantic_vad_eagerness_sets_the_end_of_turn_hold():
    s = SessionSettings().updated({"audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                          "eagerness": "low"}}}})
    assert s.to_converse().vad.incomplete_silence_ms == 2000
    api = s.to_api()["audio"]["input"]["turn_detection"]
    assert (api["type"], api["eagerness"]) == ("semantic_vad", "low")
    assert s.vad().incomplete_silence_ms == 2000 and s.vad().end_silence_ms == 400
    back = s.updated({"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}}})
    assert back.to_converse().vad.incomplete_silence_ms == -1  # as OpenAI's server_vad: silence alone
    assert "eagerness" not in back.to_api()["audio"]["input"]["turn_detection"]
    assert back.vad().end_silence_ms == 300 and back.vad().incomplete_silence_ms == 0


@pytest.mark.parametrize("session, param", [
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "urgent"}}}},
     "session.audio.input.turn_detection.eagerness"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 1.5}}}},
     "session.audio.input.turn_detection"),
    ({"audio": {"input": {"turn_detection": None}}}, "session.audio.input.turn_detection"),
    ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "session.audio.input.format"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 4000}}}}, "session.audio.input.format.rate"),
    ({"output_modalities": ["video"]}, "session.output_modalities"),
    ({"tools": [{"type": "function", "name": "f"}]}, "session.tools"),
    ({"max_output_tokens": 0}, "session.max_output_tokens"),
    ({"type": "transcription"}, "session.type"),
    # What the fuzzing of the gateway found: each ended the session (an exception past the event handler).
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": ["low"]}}}},
     "session.audio.input.turn_detection.eagerness"),  # TypeError: a list is not hashable
    ({"audio": {"input": {"turn_detection": {"silence_duration_ms": 1 << 40}}}},
     "session.audio.input.turn_detection.silence_duration_ms"),  # ValueError: past Converse's int32
    ({"audio": {"input": {"turn_detection": {"prefix_padding_ms": 1 << 31}}}},
     "session.audio.input.turn_detection.prefix_padding_ms"),
])
def test_refused_session_settings_name_the_field(session, param):
    before = SessionSettings()
    with pytest.raises(RealtimeError) as e:
        before.updated(session)
    assert e.value.param == param
    assert before == SessionSettings()  # nothing applied


def test_a_session_refuses_a_voice_it_cannot_speak_and_survives_an_event_that_fails():
    """An unknown voice was taken, and failed only when the first answer was spoken (that answer never ended); an
    exception an event handler did not foresee ended the session. Both are error events now, and the session goes
    on. (No connection is needed: the events go to the session's outbox.)"""
    session = RealtimeSession(None, None, SessionSettings())

    def fails(event: dict) -> None:
        raise KeyError("something not foreseen")

    async def main() -> None:
        await session._on_message(json.dumps({"type": "session.update", "event_id": "e1",
                                              "session": {"audio": {"output": {"voice": "nope!"}}}}))
        session._on_input_audio_buffer_clear = fails
        await session._on_message(json.dumps({"type": "input_audio_buffer.clear", "event_id": "e2"}))

    asyncio.run(main())
    refused, failed = (session._out.get_nowait() for _ in range(2))
    assert (refused["error"]["param"], refused["error"]["event_id"]) == ("session.audio.output.voice", "e1")
    assert (failed["error"]["type"], failed["error"]["event_id"]) == ("server_error", "e2")
    assert session.settings.voice == DEFAULT_VOICE and session._out.empty()


@pytest.mark.parametrize("response, code, param", [
    # Not in the API: refused as session.update refuses them (they were silently ignored), nested fields too.
    ({"frobnicate": 1}, "unknown_parameter", "response.frobnicate"),
    ({"voice": "alloy"}, "unknown_parameter", "response.voice"),  # (beta: its GA place is named in the message)
    ({"audio": {"input": {}}}, "unknown_parameter", "response.audio.input"),
    ({"audio": {"output": {"voice": "alloy", "speed": 1.2}}}, "unknown_parameter", "response.audio.output.speed"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "bits": 16}}}}, "unknown_parameter",
     "response.audio.output.format.bits"),
    # In the API, not done per response here: refused by name (they were silently ignored).
    ({"instructions": "answer in French"}, "unsupported_parameter", "response.instructions"),
    ({"max_output_tokens": 5}, "unsupported_parameter", "response.max_output_tokens"),
    ({"tools": [{"type": "function", "name": "f"}]}, "unsupported_parameter", "response.tools"),
    ({"tool_choice": "required"}, "unsupported_parameter", "response.tool_choice"),
    ({"prompt": {"id": "pmpt_1"}}, "unsupported_parameter", "response.prompt"),
    ({"parallel_tool_calls": True}, "unsupported_parameter", "response.parallel_tool_calls"),
    ({"conversation": "none"}, "unsupported_parameter", "response.conversation"),
    ({"input": []}, "unsupported_parameter", "response.input"),
    # Wrong values.
    ([1], "invalid_value", "response"),
    ({"instructions": 3}, "invalid_value", "response.instructions"),
    ({"max_output_tokens": 0}, "invalid_value", "response.max_output_tokens"),
    ({"output_modalities": ["video"]}, "invalid_value", "response.output_modalities"),
    ({"audio": {"output": {"format": {"type": "audio/pcmu"}}}}, "invalid_value", "response.audio.output.format"),
    ({"audio": {"output": {"voice": 7}}}, "invalid_value", "response.audio.output.voice"),
    ({"audio": []}, "invalid_value", "response.audio"),
    ({"metadata": "x"}, "invalid_value", "response.metadata"),
    ({"metadata": {"k": 1}}, "invalid_value", "response.metadata.k"),
    ({"metadata": {f"k{n}": "v" for n in range(17)}}, "object_above_max_properties", "response.metadata"),
    ({"metadata": {"k" * 65: "v"}}, "string_above_max_length", "response.metadata"),
    ({"metadata": {"k": "v" * 513}}, "string_above_max_length", "response.metadata.k"),
])
def test_refused_response_fields_are_named(response, code, param):
    with pytest.raises(RealtimeError) as e:
        response_params(response, SessionSettings())
    assert (e.value.code, e.value.param) == (code, param) and str(e.value)
    if code == "unknown_parameter":
        assert str(e.value).startswith(f"Unknown parameter: '{param}'.")
    if code == "unsupported_parameter" and param in ("response.instructions", "response.max_output_tokens"):
        assert "session.update" in str(e.value)


def test_response_fields_this_server_does_for_one_response_are_taken():
    session = SessionSettings(instructions="Be brief.", max_output_tokens=64)
    asked = response_params({
        "conversation": "auto", "output_modalities": ["text"], "metadata": {"k" * 64: "v" * 512, "b": ""},
        "audio": {"output": {"voice": {"id": "en-gb"}, "format": {"type": "audio/pcm", "rate": 24000}}},
        # the session's own values, and the API's fields we do not implement left off, are taken
        "instructions": "Be brief.", "max_output_tokens": 64, "tools": [], "tool_choice": "auto", "prompt": None,
        "parallel_tool_calls": False}, session)
    assert (asked.modality, asked.voice, asked.metadata) == ("text", "en-gb", {"k" * 64: "v" * 512, "b": ""})
    plain = response_params(None, session)
    assert (plain.modality, plain.voice, plain.metadata) == ("audio", None, None)
    assert response_params({"metadata": {f"k{n}": "v" for n in range(16)}}, session).metadata["k15"] == "v"


def test_sentences_join_back_to_the_text_and_cut_early():
    text = "The sky is blue. Why? Because of Rayleigh scattering; it favours short waves. 天空是蓝色的。好！ end"
    splitter, pieces = SentenceSplitter(), []
    for k in range(0, len(text), 3):
        pieces += splitter.push(text[k:k + 3])
    pieces.append(splitter.flush())
    assert "".join(pieces) == text
    assert pieces[:3] == ["The sky is blue. ", "Why? ", "Because of Rayleigh scattering; "]
    long = SentenceSplitter(max_chars=20).push("word " * 10)
    assert long and all(len(p) <= 20 and p.endswith(" ") for p in long)


def test_played_text_is_whole_sentences_then_whole_words():
    spoken = [Spoken("Hello there. ", 0, 1000), Spoken("How are you today? ", 1000, 2000)]
    assert played_text(spoken, 0) == ""
    assert played_text(spoken, 1000) == "Hello there. "
    assert played_text(spoken, 1600) == "Hello there. How are"
    assert played_text(spoken, 5000) == "Hello there. How are you today? "


def _pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def _floats(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def _db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


@pytest.fixture(scope="module")
def voice():
    return EspeakTTS().synthesize("This is the assistant answering your question about the weather in Paris.")


def _through(guard: EchoGuard, mic: np.ndarray, step: int = 2400) -> np.ndarray:
    pcm = _pcm(mic)
    return _floats(b"".join(guard.process(pcm[k:k + step * 2]) for k in range(0, len(pcm), step * 2)))


def test_echo_guard_removes_its_own_voice_and_keeps_a_person_talking_over_it(voice):
    out = _floats(voice)
    delay = int(0.23 * 24000)
    mic = np.zeros(len(out) + delay + 2400, np.float32)
    mic[delay:delay + len(out)] += 0.5 * out  # -6 dB
    guard = EchoGuard(24000)
    guard.played(voice)
    cleaned = _through(guard, mic)
    echo = slice(delay, delay + len(out))
    assert guard.delay == delay
    assert _db(mic[echo]) - _db(cleaned[echo]) > 40  # gone, to PCM rounding

    rng = np.random.default_rng(0)
    person = np.zeros_like(mic)
    person[delay + 4800:delay + 4800 + 24000] = 0.2 * np.sin(np.arange(24000) * 0.05) * rng.uniform(0.5, 1, 24000)
    guard = EchoGuard(24000)
    guard.played(voice)
    cleaned = _through(guard, mic + person)
    assert _db(cleaned - person) < _db(person) - 20  # what is left is the person


@pytest.mark.parametrize("late_s", [0.15, 0.3, 0.6])
def test_echo_guard_follows_a_delay_that_grows_mid_answer(voice, late_s):
    """A client (or the gateway) that falls behind on a busy machine: the answer comes in five pieces, and the
    second and the fourth reach the client `late_s` after its playback ran dry, so the echo's delay grows twice
    mid-answer while most of the guard's last second of input still matches the old delay. The guard finds each new
    delay within a chunk: no run of three leaking chunks (300 ms, past the VAD's 250 ms minimum speech)."""
    out = _floats(voice)
    n = len(out) // 5 // 2400 * 2400
    delay, late = int(0.23 * 24000), int(late_s * 24000)
    mic = np.zeros(len(out) + delay + 2 * late + 4800, np.float32)
    guard = EchoGuard(24000)
    for k in range(5):
        piece = out[k * n:(k + 1) * n] if k < 4 else out[k * n:]
        guard.played(_pcm(piece))  # back to back, as the guard models the client
        at = k * n + delay + late * ((k + 1) // 2)
        mic[at:at + len(piece)] += 0.5 * piece
    cleaned = _through(guard, mic)
    chunks = range(0, len(mic) - 2400, 2400)
    leaking = [_db(mic[i:i + 2400]) > -40 and _db(mic[i:i + 2400]) - _db(cleaned[i:i + 2400]) < 10 for i in chunks]
    longest = max(len(run) for run in "".join("x" if x else " " for x in leaking).split(" "))
    assert longest <= 2, leaking
    assert guard.delay == delay + 2 * late
    removed = [_db(mic[i:i + 2400]) - _db(cleaned[i:i + 2400]) > 30 for i in chunks if _db(mic[i:i + 2400]) > -40]
    assert sum(removed) >= 0.85 * len(removed)  # all but the chunks in which the delay moved


def test_echo_guard_leaves_input_alone_when_nothing_was_played(voice):
    mic = 0.3 * _floats(voice)
    assert np.array_equal(_through(EchoGuard(24000), mic), _floats(_pcm(mic)))


def test_handshake_tokens():
    """The token file is vita.runtime.access's (tested in test_access_parts.py); here, where the gateway finds the
    token in a WebSocket handshake."""
    from websockets.datastructures import Headers

    from vita.realtime.server import request_token

    assert request_token(Headers([("Authorization", "Bearer alpha")])) == "alpha"
    assert request_token(Headers([("Sec-WebSocket-Protocol", "realtime, openai-insecure-api-key.beta")])) == "beta"
    assert request_token(Headers([("Authorization", "Basic xyz")])) is None
