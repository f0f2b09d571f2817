"""A copy of the keyspace holds no session id (``Config.hash_ids``, the default).

Sessions with known ids and secret data go through every write path (create,
update, apply, touch, rotate, login-style ``rotate_into``, ``delete_by_user`` with a
kept session, evictions at the per-user limit, purge); then every key of the
database is read back, type-aware (HGETALL, ZRANGE WITHSCORES, GET, SMEMBERS,
LRANGE), and ``DUMP``ed too (its payload may be LZF-compressed, so the type-aware
reads are the real check). On one server and on the Redis Cluster fixture. The same
check with ``hash_ids=False`` finds the ids: it can fail.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402
from redis.asyncio.cluster import ClusterNode, RedisCluster  # noqa: E402

from asyncsession import (  # noqa: E402
    Changes,
    Config,
    new_session,
    session_handle,
    with_controls,
)
from asyncsession.backends.redis import RedisStore  # noqa: E402

from . import backend_redis  # noqa: E402
from .clock import FakeClock  # noqa: E402


class Target:
    """A Redis deployment, a client on it and stores under one fresh prefix."""

    def __init__(self, client: Redis | RedisCluster, url: str) -> None:
        self.client = client
        self.url = url
        self.prefix = f"test:{uuid.uuid4().hex[:12]}:"
        self.stores: list[Any] = []

    def store(self, clock: FakeClock, **config: Any) -> Any:
        settings: dict[str, Any] = {
            "site_id": "site-a",
            "key_prefix": self.prefix,
            "max_sessions_per_user": 2,
            "cleanup_interval": 0,
            "idle_timeout": timedelta(minutes=30),
        }
        settings.update(config)
        cfg = Config(**settings)
        raw = RedisStore.from_url(self.url, cfg, clock=clock)
        self.stores.append(raw)
        return with_controls(raw, cfg)

    async def everything(self) -> list[bytes]:
        """Every key of the database, every value read by its type, and each key's
        ``DUMP`` payload."""
        client: Any = self.client
        out: list[bytes] = []
        async for key in client.scan_iter(count=1000):
            out.append(key)
            kind = (await client.type(key)).decode()
            if kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    out += [field, value]
            elif kind == "zset":
                for member, score in await client.zrange(key, 0, -1, withscores=True):
                    out += [member, repr(score).encode()]
            elif kind == "string":
                out.append(await client.get(key))
            elif kind == "set":
                out += list(await client.smembers(key))
            elif kind == "list":
                out += list(await client.lrange(key, 0, -1))
            elif kind != "none":  # (gone since SCAN saw it)
                raise AssertionError(f"a {kind} at {key!r}: read it too")
            payload = await client.dump(key)
            if payload is not None:
                out.append(payload)
        return out

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        await backend_redis.delete_prefix(self.client, self.prefix)
        await self.client.aclose()


@pytest.fixture(params=["single", "cluster"])
async def target(request: pytest.FixtureRequest) -> AsyncIterator[Target]:
    if request.param == "single":
        if not backend_redis.server_reachable():
            if backend_redis.REQUIRE:
                pytest.fail(f"ASYNCSESSION_REQUIRE_REDIS=1, no Redis at {backend_redis.REDIS_URL}")
            pytest.skip("reads the keyspace of a real Redis server")
        t = Target(Redis.from_url(backend_redis.REDIS_URL), backend_redis.REDIS_URL)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        nodes = [ClusterNode(h, p) for h, p in cluster.startup_nodes]
        t = Target(RedisCluster(startup_nodes=nodes), cluster.url)
    try:
        yield t
    finally:
        await t.close()


async def write_everything(target: Target, clock: FakeClock, **config: Any) -> dict[str, str]:
    """Sessions through every write path; every id used, by label (secret data: the
    word "secret" and the label)."""
    store = target.store(clock, **config)
    used: dict[str, str] = {}

    async def create(label: str, user: str | None, ttl: float | None = None) -> str:
        s = await store.create(new_session(user, ttl, now=clock(), data={"s": f"secret-{label}"}))
        used[label] = s.id
        clock.advance(1)
        return str(s.id)

    anon = await create("anon", None)
    got = await store.get(anon)
    got.data["more"] = "secret-more"
    await store.update(got)
    await store.apply(anon, Changes(set={"k": "secret-k"}))
    await store.touch(anon)
    for n in range(3):  # the third evicts the first (limit 2)
        await create(f"alice{n}", "alice")
    used["alice1-rotated"] = await store.rotate(used["alice1"])
    guest = await create("guest", None)
    login = new_session("bob", now=clock(), data={"s": "secret-login"})
    used["login"] = (await store.rotate_into(guest, login)).id
    await create("bob-other", "bob")
    assert await store.delete_by_user("bob", keep=used["login"]) == 1
    await create("short", "carol", ttl=10)
    clock.advance(20)
    assert await store.purge_expired() == 1
    await create("deleted", None)
    assert await store.delete(used["deleted"]) is True
    live = [s.id for s in await store.list_by_user("alice")]
    assert live == [store.handle(used[x]) for x in ("alice1-rotated", "alice2")]
    return used


async def test_the_keyspace_holds_no_session_id(target: Target, clock: FakeClock) -> None:
    used = await write_everything(target, clock)
    everything = await target.everything()
    blob = b"\n".join(everything)
    for label, session_id in used.items():
        assert session_id.encode() not in blob, f"{label}'s id is stored"
        assert session_id[4:20].encode() not in blob, f"part of {label}'s id is stored"
    # the reads did see the sessions: their handles and their (clear) data
    for label in ("anon", "alice2", "alice1-rotated", "login"):
        assert session_handle(used[label]).encode() in blob, label
        assert f"secret-{label.split('-')[0]}".encode() in blob, label
    assert any(key.startswith(f"{target.prefix}r:".encode()) for key in everything)


async def test_the_check_finds_ids_stored_in_the_clear(target: Target, clock: FakeClock) -> None:
    """``hash_ids=False`` keeps the previous layout: the same reads find the ids."""
    used = await write_everything(target, clock, hash_ids=False)
    blob = b"\n".join(await target.everything())
    # (on a cluster a key holds the id split by its hash tag's braces: look for the rest)
    found = {label for label, session_id in used.items() if session_id[4:].encode() in blob}
    # live sessions (keys, members, records) and the rotated ids (rotation records)
    assert {"anon", "alice1-rotated", "alice2", "login", "alice1", "guest"} <= found
