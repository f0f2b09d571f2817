"""The app tests/test_login_uvicorn.py serves with real uvicorn workers.

``create()`` (a uvicorn ``--factory``) opens the store named by
``ASYNCSESSION_LOGIN_STORE`` (an ``open_store`` URL) under the key prefix
``ASYNCSESSION_LOGIN_PREFIX``, so several worker processes share one store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asyncsession import (
    Config,
    SessionMiddleware,
    current_user_id,
    install_exception_handler,
    login,
    logout,
    open_store,
)


async def read(request: Request) -> JSONResponse:
    """The session; with ``delay``, after sleeping that long (a long poll)."""
    delay = float(request.query_params.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    return JSONResponse({"data": dict(request.session), "user": current_user_id(request)})


async def write(request: Request) -> JSONResponse:
    """Set ``key`` to ``value``; with ``delay``, after sleeping that long (the session
    was loaded before: a request that overlaps a login)."""
    params = request.query_params
    delay = float(params.get("delay", "0"))
    if delay:
        await asyncio.sleep(delay)
    request.session[params["key"]] = params["value"]
    return JSONResponse(dict(request.session))


async def do_login(request: Request) -> JSONResponse:
    session = await login(request, request.query_params["user"])
    return JSONResponse({"user": session.user_id})


async def do_logout(request: Request) -> JSONResponse:
    await logout(request)
    return JSONResponse({"user": None})


def create() -> Starlette:
    config = Config(
        key_prefix=os.environ.get("ASYNCSESSION_LOGIN_PREFIX", "session:"), cleanup_interval=0
    )
    store = open_store(os.environ["ASYNCSESSION_LOGIN_STORE"], config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with store:
            yield

    app = Starlette(
        routes=[
            Route("/read", read),
            Route("/write", write, methods=["POST"]),
            Route("/login", do_login, methods=["POST"]),
            Route("/logout", do_logout, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(SessionMiddleware, store=store, https_only=False)
    install_exception_handler(app)
    return app
