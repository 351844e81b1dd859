"""A small blocking client for product backends: build a request from files or bytes, stream the answer.

    with VitaClient("127.0.0.1:50051") as client:
        for text in client.stream_text("What is in the picture?", images=["cat.jpg"]):
            print(text, end="", flush=True)
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from opentelemetry import propagate

from vita.grpc_server import MAX_MESSAGE_BYTES
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import Completed, GenerateRequest, GenerateResponse
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


class VitaClient:
    def __init__(self, target: str = "127.0.0.1:50051", *, timeout_s: float | None = 120.0) -> None:
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self.stub = assistant_pb2_grpc.AssistantStub(self.channel)

    def __enter__(self) -> VitaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, request: GenerateRequest) -> Iterator[GenerateResponse]:
        """The raw response stream; closing the iterator early cancels the call (and the server's compute)."""
        metadata: dict[str, str] = {}
        propagate.inject(metadata)  # W3C trace context, when the caller has a span
        call = self.stub.Generate(request, timeout=self.timeout_s, metadata=tuple(metadata.items()))
        try:
            yield from call
        finally:
            call.cancel()

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
