"""The engine core in a process of its own: vLLM V1's `EngineCoreProc` split, for the torch backend.

In one process the engine thread and the service's asyncio thread (job intake, detokenising, publishing each token
to Redis) share the GIL, and every token the service publishes delays the next forward (BENCHMARKS.md, "Serving:
the stack against the same engine"). Here the child process owns the model, the KV cache and the schedule and does
nothing else; the service's process sends it requests and cancels and reads each step's outputs, over two pipes
(pickled messages, as vLLM's `EngineCoreClient` does over ZMQ with msgpack).

The child is `python -m vita.llm.backends.torch.engine_core IN_FD OUT_FD`, not a multiprocessing spawn: a spawned
child re-imports the parent's `__main__`, which breaks any script that starts a backend without the
`if __name__ == "__main__"` guard. Its first message is the `EngineCoreSpec`.

Parent -> child: ("add", BackendRequest) | ("cancel", request_id) | ("stop",).
Child -> parent: ("ready",) | ("failed", message) | ("step", [TokenOutput], EngineSnapshot) |
("rejected", request_id, VitaError).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from vita.errors import VitaError, one_line
from vita.llm.backends.base import BackendRequest, EngineDeadError, TokenOutput
from vita.llm.backends.torch.engine import EngineConfig, EngineSnapshot

log = logging.getLogger(__name__)


def _send(connection: Connection, message: object) -> None:
    """Plain pickle, tensors by value: `Connection.send`'s ForkingPickler would hand torch tensors over as shared
    memory through multiprocessing's resource sharer, which a child not started by multiprocessing cannot reach."""
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(connection: Connection) -> object:
    return pickle.loads(connection.recv_bytes())


@dataclass(frozen=True)
class EngineCoreSpec:
    """What the child needs to build the engine: the model directory (the language model alone is read)."""

    model_dir: str
    max_batch_size: int = 8
    max_seq_len: int | None = None
    config: EngineConfig | None = None
    threads: int | None = None  # torch CPU threads of the child (None: torch's choice)
    device: str = "auto"  # `load_language_model`'s rules
    dtype: str = "auto"


def load_language_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """The checkpoint's language model (no towers) for an engine, on `device` in `dtype` (names and "auto" rules of
    `vita.model.placement`). Raises InvalidInputError for a device or dtype torch cannot use, CheckpointError for
    a bad model."""
    from vita.model.placement import resolve_device, resolve_dtype
    from vita.model.vita import VitaForCausalLM

    target = resolve_device(device)
    return VitaForCausalLM.from_pretrained(Path(model_dir), towers=False, device=target,
                                           dtype=resolve_dtype(dtype, target))


def run_engine_core(inbox: Connection, outbox: Connection) -> None:
    """The child's main: read the spec, build the engine, then step while there is work and block on the inbox
    while there is none. Exits on "stop" or when the parent's end of the pipe closes (the parent died)."""
    import torch

    from vita.llm.backends.torch.engine import EngineRequest, LLMEngine

    try:
        spec: EngineCoreSpec = _recv(inbox)
    except EOFError:
        return
    # Ctrl-C, and the SIGTERM of a supervisor that signals the whole process group (`vita down`, systemd, `timeout`),
    # reach this process too: the parent drains, its running generations finishing on this engine, then sends
    # "stop". Dying here would end them, and the service with status 1, on every ordinary stop. A dead parent is an
    # EOF on the inbox; SIGKILL still ends this process at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        model = load_language_model(spec.model_dir, spec.device, spec.dtype)
        engine = LLMEngine(model, max_batch_size=spec.max_batch_size, max_seq_len=spec.max_seq_len,
                           config=spec.config)
    except Exception as e:  # a bad model directory: said in one line by the parent, which raises it
        _send(outbox, ("failed", f"{type(e).__name__}: {one_line(e)}" if not isinstance(e, VitaError)
                     else one_line(e)))
        return
    _send(outbox, ("ready",))
    try:
        while True:
            # Everything that arrived is applied before the next step; with no work, wait for a message.
            timeout = 0.0 if engine.has_work() else None
            while inbox.poll(timeout):
                message = _recv(inbox)
                if message[0] == "stop":
                    return
                if message[0] == "cancel":
                    engine.cancel(message[1])
                else:
                    request: BackendRequest = message[1]
                    try:
                        engine.add(EngineRequest.from_prompt(model, request.request_id, request.prompt,
                                                             request.params))
                    except VitaError as e:
                        _send(outbox, ("rejected", request.request_id, e))
                timeout = 0.0
            if engine.has_work():
                outputs = engine.step()
                _send(outbox, ("step", outputs, EngineSnapshot.of(engine)))
    except (EOFError, BrokenPipeError):
        return  # the parent is gone: nothing to answer to


