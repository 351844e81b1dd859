"""Flags every service process takes, and what they build: Redis client, bus config, logging, metrics, tracing."""

from __future__ import annotations

import argparse
import os

from redis.asyncio import Redis

from vita.bus.streams import BusConfig
from vita.errors import PortInUse, VitaError
from vita.runtime.access import AccessPolicy, load_tokens
from vita.runtime.redis_client import RedisSettings, RetryPolicy, connect
from vita.runtime.server import MAX_MESSAGE_BYTES
from vita.runtime.tls import ServerTLS, server_tls
from vita.telemetry.heap import start_heap_trace
from vita.telemetry.logging import configure_logging
from vita.telemetry.metrics import Metrics, serve_metrics
from vita.telemetry.tracing import configure_tracing
from vita.usage import float_in, int_in

# A TCP port flag: a value outside it is a usage error (exit 2) naming the flag, as `vita up --port 99999` is; not
# the port modulo 65536 (gRPC's choice) nor bind()'s OverflowError. 0 keeps each flag's documented meaning.
PORT = int_in(0, 65535)
# Backpressure refuses work before MAXLEN trimming could drop jobs nobody has read (BusConfig checks it per pool).
BACKLOG_LIMIT = int_in(1, BusConfig.jobs_maxlen - 1)


def redis_url(value: str) -> str:
    """An argparse `type` for `--redis`: a redis:// or rediss:// URL (RedisSettings' rule), else a usage error naming
    the flag (exit 2) before anything starts, not an internal error once a client is made."""
    try:
        RedisSettings(url=value)
    except VitaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def bus_prefix(value: str) -> str:
    """An argparse `type` for `--prefix`: BusConfig's rule (':'-separated words), a usage error (exit 2) at once
    rather than a service that exits during a stack's start-up."""
    try:
        BusConfig(prefix=value)
    except VitaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common service options")
    g.add_argument("--redis", type=redis_url, default=os.environ.get("VITA_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="Redis URL of the bus: redis://[user:password@]host:port/db, rediss:// for TLS "
                        "(env VITA_REDIS_URL)")
    g.add_argument("--redis-cluster", action="store_true", default=_env_flag("VITA_REDIS_CLUSTER"),
                   help="the URL names a node of a Redis Cluster (env VITA_REDIS_CLUSTER=1)")
    g.add_argument("--redis-ca", default=os.environ.get("VITA_REDIS_CA"),
                   help="rediss://: CA certificate (PEM) the server's must chain to (env VITA_REDIS_CA)")
    g.add_argument("--redis-cert", default=os.environ.get("VITA_REDIS_CERT"),
                   help="rediss://: client certificate (PEM) for a server with tls-auth-clients (env VITA_REDIS_CERT)")
    g.add_argument("--redis-key", default=os.environ.get("VITA_REDIS_KEY"),
                   help="rediss://: the client certificate's key (env VITA_REDIS_KEY)")
    g.add_argument("--prefix", type=bus_prefix, default=os.environ.get("VITA_BUS_PREFIX", "vita"),
                   help="key prefix of every stream and key on the bus (env VITA_BUS_PREFIX)")
    g.add_argument("--host", default="127.0.0.1", help="address the gRPC server binds (0.0.0.0 in a cluster)")
    g.add_argument("--grpc-port", type=PORT, default=0,
                   help="gRPC port (health, reflection, the service's API); 0 picks a free one")
    g.add_argument("--metrics-port", type=PORT, default=0, help="Prometheus /metrics port; 0 disables it")
    g.add_argument("--reclaim-idle-ms", type=int, default=30_000,
                   help="a job unacknowledged this long belongs to a dead worker and is redelivered")
    g.add_argument("--dead-consumer-ms", type=int, default=None,
                   help="a consumer idle this long with no pending job is removed from its group (default: twice "
                        "--reclaim-idle-ms)")
    g.add_argument("--lease-ttl-s", type=float, default=BusConfig.lease_ttl_s,
                   help="orchestrator: renews the lease of each generation it waits for, every quarter of this; "
                        "llm workers: stop a leased generation whose lease has been gone for half of this (its "
                        "orchestrator died); 0: no leases")
    g.add_argument("--redis-outage-s", type=float, default=15.0,
                   help="how long each Redis command keeps reconnecting (a restart, a stall) before it fails")
    g.add_argument("--backlog-limit", type=BACKLOG_LIMIT, default=1_000,
                   help="jobs waiting or running in a pool beyond which requests are refused (RESOURCE_EXHAUSTED)")
    g.add_argument("--drain-delay-s", type=float_in(0.0, 600.0), default=0.0,
                   help="on SIGTERM, report NOT_SERVING and keep taking calls this long before the drain stops "
                        "accepting them: the time a load balancer needs to see the change (Kubernetes: a few "
                        "seconds for the endpoint removal to reach every node); 0: stop at once")
    g.add_argument("--otlp-endpoint", default=None, help="send OpenTelemetry spans here (OTLP/gRPC); off by default")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    g.add_argument("--heap-trace-s", type=float, default=0.0,
                   help="debugging: trace the Python heap and log its growth every this many seconds "
                        "(telemetry/heap.py; slows the process); 0: off")
    a = parser.add_argument_group("access to the gRPC API (runtime/access.py; health and reflection stay open)")
    a.add_argument("--api-tokens", default=os.environ.get("VITA_API_TOKENS_FILE"),
                   help="file of accepted bearer tokens, one per line, # comments (env VITA_API_TOKENS_FILE); "
                        "unset: no authentication")
    a.add_argument("--rate-limit", type=float, default=0.0,
                   help="calls a token may start per second (without --api-tokens: all callers together); "
                        "0: unlimited")
    a.add_argument("--rate-burst", type=int, default=0, help="calls a token may start at once (0: the rate, >= 1)")
    a.add_argument("--max-sessions-per-token", type=int, default=0,
                   help="open Converse calls per token on this replica; 0: unlimited")
    a.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES,
                   help="largest gRPC message received or sent (RESOURCE_EXHAUSTED beyond it)")
    a.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    a.add_argument("--tls-key", default=None, help="the --tls-cert's private key (PEM)")
    a.add_argument("--tls-client-ca", default=None,
                   help="mutual TLS: clients must present a certificate signed by this CA (PEM)")
    a.add_argument("--health-port", type=PORT, default=None,
                   help="with TLS: also serve grpc.health.v1 alone, in plaintext, on this port (for probes); 0 "
                        "picks a free one")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def access_policy(args: argparse.Namespace) -> AccessPolicy:
    """The flags' AccessPolicy; VitaError for a bad value (the process exits with the message)."""
    if args.rate_limit < 0 or args.rate_burst < 0 or args.max_sessions_per_token < 0:
        raise VitaError("--rate-limit, --rate-burst and --max-sessions-per-token must not be negative")
    tokens = load_tokens(args.api_tokens) if args.api_tokens else None
    return AccessPolicy(tokens=tokens, rate_per_s=args.rate_limit, burst=args.rate_burst,
                        max_sessions=args.max_sessions_per_token)


