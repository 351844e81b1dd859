"""`Converse`: the duplex voice loop of one call (VAD, judging by the monitor pool, interruption with role swap).

Three tasks per call, joined by queues so each stays simple:
- the reader takes client events in order: config, media to Redis, audio through the VAD; it never waits on
  the model, so speech keeps being cut while an answer streams;
- the turn worker handles what the VAD and the client produce, one at a time: it encodes a segment, has the
  monitor-role pool judge it from the model's own state token, and on a query interrupts the answer in flight
  and starts the next one;
- a relay per answer streams the generator's tokens to the client and writes the finished turn to history.
Everything a replica needs to continue the session (history, roles, the answer in flight) is in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from opentelemetry import trace
from redis.asyncio import Redis

from vita.bus.cancel import cancel
from vita.bus.codec import decode_entry
from vita.bus.queue import Backpressure, submit
from vita.bus.replies import ReplyTimeout, events
from vita.bus.streams import REPLY_TYPES, ROLE_POOLS, BusConfig, Pool, check_id
from vita.bus.trace import current_trace_context
from vita.errors import ContextLengthError, InvalidInputError, VitaError
from vita.model.config import VitaConfig
from vita.orchestrator.sessions import SessionNotFound, SessionStore
from vita.processing.audio import pcm16_to_float, resample
from vita.processing.image import load_image
from vita.processing.processor import with_placeholders
from vita.processing.prompt import Message, Span, StateToken, encode_prompt
from vita.processing.tokenizer import VitaTokenizer
from vita.processing.vad import SpeechEvent, StreamingVAD, VADConfig
from vita.telemetry.metrics import Metrics
from vita.v1.assistant_pb2 import (
    AnswerCompleted,
    AnswerInterrupted,
    AnswerStarted,
    ClientEvent,
    ErrorEvent,
    ServerEvent,
    SessionConfig,
    SessionStarted,
    SpeechEnded,
    SpeechStarted,
    TextDelta,
    Timings,
    Usage,
    UtteranceJudged,
)
from vita.v1.bus_pb2 import EmbeddingPlacement, EmbeddingRef, EncodeJob, GenerationJob, JobError, MediaItem
from vita.v1.media_pb2 import Audio, SamplingParams, Video
from vita.v1.session_pb2 import ActiveAnswer, SessionMedia, SessionState, SessionTurn

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SAMPLE_RATE = 16_000
_CODES = {  # JobError -> google.rpc.Code, for ErrorEvent.code
    JobError.CANCELLED: grpc.StatusCode.CANCELLED, JobError.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    JobError.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    JobError.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED, JobError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_OTHER_ROLE = {GenerationJob.GENERATOR: GenerationJob.MONITOR, GenerationJob.MONITOR: GenerationJob.GENERATOR}


@dataclass
class ConverseConfig:
    default_max_tokens: int = 256
    encode_timeout_s: float = 30.0
    judge_timeout_s: float = 30.0
    token_timeout_s: float = 60.0  # longer than the bus's reclaim time, as for Generate
    stop_wait_s: float = 5.0  # how long to wait for a cancelled generator to confirm it stopped
    vad: VADConfig = field(default_factory=VADConfig)


class TurnFailed(VitaError):
    """A step of a turn failed (an encoder or llm job error); told to the client, the session goes on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Utterance:
    """A cut of speech to judge: a whole segment, or (early) the first part of one still being spoken."""

    audio: np.ndarray
    start_s: float
    end_s: float
    segment: int
    cut_at: float  # perf_counter when the VAD produced it: the start of every latency this turn reports
    early: bool = False


@dataclass
class TextQuery:
    text: str
    cut_at: float


@dataclass
class _End:
    pass


@dataclass
class Answer:
    """An answer being streamed by the relay task."""

    request_id: str
    turn_id: int
    state_token: str
    started_at: float  # when its query was cut or typed
    usage: Usage
    interrupting: bool  # it interrupted another answer (for the interruption latency metric)
    tokens_sent: int = 0
    text: list[str] = field(default_factory=list)
    first_token_at: float = 0.0
    task: asyncio.Task | None = None
    # The relay holds the lock while it handles an event; whoever stops it takes the lock and sets `stopped`,
    # so an answer is either finished by the relay or stopped by an interruption, never both.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stopped: bool = False
    done: bool = False


