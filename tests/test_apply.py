"""``Store.apply`` (key-level changes with expectations), on every backend."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
import pytest

from asyncsession import (
    ABSENT,
    Changes,
    ControlledStore,
    InvalidSession,
    NotSerializable,
    SessionConflict,
    SessionEvent,
    SessionExpired,
    SessionNotFound,
    SessionTooLarge,
    ViolationEvent,
    codec,
    new_session,
)

from .conftest import Harness
from .test_conformance import PAYLOAD, cfg

TRICKY: dict[str, Any] = {
    **PAYLOAD,
    'q"uo\\te': 'a"b\\c}{][,:',
    "nested": {"a": [{"b": {}}, [], [[{}]], "}"], "": None},
    "max": 2**64 - 1,
    "min": -(2**63),
    "beyond53": 2**53 + 1,
    "esc": "\u0000\u001f\u2028\ud7ff",
    "d": {"d": "d"},
}


async def test_apply_sets_deletes_and_keeps_other_keys(store: ControlledStore, clock: Any) -> None:
    s = await store.create(new_session("alice", data=TRICKY, now=clock()))
    clock.advance(3)
    applied = await store.apply(
        s.id,
        Changes(
            set={"new": {"x": [1, {}, []]}, "role": "user", "big": 2**64 - 1},
            delete=["cart", "not-there"],
            expect={"role": "admin", "cart": TRICKY["cart"], "new": ABSENT},
        ),
    )
    assert applied.version == 1 and applied.updated_at == clock()
    got = await store.get(s.id)
    expected = {k: v for k, v in TRICKY.items() if k != "cart"}
    expected.update(new={"x": [1, {}, []]}, role="user", big=2**64 - 1)
    assert got.data == expected
    assert orjson.dumps(got.data) == orjson.dumps(expected)  # types and order too
    assert got.version == 1 and got.updated_at == clock() and got.last_accessed_at == clock()
    assert got.created_at == s.created_at and got.user_id == "alice"
    assert got.expires_at == s.expires_at == applied.expires_at


@pytest.mark.parametrize(
    "expect",
    [
        {"role": "user"},
        {"role": ABSENT},
        {"absent": None},
        {"absent": ""},
        {"big": 2**63 - 1},
        {"float": 1e-300 * 10},
        {"empty_list": {}},
        {"empty_obj": []},
        {"prefs": {"theme": "dark", "lang": "en", "tz": None, "beta": 1}},
        {"roles": ["editor", "admin"]},
    ],
)
async def test_apply_conflict_writes_nothing(
    store: ControlledStore, clock: Any, expect: dict[str, Any]
) -> None:
    s = await store.create(new_session("alice", data=PAYLOAD, now=clock()))
    with pytest.raises(SessionConflict) as info:
        await store.apply(s.id, Changes(set={"k": 1}, delete=["role"], expect=expect))
    assert info.value.http_status == 409
    got = await store.get(s.id)
    assert got.data == PAYLOAD and got.version == 0


async def test_apply_expectations_match_values_as_read(store: ControlledStore) -> None:
    s = await store.create(new_session(None, data=TRICKY))
    got = await store.get(s.id)
    # every key, as read back, is what the store compares against
    expect = dict(got.data)
    expect["absent"] = ABSENT
    expect["frag"] = ABSENT
    await store.apply(s.id, Changes(set={"frag": 1}, expect=expect))
    await store.apply(s.id, Changes(set={"frag": 2}, expect={"frag": orjson.Fragment(b"1")}))
    assert (await store.get(s.id)).data["frag"] == 2


async def test_update_at_old_version_conflicts_after_apply(store: ControlledStore) -> None:
    s = await store.create(new_session("alice", data={"a": 1}))
    await store.apply(s.id, Changes(set={"b": 2}))
    s.data["a"] = 5
    with pytest.raises(SessionConflict):
        await store.update(s)
    fresh = await store.get(s.id)
    fresh.data["a"] = 5
    await store.update(fresh)
    assert (await store.get(s.id)).data == {"a": 5, "b": 2}
    assert fresh.version == 2


async def test_apply_missing_expired_other_site(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg())
    other = await harness.controlled(cfg(site_id="site-b"))
    with pytest.raises(SessionNotFound):
        await store.apply("x" * 43, Changes(set={"a": 1}))
    s = await store.create(new_session("alice", timedelta(minutes=1), data={"a": 0}))
    with pytest.raises(SessionNotFound):
        await other.apply(s.id, Changes(set={"a": 1}))
    await store.delete(s.id)
    with pytest.raises(SessionNotFound):
        await store.apply(s.id, Changes(set={"a": 1}))
    s = await store.create(new_session("alice", timedelta(minutes=1), data={"a": 0}, now=clock()))
    clock.advance(61)
    with pytest.raises(SessionExpired):
        await store.apply(s.id, Changes(set={"a": 1}))
    clock.advance(-61)
    assert (await store.get(s.id)).data == {"a": 0}


async def test_apply_slides_idle_expiry_not_past_absolute(harness: Harness, clock: Any) -> None:
    store = await harness.controlled(cfg(idle_timeout=60))
    s = await store.create(new_session("alice", timedelta(seconds=100), now=clock()))
    clock.advance(30)
    applied = await store.apply(s.id, Changes(set={"a": 1}))
    assert applied.expires_at == clock() + timedelta(seconds=60)
    got = await store.get(s.id)
    assert got.expires_at == applied.expires_at and got.last_accessed_at == clock()
    clock.advance(50)  # 80 s: the absolute deadline (100 s) caps the slide
    applied = await store.apply(s.id, Changes(set={"a": 2}))
    assert applied.expires_at == s.created_at + timedelta(seconds=100)
    assert (await store.get(s.id)).expires_at == applied.expires_at
    clock.advance(21)
    with pytest.raises(SessionExpired):
        await store.get(s.id)


async def test_apply_size_limit_on_whole_record(harness: Harness, clock: Any) -> None:
    probe = await harness.controlled(cfg(max_session_size=0))
    p = await probe.create(new_session("bob", data={"blob": "x" * 99}, now=clock()))
    await probe.apply(p.id, Changes(set={"blob": "x" * 100}))
    got = await probe.get(p.id)
    limit = len(codec.encode(replace(got, id=probe.handle(got.id))))  # the record as stored
    events: list[ViolationEvent] = []
    store = await harness.controlled(
        cfg(max_session_size=limit), options={"on_violation": events.append}
    )
    s = await store.create(new_session("bob", data={"blob": "x" * 99}, now=clock()))
    await store.apply(s.id, Changes(set={"blob": "x" * 100}))  # exactly at the limit
    with pytest.raises(SessionTooLarge) as info:
        await store.apply(s.id, Changes(set={"blob": "x" * 101}))
    assert info.value.details["limit"] == limit and info.value.http_status == 413
    assert [e.type for e in events] == ["size_exceeded"]
    got = await store.get(s.id)
    assert got.data == {"blob": "x" * 100} and got.version == 1


async def test_apply_bad_values_and_keys(store: ControlledStore) -> None:
    s = await store.create(new_session(None, data={"a": 1}))
    with pytest.raises(NotSerializable) as info:
        await store.apply(s.id, Changes(set={"cart": [1, {"when": {1, 2}}]}))
    assert info.value.details["path"] == 'data["cart"][1]["when"]'
    with pytest.raises(NotSerializable):
        await store.apply(s.id, Changes(set={"t": (1, 2)}))
    with pytest.raises(InvalidSession):
        await store.apply(s.id, Changes(set={1: 1}))  # type: ignore[dict-item]
    with pytest.raises(InvalidSession):
        await store.apply(s.id, Changes(set={"a": 1}, delete=["a"]))
    with pytest.raises(InvalidSession):
        await store.apply(s.id, {"a": 1})  # type: ignore[arg-type]
    assert (await store.get(s.id)).data == {"a": 1}


async def test_the_key_that_marks_encrypted_data_is_reserved(store: ControlledStore) -> None:
    """Data whose only key is "\\x00enc" reads back as encrypted data: a session
    holding it (an app storing client-chosen key names) was locked for good (503 on
    every request, or refused merges). Writing that key is refused as data the store
    cannot hold (a client-triggerable violation, logged rate-limited), as a create or a
    change; nothing stored changes."""
    with pytest.raises(NotSerializable, match="reserved"):
        await store.create(new_session(None, data={"\x00enc": "draft"}))
    s = await store.create(new_session(None, data={"a": 1}))
    with pytest.raises(NotSerializable, match="reserved"):
        await store.apply(s.id, Changes(set={"\x00enc": "draft"}))
    with pytest.raises(NotSerializable, match="reserved"):
        await store.update(replace(s, data={"\x00enc": 1, "a": 1}))
    assert (await store.get(s.id)).data == {"a": 1}


async def test_apply_refuses_changes_of_the_wrong_shape(store: ControlledStore) -> None:
    """A str is a Collection of its letters: ``delete="cart"`` deleted the keys "c",
    "a", "r" and "t" and left "cart". Each wrong shape is refused before anything is
    written, with no raw AttributeError or TypeError."""
    data = {"cart": [1], "c": 1, "a": 2, "r": 3, "t": 4}
    s = await store.create(new_session(None, data=data))
    wrong: list[Any] = [
        Changes(delete="cart"),
        Changes(delete=b"cart"),  # type: ignore[arg-type]
        Changes(delete=5),  # type: ignore[arg-type]
        Changes(delete=[["cart"]]),  # type: ignore[list-item]
        Changes(set=[("cart", 2)]),  # type: ignore[arg-type]
        Changes(expect=[("cart", [1])]),  # type: ignore[arg-type]
    ]
    for changes in wrong:
        with pytest.raises(InvalidSession, match="Changes") as info:
            await store.apply(s.id, changes)
        assert info.value.code == "SESSION_INVALID"
    got = await store.get(s.id)
    assert got.data == data and got.version == s.version
    await store.apply(s.id, Changes(delete={"c", "a"}))  # any collection of str
    assert (await store.get(s.id)).data == {"cart": [1], "r": 3, "t": 4}


async def test_apply_events(harness: Harness) -> None:
    events: list[SessionEvent] = []
    violations: list[ViolationEvent] = []
    store = await harness.controlled(
        cfg(), options={"on_event": events.append, "on_violation": violations.append}
    )
    s = await store.create(new_session("alice"))
    await store.apply(s.id, Changes(set={"a": 1}))
    with pytest.raises(SessionConflict):
        await store.apply(s.id, Changes(set={"a": 2}, expect={"a": 0}))
    assert [e.type for e in events] == ["created", "updated"]
    assert [v.type for v in violations] == ["conflict"]
    assert s.id not in repr(events) + repr(violations)


async def test_hundreds_of_concurrent_writers_of_different_keys(store: ControlledStore) -> None:
    s = await store.create(new_session(None, data={"shared": 0}))

    async def writer(i: int) -> None:
        # each reads its own key (absent) and depends on it: still never a conflict
        await store.apply(s.id, Changes(set={f"k{i}": i}, expect={f"k{i}": ABSENT}))

    await asyncio.gather(*(writer(i) for i in range(300)))
    got = await store.get(s.id)
    assert got.data == {"shared": 0, **{f"k{i}": i for i in range(300)}}
    assert got.version == 300


async def test_same_key_with_expectations_one_winner_per_round(store: ControlledStore) -> None:
    s = await store.create(new_session(None, data={"n": 0}))
    for round_ in range(5):
        current = (await store.get(s.id)).data["n"]
        assert current == round_

        async def bump(current: int) -> int:
            try:
                await store.apply(s.id, Changes(set={"n": current + 1}, expect={"n": current}))
            except SessionConflict:
                return 0
            return 1

        results = await asyncio.gather(*(bump(current) for _ in range(50)))
        assert sum(results) == 1
    assert (await store.get(s.id)).data == {"n": 5}


async def test_apply_with_base_writes_whole_record_or_merges(
    store: ControlledStore, clock: Any
) -> None:
    s = await store.create(new_session("alice", data=TRICKY, now=clock()))
    base = await store.get(s.id)
    clock.advance(2)
    # nothing written since base: a backend may write the record built from base
    await store.apply(s.id, Changes(set={"role": "x"}, expect={"role": "admin"}), base=base)
    got = await store.get(s.id)
    assert orjson.dumps(got.data) == orjson.dumps({**TRICKY, "role": "x"})
    assert got.version == 1 and got.updated_at == clock()
    # base is stale now (version 0): the changes merge with what is stored
    await store.apply(s.id, Changes(set={"new": [1]}, delete=["cart"]), base=base)
    expected = {k: v for k, v in TRICKY.items() if k != "cart"}
    expected.update(role="x", new=[1])
    got = await store.get(s.id)
    assert orjson.dumps(got.data) == orjson.dumps(expected) and got.version == 2
    with pytest.raises(SessionConflict):  # and stale expectations are still checked
        await store.apply(s.id, Changes(set={"role": "y"}, expect={"role": "admin"}), base=base)
    assert (await store.get(s.id)).data["role"] == "x"


async def test_apply_is_counted_by_instrument(harness: Harness) -> None:
    from asyncsession.instrument import instrument, metrics

    events: list[SessionEvent] = []
    store = instrument(
        await harness.controlled(cfg(max_session_size=400), options={"on_event": events.append}),
        latency_samples_per_second=None,
    )
    s = await store.create(new_session("alice", data={"n": 0}))
    await store.apply(s.id, Changes(set={"n": 1}, expect={"n": 0}))
    with pytest.raises(SessionConflict):
        await store.apply(s.id, Changes(set={"n": 2}, expect={"n": 0}))
    with pytest.raises(SessionTooLarge):
        await store.apply(s.id, Changes(set={"blob": "x" * 500}))
    stats = metrics(store)
    assert stats is not None
    apply = stats.operations["apply"]
    assert apply.calls == 3 and apply.timed == 3
    assert apply.outcomes() == {
        "ok": 1,
        "session_conflict": 1,
        "session_size_exceeded": 1,
    }
    assert stats.violations == {"conflict": 1, "size_exceeded": 1}
    assert stats.events.get("updated") == 1
    assert [e.type for e in events] == ["created", "updated"]
