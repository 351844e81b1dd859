"""`make demo` leaves nothing in Redis: its stack's job streams keep no TTL, so the demo deletes its prefix."""

import uuid

from redis import Redis

from vita import demo

URL = "redis://127.0.0.1:6379/0"


def test_the_demo_forgets_its_prefix_and_only_its_prefix():
    prefix = f"demotest{uuid.uuid4().hex[:8]}"
    with Redis.from_url(URL) as r:
        r.xadd(f"{prefix}:jobs:llm:generator", {"job": b"x"})
        r.set(f"{prefix}:session:abc", b"state")
        r.set(f"{prefix}x:kept", b"another prefix")  # shares the letters, not the prefix
        try:
            demo._forget(prefix, URL)
            assert list(r.scan_iter(match=f"{prefix}:*")) == []
            assert r.get(f"{prefix}x:kept") == b"another prefix"
        finally:
            r.delete(f"{prefix}x:kept")


def test_forgetting_with_no_redis_is_quiet():
    demo._forget("nothing", "redis://127.0.0.1:1/0")  # the demo's throw-away Redis went away with it: no error
