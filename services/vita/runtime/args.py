"""Flags every service process takes, and what they build: Redis client, bus config, logging, metrics, tracing."""

from __future__ import annotations

import argparse
import os

from redis.asyncio import Redis

from vita.bus.streams import BusConfig
from vita.telemetry.logging import configure_logging
from vita.telemetry.metrics import Metrics, serve_metrics
from vita.telemetry.tracing import configure_tracing


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common service options")
    g.add_argument("--redis", default=os.environ.get("VITA_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis URL of the bus (env VITA_REDIS_URL)")
    g.add_argument("--prefix", default=os.environ.get("VITA_BUS_PREFIX", "vita"),
                   help="key prefix of every stream and key on the bus (env VITA_BUS_PREFIX)")
    g.add_argument("--host", default="127.0.0.1", help="address the gRPC server binds (0.0.0.0 in a cluster)")
    g.add_argument("--grpc-port", type=int, default=0, help="gRPC port (health, reflection, the service's API)")
    g.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 disables it")
    g.add_argument("--reclaim-idle-ms", type=int, default=30_000,
                   help="a job unacknowledged this long belongs to a dead worker and is redelivered")
    g.add_argument("--backlog-limit", type=int, default=1_000,
                   help="jobs waiting or running in a pool beyond which requests are refused (RESOURCE_EXHAUSTED)")
    g.add_argument("--otlp-endpoint", default=None, help="send OpenTelemetry spans here (OTLP/gRPC); off by default")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")


def setup(service: str, args: argparse.Namespace) -> tuple[Redis, BusConfig, Metrics]:
    configure_logging(service, args.log_level, json_format=not args.plain_logs)
    configure_tracing(service, otlp_endpoint=args.otlp_endpoint)
    bus = BusConfig(prefix=args.prefix, reclaim_idle_ms=args.reclaim_idle_ms,
                    backlog_limits=dict.fromkeys(BusConfig().backlog_limits, args.backlog_limit))
    metrics = Metrics()
    serve_metrics(metrics, args.metrics_port, host=args.host)
    # Blocking reads (XREAD BLOCK up to --token-timeout / --encode-timeout) must outlast the socket's read timeout:
    # redis-py 8's 5 s default cut them with a TimeoutError whenever a pool was slow to answer. (None, "no
    # timeout", stopped encoder workers from reclaiming a dead worker's jobs in tests/integration/test_encoders.py.)
    longest_block_s = max(60.0, getattr(args, "token_timeout", 0.0), getattr(args, "encode_timeout", 0.0))
    return Redis.from_url(args.redis, socket_timeout=longest_block_s + 30, socket_connect_timeout=5), bus, metrics