def grpc_tls(args: argparse.Namespace) -> ServerTLS | None:
    return server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)


def redis_settings(args: argparse.Namespace) -> RedisSettings:
    return RedisSettings(url=args.redis, cluster=args.redis_cluster, ca_file=args.redis_ca,
                         cert_file=args.redis_cert, key_file=args.redis_key)


def setup(service: str, args: argparse.Namespace) -> tuple[Redis, BusConfig, Metrics]:
    configure_logging(service, args.log_level, json_format=not args.plain_logs)
    configure_tracing(service, otlp_endpoint=args.otlp_endpoint)
    start_heap_trace(args.heap_trace_s)
    bus = BusConfig(prefix=args.prefix, reclaim_idle_ms=args.reclaim_idle_ms,
                    dead_consumer_ms=args.dead_consumer_ms or 2 * args.reclaim_idle_ms, lease_ttl_s=args.lease_ttl_s,
                    backlog_limits=dict.fromkeys(BusConfig().backlog_limits, args.backlog_limit))
    metrics = Metrics()
    try:
        serve_metrics(metrics, args.metrics_port, host=args.host)
    except OSError as e:
        raise PortInUse.from_bind(e, f"serve metrics on {args.host}:{args.metrics_port}") from None
    # Blocking reads (XREAD BLOCK up to --token-timeout / --encode-timeout) must outlast the socket's read timeout:
    # redis-py 8's 5 s default cut them with a TimeoutError whenever a pool was slow to answer. (None, "no
    # timeout", stopped encoder workers from reclaiming a dead worker's jobs in tests/integration/test_encoders.py.)
    longest_block_s = max(60.0, getattr(args, "token_timeout", 0.0), getattr(args, "encode_timeout", 0.0))
    retry = RetryPolicy(outage_s=args.redis_outage_s)
    return connect(redis_settings(args), socket_timeout=longest_block_s + 30, socket_connect_timeout=5,
                   retry=retry), bus, metrics
