"""One Realtime WebSocket connection as a thin layer over one Converse call (the orchestrator's gRPC API).

Converse does the conversation: VAD, judging every utterance with the model (non-awakening), interruption, history
in Redis. This layer translates in both directions and adds what only a speaking client needs:
- client events become Converse events (audio chunks, config updates, text, images, cancel, truncate), checked
  first so a bad event gets an `error` naming it and changes nothing (against the input limits the orchestrator
  states in SessionStarted: client events are read only once it arrived);
- Converse events become the API's events: speech started/stopped, a query's `committed` + user item, an ignored
  utterance's `vita.utterance.ignored`, and for each answer the response lifecycle
  (`response.created` ... `response.done`);
- spoken answers: the answer's text is cut into sentences, each synthesized as it completes and sent as
  `response.output_audio.delta` with its transcript; an interruption stops the audio at once, and the stored answer
  is cut to the text whose audio went out (and, on `conversation.item.truncate`, to what the client played).

Event order is kept by one writer task: every server event goes through `_out`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from vita.errors import InvalidInputError, VitaError
from vita.orchestrator.limits import InputLimits
from vita.processing.image import load_image
from vita.realtime.echo import EchoGuard
from vita.realtime.protocol import (
    IGNORED_EVENT,
    RealtimeError,
    SessionSettings,
    assistant_item,
    b64,
    b64decode,
    check_item_fields,
    client_event_id,
    data_url_bytes,
    error_event,
    from_beta,
    new_id,
    parse_client_event,
    rate_limits_updated,
    response_params,
    to_beta,
    usage,
    user_item,
)
from vita.realtime.tts import SAMPLE_RATE, SentenceSplitter, Spoken, make_tts, played_text
from vita.v1.assistant_pb2 import (
    AudioChunk,
    CancelAnswer,
    ClientEvent,
    Completed,
    ConverseLimits,
    CutSpeech,
    PlaybackState,
    ServerEvent,
    TextMessage,
    TruncateAnswer,
    UtteranceJudged,
)
from vita.v1.assistant_pb2_grpc import AssistantStub
from vita.v1.media_pb2 import Image

log = logging.getLogger(__name__)

AUDIO_CHUNK_MS = 200  # one response.output_audio.delta
_KEEP_ITEMS = 64  # assistant items remembered for conversation.item.truncate
_SPEAKABLE = re.compile(r"\w")
_ERROR_TYPES = {3: "invalid_request_error", 5: "invalid_request_error", 8: "rate_limit_error"}
_STATUS_NAMES = {status.value[0]: status.name.lower() for status in grpc.StatusCode}
# An answer the token limit cut: OpenAI's response.done status `incomplete`, reason `max_output_tokens` (the
# context window filling first cuts it the same way: the room left for the answer was the limit).
_CUT_BY_TOKENS = (Completed.LENGTH, Completed.CONTEXT_LENGTH)
# The limits a session checks client events against until SessionStarted states the orchestrator's (its --max-*
# flags): the orchestrator's defaults, kept for a limit it does not state (0, or an orchestrator from before
# SessionStarted.limits). Client events are read only after SessionStarted (`run`), so no event is checked against
# these when the orchestrator stated its own. What it may still refuse (8 images already waiting, a limit it did not
# state) is matched back to the client event, see `_Sent`.
_DEFAULT_LIMITS = InputLimits().converse()
_KEEP_SENT = 64  # client events sent on whose outcome no answer has told yet (see `_Sent`)


# Orchestrator refusals that are about the caller, with the OpenAI error codes a client already handles.
_REFUSALS = {grpc.StatusCode.UNAUTHENTICATED: ("invalid_api_key", "invalid_request_error"),
             grpc.StatusCode.RESOURCE_EXHAUSTED: ("rate_limit_exceeded", "rate_limit_error")}


@dataclass
class _Sent:
    """A client event the orchestrator may still refuse (an image, or the text of a response.create): the refusal
    comes back as a Converse error without an id, in the order the events were sent, so it is matched to the
    oldest of its kind still here and answered with the client's event_id."""

    kind: str  # "image" or "text"
    event_id: str | None
    item_ids: list[str]
    param: str | None = None
    modality: str = "audio"  # (text) the response.create's output modality
    voice: str | None = None  # (text) its audio.output.voice (None: the session's)
    metadata: dict | None = None  # (text) its metadata, echoed in the response object


@dataclass
class Segment:
    """A stretch of speech the VAD cut: becomes a user item if judged a query."""

    item_id: str
    start_s: float
    end_s: float = 0.0
    cleared: bool = False  # input_audio_buffer.clear dropped it


