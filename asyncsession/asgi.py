"""ASGI integration: a pure ASGI ``SessionMiddleware`` plus login/logout helpers and
FastAPI dependencies.

The middleware keeps the session data on the server (any ``Store``) and only an
opaque, random id in an HttpOnly cookie. ``scope["session"]`` is a ``SessionDict``
(a real ``dict``), so ``request.session`` works exactly as with
``starlette.middleware.sessions.SessionMiddleware``. Per request:

* load: one ``store.get`` when, and only when, a well-formed cookie was sent; an
  unknown, expired, other-site or malformed id is never adopted (fresh session,
  stale cookie cleared);
* save: just before ``http.response.start`` (so streaming and file responses keep
  their sessions), only if the data changed, with compare-and-set; on
  ``SessionConflict`` it re-reads and re-applies only the top-level keys this
  request changed, so parallel requests that change different keys all persist;
* anonymous sessions are created in the store on their first write; with an idle
  timeout the session is touched at most once per ``touch_fraction`` of it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .controls import LogLimiter
from .errors import (
    SessionConflict,
    SessionError,
    SessionNotFound,
    SessionRotated,
    StoreClosed,
    StoreUnavailable,
    short_hash,
)
from .session import Session, is_valid_session_id, new_session, normalize_user_id
from .store import Store

if TYPE_CHECKING:
    from fastapi import Depends
    from starlette.applications import Starlette
else:
    try:
        from fastapi import Depends
    except ImportError:  # Starlette-only install: the Annotated aliases are inert

        def Depends(dependency: Any) -> Any:
            return dependency


logger = logging.getLogger("asyncsession.asgi")
T = TypeVar("T")

SCOPE_KEY = "asyncsession"
"""Where the middleware keeps its per-connection state in the ASGI scope."""

MAX_USER_AGENT = 512
_EXPIRED = "Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"
_UNAVAILABLE = (StoreUnavailable, StoreClosed)
_COOKIE_NAME_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


_CACHED_COOKIE_HEADER = 4096
"""Cookie headers up to this many bytes have their parse remembered ..."""
_COOKIE_CACHE_SIZE = 1024
"""... this many distinct ones at most (the cache starts over when full)."""

MAX_CANDIDATES = 4
"""Session cookies of our name one request may carry that are looked up (tossing)."""
MAX_VALUES = 64
"""Distinct values of our cookie one request's headers are read for (bounded work)."""

_log_limit = LogLimiter()
"""Client-triggerable middleware records (conflicts, stale or tossed cookies)."""

_VARY = [(b"vary", b"Cookie")]
_ABSENT = b""
"""Snapshot of a key that did not exist (no JSON encoding is empty)."""
_MUTABLE = (list, dict)


def _cookie_pattern(name: str) -> re.Pattern[bytes]:
    """The value of every ``name=value`` pair of a Cookie header with exactly this name
    (pairs split on ``;`` as in RFC 6265 and Starlette: never the tail of a value)."""
    return re.compile(rb"(?:^|;)[ \t]*" + re.escape(name.encode()) + rb"[ \t]*=([^;]*)")


def _snapshot(value: Any) -> bytes | None:
    """The JSON of ``value`` to compare against later; None if it cannot be encoded
    (then the key always counts as changed and the store reports the bad value)."""
    try:
        return orjson.dumps(value)
    except (TypeError, RecursionError):
        return None


