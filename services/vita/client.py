"""A small blocking client for product backends: build a request from files or bytes, stream the answer.

    with VitaClient("127.0.0.1:50051") as client:
        for text in client.stream_text("What is in the picture?", images=["cat.jpg"]):
            print(text, end="", flush=True)
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
from opentelemetry import propagate

from vita.runtime.server import MAX_MESSAGE_BYTES
from vita.runtime.tls import channel_credentials
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import (
    AudioChunk,
    ClientEvent,
    Completed,
    EndOfInput,
    GenerateRequest,
    GenerateResponse,
    ModelMetadataRequest,
    ModelMetadataResponse,
    ServerEvent,
    SessionConfig,
    TextMessage,
    VadParams,
)
from vita.v1.media_pb2 import Audio, Image, SamplingParams, TimestampedFrame

Media = bytes | str | Path


def _read(source: Media) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def build_request(
    text: str = "",
    *,
    images: Sequence[Media] = (),
    video: Media | Sequence[tuple[float, Media]] | None = None,
    audio: Sequence[Media] = (),
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    system_prompt: str | None = None,
    request_id: str | None = None,
) -> GenerateRequest:
    """Files are read here; audio is WAV (any rate), video a file or (timestamp_s, image) frames."""
    request = GenerateRequest(
        request_id=request_id or uuid.uuid4().hex, text=text,
        images=[Image(data=_read(i)) for i in images],
        audio=[Audio(data=_read(a), encoding=Audio.WAV) for a in audio],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
    )
    if system_prompt is not None:
        request.system_prompt = system_prompt
    if isinstance(video, bytes | str | Path):
        request.video.file = _read(video)
    elif video is not None:
        request.video.frames.frames.extend(TimestampedFrame(timestamp_s=t, image=Image(data=_read(f)))
                                           for t, f in video)
    return request


def speech_events(samples: Sequence[float] | object, *, rate: int = 16000, chunk_ms: int = 20,
                  realtime: bool = True, trailing_silence_s: float = 0.8) -> Iterator[ClientEvent]:
    """Float samples in [-1, 1] as PCM16 AudioChunk events, paced like a microphone when `realtime`.

    Trailing silence lets the server's voice-activity detection see the end of the last utterance.
    """
    import numpy as np

    from vita.processing.audio import float_to_pcm16  # imported here: the client's import stays light

    array = np.concatenate([np.asarray(samples, dtype=np.float32), np.zeros(round(trailing_silence_s * rate),
                                                                               dtype=np.float32)])
    pcm = float_to_pcm16(array)
    step = max(1, round(rate * chunk_ms / 1000)) * 2
    start = time.perf_counter()
    for k, offset in enumerate(range(0, len(pcm), step)):
        if realtime:
            time.sleep(max(0.0, start + k * chunk_ms / 1000 - time.perf_counter()))
        yield ClientEvent(audio=AudioChunk(pcm16=pcm[offset:offset + step]))


def session_config(*, session_id: str = "", resume: bool = False, rate: int = 16000, max_tokens: int = 0,
                   temperature: float = 0.0, ignore_eos: bool = False, early_judge_ms: int = 0,
                   system_prompt: str | None = None) -> ClientEvent:
    config = SessionConfig(session_id=session_id, resume=resume, audio_sample_rate_hz=rate,
                           sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                   ignore_eos=ignore_eos),
                           vad=VadParams(early_judge_ms=early_judge_ms))
    if system_prompt is not None:
        config.system_prompt = system_prompt
    return ClientEvent(config=config)


def text_event(text: str) -> ClientEvent:
    return ClientEvent(text=TextMessage(text=text))


def image_event(image: Media) -> ClientEvent:
    return ClientEvent(image=Image(data=_read(image)))


END = ClientEvent(end=EndOfInput())


class VitaClient:
    """`token`: the bearer token of a server started with `--api-tokens` (sent as `authorization` metadata).
    `tls`: connect over TLS, trusting `tls_ca` (default: the system's roots); `tls_cert` + `tls_key` are this
    client's certificate for a server that requires mutual TLS (`--tls-client-ca`)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout_s: float | None = 120.0,
                 token: str | None = None, tls: bool = False, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> None:
        self.timeout_s = timeout_s
        self.token = token
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if tls or tls_ca is not None or tls_cert is not None:
            self.channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = assistant_pb2_grpc.AssistantStub(self.channel)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, and W3C trace context when the caller has a span."""
        metadata: dict[str, str] = {}
        propagate.inject(metadata)
        if self.token:
            metadata["authorization"] = f"Bearer {self.token}"
        return tuple(metadata.items())

    def __enter__(self) -> VitaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, request: GenerateRequest) -> Iterator[GenerateResponse]:
        """The raw response stream; closing the iterator early cancels the call (and the server's compute)."""
        call = self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata())
        try:
            yield from call
        finally:
            call.cancel()

    def converse(self, events: Iterable[ClientEvent], *, timeout_s: float | None = None) -> Iterator[ServerEvent]:
        """A duplex session: `events` is sent as it is produced (e.g. `speech_events` in real time), server events
        arrive meanwhile. Start with `session_config(...)`; end with `END` to hear the last answer out."""
        call = self.stub.Converse(iter(events), timeout=timeout_s, metadata=self.metadata())
        try:
            yield from call
        finally:
            call.cancel()

    def model_metadata(self, name: str = "") -> ModelMetadataResponse:
        """What the server serves: the model, its context length and max_tokens, the modalities it takes and the
        input limits it enforces (`Assistant/ModelMetadata`; `name`: empty, or the served model's)."""
        return self.stub.ModelMetadata(ModelMetadataRequest(name=name), timeout=self.timeout_s,
                                       metadata=self.metadata())

    def stream_text(self, text: str = "", **kwargs) -> Iterator[str]:
        """Text deltas only; see `build_request` for the arguments."""
        for response in self.generate(build_request(text, **kwargs)):
            if response.HasField("delta") and response.delta.text:
                yield response.delta.text

    def ask(self, text: str = "", **kwargs) -> tuple[str, Completed]:
        """The whole answer and its completion record (usage, timings, finish reason)."""
        parts, completed = [], Completed()
        for response in self.generate(build_request(text, **kwargs)):
            if response.HasField("delta"):
                parts.append(response.delta.text)
            else:
                completed = response.completed
        return "".join(parts), completed


class ConverseSession:
    """An interactive Converse call: `send` client events whenever you like, `wait` for server events.

    A thread reads the server's events into a queue, so a script (the demo, a test, a benchmark) can react to
    them, e.g. start speaking again when an answer starts. Use as a context manager; `close` sends END and reads
    the call to its end.
    """

    def __init__(self, client: VitaClient, config: ClientEvent | None = None,
                 on_event: Callable[[ServerEvent], None] | None = None) -> None:
        self._outbox: queue.Queue[ClientEvent | None] = queue.Queue()
        self._inbox: queue.Queue[ServerEvent | BaseException | None] = queue.Queue()
        self.events: list[ServerEvent] = []  # everything received so far, in order
        self.on_event = on_event
        self._call = client.stub.Converse(iter(self._outbox.get, None), timeout=None, metadata=client.metadata())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send(config or session_config())
        self.session_id = self.wait("session_started").session_id

    def _read(self) -> None:
        try:
            for event in self._call:
                self._inbox.put(event)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self._inbox.put(e)
        finally:
            self._inbox.put(None)

    def send(self, *events: ClientEvent) -> None:
        for event in events:
            self._outbox.put(event)

    def stream(self, events: Iterable[ClientEvent]) -> None:
        """Send an iterable (e.g. real-time `speech_events`) from a thread, so waiting can go on meanwhile."""
        def pump() -> None:
            for event in events:  # one at a time, as the iterable paces them
                self._outbox.put(event)

        threading.Thread(target=pump, daemon=True).start()

    def wait(self, kind: str | tuple[str, ...], *, turn_id: int | None = None, timeout_s: float = 60.0,
             where: Callable[[ServerEvent], bool] | None = None) -> ServerEvent:
        """The next event of `kind` (a ServerEvent oneof name, or a tuple of them: any) matching the filters;
        earlier ones are kept."""
        kinds = (kind,) if isinstance(kind, str) else kind
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind} event within {timeout_s:g} s; got "
                                   f"{[e.WhichOneof('event') for e in self.events[-10:]]}")
            try:
                event = self._inbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                self._inbox.put(None)  # keep reporting the end
                raise EOFError(f"the call ended before a {kind} event")
            if isinstance(event, BaseException):
                raise event
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)
            if event.WhichOneof("event") in kinds and (turn_id is None or event.turn_id == turn_id) \
                    and (where is None or where(event)):
                return event

    def of(self, kind: str, turn_id: int | None = None) -> list[ServerEvent]:
        return [e for e in self.events if e.WhichOneof("event") == kind and (turn_id is None or e.turn_id == turn_id)]

    def answer_text(self, turn_id: int) -> str:
        return "".join(e.delta.text for e in self.of("delta", turn_id))

    def close(self, timeout_s: float = 60.0) -> list[ServerEvent]:
        """END, then every remaining event until the server ends the call."""
        self.send(END)
        self._outbox.put(None)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                event = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if event is None:
                return self.events
            if isinstance(event, BaseException):
                raise event
            self.events.append(event)
            if self.on_event is not None:
                self.on_event(event)
        self._call.cancel()
        raise TimeoutError(f"the call did not end within {timeout_s:g} s of END")

    def cancel(self) -> None:
        self._outbox.put(None)
        self._call.cancel()

    def __enter__(self) -> ConverseSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
