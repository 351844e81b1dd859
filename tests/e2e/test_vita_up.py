"""`vita up` / `vita down` as a user runs them: the demo's duplex model, every service with its metrics endpoint, on a
Redis port where none answers: `vita up` starts one, `vita down` stops it."""

import os
import subprocess
import sys
import urllib.request
import uuid

import pytest

from vita.client import ConverseSession, VitaClient, text_event
from vita.runtime.ports import free_port
from vita.stack import LocalStack, redis_answers

pytestmark = pytest.mark.slow


def test_vita_up_serves_the_duplex_model_with_every_metrics_endpoint(duplex_model_dir, tmp_path):
    home = tmp_path / "vita-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / duplex_model_dir.name).symlink_to(duplex_model_dir)  # built once per VITA_HOME
    env = {**os.environ, "VITA_HOME": str(home)}
    port = free_port()
    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers there

    def vita(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vita.cli", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    up = vita("up", "--port", str(port), "--realtime-port", str(free_port()), "--prefix", f"up{uuid.uuid4().hex[:8]}",
              "--redis", redis_url)
    try:
        assert up.returncode == 0, up.stderr
        stack = LocalStack.load(home / "stack.json")
        assert stack.redis_pid and redis_answers(redis_url)  # a user's try (2026-12-06): it was left running
        assert stack.model_dir == str(home / "models" / duplex_model_dir.name)  # not the random tiny model
        assert {s.name for s in stack.services} == {"audio-encoder", "vision-encoder", "llm-generator",
                                                     "llm-monitor", "orchestrator", "realtime"}
        for service in stack.services:
            if service.name == "realtime":
                continue  # the Realtime gateway exports no metrics of its own
            assert service.metrics_port, service.name
            endpoint = f"http://127.0.0.1:{service.metrics_port}/metrics"
            assert endpoint in up.stdout
            assert "vita:" in urllib.request.urlopen(endpoint, timeout=10).read().decode()
        with VitaClient(f"127.0.0.1:{port}", timeout_s=None) as client, ConverseSession(client) as s:
            s.send(text_event("What is in the picture?"))
            s.wait("completed", timeout_s=120)
            s.close()
        assert "vita:converse_active_sessions" in urllib.request.urlopen(
            f"http://127.0.0.1:{stack.service('orchestrator').metrics_port}/metrics", timeout=10).read().decode()
    finally:
        down = vita("down")
    assert down.returncode == 0, down.stderr
    assert "stack stopped" in down.stdout and not stack.running()  # vita down's services are not its children
    assert f"and the redis-server it started, pid {stack.redis_pid}" in down.stdout and not stack.redis_alive()
    assert not redis_answers(redis_url)
    assert not (home / "stack.json").exists()
    again = vita("down")  # stopping what is stopped succeeds, as `docker compose down` does
    assert (again.returncode, again.stderr) == (0, ""), again.stderr
    assert again.stdout.startswith("no stack is up: nothing to stop")
