"""The OpenAI Realtime API's wire format (GA field names, as in the `openai` SDK's `types/realtime`): parsing and
checking client events, the session object, and the shapes of the server events we send.

Pure functions and dataclasses, no I/O: `session.py` drives a Converse call with them.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from vita.errors import InvalidInputError
from vita.orchestrator.config import session_vad
from vita.processing.vad import VADConfig
from vita.realtime.tts import DEFAULT_VOICE, SAMPLE_RATE
from vita.v1.assistant_pb2 import SessionConfig, VadParams
from vita.v1.media_pb2 import SamplingParams

CLIENT_EVENTS = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.truncate", "response.create", "response.cancel",
)
# Client events of the API that this server does not implement: refused with a clear error (docs/realtime.md).
UNSUPPORTED_EVENTS = ("conversation.item.delete", "conversation.item.retrieve", "output_audio_buffer.clear")
IGNORED_EVENT = "vita.utterance.ignored"  # our extension: speech judged not meant for the assistant
SESSION_ID_PREFIX = "sess_"  # session.id is this + the Converse session id; `?session_id=` takes either


class RealtimeError(Exception):
    """A client event the server refuses: sent back as an `error` event; the session goes on."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.param, self.kind = code, param, kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def error_event(error: RealtimeError | str, *, code: str | None = None, kind: str | None = None,
                client_event_id: str | None = None, param: str | None = None) -> dict:
    """`{"type": "error", "event_id", "error": {type, code, message, param, event_id}}` (the API's shape)."""
    if isinstance(error, RealtimeError):
        code, param, kind = code or error.code, param or error.param, kind or error.kind
    return {"type": "error", "event_id": new_id("event"), "error": {
        "type": kind or "invalid_request_error", "code": code, "message": str(error), "param": param,
        "event_id": client_event_id}}


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:24]} is out of range")
    return value


def _loads(raw: str | bytes) -> Any:
    """Strict JSON: Python's reader also takes NaN, Infinity and 1e999, which would come back to clients (echoed
    items, session values) as something their JSON readers refuse, and `\\ud800`-style escapes of lone surrogates,
    which are no Unicode text (I-JSON, RFC 7493): no UTF-8 encodes them, so neither the orchestrator (protobuf
    strings) nor a client could take them back."""
    value = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    _check_unicode(value)
    return value


def _check_unicode(value: Any) -> None:
    """ValueError naming the first string (or key) of `value` that is not Unicode text (a lone surrogate)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"the string {item[:24]!r} has a lone surrogate ({e.object[e.start]!r}), which is "
                                 "not Unicode text") from None


def parse_client_event(raw: str | bytes) -> dict:
    """One WebSocket message as a client event dict with a known `type`; RealtimeError otherwise."""
    try:
        event = _loads(raw)
    except (ValueError, RecursionError) as e:
        raise RealtimeError(f"the message is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise RealtimeError("a client event must be a JSON object", code="invalid_json")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise RealtimeError("missing required parameter: 'type'", code="missing_required_parameter", param="type")
    if kind in UNSUPPORTED_EVENTS:
        raise RealtimeError(f"'{kind}' is not supported by this server (see docs/realtime.md)",
                            code="unsupported_event", param="type")
    if kind not in CLIENT_EVENTS:
        raise RealtimeError(f"Invalid value: '{kind}'. Supported values are: "
                            + ", ".join(f"'{k}'" for k in CLIENT_EVENTS) + ".", param="type")
    if "event_id" in event and not isinstance(event["event_id"], str):
        raise RealtimeError("event_id must be a string", param="event_id")
    return event


def client_event_id(raw: str | bytes) -> str | None:
    """The `event_id` of a client message, when it has a readable one (for the error it gets)."""
    try:  # (not _loads: a lone surrogate elsewhere in the event leaves its event_id readable)
        event = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
        event_id = event.get("event_id") if isinstance(event, dict) else None
        _check_unicode(event_id)
    except (ValueError, RecursionError):
        return None
    return event_id if isinstance(event_id, str) else None


def b64decode(value: Any, param: str) -> bytes:
    """Strict base64 (RealtimeError naming `param` when it is not)."""
    if not isinstance(value, str):
        raise RealtimeError(f"'{param}' must be a base64 string", param=param)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError(f"'{param}' is not valid base64", code="invalid_base64", param=param) from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url_bytes(url: Any, param: str) -> bytes:
    """An image given as `data:image/...;base64,...` (remote URLs cannot be fetched by this server)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise RealtimeError(f"'{param}' must be a data URL (data:image/png;base64,...); remote URLs are not "
                            "fetched", param=param)
    return b64decode(url.split(";base64,", 1)[1], param)


