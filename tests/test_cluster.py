"""RedisStore on a real 3-primary Redis Cluster started by the tests (tests/redis_servers.py).

The conformance suite also runs on this cluster (backend ``redis_cluster``). Here: the
hash-tag key layout, atomic per-user limits under 500 concurrent creates, 10,000
sessions spread over every primary and purged from every primary, per-node batching,
and what the store does while the cluster changes shape: ``MOVED`` after a resharding
(followed), ``ASK`` / ``TRYAGAIN`` while a slot migrates (reads follow, scripts wait,
nothing is answered wrongly or written twice), and a node that hangs or dies
(``StoreUnavailable`` naming the cluster, then recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis.asyncio.cluster import ClusterNode, RedisCluster  # noqa: E402
from redis.asyncio.connection import Connection  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from asyncsession import (  # noqa: E402
    Changes,
    Config,
    ControlledStore,
    InvalidSession,
    Session,
    SessionConflict,
    SessionEnded,
    SessionEvent,
    SessionNotFound,
    SessionRotated,
    StoreUnavailable,
    generate_session_id,
    new_session,
    open_store,
    session_handle,
    short_hash,
    with_controls,
)
from asyncsession._deadline import DEADLINE  # noqa: E402
from asyncsession.backends import redis as redis_backend  # noqa: E402
from asyncsession.backends.redis import RedisStore  # noqa: E402
from asyncsession.backends.redis import layout as _layout  # noqa: E402
from asyncsession.backends.redis import urls as _urls  # noqa: E402
from asyncsession.backends.redis.layout import id_slot  # noqa: E402
from asyncsession.backends.redis.scripts import RETIRE  # noqa: E402
from asyncsession.session import SESSION_ID_RE, user_tag  # noqa: E402

from . import backend_redis  # noqa: E402
from .clock import FakeClock  # noqa: E402
from .redis_servers import Cluster  # noqa: E402


def cfg(**changes: Any) -> Config:
    base: dict[str, Any] = {"site_id": "site-a", "max_sessions_per_user": 5, "cleanup_interval": 0}
    base.update(changes)
    return Config(**base)


def client_for(cluster: Cluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])


class Env(backend_redis.PrefixEnv):
    """Stores on one test's own key prefix over the shared cluster; cleans up after."""

    def __init__(self, cluster: Cluster, clock: FakeClock) -> None:
        super().__init__(client_for(cluster))
        self.cluster = cluster
        self.clock = clock

    def raw(self, config: Config | None = None, **options: Any) -> RedisStore:
        config = replace(config or cfg(), key_prefix=self.prefix)
        store = RedisStore.from_url(self.cluster.url, config, clock=self.clock, **options)
        self.stores.append(store)
        return store

    def controlled(self, config: Config | None = None, **options: Any) -> ControlledStore:
        config = replace(config or cfg(), key_prefix=self.prefix)
        store = with_controls(self.raw(config, **options), config)
        self.stores.append(store)
        return store


@pytest.fixture
async def env(redis_cluster: Cluster, clock: FakeClock) -> AsyncIterator[Env]:
    e = Env(redis_cluster, clock)
    try:
        yield e
    finally:
        await e.close()


def test_cluster_fixture_has_three_primaries_covering_every_slot(redis_cluster: Cluster) -> None:
    owners: dict[int, set[int]] = {}
    for server in redis_cluster.servers:
        for start, port in Cluster.slot_map(server).items():
            owners.setdefault(start, set()).add(port)
    assert len(owners) == 3 and all(len(ports) == 1 for ports in owners.values())
    assert {p for ports in owners.values() for p in ports} == set(redis_cluster.ports)


# ------------------------------------------------------------------------ ids, layout


def test_user_session_ids_carry_the_user_tag() -> None:
    s = new_session("alice")
    assert s.id.startswith(user_tag("alice")) and len(s.id) == 47
    assert SESSION_ID_RE.fullmatch(s.id)
    assert len(new_session(None).id) == 43  # anonymous: 43 random characters
    assert user_tag("alice") == user_tag("alice") != user_tag("bob")
    # the 43 characters after the tag are fresh randomness every time
    assert len({new_session("alice").id[4:] for _ in range(100)}) == 100
    # tags spread users over the slots
    slots = {_layout.id_slot(user_tag(f"user-{n}")) for n in range(2000)}
    assert len(slots) > 1800


def test_slot_tags_land_in_their_slot() -> None:
    for slot in (0, 1, 5460, 5461, 10922, 10923, 16383):
        tag = _layout.slot_tag(slot)
        assert key_slot(b"p:x:{" + tag + b"}") == slot
    assert len({_layout.slot_tag(s) for s in range(16384)}) == 16384


