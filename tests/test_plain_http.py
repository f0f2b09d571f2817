"""The one warning a process logs when the Secure session cookie meets plain http: a
Secure cookie set on an http response, or an http request from another machine."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("starlette")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asyncsession import Config, MemoryStore, SessionMiddleware
from asyncsession import _plain_http as plain_http


async def write(request: Request) -> JSONResponse:
    request.session["n"] = request.session.get("n", 0) + 1
    return JSONResponse({"n": request.session["n"]})


async def read(request: Request) -> JSONResponse:
    return JSONResponse(dict(request.session))


def make_app(**options: Any) -> Starlette:
    app = Starlette(routes=[Route("/write", write, methods=["POST"]), Route("/read", read)])
    store = MemoryStore.with_controls(Config(cleanup_interval=0))
    app.add_middleware(SessionMiddleware, store=store, **options)
    return app


def client(app: Starlette, base: str, address: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 4711))
    return httpx.AsyncClient(transport=transport, base_url=base)


@pytest.fixture
def warnings(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> Iterator[pytest.LogCaptureFixture]:
    monkeypatch.setattr(plain_http, "warned", False)  # a fresh process, as far as we know
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        yield caplog


def http_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "https_only" in r.getMessage()]


async def test_secure_cookie_over_http_is_logged_once(warnings: pytest.LogCaptureFixture) -> None:
    async with client(make_app(), "http://localhost") as c:
        for _ in range(50):  # httpx never sends the Secure cookie back: 50 new sessions
            assert (await c.post("/write")).json() == {"n": 1}
    (message,) = http_warnings(warnings)
    assert "Secure session cookie was set on a plain-http response" in message
    assert "https_only=False" in message and "proxy" in message
    (record,) = [r for r in warnings.records if r.getMessage() == message]
    assert (record.name, record.levelno) == ("asyncsession.asgi", logging.WARNING)


async def test_plain_http_from_another_machine_is_logged_once(
    warnings: pytest.LogCaptureFixture,
) -> None:
    async with client(make_app(), "http://app.internal", address="203.0.113.9") as c:
        for _ in range(20):
            assert (await c.get("/read")).status_code == 200  # no cookie is ever set
    (message,) = http_warnings(warnings)
    assert "non-loopback address" in message and "https_only=False" in message


@pytest.mark.parametrize(
    ("base", "address", "options"),
    [
        ("https://localhost", "203.0.113.9", {}),  # https: all is well
        ("http://localhost", "203.0.113.9", {"https_only": False}),  # chosen plain http
        ("http://localhost", "127.0.0.1", {}),  # reads from this machine set no cookie
        ("http://localhost", "::1", {}),
    ],
)
async def test_no_warning(
    warnings: pytest.LogCaptureFixture, base: str, address: str, options: dict[str, Any]
) -> None:
    app = make_app(**options)
    async with client(app, base, address) as c:
        for _ in range(3):
            await c.get("/read")
        if base.startswith("https") or options:
            assert (await c.post("/write")).json() == {"n": 1}
            assert (await c.post("/write")).json() == {"n": 2}  # the cookie came back
    assert http_warnings(warnings) == []
    assert plain_http.warned is False
