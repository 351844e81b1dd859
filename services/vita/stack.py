"""The local stack: Redis (started if none answers) and every service as a process on 127.0.0.1.

`LocalStack` is what `make demo`, `vita up`/`vita down` and the end-to-end tests use. Each service runs exactly as
in a cluster (same entry point, same flags); only the addresses are loopback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vita.errors import PortInUse, VitaError, one_line
from vita.paths import vita_home
from vita.runtime.ports import free_port, port_free
from vita.runtime.redis_client import redacted

log = logging.getLogger(__name__)


class StackError(VitaError):
    """A service did not come up; the message holds the tail of its log."""


def duplex_model_dir(*, progress: bool = False) -> Path:
    """The tiny model fine-tuned for the duplex decisions, which `make demo` and `vita up` serve by default:
    trained on first use (`vita.training.duplex`, a few minutes on 2 CPU cores; `progress`: its bar on stderr),
    then cached in VITA_HOME."""
    from vita.training.duplex import build_duplex_checkpoint

    return build_duplex_checkpoint(progress=progress)


def redis_answers(url: str) -> bool:
    """Whether a Redis answers at `url`. StackError when one answers but refuses the URL's login (a wrong or
    missing password, an unknown user): starting another redis-server there would not help."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
            redis.exceptions.NoPermissionError) as e:
        if urlsplit(url).password is None:
            raise StackError(f"the Redis at {redacted(url)} needs a password: give --redis "
                             "redis://:PASSWORD@HOST:PORT/DB (or redis://USER:PASSWORD@...)") from None
        raise StackError(f"the Redis at {redacted(url)} refused the login ({one_line(e)[:120]}): give --redis "
                         "the right user and password (redis://USER:PASSWORD@HOST:PORT/DB)") from None
    except redis.RedisError:
        return False