@dataclass
class Response:
    """One answer: a Converse turn and the API's response and assistant item around it."""

    id: str
    item_id: str
    turn_id: int
    modality: str  # "audio" or "text"
    voice: str = ""  # what speaks it: the response.create's audio.output.voice, else the session's when it started
    metadata: dict | None = None  # the response.create's, echoed in the response object
    text: list[str] = field(default_factory=list)  # everything Converse relayed
    spoken: list[Spoken] = field(default_factory=list)  # audio sent, with its transcript
    audio_ms: float = 0.0
    sent_ms: float = 0.0  # audio sent in response.output_audio.delta events (the most a truncation may keep)
    truncated_ms: int | None = None  # the audio_end_ms of the last conversation.item.truncate accepted
    playback_start: float | None = None  # loop time at which the client started (nominally) playing it
    usage: dict | None = None
    converse_done: bool = False  # Converse completed or stopped the answer
    cut_by_tokens: bool = False  # Converse completed it at the token limit (LENGTH or CONTEXT_LENGTH)
    cancel_reason: str | None = None
    error: dict | None = None  # what failed it on our side (text to speech): it ends `failed` with this
    finished: bool = False  # nothing more of it goes out (response.done is sent, or once the history is cut)
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    sentences: asyncio.Queue = field(default_factory=asyncio.Queue)
    speaker: asyncio.Task | None = None

    def spoken_text(self) -> str:
        return "".join(piece.text for piece in self.spoken)