# --------------------------------------------------------------------------------------------------------------------
# The session


# semantic_vad's eagerness -> the silence that ends speech that sounds unfinished (VadParams.incomplete_silence_ms;
# speech that sounds finished ends after VadParams.complete_silence_ms, 160 ms, or silence_duration_ms when that is
# shorter, whatever the eagerness). server_vad, as OpenAI's, has no end-of-turn judgement: silence_duration_ms alone
# ends a turn.
EAGERNESS = {"low": 2000, "medium": 800, "auto": 800, "high": 600}
MAX_VAD_MS = 60_000  # silence_duration_ms and prefix_padding_ms

# The fields a session.update may have, per object: the GA API's (those we do not implement are refused by name
# further on, unless off), our session object's own (a client may send back what session.created gave it: its `id`
# and `object` are ignored) and the beta name `modalities`. Anything else is refused as OpenAI does:
# `unknown_parameter`, naming it.
SESSION_KEYS = frozenset({
    "type", "object", "id", "model", "instructions", "output_modalities", "modalities", "max_output_tokens", "audio",
    "tools", "tool_choice", "prompt", "tracing", "truncation", "include", "reasoning"})
AUDIO_KEYS = frozenset({"input", "output"})
INPUT_KEYS = frozenset({"format", "transcription", "noise_reduction", "turn_detection"})
OUTPUT_KEYS = frozenset({"format", "voice", "speed"})
FORMAT_KEYS = frozenset({"type", "rate"})
TURN_DETECTION_KEYS = frozenset({"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "eagerness",
                                 "create_response", "interrupt_response", "idle_timeout_ms"})
# Beta Realtime API session fields and their GA places, for a helpful refusal.
_BETA_NAMES = {"voice": "audio.output.voice", "speed": "audio.output.speed", "input_audio_format": "audio.input.format",
               "output_audio_format": "audio.output.format", "turn_detection": "audio.input.turn_detection",
               "input_audio_transcription": "audio.input.transcription",
               "input_audio_noise_reduction": "audio.input.noise_reduction",
               "max_response_output_tokens": "max_output_tokens"}


# What "not used" is for the API fields we do not implement (tools, prompts, tracing, ...): taken, anything else is
# refused (`unsupported_parameter`, naming the field).
_OFF = (None, [], "auto", "none", "disabled")


def _known_keys(value: dict, keys: frozenset[str], param: str, beta: dict[str, str] | None = None) -> None:
    """RealtimeError `unknown_parameter` (OpenAI's code and message) for the first field of `value` not in `keys`;
    `beta`: beta API names of `value`'s fields -> their GA places under `param`, for a hint."""
    for key in value:
        if key not in keys:
            hint = f" (the GA API's name is '{param}.{beta[key]}')" if beta and key in beta else ""
            raise RealtimeError(f"Unknown parameter: '{param}.{key}'.{hint}", code="unknown_parameter",
                                param=f"{param}.{key}")


def _refuse_unless_off(value: dict, keys: tuple[str, ...], param: str) -> None:
    """RealtimeError `unsupported_parameter` for the first of `keys` that `value` sets to anything but off."""
    for key in keys:
        if value.get(key) not in _OFF:
            raise RealtimeError(f"'{key}' is not supported by this server", code="unsupported_parameter",
                                param=f"{param}.{key}")