class SessionDict(dict[str, Any]):
    """The session data of one request: a real ``dict`` (``request.session``).

    It remembers, for every top-level key the request set, deleted, or read a list or
    dict from, what that key held before; at the end only keys whose JSON differs
    count as changed. So nested mutations (``session["cart"].append(x)``) are saved,
    setting a key to the value it already has is not a write, and a read-only request
    costs no encoding at all. A value reached around the session's own methods
    (``dict(session)["cart"].append(x)``) is not seen: call ``mark_changed(key)``.

    ``clear()`` ends the session like ``logout``: the stored record is deleted when
    the response starts, and anything written afterwards goes into a new session
    with a new id.
    """

    __slots__ = ("_cleared", "_seen")

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        dict.__init__(self, data or ())
        self._seen: dict[str, bytes | None] = {}
        self._cleared = False

    # -- reads that hand out a mutable value: remember it as it was

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if type(value) in _MUTABLE and key not in self._seen:
            self._seen[key] = _snapshot(value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = dict.get(self, key, _MISSING)
        if value is _MISSING:
            return default
        if type(value) in _MUTABLE and key not in self._seen:
            self._seen[key] = _snapshot(value)
        return value

    def values(self) -> Any:
        self._see_all()
        return dict.values(self)

    def items(self) -> Any:
        self._see_all()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self._see_all()
        return dict(self)

    def _see_all(self) -> None:
        seen = self._seen
        for key, value in dict.items(self):
            if type(value) in _MUTABLE and key not in seen:
                seen[key] = _snapshot(value)

    # -- writes: remember the old value first

    def _before(self, key: str) -> None:
        if key not in self._seen:
            value = dict.get(self, key, _MISSING)
            self._seen[key] = _ABSENT if value is _MISSING else _snapshot(value)

    def __setitem__(self, key: str, value: Any) -> None:
        self._before(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._before(key)
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self._before(key)
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[str, Any]:
        key, value = dict.popitem(self)
        if key not in self._seen:
            self._seen[key] = _snapshot(value)
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> SessionDict:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        dict.clear(self)
        self._seen = {}
        self._cleared = True

    def mark_changed(self, key: str) -> None:
        """Save ``key`` even if no change was seen (e.g. a nested value mutated
        through a copy)."""
        self._seen[key] = None

    # -- for the middleware

    def changes(self) -> tuple[list[str], list[str]] | None:
        """Top-level keys changed and deleted since load (or the last save)."""
        if not self._seen:
            return None
        changed: list[str] = []
        deleted: list[str] = []
        for key, before in self._seen.items():
            if dict.__contains__(self, key):
                now = _snapshot(dict.__getitem__(self, key))
                if now is None or now != before:
                    changed.append(key)
            elif before is not _ABSENT:
                deleted.append(key)
        if not changed and not deleted:
            return None
        return changed, deleted

    def _reset(self, data: dict[str, Any]) -> None:
        """A new baseline: the stored data as loaded, created or saved."""
        dict.clear(self)
        dict.update(self, data)
        self._seen = {}
        self._cleared = False

    def _saved(self) -> None:
        self._seen = {}


_MISSING: Any = object()
_EMPTY_SESSION = SessionDict()  # a placeholder, never handed to an app


class _Connection:
    """Per-connection state: the stored record, the live data and what to tell the client."""

    __slots__ = (
        "budget",
        "client_id",
        "cookie_possible",
        "cookie_sent",
        "data",
        "degraded",
        "legacy",
        "mw",
        "refreshed",
        "scope",
        "session",
        "stale",
        "tossed",
        "touch_due",
    )

    def __init__(self, mw: SessionMiddleware, scope: Scope) -> None:
        self.mw = mw
        # the request's scope until the request ends (new sessions record its client
        # and user agent, as an inner middleware such as a proxy-headers one left
        # them); then dropped, as the scope holds this object (scope[SCOPE_KEY]) and
        # the cycle would leave every request's session to the cyclic GC
        self.scope: Scope | None = scope
        self.session: Session | None = None  # the stored record this request holds
        self.data: SessionDict = _EMPTY_SESSION  # replaced in load() or forget()
        self.client_id: str | None = None  # the id in the client's cookie, if it is live
        self.cookie_sent = False  # the request carried a cookie with our name
        self.degraded = False  # store unavailable, serving an ephemeral anonymous session
        self.touch_due = False
        self.refreshed = False  # saved or touched: refresh a Max-Age cookie
        self.cookie_possible = True  # False once a websocket handshake is done
        # the cookie names a rotated id, or several live ones (tossing): leave the
        # client's cookies alone and refuse writes (409) rather than start a session
        self.stale = False
        self.tossed = False  # several values of our cookie: clearing ours would not help
        self.legacy = False  # the session came in the legacy cookie: move it to ours
        self.budget: float | None = mw.timeout  # seconds of store work left (None: no bound)

    async def within(self, work: Awaitable[T]) -> T:
        """Await store ``work`` within what is left of this request's deadline (one
        budget for load, touch, save and login together); past it, ``StoreUnavailable``."""
        budget = self.budget
        if budget is None:
            return await work
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                return await work
        except TimeoutError as exc:
            if asyncio.iscoroutine(work):
                work.close()  # never started (budget spent): no "never awaited" warning
            raise StoreUnavailable(
                f"session store did not answer within the request's {self.mw.timeout} s",
                details={"timeout": self.mw.timeout},
            ) from exc
        finally:
            self.budget = budget - (loop.time() - started)

    @property
    def store(self) -> Store:
        return self.mw.store

    # ------------------------------------------------------------------ load

    def loaded(self, session: Session, session_id: str) -> None:
        """The request's session is ``session``, found under the cookie's ``session_id``."""
        self.session = session
        self.data = SessionDict(session.data)
        self.client_id = None if self.legacy else session_id
        every = self.mw.touch_every
        if every is not None:
            self.touch_due = self.store.clock() - session.last_accessed_at >= every

    def adopt(self, session: Session) -> None:
        self.session = session
        self.data._reset(session.data)

    def forget(self) -> None:
        """The stored session is gone: empty data, expire the cookie (unless a new one)."""
        self.session = None
        if self.data is _EMPTY_SESSION:
            self.data = SessionDict()
        else:
            self.data._reset({})
        self.touch_due = False

    # ------------------------------------------------------------------ save

    async def commit(self) -> None:
        """Persist this request's changes (idempotent: a second call saves only new ones)."""
        if self.data._cleared:
            self.data._cleared = False
            if self.session is not None:
                await self.store.delete(self.session.id)
                data = dict(self.data)
                self.forget()
                self.data.update(data)
        if self.session is None:
            if self.data:
                await self._create()
            return
        diff = self.data.changes()
        if diff is not None:
            await self._save(self.session, *diff)
        elif self.touch_due:
            self.touch_due = False
            try:
                await self.store.touch(self.session.id)
            except SessionNotFound as exc:
                self.stale = isinstance(exc, SessionRotated)
                self.forget()
            except _UNAVAILABLE as exc:
                logger.warning("session touch skipped: %s", exc)
            else:
                self.refreshed = True

    async def _create(self) -> None:
        if self.stale:
            raise SessionConflict(
                "the session cookie is stale (rotated) or ambiguous; reload and retry",
                details={"reason": "stale_cookie"},
            )
        if self.degraded:
            logger.warning("session store unavailable: dropping a new anonymous session")
            return
        if not self.cookie_possible:
            logger.debug("websocket session written after accept: no cookie can carry it")
            return
        client = self.mw.client_fields(self.scope) if self.scope is not None else {}
        session = new_session(None, data=dict(self.data), now=self.store.clock(), **client)
        self.session = await self.store.create(session)
        self.data._saved()
        self.refreshed = True

    async def _save(self, session: Session, changed: list[str], deleted: list[str]) -> None:
        """Compare-and-set; on conflict re-read and re-apply just our keys (bounded)."""
        data = self.data
        session.data = dict(data)
        attempt = 0
        while True:
            try:
                await self.store.update(session)
                break
            except SessionConflict:
                attempt += 1
                if attempt > self.mw.max_retries:
                    raise
                if attempt > 1:
                    await asyncio.sleep(random.uniform(0, 0.0005 * 2**attempt))
            except SessionNotFound as exc:
                self._gone(session, exc)
                return
            try:
                session = await self.store.get(session.id)
            except SessionNotFound as exc:
                self._gone(session, exc)
                return
            for key in changed:
                session.data[key] = data[key]
            for key in deleted:
                session.data.pop(key, None)
        self.session = session
        if attempt:
            # keep the other writers' keys visible to the rest of this request
            data._reset(session.data)
        else:
            data._saved()
        self.touch_due = False
        self.refreshed = True

    def _gone(self, session: Session, exc: SessionNotFound) -> None:
        """The stored session vanished under this request. Rotated (a login moved it):
        the changes are refused with 409 and the newer cookie is left alone."""
        if isinstance(exc, SessionRotated):
            self.stale = True
            self.forget()
            raise SessionConflict(
                "the session was rotated (login) during the request; its changes were not applied",
                details={"session": short_hash(session.id), "reason": "rotated"},
            ) from exc
        logger.debug(
            "session %s was deleted during the request; its changes are dropped",
            short_hash(session.id),
        )
        self.forget()

    # --------------------------------------------------------------- cookies

    def pending(self) -> bool:
        """Whether ``commit`` has anything to do (cheap: read-only requests skip it)."""
        data = self.data
        return bool(data._seen) or data._cleared or self.touch_due

    def cookie_headers(self) -> list[tuple[bytes, bytes]]:
        """``Set-Cookie`` (and ``Vary``) headers this response needs."""
        mw = self.mw
        session = self.session
        if session is not None:
            if session.id == self.client_id and not (self.refreshed and mw.max_age is not None):
                return _VARY
            self.client_id = session.id
            self.refreshed = False
            headers = [_VARY[0], (b"set-cookie", mw.set_cookie_value(session.id))]
            if self.legacy and mw.legacy_expire_value is not None:
                self.legacy = False
                headers.append((b"set-cookie", mw.legacy_expire_value))
            return headers
        if self.cookie_sent and not (self.degraded or self.stale or self.tossed):
            self.cookie_sent = False
            self.client_id = None
            if self.legacy and mw.legacy_expire_value is not None:
                return [(b"vary", b"Cookie"), (b"set-cookie", mw.legacy_expire_value)]
            return [(b"vary", b"Cookie"), (b"set-cookie", mw.expire_cookie_value)]
        return []


class SessionMiddleware:
    """Server-side sessions for any ASGI app (``http`` and ``websocket`` scopes).

    ``store`` is any ``Store`` (usually ``open_store(url, config)``); the app owns
    its lifecycle (open it in the lifespan, close it at shutdown). Cookie defaults
    are the safe ones: HttpOnly, Secure, SameSite=Lax, Path=/, a browser-session
    cookie unless ``max_age`` (seconds or timedelta) is given. Set
    ``https_only=False`` only for plain-http development on localhost.

    ``on_unavailable="fail"`` answers 503 when the store cannot load a session;
    ``"anonymous"`` serves an empty, unsaved session instead (logged) and leaves
    the client's cookie alone. ``touch_fraction`` (of ``Config.idle_timeout``) or
    ``touch_interval`` bound how often a read-only request writes ``touch``.

    The cookie is named ``__Host-session`` by default when ``https_only``, no
    ``domain`` and path ``/`` (browsers refuse such a cookie from a sibling or parent
    domain: no cookie tossing), ``session`` otherwise; ``cookie_name`` overrides it.
    ``legacy_cookie_name`` reads a session from an older cookie name when the client
    has none under ours, and moves it (set ours, expire the old one). ``timeout``
    (default: the store's ``timeout``) bounds all of one request's session work:
    past it the request answers 503.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: Store,
        *,
        cookie_name: str | None = None,
        path: str = "/",
        domain: str | None = None,
        same_site: Literal["lax", "strict", "none"] = "lax",
        https_only: bool = True,
        partitioned: bool = False,
        max_age: int | timedelta | None = None,
        touch_fraction: float = 0.1,
        touch_interval: timedelta | float | None = None,
        on_unavailable: Literal["fail", "anonymous"] = "fail",
        max_retries: int = 5,
        record_client: bool = True,
        legacy_cookie_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be an asyncsession Store, not {type(store).__name__}")
        if cookie_name is None:
            host_only = https_only and not domain and path == "/"
            cookie_name = "__Host-session" if host_only else "session"
        if legacy_cookie_name is not None and (
            not legacy_cookie_name
            or not set(legacy_cookie_name) <= _COOKIE_NAME_CHARS
            or legacy_cookie_name == cookie_name
        ):
            raise ValueError(f"invalid legacy cookie name {legacy_cookie_name!r}")
        if timeout is None:
            timeout = store.timeout
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be positive (None: the store's timeout)")
        if not cookie_name or not set(cookie_name) <= _COOKIE_NAME_CHARS:
            raise ValueError(f"invalid cookie name {cookie_name!r}")
        same_site = same_site.lower()  # type: ignore[assignment]
        if same_site not in ("lax", "strict", "none"):
            raise ValueError(f"same_site must be 'lax', 'strict' or 'none', not {same_site!r}")
        if (same_site == "none" or partitioned) and not https_only:
            raise ValueError("SameSite=None and Partitioned cookies need https_only=True (Secure)")
        if cookie_name.startswith("__Host-") and (not https_only or domain or path != "/"):
            raise ValueError("a __Host- cookie needs https_only=True, path='/' and no domain")
        if cookie_name.startswith("__Secure-") and not https_only:
            raise ValueError("a __Secure- cookie needs https_only=True")
        for value, what in ((path, "path"), (domain or "", "domain")):
            if any(c in value for c in ";,\r\n\x00 ") or not value.isascii():
                raise ValueError(f"invalid cookie {what} {value!r}")
        if on_unavailable not in ("fail", "anonymous"):
            raise ValueError("on_unavailable must be 'fail' or 'anonymous'")
        if not 0 < touch_fraction <= 1:
            raise ValueError("touch_fraction must be in (0, 1]")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.timeout = timeout
        self._cookie_re = _cookie_pattern(cookie_name)
        self.legacy_cookie_name = legacy_cookie_name
        self._legacy_re = _cookie_pattern(legacy_cookie_name) if legacy_cookie_name else None
        self._cookie_cache: dict[bytes, tuple[int, tuple[str, ...]]] = {}
        if isinstance(max_age, timedelta):
            max_age = int(max_age.total_seconds())
        if max_age is not None and max_age <= 0:
            raise ValueError("max_age must be positive (None: a browser-session cookie)")
        self.max_age = max_age
        self.on_unavailable = on_unavailable
        self.max_retries = max_retries
        self.record_client = record_client

        idle = store.config.idle_timeout
        if touch_interval is not None:
            every: timedelta | None = (
                touch_interval
                if isinstance(touch_interval, timedelta)
                else timedelta(seconds=touch_interval)
            )
        else:
            every = idle * touch_fraction if idle is not None else None
        self.touch_every = every

        attrs = f"; Path={path}"
        if domain:
            attrs += f"; Domain={domain}"
        attrs += "; HttpOnly"
        if https_only:
            attrs += "; Secure"
        attrs += f"; SameSite={same_site.capitalize()}"
        if partitioned:
            attrs += "; Partitioned"
        self._attrs = attrs
        self._max_age_attr = f"; Max-Age={max_age}" if max_age is not None else ""
        self.expire_cookie_value = f"{cookie_name}=; {_EXPIRED}{attrs}".encode("latin-1")
        self.legacy_expire_value = (
            f"{legacy_cookie_name}=; {_EXPIRED}{attrs}".encode("latin-1")
            if legacy_cookie_name
            else None
        )

    # ---------------------------------------------------------------- cookies

    def set_cookie_value(self, session_id: str) -> bytes:
        return f"{self.cookie_name}={session_id}{self._max_age_attr}{self._attrs}".encode("ascii")

    def read_cookie(self, scope: Scope) -> tuple[int, tuple[str, ...]]:
        """(how many distinct values our cookie had, the well-formed ids among them).

        Parsed as RFC 6265 and Starlette do: pairs split on ``;``, so ``foo=x session=y``
        is the cookie ``foo``. Several values (cookie tossing from a sibling domain, an
        old path) give up to ``MAX_CANDIDATES`` ids in header order; quoting, non-ASCII
        and oversized values give no id, so they never reach the store.
        """
        header: bytes | None = None
        for key, value in scope["headers"]:
            if key == b"cookie":
                if header is not None:  # several Cookie headers (HTTP/2 may split them)
                    return self._parse_cookies(
                        [v for k, v in scope["headers"] if k == b"cookie"], self._cookie_re
                    )
                header = value
        if header is None:
            return 0, ()
        # A client sends the same Cookie header on every request: remember what the
        # last few thousand distinct (short) headers parsed to.
        cache = self._cookie_cache
        parsed = cache.get(header)
        if parsed is None:
            parsed = self._parse_cookies([header], self._cookie_re)
            if len(header) <= _CACHED_COOKIE_HEADER:
                if len(cache) >= _COOKIE_CACHE_SIZE:
                    cache.clear()
                cache[header] = parsed
        return parsed

    def read_legacy_cookie(self, scope: Scope) -> tuple[int, tuple[str, ...]]:
        """``read_cookie`` for ``legacy_cookie_name``."""
        if self._legacy_re is None:
            return 0, ()
        headers = [v for k, v in scope["headers"] if k == b"cookie"]
        return self._parse_cookies(headers, self._legacy_re)

    @staticmethod
    def _parse_cookies(
        headers: list[bytes], pattern: re.Pattern[bytes]
    ) -> tuple[int, tuple[str, ...]]:
        values: dict[bytes, None] = {}  # distinct, in header order, at most MAX_VALUES
        for value in headers:
            for v in pattern.findall(value):
                values[v.strip(b" \t")] = None
                if len(values) >= MAX_VALUES:
                    break
        ids: list[str] = []
        for found in values:
            if len(found) > 130:
                continue
            if len(found) >= 2 and found[:1] == b'"' and found[-1:] == b'"':
                found = found[1:-1]
            try:
                session_id = found.decode("ascii")
            except UnicodeDecodeError:
                continue
            if is_valid_session_id(session_id) and session_id not in ids:
                ids.append(session_id)
                if len(ids) == MAX_CANDIDATES:
                    break
        return len(values), tuple(ids)

    def client_fields(self, scope: Scope) -> dict[str, Any]:
        """``ip_address`` and ``user_agent`` recorded on a new session."""
        if not self.record_client:
            return {}
        client = scope.get("client")
        agent = None
        for key, value in scope["headers"]:
            if key == b"user-agent":
                agent = value.decode("latin-1")[:MAX_USER_AGENT]
                break
        return {"ip_address": client[0] if client else None, "user_agent": agent}

    # ------------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        conn = _Connection(self, scope)
        sent, ids = self.read_cookie(scope)
        if not sent and self._legacy_re is not None:
            sent, ids = self.read_legacy_cookie(scope)
            conn.legacy = sent > 0
        if sent:
            conn.cookie_sent = True
            conn.tossed = sent > 1
        if ids:
            try:
                if len(ids) > 1:
                    await self._load_tossed(conn, ids)
                else:  # the common case, inline (no extra coroutine per request)
                    session_id = ids[0]
                    try:
                        if conn.budget is None:
                            session = await self.store.get(session_id)
                        else:
                            session = await conn.within(self.store.get(session_id))
                    except SessionNotFound as exc:
                        if isinstance(exc, SessionRotated):
                            conn.stale = True  # a newer cookie exists: leave it alone
                        logger.debug("session cookie not adopted: %s", short_hash(session_id))
                    else:
                        conn.loaded(session, session_id)
            except _UNAVAILABLE as exc:
                if self.on_unavailable == "fail":
                    logger.error("session store unavailable, answering 503: %s", exc)
                    await _refuse(kind, receive, send, 503, "Session store unavailable")
                    return
                logger.warning("session store unavailable, serving an anonymous session: %s", exc)
                conn.degraded = True
                conn.forget()
        if conn.data is _EMPTY_SESSION:
            conn.data = SessionDict()
        scope["session"] = conn.data
        scope[SCOPE_KEY] = conn
        if kind == "websocket":
            await self._websocket(conn, scope, receive, send)
            return
        replaced = False

        async def send_wrapper(message: Message) -> None:
            nonlocal replaced
            if message["type"] != "http.response.start":
                if not replaced:
                    await send(message)
                return  # else: we answered with an error instead of the app's response
            data = conn.data
            if data._seen or data._cleared or conn.touch_due:  # conn.pending()
                status = await _commit_or_status(conn)
                if status is not None:
                    replaced = True
                    await _send_error(send, status)
                    return
            extra = conn.cookie_headers()
            if extra:
                message = _with_headers(message, extra)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            conn.scope = None

    async def _load_tossed(self, conn: _Connection, ids: tuple[str, ...]) -> None:
        """Several session cookies of our name (cookie tossing from a sibling domain,
        or an old path): unknown ids are skipped; exactly one live session is adopted;
        several live ones are ambiguous: an anonymous session that cannot be saved
        (409 on write), and the client's cookies are left alone."""
        live: list[tuple[Session, str]] = []
        for session_id in ids:
            try:
                live.append((await conn.within(self.store.get(session_id)), session_id))
            except SessionNotFound:
                continue
        if len(live) == 1:
            conn.loaded(*live[0])
        elif live:
            conn.stale = True
            level, suppressed = _log_limit.level("ambiguous_cookie")
            logger.log(
                level,
                "several live session cookies in one request (cookie tossing?): none adopted%s",
                f" ({suppressed} more since)" if suppressed else "",
            )

    async def _websocket(
        self, conn: _Connection, scope: Scope, receive: Receive, send: Send
    ) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "websocket.accept":
                status = await _commit_or_status(conn)
                conn.cookie_possible = False
                if status is not None:
                    await send({"type": "websocket.close", "code": 1011})
                    return
                extra = conn.cookie_headers()
                if extra:
                    message = _with_headers(message, extra)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
            # changes made after the handshake: saved when the connection ends
            conn.budget = self.timeout
            await _commit_or_status(conn)
        finally:
            conn.scope = None


def _with_headers(message: Message, extra: list[tuple[bytes, bytes]]) -> Message:
    """``message`` with ``extra`` headers appended (in place when they are a list, as
    Starlette's own middleware does)."""
    headers = message.get("headers")
    if type(headers) is list:
        headers.extend(extra)
        return message
    return {**message, "headers": [*(headers or ()), *extra]}


async def _commit_or_status(conn: _Connection) -> int | None:
    """Commit; on failure log and return the status to answer instead."""
    try:
        if conn.budget is None:
            await conn.commit()
        else:
            await conn.within(conn.commit())
    except _UNAVAILABLE as exc:
        logger.error("session not saved, store unavailable: %s", exc)
        return 503
    except SessionConflict as exc:
        # any client can cause these at will (parallel requests, an old cookie)
        level, suppressed = _log_limit.level("conflict")
        logger.log(
            level,
            "session not saved: %s%s",
            exc,
            f" ({suppressed} more since)" if suppressed else "",
        )
        return 409
    except SessionError as exc:
        # NotSerializable, SessionTooLarge...: a bug in the app, not the client's fault
        logger.error(
            "session not saved (%s): %s",
            exc.code,
            exc.message,
            extra={"code": str(exc.code), "details": exc.details},
        )
        return 500
    return None


_ERROR_TEXT = {
    409: b"Session conflict, please retry",
    500: b"Internal Server Error",
    503: b"Session store unavailable",
}


async def _send_error(send: Send, status: int) -> None:
    body = _ERROR_TEXT.get(status, b"Error")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _refuse(kind: str, receive: Receive, send: Send, status: int, text: str) -> None:
    if kind == "http":
        await _send_error(send, status)
        return
    message = await receive()  # websocket.connect
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1011, "reason": text})


