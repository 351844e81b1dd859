"""Real redis-server processes on free loopback ports for tests that need their own server: ACL users, TLS,
a Redis Cluster. Each runs without persistence in its own directory and is stopped (its pid only) at exit."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from vita.runtime.ports import free_port


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: install Redis 7 (make setup)")
    return path


class RedisServer:
    """`redis-server` with `args` (e.g. ["--aclfile", path]) on a free port; `tls=True` serves only TLS there."""

    def __init__(self, directory: Path, args: Sequence[str] = (), *, tls: bool = False) -> None:
        self.directory, self.port, self.tls = directory, free_port(), tls
        directory.mkdir(parents=True, exist_ok=True)
        ports = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.log = directory / "redis.log"
        self.proc = subprocess.Popen(
            [_require("redis-server"), "--bind", "127.0.0.1", *ports, "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--logfile", str(self.log), *args])

    def wait_ready(self, probe: redis.Redis, timeout_s: float = 20.0) -> None:
        """Until `probe` (a client that may log in) answers PING; fails with the server's log otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                probe.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()  # a fixture that fails here never reaches its teardown
                    pytest.fail(f"redis-server on {self.port} did not answer: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisCluster:
    """A Redis Cluster of `masters` masters (no replicas) on loopback: redis-server --cluster-enabled yes per
    node (plus `args`, e.g. an ACL file), joined by `redis-cli --cluster create ... --cluster-yes`, ready when
    every node reports cluster_state:ok. `admin_password`: the default user's, when `args` set one."""

    def __init__(self, directory: Path, masters: int = 3, args: Sequence[str] = (),
                 admin_password: str | None = None) -> None:
        # The cluster bus port is given, not left at port + 10000 (over 65535 for an ephemeral port).
        self.nodes: list[RedisServer] = []
        self.admin_password = admin_password
        try:  # a node that fails to start must not leave the others running
            for k in range(masters):
                self.nodes.append(RedisServer(directory / f"node{k}", [
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                    "5000", "--cluster-port", str(free_port()), *args]))
            self._create()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        for node in self.nodes:
            node.wait_ready(self.admin(node))
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        auth = ["-a", self.admin_password, "--no-auth-warning"] if self.admin_password else []
        created = subprocess.run([_require("redis-cli"), *auth, "--cluster", "create", *addresses, "--cluster-yes"],
                                 capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout[-2000:]} {created.stderr[-2000:]}")
        deadline = time.monotonic() + 30
        for node in self.nodes:
            with self.admin(node) as client:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO", NEVER_DECODE=True):
                    if time.monotonic() > deadline:
                        pytest.fail("the Redis Cluster did not reach cluster_state:ok in 30 s")
                    time.sleep(0.1)

    def admin(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, password=self.admin_password)

    def url(self, user: str = "", password: str = "") -> str:
        auth = f"{user}:{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
