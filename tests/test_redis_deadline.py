"""The request deadline handed down to the Redis transport (``asyncsession._deadline``):
``SessionMiddleware`` sets it instead of wrapping each store call in
``asyncio.timeout``, so the transport must answer every caller by it, a lone call and
every caller that joins another's batch alike, even when the store's own ``timeout``
is far longer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

pytest.importorskip("redis")

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asyncsession import (
    Config,
    SessionMiddleware,
    StoreUnavailable,
    new_session,
    with_controls,
)
from asyncsession._deadline import DEADLINE
from asyncsession.backends.redis import RedisStore

from .asgi_calls import call_app, http_scope
from .clock import FakeClock
from .fake_redis_server import serve

STORE_TIMEOUT = 30.0  # the store's own bound: far past every deadline below
DEADLINE_IN = 0.3
MARGIN = 2.0  # room for a loaded machine; the bug waits out STORE_TIMEOUT
LATER = DEADLINE_IN + MARGIN + 0.5  # past every short caller's bound


def cfg() -> Config:
    return Config(site_id="site-a", cleanup_interval=0)


async def get_by(store: Any, session_id: str, seconds: float) -> float:
    """``store.get`` with the request deadline ``seconds`` from now: how long it took
    to fail (it must: the server is silent)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    DEADLINE.set(started + seconds)  # (this task's own context)
    with pytest.raises(StoreUnavailable):
        await store.get(session_id)
    return loop.time() - started


def test_the_redis_store_says_it_keeps_the_deadline() -> None:
    store = RedisStore(Redis(), cfg())
    assert store.honours_deadline
    assert with_controls(store, cfg()).honours_deadline


async def test_with_controls_takes_the_stores_timeout(clock: FakeClock) -> None:
    """``RedisStore.with_controls(..., timeout=)`` as ``RedisStore(..., timeout=)``: a
    silent server answers by it (``timeout`` was refused as a control's option)."""
    async with serve("silent") as fake:
        client = Redis(host="127.0.0.1", port=fake.port, socket_connect_timeout=2)
        store = RedisStore.with_controls(client, cfg(), clock=clock, timeout=0.2)
        assert isinstance(store.store, RedisStore) and store.store.timeout == 0.2
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get(new_session(None).id)
        assert time.monotonic() - started < 3.0
        await store.close()
        await client.aclose()


async def test_lone_and_batched_calls_answer_by_the_request_deadline(clock: FakeClock) -> None:
    async with serve("silent") as fake:
        client = Redis(host="127.0.0.1", port=fake.port, socket_connect_timeout=2)
        store = with_controls(RedisStore(client, cfg(), clock=clock, timeout=STORE_TIMEOUT), cfg())
        try:
            ids = [new_session(None).id for _ in range(20)]
            # the first goes alone, the second leads a batch; both have a later
            # deadline. The others join that batch and still fail by their own.
            late = [asyncio.ensure_future(get_by(store, i, LATER)) for i in ids[:2]]
            tasks = [asyncio.ensure_future(get_by(store, i, DEADLINE_IN)) for i in ids[2:]]
            took = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_IN + MARGIN)
            assert max(took) < DEADLINE_IN + MARGIN
            assert min(took) >= DEADLINE_IN * 0.9  # not before it either
            for slow in await asyncio.wait_for(asyncio.gather(*late), LATER + MARGIN):
                assert LATER * 0.9 <= slow < LATER + MARGIN
        finally:
            await asyncio.wait_for(store.close(), 5)
            await asyncio.wait_for(client.aclose(), 5)


async def test_a_batched_call_due_after_its_batch_is_not_watched_on_its_own(
    clock: FakeClock,
) -> None:
    """Calls that join a batch whose deadline comes first are answered by the batch's
    timer: the watchdog keeps no entry for each of them (one per batched call cost
    every get under load its share of the watchdog's work). One due earlier than its
    batch is watched (the test above)."""
    async with serve("silent") as fake:
        client = Redis(host="127.0.0.1", port=fake.port, socket_connect_timeout=2)
        raw = RedisStore(client, cfg(), clock=clock, timeout=STORE_TIMEOUT)
        store = with_controls(raw, cfg())
        try:
            tasks = [asyncio.ensure_future(store.get(new_session(None).id)) for _ in range(20)]
            await asyncio.sleep(0.05)
            watched = [entry for entry in raw._transport._watched if not entry[1].done()]
            assert len(watched) == 1  # the lone first call, in its caller's task
            results = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), STORE_TIMEOUT + MARGIN
            )
            assert all(isinstance(r, StoreUnavailable) for r in results)
        finally:
            await asyncio.wait_for(store.close(), 5)
            await asyncio.wait_for(client.aclose(), 5)


async def test_the_middleware_answers_503_by_its_timeout_not_the_stores(clock: FakeClock) -> None:
    """The middleware's ``timeout`` (shorter than the store's) bounds a request on a
    silent Redis, with no ``asyncio.timeout`` of its own around the store call."""

    async def write(request: Request) -> PlainTextResponse:
        request.session["k"] = 1
        return PlainTextResponse("ok")

    async with serve("silent") as fake:
        client = Redis(host="127.0.0.1", port=fake.port, socket_connect_timeout=2)
        store = RedisStore(client, cfg(), clock=clock, timeout=STORE_TIMEOUT)
        app = Starlette(
            routes=[Route("/write", write, methods=["POST"])],
            middleware=[Middleware(SessionMiddleware, store=store, timeout=DEADLINE_IN)],
        )
        try:
            started = time.monotonic()
            messages = await asyncio.wait_for(
                call_app(app, http_scope([], "/write")), DEADLINE_IN + MARGIN
            )
            assert messages[0]["status"] == 503
            assert time.monotonic() - started < DEADLINE_IN + MARGIN
        finally:
            await asyncio.wait_for(store.close(), 5)
            await asyncio.wait_for(client.aclose(), 5)


async def test_event_handlers_do_not_inherit_a_request_deadline() -> None:
    """An async event handler runs in a task of its own, after the store call that
    raised its event: the request deadline set around that call does not bound it."""
    from asyncsession import MemoryStore

    seen: list[float | None] = []

    async def on_event(event: Any) -> None:
        seen.append(DEADLINE.get())

    store = MemoryStore.with_controls(cfg(), on_event=on_event)
    token = DEADLINE.set(asyncio.get_running_loop().time() + 5)
    try:
        await store.create(new_session(None))
    finally:
        DEADLINE.reset(token)
    await store.drain()
    assert seen == [None]
    await store.close()
