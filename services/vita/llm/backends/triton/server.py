"""A real Triton Inference Server on any x86-64 Linux machine: the `tritonserver` of the nvidia-pytriton wheel.

The wheel (installed by `make setup` without its dependencies; see requirements-nodeps.lock) ships Triton's
server binary (2.51), its shared libraries (`nvidia_pytriton.libs/`) and the Python backend with one stub
executable per Python version. Two steps make it serve Python-backend models here, on the CPU:

- `prepare()` copies the stub for this interpreter next to `backends/python/libtriton_python.so`, where the
  backend looks for it. Its RPATH reaches the wheel's libraries from there as from where it was. Idempotent.
- `server_env()` puts this interpreter's `libpython3.X.so` first on LD_LIBRARY_PATH: the stub embeds it, and the
  loader would otherwise take a system libpython of another build, or find none.

`write_cpu_repository()` writes the CPU model repository (`model_repository_cpu`: the `tensorrt_llm` model and
the two encoders, with their parameters filled in)
and `TritonServer` runs tritonserver on loopback ports and waits on its readiness endpoint. The tests use both;
from the shell:

    python -m vita.llm.backends.triton.server prepare             # prints the tritonserver path
    python -m vita.llm.backends.triton.server run [--checkpoint DIR] [--grpc-port 8001] ...
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import filecmp
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vita.errors import VitaError
from vita.runtime.ports import free_port

MODEL_NAME = "tensorrt_llm"
CPU_TEMPLATE = Path(__file__).resolve().parents[5] / "model_repository_cpu"  # the repository's checkout


class TritonUnavailable(VitaError):
    """tritonserver is not installed, cannot run here, or did not become ready; the message says which."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the installed wheel."""

    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def libs(self) -> Path:
        return self.root.parents[1] / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        return self.backends / "python" / "triton_python_backend_stub"


def find_install() -> TritonInstall:
    """The wheel's tritonserver, located without importing `pytriton` (whose own dependencies are not installed)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable("nvidia-pytriton is not installed: `make setup` installs the version pinned in "
                                "requirements-nodeps.lock")
    install = TritonInstall(Path(next(iter(spec.submodule_search_locations))) / "tritonserver")
    if not install.binary.is_file():
        raise TritonUnavailable(f"{install.binary} is missing: the nvidia-pytriton wheel for this platform "
                                f"ships no tritonserver")
    return install


def prepare(install: TritonInstall | None = None) -> TritonInstall:
    """Put the Python backend stub for this interpreter where the backend looks for it. Safe to run concurrently."""
    install = install or find_install()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = install.root / "python_backend_stubs"
    source = stubs / version / "triton_python_backend_stub"
    if not source.is_file():
        shipped = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonUnavailable(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} "
                                f"(it ships {shipped})")
    if not (install.stub.is_file() and filecmp.cmp(source, install.stub, shallow=False)):
        staging = install.stub.with_name(f".{install.stub.name}.{os.getpid()}")
        shutil.copyfile(source, staging)
        staging.chmod(0o755)
        os.replace(staging, install.stub)  # atomic: a concurrent run never executes half a file
    _libpython_dir()  # fail here, with the reason, rather than at the first model load
    return install


def _libpython_dir() -> str | None:
    """The directory of this interpreter's shared libpython, or None when the loader finds one by itself."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return sysconfig.get_config_var("LIBDIR")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ctypes.util.find_library(f"python{version}") is None:
        raise TritonUnavailable(f"Triton's Python backend stub links libpython{version}.so, and this Python "
                                f"({sys.executable}) was built without it (no --enable-shared) and none is "
                                f"installed")
    return None


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver runs in: `base` (default os.environ) with the library path it needs."""
    env = dict(os.environ if base is None else base)
    paths = [_libpython_dir(), str(install.libs), env.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    return env


ENCODER_MODELS = ("audio-encoder", "vision-encoder")
CPU_MODELS = (MODEL_NAME, *ENCODER_MODELS)


def write_cpu_repository(destination: str | Path, checkpoint: str | Path, *, max_batch_size: int = 8,
                         max_seq_len: int = 0, torch_threads: int = 0, cancellation_check_period_ms: int = 20,
                         models: Sequence[str] = CPU_MODELS, template: Path = CPU_TEMPLATE) -> Path:
    """Copy the `models` of `model_repository_cpu` to `destination`, with this checkout's code, virtualenv and
    `checkpoint` (the encoders need a model with their tower; a text-only one serves `tensorrt_llm` alone).

    max_batch_size, max_seq_len and cancellation_check_period_ms are the LLM's (max_seq_len 0: the model's
    context). torch_threads 0: torch's default. Returns `destination`.
    Raises TritonUnavailable without a virtualenv: Triton's Python backend activates one (EXECUTION_ENV_PATH).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    import vita

    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        raise TritonUnavailable(f"{sys.prefix} is not a virtualenv; Triton's Python backend needs one "
                                "(EXECUTION_ENV_PATH): run under `make setup`'s .venv")
    if max_batch_size < 1 or max_seq_len < 0 or torch_threads < 0 or cancellation_check_period_ms < 1:
        raise ValueError("max_batch_size and cancellation_check_period_ms must be >= 1, the others >= 0")
    unknown = sorted(set(models) - set(CPU_MODELS))
    if unknown or not models:
        raise ValueError(f"models must be some of {list(CPU_MODELS)}; got {list(models)}")
    destination = Path(destination)
    common = {
        "EXECUTION_ENV_PATH": sys.prefix,
        "vita_path": str(Path(vita.__file__).resolve().parents[1]),
        "checkpoint_dir": str(Path(checkpoint).resolve()),
        "torch_threads": str(torch_threads),
    }
    for name in models:
        shutil.copytree(template / name, destination / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        path = destination / name / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        values = dict(common)
        if name == MODEL_NAME:
            config.max_batch_size = max_batch_size
            del config.dynamic_batching.preferred_batch_size[:]
            config.dynamic_batching.preferred_batch_size.append(max_batch_size)
            values.update(max_seq_len=str(max_seq_len), cancellation_check_period_ms=str(cancellation_check_period_ms))
        for key, value in values.items():
            config.parameters[key].string_value = value
        path.write_text(f"# Written by vita.llm.backends.triton.server.write_cpu_repository from {template}\n"
                        + text_format.MessageToString(config))
    return destination


@dataclass
class TritonServer:
    """tritonserver as a child process: `start()` returns once its readiness endpoint answers 200; `stop()`.

    Ports 0 pick free ones. The log (server, backend and model) goes to `log_path`, whose tail a failure quotes.
    """

    repository: Path
    log_path: Path
    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout_s: float = 180.0
    exit_timeout_s: int = 10
    extra_args: Sequence[str] = ()
    process: subprocess.Popen | None = field(default=None, init=False)
    _shm_prefix: str = field(default_factory=lambda: f"vita_triton_{uuid.uuid4().hex[:12]}_", init=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self) -> TritonServer:
        install = prepare()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        argv = [
            str(install.binary), f"--model-repository={self.repository}",
            f"--backend-directory={install.backends}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",  # no CUDA here: no warnings about it
            "--strict-readiness=true", "--exit-on-error=true", f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self.extra_args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=server_env(install), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.ready():
            if self.process.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with status {self.process.returncode} before it "
                                        f"was ready:\n{self.log_errors()}\n(log: {self.log_path})")
            if time.monotonic() > deadline:
                raise TritonUnavailable(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s:\n"
                                        f"{self.log_errors()}\n(log: {self.log_path})")
            time.sleep(0.1)

    def ready(self) -> bool:
        """GET /v2/health/ready: 200 once the server and (strict readiness) every model are ready."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        """The Prometheus text of Triton's metrics port."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def log_errors(self, tail: int = 20) -> str:
        """The log's error lines (first line of each message), or its last `tail` lines when it has none."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line.split("\\n")[0] for line in lines
                  if (line.startswith("E") and "CudaDriverHelper" not in line) or line.startswith("error:")]
        return "\n".join(errors or lines[-tail:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the process group; removes the Python backend's shared memory if it is left.

        On SIGTERM Triton unloads its models once no request holds them, waiting up to exit_timeout_s. Sequences
        in flight keep streaming meanwhile, and past that timeout tritonserver 2.51 logs "Exiting immediately" but
        stays up while they do (seen here); the SIGKILL, exit_timeout_s + 5 s after the SIGTERM, ends it.
        """
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.exit_timeout_s + 5)
        with contextlib.suppress(ProcessLookupError):  # the model stubs are this group's other members
            os.killpg(process.pid, signal.SIGKILL)
        status = process.wait()
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):  # left behind by a server that was killed
            region.unlink(missing_ok=True)
        return status

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- command line ---------------------------------------------------------------------------------------------