@dataclass
class SessionSettings:
    """A session's effective configuration, kept in the API's terms; `to_converse` makes the Converse config."""

    session_id: str = ""
    model: str = "vita"
    instructions: str = ""  # "": the model's own data-type system prompts
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    input_rate: int = SAMPLE_RATE
    voice: str = DEFAULT_VOICE
    speed: float = 1.0
    max_output_tokens: int | str = "inf"
    turn_detection: dict = field(default_factory=lambda: {"type": "server_vad"})
    temperature: float | None = None  # (the beta API's session.temperature; None: the server's decoding)

    def to_converse(self, *, resume: bool = False) -> SessionConfig:
        td = self.turn_detection
        vad = VadParams()
        if td.get("threshold") is not None:
            vad.start_threshold = td["threshold"]
            vad.end_threshold = max(0.01, td["threshold"] - 0.15)  # Silero's hysteresis
        if td.get("silence_duration_ms") is not None:
            vad.end_silence_ms = td["silence_duration_ms"]
        if td.get("prefix_padding_ms") is not None:
            vad.speech_pad_ms = td["prefix_padding_ms"]
        if td.get("type") == "semantic_vad":
            vad.incomplete_silence_ms = EAGERNESS[td.get("eagerness", "auto")]
        else:  # server_vad, as OpenAI's: silence alone ends a turn
            vad.incomplete_silence_ms = -1
        config = SessionConfig(
            session_id=self.session_id, resume=resume, audio_sample_rate_hz=self.input_rate, vad=vad,
            sampling=SamplingParams(max_tokens=0 if self.max_output_tokens == "inf" else self.max_output_tokens,
                                    temperature=self.temperature or 0.0))
        if self.instructions:
            config.system_prompt = self.instructions
        return config

    def vad(self) -> VADConfig:
        """The segmentation this session gets, with the server defaults for what it does not set."""
        return session_vad(VADConfig(), self.to_converse())

    def to_api(self, *, beta: bool = False) -> dict:
        """The `session` object of session.created / session.updated (`beta`: in the beta API's shape)."""
        if beta:
            return beta_session(self.to_api(), self.temperature)
        vad = self.vad()
        return {
            "type": "realtime", "object": "realtime.session", "id": SESSION_ID_PREFIX + self.session_id, "model": self.model,
            "instructions": self.instructions, "output_modalities": list(self.output_modalities),
            "max_output_tokens": self.max_output_tokens, "tools": [], "tool_choice": "auto",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.input_rate},
                    "transcription": None, "noise_reduction": None,
                    "turn_detection": {
                        "type": self.turn_detection.get("type", "server_vad"),
                        **({"eagerness": self.turn_detection.get("eagerness", "auto")}
                           if self.turn_detection.get("type") == "semantic_vad" else {}),
                        "threshold": round(vad.start_threshold, 6),  # float32 in the proto
                        "prefix_padding_ms": vad.speech_pad_ms, "silence_duration_ms": vad.end_silence_ms,
                        "create_response": True, "interrupt_response": True, "idle_timeout_ms": None,
                    },
                },
                "output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": self.voice,
                           "speed": self.speed},
            },
        }

    def updated(self, session: Any, *, beta: bool = False) -> SessionSettings:
        """A copy with a `session.update`'s fields applied; RealtimeError (naming the field) if one is refused.
        `beta`: the session is the beta API's (`from_beta` made it GA-shaped, but for `temperature`)."""
        if not isinstance(session, dict):
            raise RealtimeError("'session' must be an object", param="session")
        new = copy.deepcopy(self)
        if beta and "temperature" in session:
            session = dict(session)
            new.temperature = _temperature(session.pop("temperature"), "session.temperature")
        _known_keys(session, SESSION_KEYS, "session", _BETA_NAMES)
        if session.get("type", "realtime") != "realtime":
            raise RealtimeError("only realtime sessions are supported (no transcription sessions)",
                                param="session.type")
        if session.get("model") is not None and session["model"] != self.model:
            raise RealtimeError(f"the model is chosen when connecting (?model=) and cannot change: this session's is "
                                f"{self.model!r}", param="session.model")
        if "instructions" in session:
            new.instructions = _typed(session["instructions"] or "", str, "session.instructions")
        modalities = session.get("output_modalities", session.get("modalities"))
        if modalities is not None:
            new.output_modalities = check_modalities(modalities, "session.output_modalities")
        if "max_output_tokens" in session:
            new.max_output_tokens = _max_tokens(session["max_output_tokens"], "session.max_output_tokens")
        _refuse_unless_off(session, ("tools", "tool_choice", "prompt", "tracing", "truncation", "include",
                                     "reasoning"), "session")
        audio = session.get("audio") or {}
        if not isinstance(audio, dict):
            raise RealtimeError("'audio' must be an object", param="session.audio")
        _known_keys(audio, AUDIO_KEYS, "session.audio")
        _apply_input(new, audio.get("input") or {})
        _apply_output(new, audio.get("output") or {})
        try:
            new.vad()  # the same checks Converse makes
        except InvalidInputError as e:
            raise RealtimeError(str(e), param="session.audio.input.turn_detection") from None
        return new


