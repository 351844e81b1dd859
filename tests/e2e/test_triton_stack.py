"""The local stack with both LLM pools on `--backend triton`: a real tritonserver serving the tiny model.

The Triton path as a deployment runs it (orchestrator -> Redis -> llm worker -> TritonBackend -> Triton), with
the CPU model repository standing in for TensorRT-LLM (see docs/serving.md for what that changes).
"""

import uuid

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from vita.client import VitaClient, build_request
from vita.inference import GenerationRequest, VitaPipeline
from vita.llm.backends.triton.server import TritonServer, write_cpu_repository
from vita.model.generation import SamplingParams
from vita.stack import LocalStack
from vita.v1.assistant_pb2 import Completed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repository = write_cpu_repository(root / "repository", tiny_model_dir, max_batch_size=4, models=["tensorrt_llm"],
                                      torch_threads=torch.get_num_threads())
    with TritonServer(repository, root / "tritonserver.log") as server:
        yield server


def generated_tokens(server: TritonServer) -> float:
    for family in text_string_to_metric_families(server.metrics()):
        if family.name == "vita:generation_tokens":
            return sum(sample.value for sample in family.samples)
    raise AssertionError("the model exports no vita:generation_tokens")


def run(client, request):
    tokens, done = [], None
    for r in client.generate(request):
        if r.HasField("delta"):
            tokens += list(r.delta.token_ids)
        else:
            done = r.completed
    return tokens, done


def test_generate_through_triton_streams_the_in_process_answer(triton, tiny_model_dir, tmp_path, wide_png,
                                                              speech_wav):
    args = ["--backend", "triton", "--triton-url", triton.grpc_url]
    before = generated_tokens(triton)
    with LocalStack(model_dir=str(tiny_model_dir), prefix=f"tri{uuid.uuid4().hex[:8]}", log_dir=str(tmp_path),
                    extra_args={"llm-generator": args, "llm-monitor": args}) as stack, \
            VitaClient(stack.target, timeout_s=120) as client:
        text_tokens, text_done = run(client, build_request("What is the capital of France?", max_tokens=12))
        media_tokens, media_done = run(client, build_request("What do you see and hear?", max_tokens=8,
                                                             images=[wide_png], audio=[speech_wav]))
    pipeline = VitaPipeline.load(tiny_model_dir)
    events = list(pipeline.stream(GenerationRequest(text="What is the capital of France?",
                                                    sampling=SamplingParams(12))))
    assert text_tokens == [t for e in events for t in e.token_ids]  # greedy, no prompt table: the same tokens
    assert text_done.finish_reason in (Completed.STOP, Completed.LENGTH)
    assert text_done.usage.prompt_tokens == events[-1].usage.prompt_tokens
    # the encoders' embeddings reach the engine as TensorRT-LLM's prompt table (FP16 on the wire)
    assert media_done.finish_reason in (Completed.STOP, Completed.LENGTH) and media_done.usage.image_tokens > 0
    assert 1 <= len(media_tokens) <= 8
    assert generated_tokens(triton) >= before + len(text_tokens) + len(media_tokens)  # Triton generated them
