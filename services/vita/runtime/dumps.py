"""Where a live service is stuck: `kill -USR1 <pid>` writes every thread's Python stack and every asyncio task's
await chain to the service's stderr (its log), and the process goes on serving.

Two dumps, since a hang has two kinds: a thread blocked in C (a torch forward, a lock) shows in the threads'
stacks, which `faulthandler` writes from the signal handler itself, even when the event loop is blocked; a
coroutine that awaits something that never comes shows only in the tasks' await chains, which the loop writes when
it next runs (the chain Python 3.14's `asyncio.format_call_graph` prints; aiomonitor's `where` does the same).
The tests send it to a stack whose test failed (tests/conftest.py) and attach the logs' tails to the report.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import signal
import sys

DUMP_SIGNAL = signal.SIGUSR1


def install_stack_dumps(loop: asyncio.AbstractEventLoop) -> None:
    """On DUMP_SIGNAL: the threads' stacks at once, then the tasks' stacks from `loop`. Call from inside `loop`."""
    loop.add_signal_handler(DUMP_SIGNAL, _print_tasks, loop)
    out = _file_descriptor(sys.stderr) or _file_descriptor(sys.__stderr__)
    if out is not None:  # faulthandler writes to a file descriptor: none when stderr is captured (pytest's capsys)
        # After the loop's handler: chain=True keeps it (the loop's C-level handler wakes the loop for the tasks').
        faulthandler.register(DUMP_SIGNAL, file=out, all_threads=True, chain=True)


def _file_descriptor(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        return None


def tasks_stacks(loop: asyncio.AbstractEventLoop) -> str:
    """Every unfinished task of `loop`: its name and the chain of awaits it is suspended in (innermost last)."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    out.write(f"asyncio: {len(tasks)} tasks\n")
    for task in tasks:
        out.write(f"Task {task.get_name()!r}\n")
        for line in _awaiting(task.get_coro()):
            out.write(f"  {line}\n")
    return out.getvalue()


def _awaiting(coro: object) -> list[str]:
    """The chain a coroutine waits down, outermost first: each frame, then what the innermost awaits (a Future).
    Task.get_stack stops at the task's own frame; Python 3.14's asyncio.format_call_graph walks the same chain."""
    lines = []
    while coro is not None:
        frame = next((getattr(coro, a) for a in ("cr_frame", "gi_frame", "ag_frame") if getattr(coro, a, None)), None)
        if frame is None:
            lines.append(f"awaiting {coro!r}"[:300])  # a Future, or a coroutine written in C (gRPC's)
            break
        lines.append(f'File "{frame.f_code.co_filename}", line {frame.f_lineno} in {frame.f_code.co_name}')
        coro = next((getattr(coro, a) for a in ("cr_await", "gi_yieldfrom", "ag_await") if getattr(coro, a, None)),
                    None)
    return lines


def _print_tasks(loop: asyncio.AbstractEventLoop) -> None:
    sys.stderr.write(tasks_stacks(loop))
    sys.stderr.flush()
