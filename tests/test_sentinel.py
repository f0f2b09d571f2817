"""RedisStore behind Redis Sentinel (one primary, one replica, one sentinel), started by
the tests themselves (tests/redis_servers.py): ``from_sentinel`` and the
``redis+sentinel://`` URL, a sentinel that names no primary, and a forced failover
(``SENTINEL FAILOVER``) in the middle of a load of reads and writes, after which the
store works on the new primary and no session created before the failover is lost.

The failover test runs last in this module: the sentinel takes some 20 s after a
failover to see the old primary as a good replica again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from asyncsession import (  # noqa: E402
    Config,
    Session,
    SessionConflict,
    SessionNotFound,
    StoreUnavailable,
    new_session,
    open_store,
    with_controls,
)
from asyncsession.backends.redis import RedisStore  # noqa: E402
from asyncsession.backends.redis import urls as _urls  # noqa: E402

from .clock import FakeClock  # noqa: E402
from .redis_servers import SERVICE, Sentinel, free_ports  # noqa: E402


def cfg(**changes: Any) -> Config:
    base: dict[str, Any] = {
        "site_id": "site-a",
        "max_sessions_per_user": 0,
        "cleanup_interval": 0,
        "key_prefix": f"test:{uuid.uuid4().hex[:12]}:",
    }
    base.update(changes)
    return Config(**base)


def test_sentinel_fixture_names_a_primary_with_a_synced_replica(redis_sentinel: Sentinel) -> None:
    redis_sentinel.wait_synced()
    primary, replica = redis_sentinel.current()
    assert primary.info("replication")["role"] == "master"
    assert replica.info("replication")["master_port"] == primary.port


def test_sentinel_url_forms() -> None:
    sentinels, service, options = _urls.parse_sentinel_url(
        "redis+sentinel://:pw@s1:26379,s2/mymaster/2?socket_timeout=1.5"
    )
    assert sentinels == [("s1", 26379), ("s2", 26379)] and service == "mymaster"
    assert options == {"password": "pw", "db": 2, "socket_timeout": 1.5}
    with pytest.raises(ValueError, match="service"):
        _urls.parse_sentinel_url("redis+sentinel://s1:26379")
    with pytest.raises(ValueError, match="service"):
        RedisStore.from_url("redis+sentinel://:secret@s1:26379/")


@pytest.mark.parametrize("error", [AttributeError, TypeError, redis.ConnectionError])
async def test_the_sentinel_follower_outlives_any_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: type
) -> None:
    """The follower of ``+switch-master`` keeps following after any error of a
    sentinel's link, not only a ``RedisError`` (outside fault injection: one reply of
    the wrong type made redis-py raise ``AttributeError``, the follower ended for good
    and the store went on writing to the demoted primary). A server speaking the
    Redis protocol stands in for the sentinel; its first two subscriptions fail."""
    from . import backend_redis

    if not backend_redis.server_reachable():
        if backend_redis.REQUIRE:
            pytest.fail(f"no Redis server at {backend_redis.REDIS_URL}")
        pytest.skip(f"no Redis server at {backend_redis.REDIS_URL} (pub/sub needs one)")
    from types import SimpleNamespace

    from redis.asyncio.client import PubSub

    from asyncsession.backends.redis import sentinel as sentinel_module

    monkeypatch.setattr(sentinel_module, "RETRY_MAX", 0.01)
    real, failing = PubSub.subscribe, [2]

    async def subscribe(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        if failing[0]:
            failing[0] -= 1
            raise error("a malformed reply (test)")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(PubSub, "subscribe", subscribe)
    service = f"svc-{uuid.uuid4().hex[:8]}"
    calls: list[float] = []

    async def switched() -> None:
        calls.append(time.monotonic())

    client = redis.asyncio.Redis.from_url(backend_redis.REDIS_URL)
    follower = asyncio.ensure_future(
        sentinel_module.follow_sentinels(
            SimpleNamespace(sentinels=[client]),  # type: ignore[arg-type]
            service,
            switched,
        )
    )
    try:
        async with asyncio.timeout(10):
            while not calls:  # subscribed at the third try: a missed switch is assumed
                assert not follower.done(), follower.exception()
                await asyncio.sleep(0.01)
            assert failing == [0] and len(calls) == 1
            while len(calls) == 1:  # a real announcement, for this service
                await client.publish("+switch-master", f"{service} 10.0.0.1 6379 10.0.0.2 6379")
                await client.publish("+switch-master", "another 10.0.0.1 6379 10.0.0.2 6379")
                await asyncio.sleep(0.05)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await client.aclose()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (0 if error is redis.ConnectionError else 1), warnings


async def test_store_through_from_sentinel_and_the_url(
    redis_sentinel: Sentinel, clock: FakeClock
) -> None:
    config = cfg(max_sessions_per_user=2)
    primary, _ = redis_sentinel.current()
    via_url = open_store(redis_sentinel.url, config, clock=clock)
    direct = with_controls(
        RedisStore.from_sentinel(redis_sentinel.sentinels, SERVICE, config, clock=clock), config
    )
    async with via_url, direct:
        assert isinstance(via_url.store, RedisStore)
        s = await via_url.create(new_session("alice", data={"k": 1}))
        got = await direct.get(s.id)  # the same primary: read-your-writes
        got.data["k"] = 2
        await direct.update(got)
        assert (await via_url.get(s.id)).data == {"k": 2}
        assert primary.call("EXISTS", via_url.store.session_key(via_url.handle(s.id))) == 1  # type: ignore[attr-defined]
        await via_url.create(new_session("alice"))
        await direct.create(new_session("alice"))
        assert len(await via_url.list_by_user("alice")) == 2  # the limit, atomically
        assert await direct.delete_by_user("alice") == 2


async def test_a_sentinel_that_names_no_primary_is_store_unavailable(
    redis_sentinel: Sentinel, clock: FakeClock
) -> None:
    sentinels = redis_sentinel.sentinels
    store = RedisStore.from_sentinel(sentinels, "no-such-service", cfg(), clock=clock)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get(new_session(None).id)
        text = str(info.value)
        assert "no-such-service" in text and "redis+sentinel://" in text
    finally:
        await store.close()
    (port,) = free_ports(1)  # no sentinel at all
    store = RedisStore.from_url(
        f"redis+sentinel://:secret@127.0.0.1:{port}/{SERVICE}",
        cfg(),
        clock=clock,
        socket_connect_timeout=0.5,
    )
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.create(new_session("alice"))
        assert "secret" not in str(info.value)
    finally:
        await store.close()


async def test_a_hung_sentinel_is_passed_over_for_the_next(
    redis_sentinel: Sentinel, clock: FakeClock
) -> None:
    """A sentinel that accepts connections and never answers (a frozen process), listed
    first: redis-py asks the sentinels in turn, and without a read timeout of their own
    the first one took each call's whole deadline (every call StoreUnavailable, a new
    worker could not even open). Now it costs a lookup SENTINEL_TIMEOUT at most."""
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    hung = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    hosts = ",".join(f"{h}:{p}" for h, p in [("127.0.0.1", port), *redis_sentinel.sentinels])
    store = open_store(f"redis+sentinel://{hosts}/{SERVICE}", cfg(), clock=clock)
    try:
        async with store:
            made = await store.create(new_session("alice", data={"k": 1}))
            assert (await store.get(made.id)).data == {"k": 1}
        assert held, "the hung sentinel was asked first"
        sentinel_pools = [s.connection_pool for s in store.store._sentinel.sentinels]  # type: ignore[attr-defined]
        assert {p.connection_kwargs["socket_timeout"] for p in sentinel_pools} == {1.0}
    finally:
        hung.close()
        for writer in held:
            writer.close()
        await hung.wait_closed()


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_forced_failover_under_load_loses_no_session_created_before(
    redis_sentinel: Sentinel, clock: FakeClock
) -> None:
    redis_sentinel.wait_synced()
    config = cfg()
    store = with_controls(
        RedisStore.from_sentinel(
            redis_sentinel.sentinels, SERVICE, config, clock=clock, timeout=2.0
        ),
        config,
    )
    async with store:
        before = [
            await store.create(new_session(f"user-{i % 10}", data={"i": i, "n": 0}))
            for i in range(300)
        ]
        old_primary, old_replica = redis_sentinel.current()
        assert int(old_primary.call("WAIT", 1, 5000)) == 1  # the replica has them all

        counts = {"ok": 0, "unavailable": 0, "conflict": 0}
        stop = asyncio.Event()
        rng = random.Random(7)

        async def worker(n: int) -> None:
            mine: Session | None = None
            while not stop.is_set():
                try:
                    s = before[rng.randrange(len(before))]
                    got = await store.get(s.id)
                    assert got.data["i"] == s.data["i"]  # never another session's data
                    if n % 2:
                        got.data["n"] += 1
                        await store.update(got)
                    elif mine is None:
                        mine = await store.create(new_session(f"w{n}", data={"i": -1}))
                    else:
                        assert (await store.get(mine.id)).user_id == f"w{n}"
                    counts["ok"] += 1
                except StoreUnavailable:
                    counts["unavailable"] += 1
                    await asyncio.sleep(0.01)
                except SessionConflict:
                    counts["conflict"] += 1
                except SessionNotFound:
                    mine = None  # written to the old primary after the switch: gone
                await asyncio.sleep(0)

        workers = [asyncio.ensure_future(worker(n)) for n in range(16)]
        try:
            await wait_for(lambda: counts["ok"] >= 300, 60, "load before the failover")
            new_primary, _ = await asyncio.to_thread(redis_sentinel.failover)
            assert new_primary is old_replica
            ok_at_switch = counts["ok"]
            await wait_for(lambda: counts["ok"] >= ok_at_switch + 300, 90, "load after it")
        finally:
            stop.set()
            results = await asyncio.gather(*workers, return_exceptions=True)
        assert [r for r in results if r is not None] == []  # no assertion failed inside

        # the store follows the new primary: what it writes lands there. The sentinel's
        # +switch-master reaches the store asynchronously, so on a saturated machine a
        # few more writes may still reach the demoted primary first (the window Sentinel
        # always has, docs/scaling.md); bound it at 30 s. A request in flight on the old
        # primary when the store drops its connections (+switch-master) or when the
        # sentinel demotes it (REPLICAOF + CLIENT KILL, at its next INFO round, ~10 s
        # later) fails with StoreUnavailable, never with a raw redis error and never
        # silently: that is the contract (no client-side retry of a write). Wait for
        # the demotion too, so the reads below cannot meet it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        landed = unavailable = 0
        while not landed or old_primary.info("replication")["role"] != "slave":
            try:
                after = await store.create(new_session("after", data={"i": -2}))
            except StoreUnavailable:
                unavailable += 1
            else:
                key = store.store.session_key(store.handle(after.id))  # type: ignore[attr-defined]
                landed += new_primary.call("EXISTS", key)
            assert loop.time() < deadline, (
                f"in 30 s: {landed} writes on the new primary, {unavailable} unavailable, "
                f"old primary {old_primary.info('replication')['role']}"
            )
            await asyncio.sleep(0.1)
        assert new_primary.info("replication")["role"] == "master"
        # no session created before the failover is lost, none is changed into another
        for s in before:
            got = await store.get(s.id)
            assert got.data["i"] == s.data["i"] and got.user_id == s.user_id
        assert len(await store.list_by_user("user-3")) == 30
