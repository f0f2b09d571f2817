"""The Store contract, run against every backend (see tests/backends.py).

Every test goes through a ControlledStore, the way applications use a backend,
unless it is about the raw backend itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from asyncsession import (
    Config,
    ControlledStore,
    ErrorCode,
    InvalidSession,
    NotSerializable,
    Session,
    SessionConflict,
    SessionCorrupt,
    SessionEnded,
    SessionError,
    SessionExpired,
    SessionLimitExceeded,
    SessionNotFound,
    SessionRotated,
    SessionTooLarge,
    StoreClosed,
    ViolationEvent,
    new_session,
    with_controls,
)

from .conftest import Harness

PAYLOAD: dict[str, Any] = {
    "role": "admin",
    "roles": ["admin", "editor"],
    "csrf": "x" * 43,
    "cart": [{"sku": f"sku-{i}", "qty": i, "price": 9.99 + i} for i in range(5)],
    "prefs": {"theme": "dark", "lang": "en", "tz": None, "beta": True},
    "big": 2**63,
    "neg": -(2**63),
    "empty_list": [],
    "empty_obj": {},
    "unicode": "héllo \u2603 \U0001f600",
    "float": 1e-300,
}


def cfg(**changes: Any) -> Config:
    base: dict[str, Any] = {"site_id": "site-a", "max_sessions_per_user": 5, "cleanup_interval": 0}
    base.update(changes)
    return Config(**base)


async def snapshot(store: ControlledStore, *users: str) -> dict[str, Any]:
    """What a test compares to prove an operation changed nothing."""
    out: dict[str, Any] = {}
    for user in users:
        out[user] = [(s.id, s.version, s.data) for s in await store.list_by_user(user)]
    return out


# ----------------------------------------------------------------------- create / get


async def test_create_and_get_roundtrip(store: ControlledStore, clock: Any) -> None:
    s = new_session("alice", timedelta(hours=1), data=PAYLOAD, now=clock(), user_agent="UA/1")
    s.ip_address = "203.0.113.9"
    s.organization_id = "org-1"
    created = await store.create(s)
    assert created is s
    assert s.site_id == "site-a"
    got = await store.get(s.id)
    assert got is not s
    assert got == s
    assert got.data == PAYLOAD
    assert type(got.data["big"]) is int and got.data["big"] == 2**63
    assert got.data["empty_list"] == [] and got.data["empty_obj"] == {}
    assert got.created_at.tzinfo is not None
    assert got.expires_at == clock() + timedelta(hours=1)
    assert got.user_agent == "UA/1" and got.ip_address == "203.0.113.9"
    assert got.organization_id == "org-1"


async def test_get_returns_independent_copies(store: ControlledStore) -> None:
    s = await store.create(new_session("alice", data={"cart": [1, 2]}))
    a = await store.get(s.id)
    a.data["cart"].append(3)
    a.data["new"] = True
    b = await store.get(s.id)
    assert b.data == {"cart": [1, 2]}


async def test_default_ttl_applied(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg(default_ttl=timedelta(minutes=30)))
    s = await store.create(new_session("alice", now=clock()))
    assert s.expires_at == clock() + timedelta(minutes=30)
    assert (await store.get(s.id)).expires_at == s.expires_at


async def test_create_existing_id_is_invalid_not_overwrite(store: ControlledStore) -> None:
    s = await store.create(new_session("alice", data={"a": 1}))
    dup = new_session("bob", data={"a": 2})
    dup.id = s.id
    with pytest.raises(InvalidSession) as info:
        await store.create(dup)
    assert info.value.code is ErrorCode.SESSION_INVALID
    assert (await store.get(s.id)).data == {"a": 1}
    assert await store.list_by_user("bob") == []


async def test_anonymous_sessions_not_indexed_or_limited(harness: Harness) -> None:
    store = await harness.controlled(cfg(max_sessions_per_user=1, eviction="reject"))
    ids = [(await store.create(new_session(None))).id for _ in range(3)]
    for session_id in ids:
        assert (await store.get(session_id)).user_id is None


async def test_user_ids_int_and_uuid_stored_as_str(store: ControlledStore) -> None:
    import uuid

    u = uuid.uuid4()
    a = await store.create(new_session(42))
    b = await store.create(new_session(u))
    assert (await store.get(a.id)).user_id == "42"
    assert (await store.get(b.id)).user_id == str(u)
    assert [s.id for s in await store.list_by_user(42)] == [store.handle(a.id)]


async def test_get_missing(store: ControlledStore) -> None:
    with pytest.raises(SessionNotFound) as info:
        await store.get("A" * 43)
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    assert info.value.http_status == 404


# ---------------------------------------------------------------------------- expiry


async def test_expiry_by_injected_clock(store: ControlledStore, clock: Any) -> None:
    s = await store.create(new_session("alice", timedelta(minutes=10), now=clock()))
    clock.advance(timedelta(minutes=9, seconds=59))
    assert (await store.get(s.id)).id == s.id
    clock.advance(1)
    with pytest.raises(SessionExpired) as info:
        await store.get(s.id)
    assert info.value.code is ErrorCode.SESSION_EXPIRED
    assert info.value.http_status == 401
    assert isinstance(info.value, SessionNotFound)
    assert await store.list_by_user("alice") == []
    assert await store.purge_expired() == 1
    with pytest.raises(SessionNotFound):
        await store.get(s.id)


async def test_purge_removes_only_expired(store: ControlledStore, clock: Any) -> None:
    short = [await store.create(new_session(f"u{i}", 60, now=clock())) for i in range(3)]
    anon = await store.create(new_session(None, 60, now=clock()))
    long = [await store.create(new_session(f"u{i}", 3600, now=clock())) for i in range(3)]
    clock.advance(61)
    assert await store.purge_expired() == 4
    assert await store.purge_expired() == 0
    for s in [*short, anon]:
        with pytest.raises(SessionNotFound):
            await store.get(s.id)
    for s in long:
        assert (await store.get(s.id)).id == s.id
    assert [x.id for x in await store.list_by_user("u0")] == [store.handle(long[0].id)]


async def test_idle_timeout_slides_but_not_past_absolute(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg(idle_timeout=timedelta(minutes=10)))
    s = await store.create(new_session("alice", timedelta(minutes=25), now=clock()))
    start = clock()
    assert s.expires_at == start + timedelta(minutes=10)
    clock.advance(timedelta(minutes=9))
    await store.touch(s.id)
    got = await store.get(s.id)
    assert got.last_accessed_at == clock()
    assert got.expires_at == clock() + timedelta(minutes=10)
    assert got.version == 0 and got.data == {}
    clock.advance(timedelta(minutes=9))
    await store.touch(s.id)
    clock.advance(timedelta(minutes=6))  # 24 min: still inside absolute 25
    await store.touch(s.id)
    got = await store.get(s.id)
    assert got.expires_at == start + timedelta(minutes=25)  # capped by the absolute deadline
    clock.advance(timedelta(minutes=1))
    with pytest.raises(SessionExpired):
        await store.get(s.id)


async def test_idle_timeout_expires_without_access(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg(idle_timeout=60))
    s = await store.create(new_session("alice", now=clock()))
    clock.advance(61)
    with pytest.raises(SessionExpired):
        await store.get(s.id)
    with pytest.raises(SessionNotFound):
        await store.touch(s.id)


async def test_update_slides_idle_expiry(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg(idle_timeout=60))
    s = await store.create(new_session("alice", now=clock()))
    clock.advance(50)
    s.data["k"] = 1
    await store.update(s)
    assert s.expires_at == clock() + timedelta(seconds=60)
    clock.advance(50)
    assert (await store.get(s.id)).data == {"k": 1}


# ---------------------------------------------------------------------------- update


async def test_update_compare_and_set(store: ControlledStore, clock: Any) -> None:
    s = await store.create(new_session("alice", data={"n": 0}, now=clock()))
    a = await store.get(s.id)
    b = await store.get(s.id)
    clock.advance(5)
    a.data["n"] = 1
    await store.update(a)
    assert a.version == 1
    assert a.updated_at == clock()
    b.data["n"] = 2
    with pytest.raises(SessionConflict) as info:
        await store.update(b)
    assert info.value.code is ErrorCode.SESSION_CONFLICT and info.value.http_status == 409
    assert b.version == 0  # the caller's copy is untouched by a failed write
    got = await store.get(s.id)
    assert got.data == {"n": 1} and got.version == 1 and got.updated_at == clock()


async def test_update_never_resurrects(store: ControlledStore, clock: Any) -> None:
    s = await store.create(new_session("alice", timedelta(minutes=1), now=clock()))
    copy = await store.get(s.id)
    await store.delete(s.id)
    with pytest.raises(SessionNotFound):
        await store.update(copy)
    with pytest.raises(SessionNotFound):
        await store.get(s.id)
    t = await store.create(new_session("alice", timedelta(minutes=1), now=clock()))
    clock.advance(61)
    with pytest.raises(SessionNotFound):
        await store.update(t)
    assert await store.list_by_user("alice") == []


async def test_update_cannot_change_user(store: ControlledStore) -> None:
    s = await store.create(new_session("alice", data={"a": 1}))
    s.user_id = "mallory"
    with pytest.raises(InvalidSession):
        await store.update(s)
    got = await store.get(s.id)
    assert got.user_id == "alice" and got.version == 0


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("user_id", 123),
        ("user_id", "\ud800"),
        ("user_agent", 123),
        ("user_agent", "\ud800"),
        ("ip_address", b"127.0.0.1"),
        ("organization_id", "org\udfff"),
    ],
)
async def test_update_with_bad_metadata_is_invalid_and_changes_nothing(
    store: ControlledStore, field: str, bad: Any
) -> None:
    s = await store.create(new_session("alice", data={"a": 1}))
    s.data["a"] = 2
    setattr(s, field, bad)
    with pytest.raises(InvalidSession):
        await store.update(s)
    got = await store.get(s.id)
    assert got.data == {"a": 1} and got.version == 0 and got.user_id == "alice"


async def test_concurrent_updates_one_winner(store: ControlledStore) -> None:
    s = await store.create(new_session("alice", data={"n": 0}))
    copies = [await store.get(s.id) for _ in range(50)]
    for i, c in enumerate(copies):
        c.data["n"] = i

    async def attempt(c: Session) -> bool:
        try:
            await store.update(c)
        except SessionConflict:
            return False
        return True

    results = await asyncio.gather(*(attempt(c) for c in copies))
    assert results.count(True) == 1
    got = await store.get(s.id)
    assert got.version == 1
    assert got.data["n"] == results.index(True)


# ----------------------------------------------------------------------------- touch


async def test_touch_never_rewrites_data_or_version(store: ControlledStore, clock: Any) -> None:
    s = await store.create(new_session("alice", data={"a": 1}, now=clock()))
    stale = await store.get(s.id)
    clock.advance(30)
    await store.touch(s.id)
    got = await store.get(s.id)
    assert got.last_accessed_at == clock()
    assert got.version == 0 and got.data == {"a": 1} and got.expires_at == s.expires_at
    stale.data["a"] = 2
    await store.update(stale)  # touch did not bump the version
    assert (await store.get(s.id)).data == {"a": 2}


async def test_touch_missing(store: ControlledStore) -> None:
    with pytest.raises(SessionNotFound):
        await store.touch("B" * 43)


# ---------------------------------------------------------------------------- rotate


async def test_rotate_moves_everything(store: ControlledStore) -> None:
    s = await store.create(new_session("alice", data={"a": [1, 2]}, user_agent="UA"))
    other = await store.create(new_session("alice"))
    new_id = await store.rotate(s.id)
    assert new_id != s.id and len(new_id) >= 43  # 256 random bits (+ a slot tag on a cluster)
    with pytest.raises(SessionNotFound):
        await store.get(s.id)
    got = await store.get(new_id)
    assert got.data == {"a": [1, 2]} and got.user_agent == "UA" and got.user_id == "alice"
    assert got.created_at == s.created_at and got.version == s.version
    assert sorted(x.id for x in await store.list_by_user("alice")) == sorted(
        [store.handle(new_id), store.handle(other.id)]
    )
    assert await store.delete_by_user("alice") == 2


async def test_rotate_missing_or_expired(store: ControlledStore, clock: Any) -> None:
    with pytest.raises(SessionNotFound):
        await store.rotate("C" * 43)
    s = await store.create(new_session("alice", 10, now=clock()))
    clock.advance(11)
    with pytest.raises(SessionNotFound):
        await store.rotate(s.id)


async def test_rotate_anonymous(store: ControlledStore) -> None:
    s = await store.create(new_session(None, data={"x": 1}))
    new_id = await store.rotate(s.id)
    assert (await store.get(new_id)).data == {"x": 1}


# ---------------------------------------------------------------- rotation records


async def test_rotated_id_is_recognised_then_forgotten(
    store: ControlledStore, harness: Harness, clock: Any
) -> None:
    """For ``rotation_grace`` (60 s by default, on the store's clock) the old id is
    rotated, not unknown: get/update/touch raise SessionRotated (a SessionNotFound),
    with no access to the new session; then it is plain unknown, and purge drops it."""
    s = await store.create(new_session("alice", data={"k": 1}, now=clock()))
    stale = await store.get(s.id)
    new_id = await store.rotate(s.id)
    for call in (store.get, store.touch):
        with pytest.raises(SessionRotated) as info:
            await call(s.id)
        assert info.value.code is ErrorCode.SESSION_ROTATED
        assert isinstance(info.value, SessionNotFound)
        assert new_id not in repr(info.value.details) and s.id not in str(info.value)
    stale.data["k"] = 2
    with pytest.raises(SessionRotated):
        await store.update(stale)
    assert (await store.get(new_id)).data == {"k": 1}
    # another site never sees this site's record
    other = await harness.controlled(store.config, site_id="site-b")
    with pytest.raises(SessionNotFound) as info:
        await other.get(s.id)
    assert not isinstance(info.value, SessionRotated)
    clock.advance(59)
    with pytest.raises(SessionRotated):
        await store.get(s.id)
    clock.advance(1)
    await store.purge_expired()
    with pytest.raises(SessionNotFound) as info:
        await store.get(s.id)
    assert not isinstance(info.value, SessionRotated)
    assert (await store.get(new_id)).data == {"k": 1}


async def test_rotation_record_off_and_no_record_for_delete(harness: Harness) -> None:
    store = await harness.controlled(Config(cleanup_interval=0, rotation_grace=0))
    s = await store.create(new_session(None, data={"x": 1}))
    await store.rotate(s.id)
    with pytest.raises(SessionNotFound) as info:
        await store.get(s.id)
    assert not isinstance(info.value, SessionRotated)
    on = await harness.controlled(Config(cleanup_interval=0))
    d = await on.create(new_session("bob"))
    await on.delete(d.id)  # logout: killed at once, never "rotated"
    with pytest.raises(SessionNotFound) as info:
        await on.get(d.id)
    assert not isinstance(info.value, SessionRotated)


async def test_logout_record_is_recognised_then_forgotten(
    store: ControlledStore, harness: Harness, clock: Any
) -> None:
    """``delete(id, leave_record=True)`` (a logout) deletes at once and, in the same
    step, records the id as ended for ``logout_grace`` (10 s): ``get`` raises
    ``SessionEnded`` (a ``SessionNotFound``), never ``SessionRotated``; the record is
    the site's own, survives a purge until it lapses, then the id is plain unknown."""
    s = await store.create(new_session("alice", data={"k": 1}, now=clock()))
    stale = await store.get(s.id)
    rotated = await store.create(new_session("bob", now=clock()))
    await store.rotate(rotated.id)
    assert await store.delete(s.id, leave_record=True) is True
    with pytest.raises(SessionEnded) as info:
        await store.get(s.id)
    assert info.value.code is ErrorCode.SESSION_ENDED and info.value.http_status == 404
    assert isinstance(info.value, SessionNotFound) and not isinstance(info.value, SessionRotated)
    assert s.id not in str(info.value) and s.id not in repr(info.value.details)
    assert not await store._was_rotated(s.id, store.scope, clock())  # a logout is no login
    for write in (store.touch(s.id), store.update(stale)):
        with pytest.raises(SessionNotFound) as info:
            await write
        assert not isinstance(info.value, SessionRotated)
    assert await store.delete(s.id, leave_record=True) is False  # gone: nothing to do
    with pytest.raises(SessionRotated):  # the rotation's record is untouched
        await store.get(rotated.id)
    other = await harness.controlled(store.config, site_id="site-b")
    with pytest.raises(SessionNotFound) as info:
        await other.get(s.id)
    assert not isinstance(info.value, SessionEnded)
    clock.advance(9)
    await store.purge_expired()  # a live record stays
    with pytest.raises(SessionEnded):
        await store.get(s.id)
    clock.advance(1)
    await store.purge_expired()
    with pytest.raises(SessionNotFound) as info:
        await store.get(s.id)
    assert not isinstance(info.value, SessionEnded)
    with pytest.raises(SessionRotated):  # a rotation's record lasts its own 60 s
        await store.get(rotated.id)


async def test_no_logout_record_without_leave_record_grace_or_session(
    store: ControlledStore, harness: Harness, clock: Any
) -> None:
    plain = await store.create(new_session("alice", now=clock()))
    await store.delete(plain.id)  # an admin's delete (revoke): no record
    never = "N" * 43
    assert await store.delete(never, leave_record=True) is False  # none for a missing id
    for session_id in (plain.id, never):
        with pytest.raises(SessionNotFound) as info:
            await store.get(session_id)
        assert not isinstance(info.value, SessionEnded)
    off = await harness.controlled(cfg(logout_grace=0))
    s = await off.create(new_session("bob"))
    assert await off.delete(s.id, leave_record=True) is True
    with pytest.raises(SessionNotFound) as info:
        await off.get(s.id)
    assert not isinstance(info.value, SessionEnded)
    # the two records are set apart: logouts recorded with rotations off
    only = await harness.controlled(cfg(rotation_grace=0, site_id="site-c"))
    s = await only.create(new_session("bob"))
    assert await only.delete(s.id, leave_record=True) is True
    with pytest.raises(SessionEnded):
        await only.get(s.id)


async def test_rotate_binds_a_user_atomically(store: ControlledStore, clock: Any) -> None:
    anon = await store.create(new_session(None, data={"cart": [1]}, now=clock()))
    new_id = await store.rotate(anon.id, user_id="alice")
    got = await store.get(new_id)
    assert got.user_id == "alice" and got.data == {"cart": [1]}
    assert [x.id for x in await store.list_by_user("alice")] == [store.handle(new_id)]
    with pytest.raises(SessionRotated):
        await store.get(anon.id)


async def test_rotate_into_keeps_the_limit_and_index(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(
        Config(site_id="site-a", max_sessions_per_user=2, cleanup_interval=0)
    )
    first = await store.create(new_session("alice", now=clock()))
    clock.advance(1)
    current = await store.create(new_session("alice", data={"n": 1}, now=clock()))
    clock.advance(1)
    # re-login of the same user on `current`: it does not count, nothing is evicted
    fresh = new_session("alice", data={"n": 1}, now=clock())
    await store.rotate_into(current.id, fresh, version=current.version)
    assert sorted(x.id for x in await store.list_by_user("alice")) == sorted(
        map(store.handle, [first.id, fresh.id])
    )
    # an anonymous session logging in as alice: the oldest of hers makes room
    clock.advance(1)
    anon = await store.create(new_session(None, data={"a": 1}, now=clock()))
    third = new_session("alice", data={"a": 1}, now=clock())
    await store.rotate_into(anon.id, third)
    assert sorted(x.id for x in await store.list_by_user("alice")) == sorted(
        map(store.handle, [fresh.id, third.id])
    )
    with pytest.raises(SessionNotFound):
        await store.get(first.id)
    with pytest.raises(SessionRotated):
        await store.get(anon.id)


async def test_rotate_into_refused_leaves_the_old_session(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(
        Config(max_sessions_per_user=1, eviction="reject", cleanup_interval=0)
    )
    bob = await store.create(new_session("bob", now=clock()))
    anon = await store.create(new_session(None, data={"a": 1}, now=clock()))
    with pytest.raises(SessionLimitExceeded):
        await store.rotate_into(anon.id, new_session("bob", now=clock()))
    assert (await store.get(anon.id)).data == {"a": 1}
    # a stale version: conflict, nothing moved
    with pytest.raises(SessionConflict):
        await store.rotate_into(anon.id, new_session("carol", now=clock()), version=7)
    assert (await store.get(anon.id)).data == {"a": 1}
    assert await store.list_by_user("carol") == []
    # the same user re-logging in at the limit: the old one makes room for itself
    moved = await store.rotate_into(bob.id, new_session("bob", now=clock()), version=bob.version)
    assert [x.id for x in await store.list_by_user("bob")] == [store.handle(moved.id)]


# ---------------------------------------------------------------------------- delete


async def test_delete_idempotent(store: ControlledStore) -> None:
    s = await store.create(new_session("alice"))
    await store.delete(s.id)
    await store.delete(s.id)
    await store.delete("D" * 43)
    with pytest.raises(SessionNotFound):
        await store.get(s.id)
    assert await store.list_by_user("alice") == []


async def test_delete_by_user_and_keep(store: ControlledStore, clock: Any) -> None:
    mine = [await store.create(new_session("alice", now=clock())) for _ in range(4)]
    theirs = await store.create(new_session("bob"))
    assert await store.delete_by_user("alice", keep=mine[2].id) == 3
    assert [s.id for s in await store.list_by_user("alice")] == [store.handle(mine[2].id)]
    assert (await store.get(theirs.id)).user_id == "bob"
    assert await store.delete_by_user("alice") == 1
    assert await store.delete_by_user("alice") == 0
    assert await store.delete_by_user("nobody") == 0


async def test_delete_by_user_only_deletes_that_session_of_the_user(
    store: ControlledStore, clock: Any
) -> None:
    """``only`` deletes the one session named (an id, or a listed handle) if it is the
    user's, nothing else; checked against ``keep`` in the same step (revoke_session:
    a device revoked meanwhile revokes nothing)."""
    mine = [await store.create(new_session("alice", now=clock())) for _ in range(4)]
    theirs = await store.create(new_session("bob", now=clock()))
    assert await store.delete_by_user("alice", keep=mine[0].id, only=mine[1].id) == 1
    handles = [s.id for s in await store.list_by_user("alice")]
    assert handles == [store.handle(s.id) for s in (mine[0], mine[2], mine[3])]
    assert await store.delete_by_user("alice", only=handles[1]) == 1  # a listed handle
    assert await store.delete_by_user("alice", only=mine[1].id) == 0  # gone already
    assert await store.delete_by_user("alice", only=theirs.id) == 0  # another user's
    assert (await store.get(theirs.id)).user_id == "bob"
    assert await store.delete_by_user("bob", keep=theirs.id, only=mine[3].id) == 0
    with pytest.raises(InvalidSession):  # nothing to delete but the one to keep
        await store.delete_by_user("alice", keep=mine[0].id, only=mine[0].id)
    await store.delete(mine[0].id)  # the session to keep ended: nothing deleted
    with pytest.raises(SessionNotFound) as caught:
        await store.delete_by_user("alice", keep=mine[0].id, only=mine[3].id)
    assert caught.value.details["deleted"] == 0
    assert [s.id for s in await store.list_by_user("alice")] == [store.handle(mine[3].id)]


async def test_delete_by_user_counts_live_only(store: ControlledStore, clock: Any) -> None:
    await store.create(new_session("alice", 10, now=clock()))
    live = await store.create(new_session("alice", 1000, now=clock()))
    clock.advance(11)
    assert await store.delete_by_user("alice") == 1
    with pytest.raises(SessionNotFound):
        await store.get(live.id)


async def test_list_by_user_oldest_first(store: ControlledStore, clock: Any) -> None:
    ids = []
    for _ in range(4):
        ids.append((await store.create(new_session("alice", now=clock()))).id)
        clock.advance(1)
    listed = await store.list_by_user("alice")
    assert [s.id for s in listed] == [store.handle(i) for i in ids]
    assert all(isinstance(s, Session) and s.user_id == "alice" for s in listed)


# ---------------------------------------------------------------------- per-user limit


@pytest.mark.parametrize("eviction", ["oldest", "lru"])
async def test_limit_evicts(harness: Harness, clock: Any, eviction: str) -> None:
    store = await harness.controlled(cfg(max_sessions_per_user=3, eviction=eviction))
    ids = []
    for _ in range(3):
        ids.append((await store.create(new_session("alice", now=clock()))).id)
        clock.advance(1)
    await store.touch(ids[0])  # the oldest is now the most recently used
    clock.advance(1)
    newest = await store.create(new_session("alice", now=clock()))
    remaining = [s.id for s in await store.list_by_user("alice")]
    assert len(remaining) == 3 and store.handle(newest.id) in remaining
    evicted = ids[0] if eviction == "oldest" else ids[1]
    assert store.handle(evicted) not in remaining
    with pytest.raises(SessionNotFound):
        await store.get(evicted)


async def test_limit_reject(harness: Harness, clock: Any) -> None:
    events: list[ViolationEvent] = []
    store = await harness.controlled(
        cfg(max_sessions_per_user=2, eviction="reject"), options={"on_violation": events.append}
    )
    a = await store.create(new_session("alice", now=clock()))
    b = await store.create(new_session("alice", now=clock()))
    extra = new_session("alice", now=clock())
    with pytest.raises(SessionLimitExceeded) as info:
        await store.create(extra)
    assert info.value.code is ErrorCode.SESSION_LIMIT_EXCEEDED and info.value.http_status == 429
    assert info.value.details["limit"] == 2
    assert [e.type for e in events] == ["session_limit_exceeded"]
    assert [s.id for s in await store.list_by_user("alice")] == [
        store.handle(a.id),
        store.handle(b.id),
    ]
    with pytest.raises(SessionNotFound):
        await store.get(extra.id)
    assert (await store.create(new_session("bob"))).user_id == "bob"  # per user


async def test_limit_ignores_expired_sessions(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg(max_sessions_per_user=2, eviction="reject"))
    await store.create(new_session("alice", 10, now=clock()))
    await store.create(new_session("alice", 10, now=clock()))
    clock.advance(11)
    await store.create(new_session("alice", now=clock()))
    await store.create(new_session("alice", now=clock()))
    assert len(await store.list_by_user("alice")) == 2


@pytest.mark.parametrize("eviction", ["oldest", "lru", "reject"])
async def test_limit_atomic_under_500_concurrent_creates(harness: Harness, eviction: str) -> None:
    store = await harness.controlled(cfg(max_sessions_per_user=5, eviction=eviction))

    async def one() -> str:
        try:
            await store.create(new_session("alice"))
        except SessionLimitExceeded:
            return "rejected"
        return "created"

    results = await asyncio.gather(*(one() for _ in range(500)))
    remaining = await store.list_by_user("alice")
    assert len(remaining) == 5
    if eviction == "reject":
        assert results.count("created") == 5 and results.count("rejected") == 495
    else:
        assert results.count("created") == 500


# --------------------------------------------------------------------- site isolation


async def test_site_isolation_on_every_operation(harness: Harness, clock: Any) -> None:
    backend = await harness.raw(cfg(site_id=""))
    a_events: list[ViolationEvent] = []
    b_events: list[ViolationEvent] = []
    a = with_controls(backend, cfg(site_id="a"), on_violation=a_events.append)
    b = with_controls(backend, cfg(site_id="b"), on_violation=b_events.append)
    sa = await a.create(new_session("alice", data={"site": "a"}, now=clock()))
    sb = await b.create(new_session("alice", data={"site": "b"}, now=clock()))
    assert sa.site_id == "a" and sb.site_id == "b"

    with pytest.raises(SessionNotFound) as info:
        await b.get(sa.id)
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    forged = await a.get(sa.id)
    forged.site_id = "b"
    with pytest.raises(SessionNotFound):
        await b.update(forged)
    with pytest.raises(SessionNotFound):
        await b.touch(sa.id)
    with pytest.raises(SessionNotFound):
        await b.rotate(sa.id)
    await b.delete(sa.id)  # not this site's: nothing happens
    assert (await a.get(sa.id)).data == {"site": "a"}
    assert [s.id for s in await b.list_by_user("alice")] == [b.handle(sb.id)]
    assert await b.delete_by_user("alice") == 1
    assert [s.id for s in await a.list_by_user("alice")] == [a.handle(sa.id)]
    assert {e.type for e in b_events} == {"site_mismatch"}
    assert len(b_events) == 5
    assert all(e.session and len(e.session) == 12 for e in b_events)
    assert a_events == []


async def test_site_limits_are_per_site(harness: Harness) -> None:
    backend = await harness.raw(cfg(site_id=""))
    a = with_controls(backend, cfg(site_id="a", max_sessions_per_user=1, eviction="reject"))
    b = with_controls(backend, cfg(site_id="b", max_sessions_per_user=1, eviction="reject"))
    await a.create(new_session("alice"))
    await b.create(new_session("alice"))
    with pytest.raises(SessionLimitExceeded):
        await a.create(new_session("alice"))


# --------------------------------------------------------------------------- controls


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"at": __import__("datetime").datetime(2024, 1, 1)}, 'data["at"]'),
        ({"id": __import__("uuid").uuid4()}, 'data["id"]'),
        ({"t": (1, 2)}, 'data["t"]'),
        (
            {"cart": [{"x": 1}, {"y": 2}, {"at": __import__("datetime").date(2024, 1, 1)}]},
            'data["cart"][2]["at"]',
        ),
        ({"e": ErrorCode.SESSION_NOT_FOUND}, 'data["e"]'),
        ({"f": float("nan")}, 'data["f"]'),
        ({"f": float("inf")}, 'data["f"]'),
        ({"b": b"bytes"}, 'data["b"]'),
        ({"s": {1, 2}}, 'data["s"]'),
        ({"d": {1: "x"}}, 'data["d"][1]'),
        ({"i": 2**64}, 'data["i"]'),
        ({"i": -(2**63) - 1}, 'data["i"]'),
        ({"o": object()}, 'data["o"]'),
    ],
)
async def test_not_serializable_rejected_with_path(
    harness: Harness, value: dict[str, Any], path: str
) -> None:
    events: list[ViolationEvent] = []
    store = await harness.controlled(cfg(), options={"on_violation": events.append})
    s = new_session("alice", data=value)
    with pytest.raises(NotSerializable) as info:
        await store.create(s)
    assert info.value.code is ErrorCode.SESSION_NOT_SERIALIZABLE
    assert info.value.http_status == 400
    assert info.value.details["path"] == path
    assert [e.type for e in events] == ["not_serializable"]
    assert await store.list_by_user("alice") == []
    # and through update: the stored session is left as it was
    ok = await store.create(new_session("alice", data={"fine": 1}))
    ok.data.update(value)
    with pytest.raises(NotSerializable):
        await store.update(ok)
    got = await store.get(ok.id)
    assert got.data == {"fine": 1} and got.version == 0


