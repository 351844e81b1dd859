"""`vita.v1.Assistant`: the public API. Generate fans media out to the encoder pools, builds the prompt from the
token counts they report, dispatches it to the generator pool and relays the token stream.

The orchestrator holds no model weights: only the config (context length, media rules) and the tokenizer. All
per-request state lives in Redis (the reply stream), so any replica can serve any request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from redis.asyncio import Redis

from vita.bus.cancel import cancel
from vita.bus.queue import Backpressure, submit
from vita.bus.replies import ReplyTimeout, events
from vita.bus.streams import BusConfig, Pool, check_id
from vita.bus.trace import current_trace_context
from vita.errors import ContextLengthError, InvalidInputError
from vita.model.config import VitaConfig
from vita.orchestrator.converse import ConverseCall, ConverseConfig
from vita.orchestrator.sessions import SessionStore
from vita.processing.processor import with_placeholders
from vita.processing.prompt import Message, Span, encode_prompt
from vita.processing.tokenizer import VitaTokenizer
from vita.telemetry.metrics import Metrics
from vita.telemetry.tracing import extract_context
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import (
    ClientEvent,
    Completed,
    GenerateRequest,
    GenerateResponse,
    ServerEvent,
    Timings,
    Usage,
)
from vita.v1.bus_pb2 import EmbeddingPlacement, EmbeddingRef, EncodeJob, GenerationJob, JobError, MediaItem

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_STATUS = {
    JobError.CANCELLED: grpc.StatusCode.CANCELLED,
    JobError.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    JobError.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    JobError.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    JobError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class OrchestratorConfig:
    default_max_tokens: int = 256
    encode_timeout_s: float = 60.0
    # Longer than the bus's reclaim time: a dead worker's job is redelivered and resumes within this wait.
    token_timeout_s: float = 60.0


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AssistantService(assistant_pb2_grpc.AssistantServicer):
    def __init__(self, redis: Redis, bus: BusConfig, model_config: VitaConfig, tokenizer: VitaTokenizer,
                 config: OrchestratorConfig | None = None, metrics: Metrics | None = None,
                 converse: ConverseConfig | None = None) -> None:
        self.redis = redis
        self.bus = bus
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = config or OrchestratorConfig()
        self.metrics = metrics or Metrics()
        self.converse_config = converse or ConverseConfig(default_max_tokens=self.config.default_max_tokens,
                                                          token_timeout_s=self.config.token_timeout_s)
        self.sessions = SessionStore(redis, bus)

    async def Converse(self, request_iterator: AsyncIterator[ClientEvent], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[ServerEvent]:
        """See converse.py; errors are events, so one bad input never ends the conversation."""
        self.metrics.requests.labels("orchestrator", "Converse").inc()
        call = ConverseCall(self.redis, self.bus, self.model_config, self.tokenizer, self.sessions,
                            self.converse_config, self.metrics)
        async for event in call.run(request_iterator):
            yield event

    async def Generate(self, request: GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[GenerateResponse]:
        start = time.perf_counter()
        self.metrics.requests.labels("orchestrator", "Generate").inc()
        request_id = request.request_id or uuid.uuid4().hex
        finished = False
        parent = extract_context(context.invocation_metadata() or ())
        with tracer.start_as_current_span("Generate", context=parent) as span:
            span.set_attribute("vita.request_id", request_id)
            try:
                check_id("request_id", request_id)
                async for response in self._generate(request_id, request, context, start):
                    finished = response.HasField("completed")
                    yield response
            except (InvalidInputError, ContextLengthError) as e:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except Backpressure as e:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except ReplyTimeout as e:
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
            except _Abort as e:
                await self._abort(context, e.code, str(e))
            finally:
                if not finished:  # client gone, deadline, or failure: stop the workers' compute too
                    await cancel(self.redis, self.bus, request_id)
        self.metrics.e2e_latency.labels("orchestrator").observe(time.perf_counter() - start)

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.request_failure.labels("orchestrator", code.name).inc()
        await context.abort(code, message)

    async def _generate(self, request_id: str, request: GenerateRequest, context: grpc.aio.ServicerContext,
                        start: float) -> AsyncIterator[GenerateResponse]:
        video = 1 if request.HasField("video") else 0
        if not request.text.strip() and not request.images and not video and not request.audio:
            raise InvalidInputError("the request is empty: give text, an image, a video or audio")
        reply_stream = self.bus.reply(request_id)
        deadline_ms = _deadline_ms(context)
        jobs = self._encode_jobs(request_id, request, reply_stream, deadline_ms)
        for pool, job in jobs.values():
            await submit(self.redis, self.bus, pool, job)
        replies = events(self.redis, reply_stream, self.config.encode_timeout_s)
        refs = await self._collect_encodings(replies, {job.job_id: kind for kind, (_, job) in jobs.items()})
        encode_s = time.perf_counter() - start

        content = with_placeholders(request.text, images=len(request.images), videos=video,
                                    audios=len(request.audio))
        context_len = self.model_config.llm.max_position_embeddings
        prompt = encode_prompt(
            self.tokenizer, [Message("user", content)], audio_question=bool(request.audio),
            image_tokens=list(refs["image"].item_tokens) if "image" in refs else [],
            video_tokens=[refs["video"].shape[0]] if "video" in refs else [],
            audio_tokens=list(refs["audio"].item_tokens) if "audio" in refs else [],
            system=request.system_prompt if request.HasField("system_prompt") else None,
            max_length=context_len - 1,
        )
        wanted = request.sampling.max_tokens or self.config.default_max_tokens
        sampling = type(request.sampling)()
        sampling.CopyFrom(request.sampling)
        if sampling.temperature > 0 and not sampling.HasField("seed"):
            sampling.seed = uuid.uuid4().int % (1 << 63)  # a redelivered job must resume the same sample
        job = GenerationJob(
            request_id=request_id, role=GenerationJob.GENERATOR, reply_stream=reply_stream,
            prompt_token_ids=prompt.input_ids, embeddings=_placements(prompt.spans, refs), sampling=sampling,
            max_tokens=min(wanted, context_len - len(prompt.input_ids)), deadline_unix_ms=deadline_ms,
            trace_context=current_trace_context(),
        )
        await submit(self.redis, self.bus, Pool.LLM_GENERATOR, job)
        usage = Usage(prompt_tokens=len(prompt.input_ids),
                      image_tokens=sum(s.length for s in prompt.spans if s.modality == "image"),
                      video_tokens=sum(s.length for s in prompt.spans if s.modality == "video"),
                      audio_tokens=sum(s.length for s in prompt.spans if s.modality == "audio"))
        first_token_s = 0.0
        last = time.perf_counter()
        async for event in events(self.redis, reply_stream, self.config.token_timeout_s):
            kind = event.WhichOneof("event") if hasattr(event, "sequence") else None
            if kind == "delta":
                now = time.perf_counter()
                if not first_token_s:
                    first_token_s = now - start
                    self.metrics.time_to_first_token.labels("orchestrator").observe(first_token_s)
                else:
                    self.metrics.inter_token_latency.labels("orchestrator").observe(now - last)
                last = now
                yield GenerateResponse(request_id=request_id, delta=event.delta)
            elif kind == "finished":
                usage.completion_tokens = event.finished.usage.completion_tokens
                reason = Completed.FinishReason.Name(event.finished.finish_reason).lower()
                self.metrics.request_success.labels("orchestrator", reason).inc()
                yield GenerateResponse(request_id=request_id, completed=Completed(
                    finish_reason=event.finished.finish_reason, usage=usage,
                    timings=Timings(encode_s=encode_s, time_to_first_token_s=first_token_s,
                                    total_s=time.perf_counter() - start)))
                return
            elif kind == "error":
                raise _Abort(_STATUS.get(event.error.code, grpc.StatusCode.INTERNAL), event.error.message)

    def _encode_jobs(self, request_id: str, request: GenerateRequest, reply_stream: str,
                     deadline_ms: int) -> dict[str, tuple[Pool, EncodeJob]]:
        """At most one job per modality: an encoder batches the items of one job in one forward."""
        wanted = {
            "image": (Pool.VISION_ENCODER, EncodeJob.IMAGE, [MediaItem(image=i) for i in request.images]),
            "video": (Pool.VISION_ENCODER, EncodeJob.VIDEO,
                      [MediaItem(video=request.video)] if request.HasField("video") else []),
            "audio": (Pool.AUDIO_ENCODER, EncodeJob.AUDIO, [MediaItem(audio=a) for a in request.audio]),
        }
        trace_context = current_trace_context()
        return {
            name: (pool, EncodeJob(job_id=f"{request_id}.{name}", request_id=request_id, reply_stream=reply_stream,
                                   kind=kind, items=items, deadline_unix_ms=deadline_ms,
                                   trace_context=trace_context))
            for name, (pool, kind, items) in wanted.items() if items
        }

    async def _collect_encodings(self, replies: AsyncIterator, kinds: dict[str, str]) -> dict[str, EmbeddingRef]:
        refs: dict[str, EmbeddingRef] = {}
        if not kinds:
            return refs
        async for result in replies:
            if not hasattr(result, "job_id") or result.job_id not in kinds:
                continue
            kind = kinds[result.job_id]
            if result.WhichOneof("outcome") == "error":
                raise _Abort(_STATUS.get(result.error.code, grpc.StatusCode.INTERNAL),
                             f"{kind}: {result.error.message}")
            refs[kind] = result.embedding
            if len(refs) == len(kinds):
                break
        return refs


def _placements(spans: list[Span], refs: dict[str, EmbeddingRef]) -> list[EmbeddingPlacement]:
    """One placement per modality blob: its rows fill that modality's spans in prompt order."""
    placements = []
    for modality, ref in refs.items():
        mine = sorted((s for s in spans if s.modality == modality), key=lambda s: s.start)
        placements.append(EmbeddingPlacement(
            embedding=ref, spans=[EmbeddingPlacement.Span(start=s.start, length=s.length) for s in mine]))
    return placements


def _deadline_ms(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    return 0 if remaining is None else int((time.time() + remaining) * 1000)
