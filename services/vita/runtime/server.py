"""What every service's gRPC server has: health checking, reflection, and a graceful drain on SIGTERM.

Health: `""` answers for the process (liveness), `readiness` and each API service's name for whether it can serve
now (runtime/readiness.py: they follow the bus). Drain order (as Kubernetes expects): health flips to NOT_SERVING
so the load balancer stops sending, calls are still taken for `drain_delay_s` (while that news spreads: a pod's
endpoint removal reaches kube-proxy on every node seconds after the SIGTERM), then the server stops accepting new
calls, in-flight calls get `grace_s` to finish, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vita.errors import PortInUse
from vita.runtime.access import AccessInterceptor, AccessPolicy
from vita.runtime.guard import StatusGuard
from vita.runtime.readiness import READINESS
from vita.runtime.tls import ServerTLS

log = logging.getLogger(__name__)

# 64 MiB: a request carrying a few images or a minute of audio fits; anything larger is refused by gRPC itself.
MAX_MESSAGE_BYTES = 64 << 20
# How long in-flight calls get to finish once a drain starts; a pod's terminationGracePeriodSeconds must exceed it.
GRACE_S = 10.0


@dataclass
class GrpcService:
    """A servicer plus how to register it and the full name it is known by (for health and reflection)."""

    name: str  # e.g. "vita.v1.Assistant"
    register: Callable[[grpc.aio.Server], None]


# gRPC sets SO_REUSEPORT on its listening sockets by default: a second server on a port already in use then binds it
# too, and the kernel splits the connections between the two: two local stacks whose port choices raced (LocalStack
# picks free ports seconds before its processes bind them) would answer each other's clients, with another model
# and another bus prefix. Off, the second bind fails with PortInUse.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


def listen(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """`server` listens on host:port (0: a free port); returns the port. Raises PortInUse, whose one line is all
    that reaches stderr: gRPC core's own log of the failed bind (`E... add_port.cc:83] Failed to add port ...`) is
    dropped."""
    address = f"{host}:{port}"
    try:
        with _stderr_dropped_on_error():
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
    except RuntimeError:
        raise PortInUse(f"cannot listen on {address}: {PortInUse.MARK} by another process (or {host} is not an "
                        "address of this machine)") from None


@contextlib.contextmanager
def _stderr_dropped_on_error() -> Iterator[None]:
    """What is written to file descriptor 2 inside the block is held back: dropped if the block raises, written
    out after it otherwise. gRPC core logs to fd 2 itself (abseil), past Python's logging, at a verbosity fixed when
    the process starts (GRPC_VERBOSITY), so this is the one way to keep its line about a failed bind off stderr.
    (A bind of our own beforehand would race other processes for the port, and would have to copy how gRPC binds:
    SO_REUSEADDR, dual-stack sockets, every address a host name resolves to.)"""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        yield
        return
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
            held.seek(0)
            text = memoryview(held.read())
            while text:
                text = text[os.write(2, text):]
    finally:
        os.close(saved)


class ServiceServer:
    """`access`: token check, rate and session limits (runtime/access.py); `tls`: serve TLS or mutual TLS, and
    then, with `health_port`, also grpc.health.v1 alone in plaintext there (Kubernetes' gRPC probes speak no TLS);
    `drain_delay_s`: seconds between NOT_SERVING and no longer accepting calls, once a drain starts.
    A request larger than `max_message_bytes` is refused by gRPC itself with RESOURCE_EXHAUSTED."""

    def __init__(self, services: Sequence[GrpcService], *, host: str = "127.0.0.1", port: int = 0,
                 grace_s: float = GRACE_S, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 access: AccessPolicy | None = None, tls: ServerTLS | None = None,
                 health_port: int | None = None, drain_delay_s: float = 0.0) -> None:
        self.services = services
        self.grace_s = grace_s
        self.drain_delay_s = drain_delay_s
        self.access = AccessInterceptor(access) if access is not None and access.enabled else None
        # StatusGuard: undecodable requests and unexpected errors end in a proper status, never bare INTERNAL/UNKNOWN.
        interceptors = [StatusGuard(), *([self.access] if self.access is not None else [])]
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *EXCLUSIVE_PORT,
        ], interceptors=interceptors)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in services:
            service.register(self.server)
        reflection.enable_server_reflection(
            [s.name for s in services] + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = listen(self.server, host, port, tls.credentials() if tls is not None else None)
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if health_port is not None and tls is not None:
            self.health_server = grpc.aio.server(options=EXCLUSIVE_PORT)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = listen(self.health_server, host, health_port)
        self._stopped = asyncio.Event()
        self._drain_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)

    async def set_ready(self, ready: bool) -> None:
        """`readiness` and the API services' names SERVING or NOT_SERVING; `""` (the process) stays as it is.
        Ignored once a drain started: a draining server is never ready again."""
        if self._drain_task is not None:
            return
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._ready_names():
            await self.health.set(name, status)

    def _ready_names(self) -> list[str]:
        return [READINESS, *(s.name for s in self.services)]

    async def _set_status(self, status: int) -> None:
        for name in ["", *self._ready_names()]:
            await self.health.set(name, status)

    async def drain(self) -> None:
        """NOT_SERVING first, then stop with a grace period for in-flight calls. Runs once: a second call (the
        signal handler's, then the process's shutdown) waits for the first."""
        await self._start_drain()

    def _start_drain(self) -> asyncio.Task:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return self._drain_task

    async def _drain(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.drain_delay_s > 0:
            await asyncio.sleep(self.drain_delay_s)  # calls still taken while load balancers learn of the drain
        await self.server.stop(self.grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        self._stopped.set()

    def install_signal_handlers(self, on_drain: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()

        def handle(sig: signal.Signals) -> None:
            log.info("draining", extra={"signal": sig.name, "grace_s": self.grace_s,
                                        "drain_delay_s": self.drain_delay_s})
            if on_drain is not None:
                on_drain()
            self._start_drain()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handle, sig)

    async def wait(self) -> None:
        await self._stopped.wait()