async def test_dataclass_rejected(store: ControlledStore) -> None:
    from dataclasses import dataclass

    @dataclass
    class Point:
        x: int

    with pytest.raises(NotSerializable):
        await store.create(new_session("alice", data={"p": Point(1)}))


async def test_size_limit_one_byte_over(harness: Harness, clock: Any) -> None:
    from asyncsession import codec

    probe = await harness.controlled(cfg(max_session_size=0))
    s = await probe.create(new_session("bob", data={"blob": "x" * 100}, now=clock()))
    got = await probe.get(s.id)
    limit = len(
        codec.encode(replace(got, id=probe.handle(got.id)))
    )  # the record as stored  # exactly the size of a 100-char blob
    events: list[ViolationEvent] = []
    store = await harness.controlled(
        cfg(max_session_size=limit), options={"on_violation": events.append}
    )
    fits = new_session("bob", data={"blob": "x" * 100}, now=clock())
    await store.create(fits)
    over = new_session("bob", data={"blob": "x" * 101}, now=clock())
    with pytest.raises(SessionTooLarge) as info:
        await store.create(over)
    assert info.value.code is ErrorCode.SESSION_SIZE_EXCEEDED and info.value.http_status == 413
    assert info.value.details["limit"] == limit
    assert info.value.details["size"] == limit + 1
    assert [e.type for e in events] == ["size_exceeded"]
    fits.data["blob"] = "x" * 101
    with pytest.raises(SessionTooLarge):
        await store.update(fits)
    got = await store.get(fits.id)
    assert got.data == {"blob": "x" * 100} and got.version == 0


