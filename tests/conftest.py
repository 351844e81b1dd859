"""Fixtures shared by every test layer: the tiny model on disk, media made on the spot, Redis key cleanup."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

# isort: off
import vita  # noqa: F401  before torch: its import sets the OpenMP spin policy (services/vita/__init__.py)
# isort: on
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from redis import Redis

    from vita.client import VitaClient
    from vita.stack import LocalStack

torch.set_num_threads(2)

# The Triton MoE kernel (vita/model/fused_moe.py) is tested under Triton's CPU interpreter, which must be chosen
# before anything imports triton (its own jitted helpers, tl.sum among them, are built at import). The kernel runs
# only where asked (`use_fused_moe`, off by default), so nothing else in the suite changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fuzzing profiles: `ci` (the default) is derandomized and small enough for 2 busy cores; HYPOTHESIS_PROFILE=deep
# explores more (random seeds, more examples) when run by hand.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, suppress_health_check=_SLOW_OK,
                          database=None, print_blob=True)
settings.register_profile("deep", max_examples=500, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REDIS_URL = os.environ.get("VITA_REDIS_URL", "redis://127.0.0.1:6379/0")


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ as a module (`load_benchmark("serving")`), registered in sys.modules, where its
    dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def abandon_at(stream, index: int) -> None:
    """Read a backend's token stream up to the output of `index`, then close it, as a caller who walks away does
    (`from conftest import abandon_at`)."""
    async for out in stream:
        if out.index == index:
            break
    await stream.aclose()


def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """`vita.stack.delete_prefix` on the tests' Redis: every key under `prefix:`, the bus prefix a test worked under
    (the Redis is shared). Call it after the test's workers stop. Test modules import it (`from conftest import
    delete_prefix`); tests that need no particular order take the `redis_prefix` fixture."""
    from vita.stack import delete_prefix as delete

    delete(prefix, url)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh `test:{uuid}` bus prefix whose keys are deleted when the test is done."""
    prefix = f"test:{uuid.uuid4().hex}"
    yield prefix
    delete_prefix(prefix)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with seeded random weights and the built-in tokenizer, written once per session."""
    from vita.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def espeak(path: Path, text: str) -> Path:
    """Real synthetic speech; espeak-ng is installed by `make setup`."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run `make setup`")
    subprocess.run(["espeak-ng", "-s", "160", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return espeak(tmp_path_factory.mktemp("speech") / "question.wav", "What colour is the square?")


@pytest.fixture(scope="session")
def wide_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """896x448: two tiles plus a thumbnail."""
    img = Image.new("RGB", (896, 448), (230, 230, 230))
    ImageDraw.Draw(img).rectangle((100, 100, 300, 300), fill=(200, 20, 20))
    path = tmp_path_factory.mktemp("images") / "wide.png"
    img.save(path)
    return path


@pytest.fixture(scope="session")
def short_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.5 s at 10 fps: sampled at 4 fps into 6 frames."""
    import av

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(15):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 16, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[pytest.TestReport]:
    """A test that failed on a running stack gets, in its report, each service's state and log tail, with the
    stacks of its threads and tasks (`kill -USR1`, vita/runtime/dumps.py): a hang in CI then says where it hung."""
    report = yield
    if report.failed and report.when == "call":
        from vita.stack import LocalStack

        stacks = {id(v): v for v in getattr(item, "funcargs", {}).values() if isinstance(v, LocalStack)}
        for stack in stacks.values():
            report.sections.append((f"services of stack {stack.prefix}", services_report(stack)))
    return report


def services_report(stack: LocalStack, tail_lines: int = 20, dump_wait_s: float = 10.0) -> str:
    """A line of every service's state (alive or exited), then each one's log: its last `tail_lines` lines before
    a stack dump, then the dump (asked of every live one, and waited on up to `dump_wait_s` until its tasks' part is
    written)."""
    import time

    from vita.runtime.dumps import DUMP_SIGNAL
    from vita.stack import log_tail

    services = stack.services
    alive = {s.name for s in stack.running()}
    before = {s.name: os.path.getsize(s.log_path) if os.path.exists(s.log_path) else 0 for s in services}
    tails = {s.name: log_tail(s.log_path, tail_lines) for s in services}  # read before the dumps are written
    for s in services:
        if s.name in alive:
            with contextlib.suppress(OSError):
                os.kill(s.pid, DUMP_SIGNAL)
    deadline = time.monotonic() + dump_wait_s
    states = {s.name: f"pid {s.pid} {'alive' if s.name in alive else 'EXITED'}" for s in services}
    parts = ["; ".join(f"{name}: {state}" for name, state in states.items())]  # first: a truncated log keeps it
    for s in services:
        dumped = b""
        while s.name in alive and b"asyncio: " not in dumped and time.monotonic() < deadline:
            time.sleep(0.1)
            with open(s.log_path, "rb") as f:
                f.seek(before[s.name])
                dumped = f.read()
        state = states[s.name]
        if s.name in alive and b"asyncio: " not in dumped:
            state += f" (its event loop wrote no tasks' dump within {dump_wait_s:g} s: blocked?)"
        parts.append("\n".join([f"==== {s.name}: {state}; {s.log_path}", tails[s.name],
                                 *(["---- stack dump (SIGUSR1)", dumped.decode(errors="replace")] if dumped else [])]))
    return "\n".join(parts)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Train the duplex model (`duplex_model_dir`) before the first test when a collected test needs it and it is not
    cached yet. Built in the fixture instead, the training (minutes on a busy 2-core machine) counted against the
    first test's `--timeout`: one timeout there errored every test of the session that uses the model (57 in
    tests/e2e). `make test` builds it first anyway (its `duplex-model` target); this covers `pytest` run alone."""
    if session.config.option.collectonly or not any("duplex_model_dir" in getattr(item, "fixturenames", ())
                                                    for item in session.items):
        return
    from vita.training.duplex import build_duplex_checkpoint, default_duplex_dir

    if not default_duplex_dir().joinpath("config.json").is_file():
        session.config.get_terminal_writer().line(f"training the duplex model once, into {default_duplex_dir()}")
        build_duplex_checkpoint()


@pytest.fixture(scope="session")
def duplex_model_dir() -> Path:
    """The tiny model fine-tuned for the duplex decisions (vita/training/duplex.py); built once, cached in VITA_HOME
    (before the first test: `pytest_collection_finish`)."""
    from vita.training.duplex import build_duplex_checkpoint

    return build_duplex_checkpoint()


@pytest.fixture(scope="session")
def trained_answer() -> str:
    from vita.training.duplex import DuplexTrainConfig

    return DuplexTrainConfig().answer


@pytest.fixture(scope="session")
def query_clip() -> np.ndarray:
    """A question for the assistant, in the fine-tune's query voice (16 kHz float32)."""
    from vita.training.speech import espeak as speak

    return speak("what is in this picture", "query")


@pytest.fixture(scope="session")
def other_clip() -> np.ndarray:
    """Talk meant for someone else, in a voice the fine-tune learned to ignore."""
    from vita.training.speech import espeak as speak

    return speak("honey did you feed the cat", "en-high")


# The end-to-end Converse modules' stack (module scope, a key prefix named after the module): the trained duplex
# model, metrics on. A module that needs another stack (the random tiny model, the realtime gateway) defines its own
# `stack`, which `client` then serves. (Here, not in a tests/e2e/conftest.py: a second conftest module would shadow
# this one for `from conftest import ...`.)
@pytest.fixture(scope="module")
def stack(request, duplex_model_dir, tmp_path_factory) -> Iterator[LocalStack]:
    from vita.stack import LocalStack

    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    with LocalStack(model_dir=str(duplex_model_dir), prefix=f"{name}{uuid.uuid4().hex[:8]}", metrics=True,
                    log_dir=str(tmp_path_factory.mktemp("logs"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack) -> Iterator[VitaClient]:
    from vita.client import VitaClient

    with VitaClient(stack.target, timeout_s=None) as c:
        yield c


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    from redis import Redis

    r = Redis.from_url(REDIS_URL)
    yield r
    r.close()
