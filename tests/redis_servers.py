"""Real redis-server processes on free loopback ports for tests that need their own server: ACL users, TLS,
a Redis Cluster. One server is `vita.stack.RedisServer` (the fault drills' too); this module joins them into a
Cluster."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis

from vita.runtime.ports import free_port
from vita.stack import RedisServer


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: install Redis 7 (make setup)")
    return path


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
                node = RedisServer(str(directory / f"node{k}"), args=(
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                    "5000", "--cluster-port", str(free_port()), *args))
                node.probe = self._pinger(node)
                self.nodes.append(node.start())
            self._create()
        except BaseException:
            self.stop()
            raise

    def _pinger(self, node: RedisServer):
        def ping() -> bool:
            with self.admin(node) as client:
                return bool(client.ping())
        return ping

    def _create(self) -> None:
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