def delete_prefix(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> None:
    """Delete every key under `prefix:`: a stack's job streams (which keep no TTL), sessions and leases, once the
    stack is stopped (a deleted stream fails a running worker's blocked read). Raises redis.RedisError."""
    import redis

    with redis.Redis.from_url(url, socket_connect_timeout=2) as r:
        keys = list(r.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            r.delete(*keys)


def ensure_redis(url: str = "redis://127.0.0.1:6379/0") -> int:
    """Starts a throw-away redis-server (no persistence) on `url`'s loopback port when nothing answers at `url`, in
    its own session (as the services are), and returns its pid; 0 when a Redis answered already. Raises StackError
    when none answers and none can be started there (not a loopback address, no redis-server)."""
    if redis_answers(url):
        return 0
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise StackError(f"no Redis answers at {redacted(url)} (only a plain redis:// URL on this machine's loopback is "
                         "started here: start that Redis, or give --redis a reachable one)")
    if shutil.which("redis-server") is None:
        raise StackError(f"no Redis answers at {redacted(url)} and redis-server is not installed")
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "-::1", "--port", str(parts.port or 6379),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    for _ in range(50):
        if redis_answers(url):
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    _stop_pid(proc.pid, 5.0)
    raise StackError(f"started redis-server but nothing answers at {redacted(url)}")


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    grpc_port: int
    log_path: str
    pid: int = 0
    metrics_port: int = 0
    health: str = "grpc"  # "http": GET /healthz on grpc_port (the realtime gateway's WebSocket port)


@dataclass
class LocalStack:
    model_dir: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "vita"
    orchestrator_port: int = 0  # 0 picks a free port
    log_dir: str = ""
    reclaim_idle_ms: int = 30_000
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    metrics: bool = False  # give every service a Prometheus port (ServiceProcess.metrics_port)
    realtime: bool = False  # also the OpenAI-Realtime gateway (`vita serve realtime`) in front of the orchestrator
    realtime_port: int = 0  # 0 picks a free port
    services: list[ServiceProcess] = field(default_factory=list)
    redis_pid: int = 0  # the redis-server start() started because none answered: stop() stops it last

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service('orchestrator').grpc_port}"

    @property
    def realtime_url(self) -> str:
        """The Realtime endpoint's WebSocket URL (the `openai` SDK's base_url is http://127.0.0.1:PORT/v1)."""
        return f"ws://127.0.0.1:{self.service('realtime').grpc_port}/v1/realtime"

    def service(self, name: str) -> ServiceProcess:
        for service in self.services:
            if service.name == name:
                return service
        raise StackError(f"no service named {name!r} in this stack")

    def plan(self) -> list[ServiceProcess]:
        """Encoders and both LLM pools first; the orchestrator last (its port is the stack's address)."""
        log_dir = Path(self.log_dir or vita_home() / "logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        # The Redis URL reaches the services in their environment (VITA_REDIS_URL, `_spawn`), never on their
        # command lines, which every user of the machine can read (ps) and which may hold its password.
        common = ["--model", self.model_dir, "--prefix", self.prefix, "--reclaim-idle-ms", str(self.reclaim_idle_ms)]
        specs = [
            ("audio-encoder", [sys.executable, "-m", "vita.encoders", "audio-encoder"]),
            ("vision-encoder", [sys.executable, "-m", "vita.encoders", "vision-encoder"]),
            ("llm-generator", [sys.executable, "-m", "vita.llm", "--role", "generator"]),
            ("llm-monitor", [sys.executable, "-m", "vita.llm", "--role", "monitor"]),
            ("orchestrator", [sys.executable, "-m", "vita.orchestrator"]),
        ]
        planned = []
        for name, argv in specs:
            port = self.orchestrator_port if name == "orchestrator" and self.orchestrator_port else free_port()
            metrics_port = free_port() if self.metrics else 0
            planned.append(ServiceProcess(name, [*argv, *common, "--grpc-port", str(port),
                                                 "--metrics-port", str(metrics_port),
                                                 *self.extra_args.get(name, [])],
                                          port, str(log_dir / f"{name}.log"), metrics_port=metrics_port))
        if self.realtime:
            port = self.realtime_port or free_port()
            planned.append(ServiceProcess(
                "realtime", [sys.executable, "-m", "vita.realtime", "--orchestrator",
                             f"127.0.0.1:{planned[-1].grpc_port}", "--port", str(port),
                             *self.extra_args.get("realtime", [])],
                port, str(log_dir / "realtime.log"), health="http"))
        return planned

    def add_replica(self, name: str, timeout_s: float = 120.0) -> ServiceProcess:
        """One more process of service `name` (e.g. a second orchestrator) on its own ports."""
        base = self.service(name)
        port, metrics_port = free_port(), free_port() if self.metrics else 0
        argv = _with_flag(_with_flag(base.argv, "--grpc-port", str(port)), "--metrics-port", str(metrics_port))
        k = sum(s.name.startswith(name) for s in self.services)
        replica = ServiceProcess(f"{name}-{k}", argv, port, base.log_path.replace(".log", f"-{k}.log"),
                                 metrics_port=metrics_port)
        self.services.append(replica)
        self._spawn(replica)
        wait_healthy(replica, timeout_s)
        return replica

    def kill(self, name: str) -> None:
        """SIGKILL, no drain: what a crashed or OOM-killed process looks like to the others."""
        service = self.service(name)
        _signal(service.pid, signal.SIGKILL)
        _reap(service.pid)

    def respawn(self, name: str, timeout_s: float = 120.0) -> None:
        """Start a stopped service again on the same ports."""
        service = self.service(name)
        self._spawn(service)
        wait_healthy(service, timeout_s)

    def _spawn(self, service: ServiceProcess) -> None:
        with open(service.log_path, "ab") as log:
            proc = subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", "VITA_REDIS_URL": self.redis_url})
        service.pid = proc.pid

    def start(self, timeout_s: float = 120.0, attempts: int = 3) -> LocalStack:
        """Start every service and wait until each is healthy. Ports are picked free (`free_port`) seconds before
        the processes bind them, so another program may take one meanwhile: a service that then exits with
        PortInUse restarts the whole stack on fresh ports, up to `attempts` times. Raises StackError (and stops the
        Redis it started, if it did)."""
        self.redis_pid = ensure_redis(self.redis_url) or self.redis_pid
        try:
            return self._start_services(timeout_s, attempts)
        except BaseException:
            self.stop()
            raise

    def _start_services(self, timeout_s: float, attempts: int) -> LocalStack:
        for port, what in ((self.orchestrator_port, "the orchestrator's port (vita up --port)"),
                           (self.realtime_port if self.realtime else 0, "the realtime port (vita up --realtime-port)")):
            if port and not port_free(port):
                raise StackError(f"cannot listen on 127.0.0.1:{port}, {what}: {PortInUse.MARK}; pick another, or "
                                 "stop what listens there")
        attempt = 0
        while True:
            attempt += 1
            self.services = self.plan()
            for service in self.services:
                Path(service.log_path).unlink(missing_ok=True)
                self._spawn(service)
            try:
                for service in self.services:
                    wait_healthy(service, timeout_s)
                return self
            except StackError as e:
                self._stop_services()
                if attempt == attempts or PortInUse.MARK not in str(e):
                    raise
                log.warning("a port was taken meanwhile; starting again on other ports",
                            extra={"attempt": attempt, "error": one_line(e)[-300:]})

    def redis_alive(self) -> bool:
        """Whether the redis-server `start` started (none answered) still runs."""
        return bool(self.redis_pid) and _alive(self.redis_pid)

    def running(self) -> list[ServiceProcess]:
        """The services whose process is still alive (a zombie is not)."""
        return [service for service in self.services if _alive(service.pid)]

    def stop(self, grace_s: float = 15.0, kill_wait_s: float = 5.0) -> list[ServiceProcess]:
        """SIGTERM (drain), then SIGKILL whatever is left; then the redis-server `start` started, if any (`vita up`
        on a machine without Redis: `vita down` leaves none behind). Returns the services still alive `kill_wait_s`
        after the SIGKILL: none, unless a process cannot be signalled (another user's, or a reused pid) or is stuck
        in the kernel."""
        left = self._stop_services(grace_s, kill_wait_s)
        if self.redis_alive():
            _stop_pid(self.redis_pid, grace_s)
        self.redis_pid = 0  # stopped: a later stop() must not signal whatever reuses the pid
        return left

    def _stop_services(self, grace_s: float = 15.0, kill_wait_s: float = 5.0) -> list[ServiceProcess]:
        for service in reversed(self.services):
            _signal(service.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in self.services:
            while _alive(service.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(service.pid, signal.SIGKILL)
            _reap(service.pid)
        deadline = time.monotonic() + kill_wait_s  # a process not ours dies once its new parent reaps it
        while (left := self.running()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def save(self, path: Path) -> None:
        """The stack's state for `vita down`, readable by its owner alone (0600): it holds the Redis URL, which
        may carry a password."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an older state file written 0644 too
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> LocalStack:
        data = json.loads(path.read_text())
        data["services"] = [ServiceProcess(**s) for s in data["services"]]
        return cls(**data)


def _with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def wait_healthy(service: ServiceProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    if service.health == "http":
        _wait_http(service, deadline, timeout_s)
        return
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not _alive(service.pid):
                raise StackError(f"{service.name} exited during start-up:\n{log_tail(service.log_path)}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise StackError(f"{service.name} not healthy after {timeout_s:.0f} s:\n{log_tail(service.log_path)}")


def _wait_http(service: ServiceProcess, deadline: float, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        if not _alive(service.pid):
            raise StackError(f"{service.name} exited during start-up:\n{log_tail(service.log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{service.grpc_port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise StackError(f"{service.name} not healthy after {timeout_s:.0f} s:\n{log_tail(service.log_path)}")


def log_tail(path: str, lines: int = 20) -> str:
    """The last `lines` lines of a service's log ("(no log)" when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    if not pid:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child (vita down from another shell): fall back to a signal probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited, but not yet reaped by its parent (Linux's /proc; elsewhere never said)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _signal(pid: int, sig: signal.Signals) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _stop_pid(pid: int, grace_s: float) -> None:
    """SIGTERM to `pid`'s process group, SIGKILL after `grace_s`, reaped if it is our child."""
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL)
    _reap(pid)


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, never the shared 127.0.0.1:6379: for fault drills (tests,
    benchmarks/faults.py: it can be killed, restarted on the same port with or without its data, and paused with
    SIGSTOP, which hangs connections as a network stall does) and for tests that need a server of their own (an ACL
    file, TLS, a Cluster node: `args` are passed to redis-server as they are).

    `tls`: the port serves TLS only (`args` name the certificates). `probe`: a call that pings as a client that can
    log in there (a password, TLS); without one, readiness is a plain PING on `url`. Raises StackError, with the server's log,
    when it does not answer within `timeout_s`.
    """

    data_dir: str
    persistent: bool = False  # appendfsync always: a restart keeps every acknowledged write
    port: int = 0
    pid: int = 0
    args: tuple[str, ...] = ()
    tls: bool = False
    probe: Callable[[], object] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return Path(self.data_dir) / "redis.log"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        if shutil.which("redis-server") is None:
            raise StackError("redis-server is not installed: install Redis 7 (make setup)")
        self.port = self.port or free_port()
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", *ports, "--save", "", "--dir", self.data_dir,
                                 "--logfile", str(self.log), *persistence, *self.args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if not _alive(self.pid) or time.monotonic() > deadline:
                log = self.log.read_text()[-2000:] if self.log.exists() else ""
                self.stop()
                raise StackError(f"redis-server did not answer on port {self.port}: {log}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        import redis

        if self.probe is None:
            return redis_answers(self.url)
        try:
            return bool(self.probe())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """Resume (if paused) and kill; safe to call twice."""
        self.resume()
        self.kill()

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (with persistence, appendfsync always lost nothing acknowledged)."""
        _signal(self.pid, signal.SIGKILL)
        _reap(self.pid)
        self.pid = 0

    def restart(self, *, keep_data: bool) -> None:
        """Kill, then start again on the same port; without `keep_data` the data directory is emptied first."""
        self.kill()
        if not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def pause(self) -> None:
        _signal(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        _signal(self.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
