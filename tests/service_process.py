"""One service as its own process for a test, as `vita up` runs it: started with its log file, waited on until
healthy, stopped (SIGTERM, then SIGKILL after 30 s) when the test is done."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence

from vita.stack import ServiceProcess, wait_healthy


@contextlib.contextmanager
def running(*services: ServiceProcess, timeout_s: float = 180) -> Iterator[Sequence[ServiceProcess]]:
    """Starts `services` in order (each one's output to its `log_path`, its `pid` set), waits until every one is
    healthy (`vita.stack.wait_healthy`: StackError with the log's tail if one exits or times out), yields them and
    stops them in reverse order, whatever happened."""
    procs: list[subprocess.Popen] = []
    try:
        for service in services:
            with open(service.log_path, "wb") as out:
                procs.append(subprocess.Popen(service.argv, stdout=out, stderr=subprocess.STDOUT))
            service.pid = procs[-1].pid
        for service in services:
            wait_healthy(service, timeout_s)
        yield services
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