async def test_key_layout_puts_a_session_its_index_and_expiry_set_in_one_slot(
    env: Env, clock: FakeClock
) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", timedelta(hours=1), now=clock()))
    anon = await store.create(new_session(None, timedelta(hours=1), now=clock()))
    tag = user_tag("alice")
    h, ah = session_handle(s.id), session_handle(anon.id)  # ids at rest: tag "." sha256
    skey = f"{env.prefix}s:{{{tag}}}{h[4:]}".encode()
    ikey = f"{env.prefix}u:{{{tag}}}:6:site-a:alice".encode()
    slot = key_slot(skey)
    xkey = f"{env.prefix}x:{{".encode() + _layout.slot_tag(slot) + b"}"
    akey = f"{env.prefix}s:{{{anon.id[:4]}}}{ah[4:]}".encode()
    axkey = f"{env.prefix}x:{{".encode() + _layout.slot_tag(key_slot(akey)) + b"}"
    assert await env.keys() == sorted({skey, ikey, xkey, akey, axkey})
    assert key_slot(ikey) == key_slot(xkey) == slot
    fields = await env.client.hgetall(skey)
    assert fields[b"i"] == ikey and fields[b"s"] == b"site-a"
    assert await env.client.zrange(ikey, 0, -1) == [h.encode()]
    assert await env.client.zscore(xkey, h) is not None
    assert await env.client.zscore(axkey, ah) is not None
    raw = store.store
    assert isinstance(raw, RedisStore)
    assert raw.session_key(h) == skey and raw.index_key("site-a", "alice") == ikey
    assert key_slot(raw.session_key(s.id)) == slot  # the handle keeps the id's slot


async def test_rotate_keeps_the_slot_and_mints_fresh_randomness(env: Env) -> None:
    store = env.controlled()
    for user in ("alice", None):
        s = await store.create(new_session(user, data={"k": 1}))
        new_id = await store.rotate(s.id)
        assert new_id[:4] == s.id[:4] and new_id[4:] != s.id[4:] and len(new_id) == 47
        assert SESSION_ID_RE.fullmatch(new_id)
        assert (await store.get(new_id)).data == {"k": 1}
        with pytest.raises(SessionNotFound):
            await store.get(s.id)
    assert [x.id[:4] for x in await store.list_by_user("alice")] == [user_tag("alice")]


async def test_user_session_with_an_id_not_minted_for_the_user_is_invalid(env: Env) -> None:
    store = env.controlled()
    s = new_session("alice")
    s.id = generate_session_id()  # no user tag: would land away from alice's index
    with pytest.raises(InvalidSession, match="user"):
        await store.create(s)
    bob = new_session("bob")
    bob.user_id = "alice"
    with pytest.raises(InvalidSession):
        await store.create(bob)
    assert await env.keys() == []
    anon = new_session(None)
    anon.id = new_session("alice").id  # an anonymous session may use any id
    await store.create(anon)


def test_key_prefix_with_braces_is_refused_in_cluster_mode(redis_cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="brace"):
        RedisStore.from_url(redis_cluster.url, Config(key_prefix="{app}:"))


# ------------------------------------------------------------------------ atomicity


@pytest.mark.parametrize("eviction", ["oldest", "reject"])
async def test_500_concurrent_creates_for_one_user_leave_exactly_the_limit(
    env: Env, eviction: str
) -> None:
    store = env.controlled(cfg(max_sessions_per_user=5, eviction=eviction))
    await backend_redis.check_limit_under_500_creates(env, store, eviction)


async def test_concurrent_stale_updates_one_winner_per_version(env: Env) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", data={"writer": None}))
    copies = [await store.get(s.id) for _ in range(100)]

    async def write(n: int, copy: Session) -> int | None:
        copy.data["writer"] = n
        try:
            await store.update(copy)
        except Exception:
            return None
        return n

    results = await asyncio.gather(*(write(n, c) for n, c in enumerate(copies)))
    winners = [w for w in results if w is not None]
    assert len(winners) == 1
    got = await store.get(s.id)
    assert got.version == s.version + 1 and got.data["writer"] == winners[0]


async def _anonymous_in_another_slot_than(store: ControlledStore, user: str) -> Session:
    """An anonymous session whose id's slot is not ``user``'s: a login moves it across."""
    while True:
        anon = new_session(None, data={"cart": 1})
        if id_slot(anon.id) != id_slot(new_session(user).id):
            return await store.create(anon)