def _temperature(value: Any, param: str) -> float | None:
    """The beta API's temperature: 0.6..1.2, as OpenAI's (None: the server's own decoding)."""
    if value is None:
        return None
    value = _typed(value, float, param)
    if not 0.6 <= value <= 1.2:
        raise RealtimeError(f"'{param}' must be 0.6..1.2; got {value}", param=param)
    return value


def check_modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
        raise RealtimeError(f"'{param}' must be [\"audio\"] or [\"text\"]", param=param)
    return ["audio"] if "audio" in value else ["text"]


def _apply_input(new: SessionSettings, config: Any) -> None:
    if not isinstance(config, dict):
        raise RealtimeError("'input' must be an object", param="session.audio.input")
    _known_keys(config, INPUT_KEYS, "session.audio.input")
    if "format" in config:
        fmt = config["format"] or {}
        if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm":
            raise RealtimeError("only audio/pcm (PCM16 mono) input is supported", param="session.audio.input.format")
        _known_keys(fmt, FORMAT_KEYS, "session.audio.input.format")
        rate = fmt.get("rate", SAMPLE_RATE)
        if not isinstance(rate, int) or isinstance(rate, bool) or not 8_000 <= rate <= 48_000:
            raise RealtimeError(f"input rate must be 8000..48000 Hz (24000, or 16000); got {rate!r}",
                                param="session.audio.input.format.rate")
        new.input_rate = rate
    for key in ("transcription", "noise_reduction"):
        if config.get(key) is not None:
            raise RealtimeError(f"'{key}' is not supported by this server", code="unsupported_parameter",
                                param=f"session.audio.input.{key}")
    if "turn_detection" not in config:
        return
    td = config["turn_detection"]
    param = "session.audio.input.turn_detection"
    if not isinstance(td, dict) or td.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
        raise RealtimeError("only server_vad and semantic_vad turn detection are supported: VITA cuts and judges "
                            "all speech itself (no null/manual turns)", code="unsupported_parameter", param=param)
    _known_keys(td, TURN_DETECTION_KEYS, param)
    eagerness = td.get("eagerness", "auto")
    if not isinstance(eagerness, str) or eagerness not in EAGERNESS:  # (a list is not hashable: no `in` a dict)
        raise RealtimeError(f"eagerness must be one of {', '.join(EAGERNESS)}; got {eagerness!r}",
                            param=f"{param}.eagerness")
    for key in ("create_response", "interrupt_response"):
        if td.get(key) is False:
            raise RealtimeError(f"{key}=false is not supported: a query VITA judges is answered and interrupts",
                                code="unsupported_parameter", param=f"{param}.{key}")
    if td.get("idle_timeout_ms") is not None:
        raise RealtimeError("idle_timeout_ms is not supported", code="unsupported_parameter",
                            param=f"{param}.idle_timeout_ms")
    merged = dict(new.turn_detection)
    merged["type"] = td.get("type", "server_vad")
    if merged["type"] == "semantic_vad":
        merged["eagerness"] = td.get("eagerness", merged.get("eagerness", "auto"))
    else:
        merged.pop("eagerness", None)
    for key, kind in (("threshold", float), ("silence_duration_ms", int), ("prefix_padding_ms", int)):
        if td.get(key) is not None:
            merged[key] = _typed(td[key], kind, f"{param}.{key}")
            if merged[key] < 0:
                raise RealtimeError(f"{key} must not be negative", param=f"{param}.{key}")
            if kind is int and merged[key] > MAX_VAD_MS:  # (Converse's fields are int32)
                raise RealtimeError(f"{key} must be at most {MAX_VAD_MS}; got {merged[key]}", param=f"{param}.{key}")
    new.turn_detection = merged