# ---------------------------------------------------------------------- helpers


def _conn(connection: HTTPConnection) -> _Connection:
    state = connection.scope.get(SCOPE_KEY)
    if not isinstance(state, _Connection):
        raise RuntimeError("asyncsession.SessionMiddleware is not installed on this app")
    return state


def session_data(connection: HTTPConnection) -> SessionDict:
    """The live session data (the same object as ``request.session``)."""
    return _conn(connection).data


def current_session(connection: HTTPConnection) -> Session | None:
    """The stored ``Session`` record (user id, expiry, client metadata) or None while
    the request has no stored session. Its ``data`` is as of load or last save; the
    live data is ``request.session``."""
    return _conn(connection).session


def current_user_id(connection: HTTPConnection) -> str | None:
    """The logged-in user's id, or None for an anonymous session."""
    session = _conn(connection).session
    return session.user_id if session is not None else None


def require_user(connection: HTTPConnection) -> str:
    """The logged-in user's id; 401 otherwise (a FastAPI dependency)."""
    user_id = current_user_id(connection)
    if user_id is None:
        raise HTTPException(401, "login required")
    return user_id


async def login(
    connection: HTTPConnection,
    user_id: str | int | Any,
    *,
    ttl: timedelta | float | None = None,
    keep_data: bool | None = None,
    **fields: Any,
) -> Session:
    """Bind ``user_id`` to this client under a brand-new session id.

    The previous session is replaced in one atomic step (``Store.rotate_into``): the
    id an attacker may have planted before login is worthless afterwards (session
    fixation), there is never a moment with two live sessions or none, and a request
    still carrying the old id gets no access to the new session (it answers 409 if
    it writes, and never clears the new cookie). The per-user limit applies as in
    ``create``. The data is kept when the previous session was anonymous or already
    this user's, and dropped when it belonged to someone else (as Django's
    ``login()`` does); ``keep_data`` forces either. ``fields`` go to ``new_session``
    (``organization_id``, ``data``, ``ip_address``, ``user_agent``); the client's
    address and user agent are recorded by default; times come from the store's clock.
    """
    conn = _conn(connection)
    store = conn.store
    user = normalize_user_id(user_id)
    old = conn.session
    if keep_data is None:
        keep_data = old is None or old.user_id is None or old.user_id == user
    if old is not None and keep_data and conn.pending():
        await conn.within(conn.commit())  # this request's own changes first, as usual
        old = conn.session
    explicit = "data" in fields
    if not explicit:
        fields["data"] = dict(conn.data) if keep_data else {}
    for key, value in conn.mw.client_fields(connection.scope).items():
        fields.setdefault(key, value)
    attempts = 0
    while True:
        session = new_session(user, ttl, now=store.clock(), **fields)
        if old is None:
            session = await conn.within(store.create(session))
            break
        try:
            session = await conn.within(store.rotate_into(old.id, session, version=old.version))
            break
        except SessionConflict:
            attempts += 1
            if attempts > conn.mw.max_retries:
                raise
        except SessionNotFound:  # gone meanwhile (deleted, expired, another login)
            old = None
            continue
        try:  # changed by a parallel request: take its data and try again
            old = await conn.within(store.get(old.id))
        except SessionNotFound:
            old = None
        else:
            if keep_data and not explicit:
                fields["data"] = old.data
    conn.adopt(session)
    conn.touch_due = False
    conn.refreshed = True
    conn.stale = False
    logger.info("login: session %s for user %r", short_hash(session.id), session.user_id)
    return session


