"""The app tests/test_http_races.py serves with real uvicorn workers.

Configured by environment: ``RACE_BACKEND`` (memory, sqlite or redis),
``RACE_TARGET`` (the SQLite file or the Redis URL) and ``RACE_PREFIX`` (Redis keys).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from asyncsession import (
    Config,
    ControlledStore,
    MemoryStore,
    SessionMiddleware,
    install_exception_handler,
    update_session,
    with_controls,
)


def _store() -> ControlledStore:
    backend = os.environ.get("RACE_BACKEND", "memory")
    config = Config(cleanup_interval=0, key_prefix=os.environ.get("RACE_PREFIX", "session:"))
    if backend == "sqlite":
        from asyncsession import SQLiteStore

        return SQLiteStore.with_controls(os.environ["RACE_TARGET"], config)
    if backend == "redis":
        from asyncsession import RedisStore

        return with_controls(RedisStore.from_url(os.environ["RACE_TARGET"], config), config)
    return MemoryStore.with_controls(config)


STORE = _store()


async def start(request: Request) -> PlainTextResponse:
    request.session["started"] = True
    return PlainTextResponse("ok")


async def rmw(request: Request) -> JSONResponse:
    """A plain read-modify-write: the docs' visits counter before update_session."""
    request.session["n"] = request.session.get("n", 0) + 1
    return JSONResponse({"n": request.session["n"]})


async def helper(request: Request) -> JSONResponse:
    def bump(data: dict[str, Any]) -> int:
        data["n"] = data.get("n", 0) + 1
        return int(data["n"])

    return JSONResponse({"n": await update_session(request, bump)})


async def own_key(request: Request) -> JSONResponse:
    key = request.path_params["key"]
    request.session[key] = request.session.get(key, 0) + 1
    return JSONResponse({key: request.session[key]})


async def tag(request: Request) -> PlainTextResponse:
    """A new visitor's first write: its session is created with this tag."""
    request.session["tag"] = request.path_params["tag"]
    return PlainTextResponse("ok")


async def read(request: Request) -> JSONResponse:
    return JSONResponse(dict(request.session))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with STORE:
        yield


app = Starlette(
    routes=[
        Route("/start", start, methods=["POST"]),
        Route("/rmw", rmw, methods=["POST"]),
        Route("/helper", helper, methods=["POST"]),
        Route("/key/{key}", own_key, methods=["POST"]),
        Route("/tag/{tag}", tag, methods=["POST"]),
        Route("/read", read),
    ],
    lifespan=lifespan,
)
install_exception_handler(app)
app.add_middleware(SessionMiddleware, store=STORE, cookie_name="sid", https_only=False)
