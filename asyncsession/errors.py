"""Error hierarchy: every failure a caller can act on is a ``SessionError`` with a code."""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from typing import Any, ClassVar


class ErrorCode(StrEnum):
    """Stable, machine-readable error codes; each value is its name (``"SESSION_NOT_FOUND"``)."""

    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    SESSION_INVALID = "SESSION_INVALID"
    SESSION_SIZE_EXCEEDED = "SESSION_SIZE_EXCEEDED"
    SESSION_NOT_SERIALIZABLE = "SESSION_NOT_SERIALIZABLE"
    SESSION_LIMIT_EXCEEDED = "SESSION_LIMIT_EXCEEDED"
    SESSION_SITE_MISMATCH = "SESSION_SITE_MISMATCH"
    STORE_CLOSED = "STORE_CLOSED"
    SESSION_CONFLICT = "SESSION_CONFLICT"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    SESSION_ROTATED = "SESSION_ROTATED"
    SESSION_CORRUPT = "SESSION_CORRUPT"
    SESSION_ENDED = "SESSION_ENDED"


http_status: dict[ErrorCode, int] = {
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.SESSION_EXPIRED: 401,
    ErrorCode.SESSION_INVALID: 400,
    ErrorCode.SESSION_SIZE_EXCEEDED: 413,
    ErrorCode.SESSION_NOT_SERIALIZABLE: 400,
    ErrorCode.SESSION_LIMIT_EXCEEDED: 429,
    ErrorCode.SESSION_SITE_MISMATCH: 404,
    ErrorCode.STORE_CLOSED: 503,
    ErrorCode.SESSION_CONFLICT: 409,
    ErrorCode.STORE_UNAVAILABLE: 503,
    ErrorCode.SESSION_ROTATED: 409,
    ErrorCode.SESSION_CORRUPT: 404,
    ErrorCode.SESSION_ENDED: 404,
}
"""HTTP status an ASGI handler should answer for each code."""


_HANDLE = re.compile(r"[A-Za-z0-9_-]{4}\.[0-9a-f]{64}")  # session.HANDLE_RE (no cycle)


def short_hash(session_id: str) -> str:
    """First 12 hex chars of SHA-256: how a session id appears in logs, events and errors.

    Of a handle (``session_handle``, the form an id is stored in) the same 12 characters
    as of its id, read off the handle."""
    if not isinstance(session_id, str):
        raise InvalidSession(
            f"short_hash() takes a session id (str), not {type(session_id).__name__}",
            details={"type": type(session_id).__name__},
        )
    if len(session_id) == 69 and _HANDLE.fullmatch(session_id):  # tag "." sha256 hex
        return session_id[5:17]
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class SessionError(Exception):
    """Base class: ``code``, human ``message`` and a ``details`` dict for handlers."""

    default_code: ClassVar[ErrorCode] = ErrorCode.SESSION_INVALID

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code or self.default_code
        self.message = message
        self.details: dict[str, Any] = details or {}

    @property
    def http_status(self) -> int:
        """The HTTP status an ASGI handler answers for ``code`` (``http_status[code]``)."""
        return http_status[self.code]

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!s}, details={self.details!r})"
        )


class SessionNotFound(SessionError):
    """No live session under this id on this store's site: never created, deleted,
    evicted, purged, another site's (reported as not found so a client cannot probe
    other sites; a ``site_mismatch`` violation says which), or a stored record that
    cannot be decoded (``details["corrupt"]``). Code ``SESSION_NOT_FOUND``, HTTP 404;
    ``details["session"]`` is the id's short hash. Through the middleware, a cookie
    naming no session gets a fresh session. Subclasses say more: ``SessionExpired``,
    ``SessionRotated``, ``SessionEnded``, ``SessionCorrupt``."""

    default_code = ErrorCode.SESSION_NOT_FOUND


class SessionExpired(SessionNotFound):
    """Expired but not yet purged. A ``SessionNotFound``, so one ``except`` handles both.

    Code ``SESSION_EXPIRED``, HTTP 401; ``details``: ``session`` (short hash) and,
    from ``get``, ``expired_at``."""

    default_code = ErrorCode.SESSION_EXPIRED


class SessionRotated(SessionNotFound):
    """The id was moved to a new one moments ago (``rotate``, ``login``): a request that
    still carries it gets no access to the new session. A ``SessionNotFound``, so
    existing handlers keep working; the record of the rotation lasts
    ``Config.rotation_grace`` and never names the new id.

    Code ``SESSION_ROTATED``, HTTP 409; ``details["session"]`` is the old id's short
    hash."""

    default_code = ErrorCode.SESSION_ROTATED


class SessionEnded(SessionNotFound):
    """The session was ended by a logout moments ago (``Store.delete(...,
    leave_record=True)``, which ``logout()`` and ``request.session.clear()`` use): a
    request still carrying the id, sent before the logout, is told so rather than
    finding an unknown id, so the middleware leaves the client's cookie alone (by then
    it may name a new login). A ``SessionNotFound``; the record lasts
    ``Config.logout_grace`` and holds only a hash of the id.

    Code ``SESSION_ENDED``, HTTP 404; ``details["session"]`` is the id's short hash."""

    default_code = ErrorCode.SESSION_ENDED


