"""Free loopback ports for processes this machine starts (the local stack, Triton, tests).

A port picked here is bound by another process seconds later, so what matters is what can take it meanwhile. The
OS's own pick (`bind(("127.0.0.1", 0))`) lies in the ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999
by default), the range every outgoing connection takes its source port from: with hundreds of Redis and gRPC
connections opened while a stack starts, one of them can land on the port just picked (a CI run saw
`cannot listen on 127.0.0.1:54091: the port is in use`). So the pick is random below that range, where nothing
takes a port without asking for it by number, the way Google's portpicker falls back to 15000-24999
(github.com/google/python_portpicker); and one process never hands out the same port twice.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 15000  # below: more of the ports services are configured to by number (8000, 8080, 9090, ...)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
_random = random.Random()  # its own generator: a test seeding `random` does not make two processes pick alike


def ephemeral_range() -> tuple[int, int]:
    """(first, last) port of the range outgoing connections take source ports from; Linux's default elsewhere."""
    try:
        first, last = (int(v) for v in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return first, last


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on or is bound to now, below the ephemeral range, never one this
    process returned before. Another program may still take it by number before the caller binds it: callers that
    start servers on it retry on PortInUse (LocalStack.start). Raises OSError when no port is found."""
    first = ephemeral_range()[0]
    if first - LOWEST < 1000:  # the ephemeral range was widened to (nearly) everything: the OS's pick is all there is
        return _os_pick()
    for _ in range(200):
        port = _random.randrange(LOWEST, first)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on 127.0.0.1 in {LOWEST}-{first - 1} after 200 tries")


def _os_pick() -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError("the OS picked only ports this process handed out already, 200 times")


def _bindable(port: int) -> bool:
    """Nothing is bound to `port` (no SO_REUSEADDR: a port some connection still holds in TIME_WAIT is not free)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` now. SO_REUSEADDR, as servers bind, so a port left in TIME_WAIT
    by a stack just stopped counts as free; no SO_REUSEPORT, so a gRPC listener (which sets it) does not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
