"""`vita` never ends in a traceback: each failure is one line on stderr and a documented exit status (issue 11)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vita import cli

CASES = Path(__file__).resolve().parents[3] / "shared" / "cases" / "media"


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        status = cli.main(list(argv))
    except SystemExit as e:  # argparse exits by itself on usage errors and --help
        status = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "--max-tokens", "many"], "argument --max-tokens: 'many' is not an integer"),
        (["generate", "--max-tokens", "0"], "0 is outside [1, 2147483647]"),
        (["ask", "--max-tokens", "99999999999"], "99999999999 is outside"),
        (["ask", "--text", "hi", "--timeout", "0"], "argument --timeout: 0.0 is outside (0.0, inf]"),
        (["generate", "--top-p", "0"], "argument --top-p: 0.0 is outside (0.0, 1.0]"),
        (["generate", "--temperature", "-1"], "argument --temperature"),
        (["generate", "--temperature", "nan"], "argument --temperature"),
        (["up", "--port", "70000"], "argument --port"),
        # --redis and --prefix checked as flags, before anything starts (a new user's try, 2026-12-06: an internal
        # error, exit 3, for the URL; exit 1 once a service had failed its start-up, for the prefix)
        (["up", "--redis", "notaurl"], "vita up: error: argument --redis: Redis URL 'notaurl' must start with "
                                       "redis:// or rediss://"),
        (["up", "--redis", "http://u:secret@h:1"], "Redis URL 'http://u:***@h:1' must start with"),
        (["down", "--purge", "--prefix", "x", "--redis", "notaurl"], "vita down: error: argument --redis"),
        (["eval", "duplex", "--quick", "--redis", "notaurl"], "vita eval duplex: error: argument --redis"),
        (["up", "--prefix", "bad prefix"], "vita up: error: argument --prefix: bus prefix 'bad prefix' must be"),
        (["down", "--purge", "--prefix", "a b"], "vita down: error: argument --prefix: bus prefix 'a b'"),
        (["serve", "llm", "--redis", "notaurl"], "vita serve llm: error: argument --redis: Redis URL 'notaurl'"),
        (["serve", "orchestrator", "--prefix", "x y"], "vita serve orchestrator: error: argument --prefix"),
        (["converse", "--bogus"], "vita converse: error: unrecognized arguments: --bogus"),
        # a subcommand's unknown arguments are its own error, named (a new user's try: `vita: error: ...`)
        (["ask", "--bogus"], "vita ask: error: unrecognized arguments: --bogus (see `vita ask --help`)"),
        (["model-info", "--model", "x"], "vita model-info: error: unrecognized arguments: --model x"),
        (["eval", "mme", "--data", "x", "--bogus"], "vita eval mme: error: unrecognized arguments: --bogus"),
        (["init-tiny", "extra"], "vita init-tiny: error: unrecognized arguments: extra"),
        (["generate", "--text", "caf\udce9 au lait?"], "argument --text: not valid UTF-8 (byte 0xe9 at character 3)"),
        (["ask", "--text", "caf\udce9"], "not valid UTF-8"),
        (["converse", "--text", "ok", "--text", "\udcff"], "not valid UTF-8"),
        (["generate", "--system", "x\ud800"], "argument --system: not valid UTF-8 (U+D800 at character 1)"),
        (["pretrain-vision", "--output", "/tmp/never", "--steps", "0"], "argument --steps: 0 is outside"),
        (["pretrain-vision", "--steps", "10"], "the following arguments are required: --output"),
        (["pretrain-audio", "--output", "/tmp/never", "--clips", "0"], "argument --clips: 0 is outside"),
        (["pretrain-audio", "--steps", "10"], "the following arguments are required: --output"),
        # every service's own parser too, not argparse's usage block (found by a new user's try, 2026-12-03)
        (["serve", "llm", "--role", "bogus"], "vita serve llm: error: argument --role: invalid choice: 'bogus'"),
        (["serve", "orchestrator", "--port", "abc"], "vita serve orchestrator: error: unrecognized arguments"),
        (["serve", "vision-encoder", "--max-batch", "x"], "vita serve vision-encoder: error: argument --max-batch"),
        (["serve", "realtime", "--bogus"], "vita serve realtime: error: unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_are_one_line_and_status_2(capsys, argv, message):
    status, err = run(capsys, *argv)
    line = one_line(err)
    assert status == cli.EXIT_USAGE
    assert message in line and line.startswith("vita")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # decoded here before any call (vita.cli._decoded_here), as `vita generate` decodes them
        (["ask", "--text", "hi", "--image", "/nonexistent/x.png"], "image file not found: /nonexistent/x.png"),
        (["ask", "--text", "hi", "--audio", "/"], "cannot read audio file /: Is a directory"),
        (["converse", "--image", "/nonexistent/x.png"], "image file not found: /nonexistent/x.png"),
        (["converse", "--wav", "/nonexistent/q.wav"], "cannot read audio file /nonexistent/q.wav"),
        (["converse", "--wav", "__GARBAGE__"], "not a decodable audio file (WAV, FLAC, MP3, Ogg, AAC/M4A, ...); "
                                               "FFmpeg: invalid data found when processing input"),
        (["generate", "--model", "/nonexistent/model", "--text", "hi"], "/nonexistent/model: no such directory"),
        # the error names the command that ran, the benchmark's or the service's too (a new user's try, 2026-12-03)
        (["eval", "mme", "--data", "/nonexistent/mme"], "vita eval mme: error: /nonexistent/mme: no such file"),
        (["serve", "llm", "--model", "/nonexistent/model"],
         "vita serve llm: error: --model /nonexistent/model: no such directory"),
        (["serve", "vision-encoder", "--model", "/"], "vita serve vision-encoder: error: --model /: not a model directory"),
        (["model-info", "--preset", "huge"], "unknown preset 'huge'"),
        (["model-info", "--preset", "tiny", "--target", "127.0.0.1:1"], "vita model-info: error: give --preset"),
        (["pretrain-vision", "--preset", "huge", "--output", "__OUT__"], "unknown preset 'huge'"),
        (["pretrain-audio", "--preset", "huge", "--output", "__OUT__"], "unknown preset 'huge'"),
    ],
)
def test_bad_files_are_one_line_and_status_2(capsys, tmp_path, argv, message):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"\x00\x01 not audio at all" * 20)
    argv = [str(garbage) if a == "__GARBAGE__" else str(tmp_path / "out") if a == "__OUT__" else a for a in argv]
    argv += ["--target", f"127.0.0.1:{closed_port()}"] if argv[0] in ("ask", "converse") else []
    status, err = run(capsys, *argv)
    assert status == cli.EXIT_USAGE
    assert message in one_line(err)


def test_server_unreachable_is_one_line_and_status_1(capsys):
    status, err = run(capsys, "ask", "--text", "hi", "--target", f"127.0.0.1:{closed_port()}")
    assert status == cli.EXIT_FAILED
    assert one_line(err).startswith("vita ask: error: UNAVAILABLE:")


def down(capsys) -> tuple[int, str, str]:
    """`vita down`: its status, stdout and stderr."""
    status = cli.main(["down"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def saved_stack(home: Path, *code: str):
    """The state `vita up` leaves in `home`, its services (one per `code`) Python processes started as
    LocalStack starts its own (a process group each)."""
    from vita.stack import LocalStack, ServiceProcess

    stack = LocalStack(model_dir=str(home / "model"), services=[
        ServiceProcess(f"service-{i}", [sys.executable, "-c", c], 0, str(home / f"service-{i}.log"))
        for i, c in enumerate(code)])
    for service in stack.services:
        stack._spawn(service)
    stack.save(home / "stack.json")
    return stack


def test_down_with_nothing_up_succeeds_and_says_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    status, out, err = down(capsys)
    assert (status, err) == (cli.EXIT_OK, "")
    assert one_line(out) == f"no stack is up: nothing to stop (no state file {tmp_path / 'stack.json'})"


def test_down_stops_the_stack_and_a_second_down_succeeds(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    stack = saved_stack(tmp_path, "import time; time.sleep(60)", "import time; time.sleep(60)")
    try:
        status, out, err = down(capsys)
        assert (status, err) == (cli.EXIT_OK, "") and one_line(out).startswith("stack stopped (2 processes")
        assert not stack.running() and not (tmp_path / "stack.json").exists()
        status, out, err = down(capsys)  # stopping what is stopped: still a success
        assert (status, err) == (cli.EXIT_OK, "") and one_line(out).startswith("no stack is up: nothing to stop")
    finally:
        stack.stop(grace_s=0)


def test_down_purge_deletes_the_stacks_keys_and_counts_only_what_ran(capsys, tmp_path, monkeypatch, redis_prefix):
    """An operator's try (2026-12-04): `vita down` left the stack's job streams (no expiry) and its other keys
    (149 after one try), and "stack stopped (6 processes" counted processes that had already exited."""
    import redis

    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    stack = saved_stack(tmp_path, "import time; time.sleep(60)", "pass")
    stack.prefix = redis_prefix
    stack.save(tmp_path / "stack.json")
    r = redis.Redis.from_url(stack.redis_url)
    r.xadd(f"{redis_prefix}:jobs:{{llm:generator}}", {"job": b"x"})
    r.set(f"{redis_prefix}x:other", 1)  # another prefix that merely starts the same: kept
    try:
        while len(stack.running()) > 1:  # the "pass" service exits
            time.sleep(0.02)
        status = cli.main(["down", "--purge"])
        out, err = capsys.readouterr()
        assert (status, err) == (cli.EXIT_OK, "")
        assert out.splitlines() == [f"stack stopped (1 processes; state {tmp_path / 'stack.json'} removed)",
                                    f"deleted its keys in Redis ({redis_prefix}:*)"]
        assert not list(r.scan_iter(match=f"{redis_prefix}:*")) and r.get(f"{redis_prefix}x:other") == b"1"
    finally:
        stack.stop(grace_s=0)
        r.delete(f"{redis_prefix}x:other")


def test_down_purge_after_the_stack_is_gone_takes_its_prefix(capsys, tmp_path, monkeypatch, redis_prefix):
    """An ML engineer's try (2026-12-04): `vita down` then `vita down --purge` said "nothing to stop" and left the
    keys, with no way to name them."""
    import redis

    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    r.xadd(f"{redis_prefix}:jobs:{{llm:generator}}", {"job": b"x"})
    status = cli.main(["down", "--purge"])
    out, err = capsys.readouterr()
    assert status == cli.EXIT_USAGE and "nothing purged" in one_line(err) and "--prefix" in err
    assert list(r.scan_iter(match=f"{redis_prefix}:*"))
    status = cli.main(["down", "--purge", "--prefix", redis_prefix])
    out, err = capsys.readouterr()
    assert (status, err) == (cli.EXIT_OK, "")
    assert out.splitlines()[-1] == f"deleted its keys in Redis ({redis_prefix}:*)"
    assert not list(r.scan_iter(match=f"{redis_prefix}:*"))


def test_down_with_only_exited_processes_removes_the_stale_state(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    stack = saved_stack(tmp_path, "pass")
    stack.stop(grace_s=5)  # exited by itself; the state still names it (a reboot, a kill -9 of the group)
    status, out, err = down(capsys)
    assert (status, err) == (cli.EXIT_OK, "") and "no stack process was running" in one_line(out)
    assert not (tmp_path / "stack.json").exists()


def test_down_fails_in_one_line_when_a_process_will_not_stop(capsys, tmp_path, monkeypatch):
    import functools

    from vita import stack as stack_module

    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    stack = saved_stack(tmp_path, "import time; time.sleep(60)")
    try:
        # signals that do nothing: what a process of another user (EPERM) or one stuck in the kernel looks like
        # to `vita down`, whose services are not its children (nothing to reap)
        monkeypatch.setattr(stack_module, "_signal", lambda pid, sig: None)
        monkeypatch.setattr(stack_module, "_reap", lambda pid: None)
        monkeypatch.setattr(stack_module.LocalStack, "stop", functools.partialmethod(
            stack_module.LocalStack.stop, grace_s=0.1, kill_wait_s=0.1))
        status, out, err = down(capsys)
        assert status == cli.EXIT_FAILED and out == ""
        pid = stack.services[0].pid
        assert one_line(err) == (f"vita down: error: still running after SIGKILL: service-0 (pid {pid}); "
                                 f"state kept in {tmp_path / 'stack.json'}")
        assert (tmp_path / "stack.json").exists()
    finally:
        monkeypatch.undo()
        stack.stop(grace_s=0)


def test_down_stops_the_redis_up_started_also_when_its_services_are_gone(capsys, tmp_path, monkeypatch):
    """A new user's try (2026-12-06): `vita up` on a machine without Redis started a redis-server that `vita down`
    left running. The stack records the Redis it started; `vita down` stops it, with the services or alone."""
    from vita.stack import ensure_redis, redis_answers

    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    for services in (["import time; time.sleep(60)"], ["pass"]):
        stack = saved_stack(tmp_path, *services)
        stack.redis_url = f"redis://127.0.0.1:{closed_port()}/0"
        stack.redis_pid = ensure_redis(stack.redis_url)
        stack.save(tmp_path / "stack.json")
        try:
            assert stack.redis_pid and redis_answers(stack.redis_url)
            while services == ["pass"] and stack.running():
                time.sleep(0.02)
            status, out, err = down(capsys)
            assert (status, err) == (cli.EXIT_OK, "")
            assert f"the redis-server it started, pid {stack.redis_pid}" in out or (
                f"but the redis-server it started (pid {stack.redis_pid}), stopped" in out), out
            assert not redis_answers(stack.redis_url) and not (tmp_path / "stack.json").exists()
        finally:
            stack.stop(grace_s=0)


def test_up_over_a_left_state_says_what_it_is(capsys, tmp_path, monkeypatch):
    """A new user's try (2026-12-06): a state file that was garbage, or left by a stack that had ended, made
    `vita up` say "a stack is already up", which `vita down` could not clear."""
    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "stack.json").write_text("{not json")
    status, err = run(capsys, "up", "--model", str(tmp_path / "model"))
    assert status == cli.EXIT_USAGE
    assert one_line(err).startswith(f"vita up: error: cannot read the stack state in {tmp_path / 'stack.json'}")
    stack = saved_stack(tmp_path, "pass")
    stack.stop(grace_s=5)
    status, err = run(capsys, "up", "--model", str(tmp_path / "model"))
    assert status == cli.EXIT_USAGE and "none of whose services runs" in err and "run `vita down` to clear it" in err
    assert down(capsys)[0] == cli.EXIT_OK and not (tmp_path / "stack.json").exists()


@pytest.mark.parametrize("state", ["{not json", "[]", '{"services": []}'])
def test_down_with_an_unreadable_state_is_one_line_and_status_2(capsys, tmp_path, monkeypatch, state):
    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    (tmp_path / "stack.json").write_text(state)
    status, out, err = down(capsys)
    assert status == cli.EXIT_USAGE and out == ""
    assert one_line(err).startswith(f"vita down: error: cannot read the stack state in {tmp_path / 'stack.json'}")
    (tmp_path / "stack.json").unlink()
    (tmp_path / "stack.json").mkdir()  # a state path that is not a file
    status, _, err = down(capsys)
    assert status == cli.EXIT_USAGE and one_line(err) == f"vita down: error: Is a directory: {tmp_path / 'stack.json'}"


def test_a_bug_is_still_one_line_with_status_3(capsys, monkeypatch):
    def broken(args):
        raise KeyError("oops\nsecond line")

    monkeypatch.setattr(cli, "_model_info", broken)
    status, err = run(capsys, "model-info")
    assert status == cli.EXIT_INTERNAL
    assert one_line(err).startswith("vita model-info: error: internal error: KeyError:")
    monkeypatch.setenv("VITA_TRACEBACK", "1")
    assert cli.main(["model-info"]) == cli.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for status in ("0", "1", "2", "3", "130"):
        assert f"\n  {status} " in out
    for command in (["generate"], ["eval", "curriculum"], ["eval", "duplex"], ["data", "check"]):  # nested too
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        assert "exit status: 0 success" in " ".join(capsys.readouterr().out.split()), command


def test_latin1_text_from_the_real_command_line():
    """What a shell passes: raw bytes in argv, which Python decodes with surrogateescape."""
    path = CASES / "latin1_text.bin"
    text = path.read_bytes() if path.is_file() else "café au lait?".encode("latin-1")
    r = subprocess.run([sys.executable, "-m", "vita.cli", "generate", "--text", text], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert one_line(r.stderr) == ("vita generate: error: argument --text: not valid UTF-8 (byte 0xe9 at character "
                                  "3); pass UTF-8 text (see `vita generate --help`)")


def test_init_tiny_says_when_it_kept_an_existing_model(capsys, tmp_path):
    """A second `vita init-tiny` (another --seed) keeps the model it finds and says so, rather than claim to write."""
    out = tmp_path / "tiny"
    assert cli.main(["init-tiny", "--output", str(out)]) == cli.EXIT_OK
    assert capsys.readouterr().out.startswith("tiny model written to")
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert cli.main(["init-tiny", "--output", str(out), "--seed", "5"]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert printed.startswith(f"tiny model already in {out}: kept") and "--overwrite" in printed
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "cuda"], "device 'cuda': torch sees no CUDA device"),
    (["--device", "tpu9", "--no-engine-process"], "device 'tpu9': Invalid device string"),
])
def test_a_device_torch_cannot_use_is_one_line_and_status_2(capsys, tiny_model_dir, flags, message):
    status, err = run(capsys, "serve", "llm", "--model", str(tiny_model_dir), "--prefix", "devicetest", *flags)
    line = one_line(err)
    assert status == cli.EXIT_USAGE and line.startswith("vita serve llm: error:") and message in line


def test_an_encoder_on_a_device_torch_cannot_use_is_one_line_and_status_2(capsys, tiny_model_dir):
    status, err = run(capsys, "serve", "vision-encoder", "--model", str(tiny_model_dir), "--prefix", "devicetest",
                      "--device", "cuda")
    line = one_line(err)
    assert status == cli.EXIT_USAGE and line.startswith("vita serve vision-encoder: error: device 'cuda': torch sees no")


def test_up_refuses_a_model_that_is_not_one_before_starting_anything(capsys, tmp_path, monkeypatch):
    """Bad input is status 2 and nothing starts: no state file is left."""
    monkeypatch.setenv("VITA_HOME", str(tmp_path / "home"))
    (tmp_path / "empty").mkdir()
    for model, problem in ((tmp_path / "nope", "no such directory"),
                           (tmp_path / "empty", "not a model directory (no config.json)")):
        status, err = run(capsys, "up", "--model", str(model))
        assert status == cli.EXIT_USAGE
        assert one_line(err) == f"vita up: error: --model {model}: {problem}; a model repository, as `vita export` " \
                                "or `vita init-tiny` writes, is expected"
    assert not (tmp_path / "home" / "stack.json").exists()


def test_up_that_cannot_start_the_stack_is_status_1(capsys, tmp_path, monkeypatch):
    """The input was fine but the stack did not come up where it ran (here: no Redis answers at --redis, and one
    off this machine's loopback is not started here): status 1 as README's exit-status table says, one line, no
    state file."""
    monkeypatch.setenv("VITA_HOME", str(tmp_path / "home"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    url = f"redis://127.0.0.2:{closed_port()}/0"  # loopback, but not an address `vita up` starts a Redis on
    status, err = run(capsys, "up", "--model", str(tmp_path / "model"), "--redis", url)
    assert status == cli.EXIT_FAILED
    assert one_line(err).startswith(f"vita up: error: no Redis answers at {url} (only a plain redis:// URL")
    assert not (tmp_path / "home" / "stack.json").exists()


def test_a_missing_local_redis_is_started_on_the_urls_own_port():
    """`vita up --redis redis://127.0.0.1:PORT` with nothing there starts a throw-away redis-server on PORT (it
    used to start one on 6379 whatever the URL said, then fail to reach PORT)."""
    import redis

    from vita.stack import ensure_redis

    port = closed_port()
    url = f"redis://127.0.0.1:{port}/0"
    pid = ensure_redis(url)
    client = redis.Redis.from_url(url)
    try:
        assert client.ping() and client.info("server")["process_id"] == pid
        assert ensure_redis(url) == 0  # one answers now: none started
    finally:
        client.shutdown(nosave=True)


def test_help_derives_the_presets_and_states_the_barge_in_switch(capsys):
    """`vita model-info --help` lists every preset of the registry (it said "mixtral-8x7b or tiny"); the
    orchestrator's `--barge-in-max-ms` help says -1 switches the rule off, as serving.md and VadParams do."""
    from vita.model.config import PRESETS

    for argv in (["model-info", "--help"], ["serve", "orchestrator", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    out = " ".join(capsys.readouterr().out.split())
    assert f"preset name: {', '.join(PRESETS)}" in out and "tiny-224" in out
    assert "--barge-in-max-ms BARGE_IN_MAX_MS Converse: speech up to this long" in out
    assert "(-1 or 0: the rule off;" in out


@pytest.mark.parametrize("password", ["wrong", ""])
def test_up_against_a_redis_that_refuses_the_login_says_so_and_hides_the_password(capsys, tmp_path, monkeypatch,
                                                                                  password):
    """An operator's try (2026-12-04): `vita up --redis redis://:wrong@...` against a Redis with a password said
    "started redis-server but nothing answers at redis://:wrong@..." (the password printed, the cause wrong)."""
    import redis

    from vita.stack import RedisServer

    monkeypatch.setenv("VITA_HOME", str(tmp_path / "home"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    server = RedisServer(str(tmp_path / "redis"), args=("--requirepass", "s3cret"))
    server.probe = lambda: redis.Redis(port=server.port, password="s3cret").ping()
    with server:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0" if password else server.url
        status, err = run(capsys, "up", "--model", str(tmp_path / "model"), "--redis", url)
    assert status == cli.EXIT_FAILED
    line = one_line(err)
    assert f"the Redis at redis://{':***@' if password else ''}127.0.0.1:{server.port}/0 " in line
    assert ("refused the login" if password else "needs a password") in line
    assert "wrong" not in line and "started redis-server" not in line


def test_up_on_a_taken_port_fails_at_once_naming_the_flag(capsys, tmp_path, monkeypatch):
    """An operator's try (2026-12-04): with --port taken, `vita up` loaded every model three times ("a port was
    taken meanwhile; starting again on other ports", though the port is fixed) and then failed with a log line."""
    import socket

    monkeypatch.setenv("VITA_HOME", str(tmp_path / "home"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = run(capsys, "up", "--model", str(tmp_path / "model"), "--port", str(port))
    assert status == cli.EXIT_FAILED
    assert one_line(err) == (f"vita up: error: cannot listen on 127.0.0.1:{port}, the orchestrator's port (vita up "
                             "--port): the port is in use; pick another, or stop what listens there")
    assert not (tmp_path / "home" / "stack.json").exists()


def test_the_redis_password_is_on_no_command_line_and_the_state_file_is_private(tmp_path):
    """An operator's try (2026-12-04): every service of `vita up` got `--redis redis://:secret@...` on its command
    line (readable by every user with ps) and stack.json, which holds it, was written 0644."""
    import stat

    from vita.stack import LocalStack

    stack = LocalStack(model_dir="m", redis_url="redis://:s3cret@127.0.0.1:6390/0", log_dir=str(tmp_path),
                       realtime=True)
    stack.services = stack.plan()
    assert not [s.name for s in stack.services if "s3cret" in " ".join(s.argv) or "--redis" in s.argv]
    state = tmp_path / "stack.json"
    state.write_text("{}")
    state.chmod(0o644)  # an older state file
    stack.save(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o600 and LocalStack.load(state).redis_url == stack.redis_url


def test_ask_leaves_the_answer_length_to_the_server_unless_told():
    """An operator's try (2026-12-04): `vita ask` sent max_tokens 64 unasked while the server's default is 256, so
    answers stopped mid-sentence; now 0 (the server's default_max_tokens) unless --max-tokens is given."""
    assert cli.build_parser().parse_args(["ask"]).max_tokens is None
    assert cli.build_parser().parse_args(["ask", "--max-tokens", "8"]).max_tokens == 8


def test_ask_and_converse_decode_their_files_before_calling_and_name_the_bad_one(capsys, tmp_path):
    """A new user's try (2026-12-06): `vita ask` with nothing to ask, or a corrupt --image, went to the server and
    came back as INVALID_ARGUMENT, status 1; an empty --wav among several said "audio is empty" without saying
    which. Now each is a usage error (status 2) before any call, naming the file; no server listens at the target."""
    from vita.processing.audio import write_wav

    bad, empty = tmp_path / "bad.png", tmp_path / "empty.wav"
    bad.write_bytes(b"not a picture")
    empty.write_bytes(b"")
    good = write_wav(tmp_path / "good.wav", np.zeros(8000, dtype=np.float32))
    target = f"127.0.0.1:{closed_port()}"
    for argv, message in [
        (["ask", "--target", target], "vita ask: error: nothing to ask: give --text, --image, --video or --audio"),
        (["ask", "--target", target, "--text", "hi", "--image", str(bad)],
         f"vita ask: error: {bad}: image data is not in a supported image format"),
        (["ask", "--target", target, "--audio", str(good), "--audio", str(empty)],
         f"vita ask: error: {empty}: audio is empty"),
        (["ask", "--target", target, "--video", str(bad)], f"vita ask: error: {bad}: "),
        (["converse", "--target", target, "--image", str(bad)], f"vita converse: error: {bad}: image data"),
        (["converse", "--target", target, "--wav", str(good), "--wav", str(empty)],
         f"vita converse: error: {empty}: audio is empty"),
    ]:
        status, err = run(capsys, *argv)
        assert status == cli.EXIT_USAGE and one_line(err).startswith(message), err
