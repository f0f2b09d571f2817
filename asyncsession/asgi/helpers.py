"""The request helpers over ``SessionMiddleware``'s connection: reading the session
(``current_session``, ``current_user_id``), binding and ending it (``login``,
``rotate_session``, ``logout``, ``logout_everywhere``, ``revoke_session``), saving
(``save_session``, ``update_session``), and the FastAPI dependencies and exception
handler."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
import random
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..changes import Applied, Changes
from ..errors import (
    SessionConflict,
    SessionError,
    SessionNotFound,
    SessionRotated,
    short_hash,
)
from ..session import (
    Session,
    new_session,
    normalize_user_id,
    session_handle,
)
from ..session_dict import SessionDict, _plain
from ..store import absolute_deadline
from .middleware import SCOPE_KEY, _Connection, _keys_behind, _outage

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


def _conn(connection: HTTPConnection) -> _Connection:
    state = connection.scope.get(SCOPE_KEY)
    if not isinstance(state, _Connection):
        raise RuntimeError("asyncsession.SessionMiddleware is not installed on this app")
    state.accessed = True  # the response may depend on the session: Vary: Cookie
    return state


def _work(connection: HTTPConnection) -> _Connection:
    """``_conn`` for a helper about to do store work: on a websocket (long-lived, not
    one request) each such call gets the whole deadline, as ``save_session`` does."""
    conn = _conn(connection)
    if connection.scope["type"] == "websocket":
        conn.budget = conn.mw.timeout
    return conn


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


LOGIN_ATTEMPTS = 8
"""How many times ``login`` tries its rotation while parallel requests keep writing."""


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
    ``create``. Two logins at once from one session, both loaded before either
    rotates it: one wins, the other raises ``SessionConflict`` (409, no cookie); one
    that loads after the first rotated it is a login from a rotated cookie (below).
    The data is kept when the previous session
    was anonymous or already this user's, and dropped when it belonged to someone
    else (as Django's ``login()`` does); ``keep_data`` forces either. A request whose
    cookie names an id already rotated (a login whose response was lost) gets a fresh
    session. ``fields`` go to ``new_session``
    (``organization_id``, ``data``, ``ip_address``, ``user_agent``); the client's
    address and user agent are recorded by default; times come from the store's clock.
    """
    return await _login(connection, user_id, ttl, keep_data, fields)


async def rotate_session(connection: HTTPConnection) -> Session | None:
    """A new id for the current session, with the same user and data
    (starsessions' ``regenerate_session_id``, Django's ``cycle_key``): the old id is
    rotated as at ``login``. Use it rather than ``login(request,
    current_user_id(request))``: a session that ended while the request ran (revoked
    by its user's "log out everywhere", say, its body still arriving) answers 409
    (``SessionConflict``, reason ``ended``, or ``rotated`` if a login moved it) and
    nothing is created, where ``login`` would start a new session for that user
    (right for a login, whose credentials the app has just checked; not for a
    stolen cookie being revoked). The new session keeps the record's creation time,
    client fields and absolute deadline. A request without a stored session, or one
    that cleared it, has nothing to rotate: ``None`` (409 ``rotated`` if its cookie
    was rotated before it came in). Stored at once and undone as a login's is if no
    response carries the cookie (which logs the user out): call it last."""
    conn = _conn(connection)  # (_login takes the websocket's budget: _work)
    conn.check_writable()
    _check_cookie_possible(conn, "rotate_session")
    old = conn.session
    if old is None:
        conn.check_not_lost("nothing was rotated")
        return None
    if conn.data._cleared:  # this request logged out: nothing is left to rotate
        return None
    # the record as it was, under a new id: its client fields, creation time and
    # absolute deadline (rotating never lengthens a session's life)
    fields: dict[str, Any] = {"ip_address": old.ip_address, "user_agent": old.user_agent}
    if old.organization_id is not None:
        fields["organization_id"] = old.organization_id
    return await _login(connection, old.user_id, None, True, fields, like=old)


def _check_cookie_possible(conn: _Connection, helper: str) -> None:
    if not conn.cookie_possible:
        # the new id could reach no client: the browser would be left with a rotated
        # cookie (logged out) and the store with a session nobody holds
        raise RuntimeError(
            f"{helper}() after the response started (a background task, a streaming "
            "body) or after a websocket's accept: no cookie can carry the new session "
            "id; call it before"
        )


