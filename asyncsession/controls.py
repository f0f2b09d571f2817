"""ControlledStore: size limits, violation and lifecycle events around any backend.

The wrapped store does the storage; this layer adds the session size limit,
violation events (logged on the ``asyncsession`` logger and handed to
``on_violation``) and lifecycle events (``on_event``). Its ``Config`` is the scope
of every operation it forwards, so several ControlledStores with different
``site_id`` (and limits) can share one backend without seeing each other's
sessions. Per-user limits and expiry are enforced inside the backend's atomic
operations, with this layer's config.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from . import codec
from ._deadline import DEADLINE
from .changes import Applied, EncodedChanges
from .config import Config
from .errors import ErrorCode, SessionError, SessionTooLarge, StoreClosed, short_hash
from .session import Session
from .store import InsertResult, Miss, Outcome, PurgedSession, ScanEntry, Store

logger = logging.getLogger("asyncsession")

VIOLATION_TYPES = (
    "size_exceeded",
    "not_serializable",
    "invalid_session",
    "session_limit_exceeded",
    "site_mismatch",
    "conflict",
    "rotated",
    "decryption_failed",
)
"""Every ``ViolationEvent.type``."""
EVENT_TYPES = ("created", "updated", "rotated", "deleted", "evicted", "expired")
"""Every ``SessionEvent.type``."""


@dataclass(frozen=True, slots=True)
class ViolationEvent:
    """A policy violation: what happened, where, to whom; never a full session id."""

    type: str
    code: ErrorCode
    message: str
    site_id: str
    user_id: str | None
    session: str | None  # short hash
    details: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """A lifecycle event: created, updated, rotated, deleted, evicted, expired.

    ``expired`` events come from purges (``purge_expired()`` or background cleanup)
    and go to the controlled store of the session's own site.
    """

    type: str
    site_id: str
    user_id: str | None
    session: str | None  # short hash
    details: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None


E = TypeVar("E", ViolationEvent, SessionEvent)

CLIENT_TRIGGERED = frozenset(
    {
        "site_mismatch",
        "conflict",
        "rotated",
        "size_exceeded",
        "not_serializable",
        "session_limit_exceeded",
        "decryption_failed",
    }
)
"""Violations any client can cause at will (another site's id, a stale cookie, parallel
writes, data it sends that the app stores past the size limit or that JSON parsers
accept and strict JSON does not, such as NaN, huge integers or deep nesting, logins
past a per-user limit that rejects, a cookie it replays whose record does not decrypt,
say under a key retired before its records were re-encrypted): logged at WARNING at
most once per
``LogLimiter.interval`` per kind, at DEBUG otherwise. Events and metrics still count
every one."""


ROUTINE = frozenset({"conflict", "rotated"})
"""Of those, what a browser causes in normal use (parallel tabs writing one key, a tab
still on the id a login rotated): logged at INFO, not WARNING, under the same limit."""


class LogLimiter:
    """Rate limit for client-triggerable log records: one WARNING per kind per
    ``interval`` seconds carrying the count suppressed since, DEBUG for the rest."""

    interval: float = 60.0

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def level(self, kind: str) -> tuple[int, int]:
        """(level to log this one at, records suppressed since the last WARNING)."""
        now = time.monotonic()
        if now >= self._next.get(kind, 0.0):
            self._next[kind] = now + self.interval
            return logging.WARNING, self._suppressed.pop(kind, 0)
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return logging.DEBUG, 0


Handler = Callable[[E], Awaitable[None] | None]


class ControlledStore(Store):
    """A ``Store`` that enforces the controls of its ``config`` over ``store``."""

    def __init__(
        self,
        store: Store,
        config: Config | None = None,
        *,
        logger: logging.Logger | None = None,
        on_violation: Handler[ViolationEvent] | None = None,
        on_event: Handler[SessionEvent] | None = None,
    ) -> None:
        if isinstance(store, ControlledStore):
            store = store.store
        if not isinstance(store, Store):
            raise TypeError(
                f"with_controls() needs a Store, not {type(store).__name__} "
                "(open_store(url) builds a controlled store from a URL)"
            )
        super().__init__(config if config is not None else store.config, clock=store.clock)
        self.store: Store = store
        self.backend_name = store.backend_name
        self.stores_header = store.stores_header
        self.logger = logger or globals()["logger"]
        self.on_violation = on_violation
        self.on_event = on_event
        self._pending: set[asyncio.Task[Any]] = set()
        self.timeout = store.timeout
        self.honours_deadline = getattr(store, "honours_deadline", False)
        self._log_limit = LogLimiter()
        store._purge_watchers.add(self)  # weak: for ``expired`` events from any purge

    # Lifecycle: the backend owns connections and the cleanup task.

    async def __aenter__(self) -> ControlledStore:
        await self.store.__aenter__()
        self._check_open()
        return self

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{self.backend_name} store is closed")
        self.store._check_open()

    def _start_cleanup(self) -> None:
        self.store._start_cleanup()

    async def close(self) -> None:
        """Close the wrapped backend and wait for pending async handlers."""
        if self._closed:
            return
        self._closed = True
        await self.store.close()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _close(self) -> None:  # pragma: no cover - close() is overridden
        await self.store.close()

    # Controls

    def encode(self, session: Session) -> bytes:
        record = super().encode(session)
        if self.config.keyring is None:  # [encryption] sealed: measured before sealing
            if self.stores_header:
                self._check_size(session, len(record))
            else:  # ``record`` is the data: count the header too
                self._check_plain_size(session, record)
        return record

    def _check_plain_size(self, session: Session, data: bytes) -> None:
        """The size limit on the record ``data`` (the encoded data, unsealed) makes with
        ``session``'s header."""
        limit = self.config.max_session_size
        if limit and len(data) + codec.header_bound(session) > limit:
            self._check_size(session, codec.record_size(session, data))

    def _check_size(self, session: Session, size: int) -> None:
        """``SessionTooLarge`` (and a ``size_exceeded`` violation) for a record of
        ``size`` bytes over the limit."""
        limit = self.config.max_session_size
        if limit and size > limit:
            exc = SessionTooLarge(
                f"session is {size} bytes encoded, over the limit of {limit}",
                details={"size": size, "limit": limit, "session": short_hash(session.id)},
            )
            self._violation("size_exceeded", exc, session)
            raise exc

    def _size_limit(self) -> int:
        return self.config.max_session_size

    def _violation(
        self, kind: str, error: SessionError, session: Session | None, **extra: Any
    ) -> None:
        session_id = extra.pop("session_id", None) or (session.id if session else None)
        event = ViolationEvent(
            type=kind,
            code=error.code,
            message=error.message,
            site_id=self.config.site_id,
            user_id=session.user_id if session else extra.pop("user_id", None),
            session=short_hash(session_id) if session_id else error.details.get("session"),
            details={**error.details, **extra},
            at=self.clock(),
        )
        level, suppressed = logging.WARNING, 0
        if kind in CLIENT_TRIGGERED:
            level, suppressed = self._log_limit.level(kind)
            if kind in ROUTINE and level == logging.WARNING:
                level = logging.INFO
        elif kind == "invalid_session" and error.details.get("corrupt"):
            # a damaged record a client's cookie points to: it can replay that at will
            level, suppressed = self._log_limit.level("invalid_session:corrupt")
        self.logger.log(
            level,
            "asyncsession violation %s: %s%s",
            kind,
            error.message,
            f" ({suppressed} more since the last one logged)" if suppressed else "",
            extra={
                "violation": kind,
                "code": str(error.code),
                "site_id": event.site_id,
                "user_id": event.user_id,
                "session": event.session,
                "details": event.details,
                "suppressed": suppressed,
            },
        )
        if self.on_violation is not None:
            self._dispatch(self.on_violation, event)

    def _event(self, kind: str, session: Session | None, **extra: Any) -> None:
        if self.on_event is None:
            return
        session_id = extra.pop("session_id", None) or (session.id if session else None)
        user_id = session.user_id if session else extra.pop("user_id", None)
        event = SessionEvent(
            type=kind,
            site_id=self.config.site_id,
            user_id=user_id,
            session=short_hash(session_id) if session_id else None,
            details=extra,
            at=self.clock(),
        )
        self._dispatch(self.on_event, event)

    def _wants_expired(self) -> bool:
        return self.on_event is not None

    def _expired(self, removed: Sequence[PurgedSession]) -> None:
        site = self.config.site_id
        for site_id, user_id, session_id in removed:
            if site_id == site:
                self._event("expired", None, session_id=session_id, user_id=user_id)

    def _dispatch(self, handler: Callable[[Any], Any], event: Any) -> None:
        try:
            result = handler(event)
        except Exception:
            self.logger.exception("asyncsession: %s handler raised", event.type)
            return
        if inspect.isawaitable(result):
            # its own context: a request deadline set around the store call that
            # raised the event (asyncsession._deadline) does not bound the handler
            context = contextvars.copy_context()
            context.run(DEADLINE.set, None)
            task = asyncio.get_running_loop().create_task(
                self._await_handler(result, event.type), context=context
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _await_handler(self, result: Awaitable[Any], kind: str) -> None:
        try:
            await result
        except Exception:
            self.logger.exception("asyncsession: %s handler raised", kind)

    async def drain(self) -> None:
        """Wait for async handlers scheduled so far (useful in tests and at shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # Storage: forwarded to the backend with this store's config as the scope. Each
    # hook hands back the backend's coroutine rather than awaiting it in one of its
    # own, so a controlled operation costs no extra coroutine frame.

    def _insert(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Coroutine[Any, Any, InsertResult]:
        return self.store._insert(session, record, scope, now)

    def _load(self, session_id: str) -> Coroutine[Any, Any, Session | None]:
        return self.store._load(session_id)

    def _replace(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Coroutine[Any, Any, Outcome]:
        return self.store._replace(session, record, scope, now)

    def _reseal_write(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Coroutine[Any, Any, Outcome]:
        return self.store._reseal_write(session, record, scope, now)

    def _touch(self, session_id: str, scope: Config, now: datetime) -> Coroutine[Any, Any, Outcome]:
        return self.store._touch(session_id, scope, now)

    def _apply(
        self,
        session_id: str,
        changes: EncodedChanges,
        scope: Config,
        now: datetime,
        limit: int,
        base: Session | None = None,
    ) -> Coroutine[Any, Any, Applied | Outcome]:
        return self.store._apply(session_id, changes, scope, now, limit, base)

    def _rotated_id(self, session_id: str) -> str:
        return self.store._rotated_id(session_id)

    def _rotate(
        self, session_id: str, new_id: str, scope: Config, now: datetime
    ) -> Coroutine[Any, Any, Outcome]:
        return self.store._rotate(session_id, new_id, scope, now)

    def _rotate_into(
        self,
        session_id: str,
        version: int | None,
        session: Session,
        record: bytes,
        scope: Config,
        now: datetime,
    ) -> Coroutine[Any, Any, InsertResult | Outcome]:
        return self.store._rotate_into(session_id, version, session, record, scope, now)

    def _recorded(self, session_id: str, scope: Config, now: datetime) -> Coroutine[Any, Any, Miss]:
        return self.store._recorded(session_id, scope, now)

    def _end(self, session_id: str, scope: Config, now: datetime) -> Coroutine[Any, Any, Outcome]:
        return self.store._end(session_id, scope, now)

    def _adopt(self, session_id: str, handle: str) -> Coroutine[Any, Any, bool]:
        return self.store._adopt(session_id, handle)

    def _missing(
        self, session_id: str, key: str, scope: Config, now: datetime, plain: bool
    ) -> Coroutine[Any, Any, Miss]:
        return self.store._missing(session_id, key, scope, now, plain)

    def _migrated(self, moved: int) -> Coroutine[Any, Any, None]:
        return self.store._migrated(moved)

    def _delete(self, session_id: str, scope: Config) -> Coroutine[Any, Any, Outcome]:
        return self.store._delete(session_id, scope)

    def _delete_by_user(
        self,
        user_id: str,
        keep: str | None,
        scope: Config,
        now: datetime,
        only: str | None = None,
    ) -> Coroutine[Any, Any, list[str]]:
        return self.store._delete_by_user(user_id, keep, scope, now, only)

    def _list_by_user(
        self, user_id: str, scope: Config, now: datetime
    ) -> Coroutine[Any, Any, list[Session]]:
        return self.store._list_by_user(user_id, scope, now)

    async def purge_expired(self) -> int:
        """Purge through the backend, which tells every controlled store sharing it."""
        self._check_open()
        return await self.store.purge_expired()

    def _purge(self, now: datetime) -> Coroutine[Any, Any, int]:
        return self.store._purge(now)

    def _purge_report(self, now: datetime) -> Coroutine[Any, Any, list[PurgedSession]]:
        return self.store._purge_report(now)

    def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        return self.store._scan(batch)

    async def _scan_estimate(self) -> int | None:
        return await self.store._scan_estimate()


def with_controls(
    store: Store,
    config: Config | None = None,
    *,
    logger: logging.Logger | None = None,
    on_violation: Handler[ViolationEvent] | None = None,
    on_event: Handler[SessionEvent] | None = None,
) -> ControlledStore:
    """Wrap ``store`` in the controls of ``config`` (default: the store's own config)."""
    return ControlledStore(
        store, config, logger=logger, on_violation=on_violation, on_event=on_event
    )
