"""Redis Cluster backend for the conformance suite.

Runs against the test session's shared 3-primary cluster (``tests/redis_servers.py``,
started on first use, stopped at the end of the session), each test under its own key
prefix, through ``RedisStore.from_url("redis+cluster://...")``. Without
``redis-server`` / ``redis-cli`` the tests skip, unless
``ASYNCSESSION_REQUIRE_SERVERS=1``: then they fail.
"""

from __future__ import annotations

from dataclasses import replace

from asyncsession import Config, Store

from . import backend_redis, redis_servers
from .clock import FakeClock


def skip_reason() -> str | None:
    too_old = redis_servers.cluster_client_reason()
    if too_old is not None:  # (a declared limit, not a missing server: always a skip)
        return too_old
    reason = redis_servers.skip_reason()
    if reason is not None and not redis_servers.REQUIRE:
        return reason
    return None  # under REQUIRE, open_raw fails loudly


async def open_raw(config: Config, clock: FakeClock, namespace: str) -> Store:
    reason = redis_servers.skip_reason()
    if reason is not None:
        raise AssertionError(f"ASYNCSESSION_REQUIRE_SERVERS=1 but {reason}")
    cluster = redis_servers.shared_cluster()
    config = replace(config, key_prefix=backend_redis.prefix_for(namespace))
    store: Store = backend_redis.cleaning_store_class().from_url(cluster.url, config, clock=clock)
    await store.__aenter__()
    return store