def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vita.llm.backends.triton.server",
                                description="The nvidia-pytriton wheel's tritonserver, on this machine's CPU.")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="put the Python backend stub in place; print the tritonserver path")
    run = commands.add_parser("run", help="serve the CPU model repository (TensorRT-LLM's tensor names on the "
                                          "torch engine, and the encoders) until SIGINT/SIGTERM")
    run.add_argument("--checkpoint", default=None, help="model directory (default: the tiny model)")
    run.add_argument("--repository", default=None, help="where to write the repository (default: a temp dir)")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--http-port", type=int, default=8000)
    run.add_argument("--grpc-port", type=int, default=8001)
    run.add_argument("--metrics-port", type=int, default=8002)
    run.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    run.add_argument("--max-seq-len", type=int, default=0, help="KV cache length per sequence (0: the model's)")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads per model (0: torch's default)")
    run.add_argument("--models", nargs="+", choices=CPU_MODELS, default=list(CPU_MODELS),
                     help="the models to serve (the encoders need a checkpoint with their tower)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        install = prepare()
        if args.command == "prepare":
            print(install.binary)
            return 0
        if args.checkpoint is None:
            from vita.tiny import build_tiny_checkpoint

            args.checkpoint = build_tiny_checkpoint()
        if not Path(args.checkpoint, "config.json").is_file():
            raise TritonUnavailable(f"{args.checkpoint} is not a model directory (no config.json)")
        repository = Path(args.repository or tempfile.mkdtemp(prefix="vita-triton-"))
        write_cpu_repository(repository, args.checkpoint, max_batch_size=args.max_batch,
                             max_seq_len=args.max_seq_len, torch_threads=args.threads, models=args.models)
        server = TritonServer(repository, repository / "tritonserver.log", host=args.host,
                              http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
        stopped = False

        def on_signal(*_: object) -> None:
            nonlocal stopped
            stopped = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
    except (VitaError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}; "
          f"repository {repository}, log {server.log_path}", flush=True)
    while not stopped and server.process.poll() is None:
        time.sleep(0.5)
    status = server.stop()
    return 0 if stopped else (status or 1)


if __name__ == "__main__":
    sys.exit(main())