async def _login(
    connection: HTTPConnection,
    user_id: str | int | Any,
    ttl: timedelta | float | None,
    keep_data: bool | None,
    fields: dict[str, Any],
    *,
    like: Session | None = None,
) -> Session:
    """``login``; with ``like`` (``rotate_session``: the session it rotates), a
    session that ended meanwhile is a 409, never a new session, and the new one
    keeps ``like``'s creation time and absolute deadline."""
    live = like is not None
    conn = _work(connection)
    conn.check_writable()
    _check_cookie_possible(conn, "rotate_session" if live else "login")
    store = conn.store
    user = normalize_user_id(user_id)
    conn.migrate = False  # a legacy cookie's session: the login's rotation moves it
    old = conn.session
    if keep_data is None:
        keep_data = old is None or old.user_id is None or old.user_id == user
    if old is not None and keep_data:
        if conn.pending():
            try:
                await conn.commit()  # this request's own changes first, as usual
            except SessionConflict:
                if conn.session is not None or conn.moved or live:
                    raise  # a key it read changed, or a parallel login moved it: 409
                # ended meanwhile (logout elsewhere, revoke, expiry): as below, a new session
        if conn.moved:  # a parallel login moved it (found by the commit's touch): 409
            conn._gone(old, SessionRotated("session id was rotated during the request"))
        if live and conn.session is None:  # its save or touch found it ended: 409
            conn._gone(old, SessionNotFound("session ended during the request"))
        old = conn.session
        if old is not None and not conn.exact:
            # a save merged with other requests' writes: their keys move too, and the
            # rotation is checked against the version that holds them
            # (the request's own view stays as it is: see SessionDict._moved)
            try:
                conn.session = await conn.within(store.get(old.id))
            except SessionNotFound as exc:  # gone meanwhile: as in the loop below
                _login_lost(conn, old, exc, live)
                conn.session = None
            old = conn.session
    explicit = "data" in fields
    if not explicit:
        if not keep_data:
            fields["data"] = {}
        elif old is not None:  # what is stored (other requests' writes included)
            fields["data"] = dict(old.data)
        else:
            fields["data"] = dict(conn.data)
    for key, value in conn.mw.client_fields(connection.scope).items():
        fields.setdefault(key, value)
    deadline = None if like is None else absolute_deadline(like)
    attempts = 0
    while True:
        now = store.clock()
        if deadline is not None:  # (one clock read: the deadline exactly)
            ttl = max(deadline - now, timedelta(milliseconds=1))
        session = new_session(user, ttl, now=now, **fields)
        if like is not None:
            session.created_at = like.created_at
        if old is None:
            session = await conn.within(store.create(session))
            break
        try:
            session = await conn.within(store.rotate_into(old.id, session, version=old.version))
            break
        except SessionConflict:
            attempts += 1
            if attempts >= LOGIN_ATTEMPTS:
                raise
        except SessionNotFound as exc:  # gone meanwhile (deleted, expired, another login)
            _login_lost(conn, old, exc, live)
            old = None
            continue
        try:  # changed by a parallel request: take its data and try again
            old = await conn.within(store.get(old.id))
        except SessionNotFound as exc:
            _login_lost(conn, old, exc, live)
            old = None
        else:
            if keep_data and not explicit:
                fields["data"] = old.data
    if keep_data and not explicit:
        # the stored values under the new id: what the request read stays read (a key
        # another request changed meanwhile still conflicts), lists it holds stay watched
        conn.rebase(session)
    else:
        conn.adopt(session)
    conn.touch_due = False
    conn.refreshed = True
    conn.stale = conn.rotated = conn.ambiguous = conn.migrate = conn.moved = False
    conn.logged_out = False  # (a login from a logged-out cookie: that logout is behind it)
    conn.fresh = session.id  # until a response carries its cookie
    logger.info("login: session %s for user %r", short_hash(session.id), session.user_id)
    return session