class SessionCorrupt(SessionNotFound):
    """The stored record's encrypted data does not open (``Config.encryption_keys``):
    altered, truncated, or under a key that is not configured. Never returned as
    data; also a ``decryption_failed`` violation.

    Code ``SESSION_CORRUPT``, HTTP 404 (the message stays ``session not found``);
    ``details``: ``session`` (short hash), ``corrupt`` (True), ``reason`` (why it
    did not open, never the data) and, for a record sealed under a key id this
    instance does not have, ``key_not_configured`` (True).

    A ``SessionNotFound``, so the middleware treats an altered or truncated record's
    cookie as unknown and starts a fresh session. A record under a key this instance
    lacks (another instance already writes under a new key: a rolling key rotation)
    is answered as an outage instead (``StoreUnavailable``): 503, or an anonymous
    session with ``on_unavailable="anonymous"``, and the cookie kept for an instance
    that has the key."""

    default_code = ErrorCode.SESSION_CORRUPT


class InvalidSession(SessionError):
    """A malformed argument, refused before the backend is touched: a session id that
    is not 16-128 characters of ``A-Z a-z 0-9 - _`` (``details``: ``length`` or
    ``type``), a ``None`` session, a user id that is empty, too long or of the wrong
    type, a naive ``datetime`` (``new_session(now=...)``), a non-positive ``ttl``;
    also ``create`` of an id that already exists (never an overwrite) and an
    ``update`` that changes ``user_id``. Code ``SESSION_INVALID``, HTTP 400."""

    default_code = ErrorCode.SESSION_INVALID


class SessionTooLarge(SessionError):
    """The encoded session would be over ``Config.max_session_size`` (``create``,
    ``update``, ``apply``); nothing is written. Code ``SESSION_SIZE_EXCEEDED``, HTTP
    413; ``details``: ``limit`` (bytes), ``session`` (short hash) and, where the
    whole record was encoded, ``size``. Also a ``size_exceeded`` violation."""

    default_code = ErrorCode.SESSION_SIZE_EXCEEDED


class NotSerializable(SessionError):
    """Session data holds a value JSON has no form for (a ``datetime``, ``UUID``,
    ``set``, ``tuple``, a non-``str`` key, NaN...) or is not a dict: refused rather
    than silently changed (``create``, ``update``, ``apply``, the middleware's save).
    Code ``SESSION_NOT_SERIALIZABLE``, HTTP 400; ``details``: ``path`` (where the bad
    value is, e.g. ``data["cart"][2]``), ``type`` and ``reason``. Also a
    ``not_serializable`` violation."""

    default_code = ErrorCode.SESSION_NOT_SERIALIZABLE


class SessionLimitExceeded(SessionError):
    """``create`` (or a ``login``/``rotate`` binding a user) for a user already at
    ``Config.max_sessions_per_user`` with ``eviction="reject"``; nothing is written.
    Code ``SESSION_LIMIT_EXCEEDED``, HTTP 429; ``details``: ``limit`` and ``count``
    (the user's live sessions). Also a ``session_limit_exceeded`` violation."""

    default_code = ErrorCode.SESSION_LIMIT_EXCEEDED


class SiteMismatch(SessionError):
    """A session of another site (``Config.site_id``). Code ``SESSION_SITE_MISMATCH``,
    HTTP 404. The stores never raise it to a caller: another site's session is
    reported as ``SessionNotFound``, so a client cannot probe which ids exist on
    other sites, and the ``site_mismatch`` violation records what happened. An
    application may raise it itself."""

    default_code = ErrorCode.SESSION_SITE_MISMATCH


class StoreClosed(SessionError):
    """A call on a store after ``close()`` (the end of ``async with store``): a store
    opens once and closes once. Code ``STORE_CLOSED``, HTTP 503; the middleware
    answers it as an outage (503, or an anonymous session with
    ``on_unavailable="anonymous"``), and a websocket closes with 1013."""

    default_code = ErrorCode.STORE_CLOSED


class SessionConflict(SessionError):
    """A write lost a race; nothing of it was applied. Code ``SESSION_CONFLICT``, HTTP
    409. Raised by ``update`` with a stale ``version`` (``details``: ``session``,
    ``expected_version``; a ``conflict`` violation), by ``apply`` when a key in
    ``Changes.expect`` no longer holds its value, by ``rotate`` of a session that
    kept changing, and by ``update_session`` after its last attempt
    (``details["attempts"]``): reload and retry.

    Through the middleware, ``details["reason"]`` says why a request's change was
    refused when it is not a plain conflict on a key it read: ``rotated`` (a login
    or rotation moved the session before or during the request: log out with the
    newer cookie), ``ended`` (logout, revoke or expiry during the request),
    ``stale_cookie`` (the request's cookie was rotated before it), ``ambiguous``
    (several live session cookies, none adopted: cookie tossing), ``replaced`` (a
    list or dict taken from the session before ``update_session`` replaced its key
    was changed afterwards). ``install_exception_handler`` puts it in the JSON body's
    ``reason``."""

    default_code = ErrorCode.SESSION_CONFLICT


class StoreUnavailable(SessionError):
    """The backend failed or did not answer: connection refused, a timeout, a Redis
    error reply, a locked, read-only or corrupt SQLite file, a server too old. A
    backend's own exceptions never leak: they become this, with the cause chained
    and no password in the text. A write that failed this way may or may not have
    been applied. Code ``STORE_UNAVAILABLE``, HTTP 503.

    The middleware also raises it when the request's ``timeout`` runs out
    (``details["timeout"]``), when a session is sealed under an encryption key this
    instance does not have (``details``: ``session``, ``reason``; the cookie is
    kept), and for a change to a session loaded with ``on_unavailable="anonymous"``
    during an outage. A 503 from ``session_error_handler`` says only ``session store
    unavailable``; the cause goes to the log."""

    default_code = ErrorCode.STORE_UNAVAILABLE
