"""What the Converse end-to-end tests share: the stored session, Prometheus samples, fast speech."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from vita.bus.streams import BusConfig
from vita.client import speech_events
from vita.v1.session_pb2 import SessionState


def stored(redis, stack, session_id) -> SessionState:
    return SessionState.FromString(redis.get(BusConfig(prefix=stack.prefix).session(session_id)))


def fast(samples):
    return speech_events(samples, realtime=False, chunk_ms=100)


def scrape(port: int, name: str, **labels) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + ("{" + wanted + "}" if wanted else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll a state another process reaches (a gauge, a key); the timeout only stops a hang."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s:g} s")
        time.sleep(0.05)


BARRIER_TURN = 2**31 - 1


def barrier(session) -> None:
    """Wait until the session's turn worker has handled everything sent so far: a TruncateAnswer for a turn that
    cannot exist queues behind every segment the audio produced, and its error event comes after their events."""
    from vita.v1.assistant_pb2 import ClientEvent, TruncateAnswer

    session.send(ClientEvent(truncate=TruncateAnswer(turn_id=BARRIER_TURN)))
    session.wait("error", turn_id=BARRIER_TURN)
