"""MemoryStore: one process, no I/O; for development, tests and single-server apps.

Each session is kept as its metadata plus its data as encoded JSON bytes, so every
``get`` returns an independent copy and data round-trips exactly as in the other
backends. Expiry buckets (one per second, ordered by a small heap of bucket keys)
make purging cost O(expired), never a scan of all sessions. Every hook runs without
an ``await`` in its critical section, so each is atomic under any concurrency.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import orjson

from .. import codec
from ..changes import Applied, EncodedChanges, apply_to_data
from ..codec import CorruptRecord
from ..config import Config
from ..controls import ControlledStore, with_controls
from ..errors import InvalidSession, SessionLimitExceeded, short_hash
from ..session import Clock, Session
from ..store import (
    NO_EVICTIONS,
    InsertResult,
    KeepGone,
    Miss,
    Outcome,
    PurgedSession,
    ScanEntry,
    Store,
    absolute_deadline,
    idle_deadline,
)

logger = logging.getLogger("asyncsession")

PURGE_BATCH = 2_000
"""Sessions removed between two yields to the event loop during a purge."""


class _Entry(Session):
    """A stored session: its metadata (``data`` stays empty) plus ``blob``, the encoded
    data, and ``bucket``, the expiry bucket it is filed under. One object per session,
    so an operation follows one pointer from the id to everything it needs."""

    __slots__ = ("blob", "bucket")
    blob: bytes
    bucket: int


def _bucket_of(expires_at: datetime | None) -> int:
    # ceil, so every session in a bucket whose key is <= now has expired
    return math.ceil(expires_at.timestamp()) if expires_at is not None else 2**62


_EMPTY: dict[str, Any] = {}


# Entries and the sessions ``get`` returns are built by setting their slots, which is
# all the dataclass ``__init__`` does: calling ``Session(...)`` goes through
# ``type.__call__``, which in CPython 3.11 packs the keyword arguments into a dict for
# ``__init__`` and costs several times more, on every create, update and get.
_new_entry = _Entry.__new__
_new_session = Session.__new__


def _entry(session: Session, blob: bytes) -> _Entry:
    e = _new_entry(_Entry)
    e.id = session.id
    e.user_id = session.user_id
    e.site_id = session.site_id
    e.organization_id = session.organization_id
    e.data = _EMPTY
    e.created_at = session.created_at
    e.updated_at = session.updated_at
    e.last_accessed_at = session.last_accessed_at
    e.expires_at = expires_at = session.expires_at
    e.absolute_expires_at = session.absolute_expires_at
    e.ip_address = session.ip_address
    e.user_agent = session.user_agent
    e.version = session.version
    e.blob = blob
    e.bucket = _bucket_of(expires_at)
    return e


def _exact(record: bytes) -> bytes:
    """An exact-size copy of ``record`` to keep. A bytes object straight from
    ``orjson.dumps`` sits in the buffer orjson grew while encoding (about 8 KiB for a
    1 KB session here, measured with tracemalloc): kept as is, the store would hold
    several times the data."""
    return bytes(memoryview(record))


def _created_at(entry: _Entry) -> datetime:
    return entry.created_at


def _last_accessed_at(entry: _Entry) -> datetime:
    return entry.last_accessed_at


class MemoryStore(Store):
    """Sessions kept in this process's memory, with no I/O: for development, tests
    and single-process apps (``open_store("memory://")``).

    Nothing is shared with other processes or workers, and everything is lost when
    the process exits. Data is held as encoded JSON, so every ``get`` returns an
    independent copy and values round-trip exactly as in the SQLite and Redis
    stores, under the same ``Store`` contract. ``clock`` injects the time (tests).

    Applications use it as a controlled store, ``MemoryStore.with_controls(config)``
    or ``open_store("memory://", config)``, which adds the size limit, violation
    events and logs (see ``with_controls``).
    """

    backend_name = "memory"
    stores_header = False  # metadata lives in the entry; ``record`` is the data

    def __init__(self, config: Config | None = None, *, clock: Clock | None = None) -> None:
        super().__init__(config, clock=clock)
        self._entries: dict[str, _Entry] = {}
        self._users: dict[tuple[str, str], dict[str, None]] = {}
        self._buckets: dict[int, dict[str, None]] = {}
        self._bucket_keys: list[int] = []
        # rotated or logged-out id -> (site, until, ROTATED or ENDED): the short-lived
        # records of rotations and logouts
        self._rotations: dict[str, tuple[str, datetime, Miss]] = {}

    @classmethod
    def with_controls(
        cls, config: Config | None = None, *, clock: Clock | None = None, **options: Any
    ) -> ControlledStore:
        """A controlled memory store:
        ``with_controls(MemoryStore(config, clock=clock), config, **options)``."""
        return with_controls(cls(config, clock=clock), config, **options)

    def __len__(self) -> int:
        return len(self._entries)

    async def _close(self) -> None:
        self._entries.clear()
        self._users.clear()
        self._buckets.clear()
        self._bucket_keys.clear()
        self._rotations.clear()

    # ------------------------------------------------------------ bookkeeping

    def _add(self, entry: _Entry) -> None:
        session_id = entry.id
        self._entries[session_id] = entry
        self._bucket_add(session_id, entry.bucket)
        if entry.user_id is not None:
            key = (entry.site_id, entry.user_id)
            index = self._users.get(key)
            if index is None:
                self._users[key] = {session_id: None}
            else:
                index[session_id] = None

    def _remove(self, session_id: str) -> _Entry | None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return None
        bucket = self._buckets.get(entry.bucket)
        if bucket is not None:
            bucket.pop(session_id, None)
        if entry.user_id is not None:
            key = (entry.site_id, entry.user_id)
            index = self._users.get(key)
            if index is not None:
                index.pop(session_id, None)
                if not index:
                    del self._users[key]
        return entry

    def _bucket_add(self, session_id: str, bucket: int) -> None:
        ids = self._buckets.get(bucket)
        if ids is None:
            self._buckets[bucket] = {session_id: None}
            heapq.heappush(self._bucket_keys, bucket)
        else:
            ids[session_id] = None

    def _set_expiry(self, entry: _Entry, expires_at: datetime | None) -> None:
        entry.expires_at = expires_at
        self._rebucket(entry, entry.bucket, _bucket_of(expires_at))

    def _rebucket(self, entry: _Entry, old_bucket: int, bucket: int) -> None:
        entry.bucket = bucket
        if bucket != old_bucket:
            old = self._buckets.get(old_bucket)
            if old is not None:
                old.pop(entry.id, None)
            self._bucket_add(entry.id, bucket)

    def _live(self, session_id: str, scope: Config, now: datetime) -> _Entry | Outcome:
        entry = self._entries.get(session_id)
        if entry is None:
            return Outcome.MISSING
        if entry.site_id != scope.site_id:
            return Outcome.OTHER_SITE
        expires_at = entry.expires_at
        if expires_at is not None and now >= expires_at:
            return Outcome.EXPIRED
        return entry

    # ------------------------------------------------------------------ hooks

    async def _insert(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> InsertResult:
        session_id = session.id
        entries = self._entries
        if session_id in entries:
            raise InvalidSession("a session with this id already exists")
        result = NO_EVICTIONS
        entry = _entry(session, _exact(record))
        user_id = entry.user_id
        if user_id is not None:
            key = (scope.site_id, user_id)
            index = self._users.get(key)
            if index is None:
                self._users[key] = {session_id: None}
            else:
                limit = scope.max_sessions_per_user
                if limit and len(index) >= limit:
                    result = self._make_room(index, limit, scope, now)
                    index = self._users.setdefault(key, {})  # eviction may have emptied it
                index[session_id] = None
        # the rest of _add (the user index is done above, with the limit)
        entries[session_id] = entry
        self._bucket_add(session_id, entry.bucket)
        return result

    def _make_room(
        self, index: dict[str, None], limit: int, scope: Config, now: datetime
    ) -> InsertResult:
        """Evict what the policy says so that one more session fits under ``limit``
        (``SessionLimitExceeded`` for reject); expired sessions do not count."""
        live = [
            e
            for e in map(self._entries.__getitem__, index)
            if e.expires_at is None or now < e.expires_at
        ]
        excess = len(live) - limit + 1
        if excess <= 0:
            return NO_EVICTIONS
        if scope.eviction == "reject":
            raise SessionLimitExceeded(
                f"user already has {len(live)} sessions (limit {limit})",
                details={"limit": limit, "count": len(live)},
            )
        live.sort(key=_last_accessed_at if scope.eviction == "lru" else _created_at)
        evicted = [e.id for e in live[:excess]]
        for session_id in evicted:
            self._remove(session_id)
        return InsertResult(evicted)

    async def _load(self, session_id: str) -> Session | None:
        e = self._entries.get(session_id)
        if e is None:
            return None
        # Only this class writes ``blob``; the checks guard against anything that
        # rewrites the store's internals (no cost unless they fail).
        try:
            data = orjson.loads(e.blob)
        except orjson.JSONDecodeError as exc:
            raise CorruptRecord("stored data is not JSON") from exc
        if type(data) is not dict:
            raise CorruptRecord("stored data is not a JSON object")
        s = _new_session(Session)
        s.id = e.id
        s.user_id = e.user_id
        s.site_id = e.site_id
        s.organization_id = e.organization_id
        s.data = data
        s.created_at = e.created_at
        s.updated_at = e.updated_at
        s.last_accessed_at = e.last_accessed_at
        s.expires_at = e.expires_at
        s.absolute_expires_at = e.absolute_expires_at
        s.ip_address = e.ip_address
        s.user_agent = e.user_agent
        s.version = e.version
        return s

    async def _replace(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        found = self._live(session.id, scope, now)
        if isinstance(found, Outcome):
            return found
        if found.user_id != session.user_id:
            return Outcome.USER_CHANGED
        if found.version != session.version - 1:
            return Outcome.CONFLICT
        # same id, user and site, so the user index is unchanged; only the bucket may move
        entry = _entry(session, _exact(record))
        self._entries[session.id] = entry
        self._rebucket(entry, found.bucket, entry.bucket)
        return Outcome.OK

    async def _apply(
        self,
        session_id: str,
        changes: EncodedChanges,
        scope: Config,
        now: datetime,
        limit: int,
        base: Session | None = None,
    ) -> Applied | Outcome:
        found = self._live(session_id, scope, now)
        if isinstance(found, Outcome):
            return found
        try:
            blob = apply_to_data(found.blob, changes, keyless=True)
        except orjson.JSONDecodeError as exc:
            raise CorruptRecord("stored data is not JSON") from exc
        if blob is None:
            return Outcome.CONFLICT
        absolute = absolute_deadline(found)
        expires_at = idle_deadline(absolute, now, scope.idle_timeout)
        # the entry as it will be, to measure the whole record; nothing changes before
        entry = _new_entry(_Entry)
        entry.id = found.id
        entry.user_id = found.user_id
        entry.site_id = found.site_id
        entry.organization_id = found.organization_id
        entry.data = _EMPTY
        entry.created_at = found.created_at
        entry.updated_at = entry.last_accessed_at = now
        entry.expires_at = expires_at
        entry.absolute_expires_at = absolute
        entry.ip_address = found.ip_address
        entry.user_agent = found.user_agent
        entry.version = found.version + 1
        if limit and (
            len(blob) + codec.header_bound(entry) > limit and codec.record_size(entry, blob) > limit
        ):
            return Outcome.TOO_LARGE
        entry.blob = _exact(blob)
        entry.bucket = _bucket_of(expires_at)
        self._entries[session_id] = entry
        self._rebucket(entry, found.bucket, entry.bucket)
        return Applied(entry.version, now, expires_at)

    async def _reseal_write(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        found = self._live(session.id, scope, now)
        if isinstance(found, Outcome):
            return found
        if found.version != session.version - 1:
            return Outcome.CONFLICT
        found.blob = _exact(record)  # the data only: times stay as stored
        found.version = session.version
        return Outcome.OK

    async def _touch(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        found = self._live(session_id, scope, now)
        if isinstance(found, Outcome):
            return found
        found.last_accessed_at = now
        if scope.idle_timeout is not None:
            absolute = found.absolute_expires_at or found.expires_at
            sliding = now + scope.idle_timeout
            self._set_expiry(found, sliding if absolute is None or sliding < absolute else absolute)
        return Outcome.OK

    async def _rotate(self, session_id: str, new_id: str, scope: Config, now: datetime) -> Outcome:
        found = self._live(session_id, scope, now)
        if isinstance(found, Outcome):
            return found
        if new_id in self._entries:  # 256-bit ids: never in practice, but never overwrite
            return Outcome.CONFLICT
        self._remove(session_id)
        found.id = new_id
        self._add(found)
        self._record_rotation(session_id, scope, now)
        return Outcome.OK

    def _record_rotation(
        self, session_id: str, scope: Config, now: datetime, kind: Miss = Miss.ROTATED
    ) -> None:
        grace = scope.logout_grace if kind is Miss.ENDED else scope.rotation_grace
        if grace:
            self._rotations[session_id] = (scope.site_id, now + grace, kind)

    async def _recorded(self, session_id: str, scope: Config, now: datetime) -> Miss:
        record = self._rotations.get(session_id)
        if record is None or record[0] != scope.site_id or now >= record[1]:
            return Miss.UNKNOWN
        return record[2]

    async def _rotate_into(
        self,
        session_id: str,
        version: int | None,
        session: Session,
        record: bytes,
        scope: Config,
        now: datetime,
    ) -> InsertResult | Outcome:
        found = self._live(session_id, scope, now)
        if isinstance(found, Outcome):
            return found
        if version is not None and found.version != version:
            return Outcome.CONFLICT
        if session.id in self._entries:
            raise InvalidSession("a session with this id already exists")
        # out first, so it does not count for the limit; back in if the insert fails
        self._remove(session_id)
        try:
            result = await self._insert(session, record, scope, now)  # no await inside
        except BaseException:
            self._add(found)
            raise
        self._record_rotation(session_id, scope, now)
        return result

    async def _delete(self, session_id: str, scope: Config) -> Outcome:
        entry = self._entries.get(session_id)
        if entry is None:
            return Outcome.MISSING
        if entry.site_id != scope.site_id:
            return Outcome.OTHER_SITE
        self._remove(session_id)
        return Outcome.OK

    async def _end(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        outcome = await self._delete(session_id, scope)  # no await inside
        if outcome is Outcome.OK:
            self._record_rotation(session_id, scope, now, Miss.ENDED)
        return outcome

    async def _delete_by_user(
        self,
        user_id: str,
        keep: str | None,
        scope: Config,
        now: datetime,
        only: str | None = None,
    ) -> list[str]:
        index = self._users.get((scope.site_id, user_id))
        if keep is not None and (
            not index or keep not in index or isinstance(self._live(keep, scope, now), Outcome)
        ):
            return KeepGone()
        if not index:
            return []
        doomed = list(index) if only is None else [only] if only in index else []
        deleted = []
        for session_id in doomed:
            if session_id == keep:
                continue
            entry = self._remove(session_id)
            if entry is not None and (entry.expires_at is None or now < entry.expires_at):
                deleted.append(session_id)
        return deleted

    async def _list_by_user(self, user_id: str, scope: Config, now: datetime) -> list[Session]:
        index = self._users.get((scope.site_id, user_id))
        if not index:
            return []
        live = []
        for session_id in index:
            entry = self._entries[session_id]
            if entry.expires_at is None or now < entry.expires_at:
                live.append(entry)
        live.sort(key=_created_at)
        sessions = []
        for entry in live:
            try:
                session = await self._load(entry.id)
            except CorruptRecord as exc:  # as in the other backends: skip, say so
                logger.warning(
                    "asyncsession: skipping undecodable session %s: %s", short_hash(entry.id), exc
                )
                continue
            if session is not None:
                sessions.append(session)
        return sessions

    async def _purge(self, now: datetime) -> int:
        return await self._purge_into(now, None)

    async def _purge_report(self, now: datetime) -> list[PurgedSession]:
        removed: list[PurgedSession] = []
        await self._purge_into(now, removed)
        return removed

    async def _purge_into(self, now: datetime, report: list[PurgedSession] | None) -> int:
        """Empty every expired bucket, ``PURGE_BATCH`` sessions between event-loop yields;
        with ``report``, append what was removed to it. Stale rotation records go too."""
        if self._rotations:
            for stale in [k for k, (_, until, _) in self._rotations.items() if now >= until]:
                del self._rotations[stale]
        cutoff = math.ceil(now.timestamp())
        removed = 0
        budget = PURGE_BATCH
        while self._bucket_keys and self._bucket_keys[0] <= cutoff:
            key = self._bucket_keys[0]
            ids = self._buckets.get(key)
            partial = key == cutoff  # this bucket may hold sessions expiring after now
            if ids and not partial:
                while ids and budget:
                    session_id, _ = ids.popitem()
                    entry = self._remove(session_id)
                    if report is not None and entry is not None:
                        report.append(PurgedSession(entry.site_id, entry.user_id, session_id))
                    removed += 1
                    budget -= 1
            elif ids:
                for session_id in [
                    sid
                    for sid in ids
                    if (exp := self._entries[sid].expires_at) is not None and now >= exp
                ]:
                    entry = self._remove(session_id)
                    if report is not None and entry is not None:
                        report.append(PurgedSession(entry.site_id, entry.user_id, session_id))
                    removed += 1
                    budget -= 1
                break  # the rest of this bucket is still live; later buckets too
            if not ids:
                heapq.heappop(self._bucket_keys)
                self._buckets.pop(key, None)
            if budget <= 0:
                budget = PURGE_BATCH
                await asyncio.sleep(0)
        return removed

    async def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """Every session, ``batch`` per event-loop turn (over a snapshot of the ids)."""
        ids = list(self._entries)
        for start in range(0, len(ids), batch):
            out = []
            for session_id in ids[start : start + batch]:
                entry = self._entries.get(session_id)
                if entry is not None:
                    out.append(
                        ScanEntry(
                            entry.site_id,
                            entry.user_id,
                            entry.id,
                            len(entry.blob),
                            entry.expires_at,
                        )
                    )
            yield out
            await asyncio.sleep(0)

    async def _scan_estimate(self) -> int | None:
        return len(self._entries)