@pytest.mark.parametrize(
    "bad_id", ["", "*", "a\nb", "x" * 10_000, "short", "a b c d e f g h i j", "k*" * 20, None, 123]
)
async def test_malformed_ids_rejected_before_backend(store: ControlledStore, bad_id: Any) -> None:
    for call in (store.get, store.touch, store.rotate, store.delete):
        with pytest.raises(InvalidSession) as info:
            await call(bad_id)
        assert info.value.code is ErrorCode.SESSION_INVALID
        assert info.value.http_status == 400
        assert "x" * 200 not in str(info.value)


async def test_bad_sessions_rejected(store: ControlledStore) -> None:
    before = await store.create(new_session("alice", data={"k": 1}))
    with pytest.raises(InvalidSession):
        await store.create(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidSession):
        await store.update(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidSession):
        await store.create(new_session(""))
    bad = new_session("alice")
    bad.id = "bad id!"
    with pytest.raises(InvalidSession):
        await store.create(bad)
    with pytest.raises(InvalidSession):
        await store.list_by_user("")
    with pytest.raises(InvalidSession):
        await store.delete_by_user(None)
    assert [s.id for s in await store.list_by_user("alice")] == [store.handle(before.id)]
    assert (await store.get(before.id)).data == {"k": 1}


async def test_violation_logging_never_shows_full_id(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    store = await harness.controlled(cfg(site_id="a", max_sessions_per_user=1, eviction="reject"))
    other = with_controls(store.store, cfg(site_id="b"))
    s = await store.create(new_session("alice"))
    caplog.set_level(logging.INFO, logger="asyncsession")
    with pytest.raises(SessionLimitExceeded):
        await store.create(new_session("alice"))
    with pytest.raises(SessionNotFound):
        await other.get(s.id)
    stale = await store.get(s.id)
    await store.update(await store.get(s.id))
    with pytest.raises(SessionConflict):
        await store.update(stale)
    records = [r for r in caplog.records if r.name == "asyncsession"]
    kinds = [getattr(r, "violation", None) for r in records]
    assert kinds == ["session_limit_exceeded", "site_mismatch", "conflict"]
    # a conflict is what parallel tabs cause in normal use: INFO (rate-limited as well)
    assert [r.levelname for r in records] == ["WARNING", "WARNING", "INFO"]
    for r in records:
        assert s.id not in r.getMessage()
        assert s.id not in repr(r.__dict__)
        assert r.code in {c.value for c in ErrorCode}  # type: ignore[attr-defined]
    assert records[1].session == s.short_id  # type: ignore[attr-defined]


async def test_async_and_raising_handlers(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    async def async_handler(event: ViolationEvent) -> None:
        await asyncio.sleep(0)
        seen.append(event.type)

    store = await harness.controlled(cfg(), options={"on_violation": async_handler})
    with pytest.raises(InvalidSession):
        await store.get("*")
    await store.drain()
    assert seen == ["invalid_session"]

    def broken(event: ViolationEvent) -> None:
        raise RuntimeError("handler bug")

    store2 = await harness.controlled(cfg(), options={"on_violation": broken})
    caplog.set_level(logging.ERROR, logger="asyncsession")
    with pytest.raises(InvalidSession):  # the original error, not the handler's
        await store2.get("*")
    assert any("handler raised" in r.getMessage() for r in caplog.records)
    s = await store2.create(new_session("alice"))  # the store still works
    assert (await store2.get(s.id)).id == s.id


# ------------------------------------------------------------------------- lifecycle


async def test_operations_after_close(harness: Harness) -> None:
    store = await harness.controlled(cfg())
    s = await store.create(new_session("alice"))
    await store.close()
    await store.close()  # idempotent
    calls = [
        store.create(new_session("bob")),
        store.get(s.id),
        store.update(s),
        store.touch(s.id),
        store.rotate(s.id),
        store.delete(s.id),
        store.delete_by_user("alice"),
        store.list_by_user("alice"),
        store.purge_expired(),
    ]
    for call in calls:
        with pytest.raises(StoreClosed) as info:
            await call
        assert info.value.code is ErrorCode.STORE_CLOSED and info.value.http_status == 503


async def test_async_context_manager_and_background_cleanup(harness: Harness, clock: Any) -> None:
    raw = await harness.raw(cfg(cleanup_interval=0.01))
    store = with_controls(raw, cfg(cleanup_interval=0.01))
    async with store:
        s = await store.create(new_session("alice", 5, now=clock()))
        keep = await store.create(new_session("alice", 500, now=clock()))
        task = raw._cleanup_task
        assert task is not None and not task.done()
        clock.advance(6)
        for _ in range(500):  # the cleanup task runs on its own; wait for it, bounded
            await asyncio.sleep(0.01)
            if await raw._load(s.id) is None:
                break
        assert await raw._load(s.id) is None
        assert (await store.get(keep.id)).id == keep.id
    assert task.done()
    assert raw.closed and store.closed
    pending = [t for t in asyncio.all_tasks() if "asyncsession" in t.get_name()]
    assert pending == []


async def test_errors_are_session_errors_with_codes() -> None:
    from asyncsession import http_status

    assert {c: http_status[c] for c in ErrorCode} == {
        ErrorCode.SESSION_NOT_FOUND: 404,
        ErrorCode.SESSION_EXPIRED: 401,
        ErrorCode.SESSION_INVALID: 400,
        ErrorCode.SESSION_SIZE_EXCEEDED: 413,
        ErrorCode.SESSION_NOT_SERIALIZABLE: 400,
        ErrorCode.SESSION_LIMIT_EXCEEDED: 429,
        ErrorCode.SESSION_SITE_MISMATCH: 404,
        ErrorCode.STORE_CLOSED: 503,
        ErrorCode.SESSION_CONFLICT: 409,
        ErrorCode.STORE_UNAVAILABLE: 503,
        ErrorCode.SESSION_ROTATED: 409,
        ErrorCode.SESSION_CORRUPT: 404,
        ErrorCode.SESSION_ENDED: 404,
    }
    assert issubclass(SessionRotated, SessionNotFound)
    assert issubclass(SessionEnded, SessionNotFound)
    assert issubclass(SessionCorrupt, SessionNotFound)
    assert issubclass(SessionExpired, SessionError)
