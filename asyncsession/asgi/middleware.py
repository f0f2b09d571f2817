"""The pure ASGI ``SessionMiddleware``: per request a ``_Connection`` loads the
session the cookie names, hands the app a ``SessionDict``, and saves what changed
when the response starts.

The middleware keeps the session data on the server (any ``Store``) and only an
opaque, random id in an HttpOnly cookie. ``scope["session"]`` is a ``SessionDict``
(a real ``dict``), so ``request.session`` works exactly as with
``starlette.middleware.sessions.SessionMiddleware``. Per request:

* load: one ``store.get`` when, and only when, a well-formed cookie was sent; an
  unknown, expired, other-site or malformed id is never adopted (fresh session,
  stale cookie cleared);
* save: just before ``http.response.start`` (so streaming and file responses keep
  their sessions), only the top-level keys that changed, in one atomic
  ``Store.apply``: keys written without being read are blind writes (last writer
  wins); keys read and then written must still hold what was read, else nothing is
  saved and the response is 409. Parallel requests that change different keys all
  persist; ``update_session`` re-runs a read-modify-write until it applies;
* anonymous sessions are created in the store on their first write; with an idle
  timeout the session is touched at most once per ``touch_fraction`` of it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
from collections.abc import Awaitable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, Literal, NoReturn, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from .. import _plain_http as plain_http
from .._deadline import DEADLINE
from ..changes import Applied, Changes
from ..controls import LogLimiter
from ..errors import (
    SessionConflict,
    SessionEnded,
    SessionError,
    SessionNotFound,
    SessionRotated,
    SessionTooLarge,
    StoreClosed,
    StoreUnavailable,
    short_hash,
)
from ..session import (
    Session,
    _anonymous_session,
    as_duration,
    is_seconds,
    is_valid_session_id,
    new_session,
)
from ..session_dict import SessionDict, _plain
from ..store import Store

logger = logging.getLogger("asyncsession.asgi")
T = TypeVar("T")


SCOPE_KEY = "asyncsession"
"""Where the middleware keeps its per-connection state in the ASGI scope."""

MAX_USER_AGENT = 512
_EXPIRED = "Max-Age=0; expires=Thu, 01 Jan 1970 00:00:00 GMT"
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
TOO_MANY = MAX_VALUES + 1
"""``read_cookie``'s count when our cookie had more values, or more well-formed ids,
than are read: the one that matters may be among the unread ones, so none is adopted
and the request is treated as ambiguous (writes 409, the client's cookies left alone)."""

_log_limit = LogLimiter()
"""Client-triggerable middleware records (conflicts, stale or tossed cookies)."""

_outages = LogLimiter()
"""Store-outage records: one request after another fails while the store is down."""


def _log_limited(
    limiter: LogLimiter,
    kind: str,
    level: int,
    message: str,
    *args: object,
    extra: dict[str, Any] | None = None,
) -> None:
    """``message`` at ``level`` once per ``LogLimiter.interval`` per ``kind``, with the
    count of those suppressed since appended; at DEBUG otherwise. For records a client
    (or an outage under load) can cause on every request; metrics and events still
    count each one."""
    limited, suppressed = limiter.level(kind)
    logger.log(
        level if limited >= logging.WARNING else logging.DEBUG,
        message + "%s",
        *args,
        f" ({suppressed} more since)" if suppressed else "",
        extra=extra,
    )


def _outage(level: int, message: str, *args: object) -> None:
    """A store failure's record, rate-limited per message (an outage under load would
    log every request)."""
    _log_limited(_outages, message, level, message, *args)


_VARY = [(b"vary", b"Cookie")]


def _starlette_marks_access() -> bool:
    """Whether Starlette's ``request.session`` tells the session it was used
    (``mark_accessed``, Starlette 1.0 on). Probed once through its public API."""

    class Probe(dict[str, Any]):
        used = False

        def mark_accessed(self) -> None:
            Probe.used = True

    HTTPConnection({"type": "http", "session": Probe()}).session  # noqa: B018
    return Probe.used


STARLETTE_MARKS_ACCESS = _starlette_marks_access()
"""Without it (Starlette < 1.0) a handler may use ``request.session`` in ways no
method of the session sees (``repr``, a template), so every response carries
``Vary: Cookie``."""


def _whole_seconds(max_age: object) -> int | None:
    """``max_age`` as whole seconds (a cookie's ``Max-Age`` is digits: a browser
    ignores ``Max-Age=3600.5`` and keeps the cookie for the session only)."""
    if max_age is None:
        return None
    seconds = max_age.total_seconds() if isinstance(max_age, timedelta) else max_age
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"max_age is seconds (an int) or a timedelta, got {max_age!r}")
    if not math.isfinite(seconds) or seconds != int(seconds):
        raise ValueError(f"max_age must be whole seconds, got {max_age!r}")
    return int(seconds)


def _cookie_pattern(name: str) -> re.Pattern[bytes]:
    """The value of every ``name=value`` pair of a Cookie header with exactly this name
    (pairs split on ``;`` as in RFC 6265 and Starlette: never the tail of a value)."""
    return re.compile(rb"(?:^|;)[ \t]*" + re.escape(name.encode()) + rb"[ \t]*=([^;]*)")


_EMPTY_SESSION = SessionDict()  # a placeholder, never handed to an app
_CLIENT_FIELDS = frozenset({"ip_address", "user_agent"})  # client_fields()'s own