async def test_login_across_slots_never_loses_a_write_made_meanwhile(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login moves an anonymous session into one with the user's tag, in another slot:
    no script spans both. A write to the old session after the login read it makes the
    login a conflict that moves nothing (the write kept, no new session left), as the
    single-slot script does; it retired the old session and lost the write, 200 to
    both (27 of 27 over the middleware, found by a cancellation run)."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    real_insert = raw._insert

    async def insert_after_a_write(*args: Any) -> Any:
        await store.apply(anon.id, Changes(set={"cart": 2}))  # another request, meanwhile
        return await real_insert(*args)

    monkeypatch.setattr(raw, "_insert", insert_after_a_write)
    with pytest.raises(SessionConflict):
        await store.rotate_into(
            anon.id, new_session("alice", data={"cart": 1}), version=anon.version
        )
    monkeypatch.undo()
    assert (await store.get(anon.id)).data == {"cart": 2}
    assert await store.list_by_user("alice") == []


async def test_two_logins_across_slots_at_once_one_wins(env: Env) -> None:
    store = env.controlled()
    for _ in range(10):
        anon = await _anonymous_in_another_slot_than(store, "alice")
        results = await asyncio.gather(
            *(
                store.rotate_into(
                    anon.id, new_session("alice", data={"n": n}), version=anon.version
                )
                for n in range(2)
            ),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Session)]
        assert len(won) == 1, results
        assert [type(r) for r in results if not isinstance(r, Session)] in (
            [SessionConflict],
            [SessionRotated],
        )
        assert [x.id for x in await store.list_by_user("alice")] == [store.handle(won[0].id)]
        with pytest.raises(SessionRotated):
            await store.get(anon.id)
        await store.delete(won[0].id)


