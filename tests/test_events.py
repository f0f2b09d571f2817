"""Lifecycle events (``on_event``) on every backend, above all ``expired`` from purges."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from asyncsession import Config, SessionEvent, new_session, short_hash, with_controls
from asyncsession.store import Store

from .conftest import Harness

CFG = Config(site_id="site-a", max_sessions_per_user=2, cleanup_interval=0)


async def test_every_lifecycle_event(harness: Harness) -> None:
    events: list[SessionEvent] = []
    store = await harness.controlled(CFG, options={"on_event": events.append})
    a = await store.create(new_session("alice", 60, now=harness.clock()))
    b = await store.create(new_session("alice", 60, now=harness.clock()))
    c = await store.create(new_session("alice", 60, now=harness.clock()))  # evicts a (oldest)
    loaded = await store.get(b.id)
    loaded.data["n"] = 1
    await store.update(loaded)
    new_b = await store.rotate(b.id)
    await store.delete(new_b)
    short = await store.create(new_session("bob", 5, now=harness.clock()))
    harness.clock.advance(6)
    assert await store.purge_expired() == 1
    await store.delete_by_user("alice")
    assert [(e.type, e.session) for e in events] == [
        ("created", short_hash(a.id)),
        ("created", short_hash(b.id)),
        ("created", short_hash(c.id)),
        ("evicted", short_hash(a.id)),
        ("updated", short_hash(b.id)),
        ("rotated", short_hash(new_b)),
        ("deleted", short_hash(new_b)),
        ("created", short_hash(short.id)),
        ("expired", short_hash(short.id)),
        ("deleted", short_hash(c.id)),
    ]
    assert all(e.site_id == "site-a" for e in events)
    expired = events[8]
    assert expired.user_id == "bob" and expired.at == harness.clock()
    assert events[3].user_id == "alice"
    for event in events:  # never a full id anywhere in an event
        for sid in (a.id, b.id, c.id, new_b, short.id):
            assert sid not in repr(event)


async def test_expired_events_per_site_and_anonymous(harness: Harness) -> None:
    backend = await harness.raw(CFG)
    seen: dict[str, list[SessionEvent]] = {"a": [], "b": [], "quiet": []}
    a = with_controls(backend, replace(CFG, site_id="a"), on_event=seen["a"].append)
    b = with_controls(backend, replace(CFG, site_id="b"), on_event=seen["b"].append)
    quiet = with_controls(backend, replace(CFG, site_id="quiet"))
    sa = await a.create(new_session("ann", 5, now=harness.clock()))
    sb = await b.create(new_session(None, 5, now=harness.clock()))
    sq = await quiet.create(new_session("quinn", 5, now=harness.clock()))
    await a.create(new_session("ann", 3600, now=harness.clock()))  # stays
    for events in seen.values():
        events.clear()
    harness.clock.advance(10)
    assert await quiet.purge_expired() == 3  # purge is global; each site hears its own
    assert [(e.type, e.user_id, e.session) for e in seen["a"]] == [
        ("expired", "ann", short_hash(sa.id))
    ]
    assert [(e.type, e.user_id, e.session) for e in seen["b"]] == [
        ("expired", None, short_hash(sb.id))
    ]
    assert sq.id  # quiet has no handler: nothing to hear
    assert await a.purge_expired() == 0
    assert len(seen["a"]) == 1


async def test_background_cleanup_reports_expired(harness: Harness) -> None:
    """The backend's own cleanup (not the controlled store) purges: events still arrive."""
    events: list[SessionEvent] = []
    store = await harness.controlled(CFG, options={"on_event": events.append})
    s = await store.create(new_session("carol", 5, now=harness.clock()))
    harness.clock.advance(6)
    assert await store.store.purge_expired() == 1  # what the cleanup task calls
    assert [(e.type, e.session) for e in events][-1] == ("expired", short_hash(s.id))


async def test_async_handler_receives_expired(harness: Harness) -> None:
    got: list[str] = []

    async def handler(event: SessionEvent) -> None:
        await asyncio.sleep(0)
        got.append(f"{event.type}:{event.user_id}")

    store = await harness.controlled(CFG, options={"on_event": handler})
    await store.create(new_session("dave", 5, now=harness.clock()))
    harness.clock.advance(6)
    await store.purge_expired()
    await store.drain()
    assert got == ["created:dave", "expired:dave"]


async def test_raising_handler_is_logged_and_harmless(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: SessionEvent) -> None:
        raise RuntimeError("handler bug")

    async def broken_async(event: SessionEvent) -> None:
        raise RuntimeError("async handler bug")

    caplog.set_level(logging.ERROR, logger="asyncsession")
    for handler in (broken, broken_async):
        store = await harness.controlled(CFG, options={"on_event": handler})
        s = await store.create(new_session("erin", 5, now=harness.clock()))
        harness.clock.advance(6)
        assert await store.purge_expired() == 1
        await store.drain()
        with pytest.raises(Exception, match="not found"):
            await store.get(s.id)
    messages = [r.getMessage() for r in caplog.records]
    assert any("expired handler raised" in m for m in messages)
    assert sum("handler raised" in m for m in messages) >= 4  # created + expired, twice


async def test_purge_stays_plain_without_handlers(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No on_event handler: the backend's cheap count-only purge runs, never the report."""
    store = await harness.controlled(CFG)
    backend = store.store

    async def refuse(self: Store, now: object) -> list[object]:
        raise AssertionError("_purge_report used without a listener")

    monkeypatch.setattr(type(backend), "_purge_report", refuse)
    await store.create(new_session("fay", 5, now=harness.clock()))
    harness.clock.advance(6)
    assert await store.purge_expired() == 1
    store.on_event = lambda e: None  # set later: now the report is needed
    monkeypatch.undo()
    await store.create(new_session("fay", 5, now=harness.clock()))
    harness.clock.advance(6)
    assert await store.purge_expired() == 1


async def test_backend_without_report_falls_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that lacks the optional hook still purges; there are just no events."""
    events: list[SessionEvent] = []
    store = await harness.controlled(CFG, options={"on_event": events.append})
    monkeypatch.setattr(type(store.store), "_purge_report", Store._purge_report)
    await store.create(new_session("gus", 5, now=harness.clock()))
    harness.clock.advance(6)
    assert await store.purge_expired() == 1
    assert [e.type for e in events] == ["created"]


def test_a_corrupt_record_replayed_is_rate_limited_other_invalid_sessions_are_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A damaged record a cookie points to (``invalid_session`` with ``corrupt``): a
    client can replay it at will, so one WARNING per interval, then DEBUG; every one
    still reaches ``on_violation``. Other ``invalid_session`` violations (the app's
    own bad input) stay WARNING each."""
    from asyncsession import InvalidSession, MemoryStore, ViolationEvent

    seen: list[ViolationEvent] = []
    store = with_controls(MemoryStore(Config(cleanup_interval=0)), on_violation=seen.append)
    with caplog.at_level(logging.DEBUG, "asyncsession"):
        for _ in range(200):
            store._violation(
                "invalid_session", InvalidSession("bad record", details={"corrupt": True}), None
            )
        for _ in range(3):
            store._violation("invalid_session", InvalidSession("bad input"), None)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("bad record" in m for m in loud) == 1
    assert sum("bad input" in m for m in loud) == 3
    assert len(seen) == 203
