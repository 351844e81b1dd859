"""One port, one server: a port already in use is a clear start-up error, never a silently shared socket.

gRPC turns SO_REUSEPORT on by default, and two servers on one port then split its connections between them; the
project's servers turn it off (runtime/server.py). LocalStack picks its ports seconds before its processes bind
them: a service that finds its port taken restarts the stack on other ports.
"""

import asyncio
import socket
import subprocess
import sys

import grpc
import pytest

import vita.stack
from vita.errors import PortInUse
from vita.runtime.server import GrpcService, ServiceServer
from vita.stack import LocalStack


@pytest.fixture
def held_port():
    """A port some other program listens on (a plain socket, no SO_REUSEPORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_second_grpc_server_on_a_port_in_use_is_refused(capfd):
    async def main():
        first = ServiceServer([GrpcService("x", lambda s: None)], port=0)
        await first.start()
        try:
            capfd.readouterr()
            with pytest.raises(PortInUse, match=rf"127\.0\.0\.1:{first.port}: the port is in use"):
                ServiceServer([GrpcService("x", lambda s: None)], port=first.port)
            # gRPC core's own line about the failed bind (`E... add_port.cc:83] Failed to add port ...`, written to
            # file descriptor 2 past Python's logging) is not printed: PortInUse's one line says it all.
            assert capfd.readouterr().err == ""
        finally:
            await first.drain()

    asyncio.run(main())


def test_what_is_written_to_stderr_while_a_port_is_added_still_reaches_it(capfd):
    """Held back around the bind, then written out: only a failed bind's output is dropped."""
    import os

    from vita.runtime.server import _stderr_dropped_on_error

    with _stderr_dropped_on_error():
        os.write(2, b"kept\n")
    with pytest.raises(RuntimeError), _stderr_dropped_on_error():
        os.write(2, b"dropped\n")
        raise RuntimeError
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nafter\n"


@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port"])
def test_a_service_whose_port_is_taken_says_so_in_one_line(held_port, tiny_model_dir, flag, redis_prefix):
    other = {"--grpc-port": "0", "--metrics-port": "0"}
    argv = [sys.executable, "-m", "vita.orchestrator", "--model", str(tiny_model_dir), "--prefix",
            redis_prefix, *[a for k, v in other.items() if k != flag for a in (k, v)],
            flag, str(held_port)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    # The whole of stderr: gRPC core printed its own `E... add_port.cc:83] Failed to add port` line before ours.
    assert out.stderr.strip().splitlines() == [
        f"vita serve orchestrator: error: cannot {'listen on' if flag == '--grpc-port' else 'serve metrics on'} "
        f"127.0.0.1:{held_port}: the port is in use" + (" by another process (or 127.0.0.1 is not an address of "
                                                        "this machine)" if flag == "--grpc-port" else "")]


def test_the_realtime_gateway_on_a_taken_port_says_so_in_one_line(held_port):
    out = subprocess.run([sys.executable, "-m", "vita.realtime", "--port", str(held_port)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"vita serve realtime: error: cannot listen on 127.0.0.1:{held_port}: the port is in use")


def test_local_stack_starts_again_on_other_ports_when_one_was_taken(held_port, tiny_model_dir, tmp_path,
                                                                    monkeypatch, redis_prefix):
    picked = iter([held_port])  # the first port the stack picks is one another program took meanwhile
    real = vita.stack.free_port
    monkeypatch.setattr(vita.stack, "free_port", lambda: next(picked, None) or real())
    with LocalStack(model_dir=str(tiny_model_dir), prefix=redis_prefix, log_dir=str(tmp_path)) as stack:
        assert held_port not in {s.grpc_port for s in stack.services}
        with grpc.insecure_channel(stack.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
