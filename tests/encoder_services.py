"""The encoder services as subprocesses on the shared Redis (a test prefix), each optionally with its KServe v2 port:
what tests/integration/test_encoders.py and test_fuzz_kserve.py run against.

Test processes must never import kserve (or vita.encoders.kserve): the services run it in their own process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import grpc
import pytest
from conftest import REDIS_URL, delete_prefix
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from vita.bus.streams import BusConfig, Pool
from vita.runtime.ports import free_port


@dataclass
class Service:
    proc: subprocess.Popen
    grpc_port: int
    kserve_port: int
    metrics_port: int
    log: Path

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"service exited during start-up:\n{self.log.read_text()[-3000:]}"
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        pytest.fail(f"service not SERVING after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def batches(self, pool: Pool) -> tuple[float, float]:
        """(forward passes, items encoded) so far, from the service's Prometheus endpoint."""
        text = urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                  if s.labels.get("pool") == pool.value}
        return values.get("vita:batch_size_count", 0.0), values.get("vita:batch_size_sum", 0.0)


def start(pool: str, model_dir: Path, prefix: str, log: Path, *flags: str, kserve: bool = False) -> Service:
    grpc_port, metrics_port = free_port(), free_port()
    kserve_port = free_port() if kserve else 0
    argv = [sys.executable, "-m", "vita.encoders", pool, "--model", str(model_dir), "--redis", REDIS_URL,
            "--prefix", prefix, "--grpc-port", str(grpc_port), "--kserve-port", str(kserve_port),
            "--metrics-port", str(metrics_port), "--threads", "1", *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Service(proc, grpc_port, kserve_port, metrics_port, log)


@dataclass
class Services:
    bus: BusConfig
    vision: Service
    audio: Service


@contextlib.contextmanager
def encoder_services(model_dir: Path, logs: Path) -> Iterator[Services]:
    """One vision and one audio encoder, each with its KServe port, under a fresh test prefix."""
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex}")
    vision = start("vision-encoder", model_dir, bus.prefix, logs / "vision.log", kserve=True)
    audio = start("audio-encoder", model_dir, bus.prefix, logs / "audio.log", kserve=True)
    try:
        vision.wait_serving()
        audio.wait_serving()
        yield Services(bus, vision, audio)
    finally:
        vision.stop()
        audio.stop()
        delete_prefix(bus.prefix)  # after the workers stop: a deleted stream fails their blocked reads
