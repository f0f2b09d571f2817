"""RedisStore behind Redis Sentinel (one primary, one replica, one sentinel), started by
the tests themselves (tests/redis_servers.py)."""

from __future__ import annotations

import pytest

redis = pytest.importorskip("redis")

from .redis_servers import Sentinel  # noqa: E402


def test_sentinel_fixture_names_a_primary_with_a_synced_replica(redis_sentinel: Sentinel) -> None:
    redis_sentinel.wait_synced()
    primary, replica = redis_sentinel.current()
    assert primary.info("replication")["role"] == "master"
    assert replica.info("replication")["master_port"] == primary.port