async def logout(connection: HTTPConnection) -> None:
    """Delete the server-side session and expire the cookie. Data written afterwards
    in the same request starts a new anonymous session."""
    conn = _conn(connection)
    if conn.session is not None:
        await conn.store.delete(conn.session.id)
    conn.forget()


async def logout_everywhere(connection: HTTPConnection, *, keep_current: bool = True) -> int:
    """Revoke the current user's other sessions (all of them with
    ``keep_current=False``); returns how many were deleted."""
    conn = _conn(connection)
    session = conn.session
    if session is None or session.user_id is None:
        return 0
    count = await conn.store.delete_by_user(
        session.user_id, keep=session.id if keep_current else None
    )
    if not keep_current:
        conn.forget()
    return count


async def list_user_sessions(connection: HTTPConnection) -> list[Session]:
    """The current user's live sessions, oldest first (for a "your devices" page).

    Show ``Session.short_id`` to identify them, never ``Session.id``: an id is a
    bearer credential. ``revoke_session`` takes the short id.
    """
    user_id = current_user_id(connection)
    if user_id is None:
        return []
    return await _conn(connection).store.list_by_user(user_id)


async def revoke_session(connection: HTTPConnection, short_id: str) -> bool:
    """Delete one of the current user's sessions by its ``short_id``; True if found.
    Revoking the current session is ``logout``."""
    conn = _conn(connection)
    current = conn.session
    if current is None or current.user_id is None:
        return False
    if current.short_id == short_id:
        await logout(connection)
        return True
    for session in await conn.store.list_by_user(current.user_id):
        if session.short_id == short_id:
            await conn.store.delete(session.id)
            return True
    return False


