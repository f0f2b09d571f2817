"""Login races over real uvicorn workers: memory (1 worker), SQLite (3 workers sharing
a file) and Redis (3 workers), with httpx clients and real concurrency.

In 20 trials a request carrying the pre-login cookie finishes after the login: the
user is never logged out (no clearing Set-Cookie) and that request's write is never
dropped silently (409, or 200 only if it is in the session). Alice then Bob on one
cookie jar: Bob sees nothing of Alice's. A tossed cookie of our name: no effect. A
long poll the browser keeps sending with the old cookie through a logout and a login
never clears the new login's cookie.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .backend_redis import REDIS_URL, delete_prefix, server_reachable
from .uvicorn_server import serve

TRIALS = 20


@pytest.fixture(params=["memory", "sqlite", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A uvicorn serving tests/login_app.py on the backend; yields its base URL."""
    workers = 1 if request.param == "memory" else 3
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        pytest.importorskip("aiosqlite")
        url = f"sqlite:///{tmp_path / 'login.db'}"
    else:
        if not server_reachable():
            pytest.skip(f"no Redis at {REDIS_URL}")
        url = REDIS_URL
    prefix = f"login-{uuid.uuid4().hex[:8]}:"
    env = {"ASYNCSESSION_LOGIN_STORE": url, "ASYNCSESSION_LOGIN_PREFIX": prefix}
    log = tmp_path / "uvicorn.log"
    try:
        with serve(
            "tests.login_app:create", workers=workers, env=env, ready="/read", log=log, factory=True
        ) as base:
            yield base
    finally:
        if request.param == "redis":  # the README promises the tests leave no keys
            asyncio.run(_delete_keys(prefix))


async def _delete_keys(prefix: str) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(REDIS_URL)
    try:
        await delete_prefix(redis, prefix)
    finally:
        await redis.aclose()


def client(base: str) -> httpx.AsyncClient:
    """A client that keeps no cookies: each request carries exactly the ones given."""
    refuse = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
    return httpx.AsyncClient(
        base_url=base, timeout=30, cookies=http.cookiejar.CookieJar(policy=refuse)
    )


def issued(response: httpx.Response) -> str:
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith("session=")]
    value = header.split(";")[0].split("=", 1)[1]
    assert value, f"cookie cleared: {header}"
    return value


def jar(session_id: str) -> dict[str, str]:
    return {"cookie": f"session={session_id}"}


async def test_login_race_never_logs_out_and_never_drops_a_write(server: str) -> None:
    refused = 0
    async with client(server) as c:
        for trial in range(TRIALS):
            old = issued(await c.post("/write", params={"key": "a", "value": "1"}))
            late = asyncio.create_task(
                c.post(
                    "/write", params={"key": "b", "value": "2", "delay": "0.3"}, headers=jar(old)
                )
            )
            await asyncio.sleep(0.05)  # shapes the race: the late request loads first
            response = await c.post("/login", params={"user": f"u{trial}"}, headers=jar(old))
            assert response.status_code == 200, response.text
            new = issued(response)
            a = await late
            assert not any(h.startswith("session=;") for h in a.headers.get_list("set-cookie")), (
                "the late request cleared the new cookie: logged out"
            )
            after = (await c.get("/read", headers=jar(new))).json()
            assert after["user"] == f"u{trial}"  # still logged in
            assert after["data"]["a"] == "1"  # the anonymous data came along
            if a.status_code == 200:
                assert after["data"].get("b") == "2", "a write answered 200 but was lost"
            else:
                assert a.status_code == 409, a.text
                assert "b" not in after["data"]
                assert a.headers.get_list("set-cookie") == []
                refused += 1
    assert refused > 0  # the race really happened


async def test_alice_then_bob_and_a_tossed_cookie(server: str) -> None:
    async with client(server) as c:
        alice = issued(await c.post("/login", params={"user": "alice"}))
        await c.post("/write", params={"key": "token", "value": "secret"}, headers=jar(alice))
        bob = issued(await c.post("/login", params={"user": "bob"}, headers=jar(alice)))
        assert (await c.get("/read", headers=jar(bob))).json() == {"data": {}, "user": "bob"}
        # a sibling subdomain's parent-domain cookie of the same name comes along
        junk = "J" * 43
        for header in (f"session={bob}; session={junk}", f"session={junk}; session={bob}"):
            r = await c.get("/read", headers={"cookie": header})
            assert r.json()["user"] == "bob"
            assert r.headers.get_list("set-cookie") == []
        tossed = issued(await c.post("/login", params={"user": "mallory"}))
        for header in (f"session={bob}; session={tossed}", f"session={tossed}; session={bob}"):
            r = await c.get("/read", headers={"cookie": header})
            assert r.json()["user"] != "mallory"
            assert r.headers.get_list("set-cookie") == []
        assert (await c.get("/read", headers=jar(bob))).json()["user"] == "bob"


async def test_polls_sent_before_a_logout_never_clear_the_next_login(server: str) -> None:
    """A page polls (``/read``, 50 ms each, one after another) with the cookie it has;
    the user logs out and logs in again (another account). Polls the browser sent
    before the logout's response arrive after it: the logout left a record of the
    id, so they find it ended rather than unknown and leave the cookie alone (before
    the record: 20 of 20 trials expired the new login's cookie). A write with the
    logged-out id answers 409, and starts no session whose cookie would replace the
    login's."""
    after_logout = 0
    async with client(server) as c:
        for trial in range(TRIALS):
            old = issued(await c.post("/login", params={"user": f"a{trial}"}))
            stop = asyncio.Event()
            seen: list[httpx.Response] = []
            poller = asyncio.create_task(poll(c, old, stop, seen))
            await asyncio.sleep(0.02)
            out = await c.post("/logout", headers=jar(old))
            assert out.status_code == 200
            assert any(h.startswith("session=;") for h in out.headers.get_list("set-cookie"))
            new = issued(await c.post("/login", params={"user": f"b{trial}"}))
            await asyncio.sleep(0.12)  # polls keep coming with the old cookie
            stop.set()
            await poller
            for response in seen:
                assert response.status_code == 200
                assert response.headers.get_list("set-cookie") == [], "a poll touched the cookie"
                after_logout += response.json()["user"] is None
            late = await c.post("/write", params={"key": "k", "value": "v"}, headers=jar(old))
            assert late.status_code == 409, late.text
            assert late.json()["error"]["reason"] == "ended"
            assert late.headers.get_list("set-cookie") == []
            assert (await c.get("/read", headers=jar(new))).json()["user"] == f"b{trial}"
    assert after_logout >= TRIALS  # polls really came in after the logouts


async def poll(
    c: httpx.AsyncClient, cookie: str, stop: asyncio.Event, seen: list[httpx.Response]
) -> None:
    """A page's long poll: ``/read`` (50 ms each) with ``cookie``, one after another."""
    while not stop.is_set():
        seen.append(await c.get("/read", params={"delay": "0.05"}, headers=jar(cookie)))
