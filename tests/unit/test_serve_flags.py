"""`vita serve SERVICE` refuses out-of-range port and backlog flags as usage errors: one line naming the service and
the flag, exit status 2, before anything starts (an operator's try: --grpc-port 70000 served on 4464, --metrics-port
70000 ended in `internal error: OverflowError`, --backlog-limit -1 blamed the audio-encoder pool). The services'
own parsers are called: `vita serve SERVICE ARGS` hands them ARGS, and a flag they let through starts the service."""

from collections.abc import Callable, Sequence

import pytest

from vita.encoders.__main__ import ENCODERS
from vita.encoders.__main__ import parse_args as encoder_args
from vita.llm.__main__ import parse_args as llm_args
from vita.orchestrator.__main__ import parse_args as orchestrator_args
from vita.usage import EXIT_USAGE

PARSERS: dict[str, Callable[[Sequence[str]], object]] = {
    "llm": llm_args,
    "orchestrator": orchestrator_args,
    **{pool: (lambda argv, pool=pool: encoder_args(*ENCODERS[pool], argv)) for pool in ENCODERS},
}


def usage_error(capsys, service: str, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        PARSERS[service](list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("service", sorted(PARSERS))
@pytest.mark.parametrize("flag", ["--grpc-port", "--metrics-port", "--health-port"])
@pytest.mark.parametrize("value", ["70000", "65536", "-1"])
def test_every_port_flag_outside_0_65535_is_a_usage_error(capsys, service, flag, value):
    assert usage_error(capsys, service, flag, value) == (
        f"vita serve {service}: error: argument {flag}: {value} is outside [0, 65535] (see `vita serve {service} "
        "--help`)")


def test_the_realtime_gateways_port_is_checked_too(capsys):
    from vita.realtime.server import parse_args as realtime_args

    with pytest.raises(SystemExit) as exit_:
        realtime_args(["--port", "70000"])
    assert exit_.value.code == EXIT_USAGE
    assert capsys.readouterr().err.strip().startswith(
        "vita serve realtime: error: argument --port: 70000 is outside [0, 65535]")


@pytest.mark.parametrize("service", sorted(ENCODERS))
def test_the_kserve_port_is_checked_too(capsys, service):
    assert usage_error(capsys, service, "--kserve-port", "99999").startswith(
        f"vita serve {service}: error: argument --kserve-port: 99999 is outside [0, 65535]")


@pytest.mark.parametrize("service", sorted(PARSERS))
def test_port_0_and_65535_keep_their_meaning(service):
    """0: --grpc-port and --health-port pick a free port, --metrics-port and --kserve-port are off (unchanged)."""
    parse = PARSERS[service]
    for port in (0, 65535):
        args = parse(["--grpc-port", str(port), "--metrics-port", str(port), "--health-port", str(port)])
        assert (args.grpc_port, args.metrics_port, args.health_port) == (port, port, port)
    assert parse([]).health_port is None


@pytest.mark.parametrize("service", sorted(PARSERS))
@pytest.mark.parametrize("value", ["-1", "0", "10000"])
def test_a_backlog_limit_out_of_range_names_the_flag_and_the_service(capsys, service, value):
    line = usage_error(capsys, service, "--backlog-limit", value)
    assert line.startswith(f"vita serve {service}: error: argument --backlog-limit: {value} is outside [1, 9999]")
    assert PARSERS[service](["--backlog-limit", "9999"]).backlog_limit == 9999
