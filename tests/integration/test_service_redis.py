"""The Redis client every service builds (`setup`): blocking reads longer than redis-py's 5 s default socket
timeout must wait for their BLOCK time, not fail with a TimeoutError (a slow pool is not an error)."""

import argparse
import asyncio
import time
import uuid

from vita.runtime.args import add_common_args, setup


def test_a_blocking_read_longer_than_five_seconds_waits_it_out():
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args(["--prefix", f"test:{uuid.uuid4().hex}", "--log-level", "error"])
    redis, bus, _ = setup("test", args)

    async def read() -> tuple[list, float]:
        start = time.monotonic()
        try:
            return await redis.xread({f"{bus.prefix}:nothing": "0-0"}, block=6500), time.monotonic() - start
        finally:
            await redis.aclose()

    result, waited = asyncio.run(read())
    assert result == [] and waited >= 6.4
