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
from vita.bus.streams import BusConfig, check_id
from vita.errors import ContextLengthError, InvalidInputError
from vita.model.config import VitaConfig
from vita.orchestrator.config import OrchestratorConfig
from vita.orchestrator.converse import ConverseCall
from vita.orchestrator.pools import JobFailed, PoolClient
from vita.orchestrator.prompts import media_prompt
from vita.orchestrator.sessions import SessionStore
from vita.processing.prompt import Message
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
            except JobFailed as e:
                await self._abort(context, e.code, str(e))
            except (NoPermissionError, AuthenticationError) as e:  # a deployment error, not the caller's
                await self._abort(context, grpc.StatusCode.INTERNAL, f"the bus refused the orchestrator's Redis "
                                  f"user: {e} (the ACL it needs is in docs/deployment.md)")
            except RedisError as e:
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"the bus (Redis) failed: "
                                  f"{type(e).__name__}: {e}")
            finally:
                if not finished:  # client gone, deadline, or failure: stop the workers' compute too
                    with contextlib.suppress(RedisError):  # the bus failed: the status above already says so
                        await self.pools.cancel(request_id)
        self.metrics.e2e_latency.labels("orchestrator").observe(time.perf_counter() - start)

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.request_failure.labels("orchestrator", code.name).inc()
        await context.abort(code, message)

    async def _generate(self, request_id: str, request: GenerateRequest, context: grpc.aio.ServicerContext,
                        start: float) -> AsyncIterator[GenerateResponse]:
        video = 1 if request.HasField("video") else 0
        if not request.text.strip() and not request.images and not video and not request.audio:
            raise InvalidInputError("the request is empty: give text, an image, a video or audio")
        self.config.limits.check_generate(request)
        deadline_ms = _deadline_ms(context)
        refs = await self.pools.encode(request_id, images=request.images, deadline_ms=deadline_ms,
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
        job = await self.pools.generate(request_id, GenerationJob.GENERATOR, prompt, sampling,
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
                yield GenerateResponse(request_id=request_id, completed=Completed(
                    finish_reason=finish_reason, usage=usage,
                    timings=Timings(encode_s=encode_s, time_to_first_token_s=first_token_s,
                                    total_s=time.perf_counter() - start)))
                return
            elif kind == "error":
                raise JobFailed.of(event.error)


def _deadline_ms(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    return 0 if remaining is None else int((time.time() + remaining) * 1000)
