"""What differs on a Redis Cluster: a transaction may touch one hash slot only, and the client has no single
connection pool. Everything else the bus does is the same on one Redis and on a Cluster."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.asyncio import RedisCluster
from redis.crc import key_slot


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def by_slot(keys: Iterable[str], redis: Any) -> list[list[str]]:
    """`keys` in groups that one MULTI may hold: one group on a single Redis, one per hash slot on a Cluster
    (order kept within a group)."""
    keys = list(keys)
    if not is_cluster(redis):
        return [keys] if keys else []
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return list(groups.values())


def socket_timeout(redis: Any) -> float | None:
    """The client's socket read timeout (seconds), or None for none."""
    kwargs = redis.get_connection_kwargs() if is_cluster(redis) else redis.connection_pool.connection_kwargs
    return kwargs.get("socket_timeout")
