#!/usr/bin/env python
"""Soak: a Starlette app with SessionMiddleware on one backend, driven in-process by
many simulated users for N seconds, optionally with faults injected while it runs.

    python benchmarks/soak.py --backend memory --seconds 60
    python benchmarks/soak.py --backend sqlite --seconds 60 --chaos
    python benchmarks/soak.py --backend redis --seconds 60 --chaos

Each user has several devices; each device is a sequential client (its own httpx
cookie jar over one ``httpx.ASGITransport``) that logs in, reads, writes, logs out and
revokes its other devices ("log out everywhere"), with no think time. What it checks:

* no acknowledged write is missing. A write is acknowledged when the app answered
  200 and did not end the session in the same response. Every read of a device's own
  session must show its acknowledged values (read-your-writes, checked live), and at
  the end every session still stored must hold them. A session that is gone must have
  been removed by the store on purpose: its id is in an ``evicted``/``deleted`` event,
  or a removal-capable request of the same user failed with 503 while it lived (a
  fault may apply a command whose reply was lost);
* the per-user limit is never exceeded at any sampled moment (``list_by_user`` of
  the user right after each login, and of every user ten times a second);
* memory stays flat: RSS growth after warm-up (the first 25 %, at least 5 s) under 10 %;
* with ``--chaos`` (at 20 % and 60 % of the run): Redis (a private ``redis-server``
  with ``appendfsync always``) is killed and restarted, then paused with SIGSTOP past
  the client timeout and resumed; SQLite gets a second process holding the write lock
  past the busy timeout, twice. Requests during a fault fail with 503 within a bound
  derived from the configured timeout (3 x timeout + 1 s: a login makes up to three
  store calls), none hangs, and the checks above hold afterwards.

``--redis-url`` uses an existing server instead of a private one (no chaos then: the
soak never kills a server it did not start). ``--json PATH`` writes the results; the
exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asyncsession import (
    Config,
    ControlledStore,
    MemoryStore,
    SessionError,
    SessionEvent,
    SessionMiddleware,
    SessionNotFound,
    StoreUnavailable,
    current_user_id,
    install_exception_handler,
    login,
    logout,
    logout_everywhere,
    require_user,
    short_hash,
    with_controls,
)

LIMIT = 3  # sessions per user; with 3 devices per user, logins evict all the time
KEYS = ("cart", "theme", "draft", "step")
BOUND = 15.0  # seconds: a request that takes longer is a hang
WEIGHTS = {"read": 50, "write": 40, "logout": 4, "everywhere": 3, "relogin": 3}


# ------------------------------------------------------------------------ the app


async def do_login(request: Request) -> JSONResponse:
    session = await login(request, request.query_params["user"])
    return JSONResponse({"user": session.user_id})


async def me(request: Request) -> JSONResponse:
    return JSONResponse({"user": current_user_id(request), "data": dict(request.session)})


async def write(request: Request) -> JSONResponse:
    require_user(request)
    request.session[request.query_params["key"]] = request.query_params["value"]
    return JSONResponse({"ok": True})


async def do_logout(request: Request) -> JSONResponse:
    await logout(request)
    return JSONResponse({"ok": True})


async def everywhere(request: Request) -> JSONResponse:
    return JSONResponse({"revoked": await logout_everywhere(request)})


def make_app(store: ControlledStore) -> Starlette:
    app = Starlette(
        routes=[
            Route("/login", do_login, methods=["POST"]),
            Route("/me", me),
            Route("/write", write, methods=["POST"]),
            Route("/logout", do_logout, methods=["POST"]),
            Route("/everywhere", everywhere, methods=["POST"]),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store)
    install_exception_handler(app)
    return app


# ---------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGKILL if the soak dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


_started: list[subprocess.Popen[bytes]] = []


def _stop_all() -> None:
    for proc in _started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)


def _ended(response: httpx.Response) -> bool:
    """A 409 for a session that ended under the request (evicted by a login on another
    device, expired) or before it (a logout whose 503 was lost after it applied): the
    change was not applied and the client was told so (reason ``ended``)."""
    if response.status_code != 409:
        return False
    try:
        error = response.json().get("error", {})
    except ValueError:
        return False
    return isinstance(error, dict) and error.get("reason") == "ended"


class RedisServer:
    """A private ``redis-server`` on a free loopback port, durable (AOF, fsync on every
    write) so that a SIGKILL loses nothing it acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        _started.append(self.proc)
        deadline = time.monotonic() + 30
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {self.tail()}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "redis.log").read_text(errors="replace")[-500:]
        return ""


LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
"""


class SQLiteLocker:
    """A second process that takes the database's write lock and holds it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def hold(self, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOCKER, self.path, str(seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        _started.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the lock is held
        if line.strip() != b"locked":
            raise RuntimeError("the locking process did not get the write lock")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------- the clients


@dataclass
class Fault:
    kind: str
    start: float  # seconds since the soak started
    end: float = 0.0


@dataclass
class SessionRecord:
    """What the clients know about one session: whose, when made, what it must hold."""

    user: str
    created: int  # request sequence number when the login that made it started
    # key -> acceptable values: the last acknowledged one, plus any sent since whose
    # request failed (it may or may not have been applied); None: never written
    expected: dict[str, set[str | None]] = field(default_factory=dict)
    acked: int = 0
    ended_by_owner: bool = False


@dataclass
class Results:
    backend: str
    seconds: float
    users: int
    devices: int
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_action: dict[str, int] = field(default_factory=dict)
    ops_per_second: float = 0.0
    acked_writes: int = 0
    reads_checked: int = 0
    read_your_writes_violations: int = 0
    sessions_checked: int = 0
    sessions_removed_by_store: int = 0
    sessions_lost: int = 0
    writes_lost: int = 0
    limit_samples: int = 0
    limit_violations: int = 0
    max_sessions_seen: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    requests_during_faults: int = 0
    failed_during_faults: int = 0
    failed_outside_faults: int = 0  # 503s of a slow store (timeouts), not a failure
    max_latency_during_faults: float = 0.0
    ok_after_faults: int = 0  # 200s of requests started after the last fault ended
    non_503_failures: int = 0
    max_failure_latency: float = 0.0
    failure_latency_bound: float = 0.0
    hangs: int = 0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth: float = 0.0
    rss_series: list[tuple[float, float]] = field(default_factory=list)  # (s, MB) each 1 s
    problems: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, store: ControlledStore, app: Any) -> None:
        self.args = args
        self.store = store
        self.transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 4711))
        self.rng = random.Random(args.seed)
        self.seq = 0
        self.t0 = time.monotonic()
        self.stopping = False
        self.sessions: dict[str, SessionRecord] = {}
        self.removed: set[str] = set()  # short hashes the store reported evicted/deleted
        self.failed_removals: dict[str, list[tuple[int, int]]] = {}  # user -> (start, end)
        self.faults: list[Fault] = []
        self.max_failure_latency = 0.0
        self.r = Results(args.backend, args.seconds, args.users, args.devices)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def in_fault(self, start: float, end: float) -> bool:
        return any(f.start <= end and (f.end == 0.0 or start <= f.end) for f in self.faults)

    def on_event(self, event: SessionEvent) -> None:
        if event.type in ("evicted", "deleted", "expired") and event.session:
            self.removed.add(event.session)

    async def request(
        self, client: httpx.AsyncClient, action: str, method: str, url: str, **params: str
    ) -> httpx.Response | None:
        self.seq += 1
        start = self.now()
        self.r.by_action[action] = self.r.by_action.get(action, 0) + 1
        try:
            response = await asyncio.wait_for(client.request(method, url, params=params), BOUND)
        except TimeoutError:
            self.r.hangs += 1
            self.r.problems.append(f"{action} took more than {BOUND:g} s")
            return None
        end = self.now()
        self.r.requests += 1
        status = str(response.status_code)
        self.r.by_status[status] = self.r.by_status.get(status, 0) + 1
        during = self.in_fault(start, end)
        self.r.requests_during_faults += during
        if response.status_code == 200 and self.faults and self.faults[-1].end:
            self.r.ok_after_faults += start > self.faults[-1].end
        if during:
            self.r.max_latency_during_faults = max(self.r.max_latency_during_faults, end - start)
        if _ended(response):  # evicted or expired under a write: refused, and said so
            return response
        if response.status_code >= 500 or response.status_code == 409:
            self.max_failure_latency = max(self.max_failure_latency, end - start)
            if during:
                self.r.failed_during_faults += 1
            else:
                self.r.failed_outside_faults += 1
            if response.status_code != 503:
                self.r.non_503_failures += 1
                self.r.problems.append(f"{action} answered {response.status_code}")
        return response

    def session_id(self, client: httpx.AsyncClient) -> str | None:
        return client.cookies.get("__Host-session")

    async def device(self, user: str, index: int) -> None:
        async with httpx.AsyncClient(
            transport=self.transport, base_url="https://soak.test"
        ) as client:
            sid: str | None = None
            previous: str | None = None  # the session before the current one: to settle
            counter = 0
            while not self.stopping:
                if sid is None:
                    sid = await self.login(client, user)
                    continue
                if previous is not None and previous != sid and previous in self.sessions:
                    await self.settle(previous)
                previous = sid
                action = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
                record = self.sessions[sid]
                if action == "read":
                    sid = await self.read(client, sid, record)
                elif action == "write":
                    counter += 1
                    sid = await self.write(client, sid, record, f"{user}.{index}.{counter}")
                elif action == "logout":
                    start = self.seq
                    response = await self.request(client, "logout", "POST", "/logout")
                    if response is not None and response.status_code == 200:
                        record.ended_by_owner = True
                        sid = None
                    else:
                        self.failed_removal(user, start)
                elif action == "everywhere":
                    start = self.seq
                    response = await self.request(client, "everywhere", "POST", "/everywhere")
                    if response is not None and _ended(response):
                        sid = None  # logged out already (a logout answered 503 had applied)
                        continue
                    if response is None or response.status_code != 200:
                        self.failed_removal(user, start)
                    if self.session_id(client) != sid:
                        sid = None
                else:  # log in again from a fresh client state: a new device session
                    client.cookies.clear()
                    sid = None
                    record.ended_by_owner = True  # abandoned, may be evicted by anyone

    def failed_removal(self, user: str, start: int) -> None:
        self.failed_removals.setdefault(user, []).append((start, self.seq))

    async def login(self, client: httpx.AsyncClient, user: str) -> str | None:
        start = self.seq
        response = await self.request(client, "login", "POST", "/login", user=user)
        sid = self.session_id(client)
        if response is not None and response.status_code == 200 and sid:
            self.sessions[sid] = SessionRecord(user, start)
            await self.sample_limit(user)  # the moment the limit is most at risk
            return sid
        self.failed_removal(user, start)  # a failed login may still have evicted
        client.cookies.clear()
        await asyncio.sleep(0.01)
        return None

    async def read(self, client: httpx.AsyncClient, sid: str, record: SessionRecord) -> str | None:
        response = await self.request(client, "read", "GET", "/me")
        if response is None or response.status_code != 200:
            return sid
        body = response.json()
        if body["user"] is None or self.session_id(client) != sid:
            return None  # revoked or evicted: the middleware started a fresh session
        self.r.reads_checked += 1
        for key, acceptable in record.expected.items():
            if body["data"].get(key) not in acceptable:
                self.r.read_your_writes_violations += 1
                self.r.problems.append(f"read of {short_hash(sid)} lost {key}")
        return sid

    async def write(
        self, client: httpx.AsyncClient, sid: str, record: SessionRecord, value: str
    ) -> str | None:
        key = self.rng.choice(KEYS)
        response = await self.request(client, "write", "POST", "/write", key=key, value=value)
        if response is None:
            record.expected.setdefault(key, {None}).add(value)
            return sid
        if response.status_code == 200 and self.session_id(client) == sid:
            record.expected[key] = {value}
            record.acked += 1
            self.r.acked_writes += 1
            return sid
        if response.status_code in (401, 200) or _ended(response):
            return None  # the session was gone: the write was refused or dropped, and said so
        record.expected.setdefault(key, {None}).add(value)  # 503/409: may or may not apply
        return sid

    # ------------------------------------------------------------------ samplers

    async def sample_limit(self, user: str) -> None:
        try:
            count = len(await asyncio.wait_for(self.store.list_by_user(user), BOUND))
        except (SessionError, TimeoutError):
            return
        self.r.limit_samples += 1
        self.r.max_sessions_seen = max(self.r.max_sessions_seen, count)
        if count > LIMIT:
            self.r.limit_violations += 1
            self.r.problems.append(f"{user} had {count} sessions (limit {LIMIT})")

    async def sample_limits(self, users: list[str]) -> None:
        """Every user, ten times a second (besides the check after each login)."""
        while not self.stopping:
            for user in users:
                await self.sample_limit(user)
            await asyncio.sleep(0.1)

    # -------------------------------------------------------------------- verify

    async def settle(self, sid: str, *, final: bool = False) -> None:
        """Decide the fate of a session the clients are done with (or, at the end, of
        every one): still stored with its acknowledged writes, or removed by the store
        on purpose. Then forget it, so the soak's own memory stays flat. While the store
        is down the decision waits for the final pass."""
        record = self.sessions[sid]
        session = None
        for _ in range(100 if final else 1):
            try:
                session = await asyncio.wait_for(self.store.get(sid), BOUND)
                break
            except SessionNotFound:
                break
            except (StoreUnavailable, TimeoutError):
                if not final:
                    return
                await asyncio.sleep(0.1)
        else:
            self.r.problems.append("store unavailable during verification")
            return
        del self.sessions[sid]
        self.r.sessions_checked += 1
        hashed = short_hash(sid)
        removed = hashed in self.removed
        self.removed.discard(hashed)
        if session is not None:
            assert session.user_id == record.user
            for key, acceptable in record.expected.items():
                if session.data.get(key) not in acceptable:
                    self.r.writes_lost += 1
                    self.r.problems.append(f"{hashed} lost its write of {key}")
            return
        if record.ended_by_owner or removed:
            self.r.sessions_removed_by_store += not record.ended_by_owner
            return
        if any(end >= record.created for _, end in self.failed_removals.get(record.user, [])):
            return  # a removal whose reply a fault lost may have taken it
        self.r.sessions_lost += 1
        self.r.writes_lost += len(record.expected)
        self.r.problems.append(f"{hashed} of {record.user} vanished")

    async def verify(self) -> None:
        for sid in list(self.sessions):
            await self.settle(sid, final=True)