class RealtimeSession:
    def __init__(self, ws: ServerConnection, stub: AssistantStub, settings: SessionSettings, *, tts: str = "espeak",
                 metadata: tuple[tuple[str, str], ...] = (), resume: bool = False, echo_guard: bool = True,
                 audio_lead_ms: int = 500, beta: bool = False) -> None:
        self.ws, self.stub, self.settings, self.tts_name = ws, stub, settings, tts
        self.beta = beta  # the client speaks the beta Realtime API (OpenAI-Beta: realtime=v1): events translated
        self.audio_lead_ms = audio_lead_ms
        self.metadata, self.resume = metadata, resume
        self.limits = ConverseLimits()  # what client events are checked against: see `_started`
        self.limits.CopyFrom(_DEFAULT_LIMITS)
        self.echo = EchoGuard(settings.input_rate) if echo_guard else None
        self._odd_byte = b""  # (without the echo guard) an append's trailing half sample, sent with the next one
        self._out: asyncio.Queue[dict | None] = asyncio.Queue()
        self._to_converse: asyncio.Queue[ClientEvent | None] = asyncio.Queue()
        self.segments: deque[Segment] = deque()  # cut by the VAD, not judged yet
        self.open_segment: Segment | None = None
        self.queries: deque[Segment] = deque()  # judged queries whose answer has not started
        self.pending_text: list[str] = []  # user text items waiting for response.create
        self.pending_items: list[str] = []  # their item ids
        self.sent: deque[_Sent] = deque()  # images and typed queries sent, their outcome not known yet
        self.previous: OrderedDict[str, str | None] = OrderedDict()  # item id -> the item before it in the chain
        self.pending_modality: str | None = None  # response.create sent, its answer not started yet
        self.cancel_pending = False  # a response.cancel came for that answer before it started
        self.response: Response | None = None
        self.items: OrderedDict[str, Response] = OrderedDict()
        # Per turn, the TruncateAnswers sent and not confirmed: the client's (item, audio_end_ms), or ours (what to
        # do once the history holds what was sent: response.done).
        self.truncations: dict[int, deque[tuple[str, int, str | None] | Callable[[], None]]] = {}
        self.last_item_id: str | None = None
        # Converse events held back while a stopped response waits for its stored text to be cut: the next
        # response's events follow its response.done.
        self._held: list[ServerEvent] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # The connection

    async def run(self) -> None:
        """Until the client closes the socket (the answer in flight is then stopped, as Converse does)."""
        call = self.stub.Converse(self._requests(), metadata=self.metadata)
        writer = asyncio.create_task(self._write())
        try:
            self._converse(ClientEvent(config=self.settings.to_converse(resume=self.resume)))
            if not await self._start(call):
                return
            converse = asyncio.create_task(self._converse_events(call))
            try:  # (only now: every client event is checked against the limits SessionStarted stated)
                async for message in self.ws:
                    await self._on_message(message)
            except ConnectionClosed:
                pass
            finally:
                converse.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await converse
        finally:
            call.cancel()
            if self.response is not None and self.response.speaker is not None:
                self.response.speaker.cancel()
            self._out.put_nowait(None)
            with contextlib.suppress(Exception):
                await writer

    async def _start(self, call: grpc.aio.StreamStreamCall) -> bool:
        """session.created once Converse has the session; an error event and a closed socket if it refused."""
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            refusal = _REFUSALS.get(e.code())  # the caller's token or its limits: say so, as the OpenAI API does
            if refusal is not None:
                await self._fail(f"{e.code().name}: {e.details()}", code=refusal[0], kind=refusal[1], close=1008)
            else:
                await self._fail(f"the orchestrator is unavailable: {e.code().name}: {e.details()}")
            return False
        if first is grpc.aio.EOF or first.WhichOneof("event") != "session_started":
            message = first.error.message if first is not grpc.aio.EOF else "the orchestrator ended the call"
            await self._fail(message, code="session_refused", kind="invalid_request_error", close=1008)
            return False
        self._started(first)
        return True

    def _started(self, event: ServerEvent) -> None:
        """Converse has the session: its id, and the input limits the orchestrator enforces (each one it states
        replaces the default), then session.created."""
        self.settings.session_id = event.session_id
        for limit, value in event.session_started.limits.ListFields():  # the fields set: 0 is "not stated"
            if value > 0:
                setattr(self.limits, limit.name, value)
        self.send({"type": "session.created", "session": self.settings.to_api(beta=self.beta)})

    async def _fail(self, message: str, *, code: str = "orchestrator_unavailable", kind: str = "server_error",
                    close: int = 1011) -> None:
        self.send(error_event(message, code=code, kind=kind))
        self._out.put_nowait(None)
        await asyncio.sleep(0)
        await self.ws.close(close, message[:120])

    async def _requests(self):
        while (event := await self._to_converse.get()) is not None:
            yield event

    def _converse(self, event: ClientEvent) -> None:
        self._to_converse.put_nowait(event)

    def send(self, event: dict) -> None:
        event.setdefault("event_id", new_id("event"))
        if self.beta:
            event = to_beta(event)  # (None: an event the beta API does not have)
        if event is not None:
            self._out.put_nowait(event)

    def _item_added(self, item: dict) -> None:
        """`item` joins the conversation, after its last item: `conversation.item.added` (the beta API's
        `conversation.item.created`)."""
        self.send({"type": "conversation.item.added", "previous_item_id": self.last_item_id, "item": item})
        self._chain(item["id"])

    def _item_done(self, item: dict) -> None:
        """`item` is complete, with its final content: `conversation.item.done` (none in the beta API)."""
        self.send({"type": "conversation.item.done", "previous_item_id": self.previous.get(item["id"]),
                   "item": item})

    def _response_done(self, response: dict) -> None:
        """`response.done`, then `rate_limits.updated` as OpenAI sends it after each one (`rate_limits_updated`)."""
        self.send({"type": "response.done", "response": response})
        self.send(rate_limits_updated())

    async def _write(self) -> None:
        while (event := await self._out.get()) is not None:
            try:
                await self.ws.send(json.dumps(event))
            except ConnectionClosed:
                return

    async def _converse_events(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while (event := await call.read()) is not grpc.aio.EOF:
                self._on_converse(event)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                await self._fail(f"the orchestrator call failed: {e.code().name}: {e.details()}")

    # ------------------------------------------------------------------------------------------------------------
    # Client events

    async def _on_message(self, raw: str | bytes) -> None:
        try:
            event = parse_client_event(raw)
            if self.beta:
                event = from_beta(event, self.settings)
            handler = getattr(self, "_on_" + event["type"].replace(".", "_"))
            result = handler(event)
            if inspect.isawaitable(result):
                await result
        except RealtimeError as e:
            self.send(error_event(e, client_event_id=client_event_id(raw)))
        except Exception:  # a client event we did not foresee must not end the session: say so, and go on
            log.exception("client event failed", extra={"session_id": self.settings.session_id})
            self.send(error_event("the server failed on this event", code="server_error", kind="server_error",
                                  client_event_id=client_event_id(raw)))

    def _on_session_update(self, event: dict) -> None:
        new = self.settings.updated(event.get("session"), beta=self.beta)
        if len(new.instructions) > self.limits.max_text_chars:  # the orchestrator's limit on a system prompt
            raise RealtimeError(f"the instructions are {len(new.instructions)} characters; the limit is "
                                f"{self.limits.max_text_chars}", code="string_above_max_length",
                                param="session.instructions")
        if (new.voice, new.speed) != (self.settings.voice, self.settings.speed):
            try:  # an unknown voice failed only when the first answer was spoken, each sentence an error
                make_tts(self.tts_name, new.voice, new.speed)
            except VitaError as e:
                raise RealtimeError(str(e), param="session.audio.output.voice") from None
        if new.to_converse() != self.settings.to_converse():
            self._converse(ClientEvent(config=new.to_converse()))
        if self.echo is not None and new.input_rate != self.settings.input_rate:
            self.echo = EchoGuard(new.input_rate)
        self.settings = new
        self.send({"type": "session.updated", "session": new.to_api(beta=self.beta)})

    def _on_input_audio_buffer_append(self, event: dict) -> None:
        audio = b64decode(event.get("audio"), "audio")
        if self.echo is not None:
            audio = self.echo.process(audio)  # (it keeps an odd trailing byte itself)
        else:  # Converse refuses odd-length PCM16: a sample split across appends is joined here
            audio = self._odd_byte + audio
            audio, self._odd_byte = audio[:len(audio) // 2 * 2], audio[len(audio) // 2 * 2:]
        if audio:
            self._converse(ClientEvent(audio=AudioChunk(pcm16=audio)))

    def _on_input_audio_buffer_commit(self, event: dict) -> None:
        if self.open_segment is None:
            raise RealtimeError("no speech to commit: the server VAD has no speech open (it commits speech by "
                                "itself when it ends)", code="input_audio_buffer_commit_empty")
        self._converse(ClientEvent(cut=CutSpeech()))

    def _on_input_audio_buffer_clear(self, event: dict) -> None:
        if self.open_segment is not None:
            self.open_segment.cleared = True
            self._converse(ClientEvent(cut=CutSpeech(discard=True)))
        self.send({"type": "input_audio_buffer.cleared"})

    async def _on_conversation_item_create(self, event: dict) -> None:
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise RealtimeError("'item' must be a message object", param="item")
        check_item_fields(item, beta=self.beta)
        if item.get("role") != "user":
            raise RealtimeError("only user messages can be added: the history holds the turns VITA answered",
                                code="unsupported_parameter", param="item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise RealtimeError("'item.content' must be a non-empty list", param="item.content")
        texts, images = [], []  # images: (bytes, param)
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "input_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "input_image":
                param = f"item.content[{k}].image_url"
                images.append((data_url_bytes(part.get("image_url"), param), param))
            elif kind == "input_audio":
                raise RealtimeError("input_audio items are not supported: stream speech with "
                                    "input_audio_buffer.append", code="unsupported_parameter",
                                    param=f"item.content[{k}].type")
            else:
                raise RealtimeError("content parts must be input_text (with text) or input_image",
                                    param=f"item.content[{k}]")
        if texts and not "".join(texts).strip():
            raise RealtimeError("the message text is empty", param="item.content")
        text = "\n".join(texts)
        limits = self.limits  # the orchestrator's (SessionStarted), see `_started`
        if texts:  # the orchestrator's limit, on the query response.create will send (the pending texts joined)
            query = len("\n".join([*self.pending_text, text]))
            if query > limits.max_text_chars:
                what = (f"the message text is {len(text)} characters" if len(text) > limits.max_text_chars else
                        f"with the {len(self.pending_text)} text item(s) before it, the query would be {query} "
                        "characters")
                raise RealtimeError(f"{what}; the limit is {limits.max_text_chars}", code="string_above_max_length",
                                    param="item.content")
        if len(images) > limits.max_images:  # more than one turn takes: the orchestrator would refuse the rest
            raise RealtimeError(f"the message has {len(images)} images; the limit is {limits.max_images} (images "
                                "waiting for one turn)", code="array_above_max_length", param="item.content")
        for data, param in images:  # decoded as the orchestrator will (its limits): refused here, with the param
            try:
                await asyncio.to_thread(load_image, data, max_pixels=limits.max_image_pixels)
            except InvalidInputError as e:
                raise RealtimeError(f"image: {e}", code="invalid_image", param=param) from None
        item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else new_id("item")
        for _, param in images:
            self._expect(_Sent("image", event.get("event_id"), [item_id], param))
        for data, _ in images:
            self._converse(ClientEvent(image=Image(data=data)))
        if texts:
            self.pending_text.append(text)
            self.pending_items.append(item_id)
        created = user_item(item_id, content)
        self._item_added(created)
        self._item_done(created)  # (complete as added: a user message has no more to come)

    def _chain(self, item_id: str) -> None:
        """`item_id` is the conversation's last item now."""
        self.previous[item_id] = self.last_item_id
        while len(self.previous) > 4 * _KEEP_ITEMS:
            self.previous.popitem(last=False)
        self.last_item_id = item_id

    def _unchain(self, item_ids: list[str]) -> None:
        """The orchestrator refused these items after conversation.item.added: conversation.item.deleted for each,
        and an item created next follows the one before them."""
        for item_id in reversed(item_ids):
            if item_id not in self.previous:
                continue
            before = self.previous.pop(item_id)
            for later, prev in self.previous.items():  # (an item added since then now follows the one before)
                if prev == item_id:
                    self.previous[later] = before
            if self.last_item_id == item_id:
                self.last_item_id = before
            self.send({"type": "conversation.item.deleted", "item_id": item_id})

    def _expect(self, sent: _Sent) -> None:
        self.sent.append(sent)
        while len(self.sent) > _KEEP_SENT:
            self.sent.popleft()

    def _refused(self, kind: str) -> _Sent | None:
        """The oldest client event of `kind` still waiting for its outcome (taken out)."""
        for sent in self.sent:
            if sent.kind == kind:
                self.sent.remove(sent)
                return sent
        return None

    def _on_response_create(self, event: dict) -> None:
        """Every field of `response` is checked (and a voice tried) before anything changes: a refused
        response.create leaves the user text waiting for the next one."""
        if self._active() is not None or self.pending_modality is not None:
            raise RealtimeError("Conversation already has an active response in progress",
                                code="conversation_already_has_active_response")
        asked = response_params(event.get("response"), self.settings)
        if asked.voice is not None and asked.voice != self.settings.voice:
            try:  # as session.update: a voice the TTS does not have is refused now, not at each sentence
                make_tts(self.tts_name, asked.voice, self.settings.speed)
            except VitaError as e:
                raise RealtimeError(str(e), param="response.audio.output.voice") from None
        if not self.pending_text:
            raise RealtimeError("no new user input to answer: add a conversation.item.create with input_text first "
                                "(spoken queries are answered without response.create)", code="no_user_input")
        query = ClientEvent(text=TextMessage(text="\n".join(self.pending_text)))  # (made before anything changes)
        items, self.pending_text, self.pending_items = self.pending_items, [], []
        self.pending_modality = asked.modality
        self._expect(_Sent("text", event.get("event_id"), items, modality=asked.modality, voice=asked.voice,
                           metadata=asked.metadata))
        self._converse(query)

    def _on_response_cancel(self, event: dict) -> None:
        response = self._active()
        wanted = event.get("response_id")
        if response is None and self.pending_modality is not None and not wanted:
            # The response.create before it is in progress for the client (OpenAI creates the response at once), but
            # its answer has not started here yet: it is cancelled as it starts (`_converse_answer_started`).
            self.cancel_pending = True
            return
        if response is None or (wanted and wanted != response.id):
            raise RealtimeError("there is no response in progress to cancel", code="response_cancel_not_active",
                                param="response_id" if wanted else None)
        response.cancel_reason = "client_cancelled"
        if response.converse_done:
            self._stop(response, "client_cancelled")  # only its audio was still going out
        else:
            self._converse(ClientEvent(cancel=CancelAnswer(turn_id=response.turn_id)))

    def _on_conversation_item_truncate(self, event: dict) -> None:
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        response = self.items.get(item_id) if isinstance(item_id, str) else None
        if response is None:
            raise RealtimeError(f"no assistant item with id {item_id!r} (only this session's recent answers can be "
                                "truncated)", code="item_not_found", param="item_id")
        if event.get("content_index", 0) != 0:
            raise RealtimeError("content_index must be 0", param="content_index")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise RealtimeError("'audio_end_ms' must be a non-negative integer", param="audio_end_ms")
        if response.modality != "audio":
            raise RealtimeError("only an answer spoken as audio can be truncated", param="item_id")
        sent_ms = math.ceil(response.sent_ms)
        if end_ms > sent_ms:  # as OpenAI: no longer than the audio (here: the audio sent so far)
            raise RealtimeError(f"audio_end_ms {end_ms} is longer than the audio of item {item_id} sent so far "
                                f"({sent_ms} ms)", param="audio_end_ms")
        if response.truncated_ms is not None and end_ms > response.truncated_ms:
            raise RealtimeError(f"item {item_id} was already truncated at {response.truncated_ms} ms; it cannot be "
                                f"truncated to a later point ({end_ms} ms)", param="audio_end_ms")
        response.truncated_ms = end_ms
        if not response.finished:  # the client stopped playing it: stop sending it
            response.cancel_reason = response.cancel_reason or "client_cancelled"
            self._stop(response, response.cancel_reason)
        self.truncations.setdefault(response.turn_id, deque()).append((item_id, end_ms, event.get("event_id")))
        self._converse(ClientEvent(truncate=TruncateAnswer(turn_id=response.turn_id,
                                                           content=played_text(response.spoken, end_ms))))

    # ------------------------------------------------------------------------------------------------------------
    # Converse events

    def _on_converse(self, event: ServerEvent) -> None:
        kind = event.WhichOneof("event")
        if self._held is not None and kind not in ("truncated", "error"):
            self._held.append(event)
            return
        handler = getattr(self, "_converse_" + kind, None) if kind else None
        if handler is not None:
            handler(event)

    def _converse_speech_started(self, event: ServerEvent) -> None:
        segment = Segment(new_id("item"), event.speech_started.audio_start_s)
        self.open_segment = segment
        self.segments.append(segment)
        self.send({"type": "input_audio_buffer.speech_started", "item_id": segment.item_id,
                   "audio_start_ms": _ms(segment.start_s)})

    def _converse_speech_ended(self, event: ServerEvent) -> None:
        segment, self.open_segment = self.open_segment, None
        if segment is None:
            return
        segment.end_s = event.speech_ended.audio_end_s
        if segment.cleared:
            with contextlib.suppress(ValueError):
                self.segments.remove(segment)
            return
        self.send({"type": "input_audio_buffer.speech_stopped", "item_id": segment.item_id,
                   "audio_end_ms": _ms(segment.end_s)})

    def _converse_judged(self, event: ServerEvent) -> None:
        judged = event.judged
        segment = self._judged_segment(judged.audio_start_s)
        if judged.outcome in (UtteranceJudged.QUERY, UtteranceJudged.BARGE_IN):
            if judged.outcome == UtteranceJudged.QUERY:
                self.queries.append(segment)
            active = self._active()  # a barge-in word whose answer still streams: its Interrupted event stops it
            if active is not None and active.converse_done:  # its text is done, its audio is still going out
                self._stop(active, "turn_detected")
            return
        self.send({"type": IGNORED_EVENT, "item_id": segment.item_id, "audio_start_ms": _ms(judged.audio_start_s),
                   "audio_end_ms": _ms(judged.audio_end_s), "state_token": judged.state_token,
                   "latency_ms": _ms(judged.latency_s)})

    def _judged_segment(self, start_s: float) -> Segment:
        """The VAD segment a judgement is about (segments whose judging failed are skipped)."""
        for k, segment in enumerate(self.segments):
            if abs(segment.start_s - start_s) < 0.002:
                for _ in range(k + 1):
                    self.segments.popleft()
                return segment
        return Segment(new_id("item"), start_s)

    def _converse_answer_started(self, event: ServerEvent) -> None:
        active = self._active()
        if active is not None:
            self._stop(active, "turn_detected")
        voice, metadata = self.settings.voice, None
        cancelled = False
        if event.answer_started.state_token == "<3>":
            modality = self.pending_modality or self.settings.output_modalities[0]
            self.pending_modality = None
            cancelled, self.cancel_pending = self.cancel_pending, False
            while self.sent:  # the typed query was taken, and the images sent before it
                sent = self.sent.popleft()
                if sent.kind == "text":  # its response.create's
                    voice, metadata = sent.voice or voice, sent.metadata
                    break
        else:
            segment = self.queries.popleft() if self.queries else Segment(new_id("item"), 0.0)
            self.send({"type": "input_audio_buffer.committed", "item_id": segment.item_id,
                       "previous_item_id": self.last_item_id})
            spoken = user_item(segment.item_id, [{"type": "input_audio", "transcript": None}])
            self._item_added(spoken)
            self._item_done(spoken)  # (no transcription to wait for: complete as added)
            modality = self.settings.output_modalities[0]
        r = Response(new_id("resp"), new_id("item"), event.turn_id, modality, voice, metadata)
        self.response = r
        self.items[r.item_id] = r
        while len(self.items) > _KEEP_ITEMS:
            self.items.popitem(last=False)
        item = assistant_item(r.item_id, modality, "", "in_progress")
        self.send({"type": "response.created", "response": self._response_api(r, "in_progress")})
        self.send({"type": "response.output_item.added", "response_id": r.id, "output_index": 0, "item": item})
        self._item_added(item)  # in progress: conversation.item.done follows with its content (`_done`)
        part = {"type": "audio", "transcript": ""} if modality == "audio" else {"type": "text", "text": ""}
        self.send({"type": "response.content_part.added", **self._where(r), "part": part})
        if cancelled:  # response.cancel came before it started: ended by its Interrupted event, nothing spoken
            r.cancel_reason = "client_cancelled"
            self._converse(ClientEvent(cancel=CancelAnswer(turn_id=r.turn_id)))
            return
        if modality == "audio":
            r.speaker = asyncio.create_task(self._speak(r))
            self._converse(ClientEvent(playback=PlaybackState(playing=True)))  # a barge-in is judged early

    def _converse_delta(self, event: ServerEvent) -> None:
        r = self._for_turn(event.turn_id)
        if r is None or r.converse_done:
            return
        r.text.append(event.delta.text)
        if r.modality == "text":
            if event.delta.text:  # (a delta of token ids alone has no text: OpenAI sends no empty deltas)
                self.send({"type": "response.output_text.delta", **self._where(r), "delta": event.delta.text})
        else:
            for sentence in r.splitter.push(event.delta.text):
                r.sentences.put_nowait(sentence)

    def _converse_completed(self, event: ServerEvent) -> None:
        r = self._for_turn(event.turn_id)
        if r is None:
            return
        r.converse_done = True
        r.usage = usage(event.completed.usage, event.completed.usage.completion_tokens)
        r.cut_by_tokens = event.completed.finish_reason in _CUT_BY_TOKENS
        if r.cancel_reason or r.error:
            self._stop(r, r.cancel_reason, error=r.error)
        elif r.modality == "text":
            r.finished = True
            self._done(r, *self._ended(r))
        else:
            r.sentences.put_nowait(r.splitter.flush())
            r.sentences.put_nowait(None)  # the speaker finishes the response after the last sentence

    def _converse_interrupted(self, event: ServerEvent) -> None:
        r = self._for_turn(event.turn_id)
        if r is None:
            return
        r.converse_done = True
        interrupted = event.interrupted
        r.usage = usage(interrupted.usage if interrupted.HasField("usage") else None, interrupted.tokens_generated)
        if r.error is not None:  # our CancelAnswer after the speech failed
            self._stop(r, None, error=r.error)
        else:
            self._stop(r, r.cancel_reason or "turn_detected")

    def _converse_truncated(self, event: ServerEvent) -> None:
        pending = self.truncations.get(event.turn_id)
        request = pending.popleft() if pending else None
        if callable(request):
            request()
        elif request is not None:
            item_id, end_ms, _ = request
            self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                       "audio_end_ms": end_ms})

    def _converse_error(self, event: ServerEvent) -> None:
        code = event.error.code
        name = _STATUS_NAMES.get(code, str(code))
        kind = _ERROR_TYPES.get(code, "server_error")
        message = event.error.message
        error = {"type": kind, "code": name, "message": message}
        r = self._for_turn(event.turn_id)
        pending = self.truncations.get(event.turn_id)
        if pending and message.startswith("truncate"):  # our TruncateAnswer, or the client's (answered by its id)
            request = pending.popleft()
            if callable(request):
                self.send(error_event(message, code=name, kind=kind))
                request()
                return
            else:
                self.send(error_event(message, code=name, kind=kind, client_event_id=request[2],
                                      param="audio_end_ms"))
                return
        elif r is not None and not r.converse_done:  # the answer failed mid-way
            r.converse_done = True
            self._stop(r, None, error=error)
        elif message.startswith("image") or "images already wait" in message:
            sent = self._refused("image")  # an image the orchestrator refused: it leaves the conversation
            if sent is not None:
                self.send(error_event(message, code=name, kind=kind, client_event_id=sent.event_id,
                                      param=sent.param))
                self._unchain(sent.item_ids)
                return
        elif self.pending_modality is not None and self._active() is None:
            self.pending_modality = None  # the typed query never became an answer: its response fails
            self.cancel_pending = False
            sent = self._refused("text")
            if sent is not None:
                self.send(error_event(message, code=name, kind=kind, client_event_id=sent.event_id,
                                      param="item.content" if message.startswith("text message") else None))
                self._unchain(sent.item_ids)
                failed = Response(new_id("resp"), "", event.turn_id, sent.modality,
                                  sent.voice or self.settings.voice, sent.metadata, finished=True)
                self.send({"type": "response.created", "response": self._response_api(failed, "in_progress")})
                self._response_done(self._response_api(failed, "failed", error=error))
                return
        self.send(error_event(message, code=name, kind=kind))

    # ------------------------------------------------------------------------------------------------------------
    # Responses

    def _active(self) -> Response | None:
        return self.response if self.response is not None and not self.response.finished else None

    def _for_turn(self, turn_id: int) -> Response | None:
        r = self.response
        return r if r is not None and r.turn_id == turn_id and not r.finished else None

    @staticmethod
    def _where(r: Response) -> dict:
        return {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}

    async def _speak(self, r: Response) -> None:
        """Sentence by sentence: synthesize, then its transcript and audio; the response ends after the last.

        Audio goes out at the pace it plays, `audio_lead_ms` ahead: the response is in progress while the client
        plays it, so an interruption stops it where the listener is (not after all of it was sent), the stored
        answer is what was heard (to within the lead), and the echo guard knows when each piece sounds.
        """
        loop = asyncio.get_running_loop()
        tts = None
        while (sentence := await r.sentences.get()) is not None:
            if not sentence:
                continue
            pcm = b""
            if _SPEAKABLE.search(sentence):
                try:
                    tts = tts or make_tts(self.tts_name, r.voice or self.settings.voice, self.settings.speed)
                    pcm = await asyncio.to_thread(tts.synthesize, sentence.strip())
                except Exception as e:  # whatever the engine raised, the answer cannot be spoken
                    if not isinstance(e, VitaError):
                        log.exception("text to speech failed", extra={"session_id": self.settings.session_id})
                    if not r.finished:
                        self._speech_failed(r, f"text to speech failed: {e}")
                    return
            if r.finished:
                return
            start = r.audio_ms
            r.audio_ms += len(pcm) / 2 / SAMPLE_RATE * 1000
            r.spoken.append(Spoken(sentence, start, r.audio_ms))
            self.send({"type": "response.output_audio_transcript.delta", **self._where(r), "delta": sentence})
            step = SAMPLE_RATE * 2 * AUDIO_CHUNK_MS // 1000
            for offset in range(0, len(pcm), step):
                at_ms = start + offset / 2 / SAMPLE_RATE * 1000
                if r.playback_start is None or loop.time() > r.playback_start + at_ms / 1000:
                    r.playback_start = loop.time() - at_ms / 1000  # (re)starts now: nothing was left to play
                await asyncio.sleep(max(0.0, r.playback_start + (at_ms - self.audio_lead_ms) / 1000 - loop.time()))
                if r.finished:
                    return
                chunk = pcm[offset:offset + step]
                self.send({"type": "response.output_audio.delta", **self._where(r), "delta": b64(chunk)})
                r.sent_ms = at_ms + len(chunk) / 2 / SAMPLE_RATE * 1000
                if self.echo is not None:
                    self.echo.played(chunk)
        r.finished = True
        self._converse(ClientEvent(playback=PlaybackState(playing=False)))
        self._done(r, *self._ended(r))

    def _speech_failed(self, r: Response, message: str) -> None:
        """A sentence could not be synthesized: the response ends `failed` (status_details.error: `tts_failed`) after
        an `error` event, and the stored answer is cut to the text whose audio went out. An answer still being
        generated is stopped first (its Interrupted event then ends the response)."""
        r.error = {"type": "server_error", "code": "tts_failed", "message": message}
        self.send(error_event(message, code="tts_failed", kind="server_error"))
        if r.converse_done:
            self._stop(r, None, error=r.error)
        else:
            self._converse(ClientEvent(cancel=CancelAnswer(turn_id=r.turn_id)))

    @staticmethod
    def _ended(r: Response) -> tuple[str, str | None]:
        """The status and reason of a response that ran to its end: `incomplete` (`max_output_tokens`) when the token
        limit cut it, as OpenAI's."""
        return ("incomplete", "max_output_tokens") if r.cut_by_tokens else ("completed", None)

    def _stop(self, r: Response, reason: str | None, *, error: dict | None = None) -> None:
        """End `r` now: no more audio; the stored answer is cut to the text whose audio went out, and then
        response.done tells the client (so the history is final when it arrives)."""
        if r.finished:
            return
        r.finished = True
        if r.speaker is not None and r.speaker is not asyncio.current_task():
            r.speaker.cancel()
        if r.modality == "audio":
            self._converse(ClientEvent(playback=PlaybackState(playing=False)))
        status = "failed" if error else "cancelled"
        if r.modality == "audio" and r.spoken_text() != "".join(r.text):
            if self._held is None:
                self._held = []

            def cut() -> None:
                self._done(r, status, reason=reason, error=error)
                self._release()

            self.truncations.setdefault(r.turn_id, deque()).append(cut)
            self._converse(ClientEvent(truncate=TruncateAnswer(turn_id=r.turn_id, content=r.spoken_text())))
        else:
            self._done(r, status, reason=reason, error=error)

    def _release(self) -> None:
        """Handle the held Converse events, in order (holding again if one of them stops a response)."""
        held, self._held = self._held or [], None
        for k, event in enumerate(held):
            if self._held is not None:
                self._held.extend(held[k:])
                return
            self._on_converse(event)

    def _done(self, r: Response, status: str, reason: str | None = None, *, error: dict | None = None) -> None:
        """The closing events of a response: the parts, the item and response.done."""
        text = r.spoken_text() if r.modality == "audio" else "".join(r.text)
        if r.modality == "audio":
            self.send({"type": "response.output_audio.done", **self._where(r)})
            self.send({"type": "response.output_audio_transcript.done", **self._where(r), "transcript": text})
            part = {"type": "audio", "transcript": text}
        else:
            self.send({"type": "response.output_text.done", **self._where(r), "text": text})
            part = {"type": "text", "text": text}
        self.send({"type": "response.content_part.done", **self._where(r), "part": part})
        item = assistant_item(r.item_id, r.modality, text, "completed" if status == "completed" else "incomplete")
        self.send({"type": "response.output_item.done", "response_id": r.id, "output_index": 0, "item": item})
        self._item_done(item)
        self._response_done(self._response_api(r, status, reason=reason, error=error, output=[item]))

    def _response_api(self, r: Response, status: str, *, reason: str | None = None, error: dict | None = None,
                      output: list | None = None) -> dict:
        details = None
        if status != "in_progress":
            details = {"type": status, "reason": reason, "error": error}
        return {"object": "realtime.response", "id": r.id, "status": status, "status_details": details,
                "output": output or [], "conversation_id": f"conv_{self.settings.session_id}",
                "output_modalities": [r.modality], "max_output_tokens": self.settings.max_output_tokens,
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                                     "voice": r.voice or self.settings.voice}},
                "usage": r.usage, "metadata": r.metadata}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
