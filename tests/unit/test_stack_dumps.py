"""`kill -USR1` on a service (vita/runtime/dumps.py): every thread's stack and every task's await chain reach
stderr, and the process lives on. Run in a real subprocess: the dump is a signal handler."""

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import asyncio, sys, threading
    from vita.runtime.dumps import install_stack_dumps

    def blocked_thread(release):
        release.wait()

    async def inner_wait(event):
        await event.wait()

    async def waits_forever(event):
        await inner_wait(event)

    async def main():
        install_stack_dumps(asyncio.get_running_loop())
        release = threading.Event()
        threading.Thread(target=blocked_thread, args=(release,), daemon=True).start()
        stuck = asyncio.create_task(waits_forever(asyncio.Event()), name="stuck-task")
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # until the test says stop
        stuck.cancel()
        release.set()
        print("done", flush=True)

    asyncio.run(main())
""")


def _dump(proc: subprocess.Popen) -> str:
    """Signal, then read stderr up to the end of the tasks' dump (its last task is `stuck-task`'s chain)."""
    proc.send_signal(signal.SIGUSR1)
    lines = []
    while not (lines and lines[-1].startswith("  awaiting") and any("stuck-task" in x for x in lines)):
        line = proc.stderr.readline()
        assert line, "stderr closed before the dump was written: " + "".join(lines)
        lines.append(line)
    return "".join(lines)


def test_sigusr1_dumps_threads_and_task_chains_and_the_process_lives_on():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        for _ in range(2):  # a second dump works too: the handler stays installed
            dump = _dump(proc)
            assert "in blocked_thread" in dump and "Current thread" in dump  # faulthandler: every thread
            chain = dump[dump.index("Task 'stuck-task'"):]
            assert chain.index("in waits_forever") < chain.index("in inner_wait") < chain.index("awaiting")
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n" and proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
