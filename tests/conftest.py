from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from asyncsession import Config, ControlledStore, Store, with_controls

from .backends import Backend, available
from .clock import FakeClock
from .redis_servers import (  # noqa: F401  (fixtures: throwaway Cluster / Sentinel servers)
    private_cluster,
    redis_cluster,
    redis_sentinel,
    redis_servers_cleanup,
)

BACKENDS = available()


@pytest.fixture(autouse=True)
def fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware's rate limits on client-triggered and outage log records start
    afresh in every test: a record one test expects is not suppressed because an
    earlier test logged its kind within the interval."""
    from asyncsession.asgi import middleware as asgi
    from asyncsession.controls import LogLimiter

    monkeypatch.setattr(asgi, "_log_limit", LogLimiter())
    monkeypatch.setattr(asgi, "_outages", LogLimiter())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Harness:
    """Opens stores of one backend for one test and closes them all afterwards."""

    def __init__(self, backend: Backend, clock: FakeClock) -> None:
        self.backend = backend
        self.name = backend.name
        self.clock = clock
        self.namespace = uuid.uuid4().hex[:12]
        self.opened: list[Store] = []

    async def raw(self, config: Config | None = None, **changes: Any) -> Store:
        config = replace(config or Config(cleanup_interval=0), **changes)
        store = await self.backend.open_raw(config, self.clock, self.namespace)
        self.opened.append(store)
        return store

    async def controlled(
        self, config: Config | None = None, *, options: dict[str, Any] | None = None, **changes: Any
    ) -> ControlledStore:
        config = replace(config or Config(cleanup_interval=0), **changes)
        store = with_controls(await self.raw(config), config, **(options or {}))
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in reversed(self.opened):
            await store.close()


@pytest.fixture(params=[b.name for b in BACKENDS])
async def harness(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Harness]:
    backend = next(b for b in BACKENDS if b.name == request.param)
    reason = backend.skip_reason()
    if reason:
        pytest.skip(reason)
    h = Harness(backend, clock)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def store(harness: Harness) -> ControlledStore:
    """A controlled store with a per-user limit of 5 and cleanup off (tests purge by hand)."""
    return await harness.controlled(
        Config(site_id="site-a", max_sessions_per_user=5, cleanup_interval=0)
    )
