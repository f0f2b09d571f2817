"""Sessions written by the release before hashed ids, read by this one.

``tests/fixtures/legacy_redis.json`` is a keyspace the previous release wrote
(``tests/fixtures/make_legacy_redis.py``): every session under its plain id. Each
test replays it under its own prefix (HSET/ZADD/SET, then PEXPIREAT) and opens
today's store (``Config.hash_ids`` on, the default) over it: nobody is logged out,
each session moves to its handle on first touch with its index and expiry entries,
writes on a session not yet moved work, ``migrate_ids`` moves the rest, and then
no live session id is left in the keyspace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402

from asyncsession import (  # noqa: E402
    Changes,
    Config,
    ControlledStore,
    SessionNotFound,
    SessionRotated,
    new_session,
    session_handle,
    short_hash,
    with_controls,
)
from asyncsession.backends.redis import RedisStore  # noqa: E402
from asyncsession.backends.redis import store as store_module  # noqa: E402
from asyncsession.codec import from_us  # noqa: E402

from . import backend_redis  # noqa: E402
from .clock import FakeClock  # noqa: E402

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "legacy_redis.json").read_text(encoding="utf-8")
)
SESSIONS: dict[str, dict[str, Any]] = FIXTURE["sessions"]
LIVE = {label: s for label, s in SESSIONS.items() if s["fate"] == "live"}


def ids(*labels: str) -> list[str]:
    return [SESSIONS[label]["id"] for label in labels]


class Legacy(backend_redis.PrefixEnv):
    """The fixture replayed under a fresh prefix, and stores over it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(Redis.from_url(backend_redis.REDIS_URL))
        self.clock = clock
        self.events: list[Any] = []

    async def replay(self) -> None:
        client = self.client
        for entry in FIXTURE["keys"]:
            key = entry["key"].replace("{prefix}", self.prefix, 1)
            if entry["type"] == "hash":
                fields = {
                    k: v.replace("{prefix}", self.prefix, 1) for k, v in entry["fields"].items()
                }
                await client.hset(key, mapping=fields)
            elif entry["type"] == "zset":
                await client.zadd(key, {m: score for m, score in entry["members"]})
            else:
                await client.set(key, entry["value"])
            if entry["pexpiretime"] > 0:
                await client.pexpireat(key, entry["pexpiretime"])

    def config(self, site: str, **changes: Any) -> Config:
        base: dict[str, Any] = {
            "site_id": site,
            "key_prefix": self.prefix,
            "max_sessions_per_user": FIXTURE["max_sessions_per_user"],
            "rotation_grace": timedelta(seconds=FIXTURE["rotation_grace_s"]),
            "cleanup_interval": 0,
        }
        base.update(changes)
        return Config(**base)

    def raw(self, **changes: Any) -> RedisStore:
        store = RedisStore(self.client, self.config("a", **changes), clock=self.clock)
        self.stores.append(store)
        return store

    def site(self, raw: RedisStore, site: str) -> ControlledStore:
        store = with_controls(
            raw, self.config(site, hash_ids=raw.config.hash_ids), on_event=self.events.append
        )
        self.stores.append(store)
        return store

    def skey(self, storage_id: str) -> bytes:
        return f"{self.prefix}s:{storage_id}".encode()

    async def dump(self) -> bytes:
        """Every key under the prefix and every value, type-aware, as one blob."""
        out = []
        for key in await self.keys():
            out.append(key)
            kind = (await self.client.type(key)).decode()
            if kind == "hash":
                for field, value in (await self.client.hgetall(key)).items():
                    out += [field, value]
            elif kind == "zset":
                out += [m for m, _ in await self.client.zrange(key, 0, -1, withscores=True)]
            else:
                out.append(await self.client.get(key))
        return b"\n".join(out)


