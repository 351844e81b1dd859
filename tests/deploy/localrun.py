"""Runs what a rendered chart would run, here: its Redis and vita containers as local processes with exactly the
rendered command, args and env. Only addresses change: cluster hosts become 127.0.0.1, ports become free ones,
volume mount paths become local directories (the model PVC: a model directory given by the caller)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.deploy import k8s
from vita.errors import PortInUse
from vita.runtime.ports import free_port
from vita.stack import ServiceProcess, StackError, wait_healthy

GATEWAYS = {"realtime"}  # components that call other Services of the release: started after them


@dataclass
class LocalProcess:
    name: str  # the component (orchestrator, llm-generator, ...)
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ports: dict[str, int]  # container port name -> local port
    labels: dict[str, str]
    proc: subprocess.Popen | None = None


@dataclass
class LocalRelease:
    """The processes of one rendered release; `replace` maps every cluster address and path to its local one."""

    docs: list[dict]
    work: Path
    volumes: dict[str, Path]  # volume name (in the pod specs) -> local directory
    replace: dict[str, str] = field(default_factory=dict)
    redis_port: int = 0
    processes: list[LocalProcess] = field(default_factory=list)
    attempts: int = 0  # starts it took (more than one: a port was taken meanwhile)

    def _local(self, text: str) -> str:
        """One pass, longest match first, so a replacement is never rewritten again (local dirs live in /tmp)."""
        keys = sorted(self.replace, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(k) + (r"(?![\w.-])" if k.startswith("/") else "") for k in keys))
        return pattern.sub(lambda m: self.replace[m.group(0)], text)

    def _mounts(self, spec: dict, container: dict, name: str, claims: tuple[str, ...] = ()) -> None:
        """Each volume mount's path in the container maps to a local directory (emptyDirs: fresh ones)."""
        for mount in container.get("volumeMounts", []):
            local = self.volumes.get(mount["name"])
            if local is None:
                local = self.work / name / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
            if mount.get("subPath"):
                local = local / mount["subPath"]
            self.replace[mount["mountPath"]] = str(local)
        declared = {v["name"] for v in spec.get("volumes", [])} | set(claims)
        assert declared >= {m["name"] for m in container.get("volumeMounts", [])}, f"{name}: undeclared volume"

    def start(self, timeout_s: float = 240.0, attempts: int = 3) -> LocalRelease:
        """Start Redis and every container, wait until each is healthy. As LocalStack.start: the ports are picked
        free seconds before the processes bind them, so a process that exits with PortInUse starts the whole
        release again on fresh ports, up to `attempts` times."""
        for attempt in range(1, attempts + 1):
            self.attempts = attempt
            try:
                return self._start_once(timeout_s)
            except StackError as e:
                if attempt == attempts or PortInUse.MARK not in str(e):
                    raise
                self.replace, self.processes = {}, []
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> LocalRelease:
        secrets = k8s.secret_values(self.docs)
        self.redis_port = free_port()
        # Cluster DNS names of the release's Services -> loopback.
        for service in k8s.named(self.docs, "Service"):
            self.replace[f"{service['metadata']['name']}.{k8s.NAMESPACE}.svc"] = "127.0.0.1"
        self.replace[":6379"] = f":{self.redis_port}"
        self._start_redis(secrets)
        # The services first; then the gateways, which call them through their Services (`host:port` -> the
        # local port of the container port the Service targets).
        containers = list(k8s.vita_containers(self.docs))
        for workload, container in containers:
            if k8s.component(workload) not in GATEWAYS:
                self._start_vita(workload, container, secrets)
        self._map_service_ports()
        for workload, container in containers:
            if k8s.component(workload) in GATEWAYS:
                self._start_vita(workload, container, secrets)
        try:
            for p in self.processes:
                http = "grpc" not in p.ports  # the Realtime gateway: GET /healthz on its WebSocket port
                port = p.ports["http" if http else "grpc"]
                wait_healthy(ServiceProcess(p.name, p.argv, port, str(p.log_path), pid=p.proc.pid,
                                            health="http" if http else "grpc"), timeout_s)
        except Exception:
            self.stop()
            raise
        return self

    def _map_service_ports(self) -> None:
        """`<service>.<namespace>.svc:<port>` of every started process' Service -> 127.0.0.1:<its local port>."""
        for service in k8s.named(self.docs, "Service"):
            selector = service["spec"].get("selector") or {}
            for p in self.processes:
                if selector and all(p.labels.get(k) == v for k, v in selector.items()):
                    for port in service["spec"]["ports"]:
                        if port["targetPort"] in p.ports:
                            address = f"{service['metadata']['name']}.{k8s.NAMESPACE}.svc:{port['port']}"
                            self.replace[address] = f"127.0.0.1:{p.ports[port['targetPort']]}"

    def _start_redis(self, secrets: dict) -> None:
        sts = k8s.one(self.docs, "StatefulSet", f"{k8s.RELEASE}-redis")
        spec = sts["spec"]["template"]["spec"]
        container = spec["containers"][0]
        (self.work / "redis").mkdir(parents=True, exist_ok=True)
        self.volumes.setdefault("data", self.work / "redis" / "data")
        self.volumes["data"].mkdir(parents=True, exist_ok=True)
        claims = tuple(t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", []))
        self._mounts(spec, container, "redis", claims)
        env = k8s.container_env(container, secrets, {})
        args = [self._local(k8s.expand(a, env)) for a in container["args"]]
        args[args.index("--port") + 1] = str(self.redis_port)
        argv = [shutil.which(container["command"][0]), *args, "--bind", "127.0.0.1"]
        log = self.work / "redis.log"
        proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.processes_redis = proc
        client = redis.Redis(port=self.redis_port, password=env["REDIS_PASSWORD"] or None)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None and "Address already in use" in log.read_text():
                    raise StackError(f"redis: cannot listen on 127.0.0.1:{self.redis_port}: {PortInUse.MARK}") from None
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis did not start: {log.read_text()}") from None
                time.sleep(0.1)

    def _start_vita(self, workload: dict, container: dict, secrets: dict) -> None:
        name = k8s.component(workload)
        spec = k8s.pod_spec(workload)
        self._mounts(spec, container, name)
        fields = {"metadata.name": f"{name}-0", "metadata.namespace": k8s.NAMESPACE}
        env = {k: self._local(v) for k, v in k8s.container_env(container, secrets, fields).items()}
        ports = {p["name"]: free_port() for p in container["ports"]}
        args = [self._local(k8s.expand(a, env)) for a in container["args"]]
        for flag_name, port_name in (("--grpc-port", "grpc"), ("--metrics-port", "metrics"), ("--kserve-port", "h2c"),
                                     ("--port", "http")):
            if flag_name in args:
                args[args.index(flag_name) + 1] = str(ports[port_name])
        args[args.index("--host") + 1] = "127.0.0.1"
        # The image's entrypoint `vita` is the console script of vita.cli:main.
        argv = [sys.executable, "-m", "vita.cli", *args]
        log = self.work / f"{name}.log"
        process_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=process_env,
                                start_new_session=True)
        self.processes.append(LocalProcess(name, argv, env, log, ports, k8s.pod_labels(workload), proc))

    def process(self, name: str) -> LocalProcess:
        return next(p for p in self.processes if p.name == name)

    def stop(self) -> None:
        for p in [*self.processes, getattr(self, "processes_redis", None)]:
            proc = p.proc if isinstance(p, LocalProcess) else p
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in [*self.processes, getattr(self, "processes_redis", None)]:
            proc = p.proc if isinstance(p, LocalProcess) else p
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