class ConverseCall:
    """One Converse call: `run` turns the client's events into server events."""

    def __init__(self, redis: Redis, bus: BusConfig, model_config: VitaConfig, tokenizer: VitaTokenizer,
                 store: SessionStore, config: ConverseConfig, metrics: Metrics) -> None:
        self.redis, self.bus, self.model_config, self.tokenizer = redis, bus, model_config, tokenizer
        self.store, self.config, self.metrics = store, config, metrics
        self.state: SessionState | None = None
        self.vad: StreamingVAD | None = None
        self.rate = SAMPLE_RATE
        self._pcm_carry = b""
        self._out: asyncio.Queue[ServerEvent | None] = asyncio.Queue()
        self._work: asyncio.Queue[Utterance | TextQuery | _End] = asyncio.Queue()
        self.answer: Answer | None = None
        self._early_query_segment = -1  # a segment already judged a query while being spoken
        self._early_tried: set[int] = set()
        self._states = {token_id: piece for piece, token_id in tokenizer.state_ids.items()}

    @property
    def session_id(self) -> str:
        return self.state.session_id if self.state else ""

    # ------------------------------------------------------------------------------------------------------
    # The call

    async def run(self, requests: AsyncIterator[ClientEvent]) -> AsyncIterator[ServerEvent]:
        self.metrics.active_sessions.inc()
        reader = asyncio.create_task(self._read(requests))
        worker = asyncio.create_task(self._turns())
        try:
            while (event := await self._out.get()) is not None:
                yield event
        finally:
            self.metrics.active_sessions.dec()
            reader.cancel()
            worker.cancel()
            for task in (reader, worker):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await asyncio.shield(self._abandon_answer())

    def emit(self, turn_id: int | None = None, **event) -> None:
        if turn_id is None:
            turn_id = self.state.next_turn_id if self.state else 0
        self._out.put_nowait(ServerEvent(session_id=self.session_id, turn_id=turn_id, timestamp_s=time.time(),
                                         **event))

    def error(self, code: grpc.StatusCode, message: str, turn_id: int | None = None) -> None:
        self.emit(turn_id, error=ErrorEvent(code=code.value[0], message=message))

    # ------------------------------------------------------------------------------------------------------
    # Reader: client events, in order

    async def _read(self, requests: AsyncIterator[ClientEvent]) -> None:
        try:
            async for request in requests:
                if request.WhichOneof("event") == "end":
                    break
                try:
                    await self._on_client_event(request)
                except InvalidInputError as e:
                    self.error(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except SessionNotFound as e:
                    self.error(grpc.StatusCode.NOT_FOUND, str(e))
                except VitaError as e:
                    self.error(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        finally:
            if self.vad is not None:  # the client is done (or gone): speech still open is cut now
                for event in self.vad.flush():
                    self._on_speech(event)
            self._work.put_nowait(_End())

    async def _on_client_event(self, request: ClientEvent) -> None:
        kind = request.WhichOneof("event")
        if kind == "config":
            await self._configure(request.config)
            return
        if kind is None:
            raise InvalidInputError("empty client event: set one of config, audio, frame, image, text, end")
        if self.state is None:
            raise InvalidInputError(f"{kind} before the session config: the first event must be a SessionConfig")
        if kind == "audio":
            for event in await asyncio.to_thread(self._vad_push, request.audio.pcm16):
                self._on_speech(event)
        elif kind == "frame":
            frame = request.frame
            if not frame.image.data:
                raise InvalidInputError("camera frame has no image bytes")
            await asyncio.to_thread(_check_image_bytes, frame.image.data, "camera frame")
            await self.store.add_frame(self.session_id, frame)
        elif kind == "image":
            await asyncio.to_thread(_check_image_bytes, request.image.data, "image")
            await self.store.add_image(self.session_id, request.image)
        elif kind == "text":
            if not request.text.text.strip():
                raise InvalidInputError("text message is empty")
            self._work.put_nowait(TextQuery(request.text.text, time.perf_counter()))

    async def _configure(self, config: SessionConfig) -> None:
        if self.state is not None:
            raise InvalidInputError("the session is already configured: send SessionConfig once, first")
        rate = config.audio_sample_rate_hz or SAMPLE_RATE
        if not 8_000 <= rate <= 48_000:
            raise InvalidInputError(f"audio_sample_rate_hz must be 8000..48000 (or 0 for 16000); got {rate}")
        vad = _vad_config(self.config.vad, config)
        if config.resume:
            if not config.session_id:
                raise InvalidInputError("resume needs the session_id to continue")
            state = await self._recover(check_id("session id", config.session_id))
            resumed = True
        else:
            session_id = check_id("session id", config.session_id) if config.session_id else uuid.uuid4().hex
            state = await self.store.create(SessionState(session_id=session_id, config=config, next_turn_id=1,
                                                         generator_role=GenerationJob.GENERATOR))
            resumed = False
        self.state, self.rate, self.vad = state, rate, StreamingVAD(vad)
        self.emit(session_started=SessionStarted(resumed=resumed, history_turns=len(state.turns)))
        log.info("session started", extra={"session_id": state.session_id, "resumed": resumed})

    def _vad_push(self, pcm16: bytes) -> list[SpeechEvent]:
        data = self._pcm_carry + pcm16
        usable = len(data) - len(data) % 2
        self._pcm_carry = data[usable:]
        if not usable:
            return []
        samples = pcm16_to_float(data[:usable])
        if self.rate != SAMPLE_RATE:
            samples = resample(samples, self.rate, SAMPLE_RATE)
        return self.vad.push(samples.numpy())

    def _on_speech(self, event: SpeechEvent) -> None:
        now = time.perf_counter()
        if event.kind == "started":
            self.emit(speech_started=SpeechStarted(audio_start_s=event.start_s))
        elif event.kind == "partial":
            if self.answer is not None and event.segment not in self._early_tried and self.config.vad.partial_every_ms:
                self._early_tried.add(event.segment)
                self._work.put_nowait(Utterance(event.audio, event.start_s, event.end_s, event.segment, now, True))
        elif event.kind == "ended":
            self.metrics.vad_segments.inc()
            self.emit(speech_ended=SpeechEnded(audio_start_s=event.start_s, audio_end_s=event.end_s))
            self._work.put_nowait(Utterance(event.audio, event.start_s, event.end_s, event.segment, now))

    # ------------------------------------------------------------------------------------------------------
    # Turn worker: one utterance or text at a time

    async def _turns(self) -> None:
        while True:
            item = await self._work.get()
            if isinstance(item, _End):
                if self.answer is not None and self.answer.task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await self.answer.task
                self._out.put_nowait(None)
                return
            turn_id = self.state.next_turn_id
            with tracer.start_as_current_span("converse turn") as span:
                span.set_attribute("vita.session_id", self.session_id)
                span.set_attribute("vita.turn_id", turn_id)
                try:
                    if isinstance(item, TextQuery):
                        await self._answer(StateToken.TEXT, item.cut_at, text=item.text)
                    else:
                        await self._utterance(item)
                except (InvalidInputError, ContextLengthError) as e:
                    self.error(grpc.StatusCode.INVALID_ARGUMENT, str(e), turn_id)
                except Backpressure as e:
                    self.error(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), turn_id)
                except ReplyTimeout as e:
                    self.error(grpc.StatusCode.UNAVAILABLE, str(e), turn_id)
                except TurnFailed as e:
                    self.error(e.code, str(e), turn_id)
                except VitaError as e:
                    self.error(grpc.StatusCode.FAILED_PRECONDITION, str(e), turn_id)
                except Exception:
                    log.exception("turn failed", extra={"session_id": self.session_id})
                    self.error(grpc.StatusCode.INTERNAL, "the orchestrator failed on this turn", turn_id)

    async def _utterance(self, u: Utterance) -> None:
        if not u.early and u.segment == self._early_query_segment:
            self._early_query_segment = -1  # judged a query while spoken: answer the whole of it
            await self._answer(StateToken.QUERY_AUDIO, u.cut_at, audio=await self._encode_audio(u.audio))
            return
        if u.early and self.answer is None:
            return  # the answer it might interrupt finished meanwhile; the whole segment is judged at its end
        audio = await self._encode_audio(u.audio)
        token = await self._judge(audio)
        query = token == StateToken.QUERY_AUDIO.value
        latency = time.perf_counter() - u.cut_at
        self.metrics.utterances_judged.labels("query" if query else "ignored", str(u.early).lower()).inc()
        if u.early and not query:
            return  # not decisive: the whole segment is judged when it ends
        self.emit(judged=UtteranceJudged(
            outcome=UtteranceJudged.QUERY if query else UtteranceJudged.IGNORED, state_token=token, early=u.early,
            audio_start_s=u.start_s, audio_end_s=u.end_s, latency_s=latency))
        if not query:
            return
        if u.early:
            self._early_query_segment = u.segment
            await self._interrupt(u.cut_at)
            return
        await self._answer(StateToken.QUERY_AUDIO, u.cut_at, audio=audio)

    async def _encode_audio(self, samples: np.ndarray) -> EmbeddingRef:
        item = MediaItem(audio=Audio(data=float_to_pcm16(samples), encoding=Audio.PCM16, sample_rate_hz=SAMPLE_RATE))
        refs = await self._encode({"audio": (Pool.AUDIO_ENCODER, EncodeJob.AUDIO, [item])})
        return refs["audio"]

    async def _encode(self, wanted: dict[str, tuple[Pool, int, list[MediaItem]]]) -> dict[str, EmbeddingRef]:
        """One job per modality, submitted together; their results come back on one reply stream."""
        request_id = f"{self.session_id}.enc.{uuid.uuid4().hex[:12]}"
        reply_stream = self.bus.reply(request_id)
        kinds = {}
        for name, (pool, kind, items) in wanted.items():
            job = EncodeJob(job_id=f"{request_id}.{name}", request_id=request_id, reply_stream=reply_stream,
                            kind=kind, items=items, trace_context=current_trace_context())
            kinds[job.job_id] = name
            await submit(self.redis, self.bus, pool, job)
        refs: dict[str, EmbeddingRef] = {}
        async for result in events(self.redis, reply_stream, self.config.encode_timeout_s):
            name = kinds.get(getattr(result, "job_id", ""))
            if name is None:
                continue
            if result.WhichOneof("outcome") == "error":
                raise TurnFailed(_CODES.get(result.error.code, grpc.StatusCode.INTERNAL),
                                 f"{name}: {result.error.message}")
            refs[name] = result.embedding
            if len(refs) == len(kinds):
                return refs
        return refs

    async def _judge(self, audio: EmbeddingRef) -> str:
        """The monitor-role pool reads history + the new speech and answers one token: its state token."""
        history = self._history(include_partial=True)
        user = SessionTurn(role=SessionTurn.USER, content=with_placeholders("", images=0, videos=0, audios=1),
                           media=[SessionMedia(modality="audio", embedding=audio)])
        input_ids, placements, _ = self._prompt([*history, user], audio_question=True)
        request_id = f"{self.session_id}.judge.{uuid.uuid4().hex[:12]}"
        job = GenerationJob(
            request_id=request_id, role=_OTHER_ROLE[self.state.generator_role], reply_stream=self.bus.reply(request_id),
            prompt_token_ids=input_ids, embeddings=placements, sampling=SamplingParams(temperature=0.0),
            max_tokens=1, trace_context=current_trace_context())
        await submit(self.redis, self.bus, ROLE_POOLS[job.role], job)
        token = ""
        async for event in events(self.redis, job.reply_stream, self.config.judge_timeout_s):
            kind = event.WhichOneof("event")
            if kind == "delta" and event.delta.token_ids and not token:
                token_id = event.delta.token_ids[0]
                token = self._states.get(token_id) or self.tokenizer.decode([token_id])
            elif kind == "error":
                raise TurnFailed(_CODES.get(event.error.code, grpc.StatusCode.INTERNAL), event.error.message)
            elif kind == "finished":
                return token
        return token

    # ------------------------------------------------------------------------------------------------------
    # Answers, interruption, history

    async def _answer(self, state: StateToken, cut_at: float, *, text: str = "",
                      audio: EmbeddingRef | None = None) -> None:
        """A query: interrupt the answer in flight (roles swap), then answer with the whole history."""
        interrupted = self.answer is not None
        if interrupted:
            await self._interrupt(cut_at)
        images, frames = await self.store.take_media(self.session_id)
        wanted = {}
        if images:
            wanted["image"] = (Pool.VISION_ENCODER, EncodeJob.IMAGE, [MediaItem(image=i) for i in images])
        if frames:
            video = Video(frames=Video.Frames(frames=frames))
            wanted["video"] = (Pool.VISION_ENCODER, EncodeJob.VIDEO, [MediaItem(video=video)])
        refs = await self._encode(wanted) if wanted else {}
        media = [SessionMedia(modality=m, embedding=refs[m]) for m in ("image", "video") if m in refs]
        if audio is not None:
            media.append(SessionMedia(modality="audio", embedding=audio))
        images_n = len(refs["image"].item_tokens) if "image" in refs else 0
        content = with_placeholders(text, images=images_n, videos=int("video" in refs), audios=int(audio is not None))
        turn_id = self.state.next_turn_id
        user = SessionTurn(role=SessionTurn.USER, turn_id=turn_id, content=content, media=media,
                           state_token=state.value, unix_s=time.time())
        input_ids, placements, spans = self._prompt([*self._history(), user], audio_question=audio is not None)
        input_ids.append(self.tokenizer.state_ids[state.value])  # the decision is made: the answer starts with it
        config = self.state.config
        request_id = f"{self.session_id}.t{turn_id}.{uuid.uuid4().hex[:8]}"
        role = self.state.generator_role
        room = self.model_config.llm.max_position_embeddings - len(input_ids)
        job = GenerationJob(
            request_id=request_id, role=role, reply_stream=self.bus.reply(request_id), prompt_token_ids=input_ids,
            embeddings=placements, sampling=config.sampling,
            max_tokens=max(1, min(config.sampling.max_tokens or self.config.default_max_tokens, room)),
            trace_context=current_trace_context())
        await submit(self.redis, self.bus, ROLE_POOLS[role], job)

        def record(s: SessionState) -> None:
            s.turns.append(user)
            s.next_turn_id = turn_id + 1
            s.active.CopyFrom(ActiveAnswer(request_id=request_id, turn_id=turn_id, state_token=state.value, role=role))

        self.state = await self.store.update(self.session_id, record)
        usage = Usage(prompt_tokens=len(input_ids), **{
            f"{m}_tokens": sum(s.length for s in spans if s.modality == m) for m in ("image", "video", "audio")})
        answer = Answer(request_id, turn_id, state.value, cut_at, usage, interrupted)
        self.answer = answer
        self.emit(turn_id, answer_started=AnswerStarted(state_token=state.value))
        answer.task = asyncio.create_task(self._relay(answer, job.reply_stream))

    async def _relay(self, answer: Answer, reply_stream: str) -> None:
        try:
            async for event in events(self.redis, reply_stream, self.config.token_timeout_s):
                async with answer.lock:
                    if answer.stopped:
                        return
                    if await self._relay_event(answer, event):
                        return
        except ReplyTimeout as e:
            async with answer.lock:
                if not answer.stopped:
                    await self._finish(answer, answer.tokens_sent, interrupted=True)
                    self.error(grpc.StatusCode.UNAVAILABLE, str(e), answer.turn_id)

    async def _relay_event(self, answer: Answer, event) -> bool:
        """Forward one generator event; True when it was the last."""
        kind = event.WhichOneof("event")
        if kind == "delta":
            if not answer.first_token_at and event.delta.token_ids:
                answer.first_token_at = time.perf_counter()
                delay = answer.first_token_at - answer.started_at
                if answer.state_token == StateToken.QUERY_AUDIO.value:
                    self.metrics.speech_to_first_token.observe(delay)
                if answer.interrupting:
                    self.metrics.interruption_latency.labels("first_token").observe(delay)
            answer.tokens_sent += len(event.delta.token_ids)
            answer.text.append(event.delta.text)
            self.emit(answer.turn_id, delta=TextDelta(text=event.delta.text, token_ids=event.delta.token_ids))
            return False
        if kind == "finished":
            await self._finish(answer, event.finished.usage.completion_tokens, interrupted=False)
            answer.usage.completion_tokens = event.finished.usage.completion_tokens
            first = answer.first_token_at - answer.started_at if answer.first_token_at else 0.0
            self.emit(answer.turn_id, completed=AnswerCompleted(usage=answer.usage, timings=Timings(
                time_to_first_token_s=first, total_s=time.perf_counter() - answer.started_at)))
            return True
        if kind == "error":
            await self._finish(answer, answer.tokens_sent, interrupted=True)
            self.error(_CODES.get(event.error.code, grpc.StatusCode.INTERNAL), event.error.message, answer.turn_id)
            return True
        return False

    async def _finish(self, answer: Answer, tokens: int, *, interrupted: bool, swap: bool = False) -> None:
        """The bot turn goes to history with exactly the text the client received."""
        turn = SessionTurn(role=SessionTurn.BOT, turn_id=answer.turn_id, content="".join(answer.text),
                           state_token=answer.state_token, interrupted=interrupted, tokens=tokens, unix_s=time.time())

        def record(s: SessionState) -> None:
            if s.HasField("active") and s.active.request_id == answer.request_id:
                s.ClearField("active")
            s.turns.append(turn)
            if swap:
                s.generator_role = _OTHER_ROLE[s.generator_role]

        self.state = await self.store.update(self.session_id, record)
        answer.done = True
        if self.answer is answer:
            self.answer = None

    async def _interrupt(self, cut_at: float) -> None:
        """Stop the relay first (nothing more reaches the client), then the generator's compute; roles swap."""
        answer = self.answer
        if answer is None or not await self._stop_relay(answer):
            return  # it finished meanwhile: nothing to interrupt
        await cancel(self.redis, self.bus, answer.request_id)
        await self._finish(answer, answer.tokens_sent, interrupted=True, swap=True)
        generated = await self._stopped(answer.request_id)
        stop_latency = time.perf_counter() - cut_at
        self.metrics.interruption_latency.labels("generator_stopped").observe(stop_latency)
        self.emit(answer.turn_id, interrupted=AnswerInterrupted(
            tokens_sent=answer.tokens_sent, tokens_generated=generated, stop_latency_s=stop_latency))

    async def _stop_relay(self, answer: Answer) -> bool:
        """Nothing more of `answer` reaches the client after this; False if it had already finished."""
        async with answer.lock:
            if answer.done:
                return False
            answer.stopped = True
        if answer.task is not None:
            answer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answer.task
        return True

    async def _stopped(self, request_id: str) -> int:
        """Wait for the generator's own word that the sequence stopped; its token count, or -1 if it never came."""
        with contextlib.suppress(ReplyTimeout):
            async for event in events(self.redis, self.bus.reply(request_id), self.config.stop_wait_s):
                kind = event.WhichOneof("event")
                if kind == "finished":
                    return event.finished.usage.completion_tokens
                if kind == "error":
                    return -1
        return -1

    async def _abandon_answer(self) -> None:
        """The call ended with an answer in flight (client gone): stop it and keep what was sent."""
        answer = self.answer
        if answer is None or self.state is None or not await self._stop_relay(answer):
            return
        try:
            await cancel(self.redis, self.bus, answer.request_id)
            await self._finish(answer, answer.tokens_sent, interrupted=True)
        except Exception:  # the session keeps its active answer; a resume rebuilds it from the reply stream
            log.exception("could not record the abandoned answer", extra={"session_id": self.session_id})

    async def _recover(self, session_id: str) -> SessionState:
        """Resume: an answer left in flight by a replica that died is rebuilt from its reply stream."""
        state = await self.store.load(session_id)
        if not state.HasField("active"):
            return state
        active = state.active
        text, finished, tokens = [], False, 0
        for _, fields in await self.redis.xrange(self.bus.reply(active.request_id)):
            event = decode_entry(fields, REPLY_TYPES)
            kind = event.WhichOneof("event")
            if kind == "delta":
                text.append(event.delta.text)
                tokens += len(event.delta.token_ids)
            elif kind == "finished":
                finished = True
                tokens = event.finished.usage.completion_tokens
        if not finished:
            await cancel(self.redis, self.bus, active.request_id)
        turn = SessionTurn(role=SessionTurn.BOT, turn_id=active.turn_id, content="".join(text),
                           state_token=active.state_token, interrupted=not finished, tokens=tokens, unix_s=time.time())

        def record(s: SessionState) -> None:
            if s.HasField("active") and s.active.request_id == active.request_id:
                s.ClearField("active")
                s.turns.append(turn)

        return await self.store.update(session_id, record)

    def _history(self, *, include_partial: bool = False) -> list[SessionTurn]:
        """Stored turns, plus (for judging) the answer streaming now as it stands."""
        turns = list(self.state.turns)
        if include_partial and self.answer is not None:
            turns.append(SessionTurn(role=SessionTurn.BOT, content="".join(self.answer.text)))
        return turns

    def _prompt(self, turns: list[SessionTurn], *, audio_question: bool
                ) -> tuple[list[int], list[EmbeddingPlacement], list[Span]]:
        """Token ids and embedding placements; the oldest exchanges are left out when the context is full."""
        turns = _alternating(turns)
        limit = self.model_config.llm.max_position_embeddings - 1
        system = self.state.config.system_prompt if self.state.config.HasField("system_prompt") else None
        while True:
            media = [m for t in turns for m in t.media]
            try:
                prompt = encode_prompt(
                    self.tokenizer, [Message("user" if t.role == SessionTurn.USER else "bot", t.content)
                                     for t in turns],
                    audio_question=audio_question,
                    image_tokens=[n for m in media if m.modality == "image" for n in m.embedding.item_tokens],
                    video_tokens=[m.embedding.shape[0] for m in media if m.modality == "video"],
                    audio_tokens=[n for m in media if m.modality == "audio" for n in m.embedding.item_tokens],
                    system=system, max_length=limit)
                return prompt.input_ids, _placements(prompt.spans, media), prompt.spans
            except ContextLengthError:
                if len(turns) <= 1:
                    raise
                turns = turns[2:]  # drop the oldest user turn and its answer


def _alternating(turns: list[SessionTurn]) -> list[SessionTurn]:
    """The template needs user, bot, user, ...: a user turn whose answer failed is merged with the next one."""
    out: list[SessionTurn] = []
    for turn in turns:
        if out and out[-1].role == turn.role:
            merged = SessionTurn()
            merged.CopyFrom(out[-1])
            merged.content += ("\n" if turn.role == SessionTurn.USER else "") + turn.content
            merged.media.extend(turn.media)
            out[-1] = merged
        else:
            out.append(turn)
    while out and out[0].role != SessionTurn.USER:
        out.pop(0)
    return out


def _placements(spans: list[Span], media: list[SessionMedia]) -> list[EmbeddingPlacement]:
    """Each blob fills the next spans of its modality, in prompt order (one span per image, clip or video)."""
    by_modality: dict[str, list[Span]] = {}
    for span in sorted(spans, key=lambda s: s.start):
        by_modality.setdefault(span.modality, []).append(span)
    placements = []
    for m in media:
        n = 1 if m.modality == "video" else len(m.embedding.item_tokens)
        mine, by_modality[m.modality] = by_modality[m.modality][:n], by_modality[m.modality][n:]
        placements.append(EmbeddingPlacement(embedding=m.embedding, spans=[
            EmbeddingPlacement.Span(start=s.start, length=s.length) for s in mine]))
    return placements


def _vad_config(defaults: VADConfig, config: SessionConfig) -> VADConfig:
    v = config.vad
    early = defaults.partial_every_ms if v.early_judge_ms == 0 else max(0, v.early_judge_ms)
    return VADConfig(
        start_threshold=v.start_threshold or defaults.start_threshold,
        end_threshold=v.end_threshold or defaults.end_threshold,
        min_speech_ms=v.min_speech_ms or defaults.min_speech_ms,
        end_silence_ms=v.end_silence_ms or defaults.end_silence_ms,
        speech_pad_ms=defaults.speech_pad_ms, max_segment_s=defaults.max_segment_s, partial_every_ms=early,
    )


def _check_image_bytes(data: bytes, what: str) -> None:
    """Refused here, before it is stored: a bad frame must not fail a later turn."""
    try:
        load_image(data)
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None


def float_to_pcm16(samples: torch.Tensor | np.ndarray) -> bytes:
    """Float samples in [-1, 1] as little-endian PCM16 (what clients stream)."""
    array = samples.numpy() if isinstance(samples, torch.Tensor) else samples
    return (np.clip(array, -1.0, 1.0) * 32767).astype("<i2").tobytes()
