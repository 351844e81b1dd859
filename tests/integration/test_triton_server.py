"""The installed tritonserver and the CPU model repository: preparation, the repository's tensors, failures.

TritonBackend's own tests against the running server are in test_triton_backend.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from vita.llm.backends.triton.server import (
    CPU_TEMPLATE,
    ENCODER_MODELS,
    MODEL_NAME,
    TritonServer,
    TritonUnavailable,
    find_install,
    prepare,
    server_env,
    write_cpu_repository,
)

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_prepare_puts_this_pythons_stub_next_to_the_python_backend_once():
    install = prepare()
    stub = install.stub
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = install.root / "python_backend_stubs" / version / "triton_python_backend_stub"
    assert stub.read_bytes() == source.read_bytes() and os.access(stub, os.X_OK)
    assert stub.parent == install.backends / "python" and (stub.parent / "libtriton_python.so").is_file()
    written = stub.stat().st_mtime_ns
    assert prepare().stub == stub and stub.stat().st_mtime_ns == written  # idempotent: nothing rewritten
    env = server_env(install, {"LD_LIBRARY_PATH": "/elsewhere"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[-2:] == [str(install.libs), "/elsewhere"]
    assert (install.libs / next(p.name for p in install.libs.iterdir() if p.name.startswith("libtritonserver")))


def test_the_cpu_model_has_exactly_the_tensorrt_llm_models_name_and_tensors():
    gpu, cpu = parse(REPOSITORY / MODEL_NAME / "config.pbtxt"), parse(CPU_TEMPLATE / MODEL_NAME / "config.pbtxt")
    assert cpu.name == gpu.name == MODEL_NAME
    assert list(cpu.input) == list(gpu.input) and list(cpu.output) == list(gpu.output)
    assert gpu.backend == "tensorrtllm" and cpu.backend == "python"
    assert cpu.model_transaction_policy.decoupled and gpu.model_transaction_policy.decoupled
    assert cpu.parameters["checkpoint_dir"].string_value == "${checkpoint_dir}"  # a template, as the GPU one is


def test_write_cpu_repository_fills_in_the_parameters(tmp_path):
    checkpoint = tmp_path / "model"
    repository = write_cpu_repository(tmp_path / "repository", checkpoint, max_batch_size=3, max_seq_len=64,
                                      torch_threads=1, cancellation_check_period_ms=7)
    config = parse(repository / MODEL_NAME / "config.pbtxt")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {
        "EXECUTION_ENV_PATH": sys.prefix, "checkpoint_dir": str(checkpoint.resolve()),
        "vita_path": str(Path(__import__("vita").__file__).resolve().parents[1]),
        "max_seq_len": "64", "torch_threads": "1", "cancellation_check_period_ms": "7",
    }
    assert config.max_batch_size == 3 and list(config.dynamic_batching.preferred_batch_size) == [3]
    assert list(config.input) == list(parse(CPU_TEMPLATE / MODEL_NAME / "config.pbtxt").input)
    assert (repository / MODEL_NAME / "1" / "model.py").read_bytes() == (
        CPU_TEMPLATE / MODEL_NAME / "1" / "model.py").read_bytes()
    for encoder in ENCODER_MODELS:  # the encoders take the common parameters and keep their own batch size
        config = parse(repository / encoder / "config.pbtxt")
        assert config.name == encoder and config.max_batch_size == parse(CPU_TEMPLATE / encoder / "config.pbtxt").max_batch_size
        assert {key: value.string_value for key, value in config.parameters.items()} == {
            key: parameters[key] for key in ("EXECUTION_ENV_PATH", "checkpoint_dir", "vita_path", "torch_threads")
        } | {"dtype": "float32"}
    with pytest.raises(ValueError, match="max_batch_size"):
        write_cpu_repository(tmp_path / "bad", checkpoint, max_batch_size=0)
    with pytest.raises(ValueError, match=r"models must be some of \['tensorrt_llm', 'audio-encoder', 'vision-encoder'\]"):
        write_cpu_repository(tmp_path / "bad", checkpoint, models=["llm"])
    only = write_cpu_repository(tmp_path / "only-llm", checkpoint, models=[MODEL_NAME])
    assert sorted(p.name for p in only.iterdir()) == [MODEL_NAME]


def test_the_encoder_models_take_what_their_kserve_models_take_under_the_same_names():
    """Same model names and output as `vita serve <pool> --kserve-port`; the inputs are among the KServe model's."""
    from vita.encoders.audio import AudioTowerEncoder
    from vita.encoders.vision import VisionTowerEncoder

    for encoder in (AudioTowerEncoder, VisionTowerEncoder):
        config = parse(CPU_TEMPLATE / encoder.pool.value / "config.pbtxt")
        assert config.name == encoder.pool.value and config.backend == "python"
        assert [(o.name, model_config_pb2.DataType.Name(o.data_type)) for o in config.output] == [
            ("embeddings", "TYPE_FP32")]
        assert {i.name for i in config.input} == {i["name"] for i in encoder.v2_inputs}
        assert all(i.optional and i.allow_ragged_batch for i in config.input)
        # no BYTES: the stub cannot read them under numpy 2 (vita.runtime.triton_python)
        assert {model_config_pb2.DataType.Name(i.data_type) for i in config.input} <= {"TYPE_UINT8", "TYPE_FP32"}
        assert config.parameters["checkpoint_dir"].string_value == "${checkpoint_dir}"


