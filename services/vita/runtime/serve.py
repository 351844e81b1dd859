"""The life of every service process, written once: set up, serve, drain on SIGTERM, close in order.

An entry point parses its flags and hands `run_service` a `build` coroutine that makes the service's parts from
the shared `Context`. `serve` then starts the gRPC server (health, reflection and the service's own API), and
either runs the service's worker until a signal stops it or, for an API-only service, waits for the drain.

Shutdown order: the worker finishes its batch in flight, whatever `build` registered on `Context.resources`
closes (last registered first: e.g. the KServe port, the generation backend), the gRPC server drains, and the
Redis client closes last, since everything before may still use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from vita.bus.streams import BusConfig
from vita.errors import FatalError, VitaError, one_line
from vita.runtime.args import access_policy, grpc_tls, setup
from vita.runtime.dumps import install_stack_dumps
from vita.runtime.readiness import BusReadiness
from vita.runtime.redis_client import redacted
from vita.runtime.server import GrpcService, ServiceServer
from vita.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class Worker(Protocol):
    """A loop that takes jobs until `stop`; `run` returns once the work in flight is finished."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Context:
    """What `serve` sets up before the service is built."""

    args: argparse.Namespace
    model_dir: Path  # --model, or the tiny model (built on first use)
    redis: Redis
    bus: BusConfig
    metrics: Metrics
    resources: contextlib.AsyncExitStack  # closed after the worker stops, before the gRPC server drains


@dataclass
class Service:
    """The parts of one service; with no worker, the process serves its gRPC API until a signal drains it."""

    grpc: Sequence[GrpcService] = ()
    worker: Worker | None = None
    log: Mapping[str, object] = field(default_factory=dict)  # extra fields of the "serving" log line


Build = Callable[[Context], Awaitable[Service]]


async def serve(name: str, args: argparse.Namespace, build: Build, *, threads: int | None = None) -> None:
    """Run service `name` (its log and trace name) with the common flags of `args` until SIGTERM or SIGINT.

    `threads`: torch CPU threads, set before the model loads (None: torch's choice).
    """
    import torch

    from vita.tiny import build_tiny_checkpoint

    if threads:
        torch.set_num_threads(threads)
    access, tls = access_policy(args), grpc_tls(args)  # bad files or values fail before anything starts
    redis, bus, metrics = setup(name, args)
    metrics.event_loop.loop = asyncio.get_running_loop()
    install_stack_dumps(metrics.event_loop.loop)  # kill -USR1: where it is stuck, in its log
    server: ServiceServer | None = None
    readiness: asyncio.Task | None = None
    try:
        await _check_redis(redis, args.redis)
        async with contextlib.AsyncExitStack() as resources:
            model_dir = check_model_dir(args.model) if args.model else build_tiny_checkpoint()
            service = await build(Context(args, model_dir, redis, bus, metrics, resources))
            server = ServiceServer(service.grpc, host=args.host, port=args.grpc_port, access=access, tls=tls,
                                   health_port=args.health_port, max_message_bytes=args.max_message_bytes,
                                   drain_delay_s=args.drain_delay_s)
            await server.start()
            metrics.bus_up.set(1)
            bus_watch = BusReadiness(redis, server.set_ready, url=args.redis,
                                     on_change=lambda up: metrics.bus_up.set(int(up)))
            readiness = asyncio.create_task(bus_watch.run(), name="bus-readiness")
            worker = service.worker
            server.install_signal_handlers(on_drain=worker.stop if worker is not None else None)
            log.info("serving", extra={"grpc_port": server.port, "model": str(model_dir), "tls": tls is not None,
                                       "auth": access.tokens is not None, "redis": redacted(args.redis),
                                       "prefix": bus.prefix, **service.log})
            await (worker.run() if worker is not None else server.wait())
    finally:
        if readiness is not None:
            readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readiness
        if server is not None:
            await server.drain()
        await redis.aclose()
    log.info("stopped")


async def _check_redis(redis: Redis, url: str) -> None:
    """Fail at start-up, in one line, when the bus is unreachable or refuses the credentials (not at first use);
    warn when a password is configured but the server asks for none (it accepts any: see `_open_to_anyone`)."""
    try:
        await redis.ping()
    except (RedisError, OSError) as e:
        raise VitaError(f"cannot use Redis at {redacted(url)}: {type(e).__name__}: {e}") from None
    if await _open_to_anyone(redis):
        log.warning("Redis answers without a password: the password configured here protects nothing (set "
                    "requirepass or an ACL user on the server)", extra={"redis": redacted(url)})


async def _open_to_anyone(redis: Redis) -> bool:
    """True when the client logs in with a password but the server also answers a client without one. A server
    with no password takes any (Redis' `nopass` default user; redis-py drops the error a one-argument AUTH gets),
    so a mistyped or forgotten requirepass would otherwise go unnoticed. Clusters are not checked."""
    kwargs = dict(redis.connection_pool.connection_kwargs) if isinstance(redis, Redis) else {}
    if not kwargs.get("password"):
        return False
    kwargs.pop("password"), kwargs.pop("username", None)
    kwargs.pop("credential_provider", None)
    kwargs["retry"] = Retry(NoBackoff(), 0)  # NOAUTH is a ConnectionError to redis-py: no outage to ride out here
    anonymous = Redis(connection_pool=ConnectionPool(connection_class=redis.connection_pool.connection_class,
                                                     **kwargs))
    try:
        return bool(await anonymous.ping())
    except (RedisError, OSError):
        return False
    finally:
        await anonymous.aclose(close_connection_pool=True)


def check_model_dir(model: str | Path) -> Path:
    """`--model`'s directory, checked before anything starts: VitaError (one line, exit status 2) when it is not
    a directory or holds no config.json (what `vita export` and `vita init-tiny` write)."""
    model_dir = Path(model)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        problem = "no such directory" if not model_dir.is_dir() else "not a model directory (no config.json)"
        raise VitaError(f"--model {model}: {problem}; a model repository, as `vita export` or `vita init-tiny` "
                        "writes, is expected")
    return model_dir


def run_service(name: str, args: argparse.Namespace, build: Build, *, threads: int | None = None) -> int:
    """`serve` in a fresh event loop: what every `vita serve ...` entry point returns from `main`. A service that
    cannot start (Redis unreachable, its port in use, a bad model directory) says why in one line on stderr and
    returns 2, the CLI's status for bad input (`vita --help`), from `vita serve` and `python -m vita.<service>`
    alike. A service that fails while serving (`FatalError`: a part it needs died) says why the same way and
    returns 1."""
    try:
        asyncio.run(serve(name, args, build, threads=threads))
    except VitaError as e:
        print(f"{getattr(args, 'command_name', 'vita serve')}: error: {one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, FatalError) else 2
    return 0
