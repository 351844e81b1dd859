"""Prometheus metrics of every service, named after vLLM's (`vllm:time_to_first_token_seconds` ...) with `vita:`.

Every service exports the subset it touches on its own port (`serve_metrics`). Label `pool` tells the generator
and monitor LLM pools apart; `modality` the encoders. The full list, with meanings, is in docs/serving.md.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from vita.telemetry.heap import malloc_info

# Latency buckets from 5 ms to 60 s: wide enough for a tiny CPU model and a full-size GPU one.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    """One registry per process (tests start several services in one interpreter, each with its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        r.register(CudaMemoryCollector())
        self.event_loop = EventLoopCollector()
        r.register(self.event_loop)
        r.register(MallocCollector())
        self.requests = Counter("vita:requests", "Requests received", ["service", "method"], registry=r)
        self.request_success = Counter("vita:request_success", "Requests finished, by finish reason",
                                       ["service", "finished_reason"], registry=r)
        self.request_failure = Counter("vita:request_failure", "Requests failed, by gRPC status code",
                                       ["service", "code"], registry=r)
        self.time_to_first_token = Histogram("vita:time_to_first_token_seconds", "Request arrival to first token",
                                             ["service"], buckets=_LATENCY, registry=r)
        self.inter_token_latency = Histogram("vita:inter_token_latency_seconds", "Time between streamed tokens",
                                             ["service"], buckets=_TOKEN_LATENCY, registry=r)
        self.e2e_latency = Histogram("vita:e2e_request_latency_seconds", "Request arrival to last byte",
                                     ["service"], buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("vita:request_queue_time_seconds", "Time a job waited in its Redis stream",
                                    ["pool"], buckets=_LATENCY, registry=r)
        self.stream_lag = Gauge("vita:stream_lag", "Entries not yet delivered to the consumer group",
                                ["pool"], registry=r)
        self.stream_pending = Gauge("vita:stream_pending", "Entries delivered but not acknowledged",
                                    ["pool"], registry=r)
        self.num_requests_running = Gauge("vita:num_requests_running", "Sequences in the running batch",
                                          ["pool"], registry=r)
        self.num_requests_waiting = Gauge("vita:num_requests_waiting", "Sequences accepted, not yet prefilled",
                                          ["pool"], registry=r)
        self.batch_size = Histogram("vita:batch_size", "Sequences (LLM) or items (encoders) per forward pass",
                                    ["pool"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.generation_tokens = Counter("vita:generation_tokens", "Tokens generated", ["pool"], registry=r)
        self.prompt_tokens = Counter("vita:prompt_tokens", "Prompt tokens prefilled", ["pool"], registry=r)
        self.encoder_latency = Histogram("vita:encoder_latency_seconds", "One encoder forward (a batch)",
                                         ["modality"], buckets=_LATENCY, registry=r)
        self.cancelled = Counter("vita:requests_cancelled", "Sequences stopped by cancellation", ["pool"],
                                 registry=r)
        self.jobs_reclaimed = Counter(
            "vita:jobs_reclaimed", "Jobs taken over (XAUTOCLAIM) from a consumer that left them unacknowledged past "
            "--reclaim-idle-ms: a killed or stalled worker", ["pool"], registry=r)
        self.orphaned = Counter("vita:requests_orphaned", "Sequences stopped because their owner's lease expired "
                                "(the orchestrator that asked is gone); counted in requests_cancelled too", ["pool"],
                                registry=r)
        self.engine_decode_tokens = Counter(
            "vita:engine_decode_tokens", "Tokens computed by the engine's decode forwards, cancelled sequences "
            "included: the compute actually spent, where generation_tokens counts what was delivered",
            ["pool"], registry=r)
        self.prefix_cache_queries = Counter(
            "vita:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (full blocks)", ["pool"],
            registry=r)
        self.prefix_cache_hits = Counter(
            "vita:prefix_cache_hits", "Prompt tokens found in the prefix cache: not computed again", ["pool"],
            registry=r)
        # Converse (orchestrator)
        self.active_sessions = Gauge("vita:converse_active_sessions", "Converse calls open on this replica",
                                     registry=r)
        self.vad_segments = Counter("vita:vad_segments", "Speech segments cut by voice-activity detection",
                                    registry=r)
        self.utterances_judged = Counter("vita:utterances_judged", "Speech judged by the monitor pool",
                                         ["outcome", "early"], registry=r)
        self.history_prefills = Counter(
            "vita:history_prefills", "Converse histories a pool (the one that judges next) was given to prefill after "
            "an answer (outcome=done or failed), so that judging the next speech computes only the speech",
            ["pool", "outcome"], registry=r)
        self.interruption_latency = Histogram(
            "vita:interruption_latency_seconds",
            "Interrupting query cut (end of speech, or its early-judged part) to the generator's confirmed stop "
            "(stage=generator_stopped) or to the new answer's first token (stage=first_token)",
            ["stage"], buckets=_LATENCY, registry=r)
        self.speech_to_first_token = Histogram("vita:speech_to_first_token_seconds",
                                               "End of a spoken query to the first token of its answer",
                                               buckets=_LATENCY, registry=r)
        self.preemptive_answers = Counter(
            "vita:preemptive_answers", "Answers started when the speech paused (outcome=started), then released at "
            "the end of the turn (released) or discarded (discarded: speech resumed, the history or the media "
            "changed)", ["outcome"], registry=r)
        self.bus_up = Gauge("vita:bus_up", "1 while Redis answered this process's last readiness ping, else 0 "
                            "(the replica then reports not ready)", registry=r)


class CudaMemoryCollector(Collector):
    """`vita:gpu_memory_allocated_bytes` / `vita:gpu_memory_reserved_bytes` per CUDA device, from torch's allocator.

    Exported only by processes that use CUDA: torch is looked up, never imported, and CUDA never initialised here.
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily("vita:gpu_memory_allocated_bytes", "Memory held by torch tensors on the GPU",
                                      labels=["device"])
        reserved = GaugeMetricFamily("vita:gpu_memory_reserved_bytes",
                                     "Memory reserved by torch's caching allocator on the GPU", labels=["device"])
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        yield allocated
        yield reserved


class EventLoopCollector(Collector):
    """`vita:asyncio_tasks`: tasks not yet done on the service's event loop (`serve` names the loop).

    Flat while a service's load is steady and back to its idle level after the calls end; a task left behind per
    call or per job makes it climb (the soak benchmark reads it).
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        # all_tasks copies the loop's task set with retries, so reading it from the metrics thread is safe.
        yield GaugeMetricFamily("vita:asyncio_tasks", "asyncio tasks not yet done on the event loop",
                                value=len(asyncio.all_tasks(loop)))


class MallocCollector(Collector):
    """`vita:malloc_in_use_bytes` / `vita:malloc_free_bytes`: the C allocator's view of the process (glibc only).

    Next to process_resident_memory_bytes they tell a leak (in use grows) from memory freed but kept by the
    allocator's arenas (free grows, in use flat).
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = malloc_info()
        if info is None:
            return
        yield GaugeMetricFamily("vita:malloc_in_use_bytes", "Bytes in use from the C allocator (all arenas, mmap "
                                "included): torch CPU tensors, numpy arrays, grpc, Python objects over 512 bytes "
                                "(smaller ones live in Python's own arenas)", value=info[0])
        yield GaugeMetricFamily("vita:malloc_free_bytes", "Bytes freed but kept by the C allocator's arenas",
                                value=info[1])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
        pass


def serve_metrics(metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
    """Exposes /metrics over HTTP in the Prometheus text format; port 0 disables it.

    Always the text format (0.0.4), whatever the scraper asks for: prometheus_client answers an OpenMetrics
    request (what Prometheus 2 asks for first) with ':' escaped to '_', so the same metric would be
    `vita:requests_total` or `vita_requests_total` depending on the scraper's version.
    """
    if not port:
        return
    app = make_wsgi_app(metrics.registry)

    def text_format(environ, start_response):
        environ["HTTP_ACCEPT"] = "text/plain;version=0.0.4"
        return app(environ, start_response)

    server = make_server(host, port, text_format, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
