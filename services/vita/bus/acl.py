"""The Redis ACL rule for the services' user: exactly the commands the bus sends, only on the deployment's key
prefix and pub/sub channel. docs/deployment.md prints it; tests/integration/test_redis_security.py runs the whole
stack's traffic through a real redis-server holding only this user, so a command added to the bus without being
added here fails that test rather than a deployment.
"""

from __future__ import annotations

# By use: connection, transactions, strings (sessions, embeddings, cancel keys, leases), lists (pending session media),
# streams (jobs, replies, dead letters, consumer groups and their dead consumers), pub/sub (cancellation). `cluster|slots`,
# `cluster|shards` and `command` are what redis.asyncio.RedisCluster reads to learn the slot map and key positions.
COMMANDS = (
    "ping", "select", "multi", "exec", "discard", "watch", "unwatch",
    "get", "set", "exists", "del", "pexpire",
    "rpush", "rpop", "ltrim", "lrange",
    "xadd", "xread", "xreadgroup", "xack", "xclaim", "xautoclaim", "xpending", "xrange", "xlen", "xinfo|groups",
    "xgroup|create",
    # Dead-consumer removal (queue.Consumer.remove_dead_consumers): the list, then a script that re-checks the
    # consumer's pending entries (XPENDING) and deletes it; a script runs with the user's own command rights.
    "xinfo|consumers", "xgroup|delconsumer", "eval",
    "publish", "subscribe", "unsubscribe",
    "cluster|slots", "cluster|shards", "command",
)


def acl_rule(user: str, prefix: str, password: str = ">PASSWORD") -> str:
    """`user ...` for an ACL file (or, after `ACL SETUSER`, the same words): `password` is `>cleartext` or
    `#sha256hex`. Keys `{prefix}:*`, channels `{prefix}:*`, and nothing else."""
    commands = " ".join(f"+{c}" for c in COMMANDS)
    return f"user {user} on {password} resetkeys ~{prefix}:* resetchannels &{prefix}:* -@all {commands}"
