"""Redis-specific tests: key layout, atomicity under real concurrency, batching,
NOSCRIPT recovery, purging, corrupt data, failure mapping and a server-kill fault test.

The concurrency and fault tests need a real server (``REDIS_URL``, default
``redis://127.0.0.1:6379/15``); the rest also run on fakeredis. With
``ASYNCSESSION_REQUIRE_REDIS=1`` a missing server fails instead of skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402
from redis.asyncio.connection import Connection  # noqa: E402

from asyncsession import (  # noqa: E402
    Changes,
    Config,
    ControlledStore,
    InvalidSession,
    Session,
    SessionConflict,
    SessionEnded,
    SessionExpired,
    SessionLimitExceeded,
    SessionNotFound,
    SessionRotated,
    StoreUnavailable,
    ViolationEvent,
    new_session,
    open_store,
    session_handle,
    short_hash,
    with_controls,
)
from asyncsession.backends import redis as redis_backend  # noqa: E402
from asyncsession.backends.redis import RedisStore, transport  # noqa: E402
from asyncsession.backends.redis.rotation import kind, rotation_key  # noqa: E402
from asyncsession.codec import to_us  # noqa: E402
from asyncsession.store import Miss  # noqa: E402

from . import backend_redis, redis_servers  # noqa: E402
from .clock import FakeClock  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = backend_redis.REDIS_URL


def need_real_redis() -> None:
    if backend_redis.server_reachable():
        return
    if backend_redis.REQUIRE:
        pytest.fail(f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis server answers at {REDIS_URL}")
    pytest.skip(f"needs a real Redis server at {REDIS_URL}")


class CountingConnection(Connection):
    """Counts requests written to the socket: one per round trip (a pipeline is one
    write). A new connection's handshake is not counted: whether a batch needed one
    depends on timing."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not backend_redis.is_handshake(command):
            type(self).writes += 1
        await super().send_packed_command(command, check_health)


def hid(session_id: str) -> bytes:
    """How ``session_id`` is stored (its handle), as Redis returns members."""
    return session_handle(session_id).encode()


def cfg(**changes: Any) -> Config:
    base: dict[str, Any] = {"site_id": "site-a", "max_sessions_per_user": 5, "cleanup_interval": 0}
    base.update(changes)
    return Config(**base)


class Env(backend_redis.PrefixEnv):
    """Opens RedisStores on one test's own prefix and cleans everything up."""

    def __init__(self, clock: FakeClock) -> None:
        self.real = backend_redis.server_reachable()
        super().__init__(Redis.from_url(REDIS_URL) if self.real else backend_redis.fake_client())
        self.clock = clock

    def raw(self, config: Config | None = None, **options: Any) -> RedisStore:
        config = replace(config or cfg(), key_prefix=self.prefix)
        if options:
            store = RedisStore.from_url(REDIS_URL, config, clock=self.clock, **options)
        else:
            store = RedisStore(self.client, config, clock=self.clock)
        self.stores.append(store)
        return store

    def controlled(self, config: Config | None = None, **options: Any) -> ControlledStore:
        config = replace(config or cfg(), key_prefix=self.prefix)
        store = with_controls(self.raw(config), config, **options)
        self.stores.append(store)
        return store


