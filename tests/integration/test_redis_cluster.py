"""The bus on a real 3-master Redis Cluster (loopback ports, nodes holding only the services' ACL user besides an
admin): every multi-key command stays in one hash slot, so Generate (text, and an image through the vision
encoder's embedding blobs), a Converse session, cancellation, leases and dead letters work through
redis.asyncio.RedisCluster, and the keys really spread over the masters."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.crc import key_slot

from tests.bus_stack import bus_traffic, check_traffic
from tests.redis_servers import RedisCluster
from vita.bus.acl import acl_rule
from vita.bus.cancel import CancelWatcher
from vita.bus.lease import LeaseKeeper
from vita.bus.queue import Consumer
from vita.bus.streams import BusConfig, Pool
from vita.inference import VitaPipeline
from vita.runtime.redis_client import RedisSettings, connect

PASSWORD = "cluster-bus-secret"
ADMIN = "cluster-admin-secret"


def slot(key: str) -> int:
    return key_slot(key.encode())


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefix):
    directory = tmp_path_factory.mktemp("redis-cluster")
    acl = directory / "users.acl"
    acl.write_text(f"user default on >{ADMIN} ~* &* +@all\n{acl_rule('vita', prefix, f'>{PASSWORD}')}\n")
    cluster = RedisCluster(directory, args=["--aclfile", str(acl)], admin_password=ADMIN)
    yield cluster
    cluster.stop()


def test_keys_that_share_a_command_share_a_slot():
    bus = BusConfig(prefix="vita")
    for pool in Pool:  # a dead letter is added and its job acked in one MULTI
        assert slot(bus.jobs(pool)) == slot(bus.dead_letters(pool))
    # A session's state and its pending media: one WATCH/MULTI.
    assert slot(bus.session("s1")) == slot(bus.session_frames("s1")) == slot(bus.session_images("s1"))
    # A request's reply stream, cancel key and lease: one node.
    assert slot(bus.reply("r1")) == slot(bus.cancel_key("r1")) == slot(bus.lease_key("r1"))
    # Different requests and sessions do spread over the slots.
    assert len({slot(bus.reply(f"r{k}")) for k in range(50)}) > 40
    assert len({slot(bus.session(f"s{k}")) for k in range(50)}) > 40


def test_the_stack_runs_on_a_redis_cluster(pipeline, tiny_model_dir, cluster, prefix, wide_png):
    settings = RedisSettings(cluster.url("vita", PASSWORD), cluster=True)
    check_traffic(*asyncio.run(bus_traffic(pipeline, tiny_model_dir, settings, prefix, wide_png.read_bytes())))
    holders = 0
    for node in cluster.nodes:
        with cluster.admin(node) as client:
            holders += bool(list(client.scan_iter(match=f"{prefix}:*", count=1000)))
    assert holders >= 2, "the bus's keys all landed on one master: the hash tags defeat sharding"


def test_dead_letters_on_a_cluster(cluster, prefix):
    async def main():
        redis = connect(RedisSettings(cluster.url("vita", PASSWORD), cluster=True))
        bus = BusConfig(prefix=prefix)
        try:
            await redis.xadd(bus.jobs(Pool.LLM_MONITOR), {b"not.a.Message": b"junk"})
            consumer = Consumer(redis, bus, Pool.LLM_MONITOR)
            delivered = await consumer.read(count=10, block_ms=100)
            dead = await redis.xrange(bus.dead_letters(Pool.LLM_MONITOR))
            pending = await redis.xpending(bus.jobs(Pool.LLM_MONITOR), Pool.LLM_MONITOR.group)
            return delivered, dead, pending
        finally:
            await redis.aclose()

    delivered, dead, pending = asyncio.run(main())
    assert delivered == [] and len(dead) == 1 and pending["pending"] == 0
    assert dead[0][1][b"dead:stream"].decode() == BusConfig(prefix=prefix).jobs(Pool.LLM_MONITOR)


def test_a_take_over_on_a_cluster(cluster, prefix, caplog):
    """The reclaim reads the jobs' owners and claims them in one MULTI (XPENDING, XAUTOCLAIM), which a Cluster
    runs on the stream's node, as the ACL user."""
    from vita.bus.queue import submit
    from vita.v1.bus_pb2 import EncodeJob

    async def main():
        redis = connect(RedisSettings(cluster.url("vita", PASSWORD), cluster=True))
        bus = BusConfig(prefix=prefix, reclaim_idle_ms=50)
        try:
            job = EncodeJob(job_id="j1", request_id="r1", reply_stream=bus.reply("r1"), kind=EncodeJob.AUDIO)
            await submit(redis, bus, Pool.AUDIO_ENCODER, job)
            dead, heir = Consumer(redis, bus, Pool.AUDIO_ENCODER), Consumer(redis, bus, Pool.AUDIO_ENCODER)
            (first,) = await dead.read(block_ms=None)
            await asyncio.sleep(0.2)
            (again,) = await heir.read(block_ms=None)
            await heir.ack(again.entry_id)
            return dead.name, first, again
        finally:
            await redis.aclose()

    caplog.set_level("INFO", logger="vita.bus.queue")
    dead, first, again = asyncio.run(main())
    assert (again.entry_id, again.message, again.deliveries) == (first.entry_id, first.message, 2)
    [record] = [r for r in caplog.records if r.getMessage().startswith("took over jobs")]
    assert (record.from_consumers, record.request_ids) == ([dead], ["r1"])


def test_leases_on_a_cluster(cluster, prefix):
    """Renewals (one pipeline over every held lease, across slots) and the watcher's reads of leases and cancel
    keys (one pipeline) run on a Cluster; a released lease expires and its request is stopped as orphaned."""
    async def main():
        redis = connect(RedisSettings(cluster.url("vita", PASSWORD), cluster=True))
        admin = connect(RedisSettings(cluster.url("default", ADMIN), cluster=True))  # PTTL: not the services' rule
        bus = BusConfig(prefix=prefix, lease_ttl_s=1.0)
        ids = [f"lease-{k}" for k in range(8)]
        stopped = asyncio.Event()

        async def on_cancel(request_id: str) -> None:
            stopped.set()

        keeper = LeaseKeeper(redis, bus)
        try:
            async with CancelWatcher(redis, bus, on_cancel=on_cancel) as watcher:
                for request_id in ids:
                    await keeper.acquire(request_id)
                    assert not await watcher.watch(request_id, leased=True)
                keys = [bus.lease_key(request_id) for request_id in ids]
                lowest, renewed = [await admin.pttl(key) for key in keys], [False] * len(keys)
                while not all(renewed):  # until every lease was renewed (its TTL went back up), whatever its slot
                    await asyncio.sleep(0.02)
                    for k, key in enumerate(keys):
                        ttl = await admin.pttl(key)
                        renewed[k] = renewed[k] or ttl > lowest[k]
                        lowest[k] = min(lowest[k], ttl)
                keeper.release(ids[0])
                await asyncio.wait_for(stopped.wait(), 60)
                return [watcher.orphaned(request_id) for request_id in ids], {slot(key) for key in keys}
        finally:
            for request_id in ids:
                keeper.release(request_id)
            await redis.aclose()
            await admin.aclose()

    orphaned, slots = asyncio.run(main())
    assert orphaned == [True] + [False] * 7 and len(slots) > 1
