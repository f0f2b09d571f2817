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
        return http_status[self.code]

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!s}, details={self.details!r})"
        )


class SessionNotFound(SessionError):
    default_code = ErrorCode.SESSION_NOT_FOUND


class SessionExpired(SessionNotFound):
    """Expired but not yet purged. A ``SessionNotFound``, so one ``except`` handles both."""

    default_code = ErrorCode.SESSION_EXPIRED


class SessionRotated(SessionNotFound):
    """The id was moved to a new one moments ago (``rotate``, ``login``): a request that
    still carries it gets no access to the new session. A ``SessionNotFound``, so
    existing handlers keep working; the record of the rotation lasts
    ``Config.rotation_grace`` and never names the new id."""

    default_code = ErrorCode.SESSION_ROTATED


class SessionCorrupt(SessionNotFound):
    """The stored record's encrypted data does not open (``Config.encryption_keys``):
    altered, truncated, or under a key that is not configured. Never returned as
    data; a ``SessionNotFound``, so the middleware treats the cookie as unknown."""

    default_code = ErrorCode.SESSION_CORRUPT


class InvalidSession(SessionError):
    default_code = ErrorCode.SESSION_INVALID


class SessionTooLarge(SessionError):
    default_code = ErrorCode.SESSION_SIZE_EXCEEDED


class NotSerializable(SessionError):
    default_code = ErrorCode.SESSION_NOT_SERIALIZABLE


class SessionLimitExceeded(SessionError):
    default_code = ErrorCode.SESSION_LIMIT_EXCEEDED


class SiteMismatch(SessionError):
    default_code = ErrorCode.SESSION_SITE_MISMATCH


class StoreClosed(SessionError):
    default_code = ErrorCode.STORE_CLOSED


class SessionConflict(SessionError):
    default_code = ErrorCode.SESSION_CONFLICT


class StoreUnavailable(SessionError):
    default_code = ErrorCode.STORE_UNAVAILABLE