def _apply_output(new: SessionSettings, config: Any) -> None:
    if not isinstance(config, dict):
        raise RealtimeError("'output' must be an object", param="session.audio.output")
    _known_keys(config, OUTPUT_KEYS, "session.audio.output")
    _check_output_format(config.get("format"), "session.audio.output.format")
    if config.get("voice") is not None:
        new.voice = _voice(config["voice"], "session.audio.output.voice")
    if config.get("speed") is not None:
        speed = _typed(config["speed"], float, "session.audio.output.speed")
        if not 0.25 <= speed <= 1.5:
            raise RealtimeError("speed must be 0.25..1.5", param="session.audio.output.speed")
        new.speed = speed


def _check_output_format(fmt: Any, param: str) -> None:
    """The output format: audio/pcm at 24 kHz (what the gateway's TTS makes) or not given."""
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type", "audio/pcm") != "audio/pcm" \
            or fmt.get("rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise RealtimeError("only audio/pcm at 24000 Hz output is supported", param=param)
    _known_keys(fmt, FORMAT_KEYS, param)


def _voice(value: Any, param: str) -> str:
    """A voice name, or the API's custom voice object `{"id": ...}` (its id is taken as the name)."""
    return _typed(value.get("id") if isinstance(value, dict) else value, str, param)


def _max_tokens(value: Any, param: str) -> int | str:
    if value == "inf":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
        raise RealtimeError(f"'{param}' must be 1..4096 or \"inf\"", param=param)
    return value


