"""benchmarks/serving.py at tiny size: the local stack against the same engine in-process, rounds alternated."""

import os

import pytest
import redis
from conftest import load_benchmark

from vita.stack import LocalStack


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--isolate-engine needs 2 CPUs")
def test_isolated_engine_rounds_report_a_ratio_each_and_give_redis_back_its_cpus(capsys):
    bench = load_benchmark("serving")
    # The Redis the benchmark's stack uses; None when it is not a process here the benchmark may pin (then untouched)
    redis_pid = bench.local_redis_pid(redis.Redis.from_url(LocalStack.redis_url))
    redis_cpus, own_cpus = os.sched_getaffinity(redis_pid) if redis_pid else None, os.sched_getaffinity(0)
    argv = ["--no-write", "--requests", "2", "--rounds", "2", "--concurrency", "1", "--isolate-engine"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith(("| stack |", "| in-process |"))]
    assert [(path.strip(), clients.strip()) for path, clients in rows] == [("stack", "1"), ("in-process", "1")]
    ratio = next(line for line in out.splitlines() if line.startswith("- stack / in-process"))
    assert ratio.count("x, ") + ratio.count("x over") == 3 and "median" in ratio  # two rounds and their median
    assert "Engine isolated" in out
    # The shared Redis and this process run where they ran before: the pinning is undone.
    if redis_pid:
        assert os.sched_getaffinity(redis_pid) == redis_cpus
    assert os.sched_getaffinity(0) == own_cpus


def test_bad_settings_are_one_line_errors(capsys):
    bench = load_benchmark("serving")
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--rounds", "0"])
    assert stopped.value.code == 2
    assert "--rounds must be 1 or more" in capsys.readouterr().err
