"""Ids hashed at rest (docs/security.md), through the public API on every backend.

The raw-storage dumps of SQLite and Redis live with their backends' tests
(tests/test_sqlite.py, tests/test_redis*.py); here: what every backend shares
(handles are never ids, nothing logs or reports an id, sessions round-trip exactly
under every option) and the memory store's own dump.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncsession import (
    Changes,
    Config,
    InvalidSession,
    SessionEvent,
    SessionNotFound,
    ViolationEvent,
    generate_key,
    is_handle,
    new_session,
    session_handle,
    short_hash,
    with_controls,
)
from asyncsession.backends.memory import MemoryStore

from .conftest import Harness
from .test_asgi import client, cookie_id, make_app
from .test_model import json_data


def test_handle_shape_and_short_hash() -> None:
    session_id = new_session("alice").id
    handle = session_handle(session_id)
    assert len(handle) == 69 and handle[:4] == session_id[:4] and handle[4] == "."
    assert is_handle(handle) and not is_handle(session_id) and not is_handle(handle + "0")
    assert short_hash(handle) == short_hash(session_id) == handle[5:17]
    assert session_id not in handle and session_id[4:20] not in handle
    # deterministic, and different ids never share a handle
    assert session_handle(session_id) == handle
    assert session_handle(new_session("alice").id) != handle


async def test_a_handle_is_never_accepted_as_an_id(harness: Harness, clock: Any) -> None:
    store = await harness.controlled()
    s = await store.create(new_session("alice", data={"k": 1}, now=clock()))
    handle = store.handle(s.id)
    for call in (
        lambda: store.get(handle),
        lambda: store.touch(handle),
        lambda: store.rotate(handle),
        lambda: store.apply(handle, Changes(set={"k": 2})),
        lambda: store.update(replace(s, id=handle)),
    ):
        with pytest.raises(InvalidSession):
            await call()
    assert (await store.get(s.id)).data == {"k": 1}
    # what list_by_user shows, delete and delete_by_user(keep=) take
    (listed,) = await store.list_by_user("alice")
    assert listed.id == handle and listed.short_id == s.short_id and listed.data == {"k": 1}
    other = await store.create(new_session("alice", now=clock()))
    assert await store.delete_by_user("alice", keep=handle) == 1
    assert [x.id for x in await store.list_by_user("alice")] == [handle]
    with pytest.raises(SessionNotFound):
        await store.get(other.id)
    assert await store.delete(handle) is True
    assert await store.delete(handle) is False
    with pytest.raises(SessionNotFound):
        await store.get(s.id)


async def test_plain_ids_config_keeps_ids(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(Config(cleanup_interval=0, hash_ids=False))
    s = await store.create(new_session("alice", now=clock()))
    assert store.handle(s.id) == s.id
    assert [x.id for x in await store.list_by_user("alice")] == [s.id]
    with pytest.raises(InvalidSession):  # handles mean nothing to such a store
        await store.delete(session_handle(s.id))
    # a hashing store over the same storage does not see plain-id records as its own
    # unless it adopts them (memory keeps nothing across stores; see the backends' tests)
    assert (await store.get(s.id)).id == s.id


async def test_middleware_refuses_a_handle_as_a_cookie() -> None:
    store = MemoryStore.with_controls(Config(cleanup_interval=0))
    async with client(make_app(store)) as c:
        sid = cookie_id(await c.post("/set", params={"key": "secret", "value": "s3"}))
        stolen = store.handle(sid)  # as a dump of the storage shows it
        response = await c.get("/read", headers={"cookie": f"session={stolen}"})
        assert response.status_code == 200 and response.json() == {}
        response = await c.get("/read", headers={"cookie": f"session={sid}"})
        assert response.json() == {"secret": "s3"}


def _strings(root: Any) -> set[str]:
    """Every str and bytes reachable from ``root`` (dicts, sequences, objects with
    ``__dict__`` or ``__slots__``), as text."""
    seen: set[int] = set()
    found: set[str] = set()
    stack = [root]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, str):
            found.add(x)
        elif isinstance(x, bytes | bytearray | memoryview):
            found.add(bytes(x).decode("utf-8", "replace"))
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list | tuple | set | frozenset):
            stack.extend(x)
        elif isinstance(x, int | float | type(None)) or callable(x):
            continue
        else:
            for cls in type(x).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(x, name):
                        stack.append(getattr(x, name))
            stack.extend(getattr(x, "__dict__", {}).values())
    return found


async def _fill(store: Any, clock: Any) -> list[str]:
    """Sessions made by every operation that writes an id (with a per-user limit of 2:
    an eviction too); returns every id used."""
    ids: list[str] = []
    for user in ("alice", "alice", "alice", "bob", None):
        s = await store.create(new_session(user, 60, data={"token": "tok-secret"}, now=clock()))
        ids.append(s.id)
    ids.append(await store.rotate(ids[1]))
    fresh = new_session("carol", 60, now=clock())
    await store.rotate_into(ids[4], fresh)
    ids.append(fresh.id)
    await store.delete_by_user("alice", keep=ids[2])
    clock.advance(120)
    await store.purge_expired()
    s = await store.create(new_session("dave", data={"token": "tok-secret"}, now=clock()))
    ids.append(s.id)
    await store.touch(s.id)
    await store.apply(s.id, Changes(set={"n": 1}))
    return ids


async def test_memory_dump_holds_no_id(clock: Any) -> None:
    raw = MemoryStore(Config(cleanup_interval=0, max_sessions_per_user=2), clock=clock)
    ids = await _fill(with_controls(raw), clock)
    dump = "\n".join(_strings(raw))
    assert "tok-secret" in dump  # the walk does reach the stored data
    assert not [short_hash(i) for i in ids if i in dump]
    assert len(raw) > 0


async def test_memory_dump_check_finds_plain_ids(clock: Any) -> None:
    """The dump check can fail: with ``hash_ids=False`` it finds the ids."""
    raw = MemoryStore(Config(cleanup_interval=0, hash_ids=False), clock=clock)
    ids = await _fill(raw, clock)
    dump = "\n".join(_strings(raw))
    assert ids[-1] in dump


async def test_no_log_record_or_event_names_an_id(
    harness: Harness, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[SessionEvent | ViolationEvent] = []
    store = await harness.controlled(
        Config(cleanup_interval=0, max_sessions_per_user=2),
        options={"on_event": events.append, "on_violation": events.append},
    )
    other_site = await harness.controlled(Config(site_id="elsewhere", cleanup_interval=0))
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    ids = await _fill(store, clock)
    s = await store.create(new_session("erin", now=clock()))
    ids.append(s.id)
    stale = await store.get(s.id)
    await store.apply(s.id, Changes(set={"a": 1}))
    stale.data["a"] = 2
    with pytest.raises(Exception, match="concurrently"):
        await store.update(stale)
    with pytest.raises(SessionNotFound):
        await other_site.get(s.id)  # a site mismatch violation
    rotated = await store.create(new_session("erin", now=clock()))
    ids.append(rotated.id)
    ids.append(await store.rotate(rotated.id))
    with pytest.raises(SessionNotFound):
        await store.get(rotated.id)  # a "rotated" violation
    if hasattr(store, "drain"):
        await store.drain()
    text = "\n".join(
        [r.getMessage() + repr(r.__dict__) for r in caplog.records] + [repr(e) for e in events]
    )
    assert events and caplog.records
    assert {e.type for e in events} >= {"created", "rotated", "deleted", "evicted", "expired"}
    assert not [short_hash(i) for i in ids if i in text]


KEY = generate_key()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=json_data,
    user=st.one_of(st.none(), st.text(min_size=1, max_size=20).filter(lambda u: "\x00" not in u)),
    agent=st.one_of(st.none(), st.text(max_size=30)),
    hash_ids=st.booleans(),
    encrypted=st.booleans(),
)
async def test_any_session_round_trips_under_every_option(
    harness: Harness,
    data: dict[str, Any],
    user: str | None,
    agent: str | None,
    hash_ids: bool,
    encrypted: bool,
) -> None:
    try:
        user_agent = None if agent is None else agent.encode("utf-8").decode()
    except UnicodeEncodeError:
        user_agent = None
    keys = [KEY] if encrypted else []
    store = await harness.controlled(
        Config(cleanup_interval=0, hash_ids=hash_ids, encryption_keys=keys)
    )
    now = harness.clock()
    s = new_session(user, timedelta(hours=1), data=data, now=now, user_agent=user_agent)
    try:
        created = await store.create(s)
    except InvalidSession:
        return  # a user id the store refuses (e.g. a lone surrogate) is not a round trip
    got = await store.get(created.id)
    assert got == created and got.data == data and got.id == s.id
    got.data["extra"] = [1, {"x": None}]
    await store.update(got)
    again = await store.get(s.id)
    assert again.data == {**data, "extra": [1, {"x": None}]} and again.version == 1
    await store.apply(s.id, Changes(set={"k": data}, delete=["extra"]))
    expected = {**data, "k": data}
    expected.pop("extra", None)
    again = await store.get(s.id)
    assert again.data == expected and again.version == 2
    if user is not None:
        listed = await store.list_by_user(user)
        assert [x.id for x in listed] == [store.handle(s.id)]
        assert replace(listed[0], id=s.id) == again
    await store.delete(s.id)
