"""The Store contract every backend implements.

``Store`` holds the public API and everything that is the same in every backend:
id validation, defaults, expiry arithmetic on an injectable clock, error mapping,
background cleanup. A backend implements the ``_``-prefixed storage hooks, each of
which must be atomic on its own (one Lua script, one SQL transaction, or a block
with no ``await`` in it). Hooks receive a ``scope`` (the ``Config`` of the caller:
site, per-user limit, eviction, idle timeout) and ``now`` from the clock, so one
backend can serve several sites and never reads the time itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum
from functools import partial, wraps
from types import TracebackType
from typing import Any, Concatenate, NamedTuple, ParamSpec, Self, TypeVar

from orjson import loads as orjson_loads

from . import codec
from ._deadline import DEADLINE
from .changes import Applied, Changes, EncodedChanges, apply_to_data, encode_changes, reserved_key
from .config import Config
from .crypto import SEALED_KEY, KeyNotConfigured, KeyRing, SealBroken, is_sealed
from .errors import (
    InvalidSession,
    NotSerializable,
    SessionConflict,
    SessionCorrupt,
    SessionEnded,
    SessionError,
    SessionExpired,
    SessionLimitExceeded,
    SessionNotFound,
    SessionRotated,
    SessionTooLarge,
    StoreClosed,
    short_hash,
)
from .session import (
    MAX_USER_ID_LENGTH,
    SESSION_ID_RE,
    Clock,
    Session,
    _blank_session,
    check_session_id,
    generate_session_id,
    is_handle,
    normalize_user_id,
    session_handle,
    utcnow,
)

logger = logging.getLogger("asyncsession")


class Outcome(Enum):
    """What a write hook found, so the caller can raise the right error."""

    OK = "ok"
    MISSING = "missing"
    EXPIRED = "expired"
    OTHER_SITE = "other_site"
    CONFLICT = "conflict"
    USER_CHANGED = "user_changed"
    TOO_LARGE = "too_large"


class Miss(Enum):
    """What a lookup that found nothing under an id's storage key learns (``_missing``)."""

    MOVED = "moved"  # a record stored under the plain id (before hashing) is there now
    ROTATED = "rotated"  # the id was rotated less than ``rotation_grace`` ago
    ENDED = "ended"  # a logout deleted it less than ``logout_grace`` ago (``_end``)
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class InsertResult:
    """What ``_insert`` did besides inserting: the ids it evicted for the per-user limit."""

    evicted: Sequence[str] = ()
    undone: Outcome | None = None
    """Set when the write was undone after it evicted (a login across Redis Cluster
    slots that lost a race): the outcome to report, the evictions to announce."""


NO_EVICTIONS = InsertResult()


class PurgedSession(NamedTuple):
    """A session ``_purge_report`` removed: enough for an ``expired`` event."""

    site_id: str
    user_id: str | None
    session_id: str


class ScanEntry(NamedTuple):
    """One stored session as an admin scan sees it (live or expired-not-purged)."""

    site_id: str
    user_id: str | None
    session_id: str
    size: int  # bytes stored: the JSON of ``data`` (Redis: the whole record, with its header)
    expires_at: datetime | None


_KEEP: Any = object()
_id_match = SESSION_ID_RE.fullmatch


def _with_id(session: Session, session_id: str) -> Session:
    """A shallow copy of ``session`` under another id (fields set directly: cheaper
    than ``dataclasses.replace`` on the hot path)."""
    if type(session) is not Session:  # a subclass may carry more fields
        return replace(session, id=session_id)
    copy = _blank_session(Session)
    copy.id = session_id
    copy.user_id = session.user_id
    copy.site_id = session.site_id
    copy.organization_id = session.organization_id
    copy.data = session.data
    copy.created_at = session.created_at
    copy.updated_at = session.updated_at
    copy.last_accessed_at = session.last_accessed_at
    copy.expires_at = session.expires_at
    copy.absolute_expires_at = session.absolute_expires_at
    copy.ip_address = session.ip_address
    copy.user_agent = session.user_agent
    copy.version = session.version
    return copy


CAS_ATTEMPTS = 256
"""How often a compare-and-set loop (``Store._apply``'s default, ``reencrypt``) reads
and writes again after losing to another writer before it reports a conflict."""


async def cas_backoff(attempt: int) -> None:
    """Wait before compare-and-set attempt ``attempt`` (0-based): not at all for the
    first two, then a random share of 0.5 ms doubling up to 20 ms, so many writers
    of one session take turns instead of all reading and colliding again."""
    if attempt >= 2:
        await asyncio.sleep(random.random() * min(0.0005 * 2 ** (attempt - 2), 0.02))


def absolute_deadline(session: Session) -> datetime | None:
    return session.absolute_expires_at or session.expires_at


def idle_deadline(
    absolute: datetime | None, now: datetime, idle: timedelta | None
) -> datetime | None:
    """``min(absolute deadline, now + idle_timeout)``; the absolute deadline without idle."""
    if idle is None:
        return absolute
    sliding = now + idle
    return sliding if absolute is None or sliding < absolute else absolute


_P = ParamSpec("_P")
_R = TypeVar("_R")
_StoreT = TypeVar("_StoreT", bound="Store")


