"""What the audio-encoder and vision-encoder services share: the Redis worker that encodes every job read together
in one tower forward, and the process around it (flags, gRPC health, metrics, the optional KServe v2 port).

A modality plugs in an `Encoder`: how one media item becomes tower input, and one forward over many inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import torch
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from redis.asyncio import Redis
from redis.exceptions import RedisError

from vita.bus.codec import MalformedEntry, blob_to_tensor
from vita.bus.embeddings import write_embedding
from vita.bus.queue import Consumer, Delivery, lag
from vita.bus.replies import publish_event
from vita.bus.streams import BusConfig, Pool, check_id
from vita.bus.trace import trace_parent
from vita.errors import InvalidInputError
from vita.grpc_server import ServiceServer
from vita.model.vita import VitaForCausalLM
from vita.service_args import add_common_args, setup
from vita.telemetry.metrics import Metrics
from vita.v1.bus_pb2 import EncodeJob, EncodeResult, JobError, MediaItem, TensorBlob

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Encoder(ABC):
    """A tower behind a pool. `prepare`/`from_v2` run per job on the CPU, so bad media fail alone; `forward` runs
    once for the inputs of every job read together."""

    pool: ClassVar[Pool]
    modality: ClassVar[str]  # the `modality` metric label
    kinds: ClassVar[frozenset[int]]  # the EncodeJob kinds this pool encodes
    v2_inputs: ClassVar[tuple[dict, ...]]  # KServe model metadata of the tensors `from_v2` takes

    def __init__(self, tower: torch.nn.Module) -> None:
        self.tower = tower.eval()

    @staticmethod
    @abstractmethod
    def tower_of(model: VitaForCausalLM) -> torch.nn.Module:
        """The tower this pool runs; CheckpointError when the model has none."""

    @abstractmethod
    def prepare(self, kind: int, item: MediaItem) -> torch.Tensor:
        """One item of an EncodeJob as tower input; bad media raise InvalidInputError."""

    @abstractmethod
    def from_v2(self, name: str, array: np.ndarray, parameters: Mapping[str, object]) -> list[torch.Tensor]:
        """One KServe v2 input tensor (a BYTES array of media, or raw samples) as tower inputs."""

    @abstractmethod
    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One batched tower pass: a (tokens, hidden) embedding per input."""

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Where inputs must go: the tower's device and dtype."""
        param = next(self.tower.parameters())
        return param.device, param.dtype


def load_encoder(encoder_cls: type[Encoder], model_dir: Path, device: str, dtype: torch.dtype) -> Encoder:
    """Read on the CPU, keep the tower, move only it: the LLM next to it in the checkpoint never reaches the device."""
    model = VitaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return encoder_cls(encoder_cls.tower_of(model).to(device))


def prepare_all(what: str, sources: Iterable[T], prepare: Callable[[T], torch.Tensor]) -> list[torch.Tensor]:
    """Every source in order; a bad one is named by its position, as the in-process processor names it."""
    inputs = []
    for k, source in enumerate(sources):
        try:
            inputs.append(prepare(source))
        except InvalidInputError as e:
            raise InvalidInputError(f"{what} {k}: {e}") from None
    return inputs