def _typed(value: Any, kind: type, param: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RealtimeError(f"'{param}' must be a {kind.__name__}", param=param)
    return value


# --------------------------------------------------------------------------------------------------------------------
# response.create

# The fields of a response.create's `response`: the GA API's (RealtimeResponseCreateParams; those this server cannot
# do for one response are refused by name in `response_params`, unless off) and the beta name `modalities`, as
# session.update takes it. Anything else is refused as OpenAI does: `unknown_parameter`, naming it.
RESPONSE_KEYS = frozenset({
    "conversation", "input", "instructions", "max_output_tokens", "metadata", "output_modalities", "modalities",
    "audio", "prompt", "tool_choice", "tools", "parallel_tool_calls", "reasoning"})
RESPONSE_AUDIO_KEYS = frozenset({"output"})
RESPONSE_OUTPUT_KEYS = frozenset({"format", "voice"})  # (no speed per response: the session's)
_RESPONSE_BETA_NAMES = {key: _BETA_NAMES[key] for key in ("voice", "output_audio_format",
                                                          "max_response_output_tokens")}
# OpenAI's metadata limits: 16 pairs, keys up to 64 characters, string values up to 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


@dataclass
class ResponseParams:
    """What a response.create asks of its one response, checked."""

    modality: str  # "audio" or "text"
    voice: str | None = None  # None: the session's (spoken by the gateway's TTS, so it can change per response)
    metadata: dict[str, str] | None = None  # echoed in the response object


def response_params(params: Any, settings: SessionSettings) -> ResponseParams:
    """A response.create's `response` object against what this server does for one response: RealtimeError naming
    the first field refused (`unknown_parameter` for one the API does not have, `unsupported_parameter` for one we
    cannot honour). Pure: nothing has changed when it raises."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RealtimeError("'response' must be an object", param="response")
    _known_keys(params, RESPONSE_KEYS, "response", _RESPONSE_BETA_NAMES)
    if params.get("input") is not None:
        raise RealtimeError("out-of-band responses are not supported: every answer is a turn of the conversation "
                            "(no 'input')", code="unsupported_parameter", param="response.input")
    if params.get("conversation") not in (None, "auto"):
        raise RealtimeError("out-of-band responses are not supported: every answer is a turn of the conversation "
                            "(conversation must be \"auto\")", code="unsupported_parameter",
                            param="response.conversation")
    modalities = params.get("output_modalities", params.get("modalities"))
    modality = settings.output_modalities[0] if modalities is None else \
        check_modalities(modalities, "response.output_modalities")[0]
    # Converse takes the system prompt and the token limit per session (SessionConfig), not per turn (TextMessage is
    # the text alone): the session's values are taken, others refused.
    if params.get("instructions") is not None:
        instructions = _typed(params["instructions"], str, "response.instructions")
        if instructions != settings.instructions:
            raise RealtimeError("instructions for one response are not supported (the orchestrator takes them per "
                                "session): set them with session.update", code="unsupported_parameter",
                                param="response.instructions")
    if params.get("max_output_tokens") is not None:
        limit = _max_tokens(params["max_output_tokens"], "response.max_output_tokens")
        if limit != settings.max_output_tokens:
            raise RealtimeError(f"max_output_tokens for one response is not supported (the orchestrator takes it per "
                                f"session; this session's is {settings.max_output_tokens!r}): set it with "
                                "session.update", code="unsupported_parameter", param="response.max_output_tokens")
    _refuse_unless_off(params, ("tools", "tool_choice", "prompt", "reasoning"), "response")
    if params.get("parallel_tool_calls") is not None and params["parallel_tool_calls"] is not False:
        raise RealtimeError("'parallel_tool_calls' is not supported by this server (no tools)",
                            code="unsupported_parameter", param="response.parallel_tool_calls")
    voice = None
    audio = params.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            raise RealtimeError("'audio' must be an object", param="response.audio")
        _known_keys(audio, RESPONSE_AUDIO_KEYS, "response.audio")
        output = audio.get("output")
        if output is not None:
            if not isinstance(output, dict):
                raise RealtimeError("'output' must be an object", param="response.audio.output")
            _known_keys(output, RESPONSE_OUTPUT_KEYS, "response.audio.output")
            _check_output_format(output.get("format"), "response.audio.output.format")
            if output.get("voice") is not None:
                voice = _voice(output["voice"], "response.audio.output.voice")
    return ResponseParams(modality, voice, _metadata(params.get("metadata"), "response.metadata"))


def _metadata(value: Any, param: str) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RealtimeError(f"'{param}' must be an object of string values", param=param)
    if len(value) > METADATA_PAIRS:
        raise RealtimeError(f"'{param}' has {len(value)} pairs; at most {METADATA_PAIRS} are allowed",
                            code="object_above_max_properties", param=param)
    for key, text in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise RealtimeError(f"a key of '{param}' is {len(key)} characters; at most {METADATA_KEY_CHARS} are "
                                "allowed", code="string_above_max_length", param=param)
        if not isinstance(text, str):
            raise RealtimeError(f"'{param}.{key}' must be a string", param=f"{param}.{key}")
        if len(text) > METADATA_VALUE_CHARS:
            raise RealtimeError(f"'{param}.{key}' is {len(text)} characters; at most {METADATA_VALUE_CHARS} are "
                                "allowed", code="string_above_max_length", param=f"{param}.{key}")
    return dict(value)


# --------------------------------------------------------------------------------------------------------------------
# Items and responses

# The fields of a conversation.item.create's message item and of its content parts (the GA API's
# RealtimeConversationItemUserMessage and its Content; a message item of another role has the same fields). Anything
# else is refused as OpenAI does: `unknown_parameter`, naming it (`item.bogus`, `item.content[0].bogus`). The beta
# API's item is one flat object for every item type (its function-call fields included) and its parts have an `id`.
ITEM_KEYS = frozenset({"id", "type", "object", "role", "status", "content"})
ITEM_PART_KEYS = frozenset({"type", "text", "image_url", "detail", "audio", "transcript"})
_BETA_ITEM_KEYS = ITEM_KEYS | {"call_id", "name", "arguments", "output"}
_BETA_ITEM_PART_KEYS = ITEM_PART_KEYS | {"id"}


def check_item_fields(item: dict, *, beta: bool = False) -> None:
    """RealtimeError `unknown_parameter` for the first field of a message item, or of one of its content parts, that
    the API does not have (`beta`: the beta API's fields)."""
    _known_keys(item, _BETA_ITEM_KEYS if beta else ITEM_KEYS, "item")
    content = item.get("content")
    if isinstance(content, list):
        for k, part in enumerate(content):
            if isinstance(part, dict):
                _known_keys(part, _BETA_ITEM_PART_KEYS if beta else ITEM_PART_KEYS, f"item.content[{k}]")


def user_item(item_id: str, content: list[dict], status: str = "completed") -> dict:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
            "content": content}


def assistant_item(item_id: str, modality: str, text: str, status: str) -> dict:
    part = {"type": "output_audio", "transcript": text} if modality == "audio" else {"type": "output_text",
                                                                                      "text": text}
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": [part]}


def rate_limits_updated() -> dict:
    """`rate_limits.updated`, sent after each `response.done` as OpenAI sends it. Its `rate_limits` is empty: OpenAI
    reports its per-minute request and token limits there, and no such limit applies to a session's responses here.
    The limits there are (the orchestrator's `--rate-limit` and `--max-sessions-per-token`, per API token) count
    Converse calls, that is opening a session, not what a session asks for; the orchestrator does not report them,
    and a connection they refuse gets an `error` at connect (docs/realtime.md). An empty list says "no limit to
    report" where any number would be made up."""
    return {"type": "rate_limits.updated", "rate_limits": []}


def usage(prompt: Any | None, output_tokens: int) -> dict:
    """The API's usage object from Converse's Usage (prompt side) and the tokens generated."""
    audio = image = total_in = 0
    if prompt is not None:
        audio, image = prompt.audio_tokens, prompt.image_tokens + prompt.video_tokens
        total_in = prompt.prompt_tokens
    return {"total_tokens": total_in + output_tokens, "input_tokens": total_in, "output_tokens": output_tokens,
            "input_token_details": {"text_tokens": total_in - audio - image, "audio_tokens": audio,
                                    "image_tokens": image, "cached_tokens": 0},
            "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0}}


# --------------------------------------------------------------------------------------------------------------------
# The beta Realtime API (`OpenAI-Beta: realtime=v1` on the handshake, as `client.beta.realtime.connect` and clients
# written before the GA API send it): the same events under their beta names and shapes, translated at the edge.

BETA_HEADER, BETA_VALUE = "OpenAI-Beta", "realtime=v1"
_BETA_EVENTS = {
    "response.output_audio.delta": "response.audio.delta", "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta", "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created"}
_BETA_PARTS = {"output_audio": "audio", "output_text": "text"}
# GA places -> beta names, for the `param` of an error (longest first: the first prefix that matches is taken).
_BETA_PARAMS = (("session.audio.input.format", "session.input_audio_format"),
                ("session.audio.input.turn_detection", "session.turn_detection"),
                ("session.audio.input.transcription", "session.input_audio_transcription"),
                ("session.audio.input.noise_reduction", "session.input_audio_noise_reduction"),
                ("session.audio.output.format", "session.output_audio_format"),
                ("session.audio.output.voice", "session.voice"), ("session.audio.output.speed", "session.speed"),
                ("session.output_modalities", "session.modalities"),
                ("session.max_output_tokens", "session.max_response_output_tokens"),
                ("response.audio.output.format", "response.output_audio_format"),
                ("response.audio.output.voice", "response.voice"),
                ("response.output_modalities", "response.modalities"),
                ("response.max_output_tokens", "response.max_response_output_tokens"))


def wants_beta(value: str | None) -> bool:
    """Whether an `OpenAI-Beta` header asks for the beta Realtime API."""
    return value is not None and any(part.strip() == BETA_VALUE for part in value.split(","))


def _beta_format(value: Any, param: str) -> dict | None:
    if value is None or value == "pcm16":
        return None if value is None else {"type": "audio/pcm", "rate": SAMPLE_RATE}
    raise RealtimeError(f"only pcm16 (24 kHz PCM16 mono) audio is supported; got {value!r}", param=param)


def _moved(params: dict, moves: dict[str, tuple[str, ...]], where: str) -> dict:
    """`params` with the beta fields in `moves` put at their GA places (a GA field given too is kept beside)."""
    out = {key: value for key, value in params.items() if key not in moves}
    for key, path in moves.items():
        if key not in params:
            continue
        value = params[key]
        if key.endswith("_audio_format"):
            value = _beta_format(value, f"{where}.{key}")
            if value is None:
                continue
        node = out
        for name in path[:-1]:
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                return out  # (the GA field is not an object: refused by the GA checks)
            else:
                child = node[name] = dict(child)
            node = child
        node[path[-1]] = value
    return out


_BETA_SESSION_MOVES = {
    "voice": ("audio", "output", "voice"), "speed": ("audio", "output", "speed"),
    "input_audio_format": ("audio", "input", "format"), "output_audio_format": ("audio", "output", "format"),
    "turn_detection": ("audio", "input", "turn_detection"),
    "input_audio_transcription": ("audio", "input", "transcription"),
    "input_audio_noise_reduction": ("audio", "input", "noise_reduction"),
    "max_response_output_tokens": ("max_output_tokens",)}
_BETA_RESPONSE_MOVES = {"voice": ("audio", "output", "voice"), "output_audio_format": ("audio", "output", "format"),
                        "max_response_output_tokens": ("max_output_tokens",)}


def from_beta(event: dict, settings: SessionSettings) -> dict:
    """A beta client event in the GA shape the handlers read (its `temperature` left for `updated(beta=True)`)."""
    kind = event["type"]
    if kind == "session.update" and isinstance(event.get("session"), dict):
        session = _moved(event["session"], _BETA_SESSION_MOVES, "session")
        return {**event, "session": session}
    if kind == "response.create" and isinstance(event.get("response"), dict):
        response = dict(event["response"])
        # the orchestrator decodes per session: the session's temperature only
        if "temperature" in response and \
                _temperature(response.pop("temperature"), "response.temperature") != settings.temperature:
            raise RealtimeError("temperature for one response is not supported (the orchestrator takes it per "
                                f"session; this session's is {settings.temperature!r}): set it with "
                                "session.update", code="unsupported_parameter", param="response.temperature")
        return {**event, "response": _moved(response, _BETA_RESPONSE_MOVES, "response")}
    return event


def beta_param(param: str | None) -> str | None:
    """An error's `param`, named as the beta API names it."""
    for ga, beta in _BETA_PARAMS:
        if param is not None and (param == ga or param.startswith(ga + ".")):
            return beta + param[len(ga):]
    return param


def _beta_item(item: dict) -> dict:
    content = item.get("content")
    if not isinstance(content, list):
        return item
    return {**item, "content": [{**part, "type": _BETA_PARTS.get(part.get("type"), part.get("type"))}
                                for part in content]}


def _beta_modalities(modalities: list[str]) -> list[str]:
    return ["text", "audio"] if "audio" in modalities else ["text"]  # (a beta audio answer has its transcript)


def beta_session(session: dict, temperature: float | None) -> dict:
    """The beta API's session object from the GA one."""
    audio = session["audio"]
    return {"id": session["id"], "object": session["object"], "model": session["model"],
            "modalities": _beta_modalities(session["output_modalities"]), "instructions": session["instructions"],
            "voice": audio["output"]["voice"], "speed": audio["output"]["speed"],
            "input_audio_format": "pcm16", "output_audio_format": "pcm16", "input_audio_transcription": None,
            "input_audio_noise_reduction": None, "turn_detection": audio["input"]["turn_detection"],
            "tools": [], "tool_choice": "auto", "temperature": temperature,
            "max_response_output_tokens": session["max_output_tokens"],
            # (the input rate, an extension of this server: beta clients send 24 kHz pcm16)
            "input_audio_rate": audio["input"]["format"]["rate"]}


def to_beta(event: dict) -> dict | None:
    """A server event under its beta name and shape (sessions are made by `SessionSettings.to_api(beta=True)`), or
    None for one the beta API does not have: an item is announced once, as `conversation.item.created` (the GA
    API's `conversation.item.added`), and has no `conversation.item.done`."""
    if event["type"] == "conversation.item.done":
        return None
    event = {**event, "type": _BETA_EVENTS.get(event["type"], event["type"])}
    if isinstance(event.get("item"), dict):
        event["item"] = _beta_item(event["item"])
    response = event.get("response")
    if isinstance(response, dict) and response.get("object") == "realtime.response":
        response = {key: value for key, value in response.items() if key not in ("output_modalities", "audio")}
        response["modalities"] = _beta_modalities(event["response"]["output_modalities"])
        response["voice"] = event["response"]["audio"]["output"]["voice"]
        response["output_audio_format"] = "pcm16"
        response["output"] = [_beta_item(item) for item in response.get("output") or []]
        event["response"] = response
    if event["type"] == "error" and isinstance(event.get("error"), dict):
        event["error"] = {**event["error"], "param": beta_param(event["error"].get("param"))}
    return event