def _login_lost(conn: _Connection, old: Session, exc: SessionNotFound, live: bool) -> None:
    """The session a login was replacing vanished. Another login moved it (a double
    submit, a second tab): that one won, this one answers 409 and leaves its cookie
    alone, rather than start a second session that would replace the winner's
    cookie. Deleted or expired: the login goes on with a new session (``live``,
    ``rotate_session``: 409, nothing created). Sealed under a key this instance
    lacks: an outage (503), nothing created."""
    _keys_behind(exc)
    if live or isinstance(exc, SessionRotated):
        conn._gone(old, exc)


async def logout(connection: HTTPConnection) -> None:
    """Delete the server-side session and expire the cookie. Data written afterwards
    in the same request starts a new anonymous session. The id is recorded as ended
    for ``Config.logout_grace`` (``Store.delete(..., leave_record=True)``): a request
    the browser sent before this one's answer, arriving after a new login, leaves the
    new cookie alone, and its writes answer 409 ``ended``. Logged out already (a
    double click): a logout all the same, the cookie expired.

    A session a parallel login rotated (before this request or during it) is not
    ended: ``SessionConflict`` (409, reason ``rotated``) and no cookie is sent, so
    the user is never told "logged out" while the login's newer session lives on."""
    conn = _work(connection)
    await conn.end()
    conn.forget()


async def logout_everywhere(connection: HTTPConnection, *, keep_current: bool = True) -> int:
    """Revoke the current user's other sessions (all of them with
    ``keep_current=False``); returns how many were deleted.

    With ``keep_current``, a session a parallel login rotated (before this request or
    during it) deletes nothing: ``SessionConflict`` (409, reason ``rotated``), as
    ``logout``. The store checks the session to keep in the same atomic step as the
    deletes, so the login's newer session is never among them."""
    conn = _work(connection)
    conn.check_writable()
    session = conn.session
    if session is None:
        conn.check_not_lost("nobody's sessions were revoked: log in again")
        return 0
    if session.user_id is None:
        return 0
    # The store checks the session kept in the same atomic step as the deletes, so a
    # request whose session ended or moved since it loaded deletes nothing. With
    # keep_current=False too: the others go in that step, then this session (a
    # revoke racing the check cannot land in between: outside attacker)
    keep = session.id
    try:
        count = await conn.within(conn.store.delete_by_user(session.user_id, keep=keep))
    except SessionNotFound as exc:  # the session to keep is gone: rotated or ended
        revoked = exc.details.get("deleted")
        if not revoked:
            conn._gone(session, exc)
        conn._lost(exc)  # (Redis, a user with many sessions: batches done before the login)
        reason = "rotated" if isinstance(exc, SessionRotated) else "ended"
        raise SessionConflict(
            f"the session {reason} during logout everywhere, after {revoked} of the "
            "user's other sessions were revoked; the rest are kept: do it again with the "
            "newer cookie",
            details={"session": short_hash(session.id), "reason": reason, "revoked": revoked},
        ) from exc
    if not keep_current:
        # then this one, leaving a logout's record (requests this browser sent before
        # the answer leave a new login's cookie alone), then every session of the
        # user: one a parallel rotation moved this one to since the check goes too
        # (a delete of this id alone would find it gone and leave the rotated one
        # logged in: outside attacker)
        count += await conn.within(conn.mw._delete_for_logout(session.id))
        count += await conn.within(conn.store.delete_by_user(session.user_id))
        conn.forget()
    return count


async def list_user_sessions(connection: HTTPConnection) -> list[Session]:
    """The current user's live sessions, oldest first (for a "your devices" page).

    Show ``Session.short_id`` to identify them, never ``Session.id``: an id is a
    bearer credential. ``revoke_session`` takes the short id. A request whose
    cookie a login rotated, that carried several live cookies, whose id a logout
    ended, or whose session it found gone meanwhile: ``SessionConflict`` (409),
    never an empty list while the user's devices stay logged in.
    """
    conn = _work(connection)
    if conn.session is None:
        conn.check_not_lost("nothing was listed: log in again")
        return []
    user_id = conn.session.user_id
    if user_id is None:
        return []
    sessions = await conn.within(conn.store.list_by_user(user_id))
    await _still_current(conn, sessions)
    return sessions