# --------------------------------------------------------------------- the chaos


async def chaos(soak: Soak, kind: str, server: Any, seconds: float, store_timeout: float) -> None:
    """Faults at 20 % and 60 % of the run, each long enough to outlast the timeout."""
    loop = asyncio.get_running_loop()

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, seconds * fraction - soak.now()))

    async def window(name: str, start: Any, stop: Any, hold: float) -> None:
        fault = Fault(name, soak.now())
        soak.faults.append(fault)
        await loop.run_in_executor(None, start)
        await asyncio.sleep(hold)
        await loop.run_in_executor(None, stop)
        fault.end = soak.now()

    if kind == "redis":
        await at(0.20)
        down = max(1.0, 2 * store_timeout)
        await window("redis killed, restarted", server.kill, server.start, down)
        await at(0.60)
        await window("redis paused (SIGSTOP)", server.pause, server.resume, 3 * store_timeout)
    elif kind == "sqlite":
        locker = SQLiteLocker(server)
        try:
            await at(0.20)
            hold = 3 * store_timeout
            await window("write lock held", lambda: locker.hold(hold), locker.stop, hold)
            await at(0.60)
            await window("write lock held", lambda: locker.hold(hold), locker.stop, hold)
        finally:
            locker.stop()


# ------------------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> Results:
    workdir = Path(tempfile.mkdtemp(prefix="asyncsession-soak-"))
    server: RedisServer | None = None
    chaos_target: Any = None
    timeout = args.timeout
    config = Config(
        site_id="soak",
        max_sessions_per_user=LIMIT,
        eviction="oldest",
        default_ttl=3600,
        cleanup_interval=1,
    )
    try:
        if args.backend == "memory":
            raw: Any = MemoryStore(config)
        elif args.backend == "sqlite":
            from asyncsession.backends.sqlite import SQLiteStore

            path = str(workdir / "sessions.db")
            raw = SQLiteStore(path, config, busy_timeout=timeout)
            chaos_target = path
        elif args.backend == "redis":
            from asyncsession.backends.redis import RedisStore

            url = args.redis_url
            if url is None:
                server = RedisServer(workdir)
                server.start()
                url = server.url
                chaos_target = server
            prefix = f"soak:{uuid.uuid4().hex[:8]}:"
            raw = RedisStore.from_url(url, replace(config, key_prefix=prefix), timeout=timeout)
        else:
            raise SystemExit(f"unknown backend {args.backend!r}")

        soak_holder: list[Soak] = []
        store = with_controls(raw, config, on_event=lambda e: soak_holder[0].on_event(e))
        soak = Soak(args, store, make_app(store))
        soak_holder.append(soak)
        async with store:
            return await drive(soak, args, chaos_target, timeout)
    finally:
        if server is not None:
            server.stop()
        _stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