async def save_session(connection: HTTPConnection) -> None:
    """Persist changes now (the middleware otherwise saves when the response starts,
    or for websockets when the connection ends); useful in long-lived websockets."""
    conn = _conn(connection)
    if connection.scope["type"] == "websocket":
        conn.budget = conn.mw.timeout  # a long-lived socket: each save gets the full deadline
    await conn.within(conn.commit())


def session_expires_at(connection: HTTPConnection) -> datetime | None:
    """When the current stored session expires (None without one)."""
    session = _conn(connection).session
    return session.expires_at if session is not None else None


# ---------------------------------------------------------------------- FastAPI

SessionDep = Annotated[SessionDict, Depends(session_data)]
"""``def handler(session: SessionDep)``: the live session data."""
CurrentSessionDep = Annotated[Session | None, Depends(current_session)]
"""The stored ``Session`` record or None."""
CurrentUserDep = Annotated[str, Depends(require_user)]
"""The logged-in user's id; the handler answers 401 without one."""


async def session_error_handler(request: Request, exc: Exception) -> Response:
    """Answer a ``SessionError`` with its ``http_status`` and a JSON body."""
    if not isinstance(exc, SessionError):  # pragma: no cover - registered for SessionError
        raise exc
    return JSONResponse(
        {"error": {"code": str(exc.code), "message": exc.message}},
        status_code=exc.http_status,
        headers={"cache-control": "no-store"},
    )


def install_exception_handler(app: Starlette) -> None:
    """``install_exception_handler(app)``: every ``SessionError`` becomes its HTTP status."""
    app.add_exception_handler(SessionError, session_error_handler)


__all__ = [
    "CurrentSessionDep",
    "CurrentUserDep",
    "SessionDep",
    "SessionDict",
    "SessionMiddleware",
    "current_session",
    "current_user_id",
    "install_exception_handler",
    "list_user_sessions",
    "login",
    "logout",
    "logout_everywhere",
    "require_user",
    "revoke_session",
    "save_session",
    "session_data",
    "session_error_handler",
    "session_expires_at",
]
