"""The optional admin scan hook (``Store._scan``) on every backend."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from asyncsession import Config, MemoryStore, new_session, with_controls
from asyncsession.store import ScanEntry, Store

from . import backend_redis
from .conftest import Harness

CFG = Config(cleanup_interval=0)


async def scan_all(store: Store, batch: int = 3) -> list[ScanEntry]:
    if store.backend_name == "redis":  # SCAN walks the whole database, others' keys too
        batch = 1000
    out: list[ScanEntry] = []
    async for chunk in store._scan(batch):
        assert len(chunk) <= batch or store.backend_name == "redis"  # SCAN COUNT is a hint
        out.extend(chunk)
    return out


async def test_scan_sees_every_site_user_and_expired(harness: Harness) -> None:
    backend = await harness.raw(CFG)
    a = with_controls(backend, replace(CFG, site_id="a"))
    b = with_controls(backend, replace(CFG, site_id="b"))
    now = harness.clock()
    made = {}
    for i in range(10):
        s = new_session(f"user{{%}}{i % 3}", 60, now=now)  # braces and % survive Redis keys
        s.data["blob"] = "x" * (i * 10)
        made[a.handle((await a.create(s)).id)] = s
    anon = await b.create(new_session(None, 5, now=now))
    made[b.handle(anon.id)] = anon
    forever = new_session("eve", now=now)
    made[b.handle((await b.create(forever)).id)] = forever
    # the default site is "": a Redis Cluster scan once dropped it as a missing site
    default = with_controls(backend, replace(CFG, site_id=""))
    plain = await default.create(new_session("dan", 60, now=now))
    made[default.handle(plain.id)] = plain
    harness.clock.advance(10)  # anon has expired but is not purged
    entries = await scan_all(a)  # through the controls: all sites, not only a's
    ids = [e.session_id for e in entries]
    if backend.backend_name == "redis" and not backend_redis.using_fakeredis():
        # SCAN may return a key twice while Redis resizes its table (docs/operations.md)
        assert set(ids) == set(made)
    else:
        assert sorted(ids) == sorted(made)
    for e in entries:
        s = made[e.session_id]
        assert (e.site_id, e.user_id) == (s.site_id, s.user_id)
        assert e.expires_at == s.expires_at
        data = len(orjson.dumps(s.data))
        if backend.backend_name == "redis":  # the whole record: data plus its header
            assert data < e.size < data + 400
        else:
            assert e.size == data
    expired = next(e for e in entries if e.session_id == b.handle(anon.id)).expires_at
    assert expired is not None and expired < harness.clock()
    estimate = await a._scan_estimate()
    assert estimate is not None and 11 <= estimate <= 13


async def test_scan_of_empty_store(harness: Harness) -> None:
    store = await harness.controlled(CFG)
    assert await scan_all(store) == []


async def test_scan_is_optional() -> None:
    class Bare(MemoryStore):
        _scan = Store._scan
        _scan_estimate = Store._scan_estimate

    store = Bare(CFG)
    with pytest.raises(NotImplementedError, match="cannot scan"):
        store._scan(10)
    assert await store._scan_estimate() is None
