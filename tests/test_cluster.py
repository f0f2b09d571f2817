"""RedisStore on a real 3-primary Redis Cluster started by the tests (tests/redis_servers.py)."""

from __future__ import annotations

import pytest

redis = pytest.importorskip("redis")

from redis.asyncio.cluster import ClusterNode, RedisCluster  # noqa: E402

from .redis_servers import Cluster  # noqa: E402


async def test_cluster_fixture_has_three_primaries_covering_every_slot(
    redis_cluster: Cluster,
) -> None:
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
    try:
        await client.initialize()
        primaries = client.get_primaries()
        assert sorted(n.port for n in primaries) == sorted(redis_cluster.ports)
        slots = {}
        for server in redis_cluster.servers:
            for start, port in Cluster.slot_map(server).items():
                slots.setdefault(start, set()).add(port)
        assert len(slots) == 3 and all(len(owners) == 1 for owners in slots.values())
    finally:
        await client.aclose()
