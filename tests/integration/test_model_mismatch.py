"""A pool that serves another model than its orchestrator (a rolling upgrade half done, one pool's --model pointing
elsewhere) refuses the jobs, naming both models, instead of answering garbage: real processes on the shared Redis,
the orchestrator on the tiny model of seed 0, an llm generator and a vision encoder on seed 1 (the same shapes and
tokenizer: only the weights differ), then a generator on seed 0 again."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import REDIS_URL, delete_prefix

from tests.service_process import running
from vita.client import VitaClient
from vita.model.fingerprint import model_fingerprint
from vita.runtime.ports import free_port
from vita.stack import ServiceProcess
from vita.tiny import build_tiny_checkpoint
from vita.v1.assistant_pb2 import GenerateRequest
from vita.v1.media_pb2 import Image, SamplingParams


def service(name: str, module_args: list[str], model: Path, prefix: str, log_dir: Path) -> ServiceProcess:
    port = free_port()
    return ServiceProcess(name, [sys.executable, "-m", *module_args, "--model", str(model), "--redis", REDIS_URL,
                                 "--prefix", prefix, "--grpc-port", str(port), "--plain-logs"],
                          port, str(log_dir / f"{name}.log"))


def refused(client: VitaClient, request: GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.generate(request):
            pass
    return err.value


@pytest.mark.timeout(600)
def test_a_pool_serving_another_model_refuses_the_jobs_naming_both(tiny_model_dir, wide_png, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "tiny-seed1", seed=1)
    mine, theirs = model_fingerprint(tiny_model_dir), model_fingerprint(other)
    assert mine != theirs
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    orchestrator = service("orchestrator", ["vita.orchestrator", "--encode-timeout", "60"], tiny_model_dir, prefix,
                           tmp_path)
    generator = service("llm-generator", ["vita.llm", "--role", "generator"], other, prefix, tmp_path)
    vision = service("vision-encoder", ["vita.encoders", "vision-encoder"], other, prefix, tmp_path)
    text = GenerateRequest(text="Hello", sampling=SamplingParams(max_tokens=4))
    picture = GenerateRequest(text="What is this?", images=[Image(data=wide_png.read_bytes(), mime_type="image/png")],
                              sampling=SamplingParams(max_tokens=4))
    try:
        with running(orchestrator, generator, vision), VitaClient(f"127.0.0.1:{orchestrator.grpc_port}") as client:
            for request, pool in ((text, "llm:generator"), (picture, "vision-encoder")):
                error = refused(client, request)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                assert f"the {pool} pool serves model {theirs}" in error.details()
                assert f"a job for model {mine}" in error.details()
            assert "job for another model refused" in Path(generator.log_path).read_text()
        # The same orchestrator's jobs are answered by a generator on its own model.
        generator = service("llm-generator", ["vita.llm", "--role", "generator"], tiny_model_dir, prefix, tmp_path)
        with running(orchestrator, generator), VitaClient(f"127.0.0.1:{orchestrator.grpc_port}") as client:
            _, done = client.ask("Hello", max_tokens=4)
            assert done.usage.completion_tokens > 0
    finally:
        delete_prefix(prefix)
