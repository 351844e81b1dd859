"""The llm service's worker: GenerationJobs from one pool's stream into the backend, tokens out as reply events.

The same program serves either pool (`--role generator` or `--role monitor`); each pool has its own stream and
consumer group, so the two scale independently. Jobs run concurrently up to the backend's batch size: the torch
backend batches them continuously; the Triton backend lets TensorRT-LLM's in-flight batcher do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import RedisError

from vita.bus.cancel import CancelWatcher
from vita.bus.embeddings import EmbeddingMissing, read_embeddings
from vita.bus.queue import Consumer, Delivery, lag
from vita.bus.replies import ReplyPublisher
from vita.bus.streams import ROLE_POOLS, BusConfig, Pool
from vita.bus.trace import trace_parent
from vita.errors import InvalidInputError, VitaError
from vita.llm.backends.base import BackendRequest, EngineDeadError, GenerationBackend, PromptInput
from vita.model.fingerprint import other_model
from vita.model.generation import SamplingParams
from vita.processing.tokenizer import IncrementalDecoder, VitaTokenizer
from vita.telemetry.metrics import Metrics
from vita.v1.assistant_pb2 import Completed, TextDelta, Timings, Usage
from vita.v1.bus_pb2 import GenerationEvent, GenerationJob, JobError

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_FINISH = {"stop": Completed.STOP, "length": Completed.LENGTH, "cancelled": Completed.CANCELLED}


@dataclass
class WorkerConfig:
    role: int = GenerationJob.GENERATOR
    max_concurrency: int = 8  # jobs taken from the stream at once; match the backend's batch size
    keep_alive_s: float = 5.0  # capped at a third of BusConfig.reclaim_idle_ms: a live job is never reclaimed
    stop_wait_s: float = 10.0  # after a cancel, how long the backend may take to end the sequence
    lag_every_s: float = 2.0
    model_fingerprint: str = ""  # the served model's (vita.model.fingerprint); jobs for another are refused


def prompt_from_job(job: GenerationJob, embeddings: list[torch.Tensor]) -> PromptInput:
    """Token ids plus the slot rows each embedding placement fills, in prompt order."""
    ids = torch.tensor(list(job.prompt_token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise InvalidInputError("the generation job has an empty prompt")
    if int(ids.min()) < 0:
        raise InvalidInputError("the generation job has a negative token id")
    if len(job.embeddings) != len(embeddings):
        raise InvalidInputError(f"the job places {len(job.embeddings)} embeddings; {len(embeddings)} were read")
    positions, rows, identity = [], [], []
    for placement, blob in zip(job.embeddings, embeddings, strict=True):
        if any(s.start < 0 or s.length < 0 for s in placement.spans):
            raise InvalidInputError(f"embedding {placement.embedding.key} has a span with a negative start or length")
        spans = [torch.arange(s.start, s.start + s.length) for s in placement.spans]
        where = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        if where.numel() != blob.shape[0] or (where.numel() and int(where.max()) >= ids.numel()):
            raise InvalidInputError(f"embedding {placement.embedding.key} has {blob.shape[0]} rows but its spans "
                                    f"cover {where.numel()} positions of a {ids.numel()}-token prompt")
        positions.append(where)
        rows.append(blob)
        identity.append(slot_identity(placement.embedding.digest, blob.shape[0]))
    if not rows:
        return PromptInput(ids)
    order = torch.cat(positions).argsort()
    known = None if any(i is None for i in identity) else torch.cat(identity)[order]
    return PromptInput(ids, torch.cat(positions)[order], torch.cat(rows)[order], known)


def slot_identity(digest: bytes, rows: int) -> torch.Tensor | None:
    """`PromptInput.slot_identity` of one blob's rows: (rows, 3) int64, the 16-byte digest as two int64 and the row
    index; None when the reference carries no digest (the engine then hashes the rows)."""
    if len(digest) != 16:
        return None
    high, low = (int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8))
    out = torch.empty(rows, 3, dtype=torch.long)
    out[:, 0], out[:, 1], out[:, 2] = high, low, torch.arange(rows)
    return out


def sampling_from_job(job: GenerationJob) -> SamplingParams:
    return SamplingParams.from_message(job.sampling, job.max_tokens)


class _Replies:
    """One job's reply stream with its sequence counter: readers drop numbers they have already seen."""

    def __init__(self, publisher: ReplyPublisher, job: GenerationJob) -> None:
        self.publisher, self.job = publisher, job
        self.sequence = 0

    async def send(self, **event) -> None:
        await self.publisher.publish(
            self.job.reply_stream, GenerationEvent(request_id=self.job.request_id, sequence=self.sequence, **event))
        self.sequence += 1

    async def fail(self, code: int, message: str) -> None:
        await self.send(error=JobError(code=code, message=message))


