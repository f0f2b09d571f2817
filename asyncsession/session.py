"""The session model: one dataclass, timezone-aware UTC timestamps, ids from ``secrets``."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard
from uuid import UUID

from .errors import InvalidSession, short_hash

Clock = Callable[[], datetime]
"""A function returning the current time as an aware UTC ``datetime``."""

SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
MAX_USER_ID_LENGTH = 256


def utcnow() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


TAG_LENGTH = 4
"""Characters of the user tag that starts a user session's id (see ``user_tag``)."""


@functools.lru_cache(maxsize=8192)
def user_tag(user_id: str) -> str:
    """Four base64url characters derived from the user id (24 bits of its SHA-256).

    Ids of a user's sessions start with it, so in Redis Cluster a session and its
    user's index share a hash slot and per-user limits stay atomic. Not a secret: the
    43 random characters after it carry the id's 256 bits of randomness.
    """
    digest = hashlib.sha256(b"asyncsession-user:" + user_id.encode("utf-8", "surrogatepass"))
    return base64.urlsafe_b64encode(digest.digest()[:3]).decode()


def generate_session_id(user_id: str | int | UUID | None = None) -> str:
    """32 random bytes from ``secrets``, base64url without padding: 43 characters.

    With a ``user_id`` (normalized as ``new_session`` does: an int or UUID is its
    ``str``) the id is ``user_tag(user_id)`` followed by those 43 characters (47 in
    all): the form user sessions get from ``new_session``.
    """
    user = normalize_user_id(user_id)
    token = secrets.token_urlsafe(32)
    return token if user is None else user_tag(user) + token


HANDLE_RE = re.compile(r"[A-Za-z0-9_-]{4}\.[0-9a-f]{64}")
"""What ``session_handle`` makes: never a valid session id (``.`` is not in the id
alphabet), so a handle read from a dump of the storage cannot be used as a cookie."""


@functools.lru_cache(maxsize=8192)
def session_handle(session_id: str) -> str:
    """The form a store keeps a session id in at rest (``Config.hash_ids``): the id's
    first 4 characters (the hash tag that places it on Redis Cluster: for a user
    session the user tag, not a secret), ``.``, and the SHA-256 of the whole id in hex.

    Unkeyed SHA-256 is enough: the ids this library makes carry 256 random bits, so a
    digest cannot be reversed by guessing, and no key exists whose loss would log every
    user out. ``short_hash`` of a handle is ``short_hash`` of its id.

    The last 8,192 handles are cached: a client sends the same id with every
    request, and inside a busy process a SHA-256 through OpenSSL costs several
    microseconds. (The cache is process memory, which holds the ids of the
    requests it serves anyway; it is never written anywhere.)
    """
    check_session_id(session_id)  # (once per id: the cache keeps the handle)
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
    return session_id[:4] + "." + digest


def is_handle(value: object) -> bool:
    """True for what ``session_handle`` returns (as ``list_by_user`` shows ids)."""
    return isinstance(value, str) and HANDLE_RE.fullmatch(value) is not None


