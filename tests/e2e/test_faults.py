"""Faults while a turn is in flight, through the process stack on a private redis-server (never the shared one):
kill -9 of each service kind, Redis restarted with and without its data, Redis stalled for 5 s, a consumer slower
than its producer, and the generations of a killed orchestrator stopped by their workers once its leases expire. One trial per kind here (each prints "N of N"); benchmarks/faults.py runs N trials per kind.

Each drill (vita/drills.py) waits on events: a job pending in its group, a token, a process exit. The only clock is
the length of an outage the drill injects.
"""

import uuid

import pytest

from vita.drills import Drills, drill_stack
from vita.stack import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drills(tiny_model_dir, query_clip, tmp_path_factory):
    """The random tiny model: the drills test the plumbing, not the answers (the monitor's judgement of the
    spoken turn may be either outcome)."""
    data = tmp_path_factory.mktemp("redis")
    with RedisServer(str(data / "data"), persistent=True) as server:
        stack = drill_stack(str(tiny_model_dir), server, str(tmp_path_factory.mktemp("logs")),
                            prefix=f"faults{uuid.uuid4().hex[:8]}")
        with stack:
            yield Drills(stack, server, query_clip)


def report(outcome) -> None:
    print(f"\n{outcome.drill}: {int(outcome.ok)} of 1 ({outcome.detail}; {outcome.seconds:.1f} s)")
    assert outcome.ok, outcome


@pytest.mark.timeout(600)
@pytest.mark.parametrize("service", ["audio-encoder", "vision-encoder", "llm-generator", "llm-monitor"])
def test_a_worker_killed_mid_job_is_replaced_and_the_turn_completes(drills, service):
    report(drills.kill_worker_mid_job(service))


@pytest.mark.timeout(600)
def test_a_killed_orchestrator_ends_its_calls_clearly_and_the_session_resumes(drills):
    report(drills.kill_orchestrator_mid_answer())


@pytest.mark.timeout(600)
def test_the_generations_of_a_killed_orchestrator_stop_when_its_leases_expire(drills):
    """A Generate answer (generator pool) and a Converse answer after a role swap (monitor pool): each worker ends
    its generation CANCELLED within the lease bound of the kill, not at max tokens."""
    report(drills.orphaned_generations())


@pytest.mark.timeout(600)
def test_redis_stalled_for_5_s_mid_answer(drills):
    report(drills.redis_stall(5.0))


@pytest.mark.timeout(600)
def test_redis_down_for_5_s_and_restarted_with_its_data(drills):
    report(drills.redis_restart(keep_data=True, down_s=5.0))


@pytest.mark.timeout(600)
def test_redis_restarted_without_its_data(drills):
    report(drills.redis_restart(keep_data=False))


@pytest.mark.timeout(600)
def test_a_consumer_slower_than_its_producer(drills):
    report(drills.slow_consumer())
