"""`vita.v1.Assistant`: the public API. Generate fans media out to the encoder pools, builds the prompt from the
token counts they report, dispatches it to the generator pool and relays the token stream.

The orchestrator holds no model weights: only the config (context length, media rules) and the tokenizer. All
per-request state lives in Redis (the reply stream), so any replica can serve any request.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from vita.bus.queue import Backpressure
from vita.bus.replies import ReplyTimeout
from vita.bus.streams import BusConfig, check_id, unique_id
from vita.errors import ContextLengthError, InvalidInputError
from vita.model.config import VitaConfig
from vita.orchestrator.config import OrchestratorConfig
from vita.orchestrator.converse import ConverseCall
from vita.orchestrator.metadata import model_metadata
from vita.orchestrator.pools import JobFailed, PoolClient, queue_seconds
from vita.orchestrator.prompts import media_prompt
from vita.orchestrator.sessions import SessionStore
from vita.processing.prompt import Message
from vita.processing.tokenizer import VitaTokenizer
from vita.runtime.guard import excerpt, status_level
from vita.telemetry.metrics import Metrics
from vita.telemetry.tracing import extract_context
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import (
    ClientEvent,
    Completed,
    GenerateRequest,
    GenerateResponse,
    ModelMetadataRequest,
    ModelMetadataResponse,
    ServerEvent,
    Timings,
)
from vita.v1.bus_pb2 import GenerationJob
from vita.v1.session_pb2 import SessionMedia

__all__ = ["AssistantService", "OrchestratorConfig"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


class AssistantService(assistant_pb2_grpc.AssistantServicer):
    def __init__(self, redis: Redis, bus: BusConfig, model_config: VitaConfig, tokenizer: VitaTokenizer,
                 config: OrchestratorConfig | None = None, metrics: Metrics | None = None) -> None:
        self.redis = redis
        self.bus = bus
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = config or OrchestratorConfig()
        self.metrics = metrics or Metrics()
        # One client and one config for Generate and Converse alike: a setting cannot reach one and miss the other.
        self.pools = PoolClient(redis, bus, self.config, model_config.llm.max_position_embeddings)
        self.sessions = SessionStore(redis, bus)

    async def Converse(self, request_iterator: AsyncIterator[ClientEvent], context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[ServerEvent]:
        """See converse.py; errors are events, so one bad input never ends the conversation."""
        self.metrics.requests.labels("orchestrator", "Converse").inc()
        call = ConverseCall(self.pools, self.tokenizer, self.sessions, self.config, self.metrics)
        call.close_when_done(context)  # the call's cleanup runs however the RPC ends
        async with contextlib.aclosing(call.run(request_iterator)) as events:
            async for event in events:
                yield event

    async def ModelMetadata(self, request: ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> ModelMetadataResponse:
        """What this orchestrator serves (orchestrator/metadata.py), from its own config: no worker is asked."""
        self.metrics.requests.labels("orchestrator", "ModelMetadata").inc()
        response = model_metadata(self.model_config, self.config)
        if request.name and request.name != response.name:
            await self._abort(context, grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not served here: this "
                              f"orchestrator serves {response.name!r} (an empty name asks for it)")
        return response

    async def Generate(self, request: GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[GenerateResponse]:
        start = time.perf_counter()
        self.metrics.requests.labels("orchestrator", "Generate").inc()
        # The caller's id is only echoed: two calls may share it, or reuse a finished one's. What the bus keys by (the
        # jobs, the reply stream, the cancel key, the lease, the engine's sequence) is this call's own `internal_id`.
        request_id = request.request_id or uuid.uuid4().hex
        internal_id = ""
        finished = False
        parent = extract_context(context.invocation_metadata() or ())
        with tracer.start_as_current_span("Generate", context=parent) as span:
            span.set_attribute("vita.request_id", excerpt(request_id, 128))  # a valid id whole; a bad one cut
            try:
                check_id("request_id", request_id)
                internal_id = unique_id(request_id, "gen")
                span.set_attribute("vita.internal_request_id", internal_id)
                async with contextlib.aclosing(self._generate(request_id, internal_id, request, context,
                                                              start)) as responses:
                    async for response in responses:
                        finished = response.HasField("completed")
                        yield response
            except (InvalidInputError, ContextLengthError) as e:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), request_id=request_id)
            except Backpressure as e:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), request_id=request_id)
            except ReplyTimeout as e:
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, str(e), request_id=request_id)
            except JobFailed as e:
                await self._abort(context, e.code, str(e), request_id=request_id)
            except (NoPermissionError, AuthenticationError) as e:  # a deployment error, not the caller's
                await self._abort(context, grpc.StatusCode.INTERNAL, f"the bus refused the orchestrator's Redis "
                                  f"user: {e} (the ACL it needs is in docs/deployment.md)", request_id=request_id)
            except RedisError as e:
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"the bus (Redis) failed: "
                                  f"{type(e).__name__}: {e}", request_id=request_id)
            finally:
                if not finished and internal_id:  # client gone, deadline, or failure: stop the workers' compute too
                    with contextlib.suppress(RedisError):  # the bus failed: the status above already says so
                        await self.pools.cancel(internal_id)
        self.metrics.e2e_latency.labels("orchestrator").observe(time.perf_counter() - start)

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, *,
                     request_id: str = "") -> None:
        """End the call with `code`, logged here once without a traceback: a client's mistake (a bad request, its
        deadline, its cancel, a full backlog) at info, UNAVAILABLE at warning, the server's failures at error
        (`vita.runtime.guard.status_level`). Client-supplied values are logged cut and escaped (`excerpt`)."""
        self.metrics.request_failure.labels("orchestrator", code.name).inc()
        log.log(status_level(code), "request ended %s: %s", code.name, excerpt(message, 400),
                extra={"code": code.name, "request_id": excerpt(request_id)} if request_id else {"code": code.name})
        await context.abort(code, message)

    async def _generate(self, request_id: str, internal_id: str, request: GenerateRequest,
                        context: grpc.aio.ServicerContext, start: float) -> AsyncIterator[GenerateResponse]:
        """The responses of one call: `request_id` is the caller's (echoed), `internal_id` the bus's."""
        video = 1 if request.HasField("video") else 0
        if not request.text.strip() and not request.images and not video and not request.audio:
            raise InvalidInputError("the request is empty: give text, an image, a video or audio")
        self.config.limits.check_generate(request)
        deadline_ms = _deadline_ms(context)
        refs = await self.pools.encode(internal_id, images=request.images, deadline_ms=deadline_ms,
                                       video=request.video if video else None, audio=request.audio)
        encode_s = time.perf_counter() - start

        user = Message.user(request.text, images=len(request.images), videos=video, audios=len(request.audio))
        prompt = media_prompt(
            self.tokenizer, [user], [SessionMedia(modality=m, embedding=r) for m, r in refs.items()],
            audio_question=bool(request.audio), context_len=self.pools.context_len,
            system=request.system_prompt if request.HasField("system_prompt") else None)
        sampling = type(request.sampling)()
        sampling.CopyFrom(request.sampling)
        if sampling.temperature > 0 and not sampling.HasField("seed"):
            sampling.seed = uuid.uuid4().int % (1 << 63)  # a redelivered job must resume the same sample
        job = await self.pools.generate(internal_id, GenerationJob.GENERATOR, prompt, sampling,
                                        deadline_ms=deadline_ms)
        usage = prompt.usage()
        first_token_s = 0.0
        last = time.perf_counter()
        async for event in self.pools.tokens(job.reply_stream):
            kind = event.WhichOneof("event") if hasattr(event, "sequence") else None  # skips the encoders' results
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
                finish_reason = self.pools.finish_reason(job, event.finished)
                reason = Completed.FinishReason.Name(finish_reason).lower()
                self.metrics.request_success.labels("orchestrator", reason).inc()
                total_s = time.perf_counter() - start
                yield GenerateResponse(request_id=request_id, completed=Completed(
                    finish_reason=finish_reason, usage=usage,
                    timings=Timings(queue_s=queue_seconds(first_token_s, total_s, event.finished.timings),
                                    encode_s=encode_s, time_to_first_token_s=first_token_s, total_s=total_s)))
                return
            elif kind == "error":
                raise JobFailed.of(event.error)


def _deadline_ms(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    return 0 if remaining is None else int((time.time() + remaining) * 1000)