class EngineCoreProcess:
    """The parent's side: starts the child, sends it requests from a thread of its own (a large prompt's send must
    not block the event loop while the child is mid-step), and reads its outputs on the event loop.

    `on_step(outputs, snapshot)` and `on_dead(error)` run on the event loop that called `start`.
    """

    def __init__(self, spec: EngineCoreSpec, on_step: Callable[[list[TokenOutput], EngineSnapshot], None],
                 on_rejected: Callable[[str, VitaError], None], on_dead: Callable[[EngineDeadError], None]) -> None:
        self.spec = spec
        self.on_step = on_step
        self.on_rejected = on_rejected
        self.on_dead = on_dead
        self.process: subprocess.Popen | None = None
        self._inbox: Connection | None = None
        self._outbox: Connection | None = None
        self._sends: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="llm-engine-core-send", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dead: EngineDeadError | None = None

    async def start(self, timeout_s: float = 300.0) -> None:
        """Start the child and wait until its engine is built. Raises VitaError (one line) if it cannot be."""
        self._loop = asyncio.get_running_loop()
        child_in, inbox = os.pipe()
        outbox, child_out = os.pipe()
        try:
            self.process = subprocess.Popen([sys.executable, "-m", __name__, str(child_in), str(child_out)],
                                            pass_fds=(child_in, child_out))
        finally:
            os.close(child_in)  # the child's ends: only the child holds them now, so its death is an EOF here
            os.close(child_out)
        self._inbox, self._outbox = Connection(inbox, readable=False), Connection(outbox, writable=False)
        _send(self._inbox, self.spec)
        ready = await asyncio.to_thread(self._wait_ready, timeout_s)
        if ready[0] != "ready":
            await asyncio.to_thread(self._wait_exit, 10)
            raise VitaError(f"the engine core could not start: {ready[1]}")
        self._sender.start()
        self._loop.add_reader(self._outbox.fileno(), self._read)

    def submit(self, request: BackendRequest) -> None:
        if self.dead is not None:
            raise self.dead
        self._sends.put(("add", request))

    def cancel(self, request_id: str) -> None:
        if self.dead is None:
            self._sends.put(("cancel", request_id))

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self._sender.is_alive():
            self._loop.remove_reader(self._outbox.fileno())
            self._sends.put(("stop",))
            self._sends.put(None)
            await asyncio.to_thread(self._sender.join, timeout_s)
        if not await asyncio.to_thread(self._wait_exit, timeout_s):
            self.process.kill()
            await asyncio.to_thread(self._wait_exit, timeout_s)
        self._outbox.close()
        self._inbox.close()

    def _wait_exit(self, timeout_s: float) -> bool:
        try:
            self.process.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _wait_ready(self, timeout_s: float) -> tuple:
        if not self._outbox.poll(timeout_s):
            self.process.kill()
            return ("failed", f"no answer in {timeout_s:.0f} s")
        try:
            return _recv(self._outbox)
        except EOFError:
            self._wait_exit(10)
            return ("failed", f"the process exited with status {self.process.returncode} while loading the model")

    def _send_loop(self) -> None:
        while (message := self._sends.get()) is not None:
            try:
                _send(self._inbox, message)
            except (BrokenPipeError, OSError):
                return  # the child is gone; the reader reports it

    def _read(self) -> None:
        """Every message waiting on the pipe, dispatched; EOF means the child exited."""
        try:
            while self._outbox.poll(0):
                message = _recv(self._outbox)
                if message[0] == "step":
                    self.on_step(message[1], message[2])
                elif message[0] == "rejected":
                    self.on_rejected(message[1], message[2])
        except (EOFError, OSError):
            self._loop.remove_reader(self._outbox.fileno())
            self._wait_exit(1)
            self.dead = EngineDeadError(f"the engine core process exited (status {self.process.returncode}); "
                                        "this worker can generate no more")
            self._sends.put(None)
            log.error("engine core died", extra={"returncode": self.process.returncode})
            self.on_dead(self.dead)


if __name__ == "__main__":
    run_engine_core(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