async def drive(
    soak: Soak, args: argparse.Namespace, chaos_target: Any, store_timeout: float
) -> Results:
    r = soak.r
    users = [f"user{i}" for i in range(args.users)]
    process = psutil.Process()
    tasks = [
        asyncio.create_task(soak.device(user, d)) for user in users for d in range(args.devices)
    ]
    samplers = [asyncio.create_task(soak.sample_limits(users))]
    chaos_task = None
    if args.chaos:
        if chaos_target is None:
            raise SystemExit("--chaos needs a server this soak starts (no --redis-url)")
        chaos_task = asyncio.create_task(
            chaos(soak, args.backend, chaos_target, args.seconds, store_timeout)
        )
    warm = max(5.0, args.seconds * 0.25)
    rss: list[tuple[float, int]] = []
    try:
        while soak.now() < args.seconds or not recovered(soak, chaos_task):
            await asyncio.sleep(0.25)
            rss.append((soak.now(), process.memory_info().rss))
        soak.stopping = True
        if chaos_task is not None:
            await asyncio.wait_for(chaos_task, 60)
        await asyncio.wait_for(asyncio.gather(*tasks), BOUND * 2)
    finally:
        soak.stopping = True
        for task in [*tasks, *samplers]:
            task.cancel()
        await asyncio.gather(*tasks, *samplers, return_exceptions=True)
    elapsed = soak.now()
    r.ops_per_second = round(r.requests / elapsed, 1)
    r.faults = [asdict(f) for f in soak.faults]
    r.rss_series = [
        (round(t, 1), round(v / 2**20, 1)) for i, (t, v) in enumerate(rss) if i % 4 == 3
    ]
    warm_rss = [v for t, v in rss if t >= warm]
    if warm_rss:
        r.rss_warm_mb = round(warm_rss[0] / 2**20, 1)
        r.rss_end_mb = round(max(warm_rss[-3:]) / 2**20, 1)
        r.rss_growth = round((r.rss_end_mb - r.rss_warm_mb) / r.rss_warm_mb, 4)
    await soak.verify()
    for user in users:
        count = len(await soak.store.list_by_user(user))
        r.limit_samples += 1
        if count > LIMIT:
            r.limit_violations += 1
            r.problems.append(f"{user} ends with {count} sessions")
    if args.redis_url:  # a server the soak did not start: leave nothing behind
        for sid in soak.sessions:
            with contextlib.suppress(SessionError):
                await soak.store.delete(sid)
        for user in users:
            with contextlib.suppress(SessionError):
                await soak.store.delete_by_user(user)
    r.failure_latency_bound = round(3 * store_timeout + 1.0, 2)
    r.max_failure_latency = round(soak.max_failure_latency, 3)
    r.max_latency_during_faults = round(r.max_latency_during_faults, 3)
    check(r, args)
    return r