def test_a_model_that_cannot_load_stops_the_start_with_the_models_error(tmp_path):
    repository = write_cpu_repository(tmp_path / "repository", tmp_path / "no-such-model")
    server = TritonServer(repository, tmp_path / "tritonserver.log")
    with pytest.raises(TritonUnavailable) as failed:
        server.start()
    lines = str(failed.value).splitlines()
    assert lines[0] == "tritonserver exited with status 1 before it was ready:"
    assert any("failed to load 'tensorrt_llm'" in line and "no-such-model: no such directory" in line
               for line in lines)
    assert lines[-1] == f"(log: {server.log_path})" and len(lines) < 10
    assert server.process is None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vita.llm.backends.triton.server", *args],
                          capture_output=True, text=True, timeout=120)


def test_the_command_line_prepares_and_refuses_a_bad_checkpoint_in_one_line(tmp_path):
    prepared = run_cli("prepare")
    assert prepared.returncode == 0 and prepared.stdout.strip() == str(find_install().binary)
    refused = run_cli("run", "--checkpoint", str(tmp_path))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [f"error: {tmp_path} is not a model directory (no config.json)"]


PROBE_MODEL = '''
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "x")
            by_numpy = torch.from_numpy(tensor.as_numpy().astype("float32"))
            by_dlpack = torch.from_dlpack(tensor.to_dlpack()).float()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("by_numpy", by_numpy),
                                                         pb_utils.Tensor.from_dlpack("by_dlpack", by_dlpack)]))
        return responses
'''


def test_the_stubs_numpy_bridge_misreads_numpy_2_arrays_which_is_why_the_models_use_dlpack(tmp_path):
    """The reason the CPU models take tensors by DLPack, and no BYTES (docs/serving.md, "Encoders on Triton").
    Fails once the wheel's stub reads numpy 2 arrays right: then BYTES inputs may work, and this note is stale."""
    import numpy as np
    import tritonclient.grpc as triton

    model = tmp_path / "repository" / "probe"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(PROBE_MODEL)
    (model / "config.pbtxt").write_text(
        'name: "probe"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{name: "x", data_type: TYPE_UINT8, dims: [-1]}]\n'
        'output [{name: "by_numpy", data_type: TYPE_FP32, dims: [-1]}, '
        '{name: "by_dlpack", data_type: TYPE_FP32, dims: [-1]}]\n'
        'instance_group [{count: 1, kind: KIND_CPU}]\n'
        f'parameters: {{key: "EXECUTION_ENV_PATH", value: {{string_value: "{sys.prefix}"}}}}\n')
    with TritonServer(tmp_path / "repository", tmp_path / "tritonserver.log") as server, \
            triton.InferenceServerClient(server.grpc_url) as client:
        x = triton.InferInput("x", [5], "UINT8")
        x.set_data_from_numpy(np.array([1, 2, 3, 4, 5], np.uint8))
        result = client.infer("probe", [x])
    assert result.as_numpy("by_dlpack").tolist() == [1, 2, 3, 4, 5]
    assert result.as_numpy("by_numpy").tolist() == [1, 1, 1, 1, 1]  # the first element, repeated
