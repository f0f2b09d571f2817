"""Redis backend for the conformance suite.

Runs against the server at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``),
each test under its own key prefix. Without a reachable server it falls back to
fakeredis (with Lua), unless ``ASYNCSESSION_REQUIRE_REDIS=1``: then an unreachable
server fails the tests instead of silently testing something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

from asyncsession import Config, SessionLimitExceeded, Store, new_session

from .clock import FakeClock

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE = os.environ.get("ASYNCSESSION_REQUIRE_REDIS") == "1"

_reachable: bool | None = None


#: What redis-py sends on a new connection before any request (``on_connect``)
HANDSHAKE_COMMANDS = frozenset({b"HELLO", b"AUTH", b"CLIENT", b"SELECT", b"READONLY", b"PING"})


def is_handshake(packed: Any) -> bool:
    """Whether a ``send_packed_command`` payload is a connection's set-up, not a request.

    Tests that count round trips count requests only: whether a batch needed a
    fresh connection (which redis-py opens with ``CLIENT SETINFO`` and such)
    depends on timing, not on the code under test.
    """
    first = packed if isinstance(packed, (bytes, bytearray, memoryview)) else packed[0]
    parts = bytes(first[:64]).split(b"\r\n")
    return len(parts) > 2 and parts[2].upper() in HANDSHAKE_COMMANDS


def server_reachable() -> bool:
    """One TCP (or unix socket) connect + PING, cached for the session."""
    global _reachable
    if _reachable is None:
        _reachable = _ping()
    return _reachable


def _ping() -> bool:
    parts = urlsplit(REDIS_URL)
    try:
        if parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(1.0)
            sock.connect(parts.path)
        else:
            sock = socket.create_connection(
                (parts.hostname or "127.0.0.1", parts.port or 6379), 1.0
            )
    except OSError:
        return False
    with sock:
        try:
            if parts.password:
                user = parts.username or "default"
                sock.sendall(b"AUTH %s %s\r\n" % (user.encode(), parts.password.encode()))
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def skip_reason() -> str | None:
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis is not installed (pip install 'asyncsession[redis]')"
    if server_reachable():
        return None
    if REQUIRE:
        return None  # open_raw fails loudly
    try:
        import fakeredis  # noqa: F401
        import lupa  # noqa: F401
    except ImportError:
        return f"no Redis at {REDIS_URL} and fakeredis[lua] is not installed"
    return None


def using_fakeredis() -> bool:
    return not server_reachable() and not REQUIRE


def prefix_for(namespace: str) -> str:
    return f"test:{namespace}:"


async def open_raw(config: Config, clock: FakeClock, namespace: str) -> Store:
    from dataclasses import replace

    from asyncsession.backends.redis import RedisStore

    config = replace(config, key_prefix=prefix_for(namespace))
    if server_reachable():
        store: RedisStore = cleaning_store_class().from_url(REDIS_URL, config, clock=clock)
    elif REQUIRE:
        raise AssertionError(
            f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis server answers at {REDIS_URL}"
        )
    else:
        store = cleaning_store_class()(fake_client(), config, clock=clock)
    await store.__aenter__()
    return store


_fake_server: Any = None


def fake_client() -> Any:
    """A fakeredis client; all clients of a test run share one fake server."""
    import fakeredis

    global _fake_server
    if _fake_server is None:
        _fake_server = fakeredis.FakeServer()
    return fakeredis.FakeAsyncRedis(server=_fake_server)


async def delete_prefix(client: Any, prefix: str) -> int:
    """Delete every key under ``prefix`` (tests only: SCAN with a glob-escaped prefix)."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    if keys:
        await client.delete(*keys)
    return len(keys)


async def named_connections(admin: Any, name: str, *, settle: float = 5.0) -> int:
    """How many connections named ``name`` the server lists once closed ones are gone.

    A closed socket reaches the server a moment after the client's ``close`` returns
    (redis-py does not wait for the server to notice), so a count taken at once can
    still list it: wait up to ``settle`` seconds for the count to fall to 0. A
    connection left open never leaves the list, and its count is returned.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while True:
        left = sum(c.get("name") == name for c in await admin.client_list())
        if not left or loop.time() >= deadline:
            return left
        await asyncio.sleep(0.02)


@functools.cache
def cleaning_store_class() -> Any:
    """``RedisStore`` that deletes its keys on close, so tests leave the server clean."""
    from asyncsession.backends.redis import RedisStore

    class CleaningRedisStore(RedisStore):
        async def _close(self) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(delete_prefix(self.client, self.config.key_prefix), 10)
            await super()._close()

    return CleaningRedisStore


class PrefixEnv:
    """Stores a test opens on its own key prefix over a shared client (one server or
    a cluster); ``close`` closes them and deletes everything under the prefix."""

    def __init__(self, client: Any) -> None:
        self.prefix = f"test:{uuid.uuid4().hex[:12]}:"
        self.client = client
        self.stores: list[Any] = []

    async def keys(self) -> list[bytes]:
        pattern = self.prefix.replace("*", "\\*") + "*"
        return sorted([k async for k in self.client.scan_iter(match=pattern, count=1000)])

    async def close(self) -> None:
        for store in reversed(self.stores):
            await store.close()
        await delete_prefix(self.client, self.prefix)
        await self.client.aclose()


async def check_limit_under_500_creates(env: PrefixEnv, store: Any, eviction: str) -> None:
    """500 concurrent creates for one user against a limit of 5 (``store``'s config,
    site ``site-a``): exactly 5 sessions remain, in the index, in the keyspace and
    listed; with ``reject`` exactly 5 creates succeed, otherwise all 500 (evicting)."""

    async def one() -> str:
        try:
            await store.create(new_session("alice"))
        except SessionLimitExceeded:
            return "rejected"
        return "created"

    results = await asyncio.gather(*(one() for _ in range(500)))
    ikey = store.store.index_key("site-a", "alice")
    assert await env.client.zcard(ikey) == 5
    assert len(await store.list_by_user("alice")) == 5
    session_keys = [k for k in await env.keys() if k.startswith(f"{env.prefix}s:".encode())]
    assert len(session_keys) == 5
    assert results.count("created") == (5 if eviction == "reject" else 500)