def is_valid_session_id(session_id: object) -> bool:
    """True if ``session_id`` is a ``str`` of 16-128 characters of ``A-Z``, ``a-z``,
    ``0-9``, ``-`` and ``_``: the form every store accepts (what
    ``generate_session_id`` makes is one). A check of form only, never of existence;
    never raises (the stores raise ``InvalidSession`` for anything else). A handle
    (``session_handle``) is not a valid id."""
    return isinstance(session_id, str) and SESSION_ID_RE.fullmatch(session_id) is not None


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is well formed, else raise ``InvalidSession``.

    Runs before any backend is touched: no key injection, glob characters or giant keys.
    """
    if isinstance(session_id, str) and SESSION_ID_RE.fullmatch(session_id) is not None:
        return session_id
    if isinstance(session_id, str):
        shown = {"length": len(session_id)}
        if len(session_id) <= 128:
            shown["session"] = short_hash(session_id)  # type: ignore[assignment]
    else:
        shown = {"type": type(session_id).__name__}  # type: ignore[dict-item]
    raise InvalidSession(
        "session id must be 16-128 characters of A-Z, a-z, 0-9, '-' or '_'", details=shown
    )


def normalize_user_id(user_id: object) -> str | None:
    """``None`` stays anonymous; ``str``, ``int`` and ``UUID`` become a non-empty ``str``."""
    if user_id is None:
        return None
    if isinstance(user_id, bool):
        raise InvalidSession("user id must be str, int or UUID, not bool")
    if isinstance(user_id, int | UUID):
        return str(user_id)
    if isinstance(user_id, str):
        if not user_id:
            raise InvalidSession("user id must not be empty (use None for anonymous sessions)")
        if len(user_id) > MAX_USER_ID_LENGTH:
            raise InvalidSession(
                f"user id longer than {MAX_USER_ID_LENGTH} characters",
                details={"length": len(user_id), "limit": MAX_USER_ID_LENGTH},
            )
        if "\x00" in user_id:
            raise InvalidSession("user id must not contain NUL")
        try:
            user_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidSession("user id must be valid UTF-8 text (no lone surrogates)") from None
        return user_id
    raise InvalidSession(
        f"user id must be str, int or UUID, not {type(user_id).__name__}",
        details={"type": type(user_id).__name__},
    )


@dataclass(slots=True, kw_only=True, eq=True)
class Session:
    """A server-side session.

    ``expires_at`` is when the session stops being valid. With ``Config.idle_timeout``
    it moves forward on every access but never past ``absolute_expires_at``, the hard
    deadline fixed at creation. ``version`` is bumped by every successful update and
    is what compare-and-set checks.
    """

    id: str
    user_id: str | None
    site_id: str = ""
    organization_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    last_accessed_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    absolute_expires_at: datetime | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    version: int = 0

    def is_expired(self, now: datetime | None = None) -> bool:
        """True once ``now`` (default: the current time) has reached ``expires_at``."""
        if self.expires_at is None:
            return False
        return (now or utcnow()) >= self.expires_at

    def ttl(self, now: datetime | None = None) -> timedelta:
        """Time left until expiry (zero once expired; ``timedelta.max`` with no expiry)."""
        if self.expires_at is None:
            return timedelta.max
        return max(self.expires_at - (now or utcnow()), timedelta(0))

    @property
    def short_id(self) -> str:
        """What logs and events show instead of the id."""
        return short_hash(self.id)

    def __repr__(self) -> str:
        # Never print the full id: reprs end up in logs and tracebacks.
        return (
            f"Session(id=<{self.short_id}>, user_id={self.user_id!r}, site_id={self.site_id!r}, "
            f"version={self.version}, expires_at={self.expires_at!r}, keys={sorted(self.data)!r})"
        )


_NEW_SESSION_FIELDS = frozenset({"organization_id", "data", "ip_address", "user_agent", "site_id"})


def is_seconds(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a number of seconds: an int or float (their subclasses too:
    numpy's, an IntEnum), not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_duration(value: object, what: str) -> timedelta | None:
    """``value`` (a ``timedelta``, or seconds) as a ``timedelta``; None stays None.
    Anything else, or more seconds than a ``timedelta`` holds, is a ``ValueError``
    naming ``what``."""
    if value is None or isinstance(value, timedelta):
        return value
    if is_seconds(value):
        try:
            return timedelta(seconds=value)
        except (OverflowError, ValueError) as exc:  # past a billion days, or NaN
            raise ValueError(
                f"{what} must be a number of seconds a timedelta holds, not {value!r}"
            ) from exc
    shown = repr(value) if isinstance(value, bool) else type(value).__name__
    raise ValueError(f"{what} must be a timedelta or seconds, not {shown}")


def _anonymous_session(
    data: dict[str, Any], now: datetime, ip_address: str | None, user_agent: str | None
) -> Session:
    """``new_session(None, data=data, now=now, ip_address=..., user_agent=...)`` for a
    caller whose arguments are known to be good (the middleware: a plain dict of its
    own, the store's clock, the client's address and agent): ``data`` is taken, not
    copied, and only the clock is checked (a naive one is ``InvalidSession``, as there).
    A new session costs one request's Python: the dataclass's ``__init__`` and the
    checks are a good part of it."""
    if not isinstance(now, datetime) or now.utcoffset() is None:
        return new_session(None, data=data, now=now)  # (raises, with its message)
    session: Session = _blank_session(Session)
    session.id = generate_session_id()
    session.user_id = None
    session.site_id = ""
    session.organization_id = None
    session.data = data
    session.created_at = session.updated_at = session.last_accessed_at = now
    session.expires_at = session.absolute_expires_at = None
    session.ip_address = ip_address
    session.user_agent = user_agent
    session.version = 0
    return session


_blank_session = Session.__new__
"""A ``Session`` with no field set, for the hot paths that set every field themselves
(cheaper than the dataclass's ``__init__``): ``_anonymous_session``, ``store._with_id``."""


def new_session(
    user_id: str | int | UUID | None,
    ttl: timedelta | float | None = None,
    *,
    now: datetime | None = None,
    **fields: Any,
) -> Session:
    """Build a new session with a fresh id (not stored yet: pass it to ``Store.create``).

    ``user_id``: a ``str``, ``int`` or ``UUID`` (stored as its ``str``), or ``None``
    for an anonymous session. ``ttl`` (timedelta or seconds, positive) sets
    ``expires_at`` and ``absolute_expires_at``; without it the store applies
    ``Config.default_ttl``. ``now`` is the creation time (``created_at``,
    ``updated_at``, ``last_accessed_at``, and where ``ttl`` counts from): a
    timezone-aware ``datetime``, default the current UTC time; a naive one (or
    anything else) raises ``InvalidSession``. Pass ``store.clock()`` where the
    store has an injected clock. ``fields`` sets ``data``, ``organization_id``,
    ``ip_address``, ``user_agent`` and ``site_id``; any other name is a
    ``TypeError``.

    ``site_id`` need not be given: ``Store.create`` sets it to the store's
    ``Config.site_id`` whatever it was (and fills ``expires_at`` from
    ``default_ttl`` when no ``ttl`` was given), so the session is visible to that
    site only. A user session's id starts with the user's tag
    (``generate_session_id(user_id)``), which Redis Cluster needs.
    """
    unknown = set(fields) - _NEW_SESSION_FIELDS
    if unknown:
        raise TypeError(f"new_session() got unexpected fields: {', '.join(sorted(unknown))}")
    if now is None:
        at = utcnow()
    elif isinstance(now, datetime) and now.utcoffset() is not None:
        at = now
    else:  # (a naive time failed later: a raw TypeError, or a store that broke on it)
        raise InvalidSession(
            f"new_session(now=...) needs a timezone-aware datetime, not {now!r:.60}",
            details={"now": type(now).__name__},
        )
    expires_at = None
    if ttl is not None:
        try:
            delta = as_duration(ttl, "ttl")
        except ValueError as exc:  # (a raw OverflowError for 1e20 s before)
            raise InvalidSession(str(exc), details={"ttl": type(ttl).__name__}) from None
        assert delta is not None
        if delta <= timedelta(0):
            raise InvalidSession("ttl must be positive", details={"ttl": delta.total_seconds()})
        try:
            expires_at = at + delta
        except OverflowError:  # past the year 9999
            raise InvalidSession(
                f"ttl is too long: {ttl!r} from now is past the last date Python holds",
                details={"ttl": delta.total_seconds()},
            ) from None
    data = fields.pop("data", None)
    if data is not None and not isinstance(data, Mapping):
        raise InvalidSession(
            f"data must be a dict, not {type(data).__name__}",
            details={"data": type(data).__name__},
        )
    user = normalize_user_id(user_id)
    return Session(
        id=generate_session_id(user),
        user_id=user,
        data=dict(data) if data is not None else {},
        created_at=at,
        updated_at=at,
        last_accessed_at=at,
        expires_at=expires_at,
        absolute_expires_at=expires_at,
        **fields,
    )
