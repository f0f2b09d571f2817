"""Where key-level saves (``Store.apply``, ``update_session``) meet login rotation and the
one-deadline-per-request rule: each helper on the request path stays inside the
request's deadline, and a save or login never drops a parallel request's write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asyncsession import (
    Changes,
    Config,
    ControlledStore,
    MemoryStore,
    SessionMiddleware,
    SessionNotFound,
    StoreUnavailable,
    install_exception_handler,
    login,
    logout,
    new_session,
    save_session,
    update_session,
)
from asyncsession.asgi import SCOPE_KEY

from .clock import FakeClock

BASE = "https://testserver"
TIMEOUT = 0.2


class HangingStore(ControlledStore):
    """A memory store whose ``apply`` and ``delete`` hang while ``hang`` is set."""

    def __init__(self) -> None:
        super().__init__(MemoryStore(Config(cleanup_interval=0)))
        self.hang = False

    async def _wait(self) -> None:
        if self.hang:
            await asyncio.Event().wait()

    async def apply(self, session_id: str, changes: Changes, **kw: Any) -> Any:
        await self._wait()
        return await super().apply(session_id, changes, **kw)

    async def delete(self, session_id: str, **kw: Any) -> bool:
        await self._wait()
        return await super().delete(session_id, **kw)


def bump(data: dict[str, Any]) -> None:
    data["n"] = data.get("n", 0) + 1


async def do_bump(request: Request) -> PlainTextResponse:
    await update_session(request, bump)
    return PlainTextResponse("ok")


async def do_logout(request: Request) -> PlainTextResponse:
    await logout(request)
    return PlainTextResponse("ok")


def make_app(store: Any, **options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/bump", do_bump, methods=["POST"]),
            Route("/logout", do_logout, methods=["POST"]),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid", **options)
    install_exception_handler(app)
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def test_update_session_waits_for_its_turn_within_the_request_deadline() -> None:
    """Calls of ``update_session`` for one session take turns; waiting for the turn is
    session work too: with a hung store, ten parallel requests all answer 503 within
    about one deadline, not one deadline after another (ten in a row: 5 s)."""
    timeout = 0.5
    store = HangingStore()
    async with store:
        session = await store.create(new_session(None, data={"n": 0}))
        headers = {"cookie": f"sid={session.id}"}
        store.hang = True
        async with client(make_app(store, timeout=timeout)) as c:
            started = time.monotonic()
            responses = await asyncio.gather(*(c.post("/bump", headers=headers) for _ in range(10)))
            elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [503] * 10
    assert elapsed < 5 * timeout, elapsed  # (room for a loaded machine; in a row: 10 x)


async def test_logout_runs_within_the_request_deadline() -> None:
    store = HangingStore()
    async with store:
        session = await store.create(new_session("ann", data={"n": 0}))
        store.hang = True
        async with client(make_app(store, timeout=TIMEOUT)) as c:
            response = await asyncio.wait_for(
                c.post("/logout", headers={"cookie": f"sid={session.id}"}), 10
            )
    assert response.status_code == 503


def test_a_long_lived_websocket_gives_each_helper_call_the_full_deadline() -> None:
    """On a websocket, hours of messages are not one request: like ``save_session``,
    ``update_session`` gets the whole deadline on every call, however much of it
    earlier calls used (here: all of it)."""
    store = MemoryStore.with_controls(Config(cleanup_interval=0))

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        websocket.scope[SCOPE_KEY].budget = 0.0  # spent by earlier messages
        await update_session(websocket, bump)
        await websocket.send_json(dict(websocket.session))
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid", timeout=5)

    async def seed() -> str:
        return (await store.create(new_session(None, data={"n": 1}))).id

    with TestClient(app, base_url="https://testserver") as tc:
        assert tc.portal is not None
        session_id = tc.portal.call(seed)
        with tc.websocket_connect("/ws", headers={"cookie": f"sid={session_id}"}) as s:
            assert s.receive_json() == {"n": 2}


async def test_login_after_a_save_keeps_what_a_parallel_request_wrote() -> None:
    """A request writes a key and then logs in; between its load and its save another
    request wrote another key (200). The new session holds both: the rotation must not
    be checked against a version the request's copy of the data does not reflect."""
    store = MemoryStore.with_controls(Config(cleanup_interval=0))

    async def write_then_login(request: Request) -> JSONResponse:
        session_id = request.scope[SCOPE_KEY].session.id
        # a parallel request writes "other" after this one loaded the session
        await store.apply(session_id, Changes(set={"other": "kept"}))
        request.session["mine"] = 1
        await save_session(request)
        await login(request, "ann")
        return JSONResponse(dict(request.session))

    app = Starlette(routes=[Route("/go", write_then_login, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    async with store:
        old = await store.create(new_session(None, data={"cart": ["x"]}))
        async with client(app) as c:
            response = await c.post("/go", headers={"cookie": f"sid={old.id}"})
        assert response.status_code == 200
        new_id = response.cookies["sid"]
        assert (await store.get(new_id)).data == {"cart": ["x"], "other": "kept", "mine": 1}


async def test_a_second_save_never_passes_a_base_it_did_not_see() -> None:
    """After a save that merged with a parallel write, ``current_session`` must not pair
    the request's data with the merged version: a later ``apply(base=...)`` (Redis
    writes ``base.data`` + changes as is when the version matches) would drop the
    parallel write."""
    seen: list[Any] = []

    class Recording(ControlledStore):
        async def apply(self, session_id: str, changes: Changes, **kw: Any) -> Any:
            base = kw.get("base")
            if base is not None:
                stored = await self.get(session_id)
                if stored.version == base.version:
                    seen.append(stored.data == base.data)
            return await super().apply(session_id, changes, **kw)

    store = Recording(MemoryStore(Config(cleanup_interval=0)))

    async def twice(request: Request) -> PlainTextResponse:
        session_id = request.scope[SCOPE_KEY].session.id
        await store.apply(session_id, Changes(set={"other": 1}))
        request.session["a"] = 1
        await save_session(request)
        request.session["b"] = 2
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/twice", twice, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    async with store:
        old = await store.create(new_session(None, data={"k": 0}))
        async with client(app) as c:
            r = await c.post("/twice", headers={"cookie": f"sid={old.id}"})
        assert r.status_code == 200
        assert (await store.get(old.id)).data == {"k": 0, "other": 1, "a": 1, "b": 2}
    assert all(seen), seen


@pytest.mark.parametrize("then_write", [False, True])
async def test_clear_on_a_session_rotated_meanwhile_answers_409_and_keeps_the_new_cookie(
    then_write: bool,
) -> None:
    """A parallel login rotated the session while this request ran; its ``clear()`` (and
    a write after it) must neither expire the newer cookie nor replace it with a new
    anonymous session: 409, no Set-Cookie, as for any write with a rotated id."""
    store = MemoryStore.with_controls(Config(cleanup_interval=0))

    async def clear(request: Request) -> PlainTextResponse:
        session_id = request.scope[SCOPE_KEY].session.id
        await store.rotate_into(session_id, new_session("ann"))  # the parallel login
        request.session.clear()
        if then_write:
            request.session["x"] = 1
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/clear", clear, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    async with store:
        old = await store.create(new_session(None, data={"a": 1}))
        async with client(app) as c:
            response = await c.post("/clear", headers={"cookie": f"sid={old.id}"})
    assert response.status_code == 409
    assert response.headers.get_list("set-cookie") == []


async def test_dependent_write_conflicts_do_not_flood_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 dependent writes that lose to a parallel write (409 each): a handful of
    WARNING records at most (middleware and store both rate-limit them), every one
    still reported as a violation."""
    seen: list[Any] = []
    store = MemoryStore.with_controls(Config(cleanup_interval=0), on_violation=seen.append)

    async def rmw(request: Request) -> PlainTextResponse:
        n = request.session["n"]
        await store.apply(request.scope[SCOPE_KEY].session.id, Changes(set={"n": n - 1}))
        request.session["n"] = n + 1
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/rmw", rmw, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    caplog.set_level(logging.DEBUG)
    async with store:
        session = await store.create(new_session(None, data={"n": 0}))
        async with client(app) as c:
            statuses = [
                (await c.post("/rmw", headers={"cookie": f"sid={session.id}"})).status_code
                for _ in range(200)
            ]
    assert statuses == [409] * 200
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 5, [r.getMessage() for r in warnings]
    assert [e.type for e in seen].count("conflict") == 200


async def test_update_session_with_a_rotated_cookie_answers_409_and_creates_nothing() -> None:
    store = MemoryStore.with_controls(Config(cleanup_interval=0))
    async with store:
        old = await store.create(new_session(None, data={"n": 1}))
        await store.rotate_into(old.id, new_session("ann", data={"n": 1}))
        async with client(make_app(store)) as c:
            response = await c.post("/bump", headers={"cookie": f"sid={old.id}"})
        assert response.status_code == 409
        assert response.headers.get_list("set-cookie") == []
        assert len(store.store) == 1  # type: ignore[arg-type]


async def test_max_retries_is_ignored_by_login_as_documented() -> None:
    """``max_retries`` is documented as ignored; login's retry on a parallel write must
    not depend on it (``max_retries=0`` made one parallel write fail the login)."""

    class Once(ControlledStore):
        conflicts = 1

        async def rotate_into(self, session_id: str, session: Any, **kw: Any) -> Any:
            if self.conflicts:
                self.conflicts -= 1
                await self.apply(session_id, Changes(set={"late": 1}))  # a parallel write
                kw["version"] = -1
            return await super().rotate_into(session_id, session, **kw)

    store = Once(MemoryStore(Config(cleanup_interval=0)))

    async def do_login(request: Request) -> PlainTextResponse:
        await login(request, "ann")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/login", do_login, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid", max_retries=0)
    install_exception_handler(app)
    async with store:
        old = await store.create(new_session(None, data={"a": 1}))
        async with client(app) as c:
            response = await c.post("/login", headers={"cookie": f"sid={old.id}"})
        assert response.status_code == 200
        assert (await store.get(response.cookies["sid"])).data == {"a": 1, "late": 1}


async def test_a_hung_touch_is_skipped_like_a_failed_one() -> None:
    """A read-only request whose touch is due: a store that refuses the touch at once
    gets it skipped (200, logged); one that hangs on it must not turn the request into
    a 503 either, once the touch's share of the deadline runs out."""

    class HungTouch(ControlledStore):
        async def touch(self, session_id: str) -> None:
            await asyncio.Event().wait()

    clock = FakeClock()
    store = HungTouch(MemoryStore(Config(cleanup_interval=0), clock=clock))

    async def read(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.session))

    app = Starlette(routes=[Route("/read", read)])
    app.add_middleware(
        SessionMiddleware, store=store, cookie_name="sid", timeout=TIMEOUT, touch_interval=1
    )
    async with store:
        session = await store.create(new_session(None, data={"a": 1}))
        clock.advance(2)  # a touch is due
        async with client(app) as c:
            response = await c.get("/read", headers={"cookie": f"sid={session.id}"})
    assert response.status_code == 200
    assert response.json() == {"a": 1}


async def test_clear_survives_a_failed_explicit_save() -> None:
    """``clear()``, then ``save_session`` meets an unavailable store (the app carries
    on): the final save must still delete the session, not forget that it was cleared."""

    class DeleteFailsOnce(ControlledStore):
        fails = 1

        async def delete(self, session_id: str, **kw: Any) -> bool:
            if self.fails:
                self.fails -= 1
                raise StoreUnavailable("down for a moment (test)")
            return await super().delete(session_id, **kw)

    store = DeleteFailsOnce(MemoryStore(Config(cleanup_interval=0)))

    async def log_out(request: Request) -> PlainTextResponse:
        request.session.clear()
        with contextlib.suppress(StoreUnavailable):
            await save_session(request)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/out", log_out, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    async with store:
        old = await store.create(new_session("ann", data={"a": 1}))
        async with client(app) as c:
            response = await c.post("/out", headers={"cookie": f"sid={old.id}"})
        assert response.status_code == 200
        with pytest.raises(SessionNotFound):
            await store.get(old.id)


async def test_a_rotated_id_among_tossed_cookies_still_answers_409() -> None:
    """A pre-login request that also carries a tossed junk cookie of our name: its
    write must answer 409 and leave the newer cookie alone, as with the rotated id
    alone (it created a new anonymous session over the login)."""
    store = MemoryStore.with_controls(Config(cleanup_interval=0))

    async def write(request: Request) -> PlainTextResponse:
        request.session["k"] = "v"
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/write", write, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    async with store:
        old = await store.create(new_session(None, data={"a": 1}))
        await store.rotate_into(old.id, new_session("ann", data={"a": 1}))
        junk = "J" * 43
        async with client(app) as c:
            response = await c.post("/write", headers={"cookie": f"sid={junk}; sid={old.id}"})
        assert response.status_code == 409
        assert response.headers.get_list("set-cookie") == []
        assert len(store.store) == 1  # type: ignore[arg-type]
