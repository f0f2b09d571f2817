"""SessionMiddleware, the login/logout helpers and the FastAPI integration."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastapi
import httpx
import orjson
import pytest

pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from asyncsession import (
    ABSENT,
    Applied,
    Changes,
    Config,
    ControlledStore,
    CurrentSessionDep,
    CurrentUserDep,
    MemoryStore,
    Session,
    SessionConflict,
    SessionDep,
    SessionDict,
    SessionEnded,
    SessionError,
    SessionMiddleware,
    SessionNotFound,
    StoreClosed,
    StoreUnavailable,
    current_session,
    current_user_id,
    install_exception_handler,
    list_user_sessions,
    login,
    logout,
    logout_everywhere,
    new_session,
    open_store,
    revoke_session,
    save_session,
    short_hash,
    update_session,
)
from asyncsession import asgi as asgi_module

from .asgi_calls import call_app, http_scope
from .clock import FakeClock

BASE = "https://testserver"
PLANTED = "A" * 43  # well formed, never issued


class CountingStore(ControlledStore):
    """A controlled memory store that counts public calls and can be made to fail."""

    def __init__(self, config: Config, clock: FakeClock | None = None) -> None:
        super().__init__(MemoryStore(config, clock=clock), config)
        self.calls: Counter[str] = Counter()
        self.fail: set[str] = set()
        self.conflicts_forever = False

    def _count(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.fail:
            raise StoreUnavailable("redis is down (test)")

    async def get(self, session_id: str) -> Session:
        self._count("get")
        return await super().get(session_id)

    async def create(self, session: Session) -> Session:
        self._count("create")
        return await super().create(session)

    async def update(self, session: Session) -> Session:
        self._count("update")
        if self.conflicts_forever:
            raise SessionConflict("always stale (test)")
        return await super().update(session)

    async def apply(
        self, session_id: str, changes: Changes, *, base: Session | None = None
    ) -> Applied:
        self._count("apply")
        if self.conflicts_forever:
            raise SessionConflict("always stale (test)")
        return await super().apply(session_id, changes, base=base)

    async def touch(self, session_id: str) -> None:
        self._count("touch")
        await super().touch(session_id)

    async def delete(self, session_id: str, **kw: Any) -> bool:
        self._count("delete")
        return await super().delete(session_id, **kw)

    def writes(self) -> int:
        return sum(self.calls[k] for k in ("create", "update", "apply", "touch", "delete"))


# ------------------------------------------------------------------ the test app


async def read(request: Request) -> JSONResponse:
    return JSONResponse(dict(request.session))


async def set_key(request: Request) -> JSONResponse:
    params = request.query_params
    delay = float(params.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    request.session[params["key"]] = params["value"]
    return JSONResponse(dict(request.session))


async def delete_key(request: Request) -> PlainTextResponse:
    del request.session[request.query_params["key"]]
    return PlainTextResponse("ok")


async def incr(request: Request) -> JSONResponse:
    request.session["n"] = request.session.get("n", 0) + 1
    return JSONResponse({"n": request.session["n"]})


async def nested(request: Request) -> PlainTextResponse:
    request.session.setdefault("cart", [])
    request.session["cart"].append(request.query_params["item"])
    return PlainTextResponse("ok")


async def nested_inplace(request: Request) -> PlainTextResponse:
    request.session["cart"].append(request.query_params["item"])  # no top-level write at all
    return PlainTextResponse("ok")


async def do_login(request: Request) -> JSONResponse:
    session = await login(request, request.query_params["user"])
    return JSONResponse({"user": session.user_id})


async def do_logout(request: Request) -> PlainTextResponse:
    await logout(request)
    return PlainTextResponse("bye")


async def everywhere(request: Request) -> JSONResponse:
    keep = request.query_params.get("keep", "1") == "1"
    return JSONResponse({"deleted": await logout_everywhere(request, keep_current=keep)})


async def devices(request: Request) -> JSONResponse:
    sessions = await list_user_sessions(request)
    current = current_session(request)
    return JSONResponse(
        [
            {"short": s.short_id, "current": current is not None and s.short_id == current.short_id}
            for s in sessions
        ]
    )


async def revoke(request: Request) -> JSONResponse:
    return JSONResponse({"found": await revoke_session(request, request.query_params["short"])})


async def clear(request: Request) -> PlainTextResponse:
    request.session.clear()
    if "then" in request.query_params:
        request.session["then"] = request.query_params["then"]
    return PlainTextResponse("cleared")


async def bad(request: Request) -> PlainTextResponse:
    if "key" in request.query_params:  # a key JSON has no form for (Starlette's json makes "1")
        request.session[1] = "one"  # type: ignore[index]
    else:
        request.session["when"] = datetime.now(UTC)
    return PlainTextResponse("this never reaches the client")


async def stream(request: Request) -> StreamingResponse:
    request.session["streamed"] = "yes"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk{i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def file(request: Request) -> FileResponse:
    request.session["filed"] = "yes"
    return FileResponse(__file__)


async def ws(websocket: WebSocket) -> None:
    if websocket.query_params.get("before"):
        websocket.session["before_accept"] = websocket.query_params["before"]
    await websocket.accept()
    await websocket.send_json(dict(websocket.session))
    text = await websocket.receive_text()
    websocket.session["ws"] = text
    await websocket.close()


ROUTES = [
    Route("/read", read),
    Route("/set", set_key, methods=["POST"]),
    Route("/delete", delete_key, methods=["POST"]),
    Route("/incr", incr, methods=["POST"]),
    Route("/nested", nested, methods=["POST"]),
    Route("/nested-inplace", nested_inplace, methods=["POST"]),
    Route("/login", do_login, methods=["POST"]),
    Route("/logout", do_logout, methods=["POST"]),
    Route("/everywhere", everywhere, methods=["POST"]),
    Route("/devices", devices),
    Route("/revoke", revoke, methods=["POST"]),
    Route("/clear", clear, methods=["POST"]),
    Route("/bad", bad, methods=["POST"]),
    Route("/stream", stream),
    Route("/file", file),
    WebSocketRoute("/ws", ws),
]


def make_app(store: Any, **options: Any) -> Starlette:
    app = Starlette(routes=ROUTES)
    options.setdefault("cookie_name", "session")  # the name these tests spell out
    app.add_middleware(SessionMiddleware, store=store, **options)
    install_exception_handler(app)
    return app


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cstore(clock: FakeClock) -> CountingStore:
    return CountingStore(Config(cleanup_interval=0, max_sessions_per_user=10), clock)


def client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 4711)),
        base_url=BASE,
        headers={"user-agent": "pytest-agent/1.0"},
        **kwargs,
    )


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


def cookie_id(response: httpx.Response) -> str:
    (header,) = set_cookies(response)
    value = header.split(";", 1)[0].split("=", 1)[1]
    assert value, header
    return value


def attrs(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")[1:]]
    return {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "") for p in parts}


async def new_cookie(c: httpx.AsyncClient, key: str = "a", value: str = "1") -> str:
    response = await c.post("/set", params={"key": key, "value": value})
    assert response.status_code == 200
    return cookie_id(response)


# ------------------------------------------------------------------- cookies


async def test_secure_cookie_defaults(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        response = await c.post("/set", params={"key": "a", "value": "1"})
    (header,) = set_cookies(response)
    a = attrs(header)
    assert header.startswith("session=")
    assert "httponly" in a and "secure" in a
    assert a["samesite"] == "lax"
    assert a["path"] == "/"
    assert "domain" not in a
    assert "max-age" not in a and "expires" not in a  # a browser-session cookie
    assert "partitioned" not in a
    assert "Cookie" in response.headers.get_list("vary")
    # spelled as Starlette's SessionMiddleware spells it, so tests written against it
    # (which match attributes case-sensitively) pass unchanged
    assert header.split("; ", 1)[1] == "path=/; httponly; samesite=lax; secure"


async def test_vary_cookie_whenever_the_response_may_depend_on_it(cstore: CountingStore) -> None:
    """Every response whose handler looked at the session (``request.session`` or a
    helper such as ``current_user_id``) gets ``Vary: Cookie``, with a cookie or
    without one ("hello guest": a shared cache must never serve that page to a client
    with a session; outside review: Starlette sends it, we did not); one that never
    looked at it does not, as with Starlette's middleware (whose own test checks it)."""

    async def guest(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.session.get('user', 'guest')}")

    async def listing(request: Request) -> PlainTextResponse:
        return PlainTextResponse(",".join(request.session))

    async def static(request: Request) -> PlainTextResponse:
        return PlainTextResponse("static")

    async def who(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(current_user_id(request)))  # a helper, not the dict

    async def shown(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello {request.session}")  # repr: no tracked read

    app = Starlette(
        routes=[
            Route("/guest", guest),
            Route("/list", listing),
            Route("/static", static),
            Route("/who", who),
            Route("/shown", shown),
        ]
    )
    app.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")
    live = (await cstore.create(new_session("u1", data={"user": "ann"}))).id
    async with client(app) as c:
        for cookie in (None, f"session={live}"):
            headers = {"cookie": cookie} if cookie else {}
            for path in ("/guest", "/list", "/who", "/shown"):
                response = await c.get(path, headers=headers)
                assert response.status_code == 200 and set_cookies(response) == []
                assert response.headers.get_list("vary") == ["Cookie"], (path, cookie)
            # never looked at the session: no Vary, as with Starlette's middleware; a
            # Starlette too old to say when request.session is used: Vary on everything
            response = await c.get("/static", headers=headers)
            if asgi_module.STARLETTE_MARKS_ACCESS:
                assert "vary" not in response.headers, cookie
            else:
                assert response.headers.get_list("vary") == ["Cookie"], cookie
        # a cookie it expires (unknown id): Set-Cookie, so Vary
        response = await c.get("/static", headers={"cookie": f"session={'J' * 43}"})
        assert response.headers.get_list("vary") == ["Cookie"]


@pytest.mark.parametrize("handler", [True, False])
async def test_vary_cookie_on_an_error_the_commit_answers(
    cstore: CountingStore, handler: bool
) -> None:
    """A write refused at the commit (here a value that is not JSON) is answered by
    the middleware, with the app's own handler for it or its plain error: that
    response depends on the session too, so it says ``Vary: Cookie`` (outside review:
    the 400, 409 and 413 from ``install_exception_handler`` had none)."""

    async def bad(request: Request) -> PlainTextResponse:
        request.session["x"] = {1, 2}
        return PlainTextResponse("never")

    app = Starlette(routes=[Route("/bad", bad, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")
    if handler:
        install_exception_handler(app)
    async with client(app) as c:
        response = await c.post("/bad")
        assert response.status_code == (400 if handler else 500)
        assert response.headers.get_list("vary") == ["Cookie"]
        assert response.headers["cache-control"] == "no-store"


async def test_vary_cookie_joins_the_vary_of_the_apps_error_handler(cstore: CountingStore) -> None:
    """The app's own handler for a refused save may vary on something else: Cookie
    joins it (outside review: a handler's ``Vary: Accept-Language`` went out alone)."""

    async def bad(request: Request) -> PlainTextResponse:
        request.session["x"] = {1, 2}
        return PlainTextResponse("never")

    async def handler(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("nope", 400, headers={"vary": "Accept-Language"})

    app = Starlette(routes=[Route("/bad", bad, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")
    app.add_exception_handler(SessionError, handler)
    async with client(app) as c:
        response = await c.post("/bad")
        assert response.status_code == 400
        assert response.headers.get_list("vary") == ["Accept-Language", "Cookie"]


async def test_mark_modified_as_starlettes_session_has_it(cstore: CountingStore) -> None:
    """Starlette 1.x code calls ``request.session.mark_modified()`` after changing a
    nested value: it answers 200 and the change is saved (Starlette's own tests,
    ported: ``AttributeError``, a 500)."""

    async def add(request: Request) -> JSONResponse:
        request.session.setdefault("cart", []).append("book")
        request.session.mark_modified()
        return JSONResponse(request.session["cart"])

    app = make_app(cstore)
    app.router.routes.append(Route("/add", add, methods=["POST"]))
    async with client(app) as c:
        assert (await c.post("/add")).json() == ["book"]
        response = await c.post("/add")
        assert response.status_code == 200 and response.json() == ["book", "book"]


@pytest.mark.parametrize("where", ["outer", "sub-app"])
async def test_a_refusal_in_a_mounted_sub_app_is_answered_by_the_apps_handler(
    cstore: CountingStore, where: str
) -> None:
    """A save refused in a route of a mounted sub-app is answered by the handler of the
    app the middleware wraps (outside review: the sub-app had put itself in
    ``scope["app"]``, so the middleware found no handler and answered plain text), or
    by the sub-app's own when only it has one."""

    async def bad(request: Request) -> PlainTextResponse:
        request.session["x"] = {1, 2}
        return PlainTextResponse("never")

    sub = Starlette(routes=[Route("/bad", bad, methods=["POST"])])
    app = Starlette(routes=[Mount("/api", app=sub)])
    app.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")
    install_exception_handler(app if where == "outer" else sub)
    async with client(app) as c:
        response = await c.post("/api/bad")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "SESSION_NOT_SERIALIZABLE"


async def test_cookie_options(cstore: CountingStore) -> None:
    app = make_app(
        cstore,
        cookie_name="__Secure-sid",
        path="/app",
        domain="example.com",
        same_site="none",
        partitioned=True,
        max_age=3600,
    )
    async with client(app) as c:
        response = await c.post("/set", params={"key": "a", "value": "1"})
    (header,) = set_cookies(response)
    a = attrs(header)
    assert header.startswith("__Secure-sid=")
    assert a["path"] == "/app"
    assert a["domain"] == "example.com"
    assert a["samesite"] == "none"
    assert a["max-age"] == "3600"
    assert "partitioned" in a and "secure" in a and "httponly" in a


async def test_development_cookie_without_secure(cstore: CountingStore) -> None:
    async with client(make_app(cstore, https_only=False, same_site="strict")) as c:
        response = await c.post("/set", params={"key": "a", "value": "1"})
    a = attrs(set_cookies(response)[0])
    assert "secure" not in a
    assert a["samesite"] == "strict"


@pytest.mark.parametrize(
    "options",
    [
        {"same_site": "none", "https_only": False},
        {"partitioned": True, "https_only": False},
        {"same_site": "sometimes"},
        {"cookie_name": "bad name"},
        {"cookie_name": "__Host-sid", "domain": "example.com"},
        {"cookie_name": "__Host-sid", "path": "/app"},
        {"path": "/a;b"},
        {"path": "shop"},  # a browser ignores a Path without "/" and uses the request's
        {"timeout": "5"},
        {"max_age": -1},
        {"touch_fraction": 0},
        {"touch_fraction": "0.1"},
        {"touch_interval": "5"},  # (a raw TypeError from timedelta)
        {"touch_interval": -5},  # (was accepted)
        {"touch_interval": timedelta(seconds=-1)},
        {"touch_interval": float("nan")},
        {"touch_interval": 1e14},  # (a raw OverflowError from timedelta)
        {"max_retries": -1},
        {"max_retries": "3"},
        {"on_unavailable": "ignore"},
        {"same_site": "bogus"},
        {"same_site": None},  # (Python's None for SameSite=None: a raw AttributeError)
        {"same_site": b"lax"},
    ],
)
def test_unsafe_or_invalid_options_are_refused(
    cstore: CountingStore, options: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        SessionMiddleware(Starlette(), cstore, **options)


def test_touch_interval_in_seconds_or_timedelta(cstore: CountingStore) -> None:
    for every in (30, 30.0, timedelta(seconds=30)):
        assert SessionMiddleware(Starlette(), cstore, touch_interval=every).touch_every == (
            timedelta(seconds=30)
        )
    assert SessionMiddleware(Starlette(), cstore, touch_interval=0).touch_every == timedelta(0)


def test_max_age_0_is_a_browser_session_cookie(cstore: CountingStore) -> None:
    """As Starlette's and starsessions' ``max_age=0``: no Max-Age, no Expires."""
    assert SessionMiddleware(Starlette(), cstore, max_age=0).max_age is None
    assert SessionMiddleware(Starlette(), cstore, max_age=timedelta(0)).max_age is None


@pytest.mark.parametrize(
    "max_age",
    [3600.5, True, "3600", timedelta(milliseconds=500), float("inf"), float("nan")],
)
def test_max_age_is_whole_seconds(cstore: CountingStore, max_age: Any) -> None:
    """A cookie's ``Max-Age`` is digits (a browser ignores ``Max-Age=3600.5`` and
    keeps the cookie for the browser session only): anything else is refused."""
    with pytest.raises(ValueError, match="max_age"):
        SessionMiddleware(Starlette(), cstore, max_age=max_age)
    mw = SessionMiddleware(Starlette(), cstore, max_age=3600.0)
    assert mw.max_age == 3600 and b"Max-Age=3600;" in mw.set_cookie_value("x")
    assert SessionMiddleware(Starlette(), cstore, max_age=timedelta(hours=1.5)).max_age == 5400


def test_numbers_of_any_numeric_type_are_accepted(cstore: CountingStore) -> None:
    """A float or int subclass (numpy's float64, an IntEnum) is seconds as before."""

    class Seconds(float):
        pass

    class Minutes(enum.IntEnum):
        ONE = 60

    assert SessionMiddleware(Starlette(), cstore, timeout=Seconds(2.5)).timeout == 2.5
    assert new_session("u", Minutes.ONE).expires_at is not None
    assert new_session("u", Seconds(1.5)).expires_at is not None
    with pytest.raises(ValueError, match="timeout"):
        SessionMiddleware(Starlette(), cstore, timeout=True)


def test_store_must_be_a_store() -> None:
    with pytest.raises(TypeError):
        SessionMiddleware(Starlette(), {})  # type: ignore[arg-type]


# ------------------------------------------------------------------ load/save


async def test_no_cookie_no_store_call_and_no_session(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        response = await c.get("/read")
    assert response.json() == {}
    assert set_cookies(response) == []
    assert sum(cstore.calls.values()) == 0
    assert len(cstore.store) == 0  # type: ignore[arg-type]


async def test_anonymous_session_created_on_first_write(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        sid = await new_cookie(c, "a", "1")
        assert cstore.calls["create"] == 1
        stored = await cstore.get(sid)
        assert stored.user_id is None
        assert stored.data == {"a": "1"}
        assert stored.ip_address == "203.0.113.9"
        assert stored.user_agent == "pytest-agent/1.0"
        # the client's jar sends it back
        assert (await c.get("/read")).json() == {"a": "1"}


async def test_a_response_that_sets_the_cookie_is_private_to_caches(
    cstore: CountingStore,
) -> None:
    """A response that sets (or expires) the session cookie and says nothing of
    caching gets ``Cache-Control: private``: a shared cache must not give one new
    session id to every visitor. One that says something is left as it is; a
    response that sets no cookie gets nothing."""

    async def cached(request: Request) -> PlainTextResponse:
        request.session["a"] = "1"
        return PlainTextResponse("ok", headers={"Cache-Control": "no-store"})

    app = make_app(cstore)
    app.router.routes.append(Route("/cached", cached, methods=["POST"]))
    async with client(app) as c:
        first = await c.post("/set", params={"key": "a", "value": "1"})
        assert set_cookies(first) and first.headers.get_list("cache-control") == ["private"]
        read = await c.get("/read")
        assert set_cookies(read) == [] and "cache-control" not in read.headers
        out = await c.post("/logout")
        assert set_cookies(out) and out.headers.get_list("cache-control") == ["private"]
    async with client(app) as fresh:
        own = await fresh.post("/cached")
        assert set_cookies(own) and own.headers.get_list("cache-control") == ["no-store"]


async def test_no_write_on_unmodified_requests(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        await new_cookie(c)
        cstore.calls.clear()
        for _ in range(5):
            response = await c.get("/read")
            assert response.json() == {"a": "1"}
            assert set_cookies(response) == []
        assert cstore.calls == Counter({"get": 5})
        # writing the value it already has is not a change either
        response = await c.post("/set", params={"key": "a", "value": "1"})
        assert cstore.writes() == 0
        response = await c.post("/set", params={"key": "a", "value": "2"})
        assert cstore.calls["apply"] == 1
        assert set_cookies(response) == []  # same id, no Max-Age: nothing to re-send


async def test_one_round_trip_per_read_and_two_per_write(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        await new_cookie(c)
        cstore.calls.clear()
        await c.post("/incr")
    assert cstore.calls == Counter({"get": 1, "apply": 1})


async def test_touch_at_most_once_per_fraction_of_idle_timeout(clock: FakeClock) -> None:
    store = CountingStore(Config(cleanup_interval=0, idle_timeout=600), clock)
    async with client(make_app(store, touch_fraction=0.1, max_age=3600)) as c:
        sid = await new_cookie(c)
        store.calls.clear()
        for _ in range(3):
            assert set_cookies(await c.get("/read")) == []
        assert store.calls["touch"] == 0
        clock.advance(61)  # past 10% of 600 s
        response = await c.get("/read")
        assert store.calls["touch"] == 1
        # a Max-Age cookie is refreshed along with the server-side expiry
        assert attrs(set_cookies(response)[0])["max-age"] == "3600"
        for _ in range(3):
            await c.get("/read")
        assert store.calls["touch"] == 1
        stored = await store.get(sid)
        assert stored.last_accessed_at == clock.now
        assert stored.expires_at == clock.now + timedelta(seconds=600)


async def test_touch_interval_without_idle_timeout(clock: FakeClock) -> None:
    store = CountingStore(Config(cleanup_interval=0), clock)
    async with client(make_app(store, touch_interval=30)) as c:
        sid = await new_cookie(c)
        clock.advance(10)
        await c.get("/read")
        assert store.calls["touch"] == 0
        clock.advance(25)
        await c.get("/read")
        assert store.calls["touch"] == 1
        assert (await store.get(sid)).last_accessed_at == clock.now


async def test_idle_session_expires_and_is_not_adopted(clock: FakeClock) -> None:
    store = CountingStore(Config(cleanup_interval=0, idle_timeout=60), clock)
    async with client(make_app(store)) as c:
        sid = await new_cookie(c)
        clock.advance(61)
        response = await c.get("/read")
        assert response.json() == {}
        (header,) = set_cookies(response)
        assert attrs(header)["max-age"] == "0"
        response = await c.post("/set", params={"key": "b", "value": "2"})
        assert cookie_id(response) != sid


async def test_delete_key_and_nested_mutations_are_saved(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        sid = await new_cookie(c, "a", "1")
        await c.post("/nested", params={"item": "x"})
        await c.post("/nested-inplace", params={"item": "y"})
        assert (await cstore.get(sid)).data == {"a": "1", "cart": ["x", "y"]}
        await c.post("/delete", params={"key": "a"})
        assert (await cstore.get(sid)).data == {"cart": ["x", "y"]}


async def test_session_dict_is_a_dict(cstore: CountingStore) -> None:
    seen: list[Any] = []

    async def handler(request: Request) -> PlainTextResponse:
        seen.append(request.session)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", handler)])
    app.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")
    async with client(app) as c:
        await c.get("/")
    assert isinstance(seen[0], dict) and isinstance(seen[0], SessionDict)


async def test_a_session_middleware_inside_a_mount_leaves_ours_alone(
    cstore: CountingStore,
) -> None:
    """A mounted sub-app with a session middleware of its own (an admin panel's
    Starlette ``SessionMiddleware``, a second asyncsession per mount) puts its session
    in the same scope (Starlette's Mount updates the scope in place): ours must not
    take it for the app's replacement and overwrite the user's data with it (a
    review caught an attempt to save replaced ``scope["session"]`` doing that)."""
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware as CookieSessions
    from starlette.routing import Mount

    async def shop(request: Request) -> JSONResponse:
        request.session["cart"] = [1]
        return JSONResponse({})

    admin = Starlette(
        routes=[Route("/", lambda r: JSONResponse({}))],
        middleware=[Middleware(CookieSessions, secret_key="s")],
    )
    inner = Starlette(
        routes=[Route("/", shop, methods=["POST"])],
        middleware=[Middleware(SessionMiddleware, store=cstore, cookie_name="shop")],
    )
    app = make_app(cstore)
    app.router.routes.extend([Mount("/admin", admin), Mount("/shop", inner)])
    async with client(app) as c:
        sid = await new_cookie(c, "user", "alice")
        assert (await c.get("/admin/")).status_code == 200
        assert (await c.post("/shop/")).status_code == 200
        assert (await c.get("/shop/")).status_code == 405
        assert (await cstore.get(sid)).data == {"user": "alice"}
        shop_id = c.cookies["shop"]
        assert (await cstore.get(shop_id)).data == {"cart": [1]}


# ------------------------------------------------------- fixation, stale ids


async def test_never_adopts_an_id_the_server_did_not_issue(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        response = await c.get("/read", headers={"cookie": f"session={PLANTED}"})
        assert response.json() == {}
        (header,) = set_cookies(response)
        assert header.startswith("session=;") and attrs(header)["max-age"] == "0"
        assert cstore.calls["get"] == 1
        response = await c.post(
            "/set", params={"key": "a", "value": "1"}, headers={"cookie": f"session={PLANTED}"}
        )
        sid = cookie_id(response)
        assert sid != PLANTED
    with pytest.raises(Exception, match="not found"):
        await cstore.get(PLANTED)


async def test_other_site_ids_are_never_adopted(clock: FakeClock) -> None:
    backend = MemoryStore(Config(cleanup_interval=0), clock=clock)
    site_a = ControlledStore(backend, Config(site_id="a", cleanup_interval=0))
    site_b = ControlledStore(backend, Config(site_id="b", cleanup_interval=0))
    theirs = await site_b.create(new_session("mallory", data={"role": "admin"}))
    async with client(make_app(site_a)) as c:
        response = await c.get("/read", headers={"cookie": f"session={theirs.id}"})
        assert response.json() == {}
        assert attrs(set_cookies(response)[0])["max-age"] == "0"
        response = await c.post(
            "/set", params={"key": "x", "value": "1"}, headers={"cookie": f"session={theirs.id}"}
        )
        assert cookie_id(response) != theirs.id
    assert (await site_b.get(theirs.id)).data == {"role": "admin"}


BAD_COOKIES: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("malformed", [(b"cookie", b"session=not/valid!")]),
    ("too short", [(b"cookie", b"session=abc")]),
    ("10k id", [(b"cookie", b"session=" + b"A" * 10_000)]),
    ("oversized header", [(b"cookie", b"x=" + b"y" * 100_000 + b"; session=" + b"B" * 200)]),
    ("badly quoted", [(b"cookie", b'session="' + PLANTED.encode())]),
    ("quote inside", [(b"cookie", b'session=AAAA"AAAAAAAAAAAAAAAAAAAA')]),
    ("non-ascii", [(b"cookie", "session=AAAAAAAAAAAAAAAAAAAé".encode())]),
    ("latin-1 bytes", [(b"cookie", b"session=AAAAAAAAAAAAAAAAAAA\xff\xfe")]),
    ("control chars", [(b"cookie", b"session=AAAAAAAAAAAAAAAAAAAA\x00\x01")]),
    ("empty", [(b"cookie", b"session=")]),
    ("glob", [(b"cookie", b"session=*AAAAAAAAAAAAAAAAAAAAAAA")]),
    ("injection", [(b"cookie", b"session=AAAAAAAAAAAAAAAA:*\r\nDEL")]),
]


async def _raw_request(app: Any, headers: list[tuple[bytes, bytes]], path: str = "/read") -> Any:
    """Call the app with exactly these headers (no client normalisation)."""
    query = b"key=k&value=v" if path == "/set" else b""
    return (await call_app(app, http_scope(headers, path, query)))[0]


@pytest.mark.parametrize(("name", "headers"), BAD_COOKIES, ids=[n for n, _ in BAD_COOKIES])
async def test_bad_cookies_get_a_fresh_session_without_a_lookup(
    cstore: CountingStore, name: str, headers: list[tuple[bytes, bytes]]
) -> None:
    app = make_app(cstore)
    start = await _raw_request(app, headers)
    assert start["status"] == 200
    assert cstore.calls["get"] == 0
    cookies = [v for k, v in start["headers"] if k == b"set-cookie"]
    assert cookies and cookies[0].startswith(b"session=;")  # stale cookie cleared
    start = await _raw_request(app, headers, "/set")
    assert start["status"] == 200
    assert cstore.calls["get"] == 0
    (cookie,) = [v for k, v in start["headers"] if k == b"set-cookie"]
    sid = cookie.split(b";")[0].split(b"=", 1)[1].decode()
    assert (await cstore.get(sid)).data == {"k": "v"}


async def test_new_session_records_the_client_an_inner_middleware_resolved(
    cstore: CountingStore,
) -> None:
    """A proxy-headers middleware inside ours rewrites the scope's client: the session
    records the address it resolved, read when the session is created."""

    def proxied(app: Any) -> Any:
        async def inner(scope: Any, receive: Any, send: Any) -> None:
            scope["client"] = ("198.51.100.7", 443)
            await app(scope, receive, send)

        return inner

    app = Starlette(routes=ROUTES)
    app.add_middleware(proxied)  # type: ignore[arg-type]
    app.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")  # outermost
    async with client(app) as c:
        sid = await new_cookie(c)
    assert (await cstore.get(sid)).ip_address == "198.51.100.7"


@pytest.mark.parametrize("extra", [{}, {"organization_id": "org-1"}])
async def test_a_subclass_client_fields_is_what_new_sessions_record(
    cstore: CountingStore, extra: dict[str, str]
) -> None:
    """``client_fields`` returns ``new_session``'s fields as a dict: a subclass that
    masks the address (or adds a field) has its dict recorded on new sessions, as
    ``new_session`` would take it (outside review: a tuple in its place stored the
    dict's keys as the address and agent)."""

    class Masking(SessionMiddleware):
        def client_fields(self, scope: Any) -> dict[str, Any]:
            fields = super().client_fields(scope)
            fields["ip_address"] = fields["ip_address"].rsplit(".", 1)[0] + ".0"
            return {**fields, **extra}

    app = Starlette(routes=ROUTES)
    app.add_middleware(Masking, store=cstore, cookie_name="session")
    async with client(app) as c:
        sid = await new_cookie(c)
    stored = await cstore.get(sid)
    assert (stored.ip_address, stored.user_agent) == ("203.0.113.0", "pytest-agent/1.0")
    assert stored.organization_id == extra.get("organization_id")


async def test_requests_leave_no_reference_cycles(cstore: CountingStore) -> None:
    """A request's session state is freed by reference counting when the request ends,
    not left to the cyclic garbage collector (a scope <-> connection cycle once cost
    every request a collection's share: ~1 us of a 15 us memory-backed request)."""
    app = make_app(cstore)
    start = await _raw_request(app, [], "/set")  # creates a session
    (cookie,) = [v for k, v in start["headers"] if k == b"set-cookie"]
    jar = [(b"cookie", cookie.split(b";")[0]), (b"user-agent", b"pytest")]
    await _raw_request(app, jar, "/read")
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in ("/read", "/set", "/incr", "/read"):
            for _ in range(20):
                assert (await _raw_request(app, jar, path))["status"] == 200
        for _ in range(20):
            assert (await _raw_request(app, [], "/set"))["status"] == 200  # new sessions
        assert gc.collect() == 0  # nothing the requests left was only reachable in a cycle
    finally:
        if was_enabled:
            gc.enable()
    assert cstore.calls["apply"] >= 20 and cstore.calls["create"] >= 21  # /incr, /set


async def test_duplicated_cookie_adopts_the_one_live_session(cstore: CountingStore) -> None:
    """Tossing: a second value of our cookie (a sibling domain's, an old path's) that
    is not a live session is skipped, in either order, and nothing is cleared."""
    real = await cstore.create(new_session(None, data={"a": 1}))
    for headers in (
        [(b"cookie", f"session={real.id}; session={PLANTED}".encode())],
        [(b"cookie", f"session={PLANTED}; session={real.id}".encode())],
        [(b"cookie", f"session={real.id}".encode()), (b"cookie", f"session={PLANTED}".encode())],
    ):
        start = await _raw_request(make_app(cstore), headers)
        assert start["status"] == 200
        assert not [v for k, v in start["headers"] if k == b"set-cookie"]
    assert cstore.calls["get"] == 6


async def test_a_logout_with_several_live_cookies_ends_nothing_and_says_so(
    cstore: CountingStore,
) -> None:
    """Tossing: the victim's cookie beside a live one planted from a sibling domain (or
    more cookies than are read). None is adopted, so ``logout``, ``clear()`` and
    ``logout_everywhere`` end nothing: they answer 409 (reason ``ambiguous``, as a
    write does), never a 200 "logged out" while the victim's session lives on
    (outside attack: 303 and the victim still logged in). With the victim's cookie
    alone, logout works."""
    victim = await cstore.create(new_session("victim", data={"a": 1}))
    planted = await cstore.create(new_session("attacker"))
    both = f"session={planted.id}; session={victim.id}"
    many = "; ".join(f"session={c * 43}" for c in "BCDE") + f"; session={victim.id}"
    app = make_app(cstore)
    for cookie in (both, many):
        for path in ("/logout", "/clear", "/everywhere", "/set?key=k&value=v"):
            async with client(app) as c:
                response = await c.post(path, headers={"cookie": cookie})
                assert response.status_code == 409, (path, response.text)
                assert response.json()["error"]["reason"] == "ambiguous"
                assert not set_cookies(response)  # the client's cookies are left alone
            assert (await cstore.get(victim.id)).user_id == "victim"
            assert (await cstore.get(planted.id)).user_id == "attacker"
    async with client(app) as c:
        response = await c.post("/logout", headers={"cookie": f"session={victim.id}"})
        assert response.status_code == 200
    with pytest.raises(SessionNotFound):
        await cstore.get(victim.id)


async def test_remembered_cookie_parses_give_the_same_answers(cstore: CountingStore) -> None:
    """The middleware remembers what a Cookie header parsed to: the same app must give
    the same answers on every repeat, for good, ambiguous and hostile headers."""
    from asyncsession.asgi import middleware as asgi

    real = await cstore.create(new_session(None, data={"a": 1}))
    app = make_app(cstore)
    good = [(b"cookie", f"session={real.id}".encode())]
    split = [*good, (b"cookie", f"session={PLANTED}".encode())]
    lookups = {"split duplicate": 2, "duplicated": 2, "duplicated headers": 2}
    for _ in range(3):
        before = cstore.calls["get"]
        assert (await _raw_request(app, good))["status"] == 200
        assert cstore.calls["get"] == before + 1  # the id was read (from the cache too)
        for _name, headers in [*BAD_COOKIES, ("split duplicate", split)]:
            before = cstore.calls["get"]
            start = await _raw_request(app, headers)
            assert start["status"] == 200
            # never a lookup for a refused cookie; one per distinct id of a tossed one
            assert cstore.calls["get"] == before + lookups.get(_name, 0)
    mw = app.middleware_stack
    while not isinstance(mw, SessionMiddleware):
        mw = mw.app  # type: ignore[attr-defined]
    cache = mw._cookie_cache
    assert all(len(header) <= asgi._CACHED_COOKIE_HEADER for header in cache)
    for n in range(asgi._COOKIE_CACHE_SIZE + 10):  # many distinct clients: stays bounded
        mw.read_cookie({"headers": [(b"cookie", f"session={n:043d}".encode())]})
        assert len(cache) <= asgi._COOKIE_CACHE_SIZE
    assert mw.read_cookie({"headers": good}) == (1, (real.id,))


async def test_same_cookie_twice_and_quoted_cookie_are_accepted(cstore: CountingStore) -> None:
    real = await cstore.create(new_session(None, data={"a": 1}))
    for header in (
        f"session={real.id}; session={real.id}",
        f'other=1; session="{real.id}"',
        f"session={real.id}; other=1",
    ):
        async with client(make_app(cstore)) as c:
            response = await c.get("/read", headers={"cookie": header})
        assert response.json() == {"a": 1}, header


async def test_other_cookies_are_ignored(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        response = await c.get("/read", headers={"cookie": "sessionx=1; xsession=2; a=session"})
    assert response.status_code == 200
    assert sum(cstore.calls.values()) == 0
    assert set_cookies(response) == []


# --------------------------------------------------------------- login/logout


async def test_login_rotates_the_id_and_keeps_the_data(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        anon = await new_cookie(c, "cart", "3 items")
        response = await c.post("/login", params={"user": "alice"})
        assert response.json() == {"user": "alice"}
        sid = cookie_id(response)
        assert sid != anon
        with pytest.raises(SessionNotFound):
            await cstore.get(anon)
        stored = await cstore.get(sid)
        assert stored.user_id == "alice"
        assert stored.data == {"cart": "3 items"}
        assert stored.ip_address == "203.0.113.9"
        assert stored.user_agent == "pytest-agent/1.0"
        assert [s.id for s in await cstore.list_by_user("alice")] == [cstore.handle(sid)]
        # the planted pre-login id is worthless afterwards
        response = await c.get("/read", headers={"cookie": f"session={anon}"})
        assert response.json() == {}


async def test_login_without_a_previous_session(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        response = await c.post("/login", params={"user": "bob"})
        sid = cookie_id(response)
        assert (await cstore.get(sid)).user_id == "bob"
        response = await c.post("/incr")
        assert response.json() == {"n": 1}
        assert (await cstore.get(sid)).data == {"n": 1}


async def test_logout_removes_the_server_side_record(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        sid = cookie_id(await c.post("/login", params={"user": "alice"}))
        (session,) = await cstore.list_by_user("alice")
        assert session.id == cstore.handle(sid)  # listed by handle: the store holds no id
        response = await c.post("/logout")
        (header,) = set_cookies(response)
        assert header.startswith("session=;") and attrs(header)["max-age"] == "0"
        assert "httponly" in attrs(header) and "secure" in attrs(header)
        assert await cstore.list_by_user("alice") == []
        with pytest.raises(SessionEnded):
            await cstore.get(sid)
        # a replayed cookie after logout is not adopted, nor is a handle as a cookie
        for replay in (sid, session.id):
            response = await c.get("/read", headers={"cookie": f"session={replay}"})
            assert response.json() == {}


async def test_clear_ends_the_session(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        sid = await new_cookie(c)
        response = await c.post("/clear")
        assert attrs(set_cookies(response)[0])["max-age"] == "0"
        with pytest.raises(SessionEnded):
            await cstore.get(sid)
        sid = await new_cookie(c)
        response = await c.post("/clear", params={"then": "flash"})
        new = cookie_id(response)
        assert new != sid
        assert (await cstore.get(new)).data == {"then": "flash"}


async def test_logout_everywhere_and_devices(cstore: CountingStore) -> None:
    app = make_app(cstore)
    async with client(app) as laptop, client(app) as phone, client(app) as tablet:
        for device in (laptop, phone, tablet):
            await device.post("/login", params={"user": "alice"})
        devices = (await laptop.get("/devices")).json()
        assert len(devices) == 3
        assert [d["current"] for d in devices] == [True, False, False]
        # revoke the phone by its short id
        phone_short = devices[1]["short"]
        assert (await laptop.post("/revoke", params={"short": phone_short})).json() == {
            "found": True
        }
        assert (await phone.get("/devices")).json() == []
        assert len((await laptop.get("/devices")).json()) == 2
        assert (await laptop.post("/everywhere")).json() == {"deleted": 1}
        assert (await tablet.get("/devices")).json() == []
        assert len((await laptop.get("/devices")).json()) == 1
        assert (await laptop.post("/everywhere", params={"keep": "0"})).json() == {"deleted": 1}
        assert (await laptop.get("/devices")).json() == []
    assert await cstore.list_by_user("alice") == []


async def test_revoke_only_reaches_the_users_own_sessions(cstore: CountingStore) -> None:
    app = make_app(cstore)
    async with client(app) as alice, client(app) as bob:
        await alice.post("/login", params={"user": "alice"})
        await bob.post("/login", params={"user": "bob"})
        (bobs,) = await cstore.list_by_user("bob")
        response = await alice.post("/revoke", params={"short": short_hash(bobs.id)})
        assert response.json() == {"found": False}
        assert len(await cstore.list_by_user("bob")) == 1


async def test_login_limit_maps_to_429(clock: FakeClock) -> None:
    store = CountingStore(
        Config(cleanup_interval=0, max_sessions_per_user=1, eviction="reject"), clock
    )
    app = make_app(store)
    async with client(app) as one, client(app) as two:
        assert (await one.post("/login", params={"user": "carol"})).status_code == 200
        response = await two.post("/login", params={"user": "carol"})
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "SESSION_LIMIT_EXCEEDED"


# --------------------------------------------------------- parallel requests


def _parallel_stores() -> list[str]:
    return ["memory", "sqlite", "redis"]


@pytest.fixture(params=_parallel_stores())
async def any_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ControlledStore]:
    prefix = f"test-asgi-{os.getpid()}-{id(tmp_path)}:"
    config = Config(
        cleanup_interval=0,
        default_ttl=120,  # (and deleted after: the README says the tests leave nothing)
        key_prefix=prefix,
    )
    if request.param == "memory":
        store = open_store("memory://", config)
    elif request.param == "sqlite":
        pytest.importorskip("aiosqlite")
        store = open_store(f"sqlite:///{tmp_path}/sessions.db", config)
    else:
        require = os.environ.get("ASYNCSESSION_REQUIRE_REDIS") == "1"
        try:
            store = open_store(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"), config)
            await store.get(PLANTED)
        except SessionNotFound:
            pass
        except (ValueError, StoreUnavailable) as exc:
            if require:
                raise
            pytest.skip(f"no usable Redis: {exc}")
    async with store:
        yield store
    if request.param == "redis":
        from redis.asyncio import Redis

        from . import backend_redis

        client = Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
        await backend_redis.delete_prefix(client, prefix)
        await client.aclose()


async def test_parallel_requests_changing_different_keys_all_persist(
    any_store: ControlledStore,
) -> None:
    app = make_app(any_store, max_retries=50)
    async with client(app) as c:
        sid = await new_cookie(c, "base", "0")

        async def one(i: int) -> int:
            response = await c.post(
                "/set", params={"key": f"k{i}", "value": str(i), "delay": "0.01"}
            )
            return response.status_code

        statuses = await asyncio.gather(*(one(i) for i in range(24)))
        assert statuses == [200] * 24
    stored = await any_store.get(sid)
    assert stored.data == {"base": "0", **{f"k{i}": str(i) for i in range(24)}}
    assert stored.version >= 24


async def test_parallel_requests_same_key_last_writer_wins(any_store: ControlledStore) -> None:
    app = make_app(any_store, max_retries=50)
    async with client(app) as c:
        sid = await new_cookie(c, "base", "0")
        results = await asyncio.gather(
            *(
                c.post("/set", params={"key": "color", "value": f"c{i}", "delay": "0.01"})
                for i in range(10)
            )
        )
    assert all(r.status_code == 200 for r in results)
    stored = await any_store.get(sid)
    assert stored.data["color"] in {f"c{i}" for i in range(10)}
    assert stored.data["base"] == "0"


async def test_dependent_write_conflict_answers_409_without_retrying(
    cstore: CountingStore,
) -> None:
    async with client(make_app(cstore)) as c:
        sid = await new_cookie(c)
        cstore.conflicts_forever = True
        cstore.calls.clear()
        response = await c.post("/incr")
    assert response.status_code == 409
    assert cstore.calls["apply"] == 1
    assert (await cstore.get(sid)).data == {"a": "1"}


async def test_session_deleted_during_request_is_not_resurrected(
    cstore: CountingStore,
) -> None:
    app = make_app(cstore)
    async with client(app) as c:
        sid = cookie_id(await c.post("/login", params={"user": "dave"}))
        task = asyncio.create_task(
            c.post("/set", params={"key": "late", "value": "1", "delay": "0.05"})
        )
        await asyncio.sleep(0.01)
        await cstore.delete_by_user("dave")
        response = await task
    # its change is refused (never a 200 for a dropped write), nothing is recreated,
    # and the cookie is left alone: the browser may hold a newer one by now
    assert response.status_code == 409
    assert set_cookies(response) == []
    with pytest.raises(Exception, match="not found"):
        await cstore.get(sid)
    # a later request that still carries the dead id expires it
    async with client(app) as c:
        c.cookies.set("session", sid)
        assert attrs(set_cookies(await c.get("/"))[0])["max-age"] == "0"


# ---------------------------------------------------- streaming, files, websockets


async def test_streaming_response_keeps_its_session(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        response = await c.get("/stream")
        assert response.text == "chunk0\nchunk1\nchunk2\n"
        sid = cookie_id(response)
        assert (await cstore.get(sid)).data == {"streamed": "yes"}


async def test_file_response_keeps_its_session(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        sid = await new_cookie(c)
        response = await c.get("/file")
        assert response.status_code == 200 and "test_file_response" in response.text
    assert (await cstore.get(sid)).data == {"a": "1", "filed": "yes"}


def test_websocket_reads_and_writes_the_session(cstore: CountingStore) -> None:
    app = make_app(cstore)
    with TestClient(app, base_url=BASE) as tc:
        response = tc.post("/set", params={"key": "a", "value": "1"})
        sid = response.cookies["session"]
        with tc.websocket_connect("wss://testserver/ws") as websocket:
            assert websocket.receive_json() == {"a": "1"}
            websocket.send_text("hello")
        assert tc.get("/read").json() == {"a": "1", "ws": "hello"}
    assert cstore.calls["create"] == 1
    assert cstore.store._entries[cstore.handle(sid)]  # type: ignore[attr-defined]


def test_websocket_new_session_cookie_in_the_handshake(cstore: CountingStore) -> None:
    app = make_app(cstore)
    with (
        TestClient(app, base_url=BASE) as tc,
        tc.websocket_connect("wss://testserver/ws?before=hi") as ws,
    ):
        assert ws.receive_json() == {"before_accept": "hi"}
        ws.send_text("x")
        headers = dict(ws.extra_headers or [])
    cookie = headers[b"set-cookie"].decode()
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert "httponly" in cookie.lower()
    assert asyncio.run(cstore.get(sid)).data == {"before_accept": "hi", "ws": "x"}


async def test_nothing_after_the_response_started_can_log_a_browser_out(
    cstore: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    """After the response started (a streaming body, a background task) no cookie can
    reach the client: ``login`` there raises instead of rotating the browser's id to
    one it never gets (it was logged out, and the store kept a session nobody held);
    ``save_session`` of a client without a session stores nothing (and raises); a
    change nothing saves is logged (once per interval), not dropped silently."""
    from starlette.background import BackgroundTask

    outcomes: list[Any] = []

    async def late_login(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"started\n"
            try:
                await login(request, "mallory")
            except RuntimeError as exc:
                outcomes.append(exc)
            yield b"done\n"

        return StreamingResponse(body())

    async def late_write(request: Request) -> PlainTextResponse:
        async def task() -> None:
            if "update" in request.query_params:
                try:
                    await update_session(request, lambda d: d.update(late="lost"))
                except RuntimeError as exc:
                    outcomes.append(exc)
                return
            if "intkey" in request.query_params:  # (a key JSON has no form for: the
                request.session[1] = "lost"  # type: ignore[index]  # same warning)
            else:
                request.session["late"] = "lost"
            if "save" in request.query_params:
                try:
                    await save_session(request)
                except RuntimeError as exc:
                    outcomes.append(exc)

        return PlainTextResponse("ok", background=BackgroundTask(task))

    app = make_app(cstore)
    app.router.routes += [Route("/late-login", late_login), Route("/late-write", late_write)]
    async with client(app) as c:
        await c.post("/login", params={"user": "alice"})
        sid = c.cookies["session"]
        response = await c.get("/late-login")
        assert response.status_code == 200 and set_cookies(response) == []
        assert [type(e) for e in outcomes] == [RuntimeError] and "response started" in str(
            outcomes[0]
        )
        assert (await cstore.get(sid)).user_id == "alice"  # the browser's session lives
        assert (await c.get("/read")).status_code == 200 and c.cookies["session"] == sid
        with caplog.at_level(logging.DEBUG, "asyncsession"):
            # ordinary requests that write and read a list warn of nothing
            await c.post("/nested", params={"item": "book"})
            await c.get("/read")
            assert not [r for r in caplog.records if "response started" in r.getMessage()]
            for _ in range(3):
                assert (await c.get("/late-write")).status_code == 200
            assert (await c.get("/late-write", params={"intkey": "1"})).status_code == 200
        assert "late" not in (await cstore.get(sid)).data
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 1 and "after the response started" in loud[0].getMessage()
        await c.get("/late-write", params={"save": "1"})  # save_session saves it
        assert (await cstore.get(sid)).data["late"] == "lost"
    before = len(cstore.store)  # type: ignore[arg-type]
    outcomes.clear()
    async with client(app) as fresh:
        # save_session would return as if it had stored: it raises (so does
        # update_session, which would return fn's result as if it were saved)
        response = await fresh.get("/late-write", params={"save": "1"})
        assert response.status_code == 200 and set_cookies(response) == []
        await fresh.get("/late-write", params={"update": "1"})
        assert [type(e) for e in outcomes] == [RuntimeError, RuntimeError]
    assert len(cstore.store) == before  # type: ignore[arg-type]  # no session nobody holds


def test_websocket_changes_are_saved_when_the_client_leaves(cstore: CountingStore) -> None:
    """The usual handler loops on ``receive_text()`` until the client leaves, which
    raises ``WebSocketDisconnect`` out of it: the connection ended, so its changes are
    saved as on a return (they were dropped: it answered 1, 2, 3 and stored 0). A
    handler that fails for another reason saves nothing, as an HTTP handler does."""

    async def ws_count(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            try:
                text = await websocket.receive_text()
            except WebSocketDisconnect:
                if "late" in websocket.query_params:  # handled, then another error
                    websocket.session["late"] = True
                    raise RuntimeError("failed after the client left") from None
                raise
            if text == "boom":
                websocket.session["boom"] = True
                raise RuntimeError("a bug in the handler")
            websocket.session["n"] = websocket.session.get("n", 0) + 1
            await websocket.send_text(str(websocket.session["n"]))

    app = make_app(cstore)
    app.router.routes.append(WebSocketRoute("/ws-count", ws_count))
    with TestClient(app, base_url=BASE) as tc:
        tc.post("/set", params={"key": "a", "value": "1"})
        sid = tc.cookies["session"]
        with (
            contextlib.suppress(WebSocketDisconnect),  # the handler's, passed on (1.x)
            tc.websocket_connect("wss://testserver/ws-count") as websocket,
        ):
            assert [websocket.send_text("x") or websocket.receive_text() for _ in "123"] == [
                "1",
                "2",
                "3",
            ]
        assert asyncio.run(cstore.get(sid)).data == {"a": "1", "n": 3}
        with (
            pytest.raises(RuntimeError, match="a bug"),
            tc.websocket_connect("wss://testserver/ws-count") as websocket,
        ):
            websocket.send_text("x")
            assert websocket.receive_text() == "4"
            websocket.send_text("boom")
            websocket.receive_text()
        with (
            contextlib.suppress(RuntimeError),
            tc.websocket_connect("wss://testserver/ws-count?late=1") as websocket,
        ):
            websocket.send_text("x")
            assert websocket.receive_text() == "4"
    assert asyncio.run(cstore.get(sid)).data == {"a": "1", "n": 3}  # neither saved


def test_login_after_a_websocket_accept_raises_and_leaves_the_session(
    cstore: CountingStore,
) -> None:
    async def ws_login(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            await login(websocket, "mallory")
        except RuntimeError as exc:
            await websocket.send_text(str(exc))
        await websocket.close()

    app = make_app(cstore)
    app.router.routes.append(WebSocketRoute("/ws-login", ws_login))
    with TestClient(app, base_url=BASE) as tc:
        tc.post("/login", params={"user": "alice"})
        sid = tc.cookies["session"]
        with tc.websocket_connect("wss://testserver/ws-login") as websocket:
            assert "accept" in websocket.receive_text()
        assert tc.get("/read").status_code == 200
    assert asyncio.run(cstore.get(sid)).user_id == "alice"


def test_the_exception_handler_closes_a_websocket_instead_of_breaking_it(
    cstore: CountingStore,
) -> None:
    """``install_exception_handler`` on a websocket route: a ``SessionError`` after
    the accept closes it with 1008 (a conflict) or 1013 (the store down), before the
    accept it refuses the handshake; it once sent an HTTP response on the socket,
    which the server refused (close 1006 and an ERROR traceback)."""
    from starlette.websockets import WebSocketDisconnect

    async def ws_save(websocket: WebSocket) -> None:
        if "before" in websocket.query_params:
            raise SessionConflict("refused before the accept (test)")
        await websocket.accept()
        await websocket.send_text("accepted")
        await websocket.receive_text()
        if "down" in websocket.query_params:
            raise StoreUnavailable("store down (test)")
        if "closed" in websocket.query_params:
            raise StoreClosed("store closed (test): shutting down")
        websocket.session["x"] = 1
        await save_session(websocket)  # the session was logged out meanwhile: 409

    app = make_app(cstore)
    app.router.routes.append(WebSocketRoute("/ws-save", ws_save))
    with TestClient(app, base_url=BASE) as tc:
        tc.post("/set", params={"key": "a", "value": "1"})
        for query, code in (("", 1008), ("?down=1", 1013), ("?closed=1", 1013)):
            with tc.websocket_connect(f"wss://testserver/ws-save{query}") as websocket:
                assert websocket.receive_text() == "accepted"
                if not query:
                    tc.post("/logout")
                websocket.send_text("go")
                message = websocket.receive()
            assert message == {"type": "websocket.close", "code": code, "reason": ""}, query
            tc.post("/set", params={"key": "a", "value": "1"})
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            tc.websocket_connect("wss://testserver/ws-save?before=1"),
        ):
            pass
        assert refused.value.code == 1008


@pytest.mark.parametrize("refused", ["conflict", "replaced"])
def test_a_websocket_goes_on_saving_after_a_refused_save(
    cstore: CountingStore, refused: str
) -> None:
    """A websocket's ``save_session`` refused with 409 (a key it read was changed by a
    parallel request; or a list it held was replaced by ``update_session``): its
    pending changes are dropped and the session taken as stored, so later saves and
    ``update_session`` work (review: every later save of the socket answered 409 and
    nothing more of it was saved). A list it still holds from before, as stored,
    is saved when changed."""

    async def ws_route(websocket: WebSocket) -> None:
        await websocket.accept()
        session = websocket.session
        n, cart = session["n"], session["cart"]
        await websocket.receive_text()  # meanwhile a request changes n
        if refused == "conflict":
            session["n"] = n + 10  # a dependent write on a stale read
        else:
            note = session["note"]
            await update_session(websocket, lambda d: d.update(note=[]))
            note.append("lost")  # no longer the session's
        outcome = []
        try:
            await save_session(websocket)
        except SessionConflict as exc:
            outcome.append(exc.details.get("reason", "conflict"))
        session["chat"] = "hello"  # a blind write
        await update_session(websocket, lambda d: d.update(n=d["n"] + 1))
        cart.append("pen")  # held from before the refusal, as stored
        await save_session(websocket)
        outcome.append("saved")
        await websocket.send_json(outcome)
        await websocket.close()

    async def bump(request: Request) -> JSONResponse:
        request.session["n"] += 1
        return JSONResponse(request.session["n"])

    app = make_app(cstore)
    app.router.routes.append(WebSocketRoute("/ws-refused", ws_route))
    app.router.routes.append(Route("/bump", bump, methods=["POST"]))
    with TestClient(app, base_url=BASE) as tc:
        sid = tc.post("/set", params={"key": "n", "value": "0"}).cookies["session"]
        session = tc.portal.call(cstore.get, sid)
        session.data.update(n=0, cart=["book"], note=["keep"])
        tc.portal.call(cstore.update, session)
        with tc.websocket_connect("wss://testserver/ws-refused") as websocket:
            assert tc.post("/bump").json() == 1
            websocket.send_text("go")
            assert websocket.receive_json() == [refused, "saved"]
        stored = tc.portal.call(cstore.get, sid).data
    note = ["keep"] if refused == "conflict" else []
    assert stored == {"n": 2, "cart": ["book", "pen"], "note": note, "chat": "hello"}


@pytest.mark.parametrize("elsewhere", ["logout", "login"])
def test_a_websocket_whose_session_ended_gets_a_conflict_not_a_crash(
    cstore: CountingStore, elsewhere: str
) -> None:
    """A chat socket is open when its session ends (a logout in another tab) or moves
    (a login): its next ``update_session`` and ``save_session`` answer 409 with the
    reason (``ended``, ``rotated``), which tells the app to close it (a FastAPI app
    over uvicorn: ``update_session`` raised ``RuntimeError``, an ERROR traceback and a
    dropped connection)."""

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        websocket.session.get("n")
        await websocket.receive_text()  # meanwhile the session ends or moves
        reasons = []
        for save in ("update", "save", "update"):
            try:
                if save == "update":
                    await update_session(websocket, lambda d: d.update(n=d.get("n", 0) + 1))
                else:
                    websocket.session["last"] = "hello"
                    await save_session(websocket)
            except SessionConflict as exc:
                reasons.append(exc.details["reason"])
        await websocket.send_json(reasons)
        await websocket.close()

    async def in_again(request: Request) -> JSONResponse:
        session = await login(request, "alice")
        return JSONResponse(session.user_id)

    app = make_app(cstore)
    app.router.routes.append(WebSocketRoute("/chat", chat))
    app.router.routes.append(Route("/in", in_again, methods=["POST"]))
    with TestClient(app, base_url=BASE) as tc:
        tc.post("/in")
        with tc.websocket_connect("wss://testserver/chat") as websocket:
            if elsewhere == "logout":
                tc.post("/logout")
            else:
                tc.post("/in")
            websocket.send_text("go")
            reason = "ended" if elsewhere == "logout" else "rotated"
            assert websocket.receive_json() == [reason] * 3


def test_websocket_refused_when_store_is_down(cstore: CountingStore) -> None:
    from starlette.websockets import WebSocketDisconnect

    app = make_app(cstore)
    with TestClient(app, base_url=BASE) as tc:
        sid = tc.post("/set", params={"key": "a", "value": "1"}).cookies["session"]
        assert sid
        cstore.fail.add("get")
        with (
            pytest.raises(WebSocketDisconnect) as exc_info,
            tc.websocket_connect("wss://testserver/ws"),
        ):
            pass
        assert exc_info.value.code == 1011


# ------------------------------------------------------------- store failures


async def test_store_failure_on_load_answers_503(
    cstore: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    async with client(make_app(cstore)) as c:
        await new_cookie(c)
        cstore.fail.add("get")
        with caplog.at_level(logging.ERROR, "asyncsession"):
            response = await c.get("/read")
    assert response.status_code == 503
    assert set_cookies(response) == []  # the cookie is kept for when the store is back
    assert "unavailable" in caplog.text


async def test_an_outage_logs_once_not_once_per_request(
    cstore: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    """20 requests while the store is down: 20 answers of 503, one ERROR record (the
    rest at DEBUG, counted in the next one logged), not one per request."""
    async with client(make_app(cstore)) as c:
        await new_cookie(c)
        cstore.fail.add("get")
        with caplog.at_level(logging.DEBUG, "asyncsession"):
            statuses = [(await c.get("/read")).status_code for _ in range(20)]
    assert statuses == [503] * 20
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and "answering 503" in loud[0].getMessage()
    assert sum("answering 503" in r.getMessage() for r in caplog.records) == 20


async def test_store_failure_can_degrade_to_anonymous(
    cstore: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_unavailable="anonymous"``: reads get an empty session (200, the cookie
    kept); every change (a write, ``clear()``, logout, logout everywhere, revoke,
    login) answers 503, never a 200 for what was not done: the real session lives on
    untouched and is back with the store."""
    async with client(make_app(cstore, on_unavailable="anonymous")) as c:
        sid = await new_cookie(c)
        await c.post("/login", params={"user": "u1"})
        sid = c.cookies["session"]
        before = await cstore.get(sid)
        cstore.fail.add("get")
        with caplog.at_level(logging.WARNING, "asyncsession"):
            response = await c.get("/read")
            assert response.status_code == 200
            assert response.json() == {}
            assert set_cookies(response) == []  # the real session is not thrown away
            changes = [
                ("/set", {"key": "b", "value": "2"}),
                ("/incr", {}),
                ("/clear", {}),
                ("/logout", {}),
                ("/everywhere", {"keep": "0"}),
                ("/revoke", {"short": before.short_id}),
                ("/login", {"user": "u2"}),
            ]
            for path, params in changes:
                response = await c.post(path, params=params)
                assert response.status_code == 503, (path, response.text)
                assert set_cookies(response) == [], path
        assert "anonymous" in caplog.text
        assert cstore.calls["create"] == 1  # nothing created while degraded
        cstore.fail.clear()
        assert (await c.get("/read")).json() == {"a": "1"}
    after = await cstore.get(sid)
    assert (after.data, after.user_id, after.version) == ({"a": "1"}, "u1", before.version)


async def test_store_failure_on_save_answers_503(cstore: CountingStore) -> None:
    async with client(make_app(cstore)) as c:
        await new_cookie(c)
        cstore.fail.add("apply")
        response = await c.post("/incr")
    assert response.status_code == 503
    assert response.text == "Session store unavailable"


def app_without_handlers(store: Any) -> Starlette:
    app = Starlette(routes=ROUTES)
    app.add_middleware(SessionMiddleware, store=store, cookie_name="session")
    return app


@pytest.mark.parametrize("what", ["value", "key"])
@pytest.mark.parametrize("handled", [False, True], ids=["bare", "install_exception_handler"])
async def test_not_serializable_is_a_logged_500_and_leaves_the_session(
    cstore: CountingStore, caplog: pytest.LogCaptureFixture, handled: bool, what: str
) -> None:
    make = make_app if handled else app_without_handlers
    # the app's own handler answers it (400 from install_exception_handler), else 500
    status = 400 if handled else 500
    async with client(make(cstore)) as c:
        sid = await new_cookie(c)
        before = await cstore.get(sid)
        with caplog.at_level(logging.ERROR, "asyncsession"):
            response = await c.post("/bad", params={what: "1"})
        assert response.status_code == status
        assert "never reaches" not in response.text
        if handled:
            assert response.json()["error"]["code"] == "SESSION_NOT_SERIALIZABLE"
        assert "SESSION_NOT_SERIALIZABLE" in caplog.text
        after = await cstore.get(sid)
        assert after.data == {"a": "1"} and after.version == before.version
        # an anonymous session is not created with bad data either
        async with client(make(cstore)) as fresh:
            response = await fresh.post("/bad", params={what: "1"})
        assert response.status_code == status
        assert set_cookies(response) == []
        assert len(cstore.store) == 1  # type: ignore[arg-type]


async def test_full_session_ids_never_reach_the_logs(
    cstore: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    ids: set[str] = set()
    with caplog.at_level(logging.DEBUG, "asyncsession"):
        async with client(make_app(cstore)) as c:
            ids.add(await new_cookie(c))
            response = await c.post("/login", params={"user": "eve"})
            ids.add(cookie_id(response))
            await c.get("/read", headers={"cookie": f"session={PLANTED}"})
            cstore.fail.add("get")
            await c.get("/read")
    ids.add(PLANTED)
    text = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert caplog.records
    for sid in ids:
        assert sid not in text


# ------------------------------------------------------------------- FastAPI


def test_fastapi_dependencies_and_exception_handler(cstore: CountingStore) -> None:
    api = fastapi.FastAPI()
    api.add_middleware(SessionMiddleware, store=cstore, cookie_name="session")
    install_exception_handler(api)

    @api.post("/login/{user}")
    async def login_route(user: str, request: fastapi.Request) -> dict[str, Any]:
        session = await login(request, user)
        return {"user": session.user_id}

    @api.post("/visit")
    async def visit(session: SessionDep) -> dict[str, Any]:
        session["visits"] = session.get("visits", 0) + 1
        return dict(session)

    @api.get("/me")
    async def me(user: CurrentUserDep, record: CurrentSessionDep) -> dict[str, Any]:
        assert record is not None
        return {"user": user, "short": record.short_id}

    @api.get("/missing")
    async def missing() -> None:
        raise SessionNotFound("no such session")

    @api.websocket("/ws")
    async def ws_route(websocket: fastapi.WebSocket, session: SessionDep) -> None:
        await websocket.accept()
        await websocket.send_json(dict(session))
        await websocket.close()

    with TestClient(api, base_url=BASE) as tc:
        assert tc.get("/me").status_code == 401
        assert tc.post("/visit").json() == {"visits": 1}
        assert tc.post("/visit").json() == {"visits": 2}
        assert tc.post("/login/zoe").json() == {"user": "zoe"}
        response = tc.get("/me")
        assert response.status_code == 200 and response.json()["user"] == "zoe"
        assert tc.post("/visit").json() == {"visits": 3}
        with tc.websocket_connect("wss://testserver/ws") as ws:
            assert ws.receive_json() == {"visits": 3}
        response = tc.get("/missing")
        assert response.status_code == 404
        assert response.json() == {
            "error": {"code": "SESSION_NOT_FOUND", "message": "no such session"}
        }


async def test_helpers_without_the_middleware_say_so() -> None:
    async def handler(request: Request) -> PlainTextResponse:
        await login(request, "x")
        return PlainTextResponse("")

    app = Starlette(routes=[Route("/", handler)])
    async with client(app) as c:
        with pytest.raises(RuntimeError, match="SessionMiddleware is not installed"):
            await c.get("/")


def test_package_imports_without_starlette() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['fastapi'] = None\n"
        "import asyncsession\n"
        "assert asyncsession.MemoryStore\n"
        "try:\n    asyncsession.SessionMiddleware\nexcept ImportError: print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"


def test_public_names_are_exported() -> None:
    import asyncsession

    for name in ("SessionMiddleware", "login", "logout", "SessionDep", "CurrentUserDep"):
        assert name in asyncsession.__all__
        assert getattr(asyncsession, name) is not None


# ------------------------------------------------------------ SessionDict


def _diff(d: SessionDict) -> tuple[list[str], list[str], dict[str, Any]] | None:
    """``d.changes()`` as (sorted set keys, deleted keys, expectations as JSON)."""
    changes = d.changes()
    if changes is None:
        return None
    expect = {
        k: None if v is ABSENT else orjson.loads(orjson.dumps(v)) for k, v in changes.expect.items()
    }
    return sorted(changes.set), sorted(changes.delete), expect


def test_session_dict_tracks_top_level_changes() -> None:
    d = SessionDict({"a": 1, "cart": ["x"], "prefs": {"theme": "dark"}, "gone": 0})
    assert d.changes() is None
    assert d["a"] == 1 and d.get("missing") is None  # scalar reads: nothing to encode
    assert d.changes() is None
    d["a"] = 1  # the same value
    d.get("prefs")  # a mutable value handed out, not changed
    assert d.changes() is None
    d["cart"].append("y")  # read, then changed: depends on what was read
    d.setdefault("new", []).append(1)  # read (absent), then set
    d.update({"b": 2}, c=3)  # blind
    d |= {"e": 5}
    del d["gone"]  # blind delete
    assert d.pop("nope", None) is None
    assert _diff(d) == (
        ["b", "c", "cart", "e", "new"],
        ["gone"],
        {"cart": ["x"], "new": None},
    )
    changes = d.changes()
    assert changes is not None and changes.expect["new"] is ABSENT


def test_session_dict_sees_mutations_through_items_and_copies() -> None:
    d = SessionDict({"cart": [], "prefs": {}})
    for key, value in d.items():
        if key == "cart":
            value.append(1)
    for value in d.values():
        if isinstance(value, dict):
            value["k"] = "v"
    assert _diff(d) == (["cart", "prefs"], [], {"cart": [], "prefs": {}})
    e = SessionDict({"cart": []})
    dict.__getitem__(e, "cart").append(1)  # around the session's methods: not seen ...
    assert e.changes() is None
    e.mark_changed("cart")  # ... unless marked (a blind write)
    assert _diff(e) == (["cart"], [], {})
    f = SessionDict({"a": 1})
    assert f.popitem() == ("a", 1)
    assert _diff(f) == ([], ["a"], {"a": 1})
    g = SessionDict({"a": {"x": 1}})
    g["a"]["x"] = 2
    g["a"]["x"] = 1  # back to what was loaded
    assert g.changes() is None
    h = SessionDict({"a": 1, "b": 2})
    assert len(h) == 2  # every key read, present or not
    h["a"] = 3
    h["z"] = 0
    assert _diff(h) == (["a", "z"], [], {"a": 1, "z": None})
    k = SessionDict({"f": 0.0})
    k["f"] = -0.0  # equal in Python, different JSON
    assert _diff(k) == (["f"], [], {})


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_second_lifespan_on_a_store_open_in_another_loop_is_refused_clearly(
    backend: str, tmp_path: Path
) -> None:
    """Two TestClients on one app run two lifespans, each in an event loop of its own:
    the second ``async with store`` is refused at once with a message that says what
    to do, rather than failing requests or its teardown later with a cross-loop
    RuntimeError (outside check, a port of Starlette's own session tests); the first
    client goes on working."""
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url, Config(cleanup_interval=timedelta(minutes=5)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with store:
            yield

    async def bump(request: Request) -> JSONResponse:
        request.session["n"] = request.session.get("n", 0) + 1
        return JSONResponse(request.session["n"])

    app = Starlette(
        routes=[Route("/", bump)],
        middleware=[Middleware(SessionMiddleware, store=store)],
        lifespan=lifespan,
    )
    with TestClient(app, base_url=BASE) as first:
        assert first.get("/").json() == 1
        second = TestClient(app, base_url=BASE)
        with pytest.raises(RuntimeError, match="already open in another event loop"):
            second.__enter__()
        assert first.get("/").json() == 2  # the first lifespan's store still serves
    assert store.closed


async def test_a_503_body_never_carries_the_backends_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``session_error_handler``'s 503 said what the store said: the Redis address
    and database, and up to 300 characters of the server's error text, to any
    client (outside fault test). The body is now fixed; the log keeps the cause."""

    async def down(request: Request) -> PlainTextResponse:
        raise StoreUnavailable(
            "Redis at redis://10.0.0.5:6379/3 is unavailable (ResponseError: user=app_rw)"
        )

    app = Starlette(routes=[Route("/down", down)])
    install_exception_handler(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        with caplog.at_level(logging.ERROR, "asyncsession"):
            response = await c.get("/down")
    assert response.status_code == 503
    assert response.json() == {
        "error": {"code": "STORE_UNAVAILABLE", "message": "session store unavailable"}
    }
    assert "10.0.0.5" not in response.text and "app_rw" not in response.text
    assert "10.0.0.5" in caplog.text  # the operator still sees why


def test_save_session_says_when_a_new_session_cannot_be_stored(cstore: CountingStore) -> None:
    """A client without a session writes after the websocket's accept (or after an
    HTTP response started) and the app calls ``save_session``: no cookie can carry
    a new id, so nothing is stored. It returned as if it had stored it (outside
    FastAPI tester); it raises ``RuntimeError`` now, as ``update_session`` does."""
    from starlette.background import BackgroundTask

    outcomes: list[str] = []

    async def try_save(connection: Any) -> None:
        connection.session["late"] = 1
        try:
            await save_session(connection)
            outcomes.append("saved?")
        except RuntimeError as exc:
            outcomes.append("refused" if "no cookie" in str(exc) else repr(exc))

    async def ws_anonymous(websocket: WebSocket) -> None:
        await websocket.accept()
        await try_save(websocket)
        await websocket.send_text(outcomes[-1])
        await websocket.close()

    async def http_late(request: Request) -> PlainTextResponse:
        return PlainTextResponse("sent", background=BackgroundTask(try_save, request))

    app = make_app(cstore)
    app.router.routes.append(WebSocketRoute("/ws-anonymous", ws_anonymous))
    app.router.routes.append(Route("/late", http_late))
    with TestClient(app, base_url=BASE) as tc:
        with tc.websocket_connect("wss://testserver/ws-anonymous") as websocket:
            assert websocket.receive_text() == "refused"
        assert tc.get("/late").text == "sent"
    assert outcomes == ["refused", "refused"]
    assert cstore.calls["create"] == 0