def _keys_behind(exc: SessionNotFound) -> None:
    """``StoreUnavailable`` if ``exc`` is a session sealed under a key this instance
    lacks: not an unknown cookie (a fresh session, the cookie expired: its user logged
    out and their data out of reach). During a rolling key rotation another instance
    already writes under the new key: answer as for an outage, and leave the cookie
    for an instance that has the key."""
    if not exc.details.get("key_not_configured"):
        return
    raise StoreUnavailable(
        "session sealed under an encryption key this instance does not have "
        "(Config.encryption_keys: a rolling key rotation?)",
        details={"session": exc.details.get("session"), "reason": exc.details.get("reason")},
    ) from exc


def _takes_leave_record(store: Store) -> bool:
    """Whether ``store.delete`` takes ``leave_record`` (a logout's record). A ``Store``
    subclass that overrides ``delete`` with the signature before it would raise
    ``TypeError`` on every logout: its logouts delete without a record, as before,
    and a WARNING at start says so."""
    try:
        params = inspect.signature(store.delete).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a C callable, a mock
        return False
    if any(p.name == "leave_record" or p.kind is p.VAR_KEYWORD for p in params):
        return True
    logger.warning(
        "%s.delete takes no leave_record keyword (a Store subclass overriding delete?): "
        "logouts leave no record, so a request sent before one may expire a newer "
        "login's cookie; accept leave_record and pass it on to enable them",
        type(store).__name__,
    )
    return False


def _ambiguous(nothing: str) -> SessionConflict:
    """409 for a request whose cookies named several live sessions (tossing)."""
    return SessionConflict(
        "the request carried several live session cookies (cookie tossing?) and none "
        f"was adopted: nothing {nothing}; clear this site's cookies",
        details={"reason": "ambiguous"},
    )