async def revoke_session(connection: HTTPConnection, short_id: str) -> bool:
    """Delete one of the current user's sessions by its ``short_id``; True if found.
    Revoking the current session is ``logout``."""
    conn = _work(connection)
    conn.check_writable()
    current = conn.session
    if current is None:  # (never False "no such device" while it stays logged in)
        conn.check_not_lost("nothing was revoked: log in again")
    if current is None or current.user_id is None:
        return False
    if current.short_id == short_id:
        await logout(connection)
        return True
    sessions = await conn.within(conn.store.list_by_user(current.user_id))
    await _still_current(conn, sessions)
    for session in sessions:
        if session.short_id == short_id:
            # deleted in the same atomic step that checks this request's session is
            # still live: one revoked meanwhile (a logout everywhere racing this
            # request) revokes nothing
            try:
                deleted = await conn.within(
                    conn.store.delete_by_user(current.user_id, keep=current.id, only=session.id)
                )
            except SessionNotFound as exc:
                conn._gone(current, exc)
            return deleted > 0
    return False


async def _still_current(conn: _Connection, sessions: list[Session]) -> None:
    """The request's session is among its user's live ``sessions`` (as listed, ids
    at rest), or ``SessionConflict`` (409): a request that loaded it before a revoke,
    a logout everywhere, an eviction or a login elsewhere ended or moved it (a slow
    request body, a websocket held open) acts no more on the user's sessions. One
    missing from the list is looked up once, to tell a rotation from an end."""
    current = conn.session
    if current is None:
        return
    handle = session_handle(current.id)
    if any(s.id == current.id or s.id == handle for s in sessions):
        return
    try:
        got = await conn.within(conn.store.get(current.id))
    except SessionNotFound as exc:
        conn._gone(current, exc)
    if got.user_id != current.user_id:  # (bound to another user meanwhile)
        conn._gone(current, SessionNotFound("session no longer belongs to its user"))


async def save_session(connection: HTTPConnection) -> None:
    """Persist changes now (the middleware otherwise saves when the response starts,
    or for websockets when the connection ends); useful in long-lived websockets.
    ``RuntimeError`` for data of a client without a session once no cookie can reach
    it (after the response started, or a websocket's accept): nothing is stored."""
    conn = _work(connection)
    await conn.commit(explicit=True)


UPDATE_ATTEMPTS = 10
"""How many times ``update_session`` runs its function at most by default."""

_update_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


