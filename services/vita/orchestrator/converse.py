"""`Converse`: the duplex voice loop of one call (VAD, judging by the monitor pool, interruption with role swap).

Tasks per call, joined by queues so each stays simple:
- the reader takes client events in order: config, media to Redis, audio through the VAD; it never waits on
  the model, so speech keeps being cut while an answer streams;
- the audio watchdog ends open speech when the audio stops (a muted mic, a stalled network): no chunk for the
  end-silence time, counted on the wall clock from where the last chunk's audio ran out;
- the turn worker handles what the VAD and the client produce, one at a time: it encodes a segment, has the
  monitor-role pool judge it from the model's own state token, and on a query interrupts the answer in flight
  and starts the next one; with preemptive generation it does that when the speech pauses, and releases the
  answer when the turn ends (`preemptive.py`);
- a relay per answer streams the generator's tokens to the client and writes the finished turn to history.
Everything a replica needs to continue the session (history, roles, the answer in flight) is in Redis.

The call owns its session (`SessionState.owner`): turn ids are handed out by compare-and-set in Redis when a query
is decided (so `UtteranceJudged.turn_id` is the turn that answers it), and a resume elsewhere takes the session
over, ending this call at its next write. When the call ends, however it ends and wherever its tasks were, one
cleanup task sends the bus cancel for every generation it issued that has not finished and records those turns
as interrupted: a task cancelled in the middle of a Redis call can leave no generation running for nobody.

This module is the state machine only: the prompts come from `prompts.py`, the jobs go through `pools.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from opentelemetry import trace
from redis.exceptions import RedisError

from vita.bus.queue import Backpressure
from vita.bus.replies import ReplyTimeout
from vita.bus.streams import ROLE_POOLS, check_id, unique_id
from vita.errors import ContextLengthError, InvalidInputError, VitaError
from vita.orchestrator.config import OrchestratorConfig, session_preemptive, session_vad
from vita.orchestrator.limits import check_sampling
from vita.orchestrator.pools import JobFailed, PoolClient, job_status, queue_seconds
from vita.orchestrator.preemptive import Preemption, discard_reason
from vita.orchestrator.prompts import Prompt, answer_prompt, judge_prefix_prompt, judge_prompt, user_turn
from vita.orchestrator.sessions import ImageLimitExceeded, SessionNotFound, SessionStore, SessionTakenOver
from vita.processing.audio import float_to_pcm16, pcm16_to_float, resample
from vita.processing.image import load_image
from vita.processing.prompt import StateToken
from vita.processing.tokenizer import VitaTokenizer
from vita.processing.turn import BARGE_IN_VOICED_S, voiced_seconds
from vita.processing.vad import SpeechEvent, StreamingVAD, VADConfig
from vita.telemetry.metrics import Metrics
from vita.v1.assistant_pb2 import (
    AnswerCompleted,
    AnswerInterrupted,
    AnswerStarted,
    AnswerTruncated,
    ClientEvent,
    Completed,
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
from vita.v1.bus_pb2 import EmbeddingRef, GenerationJob
from vita.v1.media_pb2 import Audio, Image, TimestampedFrame, Video
from vita.v1.session_pb2 import ActiveAnswer, SessionState, SessionTurn

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

SAMPLE_RATE = 16_000
_OTHER_ROLE = {GenerationJob.GENERATOR: GenerationJob.MONITOR, GenerationJob.MONITOR: GenerationJob.GENERATOR}
_CLEANUPS: set[asyncio.Task] = set()  # ending calls' cleanup tasks, held until done (the loop keeps weak refs)


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
    """A typed message: always a query (state token "<3>"), never judged."""

    text: str
    cut_at: float


@dataclass
class _Cancel:
    """CancelAnswer: stop the answer of `turn_id` (0: whatever answer is in flight)."""

    turn_id: int


@dataclass
class _Truncate:
    """TruncateAnswer: the client played only `content` of the answer of `turn_id`."""

    turn_id: int
    content: str


@dataclass
class _End:
    """The client is done: the turn worker lets the last answer finish, then ends the call."""


@dataclass
class _Resumed:
    """Speech came back after a pause: the turn worker discards the answer it started at the pause."""

    segment: int


@dataclass
class Answer:
    """An answer being streamed by the relay task."""

    request_id: str
    turn_id: int
    state_token: str
    started_at: float  # when its query was cut or typed
    usage: Usage
    interrupting: bool  # it interrupted another answer (for the interruption latency metric)
    job: GenerationJob = field(default_factory=GenerationJob)
    tokens_sent: int = 0
    text: list[str] = field(default_factory=list)
    first_token_at: float = 0.0
    task: asyncio.Task | None = None
    # The relay holds the lock while it handles an event; whoever stops it takes the lock and sets `stopped`,
    # so an answer is either finished by the relay or stopped by an interruption, never both.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stopped: bool = False
    done: bool = False
    ended: bool = False  # its AnswerInterrupted went out (`_interrupted`: once)


@dataclass
class _Issued:
    """A generation job this call submitted (or was about to) whose bot turn is not recorded yet."""

    request_id: str
    turn_id: int
    user: SessionTurn
    answer: Answer | None = None


class ConverseCall:
    """One Converse call: `run` turns the client's events into server events."""

    def __init__(self, pools: PoolClient, tokenizer: VitaTokenizer, store: SessionStore, config: OrchestratorConfig,
                 metrics: Metrics) -> None:
        self.pools, self.tokenizer, self.store, self.config, self.metrics = pools, tokenizer, store, config, metrics
        self.state: SessionState | None = None
        self.vad: StreamingVAD | None = None
        self.rate = SAMPLE_RATE
        self._out: asyncio.Queue[ServerEvent | None] = asyncio.Queue()
        self._work: asyncio.Queue[Utterance | TextQuery | Preemption | _Resumed | _Cancel | _Truncate | _End] = (
            asyncio.Queue())
        self.answer: Answer | None = None
        self._preemptive = config.preemptive_generation  # this session's setting (SessionConfig may change it)
        self._pause: Preemption | None = None  # the reader's last pause (it marks it resumed)
        self._preemption: Preemption | None = None  # the turn worker's answer held back until the turn ends
        self._early_query_segment = -1  # a segment already judged a query while being spoken
        self._early_query_turn = 0  # ... and the turn id handed out for it
        self._early_tried: set[int] = set()
        self._playing = False  # the client still plays the last answer (PlaybackState): judge speech early
        self._states = {token_id: piece for piece, token_id in tokenizer.state_ids.items()}
        self.call_id = uuid.uuid4().hex  # the session's owner while this call drives it
        self._turn: int | None = None  # the turn the worker is on, for its error events
        self._issued: dict[str, _Issued] = {}
        self._tasks: list[asyncio.Task] = []
        self._prefills: set[asyncio.Task] = set()  # history prefills on the monitor pool, in flight
        self._heard_audio = False  # the client has sent audio: its speech will be judged
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counted = False  # in the active sessions gauge
        self._cleanup: asyncio.Task | None = None
        self._closing = False
        self._taken_over = False
        self._frames_dropped = 0  # camera frames dropped since the last answered turn
        self._last_frame_s: float | None = None  # the timestamp of the last camera frame this call kept
        # The audio watchdog's view of the reader (loop time, seconds).
        self._vad_lock = asyncio.Lock()  # the VAD is pushed in a thread; the watchdog must not touch it meanwhile
        self._poke = asyncio.Event()  # the reader went idle: the watchdog recomputes its deadline
        self._reader_idle_since: float | None = None  # None while the reader handles an event
        self._audio_runs_out = 0.0  # when the last chunk's audio would end, had it been played in real time

    @property
    def session_id(self) -> str:
        return self.state.session_id if self.state else ""

    # ------------------------------------------------------------------------------------------------------
    # The call

    async def run(self, requests: AsyncIterator[ClientEvent]) -> AsyncIterator[ServerEvent]:
        """Server events until the client ends (or leaves) and the last answer is done; an answer still in flight
        when the call goes away is stopped and kept as interrupted (see `close`)."""
        self.metrics.active_sessions.inc()
        self._counted = True
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._read(requests)), asyncio.create_task(self._turns()),
                       asyncio.create_task(self._watch_audio())]
        try:
            while (event := await self._out.get()) is not None:
                yield event
        finally:
            await asyncio.shield(self.close())

    def close(self) -> asyncio.Task:
        """End the call: the one cleanup, started once, run to its end even if whoever awaits it is cancelled.

        Call it on the call's event loop from anything that learns the call is over (the end of `run`); from
        elsewhere (gRPC's done callback), `close_soon`.
        """
        if self._cleanup is None:
            self._cleanup = asyncio.get_running_loop().create_task(self._end())
            _CLEANUPS.add(self._cleanup)
            self._cleanup.add_done_callback(_CLEANUPS.discard)
        return self._cleanup

    def close_soon(self) -> None:
        """`close` from any thread, once `run` has started (before that there is nothing to clean up)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)

    def close_when_done(self, context: grpc.aio.ServicerContext) -> None:
        """`close_soon` when the RPC ends, however it ends.

        The callback holds the call weakly: gRPC keeps its per-RPC state, callbacks included, in a reference cycle
        (through the request iterator) that only a full garbage collection frees, two collections after the RPC.
        Held strongly, every ended call stayed alive that long with its VAD buffers and tasks. While the RPC runs,
        its handler holds the call, so the callback finds it whenever there is anything to clean up.
        """
        ref = weakref.ref(self)

        def done(_: object) -> None:
            call = ref()
            if call is not None:
                call.close_soon()

        context.add_done_callback(done)

    async def _end(self) -> None:
        """No new generation from here on; the ones issued are cancelled on the bus first (compute stops whatever
        the tasks were doing), then, once the tasks are done, their turns are recorded as interrupted."""
        self._closing = True
        for task in [*self._tasks, *self._prefills]:
            task.cancel()
        try:
            await self._cancel_preemption()
            for request_id in list(self._issued):
                await self.pools.cancel(request_id)
            if tasks := [*self._tasks, *self._prefills]:  # each ends at its next await; the wait only bounds a task
                await asyncio.wait(tasks, timeout=self.config.stop_wait_s)  # that ignores its cancel
            if self.answer is not None:
                await self._stop_relay(self.answer)
            await self._cancel_preemption()  # again: started while the first round went out; never recorded
            for issued in list(self._issued.values()):
                await self.pools.cancel(issued.request_id)  # again: issued while the first round went out
                if not self._taken_over and self.state is not None:
                    await self._record_abandoned(issued)
        except SessionTakenOver:
            pass  # a new call resumed the session meanwhile and recorded the answer from its reply stream
        except Exception:  # the session keeps its active answer; a resume rebuilds it from the reply stream
            log.exception("could not clean up the ended call", extra={"session_id": self.session_id})
        finally:
            if self._counted:
                self.metrics.active_sessions.dec()
            self._tasks = []  # done (or given up on): their frames and a cancelled one's traceback refer to this call

    def emit(self, turn_id: int | None = None, **event) -> None:
        """Queue one ServerEvent for the client; `turn_id` defaults to the turn about to start."""
        if turn_id is None:
            turn_id = self.state.next_turn_id if self.state else 0
        self._out.put_nowait(ServerEvent(session_id=self.session_id, turn_id=turn_id, timestamp_s=time.time(),
                                         **event))

    def error(self, code: grpc.StatusCode, message: str, turn_id: int | None = None) -> None:
        """Errors are events: the client hears of it and the session goes on."""
        self.emit(turn_id, error=ErrorEvent(code=code.value[0], message=message))

    def _lose_session(self) -> None:
        """Another call resumed the session and owns it now: say so, and end this call."""
        if self._taken_over:
            return
        self._taken_over = True
        self.error(grpc.StatusCode.ABORTED, f"session {self.session_id} was resumed by another connection; "
                   "this call ends")
        self._out.put_nowait(None)

    async def _update(self, change) -> SessionState:
        """A session write that holds only while this call owns the session (else SessionTakenOver)."""
        self.state = await self.store.update(self.session_id, change, owner=self.call_id)
        return self.state

    async def _check_owner(self) -> None:
        state = await self.store.load(self.session_id)
        if state.owner != self.call_id:
            raise SessionTakenOver(f"session {self.session_id!r} was resumed by another connection")
        self.state = state

    async def _reserve_turn(self) -> int:
        turn_id, self.state = await self.store.reserve_turn(self.session_id, self.call_id)
        return turn_id

    # ------------------------------------------------------------------------------------------------------
    # Reader: client events, in order

    async def _read(self, requests: AsyncIterator[ClientEvent]) -> None:
        loop = asyncio.get_running_loop()
        self._reader_idle_since = loop.time()
        done = False
        try:
            async for request in requests:
                self._reader_idle_since = None
                if request.WhichOneof("event") == "end":
                    break
                try:
                    await self._on_client_event(request)
                except InvalidInputError as e:
                    self.error(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except SessionNotFound as e:
                    self.error(grpc.StatusCode.NOT_FOUND, str(e))
                except ImageLimitExceeded as e:
                    self.error(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
                except SessionTakenOver:
                    self._lose_session()
                    return
                except VitaError as e:
                    self.error(grpc.StatusCode.FAILED_PRECONDITION, str(e))
                except RedisError as e:  # past the client's retries: this event is lost, the call goes on
                    self.error(grpc.StatusCode.UNAVAILABLE, f"the message bus (Redis) is unreachable: {e}")
                self._reader_idle_since = loop.time()
                self._poke.set()
            done = True
        finally:
            # The client is done: speech still open is cut now. (Not when the call is cancelled instead: nothing
            # would answer that speech, and a VAD push may still be running in its thread.)
            if done and self.vad is not None:
                async with self._vad_lock:
                    events = self.vad.flush()
                for event in events:
                    self._on_speech(event)
            self._work.put_nowait(_End())

    async def _on_client_event(self, request: ClientEvent) -> None:
        """Config first; audio goes through the VAD now, media waits in Redis for the next turn, text is a query."""
        kind = request.WhichOneof("event")
        if kind == "config":
            await self._configure(request.config)
            return
        if kind is None:
            events = ", ".join(f.name for f in ClientEvent.DESCRIPTOR.oneofs_by_name["event"].fields)  # the proto's
            raise InvalidInputError(f"empty client event: set one of {events}")
        if self.state is None:
            raise InvalidInputError(f"{kind} before the session config: the first event must be a SessionConfig")
        if kind == "audio":
            if len(request.audio.pcm16) % 2:  # as Generate's PCM16: a chunk of whole samples, or none of it
                raise InvalidInputError(f"audio chunk: PCM16 audio must have an even number of bytes (whole 16-bit "
                                        f"samples); got {len(request.audio.pcm16)}: the chunk was dropped")
            self._heard_audio = True
            async with self._vad_lock:
                self.vad.answering = self._answering()  # barge-in words count while the assistant speaks
                events = await asyncio.to_thread(self._vad_push, request.audio.pcm16)
            loop_now = asyncio.get_running_loop().time()
            seconds = len(request.audio.pcm16) / 2 / self.rate
            self._audio_runs_out = max(self._audio_runs_out, loop_now) + seconds
            for event in events:
                self._on_speech(event)
        elif kind == "frame":
            frame = request.frame
            if not frame.image.data:
                raise InvalidInputError("camera frame has no image bytes")
            self._check_frame_time(frame.timestamp_s)
            await asyncio.to_thread(_check_image_bytes, frame.image.data, "camera frame",
                                    self.config.limits.max_image_pixels)
            self._frames_dropped += await self.store.add_frame(self.session_id, frame)
            self._last_frame_s = frame.timestamp_s
        elif kind == "image":
            await asyncio.to_thread(_check_image_bytes, request.image.data, "image",
                                    self.config.limits.max_image_pixels)
            await self.store.add_image(self.session_id, request.image)
        elif kind == "text":
            if not request.text.text.strip():
                raise InvalidInputError("text message is empty")
            self.config.limits.check_text(request.text.text, "text message")
            self._work.put_nowait(TextQuery(request.text.text, time.perf_counter()))
        elif kind == "cut":
            for event in self.vad.cut():
                if request.cut.discard and event.kind == "ended":
                    self.emit(speech_ended=SpeechEnded(audio_start_s=event.start_s, audio_end_s=event.end_s))
                    self._resumed(event.segment)  # dropped unheard: an answer started at its pause goes too
                else:
                    self._on_speech(event)
        elif kind == "cancel":
            self._work.put_nowait(_Cancel(request.cancel.turn_id))
        elif kind == "truncate":
            self._work.put_nowait(_Truncate(request.truncate.turn_id, request.truncate.content))
        elif kind == "playback":
            self._playing = request.playback.playing

    async def _configure(self, config: SessionConfig) -> None:
        """Start a new session, or resume a stored one (rebuilding an answer a dead replica left in flight)."""
        rate, vad = self._checked(config)
        if self.state is not None:
            await self._reconfigure(config, rate, vad)
            return
        if config.resume:
            if not config.session_id:
                raise InvalidInputError("resume needs the session_id to continue")
            state = await self._recover(check_id("session id", config.session_id))
            resumed = True
        else:
            session_id = check_id("session id", config.session_id) if config.session_id else uuid.uuid4().hex
            state = await self.store.create(SessionState(session_id=session_id, config=config, next_turn_id=1,
                                                         generator_role=GenerationJob.GENERATOR,
                                                         owner=self.call_id))
            resumed = False
        self.state, self.rate, self.vad = state, rate, StreamingVAD(vad)
        self._preemptive = session_preemptive(self.config.preemptive_generation, config)
        self.vad.report_pauses = self._preemptive
        self.emit(session_started=SessionStarted(resumed=resumed, history_turns=len(state.turns),
                                                 limits=self.config.limits.converse()))
        log.info("session started", extra={"session_id": state.session_id, "resumed": resumed})

    def _check_frame_time(self, t: float) -> None:
        """What the video rule needs of a frame sequence (vita.processing.video.sample_frames), checked per frame on
        arrival: a frame that breaks it would have the vision encoder refuse the whole clip at the next answered
        turn. Timestamps increase over the whole call (a camera's clock), so any frames a turn takes are in order."""
        if not math.isfinite(t) or t < 0:
            raise InvalidInputError(f"camera frame timestamp_s must be a finite number of seconds >= 0; got {t}: the "
                                    "frame was dropped")
        if self._last_frame_s is not None and t <= self._last_frame_s:
            raise InvalidInputError(f"camera frame timestamps must increase: got {t:g} s after {self._last_frame_s:g} "
                                    "s; the frame was dropped")

    def _checked(self, config: SessionConfig) -> tuple[int, VADConfig]:
        """Every field of a SessionConfig checked before anything changes, by the rules Generate applies to the
        fields they share (system prompt, sampling): a bad one creates no session, or leaves the session's config as
        it was. The session's audio rate and VAD."""
        if config.HasField("system_prompt"):
            self.config.limits.check_text(config.system_prompt, "system_prompt")
        check_sampling(config.sampling, "SessionConfig.sampling")
        _check_language(config.language)
        return _audio_rate(config), session_vad(self.config.vad, config)

    async def _reconfigure(self, config: SessionConfig, rate: int, vad: VADConfig) -> None:
        """A later SessionConfig replaces the session's settings; the VAD's stream goes on with the new ones."""
        if config.resume or config.session_id not in ("", self.session_id):
            raise InvalidInputError("the session is already started: a later SessionConfig may only update it "
                                    "(no resume, no other session_id)")
        new = SessionConfig()
        new.CopyFrom(config)
        new.session_id = self.session_id
        await self._update(lambda s: s.config.CopyFrom(new))
        self.rate = rate
        self.vad.set_config(vad)
        self._preemptive = session_preemptive(self.config.preemptive_generation, new)
        self.vad.report_pauses = self._preemptive

    def _vad_push(self, pcm16: bytes) -> list[SpeechEvent]:
        """PCM16 at the session's rate (whole samples: checked on arrival) into the VAD at 16 kHz."""
        if not pcm16:
            return []
        samples = pcm16_to_float(pcm16)
        if self.rate != SAMPLE_RATE:
            samples = resample(samples, self.rate, SAMPLE_RATE)
        return self.vad.push(samples.numpy())

    # ------------------------------------------------------------------------------------------------------
    # Audio watchdog: speech stays open only while audio comes

    def _stall_deadline(self) -> float | None:
        """Loop time at which open speech is ended for lack of audio; None while there is none to end, or while
        the reader is busy (chunks may be waiting behind the event it handles)."""
        if self.vad is None or not self.vad.segment_open or self._reader_idle_since is None:
            return None
        silence_s = self.vad.end_silence_s  # longer while the speech so far sounds unfinished
        return max(self._audio_runs_out, self._reader_idle_since) + silence_s

    async def _watch_audio(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._stall_deadline()
            if deadline is None:
                self._poke.clear()
                await self._poke.wait()
                continue
            if deadline > loop.time():
                await asyncio.sleep(deadline - loop.time())
                continue  # audio may have come meanwhile: the deadline is computed again
            async with self._vad_lock:
                deadline = self._stall_deadline()
                events = self.vad.cut() if deadline is not None and deadline <= loop.time() else []
            for event in events:
                self._on_speech(event)

    def _on_speech(self, event: SpeechEvent) -> None:
        """Tell the client what the VAD heard; segments (and, during an answer, early partial cuts) go to be judged."""
        now = time.perf_counter()
        if event.kind == "started":
            self.emit(speech_started=SpeechStarted(audio_start_s=event.start_s))
        elif event.kind == "partial":
            if self._answering() and event.segment not in self._early_tried and self.config.vad.partial_every_ms:
                self._early_tried.add(event.segment)
                self._work.put_nowait(Utterance(event.audio, event.start_s, event.end_s, event.segment, now, True))
        elif event.kind == "paused":
            if self._preemptive:
                self._pause = Preemption(event.segment, event.audio, event.start_s, event.end_s, cut_at=now)
                self._work.put_nowait(self._pause)
        elif event.kind == "resumed":
            self._resumed(event.segment)
        elif event.kind == "ended":
            self.metrics.vad_segments.inc()
            judged = event.segment == self._early_query_segment  # a query already: its turn is known
            self.emit(self._early_query_turn if judged else None,
                      speech_ended=SpeechEnded(audio_start_s=event.start_s, audio_end_s=event.end_s))
            self._work.put_nowait(Utterance(event.audio, event.start_s, event.end_s, event.segment, now))

    def _resumed(self, segment: int) -> None:
        """The speech of `segment` went on after its pause (or was dropped): an answer started there is stale."""
        if self._pause is not None and self._pause.segment == segment:
            self._pause.resumed = True
            self._pause = None
            self._work.put_nowait(_Resumed(segment))

    def _answering(self) -> bool:
        """An answer streams, or the client still plays one: speech now may be a barge-in."""
        return self.answer is not None or self._playing

    def _barge_in(self, u: Utterance) -> bool:
        """Short speech while the assistant speaks ("stop", "no"): it stops the answer whatever the judgement, if
        it has a vowel's worth of voicing (a click or a burst of hiss that the VAD let through has none)."""
        longest = self.vad.config.barge_in_max_ms / 1000
        return (not u.early and self._answering() and longest > 0 and u.end_s - u.start_s <= longest
                and voiced_seconds(u.audio) >= BARGE_IN_VOICED_S)

    # ------------------------------------------------------------------------------------------------------
    # Turn worker: one utterance or text at a time

    async def _turns(self) -> None:
        """One utterance or text at a time; a failed turn is an error event, the next turn still runs."""
        while True:
            item = await self._work.get()
            if self._preemption is not None and not self._ends_preempted_turn(item):
                await self._discard_preemption("resumed" if isinstance(item, _Resumed) else "another event")
            if isinstance(item, _Resumed):
                continue
            if isinstance(item, Preemption):
                if not await self._preempt_safely(item):
                    return
                continue
            if isinstance(item, _End):
                if self.answer is not None and self.answer.task is not None:
                    await asyncio.wait([self.answer.task])  # our own cancellation still raises here
                self._out.put_nowait(None)
                return
            if isinstance(item, _Cancel | _Truncate):
                try:
                    await self._client_stop(item)
                except SessionTakenOver:
                    self._lose_session()
                    return
                except (InvalidInputError, SessionNotFound) as e:
                    self.error(grpc.StatusCode.INVALID_ARGUMENT, str(e), item.turn_id)
                continue
            self._turn = None
            with trace.use_span(self._turn_span(item), end_on_exit=True) as span:
                span.set_attribute("vita.session_id", self.session_id)
                try:
                    await self._check_owner()
                    if isinstance(item, TextQuery):
                        await self._answer(StateToken.TEXT, item.cut_at, text=item.text)
                    else:
                        await self._utterance(item)
                except SessionTakenOver:
                    self._lose_session()
                    return
                except (InvalidInputError, ContextLengthError) as e:
                    self.error(grpc.StatusCode.INVALID_ARGUMENT, str(e), self._turn)
                except SessionNotFound as e:
                    self.error(grpc.StatusCode.NOT_FOUND, str(e), self._turn)
                except Backpressure as e:
                    self.error(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), self._turn)
                except ReplyTimeout as e:
                    self.error(grpc.StatusCode.UNAVAILABLE, str(e), self._turn)
                except JobFailed as e:
                    self.error(e.code, str(e), self._turn)
                except VitaError as e:
                    self.error(grpc.StatusCode.FAILED_PRECONDITION, str(e), self._turn)
                except RedisError as e:
                    self.error(grpc.StatusCode.UNAVAILABLE, f"the message bus (Redis) is unreachable: {e}", self._turn)
                except Exception:
                    log.exception("turn failed", extra={"session_id": self.session_id})
                    self.error(grpc.StatusCode.INTERNAL, "the orchestrator failed on this turn", self._turn)
                if self._turn is not None:
                    span.set_attribute("vita.turn_id", self._turn)

    def _turn_span(self, item: object) -> trace.Span:
        """The turn's span: the one its head start opened at the pause (preemptive.py), else a new one."""
        p = self._preemption
        if p is not None and p.span is not None and self._ends_preempted_turn(item):
            span, p.span = p.span, None
            return span
        return tracer.start_span("converse turn")

    async def _utterance(self, u: Utterance) -> None:
        """Judge speech: a query is answered (an early one first interrupts, the whole segment is answered at its
        end); anything else is ignored, and an early cut that is not decisive waits for the whole segment. A
        segment preempted at its pause takes the judgement and the answer made then, when they still stand."""
        preempted = None if u.early else await self._take_preemption(u.segment)
        if not u.early and u.segment == self._early_query_segment:
            self._early_query_segment = -1  # judged a query while spoken: answer the whole of it, as its turn
            self._turn = self._early_query_turn
            if preempted is None or not await self._release(preempted, self._early_query_turn, u.cut_at):
                await self._answer(StateToken.QUERY_AUDIO, u.cut_at, audio=await self._encode_audio(u.audio),
                                   turn_id=self._early_query_turn)
            return
        if u.early and self.answer is None and not self._playing:
            return  # the answer it might interrupt finished meanwhile; the whole segment is judged at its end
        if preempted is not None:
            audio, token = preempted.speech, preempted.token
            latency = preempted.judged_at - preempted.cut_at  # judged at the pause, before the turn ended
        else:
            audio = await self._encode_audio(u.audio)
            token = await self._judge(audio)
            latency = time.perf_counter() - u.cut_at
        query = token == StateToken.QUERY_AUDIO.value
        barge_in = not query and self._barge_in(u)
        self.metrics.utterances_judged.labels("query" if query else "barge_in" if barge_in else "ignored",
                                              str(u.early).lower()).inc()
        if u.early and not query:
            return  # not decisive: the whole segment is judged when it ends
        outcome = UtteranceJudged.QUERY if query else UtteranceJudged.BARGE_IN if barge_in else UtteranceJudged.IGNORED
        judged = UtteranceJudged(outcome=outcome, state_token=token, early=u.early, audio_start_s=u.start_s,
                                 audio_end_s=u.end_s, latency_s=latency)
        if not query:
            self.emit(self.answer.turn_id if barge_in and self.answer else None, judged=judged)
            if barge_in:  # nothing waits to be answered: the roles stay (like a client's cancel)
                await self._interrupt(u.cut_at, swap=False, barge_in=True)
            return
        self._turn = turn_id = await self._reserve_turn()  # the turn that will answer it, whatever comes between
        self.emit(turn_id, judged=judged)
        if u.early:
            self._early_query_segment, self._early_query_turn = u.segment, turn_id
            await self._interrupt(u.cut_at)
            return
        if preempted is None or not await self._release(preempted, turn_id, u.cut_at):
            await self._answer(StateToken.QUERY_AUDIO, u.cut_at, audio=audio, turn_id=turn_id)

    async def _encode_audio(self, samples: np.ndarray) -> EmbeddingRef:
        audio = Audio(data=float_to_pcm16(samples), encoding=Audio.PCM16, sample_rate_hz=SAMPLE_RATE)
        return (await self.pools.encode(self._encode_id(), audio=[audio]))["audio"]

    def _encode_id(self) -> str:
        return unique_id(self.session_id, "enc")

    async def _judge(self, audio: EmbeddingRef) -> str:
        """The monitor-role pool reads history + the new speech and answers one token: its state token."""
        answering = "".join(self.answer.text) if self.answer is not None else None
        prompt = judge_prompt(self.tokenizer, self.state.turns, audio, answering=answering, **self._prompt_args())
        request_id = unique_id(self.session_id, "judge")
        token_id = await self.pools.judge(request_id, _OTHER_ROLE[self.state.generator_role], prompt)
        if token_id is None:
            return ""
        return self._states.get(token_id) or self.tokenizer.decode([token_id])

    def _prompt_args(self) -> dict:
        config = self.state.config
        return {"system": config.system_prompt if config.HasField("system_prompt") else None,
                "context_len": self.pools.context_len}

    # ------------------------------------------------------------------------------------------------------
    # Answers, interruption, history

    async def _answer(self, state: StateToken, cut_at: float, *, text: str = "",
                      audio: EmbeddingRef | None = None, turn_id: int | None = None) -> None:
        """A query: interrupt the answer in flight (roles swap), then answer with the whole history.

        `turn_id` is the one handed out when the query was decided (a new one for text). Images and camera frames
        sent since the last turn are encoded now and become part of this user turn.
        """
        interrupted = self.answer is not None
        if interrupted:
            await self._interrupt(cut_at)
        if turn_id is None:
            self._turn = turn_id = await self._reserve_turn()
        images, frames = await self.store.take_media(self.session_id)
        frames_dropped, self._frames_dropped = self._frames_dropped, 0
        user, prompt = await self._draft(state, text, audio, images, frames, turn_id)
        request_id = unique_id(self.session_id, f"t{turn_id}")  # new per answer: a retried turn is a new job
        if self._closing:  # the call is ending: issue nothing the cleanup could miss
            raise asyncio.CancelledError
        issued = self._issued[request_id] = _Issued(request_id, turn_id, user)
        try:
            job = await self.pools.generate(request_id, self.state.generator_role, prompt, self.state.config.sampling)
        except Exception:
            del self._issued[request_id]
            await self.pools.cancel(request_id)  # it may have been queued: nobody would read it
            raise
        await self._start(issued, prompt, job, cut_at, interrupted=interrupted, frames_dropped=frames_dropped)

    async def _draft(self, state: StateToken, text: str, audio: EmbeddingRef | None, images: list[Image],
                     frames: list[TimestampedFrame], turn_id: int) -> tuple[SessionTurn, Prompt]:
        """The user turn (its images and frames encoded now, the speech already) and the prompt of its answer."""
        video = Video(frames=Video.Frames(frames=frames)) if frames else None
        refs = await self.pools.encode(self._encode_id(), images=images, video=video)  # {} when there is none
        if audio is not None:
            refs["audio"] = audio
        user = user_turn(text, refs, turn_id=turn_id, state=state, unix_s=time.time())
        return user, answer_prompt(self.tokenizer, self.state.turns, user, state, **self._prompt_args())

    async def _start(self, issued: _Issued, prompt: Prompt, job: GenerationJob, cut_at: float, *,
                     interrupted: bool, frames_dropped: int) -> None:
        """The generation `issued` becomes the turn's answer: the user turn and the answer in flight go to history,
        then the relay streams its tokens to the client (those the generator made already, at once)."""
        request_id, turn_id, user = issued.request_id, issued.turn_id, issued.user

        def record(s: SessionState) -> None:
            s.turns.append(user)
            s.next_turn_id = max(s.next_turn_id, turn_id + 1)
            s.active.CopyFrom(ActiveAnswer(request_id=request_id, turn_id=turn_id, state_token=user.state_token,
                                           role=job.role))

        try:
            await self._update(record)
        except Exception:
            del self._issued[request_id]
            await self.pools.cancel(request_id)  # nobody would read it
            raise
        answer = Answer(request_id, turn_id, user.state_token, cut_at, prompt.usage(), interrupted, job)
        self.answer = issued.answer = answer
        self.emit(turn_id, answer_started=AnswerStarted(
            state_token=user.state_token, max_tokens=job.max_tokens, history_turns_dropped=prompt.turns_dropped,
            frames_dropped=frames_dropped))
        answer.task = asyncio.create_task(self._relay(answer, job.reply_stream))

    async def _relay(self, answer: Answer, reply_stream: str) -> None:
        """Stream the generator's tokens to the client until it finishes, fails, times out or is stopped."""
        try:
            async for event in self.pools.tokens(reply_stream):
                async with answer.lock:
                    if answer.stopped:
                        return
                    if await self._relay_event(answer, event):
                        return
        except SessionTakenOver:
            self._lose_session()
        except Exception as e:  # never leave the client waiting on an answer nobody relays any more
            if isinstance(e, ReplyTimeout | RedisError):
                code, message = grpc.StatusCode.UNAVAILABLE, str(e)
            elif isinstance(e, SessionNotFound):  # Redis lost it (restarted without its data), or it expired
                code, message = grpc.StatusCode.NOT_FOUND, str(e)
            else:
                log.exception("relay failed", extra={"session_id": self.session_id})
                code, message = grpc.StatusCode.INTERNAL, "the orchestrator failed relaying this answer"
            try:
                async with answer.lock:
                    if not answer.stopped and not answer.done:
                        await self._fail(answer, code, message, cancel=True)
            except SessionTakenOver:
                self._lose_session()

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
            finished = event.finished
            if finished.finish_reason == Completed.CANCELLED:  # stopped by someone else (deadline, a resume)
                await self._finish(answer, answer.tokens_sent, interrupted=True)
                self._interrupted(answer, finished.usage.completion_tokens)
                return True
            await self._finish(answer, finished.usage.completion_tokens, interrupted=False)
            answer.usage.completion_tokens = finished.usage.completion_tokens
            first = answer.first_token_at - answer.started_at if answer.first_token_at else 0.0
            total = time.perf_counter() - answer.started_at
            self.emit(answer.turn_id, completed=AnswerCompleted(
                usage=answer.usage, finish_reason=self.pools.finish_reason(answer.job, finished),
                timings=Timings(queue_s=queue_seconds(first, total, finished.timings), time_to_first_token_s=first,
                                total_s=total)))
            return True
        if kind == "error":
            await self._fail(answer, job_status(event.error.code), event.error.message, cancel=False)
            return True
        return False

    async def _fail(self, answer: Answer, code: grpc.StatusCode, message: str, *, cancel: bool) -> None:
        """An answer that failed after its AnswerStarted: the error (with its turn id), then its end, an
        AnswerInterrupted (the history keeps what the client received, marked interrupted), so that every
        AnswerStarted ends with AnswerCompleted or AnswerInterrupted and no client waits for an end that never
        comes. `cancel`: the generation may still run (the relay gave up on it)."""
        self.error(code, message, answer.turn_id)
        try:
            if cancel:
                await self.pools.cancel(answer.request_id)
            await self._finish(answer, answer.tokens_sent, interrupted=True)
        except (SessionNotFound, RedisError):  # nowhere to record the answer; the client is told all the same
            answer.done = True
            self._issued.pop(answer.request_id, None)
            if self.answer is answer:
                self.answer = None
        self._interrupted(answer, answer.tokens_sent)

    def _interrupted(self, answer: Answer, generated: int, stop_latency_s: float = 0.0) -> None:
        """The answer's AnswerInterrupted, sent once whatever stopped it (a failure, then a retry, sends one)."""
        if answer.ended:
            return
        answer.ended = True
        usage = Usage()
        usage.CopyFrom(answer.usage)
        usage.completion_tokens = generated
        self.emit(answer.turn_id, interrupted=AnswerInterrupted(
            tokens_sent=answer.tokens_sent, tokens_generated=generated, stop_latency_s=stop_latency_s, usage=usage))

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

        await self._update(record)
        answer.done = True
        self._issued.pop(answer.request_id, None)
        if self.answer is answer:
            self.answer = None
        self._prefill_history()

    def _prefill_history(self) -> None:
        """The history just grew (an answer ended) or changed (a truncate): have the monitor-role pool prefill it, so
        that the next judgement, whose prompt starts with it (`judge_prefix_prompt`), finds it in its prefix cache
        and computes only the new speech, and judging stays as fast at turn 20 as at turn 1. In the background: a
        prefill that fails or is slow delays nothing; the judgement then computes the history itself."""
        if (not self.config.prefill_monitor_history or not self._heard_audio or self._closing or self.state is None
                or not self.state.turns or self.state.turns[-1].role != SessionTurn.BOT):
            return
        task = asyncio.create_task(self._prefill(self.state))
        self._prefills.add(task)
        task.add_done_callback(self._prefills.discard)

    async def _prefill(self, state: SessionState) -> None:
        role = _OTHER_ROLE[state.generator_role]  # the pool that judges the next speech
        pool = ROLE_POOLS[role].value
        try:
            prompt = judge_prefix_prompt(self.tokenizer, state.turns, **self._prompt_args())
            await self.pools.prefill(unique_id(self.session_id, "prefill"), role, prompt)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the next judgement computes the history itself
            self.metrics.history_prefills.labels(pool, "failed").inc()
            log.warning("history prefill failed; the next judgement computes the history itself",
                        extra={"session_id": self.session_id, "pool": pool, "error": f"{type(e).__name__}: {e}"})
            return
        self.metrics.history_prefills.labels(pool, "done").inc()

    async def _interrupt(self, cut_at: float, *, swap: bool = True, barge_in: bool = False) -> None:
        """Stop the relay first (nothing more reaches the client), then the generator's compute; roles swap
        (unless the client or a barge-in word stopped it: then no query is waiting for the other role to answer)."""
        answer = self.answer
        if answer is None or not await self._stop_relay(answer):
            return  # it finished meanwhile: nothing to interrupt
        try:
            await self.pools.cancel(answer.request_id)
            await self._finish(answer, answer.tokens_sent, interrupted=True, swap=swap)
            generated = await self.pools.stopped(answer.request_id)
        except Exception:  # the answer is stopped all the same: the client hears of its end (the error follows)
            self._interrupted(answer, answer.tokens_sent)
            raise
        stop_latency = time.perf_counter() - cut_at
        if swap or barge_in:
            self.metrics.interruption_latency.labels("generator_stopped").observe(stop_latency)
        self._interrupted(answer, generated, stop_latency)

    async def _client_stop(self, item: _Cancel | _Truncate) -> None:
        """CancelAnswer / TruncateAnswer: stop the answer (if it is the one meant), then cut its stored text."""
        answer = self.answer
        if answer is not None and (not item.turn_id or answer.turn_id == item.turn_id):
            await self._interrupt(time.perf_counter(), swap=False)
        if isinstance(item, _Cancel):
            return
        tokens = len(self.tokenizer.encode(item.content)) if item.content else 0

        def record(s: SessionState) -> None:
            turn = next((t for t in s.turns if t.role == SessionTurn.BOT and t.turn_id == item.turn_id), None)
            if turn is None:
                raise InvalidInputError(f"truncate: turn {item.turn_id} has no answer")
            if not turn.content.startswith(item.content):
                raise InvalidInputError(f"truncate: the content is not a prefix of turn {item.turn_id}'s answer")
            if turn.content != item.content:
                turn.content, turn.tokens, turn.interrupted = item.content, tokens, True

        await self._update(record)
        self.emit(item.turn_id, truncated=AnswerTruncated(content=item.content, tokens=tokens))
        self._prefill_history()

    async def _stop_relay(self, answer: Answer) -> bool:
        """Nothing more of `answer` reaches the client after this; False if it had already finished."""
        async with answer.lock:
            if answer.done:
                return False
            answer.stopped = True
        if answer.task is not None and answer.task is not asyncio.current_task():
            answer.task.cancel()
            await asyncio.wait([answer.task])  # unlike awaiting it, never swallows our own cancellation
        return True

    async def _record_abandoned(self, issued: _Issued) -> None:
        """The call ended with this generation unfinished: its turn goes to history as interrupted, with what the
        client received (nothing, if it never started), whether or not the user turn was written before."""
        answer = issued.answer
        bot = SessionTurn(role=SessionTurn.BOT, turn_id=issued.turn_id, state_token=issued.user.state_token,
                          content="".join(answer.text) if answer else "", interrupted=True,
                          tokens=answer.tokens_sent if answer else 0, unix_s=time.time())

        def record(s: SessionState) -> None:
            if s.HasField("active") and s.active.request_id == issued.request_id:
                s.ClearField("active")
            mine = [t for t in s.turns if t.turn_id == issued.turn_id]
            if any(t.role == SessionTurn.BOT for t in mine):
                return  # recorded meanwhile
            if not mine:
                s.turns.append(issued.user)
            s.turns.append(bot)

        await self._update(record)
        self._issued.pop(issued.request_id, None)
        if answer is not None:
            answer.done = True

    async def _recover(self, session_id: str) -> SessionState:
        """Resume: this call takes the session over; an answer left in flight (by a replica that died, or by the
        call that had the session) is rebuilt from its reply stream."""
        state = await self.store.claim(session_id, self.call_id)
        if not state.HasField("active"):
            return state
        active = state.active
        text, finished, tokens = [], False, 0
        for event in await self.pools.replay(active.request_id):
            kind = event.WhichOneof("event")
            if kind == "delta":
                text.append(event.delta.text)
                tokens += len(event.delta.token_ids)
            elif kind == "finished":
                finished = event.finished.finish_reason != Completed.CANCELLED
                tokens = event.finished.usage.completion_tokens
        if not finished:
            await self.pools.cancel(active.request_id)
        turn = SessionTurn(role=SessionTurn.BOT, turn_id=active.turn_id, content="".join(text),
                           state_token=active.state_token, interrupted=not finished, tokens=tokens, unix_s=time.time())

        def record(s: SessionState) -> None:
            if s.HasField("active") and s.active.request_id == active.request_id:
                s.ClearField("active")
                s.turns.append(turn)

        try:
            return await self.store.update(session_id, record, owner=self.call_id)
        except SessionTakenOver:  # resumed again meanwhile: that call recovers it; this one hears at its first turn
            return state


    # ------------------------------------------------------------------------------------------------------
    # Preemptive generation (preemptive.py): the answer starts at the pause, the end of the turn releases it

    async def _preempt_safely(self, p: Preemption) -> bool:
        """`_preempt`; a failure only costs the head start (the turn is answered when it ends, and a real problem
        is reported then). False when the session was taken over: the turn worker ends."""
        p.span = tracer.start_span("converse turn", attributes={"vita.session_id": self.session_id})
        try:
            with trace.use_span(p.span, end_on_exit=False):
                await self._check_owner()
                await self._preempt(p)
        except SessionTakenOver:
            _end_preemption_span(p, "session taken over")
            self._lose_session()
            return False
        except Exception:
            log.warning("preemptive generation failed; the turn is answered when it ends", exc_info=True,
                        extra={"session_id": self.session_id})
            await self._discard_preemption("failed")
        if self._preemption is not p:
            _end_preemption_span(p, "not started")
        return True

    async def _preempt(self, p: Preemption) -> None:
        """The speech paused: judge it and queue its answer now, held back until the turn ends. Only when no answer
        is in flight (one that streams is stopped by a judged query first: early judging does that mid-speech)."""
        if p.resumed or self.answer is not None or self._closing:
            return
        self._preemption = p
        p.snapshot(self.state)
        p.speech = await self._encode_audio(p.audio)
        if p.resumed:
            return
        early = p.segment == self._early_query_segment  # judged a query while spoken: no second judgement
        p.token = StateToken.QUERY_AUDIO.value if early else await self._judge(p.speech)
        p.judged_at = time.perf_counter()
        if not p.query or p.resumed:
            return
        p.images, p.frames = await self.store.peek_media(self.session_id)
        p.user, p.prompt = await self._draft(StateToken.QUERY_AUDIO, "", p.speech, p.images, p.frames, 0)
        if p.resumed or self._closing:
            return
        p.request_id = unique_id(self.session_id, "pre")  # the cleanup cancels it from here on
        p.job = await self.pools.generate(p.request_id, p.state.generator_role, p.prompt, p.state.config.sampling)
        self.metrics.preemptive_answers.labels("started").inc()

    def _ends_preempted_turn(self, item: object) -> bool:
        """What a held-back answer waits for: the end of its own segment. Anything else discards it."""
        return isinstance(item, Utterance) and not item.early and item.segment == self._preemption.segment

    async def _take_preemption(self, segment: int) -> Preemption | None:
        """The preemption of the turn that just ended in `segment`, if it still stands (else it is discarded).
        One with an answer stays the call's (its cleanup cancels it) until `_release` makes it the turn's."""
        p = self._preemption
        if p is None:
            return None
        reason = discard_reason(p, segment=segment, state=self.state)
        if reason is not None:
            await self._discard_preemption(reason)
            return None
        if not p.query:
            self._preemption = None  # a judgement only: nothing runs
        return p

    async def _release(self, p: Preemption, turn_id: int, cut_at: float) -> bool:
        """The turn ended as `p` assumed: its answer becomes the answer of `turn_id`. False (and it is discarded)
        when the images or frames waiting changed since it started: the turn is then answered afresh."""
        if self._closing:
            raise asyncio.CancelledError
        if not await self.store.take_media_if(self.session_id, p.images, p.frames):
            await self._discard_preemption("media changed")
            return False
        frames_dropped, self._frames_dropped = self._frames_dropped, 0
        p.user.turn_id = turn_id
        issued = self._issued[p.request_id] = _Issued(p.request_id, turn_id, p.user)
        self._preemption = None  # the call's as an issued answer now: recorded as interrupted if the call ends
        self.metrics.preemptive_answers.labels("released").inc()
        await self._start(issued, p.prompt, p.job, cut_at, interrupted=False, frames_dropped=frames_dropped)
        return True

    async def _discard_preemption(self, reason: str) -> None:
        """Drop the answer started at a pause: cancelled on the generator; the client and the history never saw it."""
        p = self._preemption
        if p is None:
            return
        try:
            if p.request_id:
                self.metrics.preemptive_answers.labels("discarded").inc()
                await self.pools.cancel(p.request_id)
        except RedisError:  # past the client's retries; the generation stops at its max_tokens
            log.warning("could not cancel a discarded preemptive answer", exc_info=True,
                        extra={"session_id": self.session_id})
        if self._preemption is p:
            self._preemption = None
        _end_preemption_span(p, reason)
        log.debug("preemptive answer discarded: %s", reason, extra={"session_id": self.session_id})

    async def _cancel_preemption(self) -> None:
        """The call ends: an answer held back is cancelled and, unlike an issued one, never recorded."""
        if self._preemption is not None:
            _end_preemption_span(self._preemption, "call ended")
            if self._preemption.request_id:
                await self.pools.cancel(self._preemption.request_id)


def _end_preemption_span(p: Preemption, reason: str) -> None:
    """A head start that does not become its turn: its span ends under its own name, with the reason."""
    if p.span is not None:
        p.span.update_name("converse preemptive turn")
        p.span.set_attribute("vita.preemption_discarded", reason)
        p.span.end()
        p.span = None


def _audio_rate(config: SessionConfig) -> int:
    rate = config.audio_sample_rate_hz or SAMPLE_RATE
    if not 8_000 <= rate <= 48_000:
        raise InvalidInputError(f"audio_sample_rate_hz must be 8000..48000 (or 0 for 16000); got {rate}")
    return rate


_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*")


def _check_language(tag: str) -> None:
    """SessionConfig.language: empty, or shaped like a BCP-47 tag (subtags of 1-8 letters or digits joined by
    hyphens, the first letters only; at most 64 characters). Informational, so not looked up in any registry."""
    if tag and (len(tag) > 64 or not _LANGUAGE_TAG.fullmatch(tag)):
        raise InvalidInputError(f"SessionConfig.language must be a BCP-47 language tag such as 'en' or 'zh-CN', or "
                                f"empty; got {tag[:64]!r}")


def _check_image_bytes(data: bytes, what: str, max_pixels: int) -> None:
    """Refused here, before it is stored: a bad frame must not fail a later turn."""
    try:
        load_image(data, max_pixels=max_pixels)
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None
