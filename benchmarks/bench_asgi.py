"""ASGI middleware: whole requests through a Starlette app, called in-process.

Every row calls the same Starlette app (one route that reads ``user_id`` from the
session, one that bumps a counter in it) directly as an ASGI callable, with a
prebuilt scope and a no-op ``send``: no sockets, no HTTP parsing, so what differs
between rows is the session middleware and its store. Sessions hold ``PAYLOAD``
(~1 KB).

Suites and targets (issue 5):

* ``asgi-redis``, Redis at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``):
  ours (``SessionMiddleware`` + ``RedisStore`` via ``open_store``) against the peer,
  starsessions' ``SessionMiddleware`` + ``SessionAutoloadMiddleware`` on its
  ``RedisStore``, same server, same run (issue 13 targets). Read-only request >= 2x
  the peer's requests/s with 1 client, >= 4x with 32 concurrent clients (each its
  own session); request changing one key >= 1.1x and >= 1.5x; request creating a
  new session >= 1.0x and >= 1.5x.
* ``asgi-memory``: ours on ``MemoryStore`` against the same app with no session
  middleware (baseline): the middleware may at most double the cost of a request
  (speed ratio >= 0.5), and a read-only request >= 2x starsessions on its
  ``InMemoryStore``.
* ``asgi-encryption``: a read-only request on ``MemoryStore`` with data encryption at
  rest (``Config.encryption_keys``) against the same request with it off, same run:
  encryption may cost at most 25% (speed ratio >= 0.8).
* ``asgi-sqlite``: ours on a SQLite file with ``Config.hash_ids`` (the default)
  against the same on a file with ``hash_ids=False``, ``SQLITE_STORED`` sessions in
  each: keeping ids hashed at rest may cost at most 5% of a read-only request
  (speed ratio >= 0.95; interleaved: time ratio <= 1.05).

    .venv/bin/pytest benchmarks/bench_asgi.py --benchmark-only \\
        --benchmark-json=.benchmarks/asgi.json
    .venv/bin/python benchmarks/ratios.py .benchmarks/asgi.json
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from conftest import PAYLOAD, AsyncBench, Runner, measure_concurrent
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starsessions import SessionAutoloadMiddleware
from starsessions import SessionMiddleware as StarSessionMiddleware
from starsessions.serializers import JsonSerializer
from starsessions.stores.base import SessionStore
from starsessions.stores.memory import InMemoryStore
from starsessions.stores.redis import RedisStore as StarRedisStore

from asyncsession import (
    ABSENT,
    Changes,
    Config,
    ControlledStore,
    SessionMiddleware,
    codec,
    generate_key,
    new_session,
    open_store,
)
from asyncsession.backends.redis.apply import apply_args
from asyncsession.backends.redis.scripts import APPLY, INSERT
from asyncsession.changes import encode_changes

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
COOKIE = "session"
READ_REDIS = {"peer": 2.0}
WRITE_REDIS = {"peer": 1.1}
NEW_REDIS = {"peer": 1.0}
READ_REDIS_32 = {"peer": 4.0}
WRITE_REDIS_32 = {"peer": 1.5}
NEW_REDIS_32 = {"peer": 1.5}
OVERHEAD = {"baseline": 0.5}  # at most 2x the cost of the app without sessions
MEMORY_READ = {"baseline": 0.5, "peer": 2.0}
ENCRYPTED_READ = {"baseline": 0.8}  # encryption on costs at most 25% of a request
SQLITE_HASHED = {"baseline": 0.95}  # hashed ids: at most 5% slower than plain ones
SQLITE_STORED = 2_000  # sessions in each SQLite file
CLIENTS = 32  # concurrent clients of the x32 rows, each with its own session
PER_CLIENT = 10  # requests each client sends in a row per round


# ----------------------------------------------------------------------- the app


async def read(request: Request) -> PlainTextResponse:
    session = request.scope.get("session")
    user = session.get("user_id") if session is not None else None
    return PlainTextResponse(user or "anonymous")


async def write(request: Request) -> PlainTextResponse:
    session = request.scope.get("session")
    if session is not None:
        session["counter"] = session.get("counter", 0) + 1
    return PlainTextResponse("ok")


ROUTES = [Route("/", read), Route("/write", write, methods=["GET", "POST"])]


def plain_app() -> Starlette:
    return Starlette(routes=ROUTES)


def our_app(store: ControlledStore) -> Starlette:
    return Starlette(
        routes=ROUTES, middleware=[Middleware(SessionMiddleware, store=store, cookie_name=COOKIE)]
    )


def their_app(store: SessionStore) -> Starlette:
    return Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(StarSessionMiddleware, store=store, cookie_https_only=True),
            Middleware(SessionAutoloadMiddleware),
        ],
    )


class FloorMiddleware:
    """The floor of a Redis request of this design: our store's Redis work for it as
    bare redis-py calls (the same ``HMGET`` to load, ``EVALSHA`` of the apply script
    with the whole new record, ``EVALSHA`` of the insert script), with no checks,
    hooks, events, request deadline, batching or cookie attributes. Keys, script
    arguments and records are built by the store's own helpers (the work any
    implementation of this layout has to do)."""

    def __init__(self, app: Any, store: ControlledStore) -> None:
        self.app = app
        self.inner: Any = store.store  # the RedisStore behind the controls
        self.client = self.inner._transport.client

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        inner = self.inner
        cookie = next((v for k, v in scope["headers"] if k == b"cookie"), None)
        session = None
        if cookie is not None:
            handle = inner._key(cookie.decode().partition("=")[2])
            r, a, e = await self.client.hmget(inner.session_key(handle), "r", "a", "e")
            session = codec.decode(r, int(a), int(e) if e else None)
            session.id = handle
        data = dict(session.data) if session is not None else {}
        before = dict(data)
        scope["session"] = data

        async def wrapped(message: Any) -> None:
            if message["type"] == "http.response.start" and data != before:
                now = inner.clock()
                if session is None:
                    ttl = inner.config.default_ttl
                    new = new_session(None, ttl, data=data, now=now)
                    sid, handle = new.id, inner._key(new.id)
                    new.id = handle
                    args = inner._insert_args(new, codec.encode(new), inner.config, now)
                    keys = (inner.session_key(handle), inner.expiry_key_for(handle))
                    reply = await self.client.evalsha(INSERT.sha, 2, *keys, *args)
                    assert reply == [b"ok"], reply
                    cookie = f"{COOKIE}={sid}; Path=/; HttpOnly; Secure; SameSite=lax"
                    message["headers"] = [*message["headers"], (b"set-cookie", cookie.encode())]
                else:
                    changed = {k: v for k, v in data.items() if before.get(k, _ABSENT) != v}
                    expect = {k: before.get(k, ABSENT) for k in changed}
                    changes = encode_changes(Changes(set=changed, expect=expect))
                    args = apply_args(
                        session.id, changes, inner.config, now, 0, inner.expiry_grace_ms, session
                    )
                    keys = (inner.session_key(session.id), inner.expiry_key_for(session.id))
                    reply = await self.client.evalsha(APPLY.sha, 2, *keys, *args)
                    assert isinstance(reply, list) and reply[0] == b"ok", reply
            await send(message)

        await self.app(scope, receive, wrapped)


_ABSENT = object()


def floor_app(store: ControlledStore) -> Starlette:
    return Starlette(routes=ROUTES, middleware=[Middleware(FloorMiddleware, store)])


class Client:
    """Calls an ASGI app in-process with a fixed cookie; checks the status."""

    def __init__(self, app: Any, cookie: str | None) -> None:
        self.app = app
        headers = [(b"host", b"bench"), (b"user-agent", b"bench/1.0")]
        if cookie is not None:
            headers.append((b"cookie", f"{COOKIE}={cookie}".encode()))
        self.headers = headers
        self.status = 0

    def scope(self, path: str) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "https",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": list(self.headers),
            "client": ("127.0.0.1", 50000),
            "server": ("bench", 443),
            "state": {},
        }

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]

    async def get(self, path: str) -> None:
        await self.app(self.scope(path), self.receive, self.send)


def checked(runner: Runner, client: Client, path: str) -> Client:
    runner.run(client.get(path))
    assert client.status == 200, client.status
    return client


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def memory(runner: Runner) -> Iterator[tuple[ControlledStore, str]]:
    store = open_store("memory://", Config(cleanup_interval=0))
    session = runner.run(store.create(new_session("u-48213", data=PAYLOAD)))
    yield store, session.id
    runner.run(store.close())


@pytest.fixture(scope="module")
def memory_encrypted(runner: Runner) -> Iterator[tuple[ControlledStore, str]]:
    store = open_store(
        "memory://", Config(cleanup_interval=0, encryption_keys=(generate_key(), generate_key()))
    )
    session = runner.run(store.create(new_session("u-48213", data=PAYLOAD)))
    yield store, session.id
    runner.run(store.close())


@pytest.fixture(scope="module")
def redis(runner: Runner) -> Iterator[tuple[ControlledStore, str]]:
    prefix = f"bench-asgi-{uuid.uuid4().hex[:8]}:"
    try:
        store = open_store(REDIS_URL, Config(cleanup_interval=0, key_prefix=prefix))
        session = runner.run(store.create(new_session("u-48213", data=PAYLOAD)))
    except Exception as exc:  # no RedisStore yet, or no server
        if os.environ.get("ASYNCSESSION_REQUIRE_REDIS") == "1":
            raise
        pytest.skip(f"Redis rows need RedisStore and a server at {REDIS_URL}: {exc}")
    yield store, session.id
    runner.run(store.delete(session.id))
    runner.run(store.close())


@pytest.fixture(scope="module")
def redis_many(
    runner: Runner, redis: tuple[ControlledStore, str]
) -> Iterator[tuple[ControlledStore, list[str]]]:
    store, _ = redis
    ids = [runner.run(store.create(new_session(f"u-{n}", data=PAYLOAD))).id for n in range(CLIENTS)]
    yield store, ids
    for session_id in ids:
        runner.run(store.delete(session_id))


@pytest.fixture(scope="module")
def redis_fresh(runner: Runner) -> Iterator[ControlledStore]:
    """A store whose sessions are all made by the new-session rows (deleted after)."""
    prefix = f"bench-asgi-new-{uuid.uuid4().hex[:8]}:"
    try:
        store = open_store(REDIS_URL, Config(cleanup_interval=0, key_prefix=prefix))
    except Exception as exc:
        if os.environ.get("ASYNCSESSION_REQUIRE_REDIS") == "1":
            raise
        pytest.skip(f"Redis rows need a server at {REDIS_URL}: {exc}")
    yield store
    runner.run(_delete_prefix(prefix))
    runner.run(store.close())


async def _delete_prefix(prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])
    await client.aclose()


@pytest.fixture(scope="module")
def sqlite_files(runner: Runner) -> Iterator[dict[bool, tuple[ControlledStore, str]]]:
    """By ``hash_ids``: a SQLite store on a file of its own holding ``SQLITE_STORED``
    sessions, and the id of one of them."""
    directory = tempfile.mkdtemp(
        prefix="asyncsession-bench-asgi-", dir=os.environ.get("ASYNCSESSION_BENCH_DIR")
    )
    stores: dict[bool, tuple[ControlledStore, str]] = {}

    async def fill(store: ControlledStore) -> str:
        ids = [
            (await store.create(new_session(f"u-{n}", data=PAYLOAD))).id
            for n in range(SQLITE_STORED)
        ]
        return ids[len(ids) // 2]

    try:
        for hash_ids in (True, False):
            name = "hashed" if hash_ids else "plain"
            store = open_store(
                f"sqlite:///{directory}/{name}.db", Config(cleanup_interval=0, hash_ids=hash_ids)
            )
            stores[hash_ids] = (store, runner.run(fill(store)))
        yield stores
    finally:
        for store, _ in stores.values():
            runner.run(store.close())
        shutil.rmtree(directory, ignore_errors=True)


def _their_session(runner: Runner, store: SessionStore) -> str:
    session_id = secrets.token_hex(16)
    runner.run(store.write(session_id, JsonSerializer().serialize(PAYLOAD), 0, 86_400))
    return session_id


@pytest.fixture(scope="module")
def their_redis(runner: Runner) -> Iterator[tuple[StarRedisStore, str]]:
    from redis.asyncio import Redis

    try:
        connection = Redis.from_url(REDIS_URL)
        runner.run(connection.ping())
    except Exception as exc:
        if os.environ.get("ASYNCSESSION_REQUIRE_REDIS") == "1":
            raise
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"bench-asgi-ss-{uuid.uuid4().hex[:8]}:"
    store = StarRedisStore(connection=connection, prefix=prefix)
    session_id = _their_session(runner, store)
    yield store, session_id
    runner.run(_delete_prefix(prefix))
    runner.run(connection.aclose())


# ---------------------------------------------------------------------- rows


def test_asgi_memory_read_baseline(abench: AsyncBench, runner: Runner) -> None:
    client = checked(runner, Client(plain_app(), None), "/")
    abench.describe(
        suite="asgi-memory",
        role="baseline",
        op="read request",
        label="app without session middleware",
        group="asgi memory: read-only request",
    )
    abench(lambda i: client.get("/"))


def test_asgi_memory_read(
    abench: AsyncBench, runner: Runner, memory: tuple[ControlledStore, str]
) -> None:
    store, session_id = memory
    client = checked(runner, Client(our_app(store), session_id), "/")
    abench.describe(
        suite="asgi-memory",
        role="ours",
        op="ours read request",
        compare="read request",
        label="SessionMiddleware on MemoryStore (controlled)",
        group="asgi memory: read-only request",
        targets=MEMORY_READ,
    )
    abench(lambda i: client.get("/"))


def test_asgi_memory_read_peer(abench: AsyncBench, runner: Runner) -> None:
    store = InMemoryStore()
    client = checked(runner, Client(their_app(store), _their_session(runner, store)), "/")
    abench.describe(
        suite="asgi-memory",
        role="peer",
        op="read request",
        label="starsessions SessionMiddleware + autoload on InMemoryStore",
        group="asgi memory: read-only request",
    )
    abench(lambda i: client.get("/"))


def test_asgi_memory_read_unencrypted(
    abench: AsyncBench, runner: Runner, memory: tuple[ControlledStore, str]
) -> None:
    store, session_id = memory
    client = checked(runner, Client(our_app(store), session_id), "/")
    abench.describe(
        suite="asgi-encryption",
        role="baseline",
        op="read request",
        label="SessionMiddleware on MemoryStore, encryption off",
        group="asgi memory: read-only request, encryption at rest",
    )
    abench(lambda i: client.get("/"))


def test_asgi_memory_read_encrypted(
    abench: AsyncBench, runner: Runner, memory_encrypted: tuple[ControlledStore, str]
) -> None:
    store, session_id = memory_encrypted
    client = checked(runner, Client(our_app(store), session_id), "/")
    abench.describe(
        suite="asgi-encryption",
        role="ours",
        op="ours encrypted read request",
        compare="read request",
        label="SessionMiddleware on MemoryStore, encryption on (AES-256-GCM)",
        group="asgi memory: read-only request, encryption at rest",
        targets=ENCRYPTED_READ,
    )
    abench(lambda i: client.get("/"))


def test_asgi_memory_write_baseline(abench: AsyncBench, runner: Runner) -> None:
    client = checked(runner, Client(plain_app(), None), "/write")
    abench.describe(
        suite="asgi-memory",
        role="baseline",
        op="write request",
        label="app without session middleware",
        group="asgi memory: request changing one key",
    )
    abench(lambda i: client.get("/write"))


def test_asgi_memory_write(
    abench: AsyncBench, runner: Runner, memory: tuple[ControlledStore, str]
) -> None:
    store, session_id = memory
    client = checked(runner, Client(our_app(store), session_id), "/write")
    abench.describe(
        suite="asgi-memory",
        role="ours",
        op="ours write request",
        compare="write request",
        label="SessionMiddleware on MemoryStore (controlled)",
        group="asgi memory: request changing one key",
    )
    abench(lambda i: client.get("/write"))


def test_asgi_memory_write_peer(abench: AsyncBench, runner: Runner) -> None:
    store = InMemoryStore()
    client = checked(runner, Client(their_app(store), _their_session(runner, store)), "/write")
    abench.describe(
        suite="asgi-memory",
        role="peer",
        op="write request",
        label="starsessions SessionMiddleware + autoload on InMemoryStore",
        group="asgi memory: request changing one key",
    )
    abench(lambda i: client.get("/write"))


def test_asgi_redis_read(
    abench: AsyncBench, runner: Runner, redis: tuple[ControlledStore, str]
) -> None:
    store, session_id = redis
    client = checked(runner, Client(our_app(store), session_id), "/")
    abench.describe(
        suite="asgi-redis",
        role="ours",
        op="ours read request",
        compare="read request",
        label="SessionMiddleware on RedisStore",
        group="asgi redis: read-only request",
        targets=READ_REDIS,
    )
    abench(lambda i: client.get("/"))


def test_asgi_redis_read_peer(
    abench: AsyncBench, runner: Runner, their_redis: tuple[StarRedisStore, str]
) -> None:
    store, session_id = their_redis
    client = checked(runner, Client(their_app(store), session_id), "/")
    abench.describe(
        suite="asgi-redis",
        role="peer",
        op="read request",
        label="starsessions SessionMiddleware + autoload on its RedisStore",
        group="asgi redis: read-only request",
    )
    abench(lambda i: client.get("/"))


def test_asgi_redis_write(
    abench: AsyncBench, runner: Runner, redis: tuple[ControlledStore, str]
) -> None:
    store, session_id = redis
    client = checked(runner, Client(our_app(store), session_id), "/write")
    abench.describe(
        suite="asgi-redis",
        role="ours",
        op="ours write request",
        compare="write request",
        label="SessionMiddleware on RedisStore",
        group="asgi redis: request changing one key",
        targets=WRITE_REDIS,
    )
    abench(lambda i: client.get("/write"))
    data = runner.run(store.get(session_id)).data
    assert data["counter"] > 1000 and orjson.dumps(data["cart"]) == orjson.dumps(PAYLOAD["cart"])


def test_asgi_redis_write_peer(
    abench: AsyncBench, runner: Runner, their_redis: tuple[StarRedisStore, str]
) -> None:
    store, session_id = their_redis
    client = checked(runner, Client(their_app(store), session_id), "/write")
    abench.describe(
        suite="asgi-redis",
        role="peer",
        op="write request",
        label="starsessions SessionMiddleware + autoload on its RedisStore",
        group="asgi redis: request changing one key",
    )
    abench(lambda i: client.get("/write"))


def _x32(abench: AsyncBench, runner: Runner, clients: list[Client], path: str) -> None:
    for client in clients:
        checked(runner, client, path)

    async def op(i: int) -> None:
        client = clients[i % CLIENTS]
        await client.get(path)

    measure_concurrent(abench, op, workers=CLIENTS, per_worker=PER_CLIENT)


def test_asgi_redis_read_x32(
    abench: AsyncBench, runner: Runner, redis_many: tuple[ControlledStore, list[str]]
) -> None:
    store, ids = redis_many
    app = our_app(store)
    abench.describe(
        suite="asgi-redis",
        role="ours",
        op="ours read request x32",
        compare="read request x32",
        label="SessionMiddleware on RedisStore, 32 clients",
        group="asgi redis: read-only request, 32 clients",
        targets=READ_REDIS_32,
    )
    _x32(abench, runner, [Client(app, i) for i in ids], "/")


def test_asgi_redis_read_x32_peer(
    abench: AsyncBench, runner: Runner, their_redis: tuple[StarRedisStore, str]
) -> None:
    store, _ = their_redis
    app = their_app(store)
    abench.describe(
        suite="asgi-redis",
        role="peer",
        op="read request x32",
        label="starsessions on its RedisStore, 32 clients",
        group="asgi redis: read-only request, 32 clients",
    )
    ids = [_their_session(runner, store) for _ in range(CLIENTS)]
    _x32(abench, runner, [Client(app, i) for i in ids], "/")


def test_asgi_redis_write_x32(
    abench: AsyncBench, runner: Runner, redis_many: tuple[ControlledStore, list[str]]
) -> None:
    store, ids = redis_many
    app = our_app(store)
    abench.describe(
        suite="asgi-redis",
        role="ours",
        op="ours write request x32",
        compare="write request x32",
        label="SessionMiddleware on RedisStore, 32 clients",
        group="asgi redis: request changing one key, 32 clients",
        targets=WRITE_REDIS_32,
    )
    _x32(abench, runner, [Client(app, i) for i in ids], "/write")


def test_asgi_redis_write_x32_peer(
    abench: AsyncBench, runner: Runner, their_redis: tuple[StarRedisStore, str]
) -> None:
    store, _ = their_redis
    app = their_app(store)
    abench.describe(
        suite="asgi-redis",
        role="peer",
        op="write request x32",
        label="starsessions on its RedisStore, 32 clients",
        group="asgi redis: request changing one key, 32 clients",
    )
    ids = [_their_session(runner, store) for _ in range(CLIENTS)]
    _x32(abench, runner, [Client(app, i) for i in ids], "/write")


def test_asgi_redis_new(abench: AsyncBench, runner: Runner, redis_fresh: ControlledStore) -> None:
    client = checked(runner, Client(our_app(redis_fresh), None), "/write")
    abench.describe(
        suite="asgi-redis",
        role="ours",
        op="ours new-session request",
        compare="new-session request",
        label="SessionMiddleware on RedisStore",
        group="asgi redis: request creating a session",
        targets=NEW_REDIS,
    )
    abench(lambda i: client.get("/write"))


def test_asgi_redis_new_peer(
    abench: AsyncBench, runner: Runner, their_redis: tuple[StarRedisStore, str]
) -> None:
    store, _ = their_redis
    client = checked(runner, Client(their_app(store), None), "/write")
    abench.describe(
        suite="asgi-redis",
        role="peer",
        op="new-session request",
        label="starsessions on its RedisStore",
        group="asgi redis: request creating a session",
    )
    abench(lambda i: client.get("/write"))


def test_asgi_redis_new_x32(
    abench: AsyncBench, runner: Runner, redis_fresh: ControlledStore
) -> None:
    app = our_app(redis_fresh)
    abench.describe(
        suite="asgi-redis",
        role="ours",
        op="ours new-session request x32",
        compare="new-session request x32",
        label="SessionMiddleware on RedisStore, 32 clients",
        group="asgi redis: request creating a session, 32 clients",
        targets=NEW_REDIS_32,
    )
    _x32(abench, runner, [Client(app, None) for _ in range(CLIENTS)], "/write")


def test_asgi_redis_new_x32_peer(
    abench: AsyncBench, runner: Runner, their_redis: tuple[StarRedisStore, str]
) -> None:
    store, _ = their_redis
    app = their_app(store)
    abench.describe(
        suite="asgi-redis",
        role="peer",
        op="new-session request x32",
        label="starsessions on its RedisStore, 32 clients",
        group="asgi redis: request creating a session, 32 clients",
    )
    _x32(abench, runner, [Client(app, None) for _ in range(CLIENTS)], "/write")


def test_asgi_sqlite_read(
    abench: AsyncBench, runner: Runner, sqlite_files: dict[bool, tuple[ControlledStore, str]]
) -> None:
    store, session_id = sqlite_files[True]
    client = checked(runner, Client(our_app(store), session_id), "/")
    abench.describe(
        suite="asgi-sqlite",
        role="ours",
        op="ours read request (hashed ids)",
        compare="read request (plain ids)",
        label="SessionMiddleware on SQLiteStore, hash_ids=True (default)",
        group="asgi sqlite: read-only request",
        targets=SQLITE_HASHED,
    )
    abench(lambda i: client.get("/"))


def test_asgi_sqlite_read_plain(
    abench: AsyncBench, runner: Runner, sqlite_files: dict[bool, tuple[ControlledStore, str]]
) -> None:
    store, session_id = sqlite_files[False]
    client = checked(runner, Client(our_app(store), session_id), "/")
    abench.describe(
        suite="asgi-sqlite",
        role="baseline",
        op="read request (plain ids)",
        label="SessionMiddleware on SQLiteStore, hash_ids=False",
        group="asgi sqlite: read-only request",
    )
    abench(lambda i: client.get("/"))


def test_asgi_sqlite_hash_interleaved(
    benchmark: Any, runner: Runner, sqlite_files: dict[bool, tuple[ControlledStore, str]]
) -> None:
    """The 5% target, measured robustly: read-only requests on the hashed and the
    plain file alternate in batches, round after round, on the wall clock (the
    store's work runs on aiosqlite's threads). Reported: the best batch of each
    (us/request) and hashed time / plain time, of the best batches and as the median
    of each round's ratio (target <= 1.05 for both)."""
    clients = {
        hashed: checked(runner, Client(our_app(store), session_id), "/")
        for hashed, (store, session_id) in sqlite_files.items()
    }
    ops, rounds = 20, 200  # short batches: fewer of them disturbed by neighbours
    times: dict[bool, list[float]] = {True: [], False: []}

    async def batch(client: Client) -> float:
        start = time.perf_counter()
        for _ in range(ops):
            await client.get("/")
        return (time.perf_counter() - start) / ops

    def measure() -> None:
        for round_no in range(rounds):
            for hashed in (True, False) if round_no % 2 else (False, True):
                times[hashed].append(runner.run(batch(clients[hashed])))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    per_round = [h / p for h, p in zip(times[True], times[False], strict=True)]
    benchmark.group = "asgi sqlite: hashed vs plain ids, interleaved"
    benchmark.extra_info.update(
        suite="asgi-sqlite",
        role="ours",
        op="hash interleaved",
        label="read-only request, hash_ids True vs False, interleaved",
        hashed_best_us=min(times[True]) * 1e6,
        plain_best_us=min(times[False]) * 1e6,
        hashed_median_us=statistics.median(times[True]) * 1e6,
        plain_median_us=statistics.median(times[False]) * 1e6,
        hash_time_ratio=min(times[True]) / min(times[False]),
        hash_time_ratio_median=statistics.median(per_round),
        targets={"hash_time_ratio": 1.05, "hash_time_ratio_median": 1.05},
    )