def scripts_sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SHA of each script call this process's transport sends from now on (the
    server's own count, ``INFO commandstats``, takes in every client's calls)."""
    sent: list[str] = []
    real = transport.send_recovering

    async def spy(client: Any, commands: Any, **options: Any) -> list[Any]:
        sent.extend(command[1] for command in commands if command[0] == "EVALSHA")
        return await real(client, commands, **options)

    monkeypatch.setattr(transport, "send_recovering", spy)
    return sent


@pytest.fixture
async def env(clock: FakeClock) -> AsyncIterator[Env]:
    if not backend_redis.server_reachable() and backend_redis.REQUIRE:
        pytest.fail(f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis server answers at {REDIS_URL}")
    e = Env(clock)
    try:
        yield e
    finally:
        await e.close()


# ------------------------------------------------------------------------ key layout


async def test_key_layout_and_fields(env: Env, clock: FakeClock) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", timedelta(hours=1), data={"k": [1]}, now=clock()))
    raw = store.store
    assert isinstance(raw, RedisStore)
    skey = f"{env.prefix}s:{session_handle(s.id)}".encode()
    ikey = f"{env.prefix}u:6:site-a:alice".encode()
    xkey = f"{env.prefix}expiry".encode()
    assert await env.keys() == sorted([skey, ikey, xkey])
    fields = await env.client.hgetall(skey)
    assert set(fields) == {b"r", b"s", b"n", b"c", b"a", b"e", b"x", b"i"}
    assert fields[b"s"] == b"site-a" and fields[b"i"] == ikey and fields[b"n"] == b"0"
    assert fields[b"e"] == str(to_us(s.expires_at)).encode()  # type: ignore[arg-type]
    assert await env.client.zrange(ikey, 0, -1) == [hid(s.id)]
    assert await env.client.zscore(xkey, hid(s.id)) == to_us(s.expires_at)  # type: ignore[arg-type]
    assert s.id.encode() not in fields[b"r"]  # the record's own id field is the handle


async def test_native_expiry_follows_deadlines(env: Env, clock: FakeClock) -> None:
    store = env.controlled(cfg(idle_timeout=600))
    s = await store.create(new_session("alice", timedelta(hours=2), now=clock()))
    skey = store.store.session_key(session_handle(s.id))  # type: ignore[attr-defined]
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    grace = RedisStore.expiry_grace_ms

    def px(when: Any) -> int:
        return -(-to_us(when) // 1000) + grace

    xkey = store.store.expiry_key  # type: ignore[attr-defined]
    assert s.expires_at == clock() + timedelta(seconds=600)
    assert await env.client.pexpiretime(skey) == px(s.expires_at)
    assert await env.client.pexpiretime(ikey) == px(s.expires_at)
    assert await env.client.pexpiretime(xkey) == px(s.expires_at)
    clock.advance(300)
    await store.touch(s.id)
    got = await store.get(s.id)
    assert got.expires_at == clock() + timedelta(seconds=600)
    assert await env.client.pexpiretime(skey) == px(got.expires_at)
    assert await env.client.pexpiretime(ikey) == px(got.expires_at)
    assert await env.client.pexpiretime(xkey) == px(got.expires_at)
    # never past the absolute deadline
    while clock() + timedelta(seconds=600) < s.absolute_expires_at:  # type: ignore[operator]
        clock.advance(500)
        await store.touch(s.id)
    got = await store.get(s.id)
    assert got.expires_at == s.absolute_expires_at
    assert await env.client.pexpiretime(skey) == px(s.absolute_expires_at)
    # rotating the user's only session keeps the index's and expiry set's expiry
    ttls = [await env.client.pexpiretime(k) for k in (ikey, xkey)]
    await store.rotate(s.id)
    assert [await env.client.pexpiretime(k) for k in (ikey, xkey)] == ttls


async def test_update_with_the_same_deadline_only_rewrites_the_hash(
    env: Env, clock: FakeClock
) -> None:
    """Without an idle timeout an update keeps the deadline: the script writes the
    hash and nothing else (TTLs, expiry set and index already right); a changed
    deadline still moves all of them."""
    need_real_redis()  # counts commands with INFO commandstats
    store = env.controlled()
    s = await store.create(new_session("alice", timedelta(hours=1), data={"n": 0}, now=clock()))
    skey = store.store.session_key(session_handle(s.id))  # type: ignore[attr-defined]
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    xkey = store.store.expiry_key  # type: ignore[attr-defined]
    ttls = [await env.client.pexpiretime(k) for k in (skey, ikey, xkey)]
    await env.client.config_resetstat()
    for n in range(1, 4):
        clock.advance(60)
        got = await store.get(s.id)
        got.data["n"] = n
        await store.update(got)
    stats = await env.client.info("commandstats")
    assert "cmdstat_pexpireat" not in stats and "cmdstat_zadd" not in stats
    assert [await env.client.pexpiretime(k) for k in (skey, ikey, xkey)] == ttls
    got = await store.get(s.id)
    assert got.data == {"n": 3} and got.version == 3
    assert got.updated_at == clock() and got.expires_at == s.expires_at
    # a new deadline: key, index and expiry set follow
    got.expires_at = got.absolute_expires_at = clock() + timedelta(hours=5)
    await store.update(got)
    px = -(-to_us(got.expires_at) // 1000) + RedisStore.expiry_grace_ms
    assert [await env.client.pexpiretime(k) for k in (skey, ikey, xkey)] == [px, px, px]
    assert await env.client.zscore(xkey, hid(s.id)) == to_us(got.expires_at)


async def test_session_without_expiry_keeps_its_index(env: Env, clock: FakeClock) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", timedelta(hours=1), now=clock()))
    skey = store.store.session_key(session_handle(s.id))  # type: ignore[attr-defined]
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    xkey = store.store.expiry_key  # type: ignore[attr-defined]
    s.expires_at = s.absolute_expires_at = None
    await store.update(s)
    assert await env.client.pexpiretime(skey) == -1
    assert await env.client.pexpiretime(ikey) == -1
    assert await env.client.exists(xkey) == 0  # only sessions that can expire are in it
    other = await store.create(new_session("alice", timedelta(hours=1), now=clock()))
    assert await env.client.pexpiretime(ikey) == -1  # still holds one that never expires
    assert await env.client.zrange(xkey, 0, -1) == [hid(other.id)]
    clock.advance(timedelta(days=365))
    assert await store.purge_expired() == 1
    assert [x.id for x in await store.list_by_user("alice")] == [session_handle(s.id)]


async def test_touch_writes_two_fields_only(env: Env, clock: FakeClock) -> None:
    store = env.controlled(cfg(idle_timeout=600))
    s = await store.create(new_session("alice", data={"big": 2**63, "empty": [], "o": {}}))
    skey = store.store.session_key(session_handle(s.id))  # type: ignore[attr-defined]
    before = await env.client.hgetall(skey)
    clock.advance(10)
    await store.touch(s.id)
    after = await env.client.hgetall(skey)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {b"a", b"e"}
    got = await store.get(s.id)
    assert got.data == {"big": 2**63, "empty": [], "o": {}}
    assert got.last_accessed_at == clock() and got.version == 0


async def test_user_index_follows_every_write(env: Env, clock: FakeClock) -> None:
    store = env.controlled()
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    a = await store.create(new_session("alice"))
    b = await store.create(new_session("alice"))
    new_b = await store.rotate(b.id)
    assert await env.client.zrange(ikey, 0, -1) == [hid(a.id), hid(new_b)]
    await store.delete(a.id)
    assert await env.client.zrange(ikey, 0, -1) == [hid(new_b)]
    await store.delete(new_b)
    assert await env.client.exists(ikey) == 0
    # left: only b's rotation record, which Redis drops by itself (PXAT)
    record = rotation_key(store.store, session_handle(b.id))  # type: ignore[arg-type]
    assert await env.keys() == [record]
    assert await env.client.pexpiretime(record) > 0


async def test_stale_index_members_are_dropped(env: Env, clock: FakeClock) -> None:
    """A session key that vanished (native expiry, FLUSH, eviction by Redis) leaves an
    index member behind; the scripts that read the index drop it."""
    store = env.controlled(cfg(max_sessions_per_user=2, eviction="reject"))
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    a = await store.create(new_session("alice"))
    b = await store.create(new_session("alice"))
    await env.client.delete(store.store.session_key(session_handle(a.id)))  # type: ignore[attr-defined]
    c = await store.create(new_session("alice"))  # would be rejected if a still counted
    assert await env.client.zrange(ikey, 0, -1) == [hid(b.id), hid(c.id)]
    await env.client.delete(store.store.session_key(session_handle(b.id)))  # type: ignore[attr-defined]
    assert [s.id for s in await store.list_by_user("alice")] == [session_handle(c.id)]
    assert await env.client.zrange(ikey, 0, -1) == [hid(c.id)]


async def test_eviction_ties_broken_by_insertion_order(env: Env, clock: FakeClock) -> None:
    oldest = env.controlled(cfg(max_sessions_per_user=3))
    made = [
        await oldest.create(new_session("alice", now=clock())) for _ in range(3)
    ]  # same created_at
    await oldest.create(new_session("alice", now=clock()))
    ids = [s.id for s in await oldest.list_by_user("alice")]
    assert [session_handle(s.id) in ids for s in made] == [False, True, True]

    lru = env.controlled(cfg(site_id="b", max_sessions_per_user=3, eviction="lru"))
    made = [await lru.create(new_session("bob", now=clock())) for _ in range(3)]
    clock.advance(1)
    await lru.touch(made[0].id)
    await lru.create(new_session("bob", now=clock()))
    ids = [s.id for s in await lru.list_by_user("bob")]
    assert [session_handle(s.id) in ids for s in made] == [True, False, True]


async def test_index_scores_are_creation_order(env: Env, clock: FakeClock) -> None:
    """A member's score is its created_at (us); a session of the same microsecond as the
    newest gets one more, so ties keep insertion order without reading any session."""
    store = env.controlled()
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    a = await store.create(new_session("alice", now=clock()))
    b = await store.create(new_session("alice", now=clock()))
    clock.advance(1)
    c = await store.create(new_session("alice", now=clock()))
    scores = dict(await env.client.zrange(ikey, 0, -1, withscores=True))
    base = to_us(a.created_at)
    assert scores == {
        hid(a.id): base,
        hid(b.id): base + 1,
        hid(c.id): to_us(c.created_at),
    }
    new_c = await store.rotate(c.id)  # the new id keeps the old one's place
    assert await env.client.zscore(ikey, hid(new_c)) == to_us(c.created_at)


async def test_out_of_order_created_at_is_evicted_by_created_at(env: Env, clock: FakeClock) -> None:
    """A session created with an older created_at than an indexed one (or an update
    that changes created_at) rescores the index: eviction stays oldest created first."""
    store = env.controlled(cfg(max_sessions_per_user=3))
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    start = clock()
    b = await store.create(new_session("alice", now=start + timedelta(seconds=10)))
    c = await store.create(new_session("alice", now=start + timedelta(seconds=20)))
    a = await store.create(new_session("alice", now=start))  # older than both
    assert await env.client.zrange(ikey, 0, -1) == [hid(x.id) for x in (a, b, c)]
    d = await store.create(new_session("alice", now=start + timedelta(seconds=30)))
    assert await env.client.zrange(ikey, 0, -1) == [hid(x.id) for x in (b, c, d)]
    # same microsecond as an older member, created after it: sorted after it
    b2 = await store.create(new_session("alice", now=start + timedelta(seconds=10)))
    assert await env.client.zrange(ikey, 0, -1) == [hid(x.id) for x in (b2, c, d)]
    # an update that moves created_at moves the session in the eviction order
    got = await store.get(d.id)
    got.created_at = start - timedelta(seconds=5)
    await store.update(got)
    assert await env.client.zrange(ikey, 0, -1) == [hid(x.id) for x in (d, b2, c)]
    e = await store.create(new_session("alice", now=start + timedelta(seconds=40)))
    assert await env.client.zrange(ikey, 0, -1) == [hid(x.id) for x in (b2, c, e)]
    with pytest.raises(SessionNotFound):
        await store.get(d.id)


async def test_oldest_eviction_skips_expired_gone_and_foreign_members(
    env: Env, clock: FakeClock
) -> None:
    """At the limit, liveness comes from the expiry set and existence from one EXISTS:
    expired members are not counted (and stay indexed until purged), gone ones are
    dropped, and a victim whose hash names another index is unindexed, not deleted."""
    evicted: list[str] = []
    store = env.controlled(
        cfg(max_sessions_per_user=3),
        on_event=lambda e: evicted.append(e.session) if e.type == "evicted" else None,
    )
    raw = store.store
    assert isinstance(raw, RedisStore)
    ikey = raw.index_key("site-a", "alice")
    short = await store.create(new_session("alice", 10, now=clock()))
    clock.advance(1)
    gone = await store.create(new_session("alice", now=clock()))
    clock.advance(1)
    keep = await store.create(new_session("alice", now=clock()))
    clock.advance(20)  # short has expired; gone vanishes behind the store's back
    await env.client.delete(raw.session_key(session_handle(gone.id)))
    new = await store.create(new_session("alice", now=clock()))
    assert evicted == []  # one live session of three: nobody goes
    ids = [short.id, keep.id, new.id]
    assert await env.client.zrange(ikey, 0, -1) == [hid(i) for i in ids]
    assert await raw._load(raw.handle(short.id)) is not None  # expired, stored until purge
    # a foreign victim: its hash now names another index
    await env.client.hset(raw.session_key(raw.handle(keep.id)), "i", b"elsewhere")
    clock.advance(1)
    again = await store.create(new_session("alice", now=clock()))
    clock.advance(1)
    last = await store.create(new_session("alice", now=clock()))  # keep was the victim
    assert evicted == []  # ... but is not alice's: unindexed, not deleted, not counted
    assert await env.client.exists(raw.session_key(raw.handle(keep.id))) == 1
    ids = [short.id, new.id, again.id, last.id]
    assert await env.client.zrange(ikey, 0, -1) == [hid(i) for i in ids]
    clock.advance(1)
    await store.create(new_session("alice", now=clock()))
    assert evicted == [short_hash(new.id)]


async def test_index_written_by_the_previous_layout_keeps_working(
    env: Env, clock: FakeClock
) -> None:
    """Indexes written by the earlier layout are scored 1, 2, 3... (insertion order):
    those members sort before every created_at score, so they go first, in that order."""
    store = env.controlled(cfg(max_sessions_per_user=3))
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    made = []
    for _ in range(3):
        made.append(await store.create(new_session("alice", now=clock())))
        clock.advance(1)
    await env.client.zadd(ikey, {hid(s.id): n for n, s in enumerate(made, 1)})
    newer = await store.create(new_session("alice", now=clock()))
    kept = [hid(made[1].id), hid(made[2].id), hid(newer.id)]
    assert await env.client.zrange(ikey, 0, -1) == kept
    assert [s.id.encode() for s in await store.list_by_user("alice")] == kept


# ------------------------------------------------------------------ concurrency (real)


@pytest.mark.parametrize("eviction", ["oldest", "lru", "reject"])
async def test_500_concurrent_creates_leave_exactly_the_limit(env: Env, eviction: str) -> None:
    need_real_redis()
    store = env.controlled(cfg(max_sessions_per_user=5, eviction=eviction))
    await backend_redis.check_limit_under_500_creates(env, store, eviction)


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from asyncsession import Config, SessionLimitExceeded, new_session
    from asyncsession.backends.redis import RedisStore

    url, prefix, go, n, eviction = sys.argv[1:6]

    async def main():
        config = Config(site_id="site-a", max_sessions_per_user=5, eviction=eviction,
                        cleanup_interval=0, key_prefix=prefix)
        async with RedisStore.from_url(url, config) as store:
            await store.client.blpop([go], timeout=30)  # start together
            async def one():
                try:
                    await store.create(new_session("alice"))
                    return 1
                except SessionLimitExceeded:
                    return 0
            print(sum(await asyncio.gather(*(one() for _ in range(int(n))))))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("eviction", ["oldest", "reject"])
async def test_concurrent_creates_from_4_processes(env: Env, eviction: str) -> None:
    need_real_redis()
    go = f"{env.prefix}go"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            REDIS_URL,
            env.prefix,
            go,
            "125",
            eviction,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(4)
    ]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until all four block on the start list
            clients = await env.client.client_list()
            if sum(c.get("cmd") == "blpop" for c in clients) >= 4:
                break
            await asyncio.sleep(0.05)
        await env.client.rpush(go, *["go"] * 4)
        async with asyncio.timeout(60):
            outputs = [await p.communicate() for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    created = sum(int(out) for out, _ in outputs)
    store = env.controlled(cfg(max_sessions_per_user=5, eviction=eviction))
    assert len(await store.list_by_user("alice")) == 5
    ikey = store.store.index_key("site-a", "alice")  # type: ignore[attr-defined]
    assert await env.client.zcard(ikey) == 5
    assert created == (5 if eviction == "reject" else 500)


async def test_200_concurrent_stale_updates_one_winner_per_version(env: Env) -> None:
    need_real_redis()
    store = env.controlled()
    s = await store.create(new_session("alice", data={"n": 0}))
    for version in range(3):
        copies = [await store.get(s.id) for _ in range(200)]
        assert {c.version for c in copies} == {version}
        for i, c in enumerate(copies):
            c.data["writer"] = i

        async def write(c: Any) -> int | None:
            try:
                await store.update(c)
            except SessionConflict:
                return None
            return int(c.data["writer"])

        results = await asyncio.gather(*(write(c) for c in copies))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        got = await store.get(s.id)
        assert got.version == version + 1
        assert got.data["writer"] == winners[0]


# -------------------------------------------------------------------------- batching


async def test_concurrent_gets_share_one_round_trip(env: Env, clock: FakeClock) -> None:
    need_real_redis()
    CountingConnection.writes = 0
    raw = env.raw(cfg(), connection_class=CountingConnection)
    store = with_controls(raw, cfg())
    await raw.__aenter__()
    sessions = [await store.create(new_session(f"u{i}", data={"i": i})) for i in range(64)]
    missing = new_session("nobody").id

    await asyncio.gather(*(store.get(s.id) for s in sessions))  # opens the connections
    CountingConnection.writes = 0
    got = await asyncio.gather(*(store.get(s.id) for s in sessions))
    # the first goes at once (nothing was on the wire), the 63 that queued behind it
    # in one pipeline per MAX_BATCH (32), all in flight at once
    assert CountingConnection.writes == 1 + -(-63 // redis_backend.MAX_BATCH) == 3
    assert [g.data["i"] for g in got] == list(range(64))
    assert [g.id for g in got] == [s.id for s in sessions]

    CountingConnection.writes = 0
    results = await asyncio.gather(
        store.get(sessions[0].id),
        store.get(missing),
        store.get(sessions[1].id),
        return_exceptions=True,
    )
    # the first at once, two in one pipeline; the miss then looks, in one script, for
    # a session stored under its plain id (before ids were hashed) and for a rotation
    # record (outside review: two round trips, an unknown cookie cost three)
    assert CountingConnection.writes == 3
    assert isinstance(results[1], SessionNotFound)
    assert results[0].id == sessions[0].id and results[2].id == sessions[1].id  # type: ignore[union-attr]

    # a lone get: one round trip, answered without waiting for company
    CountingConnection.writes = 0
    started = time.perf_counter()
    for s in sessions[:20]:
        assert (await store.get(s.id)).id == s.id
    assert CountingConnection.writes == 20
    assert (time.perf_counter() - started) / 20 < 0.05

    # writes of one turn are pipelined too
    CountingConnection.writes = 0
    for s in sessions:
        s.data["touched"] = True
    await asyncio.gather(*(store.update(s) for s in sessions))
    assert CountingConnection.writes == 3  # 64 updates: one, then two pipelines
    for s in sessions[:3]:
        assert (await store.get(s.id)).data["touched"] is True


async def test_a_burst_alone_on_the_wire_goes_as_two_halves(env: Env, clock: FakeClock) -> None:
    """Callers that arrive together with nothing else on the wire (clients in step)
    would ride one batch after another, the client idle while Redis runs each: a
    batch of ``SPLIT_AT`` or more that is most of what is on the wire goes as two
    pipelines, each caller still with its own reply. Beside other batches, or with
    no slot to spare (a pool of two), it goes whole."""
    need_real_redis()
    for pool, size, writes in ((None, 32, 3), (None, 64, 3), (2, 32, 2), (None, 8, 2)):
        options: dict[str, Any] = {"connection_class": CountingConnection}
        if pool is not None:
            options["max_connections"] = pool
        raw = env.raw(cfg(), **options)
        store = with_controls(raw, cfg())
        await raw.__aenter__()
        made = [await store.create(new_session(f"u{i}", data={"i": i})) for i in range(size)]
        await asyncio.gather(*(store.get(s.id) for s in made))  # opens the connections
        CountingConnection.writes = 0
        got = await asyncio.gather(*(store.get(s.id) for s in made))
        # 32: one at once, the 31 behind it as 16 + 15; 64: one, then 32 + 31 (each
        # half of the wire); a pool of two: one slot, no spare; 8: under SPLIT_AT
        assert CountingConnection.writes == writes, (pool, size)
        assert [g.data["i"] for g in got] == list(range(size))
        assert [g.id for g in got] == [s.id for s in made]
        await asyncio.sleep(0)  # (a batch's work counts off the wire once it has ended)
        assert raw._transport._on_wire == 0 and raw._transport._busy == 0


async def test_concurrent_common_creates_share_one_script_call(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one server the anonymous creates of a batch that expire run in one
    ``MULTI_INSERT`` call (each trimming if its list asks): 65 concurrent creates
    take a handful of script calls, and each caller still gets its own answer (an id
    that exists is refused, its session untouched)."""
    store = env.controlled(cfg(cleanup_interval=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    gone = [await store.create(new_session(None, 30, now=clock())) for _ in range(40)]
    await env.client.delete(*[raw.session_key(raw.handle(s.id)) for s in gone])  # expired
    clock.advance(30 + raw.expiry_grace_ms / 1000 + 1)
    taken = await store.create(new_session(None, 30, data={"n": -1}, now=clock()))

    sent = scripts_sent(monkeypatch)
    raw._inserts = 1
    made = [new_session(None, 30, data={"n": i}, now=clock()) for i in range(64)]
    results = await asyncio.gather(
        *(store.create(s) for s in made[:40]),
        raw.create(replace(taken, data={"n": "tossed"})),
        *(store.create(s) for s in made[40:]),
        return_exceptions=True,
    )
    monkeypatch.undo()
    assert isinstance(results[40], InvalidSession)
    created = results[:40] + results[41:]
    for i, session in enumerate(created):
        got = await store.get(session.id)  # type: ignore[union-attr]
        assert got is not None and got.data == {"n": i}
    kept = await store.get(taken.id)
    assert kept is not None and kept.data == {"n": -1}
    # the merged creates trimmed as their lists asked (16 of them, 8 entries each):
    # the expiry set holds the live sessions only
    assert await env.client.zcard(raw.expiry_key) == 1 + 64
    # 65 creates: one at once, the rest merged per batch of up to 32
    assert len(sent) <= 4 and transport.MULTI_INSERT.sha in sent, sent


async def test_concurrent_user_creates_share_one_script_call(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one server the creates of user sessions in a batch run in one
    ``MULTI_INSERT_USER`` call, each as its own ``INSERT`` would: a user's limit holds
    across the creates of one batch (each evicts in turn), a taken id is refused
    alone, a user whose index is not a sorted set fails alone, and the rest apply."""
    store = env.controlled(cfg(max_sessions_per_user=3))
    raw = store.store
    assert isinstance(raw, RedisStore)
    first = [await store.create(new_session("alice", 60, now=clock())) for _ in range(3)]
    taken = await store.create(new_session("bob", 60, data={"n": -1}, now=clock()))
    await env.client.set(raw.index_key("site-a", "mallory"), b"not a sorted set")
    alone = await asyncio.gather(
        store.create(new_session("mallory", 60, now=clock())), return_exceptions=True
    )

    sent = scripts_sent(monkeypatch)
    made = [
        new_session("alice" if i % 2 else f"user-{i}", 60, data={"n": i}, now=clock())
        for i in range(40)
    ]
    results = await asyncio.gather(
        store.get(first[0].id),  # (a lone call, to open a batch behind it)
        *(store.create(s) for s in made[:20]),
        raw.create(replace(taken, data={"n": "tossed"})),
        store.create(new_session("mallory", 60, now=clock())),
        *(store.create(s) for s in made[20:]),
        return_exceptions=True,
    )
    monkeypatch.undo()
    # 42 creates: after the lone get, merged per batch (of up to 32); a lone create
    # (one batch's only one) may go as INSERT
    assert sent.count(transport.MULTI_INSERT_USER.sha) >= 1
    assert sent.count(transport.INSERT.sha) <= 2, sent
    assert isinstance(results[21], InvalidSession)
    # mallory's create fails as it does alone, and only it
    assert type(results[22]) is type(alone[0]) and isinstance(results[22], StoreUnavailable)
    created = results[1:21] + results[23:]
    assert not any(isinstance(r, BaseException) for r in created), created
    kept = await store.get(taken.id)
    assert kept is not None and kept.data == {"n": -1}
    for i, session in enumerate(made):
        if i % 2 == 0:  # one each: nothing evicted
            got = await store.get(session.id)
            assert got is not None and got.data == {"n": i}
    # alice: 3 + 20 creates, a limit of 3: three of the batch's are live, all else
    # evicted (which three: the order two batches in flight reach the server)
    alices = [s for i, s in enumerate(made) if i % 2]
    live = []
    for s in first + alices:
        with contextlib.suppress(SessionNotFound):
            live.append((await store.get(s.id)).id)
    assert len(live) == 3 and set(live) <= {s.id for s in alices}, live
    listed = await store.list_by_user("alice")  # (ids as stored: their handles)
    assert sorted(s.id for s in listed) == sorted(map(session_handle, live))
    assert await env.client.zcard(raw.index_key("site-a", "alice")) == 3


@pytest.mark.parametrize("user", [None, "alice"])
async def test_a_merged_batch_checks_its_ids_once_and_extends_the_expiry_set_once(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, user: str | None
) -> None:
    """The creates merged into one call (``MULTI_INSERT``, ``MULTI_INSERT_USER``) ask
    one ``EXISTS`` for all their ids and extend the expiry set once, to the latest
    deadline among them (batch.lua). Two creates of one id in the batch: the first
    is stored, the second refused as an id that exists (its own ``EXISTS`` would
    have said so), never written over it. The expiry set, new before the batch (no
    TTL yet), then outlives every session the batch stored."""
    store = env.controlled(cfg(cleanup_interval=0, max_sessions_per_user=50))
    raw = store.store
    assert isinstance(raw, RedisStore)
    seed = await store.create(new_session("seed", 60, now=clock()))  # (opens the client)
    await env.client.delete(raw.expiry_key)  # the batch's creates make the set again
    twin = new_session(user, 30, data={"n": "first"}, now=clock())
    # (ten creates: one batch, under the size that goes as two halves, SPLIT_AT)
    made = [new_session(user, 30 + i, data={"n": i}, now=clock()) for i in range(8)]
    sent = scripts_sent(monkeypatch)
    results = await asyncio.gather(
        store.get(seed.id),  # (a lone call, to open a batch behind it)
        store.create(replace(twin)),
        *(store.create(s) for s in made),
        store.create(replace(twin, data={"n": "second"})),
        return_exceptions=True,
    )
    monkeypatch.undo()
    merged = transport.MULTI_INSERT_USER.sha if user else transport.MULTI_INSERT.sha
    assert sent.count(merged) == 1 and len(sent) == 1, sent  # (all in one batch)
    assert isinstance(results[-1], InvalidSession), results[-1]
    assert not any(isinstance(r, BaseException) for r in results[:-1]), results
    got = await store.get(twin.id)
    assert got.data == {"n": "first"}
    for i, session in enumerate(made):
        assert (await store.get(session.id)).data == {"n": i}
    xkey = raw.expiry_key
    assert await env.client.zcard(xkey) == 1 + 8
    outlives = await env.client.pexpiretime(xkey)
    keys = [raw.session_key(raw.handle(s.id)) for s in [twin, *made]]
    deadlines = [await env.client.pexpiretime(key) for key in keys]
    assert min(deadlines) > 0 and outlives >= max(deadlines), (outlives, deadlines)


@pytest.mark.parametrize("case", ["error", "reject", "evicted"])
async def test_a_merged_create_of_an_id_refused_or_evicted_earlier_in_its_call_is_stored(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Outside review of batch.lua: in one ``MULTI_INSERT_USER`` call, a create whose
    id an earlier create of the call did not write (it failed on a user index that
    is not a sorted set, or was refused by a ``reject`` limit) or wrote and a later
    one evicted, is stored, as it would be in a call of its own: never refused as
    an id that exists while no key does."""
    config = {
        "error": cfg(max_sessions_per_user=0),
        "reject": cfg(max_sessions_per_user=1, eviction="reject"),
        "evicted": cfg(max_sessions_per_user=1, eviction="oldest"),
    }[case]
    store = env.controlled(config)
    raw = store.store
    assert isinstance(raw, RedisStore)
    seed = await store.create(new_session("alice", 60, now=clock()))
    await env.client.set(raw.index_key("site-a", "mallory"), b"not a sorted set")
    x = new_session("mallory" if case == "error" else "alice", 60, now=clock())
    creates = {
        "error": [x, replace(x, user_id="bob", data={"who": "bob"})],
        "reject": [x, replace(x, user_id="bob", data={"who": "bob"})],
        "evicted": [
            x,
            new_session("alice", 61, now=clock()),  # (evicts x: a limit of 1)
            replace(x, data={"who": "again"}),
        ],
    }[case]
    sent = scripts_sent(monkeypatch)
    results = await asyncio.gather(
        store.get(seed.id),  # (a lone call, to open a batch behind it)
        *(store.create(s) for s in creates),
        return_exceptions=True,
    )
    monkeypatch.undo()
    assert sent == [transport.MULTI_INSERT_USER.sha], sent
    last = results[-1]
    assert isinstance(last, Session), last  # (before the fix: InvalidSession, "exists")
    got = await store.get(x.id)
    assert got.data == creates[-1].data and got.user_id == creates[-1].user_id
    if case == "error":
        assert isinstance(results[1], StoreUnavailable)
    if case == "reject":
        assert isinstance(results[1], SessionLimitExceeded)


async def test_concurrent_common_writes_share_one_script_call(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one server the common writes of a batch (no idle timeout, a base version)
    run in one ``MULTI_APPLY`` call, two sites' sessions alike; a write that is not
    the common one at the server (its session changed since the caller loaded it)
    goes as ``APPLY`` after it and gets the full script's answer: merged with the
    other writer, or a conflict that writes nothing. Nothing of the others is lost."""
    store = env.controlled(cfg(cleanup_interval=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    other = env.controlled(cfg(cleanup_interval=0, site_id="site-b"))
    made = [await store.create(new_session(None, 60, data={"n": i, "m": 0})) for i in range(40)]
    foreign = await other.create(new_session(None, 60, data={"n": -1}))
    bases = [await store.get(s.id) for s in made]
    # sessions 0 and 1 change after their callers loaded them: 0 in another key
    # (the write still applies, merged), 1 in the key its caller read (a conflict)
    await store.apply(made[0].id, Changes(set={"m": 5}))
    await store.apply(made[1].id, Changes(set={"n": 99}))

    sent = scripts_sent(monkeypatch)
    results = await asyncio.gather(
        *(
            store.apply(
                b.id, Changes(set={"n": b.data["n"] + 100}, expect={"n": b.data["n"]}), base=b
            )
            for b in bases
        ),
        other.apply(foreign.id, Changes(set={"n": 0}), base=await other.get(foreign.id)),
        return_exceptions=True,
    )
    monkeypatch.undo()
    assert isinstance(results[1], SessionConflict)
    assert not isinstance(results[40], BaseException), results[40]
    for i, b in enumerate(bases):
        got = await store.get(b.id)
        assert got is not None
        if i == 1:
            assert got.data == {"n": 99, "m": 0}  # nothing written by the conflicting one
        elif i == 0:
            assert got.data == {"n": 100, "m": 5}  # merged on the server with the other key
        else:
            assert got.data == {"n": i + 100, "m": 0} and got.version == b.version + 1
            assert results[i].version == got.version  # type: ignore[union-attr]
    # 41 writes: one at once, the rest merged per batch, 2 sent again as APPLY
    assert len(sent) <= 6 and transport.MULTI_APPLY.sha in sent, sent


async def test_batch_survives_a_cancelled_leader(env: Env) -> None:
    store = env.controlled()
    sessions = [await store.create(new_session(f"u{i}", data={"i": i})) for i in range(10)]
    tasks = [asyncio.ensure_future(store.get(s.id)) for s in sessions]
    await asyncio.sleep(0)  # the first went at once; the nine others are one batch,
    tasks[1].cancel()  # led by the second
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r.data["i"] for r in results[:1] + results[2:]] == [0, *range(2, 10)]  # type: ignore[union-attr]


# ----------------------------------------------------------------------- NOSCRIPT


async def test_noscript_recovery_after_script_flush(env: Env, clock: FakeClock) -> None:
    store = env.controlled(cfg(idle_timeout=60))
    s = await store.create(new_session("alice", timedelta(minutes=5), data={"v": 1}))
    others = [await store.create(new_session("bob")) for _ in range(3)]

    async def flush() -> None:
        await env.client.script_flush()
        assert await env.client.script_exists(redis_backend.INSERT.sha) == [False]

    await flush()
    await store.create(new_session("alice"))
    await flush()
    got = await store.get(s.id)  # HMGET: no script needed
    await flush()
    batch = await asyncio.gather(*(store.get(o.id) for o in others))  # multi-get script
    assert [b.id for b in batch] == [o.id for o in others]
    await flush()
    got.data["v"] = 2
    await store.update(got)
    await flush()
    await asyncio.gather(*(store.touch(o.id) for o in others))  # one pipeline, all NOSCRIPT
    await flush()
    new_id = await store.rotate(s.id)
    await flush()
    assert [x.data.get("v") for x in await store.list_by_user("alice")] == [2, None]
    await flush()
    await store.delete(new_id)
    await flush()
    assert await store.delete_by_user("bob") == 3
    await flush()
    clock.advance(timedelta(hours=25))
    assert await store.purge_expired() == 1
    record = rotation_key(store.store, session_handle(s.id))  # type: ignore[arg-type]
    assert await env.keys() == [record]  # dropped by Redis itself (PXAT)


async def test_noscript_recovery_under_repeated_flushes(env: Env) -> None:
    """Flushes racing the recovery (another client flushing in a loop) never surface."""
    store = env.controlled(cfg(max_sessions_per_user=0))
    stop = asyncio.Event()

    async def flusher() -> int:
        flushes = 0
        while not stop.is_set():
            await env.client.script_flush()
            flushes += 1
            await asyncio.sleep(0)
        return flushes

    task = asyncio.ensure_future(flusher())
    try:
        for _ in range(10):
            made = await asyncio.gather(*(store.create(new_session("u")) for _ in range(50)))
            got = await asyncio.gather(*(store.get(s.id) for s in made))
            assert [g.id for g in got] == [s.id for s in made]
            await asyncio.gather(*(store.touch(s.id) for s in made))
    finally:
        stop.set()
        flushes = await task
    assert flushes >= 10
    assert len(await store.list_by_user("u")) == 500


# ------------------------------------------------------------------------- purging


async def test_10000_expired_sessions_purged_leave_no_key(env: Env, clock: FakeClock) -> None:
    store = env.controlled(cfg(max_sessions_per_user=0, idle_timeout=3600))
    batch = 500
    for start in range(0, 10_000, batch):
        await asyncio.gather(
            *(
                store.create(new_session(None if i % 3 == 0 else f"user-{i % 700}"))
                for i in range(start, start + batch)
            )
        )
        clock.advance(0.01)
    survivor = await store.create(new_session("keeper", timedelta(days=7)))
    touched = await store.create(new_session("keeper"))
    clock.advance(1800)
    await store.touch(touched.id)  # idle deadlines moved: these must survive the next purge
    await store.touch(survivor.id)
    assert len(await env.keys()) > 10_000
    clock.advance(3000)
    assert await store.purge_expired() == 10_000
    listed = {s.id for s in await store.list_by_user("keeper")}
    assert listed == {session_handle(survivor.id), session_handle(touched.id)}
    keys = await env.keys()
    raw = store.store
    assert set(keys) == {
        raw.session_key(session_handle(survivor.id)),  # type: ignore[attr-defined]
        raw.session_key(session_handle(touched.id)),  # type: ignore[attr-defined]
        raw.index_key("site-a", "keeper"),  # type: ignore[attr-defined]
        raw.expiry_key,  # type: ignore[attr-defined]
    }
    clock.advance(timedelta(days=8))
    assert await store.purge_expired() == 2
    assert await env.keys() == []
    assert await store.purge_expired() == 0


async def test_expired_session_is_not_writable_before_purge(env: Env, clock: FakeClock) -> None:
    """Expiry in scripts uses the injected clock, not Redis's: the key is still there."""
    store = env.controlled()
    s = await store.create(new_session("alice", timedelta(seconds=30), now=clock()))
    clock.advance(30)
    assert await env.client.exists(store.store.session_key(session_handle(s.id)))  # type: ignore[attr-defined]
    with pytest.raises(SessionExpired):
        await store.get(s.id)
    for op in (store.update(s), store.touch(s.id), store.rotate(s.id)):
        with pytest.raises(SessionNotFound):
            await op
    assert await store.list_by_user("alice") == []
    assert await store.delete_by_user("alice") == 0
    assert await env.keys() == []


# ------------------------------------------------------------------------- bad input


async def test_bad_ids_never_reach_redis(env: Env) -> None:
    need_real_redis()
    raw = env.raw(cfg(), connection_class=CountingConnection)
    store = with_controls(raw, cfg())
    await raw.__aenter__()
    CountingConnection.writes = 0
    for bad in ["*", "session:*", "a?b[c]d" * 3, "x\r\nFLUSHALL\r\n" * 2, "\x00" * 20, "é" * 20]:
        for op in (store.get, store.touch, store.rotate, store.delete):
            with pytest.raises(InvalidSession):
                await op(bad)
        with pytest.raises(InvalidSession):
            await store.delete_by_user("alice", keep=bad)
        s = new_session("alice")
        s.id = bad
        with pytest.raises(InvalidSession):
            await store.create(s)
        with pytest.raises(InvalidSession):
            await store.update(s)
    assert CountingConnection.writes == 0


def test_index_keys_are_injective_and_brace_free() -> None:
    store = RedisStore(Redis(), Config(key_prefix="p:"))
    # the backend does not rely on Config's site rules: even sites with ':' or '{' stay apart
    pairs = [
        ("a", "b:c"),
        ("a:b", "c"),
        ("a", "b"),
        ("", "a:b"),
        ("a", ":b"),
        ("a{", "b"),
        ("a", "{b"),
        ("1:a", "b"),
        ("a", "%7B"),
        ("a", "{"),
        ("a", "%"),
        ("a", "%25"),
        ("a", "x}y{z"),
        ("a", "*"),
        ("a", "\n"),
    ]
    keys = [store.index_key(site, user) for site, user in pairs]
    assert len(set(keys)) == len(keys)
    for (site, _), key in zip(pairs, keys, strict=True):
        if "{" not in site:
            assert b"{" not in key and b"}" not in key
    session_keys = {store.session_key("A" * 16), store.session_key("u:1:a:" + "b" * 16)}
    assert not session_keys & set(keys)
    assert store.expiry_key not in session_keys | set(keys)


async def test_sites_and_users_with_tricky_names_do_not_collide(env: Env) -> None:
    backend = env.raw(cfg(site_id=""))
    stores = {site: with_controls(backend, cfg(site_id=site)) for site in ("a", "a.b", "a-b", "")}
    users = ["b:c", "c", "b", "*", "[x]", "x}y{z", "%7B", "{", "line\nbreak", "é", "a" * 256]
    made: dict[tuple[str, str], str] = {}
    for site, store in stores.items():
        for user in users:
            made[(site, user)] = (await store.create(new_session(user))).id
    for site, store in stores.items():
        for user in users:
            listed = [s.id for s in await store.list_by_user(user)]
            assert listed == [session_handle(made[(site, user)])]
    assert await stores["a"].delete_by_user("*") == 1
    listed = [s.id for s in await stores["a.b"].list_by_user("*")]
    assert listed == [session_handle(made[("a.b", "*")])]
    for key in await env.keys():
        assert b"{" not in key and b"}" not in key


# ---------------------------------------------------------------------- corrupt data


@pytest.mark.parametrize(
    "corruption",
    ["string", "list", "garbage_record", "truncated", "no_record", "bad_timestamp", "id_in_field"],
)
async def test_corrupt_values_are_not_found_with_violation(
    env: Env, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[ViolationEvent] = []
    store = env.controlled(on_violation=events.append)
    good = await store.create(new_session("alice", data={"ok": True}))
    victim = await store.create(new_session("alice", data={"ok": False}))
    key = store.store.session_key(session_handle(victim.id))  # type: ignore[attr-defined]
    record = await env.client.hget(key, "r")
    if corruption == "string":
        await env.client.delete(key)
        await env.client.set(key, b"not a session")
    elif corruption == "list":
        await env.client.delete(key)
        await env.client.rpush(key, b"x")
    elif corruption == "garbage_record":
        await env.client.hset(key, "r", b"\xff\xfe{]")
    elif corruption == "truncated":
        await env.client.hset(key, "r", record[: len(record) // 2])
    elif corruption == "no_record":
        await env.client.hdel(key, "r")
    elif corruption == "id_in_field":
        # the bad value quoted in the error (int() does) would put the id in the log
        # and the event (outside review, with hash_ids=False: the record there)
        await env.client.hset(key, "a", f"x-{victim.id}".encode())
    else:
        await env.client.hset(key, "a", b"yesterday")

    caplog.set_level(logging.WARNING, logger="asyncsession")
    with pytest.raises(SessionNotFound) as info:
        await store.get(victim.id)
    assert info.value.details.get("corrupt") is True
    assert [e.type for e in events] == ["invalid_session"]
    assert events[0].session == short_hash(victim.id)
    assert victim.id not in caplog.text and victim.id not in events[0].message
    # in a batch, the corrupt one fails alone
    results = await asyncio.gather(store.get(good.id), store.get(victim.id), return_exceptions=True)
    assert results[0].data == {"ok": True}  # type: ignore[union-attr]
    assert isinstance(results[1], SessionNotFound)
    # list skips it, with a warning that names it by its short hash only
    assert [s.id for s in await store.list_by_user("alice")] == [session_handle(good.id)]
    if corruption in ("garbage_record", "truncated", "bad_timestamp", "id_in_field"):
        assert "skipped a stored record" in caplog.text
    assert victim.id not in caplog.text
    # writes: a key that is not a session hash is missing to them; a hash whose record
    # is damaged still has intact metadata, so touch and update work (update rewrites
    # the record); nothing crashes
    structural = corruption in ("string", "list")
    for op in (lambda: store.touch(victim.id), lambda: store.update(victim)):
        if structural:
            with pytest.raises(SessionNotFound):
                await op()
        else:
            await op()
    if not structural:
        assert (await store.get(victim.id)).data == {"ok": False}
        await env.client.hset(key, "r", b"\x00")
    await store.delete(victim.id)
    assert not await env.client.exists(key)
    assert (await store.get(good.id)).data == {"ok": True}


# ------------------------------------------------------------------ failures, lifecycle


async def test_unreachable_server_is_store_unavailable_without_password(clock: FakeClock) -> None:
    port = redis_servers.free_port()
    url = f"redis://user:s3cret-pw@127.0.0.1:{port}/0"
    store = RedisStore.from_url(url, cfg(), clock=clock, socket_connect_timeout=0.5)
    controlled = with_controls(store, cfg())
    try:
        for op in (
            lambda: controlled.get(new_session("a").id),
            lambda: controlled.create(new_session("a")),
            lambda: controlled.list_by_user("a"),
            lambda: controlled.purge_expired(),
            lambda: store.__aenter__(),
        ):
            with pytest.raises(StoreUnavailable) as info:
                await op()
            text = str(info.value) + repr(info.value.details)
            assert "s3cret-pw" not in text
            assert f"redis://user:***@127.0.0.1:{port}/0" in text
            assert isinstance(info.value.__cause__, redis.exceptions.RedisError | OSError)
            assert info.value.http_status == 503
    finally:
        await controlled.close()


async def test_owned_client_closed_passed_client_not(clock: FakeClock) -> None:
    need_real_redis()
    name = f"asyncsession-test-{uuid.uuid4().hex[:8]}"
    watcher = Redis.from_url(REDIS_URL)

    async def connected() -> int:
        return sum(c.get("name") == name for c in await watcher.client_list())

    owned = RedisStore.from_url(REDIS_URL, cfg(), clock=clock, client_name=name)
    async with owned:
        await owned.purge_expired()
        assert await connected() == 1
    assert await backend_redis.named_connections(watcher, name) == 0
    await watcher.aclose()

    client = Redis.from_url(REDIS_URL)
    try:
        async with RedisStore(client, cfg(), clock=clock):
            pass
        assert await client.ping()
    finally:
        await client.aclose()


def test_unsupported_schemes() -> None:
    with pytest.raises(ValueError, match="redis\\+foo") as info:
        RedisStore.from_url("redis+foo://:pw@h:1")
    assert ":pw@" not in str(info.value)
    with pytest.raises(ValueError, match="cluster"):  # Redis Cluster has no /db
        RedisStore.from_url("redis+cluster://:pw@h:1/3")
    with pytest.raises(TypeError):
        RedisStore("redis://localhost")  # type: ignore[arg-type]


async def test_open_store_routes_redis_urls(clock: FakeClock) -> None:
    need_real_redis()
    store = open_store(REDIS_URL, cfg(key_prefix=f"test:{uuid.uuid4().hex}:"), clock=clock)
    async with store:
        assert isinstance(store.store, RedisStore)
        s = await store.create(new_session("alice"))
        assert (await store.get(s.id)).id == s.id
        await store.delete(s.id)


# ------------------------------------------------------------------------ fault test


@contextlib.contextmanager
def redis_server(port: int, password: str) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start (and restart) a throwaway redis-server; always stop what was started."""
    binary = shutil.which("redis-server")
    if binary is None:
        if backend_redis.REQUIRE:
            pytest.fail("redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH")
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                password,
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return proc
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


async def test_server_killed_and_restarted_during_load(clock: FakeClock) -> None:
    port = redis_servers.free_port()
    password = "fault-pw"
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    with redis_server(port, password) as start:
        server = start()
        config = cfg(max_sessions_per_user=0)
        store = with_controls(
            RedisStore.from_url(
                url, config, clock=clock, socket_timeout=1, socket_connect_timeout=1
            ),
            config,
        )
        async with store:
            outcomes: dict[str, int] = {"ok": 0, "unavailable": 0, "gone": 0}
            written: dict[str, int] = {}  # session id -> last counter we know was stored
            stop = asyncio.Event()

            async def worker(n: int) -> None:
                s = None
                while not stop.is_set():
                    try:
                        if s is None:
                            s = await store.create(new_session(f"user{n}", data={"counter": 0}))
                            written[s.id] = 0
                        got = await store.get(s.id)
                        assert got.data["counter"] == got.version  # never a torn record
                        got.data["counter"] += 1
                        await store.update(got)
                        written[s.id] = got.data["counter"]
                        outcomes["ok"] += 1
                    except StoreUnavailable as exc:
                        assert password not in str(exc)
                        outcomes["unavailable"] += 1
                        await asyncio.sleep(0.01)
                    except SessionNotFound:  # lost with the server (no persistence)
                        outcomes["gone"] += 1
                        s = None
                    await asyncio.sleep(0)

            workers = [asyncio.ensure_future(worker(n)) for n in range(16)]
            try:
                await wait_for(lambda: outcomes["ok"] >= 200, 20)
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=10)
                before = outcomes["unavailable"]
                await wait_for(lambda: outcomes["unavailable"] >= before + 16, 20)
                with pytest.raises(StoreUnavailable):
                    await store.get(new_session(None).id)
                ok_while_down = outcomes["ok"]
                await asyncio.sleep(0.2)
                assert outcomes["ok"] == ok_while_down  # nothing succeeds while it is down
                start()
                await wait_for(lambda: outcomes["ok"] >= ok_while_down + 200, 30)
            finally:
                stop.set()
                results = await asyncio.gather(*workers, return_exceptions=True)
            assert [r for r in results if r is not None] == []  # no assertion failed inside
            assert outcomes["gone"] >= 1
            # every session still there is whole, and no acknowledged write was lost
            # (an update cut off by the kill may or may not have been applied)
            for session_id, counter in written.items():
                try:
                    got = await store.get(session_id)
                except SessionNotFound:
                    continue
                assert got.data["counter"] == got.version
                assert counter <= got.version <= counter + 1


async def wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_hung_server_times_out_then_recovers(clock: FakeClock) -> None:
    port = redis_servers.free_port()
    url = f"redis://:pw@127.0.0.1:{port}/0"
    with redis_server(port, "pw") as start:
        server = start()
        config = cfg()
        store = with_controls(RedisStore.from_url(url, config, clock=clock, timeout=0.3), config)
        async with store:
            s = await store.create(new_session("alice", data={"v": 1}))
            server.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
            try:
                started = time.monotonic()
                # on the open connection (the store's watchdog) and, for the ones that
                # find no open connection, while connecting (asyncio.timeout)
                results = await asyncio.gather(
                    *(store.get(s.id) for _ in range(3)), return_exceptions=True
                )
                elapsed = time.monotonic() - started
                assert 0.3 <= elapsed < 2
                assert all(isinstance(r, StoreUnavailable) for r in results)
                assert all(isinstance(r.__cause__, TimeoutError) for r in results)  # type: ignore[union-attr]
                with pytest.raises(StoreUnavailable) as info:
                    await store.get(s.id)
                assert isinstance(info.value.__cause__, TimeoutError)
                with pytest.raises(StoreUnavailable):
                    await store.touch(s.id)
            finally:
                server.send_signal(signal.SIGCONT)
            assert (await store.get(s.id)).data == {"v": 1}
            await store.touch(s.id)


# -------------------------------------------------------------------- bounded work


async def test_lru_eviction_picks_the_least_recently_used(env: Env, clock: FakeClock) -> None:
    """Lowering the limit to 2 for a user with 300 sessions: one create evicts all but
    the most recently used one (one sort in the script, not a pass per victim)."""
    store = env.controlled(cfg(max_sessions_per_user=0))
    made = []
    for _ in range(300):
        made.append(await store.create(new_session("alice", now=clock())))
        clock.advance(1)
    recent = made[17]
    await store.touch(recent.id)  # the most recently used, though one of the oldest
    low = env.controlled(cfg(max_sessions_per_user=2, eviction="lru"))
    new = await low.create(new_session("alice", now=clock()))
    listed = sorted(s.id for s in await low.list_by_user("alice"))
    assert listed == sorted(session_handle(s.id) for s in (recent, new))


async def test_list_and_delete_by_user_work_in_bounded_batches(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncsession.backends.redis import store as store_module

    monkeypatch.setattr(store_module, "USER_BATCH", 7)
    store = env.controlled(cfg(max_sessions_per_user=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    made = []
    for _ in range(50):
        made.append(await store.create(new_session("alice", now=clock())))
        clock.advance(1)
    for gone in made[10:13]:  # deleted behind the store's back: dropped from the index
        await env.client.delete(raw.session_key(session_handle(gone.id)))
    calls: list[tuple[str, Any]] = []
    real_eval = raw._eval

    async def counting(script: Any, keys: Any, args: Any) -> Any:
        calls.append((script.sha, args))
        return await real_eval(script, keys, args)

    monkeypatch.setattr(raw, "_eval", counting)
    live = made[:10] + made[13:]
    assert [s.id for s in await store.list_by_user("alice")] == [raw.handle(s.id) for s in live]
    lists = [args for sha, args in calls if sha == redis_backend.LIST.sha]
    assert len(lists) == -(-50 // 7) and all(args[2] == 7 for args in lists)
    assert await env.client.zcard(raw.index_key("site-a", "alice")) == 47
    calls.clear()
    keep = live[20].id
    assert await store.delete_by_user("alice", keep=keep) == 46
    deletes = [args for sha, args in calls if sha == redis_backend.DELETE_BY_USER.sha]
    assert len(deletes) == -(-46 // 7) + (46 % 7 == 0)
    assert [s.id for s in await store.list_by_user("alice")] == [raw.handle(keep)]


async def test_a_login_between_two_batches_stops_delete_by_user_and_says_so(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user with more sessions than one batch, and a login that moves ``keep``
    between two batches: the batches after it delete nothing (the login's new
    session stays), and the call raises ``SessionRotated`` saying how many went
    (review: it returned the first batch's count as success, the rest left live)."""
    from asyncsession.backends.redis import store as store_module

    monkeypatch.setattr(store_module, "USER_BATCH", 5)
    store = env.controlled(cfg(max_sessions_per_user=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    keep = await store.create(new_session("alice", now=clock()))
    for _ in range(12):
        clock.advance(1)
        await store.create(new_session("alice", now=clock()))
    real_eval = raw._eval
    moved: list[str] = []

    async def login_after_the_first_batch(script: Any, keys: Any, args: Any) -> Any:
        reply = await real_eval(script, keys, args)
        if script is redis_backend.DELETE_BY_USER and not moved:
            moved.append(await store.rotate(keep.id))
        return reply

    monkeypatch.setattr(raw, "_eval", login_after_the_first_batch)
    with pytest.raises(SessionRotated) as info:
        await store.delete_by_user("alice", keep=keep.id)
    assert info.value.details["deleted"] == 5 and "5 deleted before that" in str(info.value)
    monkeypatch.setattr(raw, "_eval", real_eval)
    left = {s.id for s in await store.list_by_user("alice")}
    assert raw.handle(moved[0]) in left and len(left) == 13 - 5


async def test_expiry_set_and_index_stay_bounded_without_cleanup(
    env: Env, clock: FakeClock
) -> None:
    """Background cleanup off, sessions of one user expiring round after round and
    Redis's own expiry dropping their keys (done here by hand: the store's clock is
    fake): each write drops a couple of expiry entries and index members whose key
    is gone, so the expiry set and the user's index stay within 2x the live sessions
    plus a constant. A session still stored keeps its entries (and its id)."""
    store = env.controlled(cfg(max_sessions_per_user=0, cleanup_interval=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    ikey = raw.index_key("site-a", "alice")
    live = 100
    before: list[str] = []
    for _ in range(8):
        made = []
        for _ in range(live):
            made.append(await store.create(new_session("alice", 30, now=clock())))
            made.append(await store.create(new_session(None, 30, now=clock())))
        assert await env.client.zcard(raw.expiry_key) <= 2 * (2 * live) + 10
        assert await env.client.zcard(ikey) <= 2 * live + 10
        clock.advance(30 + raw.expiry_grace_ms / 1000 + 1)  # all expired, past the grace
        before = [raw.handle(s.id) for s in made]
        await env.client.delete(*[raw.session_key(i) for i in before])  # native expiry
    assert len(await store.list_by_user("alice")) == 0
    # without native expiry nothing is dropped: an expired session keeps its id
    kept = await store.create(new_session(None, 30, now=clock()))
    clock.advance(30 + raw.expiry_grace_ms / 1000 + 1)
    for _ in range(5):
        await store.create(new_session(None, 30, now=clock()))
    assert await env.client.zscore(raw.expiry_key, hid(kept.id)) is not None
    assert await store.purge_expired() >= 1
    assert await env.client.zscore(raw.expiry_key, hid(kept.id)) is None


async def test_the_common_create_writes_what_the_full_insert_writes(
    env: Env, clock: FakeClock
) -> None:
    """An anonymous create that trims nothing this time runs ``insert_first.lua``
    (five commands) instead of the whole insert script: the session key, its fields,
    its native expiry and its expiry entry are the same either way, a new expiry set
    without a TTL gets one, and an id that exists is refused by both."""
    store = env.controlled(cfg(cleanup_interval=0))
    raw = store.store
    assert isinstance(raw, RedisStore)

    async def made(full: bool) -> tuple[dict[bytes, Any], Any, Any, Any]:
        raw._inserts = 0 if full else 1  # 0: this insert trims (the full script)
        session = await store.create(new_session(None, 30, data={"k": [1]}, now=clock()))
        key = raw.session_key(raw.handle(session.id))
        fields = await env.client.hgetall(key)
        fields.pop(b"r")  # the record (its id differs)
        score = await env.client.zscore(raw.expiry_key, hid(session.id))
        return fields, await env.client.pexpiretime(key), score, session

    fast, fast_px, fast_due, one = await made(full=False)
    full, full_px, full_due, _ = await made(full=True)
    assert sorted(fast) == sorted(full) == [b"a", b"c", b"e", b"n", b"s", b"x"]
    assert fast == full
    assert fast_px == full_px > 0 and fast_due == full_due == int(fast[b"e"])
    assert await store.get(one.id) is not None
    # a new expiry set, or one left without a TTL, gets one from the common create
    await env.client.persist(raw.expiry_key)
    await made(full=False)
    assert await env.client.pexpiretime(raw.expiry_key) >= fast_px
    # an id that exists is refused, and the session stays as it was
    for full_path in (False, True):
        raw._inserts = 0 if full_path else 1
        with pytest.raises(InvalidSession, match="exists"):
            await raw.create(replace(one, data={"k": "other"}))
        got = await store.get(one.id)
        assert got is not None and got.data == {"k": [1]}


async def test_the_common_update_keeps_every_check(env: Env, clock: FakeClock) -> None:
    """The apply script's first part (no idle timeout, the caller's base version is
    the stored one: the whole new record is written as sent) still refuses another
    site's session, an expired one and a record over the size limit, writing
    nothing; the same call within bounds is written."""
    from asyncsession.backends.redis.apply import apply_args
    from asyncsession.backends.redis.scripts import APPLY
    from asyncsession.changes import encode_changes

    store = env.controlled(cfg(cleanup_interval=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    made = await store.create(new_session(None, 30, data={"k": 1}, now=clock()))
    handle = raw.handle(made.id)
    base = await raw.get(made.id)
    assert base is not None
    keys = (raw.session_key(handle), raw.expiry_key_for(handle))
    changes = encode_changes(Changes(set={"k": 2}, expect={"k": 1}))

    async def send(config: Config, now: Any, limit: int) -> Any:
        args = apply_args(handle, changes, config, now, limit, raw.expiry_grace_ms, base)
        return await raw._eval(APPLY, keys, args)

    before = await env.client.hgetall(keys[0])
    assert await send(cfg(site_id="site-b"), clock(), 0) == b"other_site"
    assert await send(raw.config, clock() + timedelta(seconds=31), 0) == b"expired"
    assert (await send(raw.config, clock(), 10))[0] == b"too_large"
    assert await env.client.hgetall(keys[0]) == before
    assert (await send(raw.config, clock(), 0))[0] == b"ok"
    got = await store.get(made.id)
    assert got is not None and got.data == {"k": 2} and got.version == base.version + 1


async def test_one_insert_in_trim_every_trims_the_expiry_set(env: Env, clock: FakeClock) -> None:
    """Inserts trim the expiry set on one call in ``TRIM_EVERY``, by ``2 * TRIM_EVERY``
    entries whose key is gone: the others leave it alone (two per insert on average,
    as before, without the trim's cost on most creates). A store's first insert
    trims, so stores that live for one or two creates (a CLI run, a recycled worker)
    still keep the set bounded."""
    every = redis_backend.store.TRIM_EVERY
    store = env.controlled(cfg(cleanup_interval=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    gone = [await store.create(new_session(None, 30, now=clock())) for _ in range(4 * every)]
    await env.client.delete(*[raw.session_key(raw.handle(s.id)) for s in gone])  # expired
    clock.advance(30 + raw.expiry_grace_ms / 1000 + 1)
    raw._inserts = 0
    sizes = []
    for _ in range(2 * every):
        gone.append(await store.create(new_session(None, 30, now=clock())))
        sizes.append(await env.client.zcard(raw.expiry_key))
    start = 4 * every
    expected = []
    size = start
    for n in range(2 * every):
        size += 1
        if n % every == 0:
            size -= 2 * every
        expected.append(size)
    assert sizes == expected
    # stores that each make one create (a CLI run, a recycled worker): each trims
    gone += [await store.create(new_session(None, 30, now=clock())) for _ in range(2 * every)]
    await env.client.delete(*[raw.session_key(raw.handle(s.id)) for s in gone])
    clock.advance(30 + raw.expiry_grace_ms / 1000 + 1)
    for _ in range(2):
        before = await env.client.zcard(raw.expiry_key)
        assert before > 2 * every
        await env.controlled(cfg(cleanup_interval=0)).create(new_session(None, 30, now=clock()))
        assert await env.client.zcard(raw.expiry_key) == before + 1 - 2 * every


# ---------------------------------------------------------------------------- URLs


def test_a_bad_db_path_is_a_clear_error() -> None:
    for url in ("redis://localhost/abc", "rediss://:pw@localhost:6380/1x", "redis://h/-1"):
        with pytest.raises(ValueError, match="database") as info:
            RedisStore.from_url(url)
        assert ":pw@" not in str(info.value)
        with pytest.raises(ValueError, match="database"):
            open_store(url)
    with pytest.raises(ValueError, match="database"):
        RedisStore.from_url("redis+sentinel://s1:26379/mymaster/abc")
    for url in ("redis://localhost", "redis://localhost/", "redis://localhost/3"):
        assert isinstance(RedisStore.from_url(url), RedisStore)


def test_tls_options_reach_sentinels_and_the_primary() -> None:
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedSSLConnection

    store = RedisStore.from_url(
        "redis+sentinel://s1:26379,s2:26380/mymaster/2?ssl=true&ssl_ca_certs=/etc/ca.pem"
        "&ssl_certfile=/etc/c.pem&ssl_keyfile=/etc/k.pem&ssl_cert_reqs=required"
    )
    assert store._sentinel is not None
    for sentinel in store._sentinel.sentinels:
        pool = sentinel.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
        assert pool.connection_kwargs["ssl_certfile"] == "/etc/c.pem"
        assert pool.connection_kwargs["ssl_keyfile"] == "/etc/k.pem"
    primary = store.client.connection_pool
    assert issubclass(primary.connection_class, SentinelManagedSSLConnection)
    assert primary.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert primary.connection_kwargs["db"] == 2
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        RedisStore.from_url("redis+sentinel://s1/m?ssl_cert_reqs=sometimes")


def test_tls_options_reach_cluster_nodes() -> None:
    from redis.asyncio.connection import SSLConnection

    if (reason := redis_servers.cluster_client_reason()) is not None:
        pytest.skip(reason)

    store = RedisStore.from_url(
        "redis+cluster://n1:7000,n2:7001?ssl=true&ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=none"
    )
    kwargs = store.client.get_connection_kwargs()
    assert issubclass(kwargs["connection_class"], SSLConnection)
    assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert kwargs["ssl_cert_reqs"] == "none"


# --------------------------------------------------------------- call deadline

ROUND_TRIP = 0.5  # each round trip of the slow client below
CALL_TIMEOUT = 0.8  # more than one round trip, less than two


@pytest.mark.parametrize("controlled", [False, True])
async def test_a_one_session_call_keeps_one_timeout_for_all_its_round_trips(
    env: Env, controlled: bool
) -> None:
    """A ``get`` of an unknown id makes two round trips (the load; then, in one
    script, the look for a record under the plain id and the rotation check). With
    each answered in 0.5 s and ``timeout=0.8``, the call answers ``StoreUnavailable``
    by 0.8 s: the timeout bounds the call, not each round trip (which would answer
    ``SessionNotFound`` after 1 s). Outside review found calls taking three times
    the timeout."""
    client = Redis.from_url(REDIS_URL) if env.real else backend_redis.fake_client()
    config = replace(cfg(), key_prefix=env.prefix)
    raw = RedisStore(client, config, clock=env.clock, timeout=CALL_TIMEOUT)
    store = with_controls(raw, config) if controlled else raw
    sent = []
    plain = client.execute_command

    async def slow(*args: Any, **options: Any) -> Any:
        sent.append(args[0])
        await asyncio.sleep(ROUND_TRIP)
        return await plain(*args, **options)

    with contextlib.suppress(SessionNotFound):  # connect (and its handshake) first
        await store.get(new_session(None).id)
    client.execute_command = slow  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(StoreUnavailable):
            await store.get(new_session(None).id)
        took = loop.time() - started
        # (the bound leaves a loaded machine room; a timeout per round trip answers
        # SessionNotFound instead, after both)
        assert CALL_TIMEOUT * 0.9 <= took < CALL_TIMEOUT + 1.0, took
        # the second round trip was sent: one timeout for the whole call, not one
        # spent on the first round trip
        assert len(sent) == 2, sent
        # a call that fits in the timeout still answers (each call has its own)
        client.execute_command = plain  # type: ignore[method-assign]
        with pytest.raises(SessionNotFound):
            await store.get(new_session(None).id)
    finally:
        client.execute_command = plain  # type: ignore[method-assign]
        await raw.close()
        await client.aclose()


def test_a_client_of_another_event_loop_is_named_as_such(env: Env) -> None:
    """Starlette's TestClient without ``with`` runs each request on a loop of its own,
    and redis-py's connections stay bound to the first: the 503's record says so
    (a newcomer's report: "store unavailable" pointed at the server, which was fine)."""
    store = env.raw(cfg())
    for text in ("Event loop is closed", "Task got Future attached to a different loop"):
        error = store._unavailable(RuntimeError(text))
        assert isinstance(error, StoreUnavailable)
        assert "with TestClient(app) as client:" in error.message
    assert "TestClient" not in store._unavailable(ConnectionError("refused")).message


def test_a_rotation_record_of_the_wrong_type_is_no_rotation(clock: FakeClock) -> None:
    """What a broken server hands back in the rotation record's place is no rotation,
    and costs nothing: an integer is never turned into bytes (review: ``bytes(n)``
    allocated a gigabyte for ``n`` = 10**9)."""
    now = clock()
    until = b"%d:site-a" % (to_us(now) + 1_000_000)
    assert kind(until, cfg(), now) is Miss.ROTATED
    assert kind(until.replace(b"site-a", b"site-b"), cfg(), now) is Miss.UNKNOWN
    for garbage in (10**12, [until], until.decode(), None, b"", b"x:site-a", 1.5):
        assert kind(garbage, cfg(), now) is Miss.UNKNOWN, garbage


@pytest.mark.parametrize("hash_ids", [True, False])
async def test_a_key_of_another_type_in_a_records_place_is_no_record(
    env: Env, clock: FakeClock, hash_ids: bool
) -> None:
    """A hash, list or set where a rotation or logout record goes (an operator's
    mistake, another app's key) is a damaged record: the id is unknown, never a 503 on
    every request that carries it (outside review: ``GET`` answered ``WRONGTYPE``, a
    StoreUnavailable, until someone deleted the key by hand). A logout then writes
    its record over it."""
    store = env.controlled(cfg(hash_ids=hash_ids))
    for kind_of_key in ("hset", "rpush", "sadd"):
        session = await store.create(new_session("alice"))
        key = store.store._key(session.id)  # type: ignore[attr-defined]
        record = rotation_key(store.store, key)  # type: ignore[arg-type]
        await store.delete(session.id)
        if kind_of_key == "hset":
            await env.client.hset(record, "f", "v")
        else:
            await getattr(env.client, kind_of_key)(record, "v")
        with pytest.raises(SessionNotFound) as info:
            await store.get(session.id)
        assert type(info.value) is SessionNotFound, kind_of_key
        again = await store.create(replace(session, data={"n": 1}))
        assert await store.delete(again.id, leave_record=True)
        with pytest.raises(SessionEnded):
            await store.get(session.id)


async def test_a_rotated_session_reads_in_one_round_trip_and_an_older_rotation_heals(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record names the id it was written under; a rotation renames the key and
    records the new id in field ``h``, so a read checks the reply is its key's at no
    cost. A session an older release rotated (no ``h``) is read again by a script
    that names its key, which writes ``h``: its next reads are plain again."""
    store = env.controlled()
    s = await store.create(new_session("alice", data={"n": 1}))
    new_id = await store.rotate(s.id)
    key = store.store.session_key(session_handle(new_id))  # type: ignore[attr-defined]
    assert await env.client.hget(key, "h") == hid(new_id)
    sent = scripts_sent_by_name(monkeypatch)
    assert (await store.get(new_id)).data == {"n": 1}
    assert sent == []  # the HMGET alone
    await env.client.hdel(key, "h")  # as a release before 'h' left it
    assert (await store.get(new_id)).data == {"n": 1}
    assert sent == ["verify_read"]
    assert await env.client.hget(key, "h") == hid(new_id)
    assert (await store.get(new_id)).data == {"n": 1}
    assert sent == ["verify_read"]


def scripts_sent_by_name(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the scripts the transport sends from now on (by SHA)."""
    from asyncsession.backends.redis import scripts as redis_scripts

    names = {
        script.sha: name.lower()
        for name, script in vars(redis_scripts).items()
        if isinstance(script, redis_scripts._Script)
    }
    sent: list[str] = []
    real = transport.send_batch

    async def spy(client: Any, commands: Any, **options: Any) -> list[Any]:
        sent.extend(names.get(c[1], "?") for c in commands if c[0] == "EVALSHA")
        return await real(client, commands, **options)

    monkeypatch.setattr(transport, "send_batch", spy)
    return sent


@pytest.mark.parametrize("verify_too", [False, True])
async def test_a_reply_for_another_key_never_hands_over_its_session(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, verify_too: bool
) -> None:
    """A server or proxy out of step (a reply sent twice, two swapped) makes redis-py
    read another request's reply for a lone ``HMGET``: alice's record for bob's key
    (outside check with a lying proxy: 199 of 200 gets answered with another user's
    session, and a write then stored alice's data under bob's key). The record names
    its own id, so the read is made again by a script that names its key; if that
    reply too is another key's, the client's connections are closed and the get
    fails: never alice's session for bob's cookie."""
    store = env.controlled()
    alice = await store.create(new_session("alice", data={"card": "4111"}))
    bob = await store.create(new_session("bob", data={"n": 1}))
    akey = store.store.session_key(session_handle(alice.id))  # type: ignore[attr-defined]
    bkey = store.store.session_key(session_handle(bob.id))  # type: ignore[attr-defined]
    real = transport.send_batch
    resets: list[bool] = []

    async def out_of_step(client: Any, commands: Any, **options: Any) -> list[Any]:
        swapped = []
        for c in commands:
            if c[0] == "HMGET" and c[1] == bkey:
                c = (c[0], akey, *c[2:])
            elif verify_too and c[0] == "EVALSHA" and c[3] == bkey:
                c = (*c[:3], akey, session_handle(alice.id))
            swapped.append(c)
        return await real(client, swapped, **options)

    async def disconnect(*args: Any, **kwargs: Any) -> None:
        resets.append(True)

    monkeypatch.setattr(transport, "send_batch", out_of_step)
    monkeypatch.setattr(store.store.client.connection_pool, "disconnect", disconnect)  # type: ignore[attr-defined]
    if verify_too:
        with pytest.raises(StoreUnavailable):
            await store.get(bob.id)
        assert resets == [True]
    else:
        got = await store.get(bob.id)
        assert got.user_id == "bob" and got.data == {"n": 1}
        assert resets == []


async def test_an_apply_handed_another_writes_reply_is_refused(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server or proxy out of step hands bob's write the reply of alice's (outside
    check with a proxy that duplicates replies: 1-12 applies in 40 waves were told
    another write's version and expiry). An ``ok`` names the key it wrote, so bob's
    caller gets ``StoreUnavailable`` (its write in doubt: it was sent) and the
    client's idle connections are closed, never alice's version as bob's."""
    store = env.controlled()
    alice = await store.create(new_session("alice", data={"n": 0}))
    bob = await store.create(new_session("bob", data={"n": 0}))
    for _ in range(3):  # alice's version moves ahead of bob's
        await store.apply(alice.id, Changes(set={"n": 1}))
    bkey = store.store.session_key(session_handle(bob.id))  # type: ignore[attr-defined]
    real = transport.send_batch
    last: list[Any] = []
    resets: list[bool] = []

    async def one_behind(client: Any, commands: Any, **options: Any) -> list[Any]:
        replies = await real(client, commands, **options)
        for i, c in enumerate(commands):
            if c[0] == "EVALSHA" and c[1] == redis_backend.APPLY.sha:
                if c[3] == bkey and last:
                    replies[i] = last[-1]  # alice's reply, read again for bob's
                else:
                    last.append(replies[i])
        return replies

    async def disconnect(*args: Any, **kwargs: Any) -> None:
        resets.append(True)

    monkeypatch.setattr(transport, "send_batch", one_behind)
    monkeypatch.setattr(store.store.client.connection_pool, "disconnect", disconnect)  # type: ignore[attr-defined]
    applied = await store.apply(alice.id, Changes(set={"n": 2}))
    assert applied.version == 4
    with pytest.raises(StoreUnavailable):
        await store.apply(bob.id, Changes(set={"n": 2}))
    assert resets == [True]
    monkeypatch.setattr(transport, "send_batch", real)
    got = await store.get(bob.id)  # the write was sent: it landed, in bob's session
    assert (got.version, got.data) == (1, {"n": 2})
    assert (await store.get(alice.id)).version == 4


@pytest.mark.parametrize("other", ["alice", "carol"])
async def test_a_listing_of_another_user_is_refused(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    """Two listing replies swapped in one pipeline (outside check: 6 of 8 callers got
    another user's devices, data included; and a user with none made a listing
    empty): the reply names its index, so another listing fails the call, and the
    client's connections are closed."""
    store = env.controlled()
    await store.create(new_session("alice", data={"card": "4111"}))
    await store.create(new_session("bob"))
    raw = store.store
    real = raw._eval  # type: ignore[attr-defined]
    other_index = raw.index_key("site-a", other)  # type: ignore[attr-defined]
    resets: list[bool] = []

    async def swapped(script: Any, keys: Any, args: Any) -> Any:
        return await real(script, (other_index,) if script is redis_backend.LIST else keys, args)

    async def disconnect(*a: Any, **k: Any) -> None:
        resets.append(True)

    monkeypatch.setattr(raw, "_eval", swapped)
    monkeypatch.setattr(raw.client.connection_pool, "disconnect", disconnect)  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        await store.list_by_user("bob")
    assert resets == [True]


@pytest.mark.parametrize("lie", ["wrongtype", "write_reply", "record_to_a_write"])
async def test_a_reply_out_of_step_is_checked_closes_connections_and_shows_no_record(
    env: Env, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    """Other lies of a server or proxy out of step (outside check). A ``WRONGTYPE``
    in place of a read's reply is looked at again (it logged the user out: the
    session is there). A write's reply in place of a read's, or a record in place of
    a write's, is ``StoreUnavailable`` and closes the client's connections (reads and
    writes took turns getting each other's replies for good), and its message names
    the reply's shape, never its text (a ``KeyError`` quoted alice's record, card
    number included, into the log)."""
    store = env.controlled()
    alice = await store.create(new_session("alice", data={"card": "4111-1111"}))
    bob = await store.create(new_session("bob", data={"n": 1}))
    akey = store.store.session_key(session_handle(alice.id))  # type: ignore[attr-defined]
    bkey = store.store.session_key(session_handle(bob.id))  # type: ignore[attr-defined]
    record = await env.client.hget(akey, "r")
    real = transport.send_batch
    resets: list[bool] = []

    async def lying(client: Any, commands: Any, **options: Any) -> list[Any]:
        replies = await real(client, commands, **options)
        for i, c in enumerate(commands):
            if c[0] == "HMGET" and c[1] == bkey:
                if lie == "wrongtype":
                    replies[i] = redis.exceptions.ResponseError("WRONGTYPE Operation")
                elif lie == "write_reply":
                    replies[i] = [b"ok"]
            elif lie == "record_to_a_write" and c[0] == "EVALSHA" and c[3] == bkey:
                replies[i] = record
        return replies

    async def disconnect(*a: Any, **k: Any) -> None:
        resets.append(k == {"inuse_connections": False})  # (in use: writes in doubt)

    monkeypatch.setattr(transport, "send_batch", lying)
    monkeypatch.setattr(store.store.client.connection_pool, "disconnect", disconnect)  # type: ignore[attr-defined]
    if lie == "wrongtype":
        got = await store.get(bob.id)
        assert got.user_id == "bob" and got.data == {"n": 1} and resets == []
        return
    with pytest.raises(StoreUnavailable) as info:
        if lie == "write_reply":
            await store.get(bob.id)
        else:
            await store.rotate(bob.id)
    assert resets == [True]
    chain: list[BaseException] = []
    error: BaseException | None = info.value
    while error is not None and len(chain) < 10:  # (what any reporter may walk)
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert not any("4111" in str(e) or "alice" in str(e) for e in chain), chain


def test_a_logout_record_is_told_apart_and_old_releases_ignore_it(clock: FakeClock) -> None:
    """A logout's record marks its deadline ``e``: ``kind`` says ENDED, never ROTATED,
    and a release before these records (whose parse is ``int(until)``) finds it
    damaged, so no record at all: an upgrade and a downgrade both keep working."""
    now = clock()
    until = to_us(now) + 1_000_000
    ended = b"e%d:site-a" % until
    assert kind(ended, cfg(), now) is Miss.ENDED
    assert kind(b"%d:site-a" % until, cfg(), now) is Miss.ROTATED
    assert kind(ended.replace(b"site-a", b"site-b"), cfg(), now) is Miss.UNKNOWN
    assert kind(b"e%d:site-a" % (to_us(now) - 1), cfg(), now) is Miss.UNKNOWN  # lapsed
    for garbage in (b"e:site-a", b"ee1:site-a", b"e-:site-a", ended.decode()):
        assert kind(garbage, cfg(), now) is Miss.UNKNOWN, garbage
    with pytest.raises(ValueError):
        int(ended.partition(b":")[0])  # what a release before the records does