class _Connection:
    """Per-connection state: the stored record, the live data and what to tell the client."""

    __slots__ = (
        "accessed",
        "ambiguous",
        "budget",
        "client_id",
        "cookie_possible",
        "cookie_sent",
        "data",
        "degraded",
        "ended",
        "exact",
        "fresh",
        "legacy",
        "logged_out",
        "migrate",
        "moved",
        "mw",
        "refreshed",
        "refusal",
        "rotated",
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
        # session.data is what is stored at session.version (false once a save merged
        # with writes of other requests: this request never saw their keys)
        self.exact = True
        self.data: SessionDict = _EMPTY_SESSION  # replaced in load() or forget()
        self.client_id: str | None = None  # the id in the client's cookie, if it is live
        self.cookie_sent = False  # the request carried a cookie with our name
        self.degraded = False  # store unavailable, serving an ephemeral anonymous session
        self.touch_due = False
        self.refreshed = False  # saved or touched: refresh a Max-Age cookie
        self.cookie_possible = True  # False once a websocket handshake is done
        # why commit answered 409 or 413 instead of the app's response (the app's own
        # exception handler for it, if any, answers)
        self.refusal: SessionError | None = None
        # the cookie names a rotated id, or several live ones (tossing): leave the
        # client's cookies alone and refuse writes (409) rather than start a session
        self.stale = False
        self.moved = False  # a parallel login rotated the loaded session away
        self.rotated = False  # the cookie named an id rotated before this request
        self.logged_out = False  # ... or one a logout ended moments ago (a record)
        self.ambiguous = False  # several live sessions (or too many cookies): none adopted
        self.tossed = False  # several values of our cookie: clearing ours would not help
        self.legacy = False  # the session came in the legacy cookie: move it to ours
        self.migrate = False  # ... under a new id, which commit gives it (_migrate)
        # the id of a session this request stored under a new id (a login(), a
        # rotate_session(), a new session saved before the response), until a response
        # carries its cookie: a request that fails first undoes it (undo_login)
        self.fresh: str | None = None
        self.ended = False  # this request deleted the client's session (a logout)
        self.budget: float | None = mw.timeout  # seconds of store work left (None: no bound)
        self.accessed = False  # a helper (current_user_id, login...) looked at the session

    async def within(self, work: Awaitable[T], *, store_call: bool = True) -> T:
        """Await store ``work`` within what is left of this request's deadline (one
        budget for load, touch, save and login together); past it, ``StoreUnavailable``.
        A store that ``honours_deadline`` is handed the deadline (``_deadline``)
        instead of having its call wrapped in ``asyncio.timeout``; other stores get
        both (SQLite bounds its wait for another process's lock by it, so that case
        ends cleanly, as SQLITE_BUSY, rather than cancelled in doubt); other ``work``
        (``store_call=False``) is always wrapped."""
        budget = self.budget
        if budget is None:
            return await work
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if budget <= 0:
                raise TimeoutError
            if not store_call:
                async with asyncio.timeout(budget):
                    return await work
            token = DEADLINE.set(started + budget)
            try:
                if self.mw._honours_deadline:
                    return await work
                async with asyncio.timeout(budget):
                    return await work
            finally:
                DEADLINE.reset(token)
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
        self.exact = True
        self.data = SessionDict(session.data)
        self.client_id = None if self.legacy else session_id
        self.migrate = self.legacy
        every = self.mw.touch_every
        if every is not None:
            self.touch_due = self.store.clock() - session.last_accessed_at >= every

    def adopt(self, session: Session) -> None:
        self.session = session
        self.exact = True
        self.data._reset(session.data)

    def rebase(self, session: Session, *, taken: Any = (), returned: Any = None) -> None:
        """``session`` is now this request's stored session (a login or rotation moved
        the data, or ``update_session`` wrote it): ``SessionDict._moved``."""
        self.session = session
        self.exact = self.data._moved(session.data, taken=taken, returned=returned)

    def forget(self) -> None:
        """The stored session is gone: empty data, expire the cookie (unless a new one)."""
        self.session = None
        self.migrate = False
        if self.data is not _EMPTY_SESSION and self.looked():
            self.accessed = True  # what the app rendered from it still needs Vary
        if self.data is _EMPTY_SESSION:
            self.data = SessionDict()
        else:
            self.data._reset({})
        self.touch_due = False

    # ------------------------------------------------------------------ save

    async def commit(self, *, explicit: bool = False, final: bool = False) -> None:
        """Persist this request's changes (idempotent: a second call saves only new ones).
        Each store call runs ``within`` the request's deadline; a touch that fails or
        runs out of it is skipped, as it is only a refresh. ``final``: the commit at the
        response's start (or a websocket's accept or end), the only one that moves a
        session from the legacy cookie: its response carries the new id (a move at an
        earlier save, then a request that fails, would leave the client's id rotated
        to one it never gets)."""
        data = self.data
        if data._cleared:
            # cleared stays set until the delete is done: a failed save retries it
            if await self.end():
                kept = _plain(data)
                self.forget()
                self.data.update(kept)
            data._cleared = False
        if self.session is None:
            if dict.__len__(self.data):
                await self._create(explicit=explicit)
            return
        move = final and self.migrate
        try:
            changes = self.data.changes()
            if changes is not None:
                await self._save(self.session, changes)
        except SessionConflict:
            if not final and self.session is not None:  # (None: it ended or moved)
                await self._reload(self.session)
            raise
        if changes is None and move:
            self.touch_due = False  # the rotation below refreshes it as a touch would
        elif changes is None and self.touch_due:
            self.touch_due = False
            try:
                await self.within(self.store.touch(self.session.id))
            except SessionNotFound as exc:  # as _gone, minus the 409 (a read: nothing
                self._lost(exc)  # of this request is lost)
            except _UNAVAILABLE as exc:
                _outage(logging.WARNING, "session touch skipped: %s", exc)
            else:
                self.refreshed = True
        if move and self.session is not None:  # (a touch that lost it: no move)
            await self._migrate(self.session)

    async def _reload(self, session: Session) -> None:
        """After a conflict refused an explicit save (``save_session``,
        ``update_session``), which the app is told by the exception: the request's
        pending changes are dropped and the session is taken as stored, so the
        connection can go on (a websocket has no other way to reload; review: every
        later save of it answered 409). Lists and dicts the app may still hold are
        watched as after ``update_session`` (``SessionDict._refused``). An outage
        leaves things as they are: the next save is refused again and reloads then."""
        try:
            fresh = await self.within(self.store.get(session.id))
        except SessionNotFound as exc:
            self._lost(exc)
            return
        except _UNAVAILABLE:
            return
        self.session = fresh
        self.exact = True
        self.data._refused(fresh.data)

    async def _migrate(self, session: Session) -> None:
        """Move a session that came in ``legacy_cookie_name`` to a new id (set under the
        cookie's own name). The legacy name is one a sibling domain can toss to this
        client, and its tosser holds that id: rotated, it is worthless to them, and a
        client that keeps sending it is not served it again. A session that ended
        meanwhile is dropped as a touch would drop it; an outage leaves the move to
        the next request."""
        self.migrate = False
        if not self.cookie_possible:  # a websocket past its handshake: no cookie now
            return
        try:
            session.id = await self.within(self.store.rotate(session.id))
        except SessionNotFound as exc:
            self._lost(exc)
        except _UNAVAILABLE as exc:
            self.migrate = True
            _outage(logging.WARNING, "session cookie move skipped: %s", exc)
        else:
            self.refreshed = True

    def login_stands(self) -> bool:
        """Whether this request stored a session under a new id (a login,
        ``rotate_session``, a new session saved before the response) that is still
        this request's, with no logout after it: a refused save leaves it as it is,
        and the refusal carries its cookie."""
        fresh, session = self.fresh, self.session
        if fresh is None or session is None or session.id != fresh:
            return False
        return not self.data._cleared  # (a logout after it, which the refusal left undone)

    def standing_cookie(self) -> list[tuple[bytes, bytes]]:
        """The ``Set-Cookie`` headers a refused save still sends: what the request did
        to the client's session before the refused write stands. A session it stored
        under a new id (``login_stands``) gets its cookie; a session it ended (a
        ``logout()`` or ``clear()``, with nothing stored after it) has its cookie
        expired."""
        if self.login_stands():
            self.fresh = None  # (delivered: nothing to undo)
        elif not (self.ended and self.session is None):
            return []
        return [h for h in self.cookie_headers() if h[0] == b"set-cookie"]

    async def undo_login(self) -> None:
        """A login (or a new session saved early) whose new id reaches no client (its
        request raised, or answered nothing, or its websocket closed before the
        accept) is undone: its session is deleted, so no session that nobody holds
        takes a place in the user's limit (``reject`` locking the user out,
        ``oldest`` evicting their real devices on the next tries). The rotated cookie
        stays as it is (a read gets an empty session, a write 409 until a login).
        Within what is left of the request's deadline; if the store fails, logged,
        and it expires with its ttl."""
        session_id, self.fresh = self.fresh, None
        if session_id is None:
            return
        try:
            await self.within(self.store.delete(session_id))
        except Exception as exc:
            _log_limited(
                _log_limit,
                "login_undo",
                logging.WARNING,
                "a failed request's login left session %s (no client has its cookie), "
                "not ended: %s",
                short_hash(session_id),
                exc,
            )
        else:
            logger.info(
                "login undone: session %s, its request failed before a response carried its cookie",
                short_hash(session_id),
            )

    def check_writable(self) -> None:
        """With ``on_unavailable="anonymous"``, a request whose session the store could
        not load serves an empty one for reading only: a write, logout or login would
        act on the wrong session (the real one lives on), so it answers 503 rather than
        a 200 for what was not done."""
        if self.degraded:
            raise StoreUnavailable(
                "the session store was unavailable when this request loaded its session; "
                "nothing of the session can be changed or ended in it"
            )

    def _lost(self, exc: SessionNotFound) -> None:
        """The stored session ended or moved under this request: nothing more is served
        from it, and the client's cookie is left alone (it may hold a newer one). One
        sealed under a key this instance lacks has not ended: an outage (503)."""
        _keys_behind(exc)
        self.stale = True
        if isinstance(exc, SessionRotated):
            self.moved = True
        self.forget()

    async def end(self) -> bool:
        """Delete the stored session (``logout``, ``clear()``); whether there was one.
        One a login rotated, before this request or during it, is not this request's
        to end: ``SessionConflict`` (409, reason ``rotated``), and the newer cookie
        stays, never a 200 "logged out" while the login's session lives on."""
        session = self.session
        if session is None:
            self.check_writable()
            if self.moved:  # a touch or an earlier 409 found a login moved it: 409
                self.check_not_lost("nothing was logged out: log out with the newer cookie")
            self.check_not_rotated()  # (ended meanwhile: a logout all the same)
            if self.logged_out:  # logged out again (a double click): the cookie expired
                self.stale = self.logged_out = False
                self.ended = True
            return False
        store = self.store
        deleted = await self.within(self.mw._delete_for_logout(session.id))
        if not deleted and await self.within(
            store._was_rotated(session.id, store.scope, store.clock())
        ):
            self._gone(session, store._rotated_error(session.id))
        # deleted, or ended already: by another logout (a double click: the browser
        # may show only this answer), by this one (an earlier try whose reply was
        # lost), or by a revoke or expiry; a logout all the same, its cookie expired
        self.ended = True
        return True

    def check_not_rotated(self) -> None:
        """A request whose cookie a login rotated before it started (it has no
        session) may not act on the user's sessions: 409, reason ``rotated``. Nor
        may one whose cookies named several live sessions (cookie tossing), none
        adopted: 409, reason ``ambiguous`` (a logout that ended nothing would answer
        "logged out" while the user's session lives on)."""
        if self.rotated:
            raise SessionConflict(
                "the session cookie was rotated (a login, or a move from the legacy "
                "cookie) before this request; log out with the newer cookie",
                details={"reason": "rotated"},
            )
        if self.ambiguous:
            raise _ambiguous("ended")

    def check_not_lost(self, nothing: str) -> None:
        """For a request with no session that acts on its user's sessions (``logout``
        everywhere, ``revoke_session``, ``list_user_sessions``, ``rotate_session``):
        409 when its cookie named one it may no longer act for, never an answer as if
        there were nothing while the user's sessions live on. Rotated before the
        request or several live cookies (``check_not_rotated``); logged out before it
        (a logout's record: ``ended``); lost during it, as a touch or an earlier 409
        found it (``rotated`` if a login moved it, else ``ended``)."""
        self.check_not_rotated()
        if self.stale:
            reason = "rotated" if self.moved else "ended"
            when = "before" if self.logged_out else "during"
            raise SessionConflict(
                f"the session {reason} {when} the request; {nothing}",
                details={"reason": reason},
            )

    def check_not_stale(self) -> None:
        """No new session for a request whose cookie names a session it may not
        replace: one a login rotated (before the request: ``stale_cookie``; during
        it: ``rotated``), one that ended during it (a logout elsewhere, a revoke:
        ``ended``; a websocket then has nothing left to save to), or several live ones
        (``ambiguous``). The client's newer cookie, if any, must stay: 409."""
        if not self.stale:
            return
        if self.ambiguous:
            raise _ambiguous("saved")
        if self.moved:
            reason, what = "rotated", "was rotated (a login elsewhere)"
        elif self.rotated:
            reason, what = "stale_cookie", "is stale (rotated)"
        else:
            reason, what = "ended", "ended (a logout, revoke or expiry)"
        raise SessionConflict(
            f"the session cookie {what}: nothing saved; reload (a websocket: reconnect)",
            details={"reason": reason},
        )

    async def _create(self, *, explicit: bool = False) -> None:
        self.check_not_stale()  # a rotated id, or several live ones: the newer cookie stays
        self.check_writable()
        if not self.cookie_possible:
            if explicit:  # save_session(): the app asked, and must not think it stored
                raise RuntimeError(
                    "save_session() for a client without a session after the response "
                    "started (or a websocket's accept): no cookie can carry a new "
                    "session's id, so nothing was stored; write before it"
                )
            logger.debug(
                "session first written after the response started (or a websocket's "
                "accept): not stored, no cookie can carry its id"
            )
            return
        client = self.mw.client_fields(self.scope) if self.scope is not None else {}
        now = self.store.clock()
        if client.keys() <= _CLIENT_FIELDS:  # (the common case, built without checks)
            get = client.get
            ip, agent = get("ip_address"), get("user_agent")
            session = _anonymous_session(_plain(self.data), now, ip, agent)
        else:  # (a subclass's client_fields with other fields: new_session checks them)
            session = new_session(None, data=_plain(self.data), now=now, **client)
        self.session = await self.within(self.store.create(session))
        self.fresh = self.session.id  # until a response carries its cookie
        self.exact = True
        self.data._saved()
        self.refreshed = True

    async def _save(self, session: Session, changes: Changes) -> None:
        """One atomic ``apply`` of this request's key changes: blind writes always
        land; a key the request read first must still hold what it read, else
        ``SessionConflict`` (409) and nothing of this request is saved."""
        try:
            # base: only while session.data is what is stored at its version (a backend
            # may then write base.data plus the changes without reading the record)
            base = session if self.exact else None
            work = self.store.apply(session.id, changes, base=base)
            applied = await (work if self.budget is None else self.within(work))
        except SessionNotFound as exc:
            self._gone(session, exc)
        self._applied(session, applied)

    def _applied(self, session: Session, applied: Applied) -> None:
        """Record a successful ``apply`` on the request's copy of the session. If other
        requests wrote in between (the version moved by more than this apply), the copy's
        data lacks their keys: it no longer is the stored data at its version."""
        self.exact = self.exact and applied.version == session.version + 1
        session.version = applied.version
        session.updated_at = session.last_accessed_at = applied.updated_at
        session.expires_at = applied.expires_at
        session.data = _plain(self.data)
        self.data._saved()
        self.touch_due = False
        self.refreshed = True

    def _gone(self, session: Session, exc: SessionNotFound) -> NoReturn:
        """The stored session vanished under this request: a login moved it, or a
        logout, revoke or expiry ended it. Its changes are refused with 409 (never a
        200 for a write that was dropped), nothing is recreated, and the client's
        cookie is left alone: by now the browser may hold a newer one (a login after
        that logout), which expiring ours would clear. A later request that still
        carries the dead id finds it ended (a logout's record: left alone again) or
        unknown (past the record's grace, a revoke), and expires it then."""
        self._lost(exc)
        if isinstance(exc, SessionRotated):
            raise SessionConflict(
                "the session was rotated (a login, or a move from the legacy cookie) during "
                "the request; its changes were not applied",
                details={"session": short_hash(session.id), "reason": "rotated"},
            ) from exc
        raise SessionConflict(
            "the session ended (logout, revoke or expiry) during the request; its changes "
            "were not applied",
            details={"session": short_hash(session.id), "reason": "ended"},
        ) from exc

    # --------------------------------------------------------------- cookies

    def prepare_refresh(self) -> None:
        """Before the commit at the response's start. A save made earlier in the
        request (update_session, save_session) does not by itself re-send a Max-Age
        cookie: a login elsewhere may have rotated the id since, and sending it again
        would undo that login. A touch now confirms the id is still this session's
        (a rotated one makes the response stale: no cookie) and refreshes it."""
        if self.refreshed:
            self.refreshed = False
            session = self.session
            if self.mw.max_age is not None and session is not None and session.id == self.client_id:
                self.touch_due = True

    def pending(self) -> bool:
        """Whether ``commit`` has anything to do (cheap: read-only requests skip it)."""
        data = self.data
        return data._dirty or data._cleared or self.touch_due or self.migrate

    def cookie_headers(self) -> list[tuple[bytes, bytes]]:
        """``Set-Cookie`` (and ``Vary``) headers this response needs."""
        mw = self.mw
        session = self.session
        if session is not None:
            # (a move from the legacy cookie put off by an outage: its id is not set
            # under our name unrotated, and the legacy cookie stays, so the next request
            # moves it; outside review: the tossable id was kept)
            if self.migrate or (
                session.id == self.client_id and not (self.refreshed and mw.max_age is not None)
            ):
                return _VARY if self.looked() else []
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
        return _VARY if self.looked() else []

    def looked(self) -> bool:
        """Whether the response may depend on the cookie: the app looked at the
        session, through ``request.session`` or a helper (a "guest" page too, which a
        shared cache must not serve to a client that has a session). As Starlette's
        middleware does, ``Vary: Cookie`` goes on exactly those responses (and on
        every one that sets the cookie)."""
        return self.accessed or self.data.accessed or not STARLETTE_MARKS_ACCESS


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
    ``max_retries`` is ignored (saves are key-level and never retried; see
    ``update_session``); it is still accepted so existing code runs.

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
        max_age: float | timedelta | None = None,
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
        named = cookie_name is not None
        if cookie_name is None:
            host_only = https_only and not domain and path == "/"
            cookie_name = "__Host-session" if host_only else "session"
        if legacy_cookie_name is not None and (
            not legacy_cookie_name or not set(legacy_cookie_name) <= _COOKIE_NAME_CHARS
        ):
            raise ValueError(f"invalid legacy cookie name {legacy_cookie_name!r}")
        if legacy_cookie_name == cookie_name:
            if named:
                raise ValueError(
                    f"legacy_cookie_name and cookie_name are both {cookie_name!r}: "
                    "nothing to move from"
                )
            # the default name is the old one here (https_only=False in development,
            # a domain or a path): the cookie is already the one to keep
            legacy_cookie_name = None
        if timeout is None:
            timeout = store.timeout
        if timeout is not None and (not is_seconds(timeout) or not timeout > 0):
            raise ValueError(
                f"timeout must be positive seconds (None: the store's timeout), not {timeout!r}"
            )
        if not cookie_name or not set(cookie_name) <= _COOKIE_NAME_CHARS:
            raise ValueError(f"invalid cookie name {cookie_name!r}")
        site = same_site.lower() if isinstance(same_site, str) else None
        if site not in ("lax", "strict", "none"):
            raise ValueError(
                f"same_site must be 'lax', 'strict' or 'none' (a string), not {same_site!r}"
            )
        same_site = site  # type: ignore[assignment]
        if (same_site == "none" or partitioned) and not https_only:
            raise ValueError("SameSite=None and Partitioned cookies need https_only=True (Secure)")
        if cookie_name.startswith("__Host-") and (not https_only or domain or path != "/"):
            raise ValueError("a __Host- cookie needs https_only=True, path='/' and no domain")
        if cookie_name.startswith("__Secure-") and not https_only:
            raise ValueError("a __Secure- cookie needs https_only=True")
        for value, what in ((path, "path"), (domain or "", "domain")):
            if any(c in value for c in ";,\r\n\x00 ") or not value.isascii():
                raise ValueError(f"invalid cookie {what} {value!r}")
        if not path.startswith("/"):
            # a browser ignores such a Path and uses the request's directory instead
            raise ValueError(f"cookie path must start with '/', not {path!r}")
        if on_unavailable not in ("fail", "anonymous"):
            raise ValueError("on_unavailable must be 'fail' or 'anonymous'")
        if not is_seconds(touch_fraction) or not 0 < touch_fraction <= 1:
            raise ValueError(f"touch_fraction must be in (0, 1], not {touch_fraction!r}")
        every = as_duration(touch_interval, "touch_interval")  # (None: touch_fraction)
        if every is not None and every < timedelta(0):
            raise ValueError(
                "touch_interval must be seconds or a timedelta, 0 or more (None: "
                f"touch_fraction of the idle timeout), not {touch_interval!r}"
            )
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
        self.app = app
        self.store = store
        self.cookie_name = cookie_name
        self.timeout = timeout
        # the store keeps the request's deadline itself (see _deadline)
        self._honours_deadline = getattr(store, "honours_deadline", False) is True
        self._logout_records = _takes_leave_record(store)
        self._cookie_re = _cookie_pattern(cookie_name)
        self.legacy_cookie_name = legacy_cookie_name
        self._legacy_re = _cookie_pattern(legacy_cookie_name) if legacy_cookie_name else None
        self._cookie_cache: dict[bytes, tuple[int, tuple[str, ...]]] = {}
        max_age = _whole_seconds(max_age)
        if max_age == 0:
            max_age = None  # a browser-session cookie, as starsessions takes 0 (Starlette:
            # Max-Age=0, a cookie deleted at once)
        if max_age is not None and max_age < 0:
            raise ValueError(
                f"max_age must be positive, got {max_age} (None or 0: a browser-session cookie)"
            )
        self.max_age = max_age
        self.on_unavailable = on_unavailable
        self.max_retries = max_retries
        self.record_client = record_client
        self.https_only = https_only

        idle = store.config.idle_timeout
        if every is None and idle is not None:
            every = idle * touch_fraction
        self.touch_every = every

        # attributes spelled and ordered as Starlette's SessionMiddleware writes them
        # (names are case-insensitive to browsers, not to tests written against it):
        # name=value; path=/; Max-Age=N; httponly; samesite=lax; secure; domain=..
        self._path_attr = f"; path={path}"
        flags = f"; httponly; samesite={same_site}"
        if https_only:
            flags += "; secure"
        if domain:
            flags += f"; domain={domain}"
        if partitioned:
            flags += "; partitioned"
        self._flags = flags
        self._max_age_attr = f"; Max-Age={max_age}" if max_age is not None else ""
        self.expire_cookie_value = self._expiring(cookie_name)
        self.legacy_expire_value = (
            self._expiring(legacy_cookie_name) if legacy_cookie_name else None
        )

    def _delete_for_logout(self, session_id: str) -> Coroutine[Any, Any, bool]:
        """``store.delete(session_id, leave_record=True)`` (see ``_takes_leave_record``)."""
        if self._logout_records:
            return self.store.delete(session_id, leave_record=True)
        return self.store.delete(session_id)

    def _expiring(self, name: str) -> bytes:
        return f"{name}={self._path_attr}; {_EXPIRED}{self._flags}".encode("latin-1")

    # ---------------------------------------------------------------- cookies

    def set_cookie_value(self, session_id: str) -> bytes:
        return (
            f"{self.cookie_name}={session_id}{self._path_attr}{self._max_age_attr}{self._flags}"
        ).encode("ascii")

    def read_cookie(self, scope: Scope) -> tuple[int, tuple[str, ...]]:
        """(how many distinct values our cookie had, the well-formed ids among them).

        Parsed as RFC 6265 and Starlette do: pairs split on ``;``, so ``foo=x session=y``
        is the cookie ``foo``. Several values (cookie tossing from a sibling domain, an
        old path) give up to ``MAX_CANDIDATES`` ids in header order; more than that, or
        more than ``MAX_VALUES`` values, give ``(TOO_MANY, ())``. Quoting, non-ASCII and
        oversized values give no id, so they never reach the store.
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
                if len(values) > MAX_VALUES:
                    return TOO_MANY, ()
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
                if len(ids) == MAX_CANDIDATES:
                    return TOO_MANY, ()
                ids.append(session_id)
        return len(values), tuple(ids)

    def client_fields(self, scope: Scope) -> dict[str, Any]:
        """``ip_address`` and ``user_agent`` recorded on a new session (fields of
        ``new_session``: a subclass may return others, or mask these)."""
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
        if self.https_only and scope.get("scheme") in plain_http.PLAIN_SCHEMES:
            plain_http.request(scope)
        conn = _Connection(self, scope)
        sent, ids = self.read_cookie(scope)
        if not sent and self._legacy_re is not None:
            sent, ids = self.read_legacy_cookie(scope)
            conn.legacy = sent > 0
        if sent:
            conn.cookie_sent = True
            conn.tossed = sent > 1
            if sent == TOO_MANY:
                # ambiguous: none adopted, writes refused (409); legacy cookies only
                # help a move, and refusing would let a tosser block every write
                conn.stale = conn.ambiguous = not conn.legacy
                _log_limited(
                    _log_limit,
                    "too_many_cookies",
                    logging.WARNING,
                    "more session cookies in one request than are read (cookie tossing?): "
                    "none adopted",
                )
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
                        _keys_behind(exc)  # an outage: 503, the cookie kept
                        if isinstance(exc, SessionRotated):
                            conn.stale = True  # a newer cookie exists: leave it alone
                            conn.rotated = True
                        elif isinstance(exc, SessionEnded):
                            # logged out since the browser sent this request: a login
                            # may have followed, whose cookie expiring ours would clear
                            conn.stale = conn.logged_out = True
                        logger.debug("session cookie not adopted: %s", short_hash(session_id))
                    else:
                        conn.loaded(session, session_id)
            except _UNAVAILABLE as exc:
                if self.on_unavailable == "fail":
                    _outage(logging.ERROR, "session store unavailable, answering 503: %s", exc)
                    await _refuse(kind, receive, send, 503, "Session store unavailable")
                    return
                _outage(
                    logging.WARNING,
                    "session store unavailable, serving an anonymous session: %s",
                    exc,
                )
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
        # the app this middleware wraps (a mounted sub-app puts itself in scope["app"]
        # as the request goes through it): its exception handlers answer a refusal
        outer = scope.get("app")

        async def send_wrapper(message: Message) -> None:
            nonlocal replaced
            if message["type"] != "http.response.start":
                if not replaced:
                    await send(message)
                return  # else: we answered with an error instead of the app's response
            conn.prepare_refresh()
            data = conn.data
            if data._dirty or data._cleared or conn.touch_due or conn.migrate:  # pending()
                status = await _commit_or_status(conn)
                if status is not None:
                    replaced = True
                    # what the request did to the client's session before the refused
                    # write stands (a login, a rotation, a new session saved early, a
                    # logout): the refusal carries its cookie, as the app's response
                    # would have; only what the request changed after it is refused
                    cookie = conn.standing_cookie()
                    conn.cookie_possible = False
                    await conn.undo_login()
                    if conn.refusal is None or not await _app_answers(
                        conn.refusal, outer, scope, receive, send, cookie
                    ):
                        await _send_error(send, status, cookie)
                    return
            extra = conn.cookie_headers()
            conn.cookie_possible = False  # from here on no response can carry a cookie
            conn.fresh = None  # (a login's cookie goes with this response)
            if extra:
                if _sets_cookie(extra):
                    if not _has_header(message, b"cache-control"):
                        extra.append(_PRIVATE)
                    if self.https_only and scope.get("scheme") == "http":
                        plain_http.cookie_set()
                message = _with_headers(message, extra)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            conn.scope = None
            if conn.fresh is not None:  # the app raised, or answered nothing
                await conn.undo_login()
        data = conn.data
        # (changes() returns at once for a request that wrote nothing and read no list)
        if not conn.cookie_possible and not replaced and data.modified:
            # a background task or a streaming body changed the session after the
            # response started: nothing saves that, say so
            _log_limited(
                _log_limit,
                "after_response",
                logging.WARNING,
                "session changed after the response started: not saved (%s)",
                "call save_session(request) after the change, or change it before the response"
                if conn.session is not None
                else "a client without a session gets none then: no cookie can carry its id",
            )

    async def _load_tossed(self, conn: _Connection, ids: tuple[str, ...]) -> None:
        """Several session cookies of our name (cookie tossing from a sibling domain,
        or an old path): unknown ids are skipped; exactly one live session is adopted;
        no live one but a rotated id among them is a stale cookie (409 on write);
        several live ones are ambiguous: an anonymous session that cannot be saved
        (409 on write), and the client's cookies are left alone."""
        live: list[tuple[Session, str]] = []
        rotated = ended = False
        for session_id in ids:
            try:
                live.append((await conn.within(self.store.get(session_id)), session_id))
            except SessionNotFound as exc:
                _keys_behind(exc)  # not unknown: one of them may be the user's
                rotated = rotated or isinstance(exc, SessionRotated)
                ended = ended or isinstance(exc, SessionEnded)
                continue
        if len(live) == 1:
            conn.loaded(*live[0])
        elif not live:
            conn.rotated = rotated  # a newer cookie exists (or a logout's record), as
            conn.stale = rotated or ended  # for one id
            conn.logged_out = ended and not rotated
        else:
            # legacy cookies: none moved, a fresh session
            conn.stale = conn.ambiguous = not conn.legacy
            _log_limited(
                _log_limit,
                "ambiguous_cookie",
                logging.WARNING,
                "several live session cookies in one request (cookie tossing?): none adopted",
            )

    async def _websocket(
        self, conn: _Connection, scope: Scope, receive: Receive, send: Send
    ) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "websocket.accept":
                conn.prepare_refresh()
                status = await _commit_or_status(conn)
                conn.cookie_possible = False
                if status is not None:
                    await conn.undo_login()
                    await send({"type": "websocket.close", "code": 1011})
                    return
                conn.fresh = None
                extra = conn.cookie_headers()
                if extra:
                    message = _with_headers(message, extra)
            await send(message)

        left = False

        async def receive_wrapper() -> Message:
            nonlocal left
            message = await receive()
            if message["type"] == "websocket.disconnect":
                left = True
            return message

        try:
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except WebSocketDisconnect:
                # The client left and the app's next receive raised (a
                # `while True: await ws.receive_text()` loop): that is how such a
                # connection ends, so its changes are saved as on a return. Any other
                # exception saves nothing, as for HTTP.
                if left:
                    await self._websocket_ended(conn)
                raise
            await self._websocket_ended(conn)
        finally:
            conn.scope = None
            if conn.fresh is not None:  # closed or failed before the accept
                await conn.undo_login()

    async def _websocket_ended(self, conn: _Connection) -> None:
        """Save the changes made after the handshake. No response carries a cookie now
        (a socket closed before accept had none): no new session and no legacy move,
        which would leave the client's id rotated to one it never gets."""
        conn.cookie_possible = False
        conn.migrate = False
        conn.budget = self.timeout
        await _commit_or_status(conn)


def _sets_cookie(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(key == b"set-cookie" for key, _ in headers)


_PRIVATE = (b"cache-control", b"private")
"""On a response that sets the session cookie and says nothing of caching: a shared
cache that stores responses by default must not hand one client's new session id
(or its logout) to every client (``Vary: Cookie`` does not stop that: a client
without a cookie matches one without a cookie)."""


def _has_header(message: Message, name: bytes) -> bool:
    return any(key.lower() == name for key, _ in message.get("headers") or ())


def _varies_on_cookie(message: Message) -> bool:
    """Whether a response's ``Vary`` headers already name ``Cookie`` (or ``*``)."""
    return any(
        key.lower() == b"vary"
        and any(part.strip().lower() in (b"cookie", b"*") for part in value.split(b","))
        for key, value in message.get("headers") or ()
    )


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
        await conn.commit(final=True)
    except _UNAVAILABLE as exc:
        _outage(logging.ERROR, "session not saved, store unavailable: %s", exc)
        return 503
    except SessionConflict as exc:
        # any client can cause these at will (parallel requests, two tabs, an old
        # cookie), and a browser does in normal use: INFO, rate-limited; but a list
        # changed after update_session replaced it is a bug in the app: WARNING
        replaced = exc.details.get("reason") == "replaced"
        _log_limited(
            _log_limit,
            "conflict:replaced" if replaced else "conflict",
            logging.WARNING if replaced else logging.INFO,
            "session not saved (409, %s): %s",
            exc.details.get("reason", "a key it read was changed meanwhile"),
            exc,
        )
        conn.refusal = exc
        return 409
    except SessionError as exc:
        # SessionTooLarge: the data grew past Config.max_session_size, which a client
        # can drive at will where the app stores what it sends: 413 and WARNING.
        # NotSerializable...: a bug in the app (it stored what JSON cannot hold, or what
        # a client sent unchecked, such as NaN): 500 and ERROR. Either is logged once
        # per interval per kind, and the app's own handler for it may answer
        too_large = isinstance(exc, SessionTooLarge)
        _log_limited(
            _log_limit,
            "too_large" if too_large else f"not_saved:{exc.code}",
            logging.WARNING if too_large else logging.ERROR,
            "session not saved (%s): %s",
            exc.code,
            exc.message,
            extra={"code": str(exc.code), "details": exc.details},
        )
        conn.refusal = exc
        return 413 if too_large else 500
    return None


def _handler_for(exc: SessionError, app: Any) -> Any:
    """``app``'s exception handler for ``exc`` (Starlette's ``exception_handlers``), if any."""
    handlers = getattr(app, "exception_handlers", None)
    if not isinstance(handlers, dict):
        return None
    return next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)


async def _app_answers(
    exc: SessionError,
    outer: Any,
    scope: Scope,
    receive: Receive,
    send: Send,
    cookie: Sequence[tuple[bytes, bytes]],
) -> bool:
    """Answer ``exc`` with the app's own exception handler for it (Starlette's
    ``exception_handlers``, e.g. from ``install_exception_handler``), if it has one:
    the middleware saves after the app has returned, outside its handlers' reach.
    ``outer``: the app the middleware wraps, asked first; then the mounted sub-app
    that served the request (now ``scope["app"]``), if any. ``cookie``: the
    ``Set-Cookie`` headers of a login that go with the answer."""
    handler = _handler_for(exc, outer)
    if handler is None and scope.get("app") is not outer:
        handler = _handler_for(exc, scope.get("app"))
    if handler is None:
        return False
    try:
        request = Request(scope, receive)
        if inspect.iscoroutinefunction(handler):
            response = await handler(request, exc)
        else:
            response = await run_in_threadpool(handler, request, exc)
    except Exception:
        logger.exception("the app's handler for %s raised", type(exc).__name__)
        return False

    async def vary(message: Message) -> None:  # the error depends on the cookie
        if message["type"] == "http.response.start":
            extra = [] if _varies_on_cookie(message) else list(_VARY)
            if cookie:
                extra += cookie
                if not _has_header(message, b"cache-control"):
                    extra.append(_PRIVATE)
            if extra:
                message = _with_headers(message, extra)
        await send(message)

    await response(scope, receive, vary)
    return True


_ERROR_TEXT = {
    409: b"Session conflict, please retry",
    500: b"Internal Server Error",
    503: b"Session store unavailable",
}


async def _send_error(send: Send, status: int, cookie: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = _ERROR_TEXT.get(status, b"Error")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                _VARY[0],  # a session error depends on the cookie
                *cookie,
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