def recovered(soak: Soak, chaos_task: asyncio.Task[None] | None) -> bool:
    """Whether the soak may stop: no fault pending, and 1 s of load after the last one
    (however late a busy machine ran it), so recovery is always exercised."""
    if chaos_task is None:
        return True
    if not chaos_task.done():
        return False
    if chaos_task.exception() is not None:
        return True  # stop: the error is raised by the wait below
    return not soak.faults or soak.now() >= soak.faults[-1].end + 1.0


def check(r: Results, args: argparse.Namespace) -> None:
    if r.writes_lost or r.sessions_lost or r.read_your_writes_violations:
        r.problems.append("acknowledged writes lost")
    if r.limit_violations:
        r.problems.append("per-user limit exceeded")
    if r.hangs:
        r.problems.append("requests hung")
    if r.max_failure_latency > r.failure_latency_bound:
        r.problems.append(
            f"a failing request took {r.max_failure_latency:.2f} s "
            f"(bound {r.failure_latency_bound:.2f} s)"
        )
    if args.chaos and not r.failed_during_faults:
        r.problems.append("the faults caused no failed request: were they injected?")
    if args.chaos and not r.ok_after_faults:
        r.problems.append("no request succeeded after the last fault: no recovery")
    if args.rss_check and r.rss_growth >= 0.10:
        r.problems.append(f"RSS grew {r.rss_growth:.1%} after warm-up")
    if r.acked_writes == 0:
        r.problems.append("no write was acknowledged")
    r.problems = sorted(set(r.problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["memory", "sqlite", "redis"], default="memory")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--devices", type=int, default=3, help="devices (clients) per user")
    parser.add_argument("--chaos", action="store_true", help="inject faults while soaking")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="Redis round-trip timeout / SQLite busy timeout, seconds",
    )
    parser.add_argument("--redis-url", default=None, help="an existing server (no chaos)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--no-rss-check", dest="rss_check", action="store_false", help="report RSS only"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    out = asdict(results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    summary = {k: v for k, v in out.items() if k not in ("problems", "rss_series")}
    print(json.dumps(summary, indent=2))
    for problem in results.problems[:20]:
        print("PROBLEM:", problem)
    print(
        f"{results.backend}: {results.ops_per_second} requests/s, "
        f"{results.acked_writes} acknowledged writes, {results.writes_lost} lost, "
        f"{results.limit_violations} limit violations in {results.limit_samples} samples, "
        f"{len(results.faults)} faults, RSS growth {results.rss_growth:.1%}: "
        + ("OK" if not results.problems else "FAILED")
    )
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