class _HeldInsert:
    """The raw store's ``_insert`` made to wait, once it has written, until released:
    the moment between a cross-slot login's two steps."""

    def __init__(self, raw: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = raw._insert
        self.inserted, self.release = asyncio.Event(), asyncio.Event()
        monkeypatch.setattr(raw, "_insert", self)

    async def __call__(self, *args: Any) -> Any:
        result = await self.real(*args)
        self.inserted.set()
        await self.release.wait()
        return result


async def _nothing_moved(store: ControlledStore, anon: Session) -> None:
    """The old session still answers its cookie; the user got no session."""
    assert (await store.get(anon.id)).data == anon.data
    assert await store.list_by_user("alice") == []


async def test_login_across_slots_whose_caller_left_moves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled after the new session was created (a client gone) does not
    stop the login halfway: its task goes on and, since nobody will be told of the
    login, deletes the new session and keeps the old one (before, 11-15 in 40 such
    logins left both live)."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    held = _HeldInsert(raw, monkeypatch)
    login = asyncio.create_task(
        store.rotate_into(anon.id, new_session("alice"), version=anon.version)
    )
    await held.inserted.wait()
    login.cancel()
    with pytest.raises(asyncio.CancelledError):
        await login
    assert len(raw._finishing) == 1  # the login's own task, still running
    held.release.set()
    await asyncio.gather(*raw._finishing)
    await _nothing_moved(store, anon)


async def test_login_across_slots_past_the_request_deadline_moves_nothing(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's deadline passes between the two steps: the caller is told
    ``StoreUnavailable`` at the deadline (the middleware answers 503 and sends no
    cookie), so the login must not complete behind it (the browser's cookie would
    name a rotated id: logged out, cart gone). The new session is deleted instead."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    held = _HeldInsert(raw, monkeypatch)
    token = DEADLINE.set(asyncio.get_running_loop().time() + 0.2)
    try:  # (the task copies the context, deadline and all)
        login = asyncio.create_task(
            store.rotate_into(anon.id, new_session("alice"), version=anon.version)
        )
    finally:
        DEADLINE.reset(token)
    with pytest.raises(StoreUnavailable, match="deadline"):
        await login
    held.release.set()
    await asyncio.gather(*raw._finishing)
    await _nothing_moved(store, anon)


async def test_a_retire_on_its_way_at_the_deadline_is_waited_for(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the retire is sent, its answer is the caller's: a deadline passing while it
    is on its way waits for it (one round trip) instead of answering 503 for a login
    that then completes (the browser's cookie rotated away: logged out)."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    real_eval, sent, release = raw._eval, asyncio.Event(), asyncio.Event()

    async def held_retire(script: Any, keys: Any, args: Any) -> Any:
        if script is RETIRE:
            sent.set()
            await release.wait()
        return await real_eval(script, keys, args)

    monkeypatch.setattr(raw, "_eval", held_retire)
    token = DEADLINE.set(asyncio.get_running_loop().time() + 0.2)
    try:
        login = asyncio.create_task(
            store.rotate_into(anon.id, new_session("alice"), version=anon.version)
        )
    finally:
        DEADLINE.reset(token)
    await sent.wait()
    await asyncio.sleep(0.3)  # the request's deadline passes while the retire is on its way
    assert not login.done()
    release.set()
    moved = await login
    assert (await store.get(moved.id)).user_id == "alice"
    with pytest.raises(SessionRotated):
        await store.get(anon.id)


async def test_a_create_whose_reply_is_lost_is_deleted(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create ran but its reply was lost (StoreUnavailable: in doubt): the login
    deletes it before failing, so no session unknown to any client counts toward the
    user's limit."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    real_insert = raw._insert

    async def insert_reply_lost(*args: Any) -> Any:
        await real_insert(*args)
        raise StoreUnavailable("reply lost")

    monkeypatch.setattr(raw, "_insert", insert_reply_lost)
    with pytest.raises(StoreUnavailable):
        await store.rotate_into(anon.id, new_session("alice"), version=anon.version)
    await _nothing_moved(store, anon)


async def test_close_waits_for_a_login_across_slots(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store closed (the app shutting down) while such a login's task runs waits for
    it, so it ends whole instead of failing halfway on a closed connection (two live
    sessions) or reconnecting a closed store."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    held = _HeldInsert(raw, monkeypatch)
    login = asyncio.create_task(
        store.rotate_into(anon.id, new_session("alice"), version=anon.version)
    )
    await held.inserted.wait()
    login.cancel()
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close() is waiting for the login's task
    assert not closing.done()
    held.release.set()
    await closing
    assert not raw._finishing
    await _nothing_moved(env.controlled(), anon)


async def test_login_across_slots_without_version_and_its_evictions(env: Env) -> None:
    """Without ``version`` a write made meanwhile is no conflict, as in one slot (the
    caller asked for no check). An eviction the login made before it was undone (a
    per-user limit of 1, another login winning) is announced: that session is gone."""
    store = env.controlled()
    raw: RedisStore = store.store  # type: ignore[assignment]
    anon = await _anonymous_in_another_slot_than(store, "alice")
    real_insert = raw._insert

    async def insert_after_a_write(*args: Any) -> Any:
        await store.apply(anon.id, Changes(set={"cart": 2}))
        return await real_insert(*args)

    raw._insert = insert_after_a_write  # type: ignore[method-assign]
    moved = await store.rotate_into(anon.id, new_session("alice", data={"cart": 1}))
    raw._insert = real_insert  # type: ignore[method-assign]
    assert (await store.get(moved.id)).data == {"cart": 1}

    config = cfg(max_sessions_per_user=1)
    events: list[SessionEvent] = []
    limited = with_controls(env.raw(config), config, on_event=events.append)
    device = await limited.create(new_session("bob"))
    anon = await _anonymous_in_another_slot_than(limited, "bob")
    real_insert = limited.store._insert

    async def insert_then_lose(*args: Any) -> Any:
        result = await real_insert(*args)
        limited.store._insert = real_insert  # type: ignore[method-assign]
        await limited.rotate_into(anon.id, new_session("bob"))  # another login wins
        return result

    limited.store._insert = insert_then_lose  # type: ignore[method-assign]
    with pytest.raises(SessionRotated):
        await limited.rotate_into(anon.id, new_session("bob"))
    evicted = [e for e in events if e.type == "evicted"]
    assert short_hash(device.id) in {e.session for e in evicted}


async def test_10000_sessions_spread_over_every_primary_and_purge_walks_them_all(
    env: Env, clock: FakeClock
) -> None:
    store = env.controlled(cfg(max_sessions_per_user=0))
    before = env.cluster.dbsizes()
    made: list[Session] = []
    for start in range(0, 10_000, 1_000):
        made += await asyncio.gather(
            *(
                store.create(
                    new_session(None if n % 2 else f"user-{n}", timedelta(minutes=5), now=clock())
                )
                for n in range(start, start + 1_000)
            )
        )
    after = env.cluster.dbsizes()
    grown = {port: after[port] - before[port] for port in after}
    assert sum(grown.values()) >= 10_000 + 5_000  # sessions + user indexes (+ expiry sets)
    for port, count in grown.items():  # each primary holds about a third
        assert sum(grown.values()) * 0.25 < count < sum(grown.values()) * 0.42, (port, grown)
    assert (await store.get(made[1234].id)).id == made[1234].id
    clock.advance(timedelta(minutes=6))
    assert await store.purge_expired() == 10_000
    assert await env.keys() == []
    assert env.cluster.dbsizes() == before


async def test_purge_and_scan_by_a_store_that_was_never_opened(env: Env, clock: FakeClock) -> None:
    store = env.controlled(cfg(max_sessions_per_user=0))
    made = [await store.create(new_session(None, 60, now=clock())) for _ in range(20)]
    fresh = env.raw(cfg())  # no `async with`, no request yet: no slot map loaded
    scanned = [e.session_id async for chunk in fresh._scan(100) for e in chunk]
    # every session, each at least once (SCAN may repeat a key while Redis rehashes,
    # which the shared cluster's other keys can trigger)
    assert set(scanned) == {session_handle(s.id) for s in made}
    clock.advance(61)
    other = env.raw(cfg())
    assert await other.purge_expired() == len(made)
    assert await env.keys() == []


# ------------------------------------------------------------------------- batching


async def test_concurrent_gets_are_sent_as_one_pipeline_per_primary(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = env.controlled(cfg(max_sessions_per_user=0))
    sessions = [await store.create(new_session(None, data={"i": i})) for i in range(120)]
    raw = store.store
    assert isinstance(raw, RedisStore)
    slots = {key_slot(raw.session_key(s.id)) for s in sessions}
    assert {env.cluster.server_for_slot(slot).port for slot in slots} == set(env.cluster.ports)
    counts: dict[int, int] = {}

    original = Connection.send_packed_command

    async def counting(self: Connection, command: Any, check_health: bool = True) -> None:
        if not backend_redis.is_handshake(command):  # a new connection's set-up is timing
            counts[int(self.port)] = counts.get(int(self.port), 0) + 1
        await original(self, command, check_health)

    await asyncio.gather(*(store.get(s.id) for s in sessions))  # opens the connections
    monkeypatch.setattr(Connection, "send_packed_command", counting)
    got = await asyncio.gather(*(store.get(s.id) for s in sessions))
    assert [g.data["i"] for g in got] == list(range(120))
    # the first get goes at once (nothing on the wire); the 119 queued behind it are
    # four batches (MAX_BATCH 32), each one pipeline per primary
    batches = -(-119 // redis_backend.MAX_BATCH)
    first = env.cluster.server_for_slot(key_slot(raw.session_key(sessions[0].id))).port
    assert counts == {port: batches + (port == first) for port in env.cluster.ports}


async def test_script_flush_on_every_primary_is_transparent(env: Env) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", data={"v": 1}))
    for server in env.cluster.servers:
        server.call("SCRIPT", "FLUSH")
    got = await store.get(s.id)
    got.data["v"] = 2
    await store.update(got)  # NOSCRIPT: resent as EVAL on that primary
    made = await asyncio.gather(*(store.create(new_session(f"u{i}")) for i in range(30)))
    assert (await store.get(s.id)).data == {"v": 2}
    assert len(made) == 30 and await store.purge_expired() == 0


@pytest.mark.parametrize("turns", [1, 3])  # cancelled before the batch is sent / after
async def test_batch_survives_a_cancelled_leader(env: Env, turns: int) -> None:
    store = env.controlled(cfg(max_sessions_per_user=0))
    sessions = [await store.create(new_session(None, data={"i": i})) for i in range(12)]
    tasks = [asyncio.ensure_future(store.get(s.id)) for s in sessions]
    for _ in range(turns):  # the first goes at once; the eleven others are one batch,
        await asyncio.sleep(0)  # led by the second
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r.data["i"] for r in results[:1] + results[2:]] == [0, *range(2, 12)]  # type: ignore[union-attr]


# --------------------------------------------------------------- resharding, faults


async def test_moved_after_a_resharding_is_followed(env: Env) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", data={"v": 1}))
    other = await store.create(new_session("alice", data={"v": 2}))
    slot = key_slot(store.store.session_key(s.id))  # type: ignore[attr-defined]
    source = env.cluster.server_for_slot(slot)
    target = next(x for x in env.cluster.servers if x is not source)
    await asyncio.to_thread(env.cluster.move_slot, slot, target)  # the store's map is stale
    try:
        got = await store.get(s.id)
        assert got.data == {"v": 1}
        got.data["v"] = 10
        await store.update(got)
        assert (await store.get(s.id)).data == {"v": 10}
        listed = sorted(x.id for x in await store.list_by_user("alice"))
        assert listed == sorted(session_handle(x.id) for x in (s, other))
        third = await store.create(new_session("alice"))
        assert len(await store.list_by_user("alice")) == 3
        await store.delete(third.id)
        assert int(target.call("CLUSTER", "COUNTKEYSINSLOT", slot)) >= 3
    finally:
        await asyncio.to_thread(env.cluster.move_slot, slot, source)  # put it back
    assert (await store.get(s.id)).data == {"v": 10}


async def test_ask_during_a_migration_reads_follow_and_scripts_never_answer_wrongly(
    env: Env,
) -> None:
    store = env.controlled()
    s = await store.create(new_session("alice", data={"v": 1}))
    other = await store.create(new_session("alice", data={"v": 2}))
    raw = store.store
    assert isinstance(raw, RedisStore)
    slot = key_slot(raw.session_key(s.id))
    source = env.cluster.server_for_slot(slot)
    target = next(x for x in env.cluster.servers if x is not source)
    # half-way through a migration: s has moved, its index and other have not
    await asyncio.to_thread(
        env.cluster.move_slot, slot, target, keys=[raw.session_key(raw.handle(s.id))], finish=False
    )
    try:
        assert (await store.get(s.id)).data == {"v": 1}  # ASK, followed
        assert (await store.get(other.id)).data == {"v": 2}  # still on the source
        # a script over keys on both sides: redis-py resends it while the node answers
        # TRYAGAIN (its own bounded retry), then StoreUnavailable; never a wrong answer
        with pytest.raises(StoreUnavailable):
            await store.list_by_user("alice")
        with pytest.raises(StoreUnavailable):
            await store.delete_by_user("alice")
        # nothing was dropped by a script that saw half a slot
        ikey = raw.index_key("site-a", "alice")
        members = source.call("ZRANGE", ikey, 0, -1)
        handles = sorted(raw.handle(x.id) for x in (s, other))
        assert sorted(members) == [h.encode() for h in handles]
        await asyncio.to_thread(env.cluster.finish_slot, slot, target)
        assert sorted(x.id for x in await store.list_by_user("alice")) == handles
    finally:
        if env.cluster.server_for_slot(slot) is not target:
            await asyncio.to_thread(env.cluster.finish_slot, slot, target)
        await asyncio.to_thread(env.cluster.move_slot, slot, source)
    assert len(await store.list_by_user("alice")) == 2


async def test_a_logout_at_the_start_of_a_migration_still_logs_out(env: Env) -> None:
    """A slot marked migrating with no key moved yet: a logout's script also declares
    the id's record key, which is on neither side, so the node answers TRYAGAIN
    until redis-py gives up (review: 503 for every logout in the slot meanwhile,
    where a plain delete went through). The logout falls back to a delete without
    the record."""
    store = env.controlled()
    s = await store.create(new_session("alice"))
    raw = store.store
    assert isinstance(raw, RedisStore)
    slot = key_slot(raw.session_key(raw.handle(s.id)))
    source = env.cluster.server_for_slot(slot)
    target = next(x for x in env.cluster.servers if x is not source)
    await asyncio.to_thread(env.cluster.move_slot, slot, target, keys=[], finish=False)
    try:
        assert await store.delete(s.id, leave_record=True) is True
    finally:
        await asyncio.to_thread(env.cluster.finish_slot, slot, source)
    with pytest.raises(SessionNotFound):
        await store.get(s.id)
    # and with the slot settled, a logout leaves its record again
    t = await store.create(new_session("alice"))
    assert await store.delete(t.id, leave_record=True) is True
    with pytest.raises(SessionEnded):
        await store.get(t.id)


async def test_writes_during_a_migration_are_applied_once(env: Env) -> None:
    """Creates, updates and deletes racing a slot migration: each either happens once
    (and is visible after) or fails with StoreUnavailable; none is doubled or lost."""
    store = env.controlled(cfg(max_sessions_per_user=0))
    raw = store.store
    assert isinstance(raw, RedisStore)
    s = await store.create(new_session("alice", data={"n": 0}))
    slot = key_slot(raw.session_key(s.id))
    source = env.cluster.server_for_slot(slot)
    target = next(x for x in env.cluster.servers if x is not source)
    stop = asyncio.Event()
    created: list[str] = []
    acked = {"n": 0}

    async def writer() -> None:
        while not stop.is_set():
            try:
                created.append(raw.handle((await store.create(new_session("alice"))).id))
                got = await store.get(s.id)
                got.data["n"] += 1
                await store.update(got)
                acked["n"] = got.data["n"]
            except StoreUnavailable:
                pass
            await asyncio.sleep(0)

    task = asyncio.ensure_future(writer())
    try:
        await asyncio.sleep(0.2)
        await asyncio.to_thread(env.cluster.move_slot, slot, target)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(env.cluster.move_slot, slot, source)
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await task
    got = await store.get(s.id)
    assert got.data["n"] == got.version and acked["n"] <= got.data["n"] <= acked["n"] + 1
    listed = {x.id for x in await store.list_by_user("alice")}
    assert set(created) <= listed
    assert len(listed) <= len(created) + 2  # at most the one in flight at the end, plus s


async def test_a_hung_node_is_store_unavailable_for_its_slots_only(env: Env) -> None:
    store = env.controlled(cfg(max_sessions_per_user=0), timeout=1.2)
    sessions = [await store.create(new_session(None, data={"i": i})) for i in range(60)]
    victim = env.cluster.servers[1]
    raw = store.store
    assert isinstance(raw, RedisStore)
    on_victim = [
        s
        for s in sessions
        if env.cluster.server_for_slot(key_slot(raw.session_key(s.id))) is victim
    ]
    elsewhere = [s for s in sessions if s not in on_victim]
    assert on_victim and elsewhere
    victim.pause()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get(on_victim[0].id)
        assert "redis+cluster://" in str(info.value)
        assert (await store.get(elsewhere[0].id)).id == elsewhere[0].id
        # in one batch, the healthy primaries' replies do not wait for the hung one
        done: dict[str, float] = {}
        started = time.monotonic()

        async def timed_get(s: Session) -> None:
            with contextlib.suppress(StoreUnavailable):
                await store.get(s.id)
            done[s.id] = time.monotonic() - started

        await asyncio.gather(*(timed_get(s) for s in sessions))
        assert max(done[s.id] for s in elsewhere) < 1.0 <= min(done[s.id] for s in on_victim)
    finally:
        victim.resume()
    got = await asyncio.gather(*(store.get(s.id) for s in sessions))
    assert [g.data["i"] for g in got] == list(range(60))


async def test_a_dead_node_is_store_unavailable_then_the_store_recovers(
    private_cluster: Cluster, clock: FakeClock
) -> None:
    config = cfg(max_sessions_per_user=0, key_prefix="dead:")
    store = with_controls(
        RedisStore.from_url(
            private_cluster.url,
            config,
            clock=clock,
            socket_timeout=1,
            socket_connect_timeout=1,
        ),
        config,
    )
    async with store:
        sessions = [await store.create(new_session(f"u{i}")) for i in range(30)]
        victim = private_cluster.servers[2]
        raw = store.store
        assert isinstance(raw, RedisStore)

        def on_victim(s: Session) -> bool:
            return private_cluster.server_for_slot(key_slot(raw.session_key(s.id))) is victim

        assert any(on_victim(s) for s in sessions)
        victim.kill()
        outcomes = await asyncio.gather(
            *(store.get(s.id) for s in sessions), return_exceptions=True
        )
        down = [o for o in outcomes if isinstance(o, StoreUnavailable)]
        assert down and len(down) < len(sessions)
        assert all(isinstance(o, Session | StoreUnavailable) for o in outcomes)
        assert "unavailable" in str(down[0])
        victim.start()  # back on its port with its nodes.conf: rejoins, empty
        await asyncio.to_thread(private_cluster.wait_ok)
        for s, outcome in zip(sessions, outcomes, strict=True):
            if isinstance(outcome, Session):
                assert (await store.get(s.id)).id == s.id
            elif on_victim(s):
                with pytest.raises(SessionNotFound):  # lost with the node (no persistence)
                    await store.get(s.id)
            else:  # (redis-py 5.0 can fail a healthy node's part while it reloads the map)
                assert (await store.get(s.id)).id == s.id
        fresh = await store.create(new_session("after"))
        assert (await store.get(fresh.id)).id == fresh.id


# ------------------------------------------------------------------------------ URLs


async def test_open_store_routes_cluster_urls(redis_cluster: Cluster, clock: FakeClock) -> None:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    store = open_store(redis_cluster.url, cfg(key_prefix=prefix), clock=clock)
    async with store:
        assert isinstance(store.store, RedisStore)
        s = await store.create(new_session("alice"))
        assert (await store.get(s.id)).id == s.id
        await store.delete(s.id)
        assert await store.list_by_user("alice") == []
    client = client_for(redis_cluster)
    try:
        await backend_redis.delete_prefix(client, prefix)
    finally:
        await client.aclose()


def test_cluster_url_forms() -> None:
    nodes, options = _urls.parse_cluster_url(
        "redis+cluster://u:p%40ss@a:7000,b:7001,[::1]:7002?socket_timeout=2&ssl=true"
    )
    assert nodes == [("a", 7000), ("b", 7001), ("::1", 7002)]
    assert options == {"username": "u", "password": "p@ss", "socket_timeout": 2.0, "ssl": True}
    assert _urls.parse_cluster_url("redis+cluster://h")[0] == [("h", 6379)]
    with pytest.raises(ValueError, match="database"):
        _urls.parse_cluster_url("redis+cluster://h:1/2")
    with pytest.raises(ValueError, match="option"):
        _urls.parse_cluster_url("redis+cluster://h:1?bogus=1")


async def test_unreachable_cluster_is_store_unavailable_without_password(
    clock: FakeClock,
) -> None:
    from .redis_servers import free_ports

    (port,) = free_ports(1)
    store = RedisStore.from_url(
        f"redis+cluster://:s3cret@127.0.0.1:{port}", cfg(), clock=clock, socket_connect_timeout=0.5
    )
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get(new_session(None).id)
        assert "s3cret" not in str(info.value) and re.search(r"127\.0\.0\.1:\d+", str(info.value))
    finally:
        await store.close()


# ------------------------------------------------------------- ids hashed at rest


async def test_sessions_stored_under_plain_ids_move_to_their_handles_in_their_slot(
    env: Env, clock: FakeClock
) -> None:
    """The previous layout (``hash_ids=False`` writes it) read by today's store: each
    session moves on first touch, or by ``migrate_ids``, within its slot (the handle
    keeps the id's hash tag), with its index and expiry members."""
    plain = env.controlled(cfg(hash_ids=False))
    made = [await plain.create(new_session("alice", data={"n": n})) for n in range(3)]
    anon = await plain.create(new_session(None, data={"anon": True}))
    store = env.controlled()
    raw = store.store
    assert isinstance(raw, RedisStore)
    first = made[0].id
    xkey = raw.expiry_key_for(first)
    score = await env.client.zscore(xkey, first)
    assert (await store.get(first)).data == {"n": 0}
    handle = session_handle(first)
    assert not await env.client.exists(raw.session_key(first))
    assert await env.client.exists(raw.session_key(handle))
    assert key_slot(raw.session_key(handle)) == key_slot(raw.session_key(first))
    assert await env.client.zscore(xkey, handle) == score
    await store.apply(made[1].id, Changes(set={"x": 1}))  # a write moves it too
    # a damaged index field naming a key of another slot: moved all the same
    await env.client.hset(raw.session_key(anon.id), "i", b"elsewhere")
    assert (await store.get(anon.id)).data == {"anon": True}
    await env.client.hdel(raw.session_key(session_handle(anon.id)), "i")
    assert await raw.migrate_ids() == 1  # made[2]
    ikey = raw.index_key("site-a", "alice")
    assert await env.client.zrange(ikey, 0, -1) == [session_handle(s.id).encode() for s in made]
    blob = b"".join(await env.keys())
    for s in [*made, anon]:
        assert s.id[4:].encode() not in blob
        assert (await store.get(s.id)).data == s.data | ({"x": 1} if s is made[1] else {})


@pytest.mark.parametrize("write", ["create", "apply"])
async def test_a_write_whose_reply_is_lost_is_not_sent_again(
    env: Env, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    """A node ran the script and its reply was lost (the connection dropped): the
    caller gets StoreUnavailable (in doubt), never a resend, whose second run would
    answer "already exists" or a conflict for the caller's own applied write
    (outside check: redis-py's cluster client retried 10 times by default)."""
    store = env.controlled()
    kept = await store.create(new_session("alice", 60, data={"n": 0}))
    real = Connection.read_response
    dropped: list[bool] = []

    async def lose_first_reply(self: Connection, *args: Any, **kwargs: Any) -> Any:
        reply = await real(self, *args, **kwargs)
        if not dropped:
            dropped.append(True)
            await self.disconnect()
            raise redis.exceptions.ConnectionError("connection lost before the reply")
        return reply

    fresh = new_session("alice", 60, data={"n": 1})
    monkeypatch.setattr(Connection, "read_response", lose_first_reply)
    with pytest.raises(StoreUnavailable):
        if write == "create":
            await store.create(fresh)
        else:
            await store.apply(kept.id, Changes(set={"n": 2}, expect={"n": 0}))
    monkeypatch.undo()
    assert dropped == [True]
    if write == "create":  # it ran once: stored, as the caller may find out
        got = await store.get(fresh.id)
        assert got.data == {"n": 1} and got.version == 0
    else:
        got = await store.get(kept.id)
        assert got.data == {"n": 2} and got.version == kept.version + 1