async def update_session(
    connection: HTTPConnection,
    fn: Callable[[SessionDict], T | Awaitable[T]],
    *,
    attempts: int = UPDATE_ATTEMPTS,
) -> T:
    """Read-modify-write that must not fail on a race (counters, carts).

    Runs ``fn(data)`` on the session data freshly loaded from the store, then applies
    what it changed with the value of every key it read as an expectation, in one
    atomic step (if it read every key, by iterating or ``items()``, the version it
    loaded is the expectation: any change meanwhile runs it again). If another
    request changed one of those keys meanwhile, it reloads and runs ``fn`` again,
    up to ``attempts`` times in all, then raises
    ``SessionConflict``. Calls in one process for one session take turns, so retries
    only happen between processes; waiting for the turn counts against the request's
    deadline like any session work. Returns what ``fn`` returned (a list or dict it
    returns from the data is the session's: changing it is saved).

    ``fn`` may run more than once: keep side effects out of it. It may be a coroutine
    function. The request's other pending changes are saved first, so ``fn`` sees
    them (if they conflict, ``SessionConflict`` is raised before ``fn`` runs).
    Afterwards ``request.session`` shows the session as ``fn`` left it, including
    keys other requests wrote, but for keys this request touched before (and ``fn``
    did not): they keep what the request had and read, so a dependent write on one
    changed meanwhile still conflicts (409). A list or dict taken before the call from
    a key ``fn`` changed is no longer the session's: changing it answers 409 (read the
    key again). Without a stored session, ``fn`` runs on a copy of the request's data
    and a new session is created with the result, at once: a refusal later in the
    request carries its cookie, and a request that fails deletes it. If ``fn`` raises, nothing it
    changed reaches ``request.session`` or the store.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    conn = _work(connection)
    await conn.commit()
    session = conn.session
    if session is None:
        conn.check_not_stale()  # (a websocket whose session ended or moved: 409)
        if not conn.cookie_possible:
            raise RuntimeError(
                "update_session() for a client without a session after the response "
                "started (or a websocket's accept): no cookie can carry a new session's id"
            )
        # fn runs on a copy, as below: if it raises, the request's session is as it was
        view = SessionDict(copy.deepcopy(_plain(conn.data)))
        result = await _run(fn, view)
        data = conn.data
        for key in [k for k in dict.keys(data) if not dict.__contains__(view, k)]:
            del data[key]
        for key, value in dict.items(view):
            data[key] = value
        await conn.commit()
        return result
    lock = _update_locks.get(session.id)
    if lock is None:
        lock = asyncio.Lock()
        _update_locks[session.id] = lock
    acquired = False
    try:
        # waiting for the turn is part of this request's session work: within its deadline
        acquired = await conn.within(lock.acquire(), store_call=False)
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            try:
                fresh = await conn.within(conn.store.get(session.id))
            except SessionNotFound as exc:  # ended or moved meanwhile: 409
                conn._gone(session, exc)
            view = SessionDict(fresh.data)
            result = await _run(fn, view)
            changes = view.changes(all_reads=True)
            if changes is not None:
                try:
                    applied = await conn.within(_write(conn, fresh, view, changes))
                except SessionConflict:
                    continue
                except SessionNotFound as exc:
                    conn._gone(session, exc)
            # what fn touched as it left it; the rest as stored, but for the keys this
            # request touched before, which keep what it read
            fresh.data = _plain(view)
            conn.rebase(fresh, taken=view._touched(), returned=result)
            if changes is not None:
                conn._applied(fresh, applied)
            return result
    finally:
        if acquired:
            lock.release()
    raise SessionConflict(
        f"session data kept changing underneath; gave up after {attempts} attempts",
        details={"session": short_hash(session.id), "attempts": attempts},
    )


async def _write(conn: _Connection, fresh: Session, view: SessionDict, changes: Changes) -> Applied:
    """Store what ``update_session``'s function changed. It read some keys: their
    values are the expectations (``Store.apply``). It read every key (iterated,
    ``len``, ``items()``, ``copy()``...): what it computed may depend on any of them,
    and on the keys that were not there, so the whole session must be as it was:
    a compare-and-set of the version it loaded (``Store.update``)."""
    if not view._read_all:
        return await conn.store.apply(fresh.id, changes, base=fresh)
    updated = await conn.store.update(replace(fresh, data=_plain(view)))
    return Applied(updated.version, updated.updated_at, updated.expires_at)


async def _run(fn: Callable[[SessionDict], T | Awaitable[T]], data: SessionDict) -> T:
    result = fn(data)
    if inspect.isawaitable(result):
        return cast(T, await result)
    return result


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


async def session_error_handler(request: HTTPConnection, exc: Exception) -> Response | None:
    """Answer a ``SessionError`` with its ``http_status`` and a JSON body; on a
    websocket, close it (1013 "try again later" for ``StoreUnavailable``, else 1008),
    which before the accept refuses the handshake (an HTTP body is no websocket
    message: after the accept it broke the connection)."""
    if not isinstance(exc, SessionError):  # pragma: no cover - registered for SessionError
        raise exc
    if exc.http_status == 503:  # StoreUnavailable, StoreClosed: the cause, logged
        _outage(logging.ERROR, "session store unavailable, the app's handler answers: %s", exc)
    if request.scope["type"] == "websocket":
        if isinstance(request, WebSocket):  # (Starlette hands its handlers one)
            code = 1013 if exc.http_status == 503 else 1008  # (StoreUnavailable, StoreClosed)
            # (already closed by the app, or the client is gone: nothing to tell it)
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await request.close(code)
        return None
    # a 503's own message (the store's address, a server's text) goes to the log only
    message = "session store unavailable" if exc.http_status == 503 else exc.message
    error = {"code": str(exc.code), "message": message}
    reason = exc.details.get("reason")
    if isinstance(exc, SessionConflict) and isinstance(reason, str):
        error["reason"] = reason  # why a 409 (rotated, ended, stale_cookie): a client may act on it
    return JSONResponse(
        {"error": error},
        status_code=exc.http_status,
        headers={"cache-control": "no-store"},
    )


def install_exception_handler(app: Starlette) -> None:
    """``install_exception_handler(app)``: every ``SessionError`` becomes its HTTP status."""
    # (one handler for both kinds of connection, which Starlette's types keep apart)
    app.add_exception_handler(SessionError, cast(Any, session_error_handler))
