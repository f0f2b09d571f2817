"""No update lost at the HTTP level: real uvicorn workers, concurrent httpx clients.

For each backend (memory with 1 worker, SQLite and Redis with 3 workers sharing one
store) three loads run against one session:

- the same counter through a plain read-modify-write endpoint: some requests may be
  told 409, but every one told 200 is counted in the stored value;
- the same counter through ``update_session``: every request is told 200 and the
  stored value is the number of requests;
- 100 clients each changing its own key: all 200, nothing lost;
- 200 new visitors at once, each creating its own session (on Redis, creates of one
  batch run in one script call): each is told 200 with a cookie of its own, and
  each cookie reads back its own visitor's data.

What clients were told is checked against what was stored.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from . import backend_redis
from .uvicorn_server import serve

CLIENTS = 100
PER_CLIENT = 5


@pytest.fixture(scope="module", params=["memory", "sqlite", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    backend = request.param
    env = {"RACE_BACKEND": backend}
    workers = 3
    if backend == "memory":
        workers = 1  # one process holds the sessions
    elif backend == "sqlite":
        env["RACE_TARGET"] = str(tmp_path_factory.mktemp("race") / "sessions.db")
    else:
        reason = backend_redis.skip_reason()
        if not backend_redis.server_reachable():
            if backend_redis.REQUIRE:
                pytest.fail(
                    f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis at {backend_redis.REDIS_URL}"
                )
            pytest.skip(reason or f"needs a real Redis server at {backend_redis.REDIS_URL}")
        env["RACE_TARGET"] = backend_redis.REDIS_URL
        env["RACE_PREFIX"] = f"test:race-{uuid.uuid4().hex}:"
    log = tmp_path_factory.mktemp("uvicorn") / "uvicorn.log"
    try:
        with serve("tests.race_app:app", workers=workers, env=env, ready="/read", log=log) as base:
            yield base
    finally:
        if backend == "redis":
            asyncio.run(_clean_redis(env["RACE_PREFIX"]))


async def _clean_redis(prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(backend_redis.REDIS_URL)
    try:
        await backend_redis.delete_prefix(client, prefix)
    finally:
        await client.aclose()


async def _session(c: httpx.AsyncClient) -> dict[str, str]:
    response = await c.post("/start")
    assert response.status_code == 200
    return {"cookie": f"sid={response.cookies['sid']}"}


async def _load(
    base: str, path_of: Any
) -> tuple[Counter[int], list[dict[str, Any]], dict[str, Any]]:
    """CLIENTS clients, PER_CLIENT sequential POSTs each, on one session: the status
    codes, the bodies of the 200s, and what is stored at the end."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as c:
        headers = await _session(c)
        codes: Counter[int] = Counter()
        bodies: list[dict[str, Any]] = []

        async def client(i: int) -> None:
            for _ in range(PER_CLIENT):
                response = await c.post(path_of(i), headers=headers)
                codes[response.status_code] += 1
                if response.status_code == 200:
                    bodies.append(response.json())
                else:
                    assert response.status_code == 409, response.text

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        stored = (await c.get("/read", headers=headers)).json()
    return codes, bodies, stored


def test_plain_read_modify_write_never_answers_200_for_a_lost_update(server: str) -> None:
    codes, bodies, stored = asyncio.run(_load(server, lambda i: "/rmw"))
    print(f"read-modify-write: {dict(codes)}")
    assert set(codes) <= {200, 409}
    told = sorted(b["n"] for b in bodies)
    # every request told 200 is counted, exactly once
    assert stored["n"] == codes[200] == len(told)
    assert told == list(range(1, codes[200] + 1))


def test_update_session_counts_every_request(server: str) -> None:
    codes, bodies, stored = asyncio.run(_load(server, lambda i: "/helper"))
    total = CLIENTS * PER_CLIENT
    assert codes == Counter({200: total})
    assert stored["n"] == total
    assert sorted(b["n"] for b in bodies) == list(range(1, total + 1))


def test_different_keys_never_conflict(server: str) -> None:
    codes, bodies, stored = asyncio.run(_load(server, lambda i: f"/key/k{i}"))
    assert codes == Counter({200: CLIENTS * PER_CLIENT})
    for i in range(CLIENTS):
        assert stored[f"k{i}"] == PER_CLIENT
    assert len(bodies) == CLIENTS * PER_CLIENT


async def _new_visitors(base: str, count: int) -> tuple[Counter[int], dict[str, str]]:
    """``count`` cookie-less clients at once, each creating a session tagged with its
    number: the status codes, and each client's cookie."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    cookies: dict[str, str] = {}
    codes: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as c:

        async def visitor(i: int) -> None:
            response = await c.post(f"/tag/v{i}")
            codes[response.status_code] += 1
            cookies[f"v{i}"] = response.cookies["sid"]

        await asyncio.gather(*(visitor(i) for i in range(count)))
        for tag, sid in cookies.items():
            stored = (await c.get("/read", headers={"cookie": f"sid={sid}"})).json()
            assert stored == {"tag": tag}, (tag, stored)
    return codes, cookies


def test_new_visitors_at_once_each_get_their_own_session(server: str) -> None:
    codes, cookies = asyncio.run(_new_visitors(server, 2 * CLIENTS))
    assert codes == Counter({200: 2 * CLIENTS})
    assert len(set(cookies.values())) == 2 * CLIENTS
