"""The Redis worker of an encoder pool: reads jobs, encodes every job read together in one tower forward, writes
each job's embedding to Redis and answers on its reply stream, then acknowledges the lot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import torch
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from redis.asyncio import Redis
from redis.exceptions import RedisError

from vita.bus.embeddings import write_embedding
from vita.bus.queue import Consumer, Delivery, lag
from vita.bus.replies import publish_event
from vita.bus.streams import BusConfig, check_id
from vita.bus.trace import trace_parent
from vita.encoders.base import Encoder, kind_name, prepare_all, timed_forward
from vita.errors import InvalidInputError
from vita.model.fingerprint import other_model
from vita.telemetry.metrics import Metrics
from vita.v1.bus_pb2 import EncodeJob, EncodeResult, JobError

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    max_batch: int = 8  # jobs read at once; all their items go through one forward
    block_ms: int = 200  # how long an idle read waits, and so how soon a stop is noticed
    lag_every_s: float = 5.0
    model_fingerprint: str = ""  # the served model's (vita.model.fingerprint); jobs for another are refused


@dataclass
class Encoded:
    embedding: torch.Tensor  # (tokens, hidden): the job's items, in order
    item_tokens: list[int]


Outcome = Encoded | JobError


class EncoderWorker:
    def __init__(self, redis: Redis, bus: BusConfig, encoder: Encoder, config: WorkerConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.redis = redis
        self.bus = bus
        self.encoder = encoder
        self.config = config or WorkerConfig()
        self.metrics = metrics or Metrics()
        self.pool = encoder.pool
        self.consumer = Consumer(redis, bus, self.pool, metrics=self.metrics)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop reading; the batch in flight is finished and acknowledged before `run` returns."""
        self._stopping.set()

    async def run(self) -> None:
        lag_task = asyncio.create_task(self._report_lag())
        try:
            while not self._stopping.is_set():
                try:
                    deliveries = await self.consumer.read(count=self.config.max_batch, block_ms=self.config.block_ms)
                    if deliveries:
                        await self.process(deliveries)
                except RedisError as e:  # Redis gone past the client's retries: unacknowledged jobs are redelivered
                    log.warning("the bus failed, retrying: %s", e)
                    await asyncio.sleep(1.0)
        finally:
            lag_task.cancel()

    async def process(self, deliveries: list[Delivery]) -> None:
        """Encode the jobs read together, answer each on its reply stream, then acknowledge them all.

        A job another worker reclaimed meanwhile (this one stalled past `reclaim_idle_ms`, so its keep-alive came
        late) is neither answered nor acknowledged here: its new owner does both, so each job is answered once.
        """
        picked_up = time.time()
        accepted: list[Delivery] = []
        for d in deliveries:
            queued_s = picked_up - int(d.entry_id.split("-")[0]) / 1000
            self.metrics.queue_time.labels(self.pool.value).observe(max(0.0, queued_s))
            try:
                self.bus.check_reply_stream(d.message.reply_stream)
                accepted.append(d)
            except InvalidInputError as e:  # nobody can be told: log it, and acknowledge it with the rest
                log.error("job dropped: %s", e, extra={"job_id": d.message.job_id, "entry_id": d.entry_id})
        jobs: list[EncodeJob] = [d.message for d in accepted]
        spans = [tracer.start_span(f"encode {kind_name(job.kind)}", context=trace_parent(job),
                                   attributes={"vita.request_id": job.request_id, "vita.job_id": job.job_id})
                 for job in jobs]
        entry_ids = [d.entry_id for d in deliveries]
        try:
            async with self._keeping_alive(entry_ids):  # beating until the ack: answering a big batch takes a while
                outcomes = await self._encode(jobs)
                owned = set(await self.consumer.keep_alive(*entry_ids))
                for d, job, span, outcome in zip(accepted, jobs, spans, outcomes):
                    if d.entry_id in owned:
                        with trace.use_span(span):
                            await self._answer(job, span, outcome)
                    else:
                        span.set_status(Status(StatusCode.ERROR, "reclaimed by another worker"))
                if lost := [e for e in entry_ids if e not in owned]:
                    log.warning("jobs reclaimed by another worker while this one stalled are left to it",
                                extra={"entries": lost})
                if mine := [e for e in entry_ids if e in owned]:
                    await self.consumer.ack(*mine)
        finally:
            for span in spans:
                span.end()

    async def _encode(self, jobs: list[EncodeJob]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [await self._refusal(job) for job in jobs]
        runnable = [i for i, outcome in enumerate(outcomes) if outcome is None]
        prepared = await asyncio.to_thread(lambda: [self._prepare(jobs[i]) for i in runnable])
        inputs: dict[int, list[torch.Tensor]] = {}
        for i, job_inputs in zip(runnable, prepared):
            if isinstance(job_inputs, JobError):
                outcomes[i] = job_inputs
            else:
                inputs[i] = job_inputs
        if not inputs:
            return outcomes
        batch = [x for job_inputs in inputs.values() for x in job_inputs]
        try:
            outputs = iter(await asyncio.to_thread(timed_forward, self.encoder, batch, self.metrics))
        except Exception:
            log.exception("encoder forward failed", extra={"jobs": [jobs[i].job_id for i in inputs]})
            for i in inputs:
                outcomes[i] = JobError(code=JobError.INTERNAL, message="the encoder failed on this request")
            return outcomes
        self.metrics.batch_size.labels(self.pool.value).observe(len(batch))
        for i, job_inputs in inputs.items():
            items = [next(outputs) for _ in job_inputs]
            outcomes[i] = Encoded(torch.cat(items), [x.shape[0] for x in items])
        return outcomes

    async def _refusal(self, job: EncodeJob) -> JobError | None:
        """Answers that need no compute: a job whose deadline passed or whose request was cancelled."""
        try:
            cancelled = await self.redis.exists(self.bus.cancel_key(job.request_id))
        except InvalidInputError as e:
            return JobError(code=JobError.INVALID_ARGUMENT, message=str(e))
        if job.deadline_unix_ms and time.time() * 1000 > job.deadline_unix_ms:
            return JobError(code=JobError.DEADLINE_EXCEEDED, message="the deadline passed while the job was queued")
        if cancelled:
            return JobError(code=JobError.CANCELLED, message="the request was cancelled")
        if (mismatch := other_model(job.model_fingerprint, self.config.model_fingerprint, self.pool.value)):
            log.error("job for another model refused", extra={"request_id": job.request_id, "reason": mismatch})
            return JobError(code=JobError.FAILED_PRECONDITION, message=mismatch)
        return None

    def _prepare(self, job: EncodeJob) -> list[torch.Tensor] | JobError:
        """Runs in a worker thread: decoding media is CPU work the event loop must not wait on."""
        try:
            check_id("job id", job.job_id)
            if job.kind not in self.encoder.kinds:
                wanted = " and ".join(sorted(kind_name(k).upper() for k in self.encoder.kinds))
                raise InvalidInputError(f"the {self.pool} pool encodes {wanted} jobs, not {kind_name(job.kind)}")
            if not job.items:
                raise InvalidInputError("the job has no items to encode")
            return prepare_all(kind_name(job.kind), job.items, partial(self.encoder.prepare, job.kind))
        except InvalidInputError as e:
            return JobError(code=JobError.INVALID_ARGUMENT, message=str(e))
        except Exception:
            log.exception("preparing a job failed", extra={"job_id": job.job_id})
            return JobError(code=JobError.INTERNAL, message="the encoder failed on this request")

    async def _answer(self, job: EncodeJob, span: Span, outcome: Outcome) -> None:
        if isinstance(outcome, JobError):
            span.set_status(Status(StatusCode.ERROR, outcome.message))
            result = EncodeResult(job_id=job.job_id, request_id=job.request_id, error=outcome)
        else:
            ref = await write_embedding(self.redis, self.bus, job.job_id, outcome.embedding, outcome.item_tokens)
            span.set_attribute("vita.tokens", int(outcome.embedding.shape[0]))
            result = EncodeResult(job_id=job.job_id, request_id=job.request_id, embedding=ref)
        await publish_event(self.redis, self.bus, job.reply_stream, result)

    @contextlib.asynccontextmanager
    async def _keeping_alive(self, entry_ids: list[str]) -> AsyncIterator[None]:
        """Refresh the jobs' idle time while they run, so a slow batch is not reclaimed from a live worker.

        Every third of `reclaim_idle_ms`: two beats may be late before the batch looks abandoned.
        """

        async def beat() -> None:
            running = list(entry_ids)
            while running:
                await asyncio.sleep(self.bus.reclaim_idle_ms / 3000)
                try:
                    running = await self.consumer.keep_alive(*running)  # a job another worker took stays with it
                except RedisError as e:
                    log.warning("keep-alive failed: %s", e)

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _report_lag(self) -> None:
        while True:
            try:
                depth = await lag(self.redis, self.bus, self.pool)
                self.metrics.stream_lag.labels(self.pool.value).set(depth.lag)
                self.metrics.stream_pending.labels(self.pool.value).set(depth.pending)
            except RedisError as e:
                log.warning("reading the stream lag failed: %s", e)
            await asyncio.sleep(self.config.lag_every_s)
