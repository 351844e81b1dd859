"""Telemetry parts the soak benchmark reads: the asyncio task gauge and the heap-growth report."""

import asyncio
import tracemalloc

from prometheus_client import generate_latest

from vita.telemetry.heap import heap_growth, take_snapshot, type_counts
from vita.telemetry.metrics import Metrics


def gauge(metrics: Metrics, name: str) -> float | None:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_asyncio_tasks_gauge_counts_the_named_loops_tasks():
    metrics = Metrics()
    assert gauge(metrics, "vita:asyncio_tasks") is None  # no loop named yet: not exported

    async def body() -> tuple[float, float, float]:
        metrics.event_loop.loop = asyncio.get_running_loop()
        before = gauge(metrics, "vita:asyncio_tasks")
        release = asyncio.Event()
        tasks = [asyncio.create_task(release.wait()) for _ in range(5)]
        await asyncio.sleep(0)
        during = gauge(metrics, "vita:asyncio_tasks")
        release.set()
        await asyncio.gather(*tasks)
        return before, during, gauge(metrics, "vita:asyncio_tasks")

    before, during, after = asyncio.run(body())
    assert during == before + 5 and after == before


class Leaked:
    """A stand-in for a per-session object nobody frees."""

    def __init__(self) -> None:
        self.buffer = bytearray(10_000)


def test_heap_growth_names_what_grew_and_where():
    kept = []
    tracemalloc.start(4)
    try:
        baseline, baseline_types = take_snapshot(), type_counts()
        kept += [Leaked() for _ in range(50)]
        growth = heap_growth(baseline, baseline, take_snapshot(), baseline_types, type_counts(), top=5)
    finally:
        tracemalloc.stop()
    assert growth["since_baseline_kib"] >= 50 * 10_000 / 1024
    assert growth["types"]["Leaked"] == 50
    assert "test_telemetry.py" in growth["sites"][0]["where"] and growth["sites"][0]["blocks"] >= 50