def blob_input(blob: TensorBlob, what: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A preprocessed item, checked against the `shape` its tower takes (None: any size of at least 1)."""
    try:
        x = blob_to_tensor(blob)
    except MalformedEntry as e:
        raise InvalidInputError(f"{what}: {e}") from None
    if x.dim() != len(shape) or any(n < 1 or (want is not None and n != want) for n, want in zip(x.shape, shape)):
        wanted = ", ".join("N" if n is None else str(n) for n in shape)
        raise InvalidInputError(f"{what} must have shape ({wanted}); got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InvalidInputError(f"{what} contain NaN or Inf")
    return x.float()


def v2_bytes(name: str, array: np.ndarray) -> list[bytes]:
    """The elements of a BYTES input; anything else is refused, so a string can never be taken for a file path."""
    if array.dtype != np.object_ or not all(isinstance(x, bytes) for x in array.flat):
        raise InvalidInputError(f"input {name!r} must be BYTES holding encoded files")
    return list(array.flat)


def timed_forward(encoder: Encoder, inputs: Sequence[torch.Tensor], metrics: Metrics) -> list[torch.Tensor]:
    """The forward both front doors (the Redis worker and KServe) run, under the one latency histogram."""
    start = time.perf_counter()
    outputs = encoder.forward(inputs)
    metrics.encoder_latency.labels(encoder.modality).observe(time.perf_counter() - start)
    return outputs


def kind_name(kind: int) -> str:
    return EncodeJob.Kind.Name(kind).lower() if kind in EncodeJob.Kind.values() else f"kind {kind}"


# ----------------------------------------------------------------------------------------------------------------
# The Redis worker


@dataclass(frozen=True)
class WorkerConfig:
    max_batch: int = 8  # jobs read at once; all their items go through one forward
    block_ms: int = 200  # how long an idle read waits, and so how soon a stop is noticed
    lag_every_s: float = 5.0


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
        self.consumer = Consumer(redis, bus, self.pool)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop reading; the batch in flight is finished and acknowledged before `run` returns."""
        self._stopping.set()

    async def run(self) -> None:
        lag_task = asyncio.create_task(self._report_lag())
        try:
            while not self._stopping.is_set():
                deliveries = await self.consumer.read(count=self.config.max_batch, block_ms=self.config.block_ms)
                if deliveries:
                    await self.process(deliveries)
        finally:
            lag_task.cancel()

    async def process(self, deliveries: list[Delivery]) -> None:
        """Encode the jobs read together, answer each on its reply stream, then acknowledge them all."""
        picked_up = time.time()
        jobs: list[EncodeJob] = []
        for d in deliveries:
            queued_s = picked_up - int(d.entry_id.split("-")[0]) / 1000
            self.metrics.queue_time.labels(self.pool.value).observe(max(0.0, queued_s))
            try:
                self.bus.check_reply_stream(d.message.reply_stream)
                jobs.append(d.message)
            except InvalidInputError as e:  # nobody can be told: log it, and acknowledge it with the rest
                log.error("job dropped: %s", e, extra={"job_id": d.message.job_id, "entry_id": d.entry_id})
        spans = [tracer.start_span(f"encode {kind_name(job.kind)}", context=trace_parent(job),
                                   attributes={"vita.request_id": job.request_id, "vita.job_id": job.job_id})
                 for job in jobs]
        try:
            async with self._keeping_alive([d.entry_id for d in deliveries]):
                outcomes = await self._encode(jobs)
            for job, span, outcome in zip(jobs, spans, outcomes):
                with trace.use_span(span):
                    await self._answer(job, span, outcome)
        finally:
            for span in spans:
                span.end()
        await self.consumer.ack(*(d.entry_id for d in deliveries))

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
            while True:
                await asyncio.sleep(self.bus.reclaim_idle_ms / 3000)
                try:
                    await self.consumer.keep_alive(*entry_ids)
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


# ----------------------------------------------------------------------------------------------------------------
# The service process


def parse_args(encoder_cls: type[Encoder], description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"vita serve {encoder_cls.pool}", description=description)
    p.add_argument("--model", default=None,
                   help="model directory whose tower is served (default: the tiny model, built on first use)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="jobs taken from the stream at once; all their items are encoded in one forward pass")
    p.add_argument("--kserve-port", type=int, default=0,
                   help="serve the KServe Open Inference Protocol v2 over gRPC on this port of --host "
                        f"(model name {encoder_cls.pool.value!r}; no REST); 0 disables it")
    p.add_argument("--device", default="cpu", help="torch device of the tower, e.g. cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tower weights and embeddings")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.max_batch < 1:
        p.error("--max-batch must be at least 1")
    return args


async def serve(encoder_cls: type[Encoder], args: argparse.Namespace) -> None:
    from vita.model.tiny import build_tiny_checkpoint

    redis, bus, metrics = setup(encoder_cls.pool.value, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else build_tiny_checkpoint()
    encoder = load_encoder(encoder_cls, model_dir, args.device, DTYPES[args.dtype])
    worker = EncoderWorker(redis, bus, encoder, WorkerConfig(max_batch=args.max_batch), metrics)
    server = ServiceServer([], host=args.host, port=args.grpc_port)
    kserve = None
    if args.kserve_port:  # imported only here: kserve must stay out of processes that use tritonclient
        from vita.encoder_kserve import KServeEndpoint

        kserve = KServeEndpoint(encoder, metrics, host=args.host, port=args.kserve_port)
        await kserve.start()
    await server.start()
    server.install_signal_handlers(on_drain=worker.stop)
    log.info("serving", extra={"pool": encoder.pool.value, "grpc_port": server.port, "model": str(model_dir),
                               "kserve_port": kserve.port if kserve else 0, "max_batch": args.max_batch})
    try:
        await worker.run()
    finally:
        if kserve is not None:
            await kserve.stop(server.grace_s)
        await server.drain()
        await redis.aclose()
    log.info("stopped", extra={"pool": encoder.pool.value})


def run_service(encoder_cls: type[Encoder], description: str, argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(encoder_cls, parse_args(encoder_cls, description, argv)))
    return 0
