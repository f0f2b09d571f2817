"""MemoryStore specifics: purge cost and fairness, independence of copies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncsession import Config, MemoryStore, new_session
from asyncsession.backends import memory

from .clock import FakeClock


async def test_purge_visits_only_expired(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore(Config(cleanup_interval=0), clock=clock)
    for i in range(5_000):
        await store.create(new_session(f"u{i % 50}", 3600, now=clock()))
    for i in range(100):
        await store.create(new_session(None if i % 2 else f"u{i}", 10, now=clock()))
    touched: list[str] = []
    original = MemoryStore._remove

    def counting(self: MemoryStore, session_id: str) -> Any:
        touched.append(session_id)
        return original(self, session_id)

    monkeypatch.setattr(MemoryStore, "_remove", counting)
    clock.advance(11)
    assert await store.purge_expired() == 100
    assert len(touched) == 100
    assert len(store) == 5_000
    assert not store._buckets or min(store._bucket_keys) > clock().timestamp()
    await store.close()


async def test_purge_yields_between_batches(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "PURGE_BATCH", 100)
    store = MemoryStore(Config(cleanup_interval=0), clock=clock)
    for _ in range(1_000):
        await store.create(new_session("u", 5, now=clock()))
    clock.advance(6)
    ticks = 0
    done = False

    async def probe() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0)
    removed = await store.purge_expired()
    done = True
    await task
    assert removed == 1_000 and len(store) == 0
    assert ticks >= 9  # the loop ran between the ten batches
    assert store._users == {}
    await store.close()


async def test_rotate_then_purge_removes_new_id(clock: FakeClock) -> None:
    store = MemoryStore(Config(cleanup_interval=0), clock=clock)
    s = await store.create(new_session("u", 5, now=clock()))
    new_id = await store.rotate(s.id)
    clock.advance(6)
    assert await store.purge_expired() == 1
    assert len(store) == 0 and store._users == {}
    assert new_id not in store._entries


async def test_touch_moves_expiry_bucket(clock: FakeClock) -> None:
    store = MemoryStore(Config(cleanup_interval=0, idle_timeout=10), clock=clock)
    s = await store.create(new_session("u", 1000, now=clock()))
    for _ in range(5):
        clock.advance(8)
        await store.touch(s.id)
    assert await store.purge_expired() == 0
    clock.advance(11)
    assert await store.purge_expired() == 1


async def test_delete_by_user_touches_only_that_user(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore(Config(cleanup_interval=0), clock=clock)
    for i in range(2_000):
        await store.create(new_session(f"other{i}"))
    mine = [await store.create(new_session("me")) for _ in range(3)]
    removed: list[str] = []
    original = MemoryStore._remove

    def counting(self: MemoryStore, session_id: str) -> Any:
        removed.append(session_id)
        return original(self, session_id)

    monkeypatch.setattr(MemoryStore, "_remove", counting)
    assert await store.delete_by_user("me") == 3
    assert sorted(removed) == sorted(store.handle(s.id) for s in mine)
    assert len(store) == 2_000


async def test_stored_sessions_cost_little_beyond_their_record() -> None:
    """Memory held per session, beyond its encoded record, stays far under 1 KB. (A
    bytes object straight from orjson.dumps keeps orjson's ~8 KiB write buffer; the
    store must keep exact-size copies.)"""
    import gc
    import random
    import string
    import tracemalloc

    from asyncsession import codec

    rng = random.Random(3)
    token = "".join(rng.choice(string.ascii_letters) for _ in range(600))
    data = {"roles": ["member", "editor"], "token": token, "cart": [{"sku": i} for i in range(5)]}
    async with MemoryStore.with_controls(Config(cleanup_interval=0)) as store:
        sessions = [new_session(f"user-{n // 2}", 3600, data=data) for n in range(2000)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for s in sessions:
                await store.create(s)
            for s in sessions[:500]:  # updates replace the stored bytes
                s.data["n"] = 1
                await store.update(s)
            gc.collect()
            held = (tracemalloc.get_traced_memory()[0] - before) / len(sessions)
        finally:
            tracemalloc.stop()
        record = len(codec.encode(sessions[-1]))
        assert held - record < 1024, (held, record)


def test_a_memory_store_opens_where_no_asyncio_loop_runs() -> None:
    """Under trio (no asyncio loop running) the memory store still opens: the check
    that a store serves one event loop skips what it cannot ask (review: a
    RuntimeError 'no running event loop' from every ``async with MemoryStore()``)."""
    store = MemoryStore(Config(cleanup_interval=0))
    entering = store.__aenter__()
    with pytest.raises(StopIteration) as done:  # (driven by hand, as trio would)
        entering.send(None)
    assert done.value.value is store
    assert not store.closed