def _one_deadline(
    method: Callable[Concatenate[_StoreT, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[_StoreT, _P], Coroutine[Any, Any, _R]]:
    """A one-session call of a store that keeps deadlines (``honours_deadline``):
    every round trip of it (a load, an adoption, a rotation check...) within one
    ``timeout`` from its start, not one ``timeout`` each. A deadline already set
    when the call runs (``SessionMiddleware``'s, for the request) is kept as it is:
    looked at then, not when the coroutine is made (the middleware makes it first).
    Other stores get the call's own coroutine, no extra one."""

    @wraps(method)
    def run(self: _StoreT, /, *args: _P.args, **kwargs: _P.kwargs) -> Coroutine[Any, Any, _R]:
        timeout = self.timeout
        if timeout is None or not self.honours_deadline:
            return method(self, *args, **kwargs)
        return _by_deadline(timeout, partial(method, self, *args, **kwargs))

    return run


async def _by_deadline(seconds: float, call: Callable[[], Coroutine[Any, Any, _R]]) -> _R:
    # (the call's coroutine is made here: one closed before it starts, as the
    # middleware closes work its budget has no time left for, leaves none unawaited)
    if DEADLINE.get() is not None:
        return await call()
    token = DEADLINE.set(asyncio.get_running_loop().time() + seconds)
    try:
        return await call()
    finally:
        DEADLINE.reset(token)


class KeepGone(list[str]):
    """What a backend's ``_delete_by_user`` returns when ``keep`` was not (or no
    longer) one of the user's live sessions on the site: the ids of the live sessions
    it deleted before it found out (none where the check and the deletes are one
    atomic step; on Redis, those of the batches before a login moved ``keep``)."""


class PlainIdsFound(Exception):
    """A record stored under a plain id was found by a store told not to move such
    records (``Store._moves_plain_ids`` off: the admin command line, which cannot know
    whether the application runs with ``Config(hash_ids=False)``)."""


class Store(ABC):
    """Async session store. Use as ``async with store:`` or call ``close()``."""

    backend_name: str = "store"
    timeout: float | None = None
    """Seconds a request's whole session work (load, touch, save) may take in the
    middleware before it answers 503; None: unbounded. ``RedisStore`` sets it from its
    ``timeout`` (which also bounds each round trip)."""
    honours_deadline: bool = False
    """Whether the store answers every call made while ``_deadline.DEADLINE`` is set
    by that time (``RedisStore``): then a one-session call (``create``, ``get``,
    ``update``, ``apply``, ``touch``, ``rotate``, ``rotate_into``, ``delete``) is
    bounded by ``timeout`` as a whole."""
    stores_header: bool = True
    """Whether the write hooks get the whole record (metadata header and data) or only
    the encoded data; the size limit applies to the whole record either way."""
    _moves_plain_ids: bool = True
    """With ``Config.hash_ids``: whether a touch moves a record found under a plain id
    to its handle (the application's store), or raises ``PlainIdsFound`` and moves
    nothing (admin tools: for an application with ``hash_ids=False`` such a move
    would lose the session). ``migrate_ids`` always moves."""

    def __init__(self, config: Config | None = None, *, clock: Clock | None = None) -> None:
        self.config = config if config is not None else Config()
        self.clock: Clock = clock or utcnow
        self._hash_ids = self.config.hash_ids
        self._closed = False
        self._cleanup_task: asyncio.Task[None] | None = None
        self._opened_in: asyncio.AbstractEventLoop | None = None  # __aenter__'s loop
        # Stores (ControlledStores) told what purge removed, when they ask for it.
        self._purge_watchers: weakref.WeakSet[Store] = weakref.WeakSet()

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        if self._closed:
            raise StoreClosed(f"{self.backend_name} store is closed")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio: the memory store runs there)
            loop = None
        opened = self._opened_in
        if opened is not None and opened is not loop and not opened.is_closed():
            # (two TestClients on one app: two lifespans, each in its own loop) its
            # connections and cleanup task belong to the first loop: say so now rather
            # than fail later with a cross-loop RuntimeError
            raise RuntimeError(
                f"this {self.backend_name} store is already open in another event loop; "
                "a store serves one event loop: open one per lifespan (with TestClient, "
                "one per `with TestClient(app)`)"
            )
        self._opened_in = loop
        try:
            await self._open()
        except BaseException:
            self._opened_in = opened  # not open here after all
            await self._stop_cleanup()  # (a call before the open may have started it)
            raise
        self._start_cleanup()  # only once open: a store that fails to open runs nothing
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop background cleanup and release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._stop_cleanup()
        await self._close()

    async def _stop_cleanup(self) -> None:
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{self.backend_name} store is closed")
        if self._cleanup_task is None and self.config.cleanup_interval:
            self._start_cleanup()

    def _start_cleanup(self) -> None:
        if self._cleanup_task is not None or not self.config.cleanup_interval:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # its own context: started by a call made within a request's deadline
        # (asyncsession._deadline), it must not keep that deadline for every purge
        context = contextvars.copy_context()
        context.run(DEADLINE.set, None)
        self._cleanup_task = loop.create_task(
            self._cleanup_loop(), name=f"asyncsession-{self.backend_name}-cleanup", context=context
        )

    async def _cleanup_loop(self) -> None:
        interval = self.config.cleanup_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.purge_expired()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("asyncsession: background cleanup failed; will retry")
            else:
                if removed:
                    logger.debug(
                        "asyncsession: purged expired sessions",
                        extra={"backend": self.backend_name, "count": removed},
                    )

    # --------------------------------------------------------------- public API

    @property
    def scope(self) -> Config:
        """The config whose site, limits and timeouts this store's operations use."""
        return self.config

    def encode(self, session: Session) -> bytes:
        """Encode what a write stores: the whole record (``codec.encode``), or for a
        backend that keeps the metadata in fields of its own (``stores_header`` false)
        just the data (``codec.encode_data``) after the same metadata checks.
        ``ControlledStore`` adds the size limit here. With ``Config.encryption_keys``
        the data is sealed (``_encode_sealed``)."""
        data = session.data
        if type(data) is dict and SEALED_KEY in data:  # read back, it would be "encrypted"
            exc = reserved_key()
            self._encode_violation(exc, session)
            raise exc
        ring = self.config.keyring
        if ring is not None:  # [encryption]
            return self._encode_sealed(session, ring)
        try:
            if self.stores_header:
                return codec.encode(session)
            codec.check_metadata(session)
            return codec.encode_data(session.data)
        except SessionError as exc:
            self._encode_violation(exc, session)
            raise

    def _encode_violation(self, exc: SessionError, session: Session) -> None:
        """Report what encoding refused: data that is not JSON-native, or metadata."""
        kind = "not_serializable" if isinstance(exc, NotSerializable) else "invalid_session"
        self._violation(kind, exc, session)

    # [encryption] sealing and opening the data; see docs/security.md
    def _encode_sealed(self, session: Session, ring: KeyRing) -> bytes:
        """``encode`` with the data sealed: the size limit (``_check_plain_size``)
        measures the plaintext record, the backend gets the sealed one."""
        try:
            data = codec.encode_data(session.data)
            codec.check_metadata(session)
        except SessionError as exc:
            self._encode_violation(exc, session)
            raise
        self._check_plain_size(session, data)
        sealed = ring.seal(data)
        if not self.stores_header:
            return sealed
        try:
            return codec.encode(session, sealed)
        except SessionError as exc:  # pragma: no cover - check_metadata refused it first
            self._violation("invalid_session", exc, session)
            raise

    def _check_plain_size(self, session: Session, data: bytes) -> None:  # noqa: B027
        """Refuse a record whose plaintext (``data`` encoded, plus the header) is over the
        size limit; ``ControlledStore`` does, the raw store has no limit."""

    def _open_data(self, session: Session, session_id: str) -> Session:
        """``session`` with its data opened (encryption on) or checked not to be sealed
        (off); ``SessionCorrupt`` for sealed data that does not open."""
        ring = self.config.keyring
        data = session.data
        try:
            if ring is not None:
                session.data = ring.open(data)
            elif is_sealed(data):
                raise KeyNotConfigured.no_keys()
        except SealBroken as exc:
            raise self._sealed_error(session_id, exc, session) from None
        return session

    def _sealed_error(
        self, session_id: str, cause: SealBroken, session: Session | None
    ) -> SessionCorrupt:
        exc = SessionCorrupt(
            "session not found",
            details={"session": short_hash(session_id), "corrupt": True, "reason": str(cause)},
        )
        if isinstance(cause, KeyNotConfigured):
            exc.details["key_not_configured"] = True
        self._violation("decryption_failed", exc, session, session_id=session_id)
        return exc

    async def reencrypt(self, *, batch: int = 500) -> int:
        """Reseal every live stored session (of every site) whose data is not under the
        first of ``Config.encryption_keys``: under an older key, or plaintext written
        before encryption was on. Returns how many were rewritten.

        Each record is rewritten with the backend's compare-and-set (its version
        bumped; data, deadlines and access times unchanged), so a concurrent write is
        never lost: the one that loses sees a conflict and retries. Expired records
        are left for the purge; records that do not open are reported
        (``decryption_failed``) and left as they are."""
        self._check_open()
        ring = self.config.keyring
        if ring is None:
            raise ValueError("reencrypt() needs Config.encryption_keys")
        scopes: dict[str, Config] = {}
        count = 0
        async for entries in self._scan(batch):
            for entry in entries:
                scope = scopes.get(entry.site_id)
                if scope is None:
                    scope = scopes[entry.site_id] = replace(self.config, site_id=entry.site_id)
                if await self._reseal(entry.session_id, scope, ring):
                    count += 1
        return count

    async def _reseal(self, storage_id: str, scope: Config, ring: KeyRing) -> bool:
        """Rewrite one record under the sealing key if it is not under it; True if done."""
        for attempt in range(CAS_ATTEMPTS):
            await cas_backoff(attempt)
            now = self.clock()
            try:
                session = await self._load(storage_id)
            except codec.CorruptRecord:
                return False  # not a record this library can read; stats/show report it
            if session is None or (session.expires_at is not None and now >= session.expires_at):
                return False
            if ring.token_key_id(session.data) == ring.sealing_key_id:
                return False
            try:
                data = (
                    ring.open_bytes(session.data)
                    if is_sealed(session.data)
                    else codec.encode_data(session.data)
                )
            except SealBroken as exc:
                self._sealed_error(storage_id, exc, None)
                return False
            sealed = ring.seal(data)
            session.version += 1
            record = codec.encode(session, sealed) if self.stores_header else sealed
            outcome = await self._reseal_write(session, record, scope, now)
            if outcome is Outcome.OK:
                return True
            if outcome is not Outcome.CONFLICT:
                return False  # gone meanwhile
        return False  # pragma: no cover - CAS_ATTEMPTS writers in a row

    @_one_deadline
    async def create(self, session: Session) -> Session:
        """Insert a new session (insert-if-absent); returns it with defaults filled in.

        ``site_id`` is set from the config, ``expires_at`` from ``default_ttl`` if unset.
        An existing id is ``InvalidSession``, never an overwrite. The per-user limit
        is enforced atomically with the configured eviction policy.
        """
        self._check_open()
        if not isinstance(session, Session):
            raise self._invalid("create() needs a Session", None, type=type(session).__name__)
        user_id = session.user_id
        # The common case (a well-formed id, an ASCII user id) checked inline; anything
        # else goes through the full checks, which raise with the details.
        if not (
            type(session.id) is str
            and _id_match(session.id) is not None
            and (
                user_id is None
                or (
                    type(user_id) is str
                    and user_id.isascii()  # so valid UTF-8
                    and 0 < len(user_id) <= MAX_USER_ID_LENGTH
                    and "\x00" not in user_id
                )
            )
        ):
            try:
                check_session_id(session.id)
                user_id = normalize_user_id(user_id)
            except InvalidSession as exc:
                self._violation("invalid_session", exc, None)
                raise
            session.user_id = user_id
        scope = self.config
        now = self.clock()
        session.site_id = scope.site_id
        absolute = session.absolute_expires_at or session.expires_at or now + scope.default_ttl
        session.absolute_expires_at = absolute
        idle = scope.idle_timeout
        session.expires_at = absolute if idle is None else idle_deadline(absolute, now, idle)
        stored = self._at_rest(session)
        record = self.encode(stored)
        try:
            result = await self._insert(stored, record, scope, now)
        except SessionLimitExceeded as exc:
            self._violation("session_limit_exceeded", exc, session)
            raise
        except InvalidSession as exc:
            self._violation("invalid_session", exc, session)
            raise
        self._event("created", session)
        for evicted in result.evicted:
            self._event("evicted", None, session_id=evicted, user_id=user_id)
        return session

    @_one_deadline
    async def get(self, session_id: str) -> Session:
        """A fresh copy of the session. ``SessionNotFound`` / ``SessionExpired``."""
        self._check_open()
        if type(session_id) is not str or _id_match(session_id) is None:
            self._check_id(session_id)
        key = session_handle(session_id) if self._hash_ids else session_id
        try:
            session = await self._load(key)
            if session is None:
                plain = self._hash_ids  # look for a record stored under the plain id
                if plain and not self._moves_plain_ids:
                    await self._move_plain(session_id, key)  # (PlainIdsFound if one is)
                    plain = False
                miss = await self._missing(session_id, key, self.config, self.clock(), plain)
                if miss is Miss.MOVED:
                    session = await self._load(key)
                elif miss is Miss.ROTATED:
                    raise self._rotated_error(session_id)
                elif miss is Miss.ENDED:
                    raise self._ended_error(session_id)
        except codec.CorruptRecord as exc:
            raise self._corrupt(session_id, exc) from exc
        now = self.clock()
        if session is not None:
            session.id = session_id
            if session.site_id == self.config.site_id and (
                session.expires_at is None or now < session.expires_at
            ):
                return self._open_data(session, session_id)  # [encryption]
        return self._open_data(
            self._visible(session, session_id, self.config.site_id, now), session_id
        )

    def _ended_error(self, session_id: str) -> SessionEnded:
        return SessionEnded(
            "session ended by a logout moments ago", details={"session": short_hash(session_id)}
        )

    def _rotated_error(self, session_id: str) -> SessionRotated:
        exc = SessionRotated(
            "session id was rotated; the client holds an older cookie",
            details={"session": short_hash(session_id)},
        )
        self._violation("rotated", exc, None, session_id=session_id)
        return exc

    def _visible(
        self, session: Session | None, session_id: str, site_id: str, now: datetime
    ) -> Session:
        if session is None:
            raise SessionNotFound("session not found", details={"session": short_hash(session_id)})
        if session.site_id != site_id:
            exc = SessionNotFound("session not found", details={"session": short_hash(session_id)})
            self._violation("site_mismatch", exc, session, other_site=session.site_id)
            raise exc
        if session.expires_at is not None and now >= session.expires_at:
            raise SessionExpired(
                "session expired",
                details={"session": short_hash(session_id), "expired_at": session.expires_at},
            )
        return session

    @_one_deadline
    async def update(self, session: Session) -> Session:
        """Compare-and-set write of ``session`` at ``session.version``.

        Stale version: ``SessionConflict``. Missing, deleted or expired:
        ``SessionNotFound`` (never resurrected). On success ``version`` is bumped and
        ``updated_at`` (and with ``idle_timeout``, ``expires_at``) set.
        """
        self._check_open()
        if not isinstance(session, Session):
            raise self._invalid("update() needs a Session", None, type=type(session).__name__)
        self._check_id(session.id)
        if session.user_id is not None and type(session.user_id) is not str:
            # (a str user id that is not the stored one is refused by the backend)
            raise self._invalid(
                "session.user_id must be a str or None",
                session,
                type=type(session.user_id).__name__,
            )
        scope = self.scope
        now = self.clock()
        absolute = absolute_deadline(session)
        expires_at = idle_deadline(absolute, now, scope.idle_timeout)
        # site_id as in create: a caller cannot move a session to another site
        if type(session) is Session:
            # dataclasses.replace, spelled out, and the slots set directly: Session(...)
            # goes through type.__call__, which in CPython 3.11 packs the keyword
            # arguments into a dict for __init__ (all that __init__ does is set them)
            new = _blank_session(Session)
            new.id = self._key(session.id)
            new.user_id = session.user_id
            new.site_id = scope.site_id
            new.organization_id = session.organization_id
            new.data = session.data
            new.created_at = session.created_at
            new.updated_at = now
            new.last_accessed_at = now
            new.expires_at = expires_at
            new.absolute_expires_at = absolute
            new.ip_address = session.ip_address
            new.user_agent = session.user_agent
            new.version = session.version + 1
        else:  # a subclass may carry more fields
            new = replace(
                session,
                id=self._key(session.id),
                site_id=scope.site_id,
                version=session.version + 1,
                updated_at=now,
                last_accessed_at=now,
                expires_at=expires_at,
                absolute_expires_at=absolute,
            )
        record = self.encode(new)
        outcome = await self._replace(new, record, scope, now)
        if outcome is Outcome.MISSING and await self._adopted(session.id):
            outcome = await self._replace(new, record, scope, now)
        if outcome is not Outcome.OK:
            if outcome is Outcome.MISSING and await self._was_rotated(session.id, scope, now):
                raise self._rotated_error(session.id)
            raise self._write_error(outcome, session.id, session, expected=session.version)
        session.site_id = new.site_id
        session.version = new.version
        session.updated_at = now
        session.last_accessed_at = now
        session.expires_at = new.expires_at
        session.absolute_expires_at = absolute
        self._event("updated", session)
        return session

    @_one_deadline
    async def apply(
        self, session_id: str, changes: Changes, *, base: Session | None = None
    ) -> Applied:
        """Apply key-level ``changes`` to the stored session in one atomic step.

        The keys in ``changes.expect`` must hold what the caller read (compared by
        their JSON), else nothing is written and ``SessionConflict`` is raised; keys
        not named are left as they are, so writers of different keys never conflict.
        Like ``update``: the version is bumped (a concurrent ``update`` at the old
        version then conflicts), ``updated_at`` and last access set, with
        ``idle_timeout`` the expiry slides, the size limit holds on the whole record;
        a missing, expired or other-site session is ``SessionNotFound``.

        ``base``, optional, is the session as this caller got it from ``get`` (its
        data unchanged but for the keys in ``changes``), with ``expect`` read from it:
        while the stored version is still ``base.version`` nothing else was written,
        so a backend that stores whole records (Redis) writes the new one without
        parsing the old one.
        """
        self._check_open()
        self._check_id(session_id)
        try:
            encoded = encode_changes(changes)
        except NotSerializable as exc:
            self._violation("not_serializable", exc, None, session_id=session_id)
            raise
        except InvalidSession as exc:
            self._violation("invalid_session", exc, None, session_id=session_id)
            raise
        limit = self._size_limit()
        scope = self.scope
        now = self.clock()
        key = self._key(session_id)
        if base is not None and base.id != key:
            base = _with_id(base, key)
        try:
            # [encryption] no backend can merge into sealed data: the default
            # compare-and-set hook, which opens and reseals
            hook = self._apply if scope.keyring is None else partial(Store._apply, self)
            result = await hook(key, encoded, scope, now, limit, base)
            if result is Outcome.MISSING and await self._adopted(session_id):
                result = await hook(key, encoded, scope, now, limit, None)
        except SealBroken as exc:
            raise self._sealed_error(session_id, exc, None) from None
        except codec.CorruptRecord as exc:
            raise self._corrupt(session_id, exc) from exc
        if isinstance(result, Applied):
            self._event("updated", None, session_id=session_id)
            return result
        if result is Outcome.MISSING and await self._was_rotated(session_id, scope, now):
            raise self._rotated_error(session_id)
        if result is Outcome.TOO_LARGE:
            too_large = SessionTooLarge(
                f"session would be over the limit of {limit} bytes encoded",
                details={"limit": limit, "session": short_hash(session_id)},
            )
            self._violation("size_exceeded", too_large, None, session_id=session_id)
            raise too_large
        raise self._write_error(result, session_id, None)

    def _size_limit(self) -> int:
        """The record size ``apply`` enforces (0: none; ``ControlledStore`` sets it)."""
        return 0

    @_one_deadline
    async def touch(self, session_id: str) -> None:
        """Record an access; with ``idle_timeout`` slide the expiry (never past the
        absolute deadline). Never rewrites data, never bumps the version."""
        self._check_open()
        self._check_id(session_id)
        scope = self.scope
        now = self.clock()
        key = self._key(session_id)
        outcome = await self._touch(key, scope, now)
        if outcome is Outcome.MISSING and await self._adopted(session_id):
            outcome = await self._touch(key, scope, now)
        if outcome is not Outcome.OK:
            if outcome is Outcome.MISSING and await self._was_rotated(session_id, scope, now):
                raise self._rotated_error(session_id)
            raise self._write_error(outcome, session_id, None)

    @_one_deadline
    async def rotate(self, session_id: str, *, user_id: str | int | Any = _KEEP) -> str:
        """Move the session to a new id atomically (session-fixation defence).

        The old id is remembered as rotated for ``Config.rotation_grace``: ``get``,
        ``update`` and ``touch`` of it raise ``SessionRotated`` (a ``SessionNotFound``)
        and the record never names the new id. With ``user_id`` the session is bound to
        that user in the same atomic step (data and deadlines kept; the per-user limit
        and index as in ``create``); a concurrent update makes it retry.
        """
        self._check_open()
        self._check_id(session_id)
        if user_id is not _KEEP:
            for _ in range(8):
                old = await self.get(session_id)
                new = replace(old, user_id=normalize_user_id(user_id), version=0)
                new.id = generate_session_id(new.user_id)
                new.absolute_expires_at = absolute_deadline(old)
                try:
                    moved = await self.rotate_into(session_id, new, version=old.version)
                except SessionConflict:
                    continue
                return moved.id
            raise SessionConflict(
                "session kept changing during rotate; retry",
                details={"session": short_hash(session_id)},
            )
        new_id = self._rotated_id(session_id)
        key, new_key = self._key(session_id), self._key(new_id)
        outcome = await self._rotate(key, new_key, self.scope, self.clock())
        if outcome is Outcome.MISSING and await self._adopted(session_id):
            outcome = await self._rotate(key, new_key, self.scope, self.clock())
        if outcome is not Outcome.OK:
            raise self._write_error(outcome, session_id, None)
        self._event("rotated", None, session_id=new_id, previous=short_hash(session_id))
        return new_id

    @_one_deadline
    async def rotate_into(
        self, session_id: str, session: Session, *, version: int | None = None
    ) -> Session:
        """Atomically replace the live session ``session_id`` by the new ``session``
        (``create``'s checks, defaults and per-user limit; its own id, user and data),
        leaving a rotation record for the old id as ``rotate`` does. With ``version``
        the old session must still be at that version (else ``SessionConflict``).
        This is ``login``: one step, never two live sessions or none. (On Redis
        Cluster, when the old and new ids live in different hash slots, the new session
        is created first and the old one retired right after.)"""
        self._check_open()
        self._check_id(session_id)
        if not isinstance(session, Session):
            raise self._invalid("rotate_into() needs a Session", None, type=type(session).__name__)
        check_session_id(session.id)
        session.user_id = normalize_user_id(session.user_id)
        scope = self.config
        now = self.clock()
        session.site_id = scope.site_id
        absolute = session.absolute_expires_at or session.expires_at or now + scope.default_ttl
        session.absolute_expires_at = absolute
        session.expires_at = idle_deadline(absolute, now, scope.idle_timeout)
        stored = self._at_rest(session)
        record = self.encode(stored)
        key = self._key(session_id)
        try:
            result = await self._rotate_into(key, version, stored, record, scope, now)
            if result is Outcome.MISSING and await self._adopted(session_id):
                result = await self._rotate_into(key, version, stored, record, scope, now)
        except SessionLimitExceeded as exc:
            self._violation("session_limit_exceeded", exc, session)
            raise
        except InvalidSession as exc:
            self._violation("invalid_session", exc, session)
            raise
        if isinstance(result, InsertResult) and result.undone is not None:
            for evicted in result.evicted:  # done before the login was undone: still gone
                self._event("evicted", None, session_id=evicted, user_id=session.user_id)
            result = result.undone
        if isinstance(result, Outcome):
            if result is Outcome.MISSING and await self._was_rotated(session_id, scope, now):
                raise self._rotated_error(session_id)
            raise self._write_error(result, session_id, None, expected=version or 0)
        self._event("rotated", session, previous=short_hash(session_id))
        for evicted in result.evicted:
            self._event("evicted", None, session_id=evicted, user_id=session.user_id)
        return session

    @_one_deadline
    async def delete(self, session_id: str, *, leave_record: bool = False) -> bool:
        """Delete a session; deleting a missing one is not an error. True if this call
        deleted it. Takes an id, or the handle ``list_by_user`` shows for one.

        ``leave_record`` (a logout: ``logout()`` and ``request.session.clear()`` set
        it): in the same atomic step, leave a record that the id was logged out, kept
        ``Config.logout_grace`` (10 s), like a rotation's (a hash of the id, nothing else).
        A ``get`` of the id meanwhile raises ``SessionEnded`` instead of
        ``SessionNotFound``: a request the browser sent before the logout is known
        as such, and the middleware leaves the client's cookie alone (it may name a
        new login by then). A backend without such records deletes only."""
        self._check_open()
        key = self._key_or_handle(session_id)
        scope, now = self.scope, self.clock()

        def work() -> Coroutine[Any, Any, Outcome]:
            return self._end(key, scope, now) if leave_record else self._delete(key, scope)

        outcome = await work()
        if outcome is Outcome.MISSING and key is not session_id and await self._adopted(session_id):
            outcome = await work()  # it was stored before hashing
        if outcome is Outcome.OTHER_SITE:
            self._violation(
                "site_mismatch",
                SessionNotFound("session not found", details={"session": short_hash(session_id)}),
                None,
                session_id=session_id,
            )
        elif outcome is Outcome.OK:
            self._event("deleted", None, session_id=session_id)
        return outcome is Outcome.OK

    async def delete_by_user(
        self, user_id: str | Any, *, keep: str | None = None, only: str | None = None
    ) -> int:
        """Delete the user's sessions on this site, except ``keep``; returns how many.

        ``keep`` must be one of the user's live sessions on this site, checked in the same
        atomic step as the deletes: else nothing is deleted and ``SessionNotFound``
        (``SessionRotated`` if a login or ``rotate`` moved it: "log out my other
        devices" sent with an id a parallel login replaced must not delete the
        login's new session). On Redis a user with more than ``USER_BATCH`` sessions
        is deleted in batches, each checking ``keep``: a login between two of them
        stops the rest, and the error's ``details["deleted"]`` says how many went.

        ``only`` (an id, or the handle ``list_by_user`` shows) deletes that one session
        if it is the user's on this site (returns 1, else 0), in the same atomic step
        as the check of ``keep``: "revoke that device" from a session that was itself
        revoked meanwhile deletes nothing."""
        self._check_open()
        user = self._check_user(user_id)
        target = None if only is None else await self._stored_as(only)
        if keep is not None:
            kept = await self._stored_as(keep)
            if kept is keep and self._hash_ids:  # a listed handle: move the user's old records
                await self._adopt_listed(await self._list_by_user(user, self.scope, self.clock()))
            keep = kept
        if target is not None and target == keep:
            same = InvalidSession(
                "only and keep name the same session: nothing to delete",
                details={"session": short_hash(keep)},
            )
            self._violation("invalid_session", same, None)
            raise same
        deleted = await self._delete_by_user(user, keep, self.scope, self.clock(), target)
        for session_id in deleted:
            self._event("deleted", None, session_id=session_id, user_id=user)
        if isinstance(deleted, KeepGone):
            assert keep is not None  # (here its storage id)
            scope = self.scope
            if scope.rotation_grace and await self._is_rotated(keep, scope, self.clock()):
                exc: SessionNotFound = self._rotated_error(keep)
            else:
                exc = SessionNotFound(
                    "the session to keep is not one of the user's live sessions on this "
                    "site; nothing deleted",
                    details={"session": short_hash(keep)},
                )
            if deleted:  # (Redis: batches done before a login moved keep)
                exc.message = f"{exc.message}; {len(deleted)} deleted before that, the rest kept"
                exc.args = (exc.message,)
            exc.details["deleted"] = len(deleted)
            raise exc
        return len(deleted)

    async def list_by_user(self, user_id: str | Any) -> list[Session]:
        """The user's live sessions on this site, oldest first.

        With ``Config.hash_ids`` (the default) a listed session's ``id`` is its handle
        (``session_handle``): the store holds no id to give back. ``short_id`` is the
        same as for the id, and ``delete`` and ``delete_by_user(keep=...)`` take it."""
        opened = []
        for session in await self._listed(user_id):
            try:  # [encryption] open; one that does not is left out
                opened.append(self._open_data(session, session.id))
            except SessionCorrupt:
                continue
        return opened

    async def _listed(self, user_id: str | Any) -> list[Session]:
        """``list_by_user``'s sessions with their data as stored (sealed, with
        encryption at rest): metadata for admin tools that run without the keys."""
        self._check_open()
        user = self._check_user(user_id)
        sessions = await self._list_by_user(user, self.scope, self.clock())
        if self._hash_ids:
            await self._adopt_listed(sessions)
        return sessions

    async def purge_expired(self) -> int:
        """Remove expired sessions and stale index entries now; returns how many sessions.

        When a watching store wants ``expired`` events (a ``ControlledStore`` with an
        ``on_event`` handler), the backend reports what it removed; otherwise purge
        stays a plain count.
        """
        self._check_open()
        now = self.clock()
        watchers = [w for w in self._purge_watchers if w._wants_expired()]
        if not watchers:
            return await self._purge(now)
        try:
            removed = await self._purge_report(now)
        except NotImplementedError:
            return await self._purge(now)
        for watcher in watchers:
            try:
                watcher._expired(removed)
            except Exception:
                logger.exception("asyncsession: reporting expired sessions failed")
        return len(removed)

    def handle(self, session_id: str) -> str:
        """The form this store keeps ``session_id`` in: ``session_handle(session_id)``
        with ``Config.hash_ids`` (the default), else the id itself."""
        check_session_id(session_id)
        return self._key(session_id)

    async def migrate_ids(self, batch: int = 500) -> int:
        """Move every record stored under a plain id (before ``Config.hash_ids``) to
        its handle, as a first touch would; returns how many moved. Each move is
        atomic, and a session in use keeps working throughout. (``asyncsession
        migrate``.)"""
        self._check_open()
        if not self._hash_ids:
            return 0
        moved = 0
        async for entries in self._scan(batch):
            for entry in entries:
                if not is_handle(entry.session_id) and _id_match(entry.session_id):
                    moved += await self._adopt(entry.session_id, session_handle(entry.session_id))
        await self._migrated(moved)
        return moved

    # ------------------------------------------------------------------ helpers

    def _key(self, session_id: str) -> str:
        """The storage id hooks get for ``session_id``: its handle or the id."""
        return session_handle(session_id) if self._hash_ids else session_id

    def _key_or_handle(self, value: object) -> str:
        """``_key`` of an id; a handle (as ``list_by_user`` shows) as it is."""
        if self._hash_ids and is_handle(value):
            return value  # type: ignore[return-value]
        self._check_id(value)
        return self._key(value)  # type: ignore[arg-type]

    def _at_rest(self, session: Session) -> Session:
        """``session`` as the hooks store it: under its storage id (a copy, so the
        caller's object keeps the id its cookie carries)."""
        return _with_id(session, session_handle(session.id)) if self._hash_ids else session

    async def _adopt_listed(self, sessions: list[Session]) -> None:
        """Move the listed sessions stored before hashing (under their plain ids) to
        their handles and show those, so a listed id works with ``delete`` and
        ``delete_by_user(keep=...)``."""
        for session in sessions:
            if not is_handle(session.id) and _id_match(session.id):  # (as migrate_ids:
                handle = session_handle(session.id)  # a row written from outside stays)
                await self._move_plain(session.id, handle)
                session.id = handle

    async def _stored_as(self, session_id: str) -> str:
        """The storage id of an id or listed handle the caller names (``_key_or_handle``),
        after moving a record of an id stored before hashing to its handle."""
        key = self._key_or_handle(session_id)
        if key is not session_id and not await self._stored(key):
            await self._adopted(session_id)  # stored under the plain id: move it
        return key

    async def _stored(self, storage_id: str) -> bool:
        """Whether a record is stored under ``storage_id``, a damaged one included."""
        try:
            return await self._load(storage_id) is not None
        except codec.CorruptRecord:
            return True

    async def _adopted(self, session_id: str) -> bool:
        """After a write found nothing under the handle: whether a record stored under
        the plain id (before hashing) was there and has now moved to the handle."""
        return self._hash_ids and await self._move_plain(session_id, session_handle(session_id))

    async def _move_plain(self, session_id: str, handle: str) -> bool:
        """``_adopt``, or, with ``_moves_plain_ids`` off, ``PlainIdsFound`` if a record
        is stored under ``session_id`` (read only: nothing moves)."""
        if self._moves_plain_ids:
            return await self._adopt(session_id, handle)
        if await self._stored(session_id):
            raise PlainIdsFound
        return False

    def _rotated_id(self, session_id: str) -> str:
        """The fresh id ``rotate`` moves ``session_id`` to. A backend that places
        sessions by a prefix of the id (Redis Cluster) keeps that prefix."""
        return generate_session_id()

    def _check_id(self, session_id: object) -> None:
        try:
            check_session_id(session_id)
        except InvalidSession as exc:
            self._violation("invalid_session", exc, None)
            raise

    def _check_user(self, user_id: object) -> str:
        try:
            user = normalize_user_id(user_id)
        except InvalidSession as exc:
            self._violation("invalid_session", exc, None)
            raise
        if user is None:
            raise self._invalid("user id is required (anonymous sessions are not indexed)", None)
        return user

    def _invalid(self, message: str, session: Session | None, **details: Any) -> InvalidSession:
        exc = InvalidSession(message, details=details)
        self._violation("invalid_session", exc, session)
        return exc

    def _corrupt(self, session_id: str, cause: Exception) -> SessionNotFound:
        exc = SessionNotFound(
            "session not found", details={"session": short_hash(session_id), "corrupt": True}
        )
        self._violation(
            "invalid_session",
            InvalidSession(
                f"stored record is not a valid session: {cause}",
                details={"session": short_hash(session_id), "corrupt": True},
            ),
            None,
            session_id=session_id,
        )
        return exc

    def _write_error(
        self, outcome: Outcome, session_id: str, session: Session | None, expected: int = 0
    ) -> SessionError:
        details: dict[str, Any] = {"session": short_hash(session_id)}
        if outcome is Outcome.CONFLICT:
            if session is not None:
                details["expected_version"] = expected
            exc: SessionError = SessionConflict(
                "session was changed concurrently; reload and retry", details=details
            )
            self._violation("conflict", exc, session)
            return exc
        if outcome is Outcome.EXPIRED:
            return SessionExpired("session expired", details=details)
        if outcome is Outcome.USER_CHANGED:
            return self._invalid(
                "user_id of a stored session cannot change; create a new session", session
            )
        exc = SessionNotFound("session not found", details=details)
        if outcome is Outcome.OTHER_SITE:
            self._violation("site_mismatch", exc, session, session_id=session_id)
        return exc

    def _violation(  # noqa: B027 - optional hook
        self, kind: str, error: SessionError, session: Session | None, **extra: Any
    ) -> None:
        """Hook for policy violations; the raw store ignores them, ControlledStore reports."""

    def _event(self, kind: str, session: Session | None, **extra: Any) -> None:  # noqa: B027
        """Hook for lifecycle events; the raw store ignores them."""

    def _wants_expired(self) -> bool:
        """Whether this watcher of a backend's purge wants ``_expired`` calls."""
        return False

    def _expired(self, removed: Sequence[PurgedSession]) -> None:  # noqa: B027
        """Told by the backend what one purge removed (all sites)."""

    # ------------------------------------------------------------ backend hooks

    async def _open(self) -> None:  # noqa: B027 - optional hook
        """Open connections eagerly (``async with``); backends may also open lazily."""

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    async def _insert(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> InsertResult:
        """Atomically: refuse an existing id (``InvalidSession``); for a user, drop the
        user's expired index entries, then enforce ``scope.max_sessions_per_user`` with
        ``scope.eviction`` (``SessionLimitExceeded`` for reject); insert; index.
        ``record`` is what ``encode`` made: the whole record, or just the encoded data
        for a backend whose ``stores_header`` is false."""

    @abstractmethod
    async def _load(self, session_id: str) -> Session | None:
        """The stored session or None; ``codec.CorruptRecord`` for undecodable bytes."""

    @abstractmethod
    async def _replace(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        """Atomically write ``record`` (which encodes ``session``, already at its new
        version) iff the stored session exists, is live at ``now``, belongs to
        ``scope.site_id`` and ``session.user_id``, and is at ``session.version - 1``."""

    async def _reseal_write(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        """``reencrypt``'s write: ``record`` (the same data sealed under another key) as
        the data of ``session``, at its new version, iff the stored session is live at
        ``now`` on ``scope.site_id`` and still at ``session.version - 1``; every other
        field stays as stored, so a touch since the load (which moves the last access
        and an idle expiry but not the version) keeps its slide. Default: ``_replace``,
        right for a backend with no await between ``_reseal``'s load and this write."""
        return await self._replace(session, record, scope, now)

    @abstractmethod
    async def _touch(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        """Atomically set last access to ``now`` and, with ``scope.idle_timeout``, the
        expiry to ``min(absolute deadline, now + idle)``; data and version untouched."""

    @abstractmethod
    async def _rotate(self, session_id: str, new_id: str, scope: Config, now: datetime) -> Outcome:
        """Atomically move a live session of ``scope.site_id`` to ``new_id``."""

    @abstractmethod
    async def _delete(self, session_id: str, scope: Config) -> Outcome:
        """Delete if it belongs to ``scope.site_id``: OK, MISSING or OTHER_SITE."""

    @abstractmethod
    async def _delete_by_user(
        self,
        user_id: str,
        keep: str | None,
        scope: Config,
        now: datetime,
        only: str | None = None,
    ) -> list[str]:
        """Atomically delete the user's sessions on the site except ``keep``; returns the
        ids of the live ones deleted (expired ones go too, uncounted). A ``KeepGone``,
        and nothing (more) deleted, when ``keep`` is not (or no longer) one of the
        user's live sessions on the site: a login rotated it, and its new session must
        stay. (A backend that works in several atomic steps checks ``keep`` in each,
        and stops with a ``KeepGone`` of what the steps before deleted.) With ``only``
        (a storage id, never ``keep``): that session alone, if it is the user's on the
        site, in the same step as the check of ``keep``."""

    @abstractmethod
    async def _list_by_user(self, user_id: str, scope: Config, now: datetime) -> list[Session]:
        """The user's live sessions on the site, oldest (``created_at``) first."""

    @abstractmethod
    async def _purge(self, now: datetime) -> int:
        """Remove every session expired at ``now`` (all sites) and stale index entries."""

    # Optional hooks: a backend without them still works; what needs them degrades
    # (no ``expired`` events, ``apply`` by compare-and-set) or says it is unsupported
    # (admin scans).

    async def _apply(
        self,
        session_id: str,
        changes: EncodedChanges,
        scope: Config,
        now: datetime,
        limit: int,
        base: Session | None = None,
    ) -> Applied | Outcome:
        """Atomically: if the session is live on ``scope.site_id`` and every expected
        key holds its expected JSON, set and delete the keys, bump the version, set
        ``updated_at`` and last access to ``now`` (with ``scope.idle_timeout``, slide
        the expiry) unless the whole record would exceed ``limit`` bytes (0: no limit,
        ``Outcome.TOO_LARGE``). Expectation failed: ``Outcome.CONFLICT``.

        This default, for backends without an atomic hook, reads and writes back with
        the backend's compare-and-set, retrying while other keys change underneath.
        ``apply`` uses it with encryption on, for every backend: it opens the data,
        applies the changes to the plaintext, measures it and seals it again."""
        ring = scope.keyring
        for attempt in range(CAS_ATTEMPTS):
            await cas_backoff(attempt)
            session = await self._load(session_id)
            if session is None:
                return Outcome.MISSING
            if session.site_id != scope.site_id:
                return Outcome.OTHER_SITE
            if session.expires_at is not None and now >= session.expires_at:
                return Outcome.EXPIRED
            if ring is not None and is_sealed(session.data):  # [encryption]
                plain = ring.open_bytes(session.data)
            else:
                plain = codec.encode_data(session.data)
            data = apply_to_data(plain, changes)
            if data is None:
                return Outcome.CONFLICT
            absolute = absolute_deadline(session)
            session.data = orjson_loads(data)
            session.version += 1
            session.updated_at = session.last_accessed_at = now
            session.absolute_expires_at = absolute
            session.expires_at = idle_deadline(absolute, now, scope.idle_timeout)
            if limit and len(codec.encode(session, data)) > limit:
                return Outcome.TOO_LARGE
            if ring is not None:  # [encryption]
                data = ring.seal(data)
            record = codec.encode(session, data) if self.stores_header else data
            outcome = await self._replace(session, record, scope, now)
            if outcome is Outcome.OK:
                return Applied(session.version, now, session.expires_at)
            if outcome is not Outcome.CONFLICT:
                return outcome
        return Outcome.CONFLICT  # pragma: no cover - CAS_ATTEMPTS writers in a row

    async def _missing(
        self, session_id: str, key: str, scope: Config, now: datetime, plain: bool
    ) -> Miss:
        """``get`` found nothing under ``key``, the storage id of ``session_id``: did a
        record stored under the plain id (before hashing; looked for when ``plain``)
        move there now, or was the id rotated recently? A backend may answer both in
        one round trip (Redis)."""
        if plain and await self._adopt(session_id, key):
            return Miss.MOVED
        if scope.rotation_grace or scope.logout_grace:
            return await self._recorded(key, scope, now)
        return Miss.UNKNOWN

    async def _was_rotated(self, session_id: str, scope: Config, now: datetime) -> bool:
        """Whether the id ``session_id`` (not a storage id) was rotated recently."""
        return bool(scope.rotation_grace) and await self._is_rotated(
            self._key(session_id), scope, now
        )

    async def _adopt(self, session_id: str, handle: str) -> bool:
        """If a record is stored under the plain ``session_id`` (written before
        ``Config.hash_ids``), move it atomically to ``handle``: the record, its own id
        field, its user-index and expiry entries. True if one moved. Called when a
        lookup by handle finds nothing, so it must be cheap when there is none (a read,
        no write). Default: nothing to adopt."""
        return False

    async def _migrated(self, moved: int) -> None:  # noqa: B027 - optional hook
        """``migrate_ids`` is done (``moved`` records moved): a backend may now clear
        what the layout before hashing left in its files (SQLite: freed pages, the
        WAL). Default: nothing."""

    async def _recorded(self, session_id: str, scope: Config, now: datetime) -> Miss:
        """What a live record of ``scope.site_id`` says of a ``session_id`` that is not
        found (asked only then), in one lookup: ``ROTATED`` (rotated less than
        ``scope.rotation_grace`` before ``now``), ``ENDED`` (logged out less than
        ``scope.logout_grace`` before: ``_end``) or ``UNKNOWN``. Default: no records."""
        return Miss.UNKNOWN

    async def _is_rotated(self, session_id: str, scope: Config, now: datetime) -> bool:
        return await self._recorded(session_id, scope, now) is Miss.ROTATED

    async def _end(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        """``_delete``, and if it deleted, in the same atomic step a record that the id
        was logged out, until ``now + scope.logout_grace`` (``_recorded`` answers
        ``ENDED`` then). Default: ``_delete`` only, no record."""
        return await self._delete(session_id, scope)

    async def _rotate_into(
        self,
        session_id: str,
        version: int | None,
        session: Session,
        record: bytes,
        scope: Config,
        now: datetime,
    ) -> InsertResult | Outcome:
        """Atomically: the old session must be live on the site (and at ``version``),
        else its ``Outcome``; insert ``session`` as ``_insert`` does (the old one not
        counted for the limit); delete the old one; record the rotation."""
        raise NotImplementedError(f"the {self.backend_name} backend cannot rotate_into")

    async def _purge_report(self, now: datetime) -> list[PurgedSession]:
        """``_purge`` that also says what it removed. Used only when someone listens
        for ``expired`` events, so the plain ``_purge`` stays as cheap as it can be."""
        raise NotImplementedError

    def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """Every stored session of every site, about ``batch`` at a time, for admin
        tools (``asyncsession stats``). Not a snapshot: sessions written during the scan
        may or may not appear. Each batch must hold the backend only briefly."""
        raise NotImplementedError(f"the {self.backend_name} backend cannot scan its sessions")

    async def _scan_estimate(self) -> int | None:
        """About how many sessions ``_scan`` will yield (for a progress bar); None if
        unknown."""
        return None