# ------------------------------------------------------- interleaved ratios


def test_asgi_interleaved(
    benchmark: Any,
    runner: Runner,
    memory: tuple[ControlledStore, str],
    redis: tuple[ControlledStore, str],
    their_redis: tuple[StarRedisStore, str],
) -> None:
    """The targets, measured robustly on a busy machine: pytest-benchmark runs the rows
    above one after another, so load from other processes lands on some rows and not
    others. Here every variant runs one short batch in turn, round after round, and
    the best batch of each (the least disturbed) is compared. The memory rows are
    timed on the thread's CPU clock (no I/O, blind to other processes); the Redis
    rows on the wall clock (their cost is mostly waiting for the server).

    The ``*_time_ratio`` numbers are our time / the reference's time (lower is
    better): memory <= 2.0 (overhead at most 2x), Redis read <= 1/2, write <= 1/1.1.
    ``floor_*`` is ``FloorMiddleware`` against the peer (the best this design reaches
    here), ``redis_*_vs_floor`` ours against it.
    """
    store, session_id = memory
    rstore, rsession_id = redis
    tstore, tsession_id = their_redis
    clients = {
        "plain read": (checked(runner, Client(plain_app(), None), "/"), "/"),
        "memory read": (checked(runner, Client(our_app(store), session_id), "/"), "/"),
        "plain write": (checked(runner, Client(plain_app(), None), "/write"), "/write"),
        "memory write": (
            checked(runner, Client(our_app(store), session_id), "/write"),
            "/write",
        ),
        "redis read": (checked(runner, Client(our_app(rstore), rsession_id), "/"), "/"),
        "star read": (checked(runner, Client(their_app(tstore), tsession_id), "/"), "/"),
        "redis write": (
            checked(runner, Client(our_app(rstore), rsession_id), "/write"),
            "/write",
        ),
        "star write": (
            checked(runner, Client(their_app(tstore), tsession_id), "/write"),
            "/write",
        ),
        "floor read": (checked(runner, Client(floor_app(rstore), rsession_id), "/"), "/"),
        "floor write": (
            checked(runner, Client(floor_app(rstore), rsession_id), "/write"),
            "/write",
        ),
    }
    cpu = {"plain read", "memory read", "plain write", "memory write"}
    ops, rounds = 50, 40
    best = dict.fromkeys(clients, float("inf"))

    async def batch(client: Client, path: str, clock: Any) -> float:
        start = clock()
        for _ in range(ops):
            await client.get(path)
        return (clock() - start) / ops

    def measure() -> None:
        for _ in range(rounds):
            for name, (client, path) in clients.items():
                clock = time.thread_time if name in cpu else time.perf_counter
                best[name] = min(best[name], runner.run(batch(client, path, clock)))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    info = benchmark.extra_info
    info.update(suite="asgi-interleaved", role="ours", op="interleaved", label="interleaved")
    for name, seconds in best.items():
        info[f"{name.replace(' ', '_')}_us"] = seconds * 1e6
    info["memory_read_time_ratio"] = best["memory read"] / best["plain read"]
    info["memory_write_time_ratio"] = best["memory write"] / best["plain write"]
    info["redis_read_time_ratio"] = best["redis read"] / best["star read"]
    info["redis_write_time_ratio"] = best["redis write"] / best["star write"]
    # the floor (FloorMiddleware): the best this design can do against the peer here,
    # and ours against it (no targets: what is reachable at all, and what we cost)
    for kind in ("read", "write"):
        info[f"floor_{kind}_time_ratio"] = best[f"floor {kind}"] / best[f"star {kind}"]
        info[f"redis_{kind}_vs_floor_time_ratio"] = best[f"redis {kind}"] / best[f"floor {kind}"]
    info["targets"] = {
        "memory_read_time_ratio": 2.0,
        "redis_read_time_ratio": 0.5,
        "redis_write_time_ratio": round(1 / 1.1, 3),
    }