@pytest.fixture
async def legacy(clock: FakeClock) -> AsyncIterator[Legacy]:
    if not backend_redis.server_reachable():
        if backend_redis.REQUIRE:
            pytest.fail(f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis at {backend_redis.REDIS_URL}")
        pytest.skip("replays PEXPIRETIME on a real Redis server")
    clock.now = from_us(FIXTURE["now_us"])
    env = Legacy(clock)
    try:
        await env.replay()
        yield env
    finally:
        await env.close()


def test_the_fixture_is_the_previous_layout() -> None:
    keys = {entry["key"] for entry in FIXTURE["keys"]}
    for label, s in SESSIONS.items():
        assert ("{prefix}s:" + s["id"] in keys) == (s["fate"] == "live"), label
    assert {s["site"] for s in SESSIONS.values()} == {"a", "b"}
    assert sum(k.startswith("{prefix}r:") for k in keys) == 2  # rotate and login
    assert sum(k.startswith("{prefix}u:") for k in keys) == 6


async def test_every_session_reads_by_its_id_and_moves_to_its_handle(legacy: Legacy) -> None:
    raw = legacy.raw()
    stores = {"a": legacy.site(raw, "a"), "b": legacy.site(raw, "b")}
    client = legacy.client
    for label, s in LIVE.items():
        sid, handle = s["id"], session_handle(s["id"])
        ikey = await client.hget(legacy.skey(sid), "i")
        xkey = f"{legacy.prefix}expiry".encode()
        before = {
            "ttl": await client.pexpiretime(legacy.skey(sid)),
            "x": await client.zscore(xkey, sid),
            "i": ikey and await client.zscore(ikey, sid),
            "fields": await client.hgetall(legacy.skey(sid)),
        }
        got = await stores[s["site"]].get(sid)
        assert got.id == sid and got.data == s["data"] and got.user_id == s["user"], label
        assert got.expires_at == (s["expires_us"] and from_us(s["expires_us"]))
        # only under its handle now: the same fields (the record's id the handle), the
        # same native expiry, its index and expiry members moved with their scores
        assert not await client.exists(legacy.skey(sid)), label
        fields = await client.hgetall(legacy.skey(handle))
        record = json.loads(fields.pop(b"r"))
        old = json.loads(before["fields"].pop(b"r"))
        assert record == {**old, "id": handle}
        assert fields == before["fields"]
        assert await client.pexpiretime(legacy.skey(handle)) == before["ttl"]
        assert await client.zscore(xkey, sid) is None
        assert await client.zscore(xkey, handle) == before["x"]
        if ikey:
            assert await client.zscore(ikey, sid) is None
            assert await client.zscore(ikey, handle) == before["i"]
        # the other site does not see it, moved or not
        other = stores["b" if s["site"] == "a" else "a"]
        with pytest.raises(SessionNotFound):
            await other.get(sid)
    assert await raw.migrate_ids() == 0  # nothing left to move


async def test_indexes_limits_and_purge_work_across_the_two_layouts(legacy: Legacy) -> None:
    raw = legacy.raw()
    a = legacy.site(raw, "a")
    alice_1, alice_2 = ids("alice_1", "alice_2")
    # listed before anything moved: each as its handle, oldest first
    listed = [s.id for s in await a.list_by_user("alice")]
    assert listed == [session_handle(alice_1), session_handle(alice_2)]
    # the limit (3) counts legacy members: the third login evicts the oldest (legacy)
    legacy.clock.advance(1)
    third = await a.create(new_session("alice", now=legacy.clock()))
    legacy.clock.advance(1)
    fourth = await a.create(new_session("alice", now=legacy.clock()))
    evicted = [e.session for e in legacy.events if e.type == "evicted"]
    assert evicted == [short_hash(alice_1)]
    assert not await legacy.client.exists(legacy.skey(alice_1))
    with pytest.raises(SessionNotFound):
        await a.get(alice_1)
    listed = [s.id for s in await a.list_by_user("alice")]
    assert listed == [session_handle(x) for x in (alice_2, third.id, fourth.id)]
    # logout everywhere but a legacy session (kept by its plain id): it moves, stays
    assert await a.delete_by_user("alice", keep=alice_2) == 2
    assert [s.id for s in await a.list_by_user("alice")] == [session_handle(alice_2)]
    assert (await a.get(alice_2)).data == SESSIONS["alice_2"]["data"]
    # site b's alice untouched
    b = legacy.site(raw, "b")
    assert [s.id for s in await b.list_by_user("alice")] == [session_handle(*ids("alice_b"))]
    # purge: the sessions due soon, still under their plain ids, go with their entries
    legacy.clock.advance(timedelta(minutes=11))
    assert await a.purge_expired() == 2
    for label in ("bob_soon", "anon_b_soon"):
        assert not await legacy.client.exists(legacy.skey(SESSIONS[label]["id"]))
    assert await a.list_by_user("bob") == []
    assert not await legacy.client.exists(f"{legacy.prefix}u:1:a:bob")
    expiry = await legacy.client.zrange(f"{legacy.prefix}expiry", 0, -1)
    assert not {m.decode() for m in expiry} & set(ids("bob_soon", "anon_b_soon"))


async def test_writes_on_sessions_not_yet_moved(legacy: Legacy) -> None:
    raw = legacy.raw()
    a = legacy.site(raw, "a")
    # a Session as the previous release read it (hash_ids=False reads plain ids)
    plain = legacy.site(legacy.raw(hash_ids=False), "a")
    alice_1, alice_2, carol, anon = ids("alice_1", "alice_2", "carol_forever", "anon_a")
    stale = await plain.get(alice_1)
    stale.data["n"] = 1
    await a.update(stale)
    assert stale.version == 1
    assert (await a.get(alice_1)).data == {**SESSIONS["alice_1"]["data"], "n": 1}
    await a.apply(alice_2, Changes(set={"k": "v"}))
    assert (await a.get(alice_2)).data == {**SESSIONS["alice_2"]["data"], "k": "v"}
    legacy.clock.advance(5)
    await a.touch(carol)
    got = await a.get(carol)
    assert got.last_accessed_at == legacy.clock() and got.expires_at is None
    assert await legacy.client.pexpiretime(legacy.skey(session_handle(carol))) == -1
    new_id = await a.rotate(anon)
    assert (await a.get(new_id)).data == SESSIONS["anon_a"]["data"]
    with pytest.raises(SessionRotated):
        await a.get(anon)
    erin = SESSIONS["erin_login"]["id"]
    assert await a.delete(erin) is True  # by its plain id, not moved first
    assert not await legacy.client.exists(legacy.skey(erin))
    assert await a.list_by_user("erin") == []
    for sid in (alice_1, alice_2, carol):
        assert not await legacy.client.exists(legacy.skey(sid))
        assert await legacy.client.exists(legacy.skey(session_handle(sid)))


async def test_migrate_moves_the_rest_and_leaves_no_live_id(legacy: Legacy) -> None:
    raw = legacy.raw()
    a = legacy.site(raw, "a")
    await a.get(SESSIONS["alice_1"]["id"])  # one moved on first touch
    assert await raw.migrate_ids(batch=2) == len(LIVE) - 1
    assert await raw.migrate_ids() == 0
    blob = await legacy.dump()
    for label, s in LIVE.items():
        assert s["id"].encode() not in blob, label
        assert session_handle(s["id"]).encode() in blob, label
    # what is left of the previous layout: the two rotation records, under the old
    # (rotated, dead) ids, which Redis drops by itself within the grace
    rest = [k for k in await legacy.keys() if k.startswith(f"{legacy.prefix}r:".encode())]
    assert sorted(rest) == sorted(
        f"{legacy.prefix}r:{s['id']}".encode() for s in SESSIONS.values() if s["fate"] == "rotated"
    )
    for key in rest:
        assert 0 < await legacy.client.pexpiretime(key) < FIXTURE["now_us"] // 1000 + 120_000
    for label, s in LIVE.items():
        store = legacy.site(raw, s["site"])
        assert (await store.get(s["id"])).data == s["data"], label


async def test_100_concurrent_first_touches_move_once_and_lose_no_write(
    legacy: Legacy, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = legacy.raw()
    a = legacy.site(raw, "a")
    sid = SESSIONS["alice_2"]["id"]
    replies: list[bytes] = []
    real_eval = raw._eval

    async def counting(script: Any, keys: Any, args: Any) -> Any:
        reply = await real_eval(script, keys, args)
        if script is store_module.ADOPT:
            replies.append(reply)
        return reply

    monkeypatch.setattr(raw, "_eval", counting)

    async def one(n: int) -> None:
        if n % 2:
            assert (await a.get(sid)).user_id == "alice"
        await a.apply(sid, Changes(set={f"t{n}": n}))

    await asyncio.gather(*(one(n) for n in range(100)))
    assert replies.count(b"moved") == 1 and set(replies) <= {b"moved", b"found"}
    got = await a.get(sid)
    assert got.data == {**SESSIONS["alice_2"]["data"], **{f"t{n}": n for n in range(100)}}
    assert got.version == 100
    assert not await legacy.client.exists(legacy.skey(sid))
    members = await legacy.client.zrange(f"{legacy.prefix}u:1:a:alice", 0, -1)
    assert session_handle(sid).encode() in members and sid.encode() not in members


async def test_hash_ids_off_keeps_the_previous_layout(legacy: Legacy) -> None:
    """``hash_ids=False`` reads and writes plain ids, as before (and never moves one)."""
    plain = legacy.site(legacy.raw(hash_ids=False), "a")
    sid = SESSIONS["alice_1"]["id"]
    got = await plain.get(sid)
    got.data["x"] = 1
    await plain.update(got)
    assert await legacy.client.exists(legacy.skey(sid))
    assert not await legacy.client.exists(legacy.skey(session_handle(sid)))
    assert [s.id for s in await plain.list_by_user("alice")] == ids("alice_1", "alice_2")
    assert await plain.store.migrate_ids() == 0


async def test_a_damaged_index_field_does_not_stop_the_move(legacy: Legacy) -> None:
    """A plain-id session whose ``i`` names a key of another type (or none): it still
    moves whole, and the key ``i`` names is left as it was."""
    raw = legacy.raw()
    a = legacy.site(raw, "a")
    alice_1, alice_2 = ids("alice_1", "alice_2")
    bogus = f"{legacy.prefix}bogus"
    await legacy.client.set(bogus, b"not an index")
    await legacy.client.hset(legacy.skey(alice_1), "i", bogus)
    await legacy.client.hset(legacy.skey(alice_2), "i", "nowhere")
    for sid in (alice_1, alice_2):
        assert (await a.get(sid)).id == sid
        assert not await legacy.client.exists(legacy.skey(sid))
        assert await legacy.client.exists(legacy.skey(session_handle(sid)))
    assert await legacy.client.get(bogus) == b"not an index"