class LLMWorker:
    def __init__(self, redis: Redis, bus: BusConfig, backend: GenerationBackend, tokenizer: VitaTokenizer,
                 config: WorkerConfig | None = None, metrics: Metrics | None = None) -> None:
        self.redis = redis
        self.bus = bus
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config or WorkerConfig()
        self.pool: Pool = ROLE_POOLS[self.config.role]
        self.metrics = metrics or Metrics()
        self.metrics.orphaned.labels(self.pool.value)  # a series at 0 from the start: rare, and on the dashboard
        self.consumer = Consumer(redis, bus, self.pool, metrics=self.metrics)
        self.publisher = ReplyPublisher(redis, bus)
        self.keep_alive_s = min(self.config.keep_alive_s, bus.reclaim_idle_ms / 3000)
        self._tasks: set[asyncio.Task] = set()
        self._running: set[str] = set()  # entry ids of the jobs this worker runs now
        self._stopping = asyncio.Event()
        self._dead: EngineDeadError | None = None

    def stop(self) -> None:
        """Stop taking jobs; running ones finish (or, if the process dies, are reclaimed by another worker)."""
        self._stopping.set()

    async def run(self) -> None:
        # A cancel reaches the backend the moment it arrives, not when this worker's loop gets to the request.
        async with CancelWatcher(self.redis, self.bus, on_cancel=self.backend.cancel) as watcher:
            lag_task = asyncio.create_task(self._report_lag())
            death = asyncio.create_task(self._stop_on_death())
            try:
                while not self._stopping.is_set():
                    room = self.config.max_concurrency - len(self._tasks)
                    if room <= 0:
                        await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    try:
                        deliveries = await self.consumer.read(count=room, block_ms=200)
                    except RedisError as e:  # Redis gone past the client's retries: keep trying, never exit
                        log.warning("reading jobs failed, retrying: %s", e)
                        await asyncio.sleep(1.0)
                        continue
                    for delivery in deliveries:
                        if delivery.entry_id in self._running:
                            # Reclaimed from ourselves (the loop stalled past reclaim_idle_ms): it is running here,
                            # and its first delivery acknowledges it.
                            log.warning("a job running here was redelivered to us; ignored",
                                        extra={"entry_id": delivery.entry_id})
                            continue
                        task = asyncio.create_task(self._handle(delivery, watcher))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                if self._tasks:
                    await asyncio.wait(self._tasks)
            finally:
                lag_task.cancel()
                death.cancel()
        if self._dead is not None:
            raise self._dead  # the service exits with status 1 and is restarted; its jobs went back to the pool

    async def _stop_on_death(self) -> None:
        """A dead backend stops the worker at once, idle or not: no job is taken that it cannot run."""
        error = await self.backend.wait_dead()
        log.error("the backend's engine died; the worker stops", extra={"pool": self.pool.value})
        self._dead = error
        self.stop()

    async def _report_lag(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                pool_lag = await lag(self.redis, self.bus, self.pool)
                self.metrics.stream_lag.labels(self.pool.value).set(pool_lag.lag)
                self.metrics.stream_pending.labels(self.pool.value).set(pool_lag.pending)
            await asyncio.sleep(self.config.lag_every_s)

    async def _handle(self, delivery: Delivery, watcher: CancelWatcher) -> None:
        job: GenerationJob = delivery.message
        queued_s = time.time() - int(delivery.entry_id.split("-")[0]) / 1000
        self.metrics.queue_time.labels(self.pool.value).observe(max(0.0, queued_s))
        replies = _Replies(self.publisher, job)
        self._running.add(delivery.entry_id)
        heartbeat = asyncio.create_task(self._keep_alive(delivery.entry_id))
        try:
            await self._handle_job(job, delivery, watcher, replies)
        finally:
            heartbeat.cancel()
            self._running.discard(delivery.entry_id)

    async def _keep_alive(self, entry_id: str) -> None:
        """Refresh the job's idle time on the clock, not per token: a long prefill emits nothing for a while, and
        was reclaimed (and run twice) when keep-alives rode on the token loop. A job another worker reclaimed after
        a stall here stays with it: both finish it, and the reader drops the events it has seen (bus/README.md)."""
        while True:
            await asyncio.sleep(self.keep_alive_s)
            try:
                if not await self.consumer.keep_alive(entry_id):
                    log.warning("the job was reclaimed by another worker or acknowledged; no longer refreshed",
                                extra={"entry_id": entry_id})
                    return
            except RedisError as e:
                log.warning("keep-alive failed: %s", e, extra={"entry_id": entry_id})

    async def _handle_job(self, job: GenerationJob, delivery: Delivery, watcher: CancelWatcher,
                          replies: _Replies) -> None:
        with tracer.start_as_current_span(f"generate {self.pool.value}", context=trace_parent(job)) as span:
            span.set_attribute("vita.request_id", job.request_id)
            try:
                try:
                    await self._generate(job, delivery, watcher, replies)
                except EngineDeadError:
                    # Not this request's fault: left unacknowledged, another worker reclaims and reruns it (the
                    # reader drops the events it has seen); `_stop_on_death` stops this worker.
                    log.error("the engine died; job left for redelivery", extra={"request_id": job.request_id})
                    return
                except VitaError as e:
                    await replies.fail(JobError.INVALID_ARGUMENT if isinstance(e, InvalidInputError)
                                       else JobError.UNAVAILABLE if isinstance(e, EmbeddingMissing)
                                       else JobError.INTERNAL, str(e))
                except RedisError:
                    raise
                except Exception:
                    log.exception("generation failed", extra={"request_id": job.request_id})
                    await replies.fail(JobError.INTERNAL, "the llm worker failed on this request")
                await self.consumer.ack(delivery.entry_id)
            except RedisError as e:
                # The bus went away past the client's retries (the stream closed the sequence in the backend).
                # Not acknowledged: the job is reclaimed and rerun, and the reader drops the events it has seen.
                log.warning("job left for redelivery: %s", e, extra={"request_id": job.request_id})
            finally:
                watcher.forget(job.request_id)

    async def _generate(self, job: GenerationJob, delivery: Delivery, watcher: CancelWatcher,
                        replies: _Replies) -> None:
        start = time.perf_counter()
        if await watcher.watch(job.request_id, leased=job.leased):
            self._report_orphan(job, watcher, 0)
            await replies.send(finished=Completed(finish_reason=Completed.CANCELLED))
            return
        if _past(job.deadline_unix_ms):
            await replies.fail(JobError.DEADLINE_EXCEEDED, "the request's deadline passed while it was queued")
            return
        if (mismatch := other_model(job.model_fingerprint, self.config.model_fingerprint, self.pool.value)):
            log.error("job for another model refused", extra={"request_id": job.request_id, "reason": mismatch})
            await replies.fail(JobError.FAILED_PRECONDITION, mismatch)
            return
        prompt = prompt_from_job(job, await read_embeddings(self.redis, [p.embedding for p in job.embeddings]))
        request = BackendRequest(job.request_id, prompt, sampling_from_job(job))
        decoder = IncrementalDecoder(self.tokenizer)
        stops = {self.tokenizer.eos_id}
        generated, first_token_s, finish = 0, 0.0, None
        stopping = False  # cancelled or past the deadline: the backend was told, we read on to its last output
        last_token = time.perf_counter()
        handed_s = last_token - start  # the job goes to the backend now; then it may wait there for a free slot
        engine_wait_s: float | None = None
        stream = self.backend.generate(request)
        try:
            while finish is None:
                try:
                    output = await (asyncio.wait_for(anext(stream), self.config.stop_wait_s) if stopping
                                    else anext(stream))
                except StopAsyncIteration:
                    break
                except TimeoutError:  # the backend never confirmed the stop: closing the stream cancels it
                    log.warning("the backend did not end a cancelled request", extra={"request_id": job.request_id})
                    break
                now = time.perf_counter()
                if engine_wait_s is None and output.queued_s is not None:
                    engine_wait_s = output.queued_s
                if output.token_id is not None:
                    generated += 1  # counted whether or not it is sent: usage is what the backend computed
                    if not stopping:
                        if generated == 1:
                            first_token_s = now - start
                        else:
                            self.metrics.inter_token_latency.labels(self.pool.value).observe(now - last_token)
                        last_token = now
                        text = "" if output.token_id in stops else decoder.push(output.token_id)
                        await replies.send(delta=TextDelta(text=text, token_ids=[output.token_id]))
                finish = output.finish_reason
                if finish is None and not stopping and (watcher.cancelled(job.request_id)
                                                        or _past(job.deadline_unix_ms)):
                    # Usually the watcher told the backend already; this covers a cancel that came before the
                    # backend knew the request, and the deadline. Tokens computed meanwhile are read, not sent.
                    stopping = True
                    await self.backend.cancel(job.request_id)
        finally:
            await stream.aclose()  # a no-op after the last output; else it cancels the sequence in the backend
        if finish is None:
            finish = "cancelled" if stopping else "length"
        tail = decoder.flush()
        if tail:
            await replies.send(delta=TextDelta(text=tail))
        total_s = time.perf_counter() - start
        self.metrics.generation_tokens.labels(self.pool.value).inc(generated)
        self.metrics.prompt_tokens.labels(self.pool.value).inc(len(job.prompt_token_ids))
        if generated:
            self.metrics.time_to_first_token.labels(self.pool.value).observe(first_token_s)
        if finish == "cancelled":
            self.metrics.cancelled.labels(self.pool.value).inc()
            self._report_orphan(job, watcher, generated)
        await replies.send(finished=Completed(
            finish_reason=_FINISH[finish],
            usage=Usage(prompt_tokens=len(job.prompt_token_ids), completion_tokens=generated),
            # From the moment this worker took the job: queue_s until the engine admitted it (a backend that does
            # not say counts only the time until it was handed over); the orchestrator's Timings.queue_s is made
            # from these (`vita.orchestrator.pools.queue_seconds`).
            timings=Timings(queue_s=handed_s + (engine_wait_s or 0.0), time_to_first_token_s=first_token_s,
                            total_s=total_s),
        ))

    def _report_orphan(self, job: GenerationJob, watcher: CancelWatcher, generated: int) -> None:
        """A job stopped (or skipped) because its owner's lease expired: the orchestrator that asked is gone."""
        if watcher.orphaned(job.request_id):
            self.metrics.orphaned.labels(self.pool.value).inc()
            log.warning("stopped a generation whose owner is gone (its lease expired)",
                        extra={"request_id": job.request_id, "pool": self.pool.value, "completion_tokens": generated})


def _past(deadline_unix_ms: int) -> bool:
    return bool(deadline_unix_ms) and time.time() * 1000 > deadline_unix_ms
