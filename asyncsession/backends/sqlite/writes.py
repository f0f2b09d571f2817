"""The writes of the SQLite backend: functions that run on aiosqlite's thread with
the writer's sqlite3 connection (autocommit mode: a statement outside ``BEGIN`` is
its own transaction), each a whole transaction or one statement. They never await,
so no other statement on the connection lands between theirs."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ...changes import Applied, EncodedChanges, apply_to_data
from ...codec import CorruptRecord, header_bound, record_size, to_us
from ...errors import InvalidSession, SessionLimitExceeded, short_hash
from ...store import (
    KeepGone,
    Outcome,
    absolute_deadline,
    idle_deadline,
)
from .schema import (
    _ADOPT,
    _APPLY,
    _DELETE,
    _DELETE_USER,
    _DELETE_USERS_ONE,
    _EVICT,
    _EXISTS,
    _INSERT,
    _LIVE_BY_ACCESS,
    _LIVE_BY_CREATED,
    _PURGE,
    _PURGE_REPORT,
    _RECORD_ROTATION,
    _REPLACE,
    _RESEAL,
    _ROTATE,
    _SELECT,
    _STATE,
    _USERS_SESSION,
    Row,
    _hash,
    _live,
    _session,
    _us,
)

T = TypeVar("T")

WAL_AUTOCHECKPOINT = 1000  # SQLite's default, restored after each purge batch


def _rollback(c: sqlite3.Connection) -> None:
    if c.in_transaction:
        c.execute("ROLLBACK")


def _insert(
    c: sqlite3.Connection,
    params: tuple[Any, ...],
    site_id: str,
    limit: int,
    eviction: str,
    now_us: int,
) -> list[str]:
    c.execute("BEGIN IMMEDIATE")
    try:
        evicted = _insert_rows(c, params, site_id, limit, eviction, now_us)
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return evicted


def _insert_rows(
    c: sqlite3.Connection,
    params: tuple[Any, ...],
    site_id: str,
    limit: int,
    eviction: str,
    now_us: int,
) -> list[str]:
    """``_insert`` inside the caller's transaction."""
    session_id, user_id = params[0], params[2]
    try:
        c.execute(_INSERT, params)
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" not in str(exc):
            raise
        raise InvalidSession(
            "a session with this id already exists",
            details={"session": short_hash(session_id)},
        ) from None
    evicted: list[str] = []
    if limit:
        sql = _LIVE_BY_ACCESS if eviction == "lru" else _LIVE_BY_CREATED
        live = [r[0] for r in c.execute(sql, (site_id, user_id, session_id, now_us))]
        excess = len(live) - limit + 1
        if excess > 0:
            if eviction == "reject":
                raise SessionLimitExceeded(
                    f"user already has {len(live)} sessions (limit {limit})",
                    details={"limit": limit, "count": len(live)},
                )
            evicted = live[:excess]
            c.executemany(_EVICT, [(i,) for i in evicted])
    return evicted


def _classify(
    c: sqlite3.Connection,
    session_id: str,
    site_id: str,
    now_us: int,
    user_id: str | None = None,
    version: int | None = None,
) -> Outcome:
    """Why a guarded write matched no row, checked in the memory backend's order."""
    row = c.execute(_STATE, (session_id,)).fetchone()
    if row is None:
        return Outcome.MISSING
    if row[0] != site_id:
        return Outcome.OTHER_SITE
    if not _live(row[3], now_us):
        return Outcome.EXPIRED
    if version is not None:
        if row[1] != user_id:
            return Outcome.USER_CHANGED
        if row[2] != version:
            return Outcome.CONFLICT
    return Outcome.MISSING  # pragma: no cover - changed between the write and this read


def _replace(
    c: sqlite3.Connection, params: tuple[Any, ...], user_id: str | None, expected: int
) -> Outcome:
    if c.execute(_REPLACE, params).rowcount == 1:
        return Outcome.OK
    return _classify(c, params[10], params[11], params[14], user_id, expected)


def _reseal(
    c: sqlite3.Connection, params: tuple[Any, ...], user_id: str | None, expected: int
) -> Outcome:
    if c.execute(_RESEAL, params).rowcount == 1:
        return Outcome.OK
    return _classify(c, params[2], params[3], params[5], user_id, expected)


def _touch(
    c: sqlite3.Connection,
    sql: str,
    params: tuple[Any, ...],
    session_id: str,
    site_id: str,
    now_us: int,
) -> Outcome:
    if c.execute(sql, params).rowcount == 1:
        return Outcome.OK
    return _classify(c, session_id, site_id, now_us)


def _rotate(
    c: sqlite3.Connection,
    session_id: str,
    new_id: str,
    site_id: str,
    now_us: int,
    until: int | None,
) -> Outcome:
    # INSERT a copy then DELETE (not UPDATE id): the copy gets a new rowid, so like the
    # memory backend the rotated session sorts after its peers of equal created_at.
    c.execute("BEGIN IMMEDIATE")
    try:
        try:
            moved = c.execute(_ROTATE, (new_id, session_id, site_id, now_us)).rowcount
        except sqlite3.IntegrityError:
            outcome = Outcome.CONFLICT  # the new id exists: never overwrite
        else:
            if moved == 1:
                c.execute(_EVICT, (session_id,))
                if until is not None:
                    c.execute(_RECORD_ROTATION, (_hash(session_id), site_id, until))
                outcome = Outcome.OK
            else:
                outcome = _classify(c, session_id, site_id, now_us)
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return outcome


def _apply(
    c: sqlite3.Connection,
    session_id: str,
    changes: EncodedChanges,
    site_id: str,
    now: datetime,
    idle: timedelta | None,
    limit: int,
) -> Applied | Outcome:
    """Check the expected keys and write the changes in one write transaction."""
    now_us = to_us(now)
    c.execute("BEGIN IMMEDIATE")
    try:
        row: Row | None = c.execute(_SELECT, (session_id,)).fetchone()
        if row is None:
            outcome: Applied | Outcome = Outcome.MISSING
        elif row[0] != site_id:
            outcome = Outcome.OTHER_SITE
        elif not _live(row[6], now_us):
            outcome = Outcome.EXPIRED
        else:
            outcome = _apply_row(c, session_id, row, changes, now, idle, limit)
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return outcome


def _rotate_into(
    c: sqlite3.Connection,
    session_id: str,
    version: int | None,
    params: tuple[Any, ...],
    site_id: str,
    limit: int,
    eviction: str,
    now_us: int,
    until: int | None,
) -> list[str] | Outcome:
    c.execute("BEGIN IMMEDIATE")
    try:
        row = c.execute(_STATE, (session_id,)).fetchone()
        if row is None:
            outcome: list[str] | Outcome = Outcome.MISSING
        elif row[0] != site_id:
            outcome = Outcome.OTHER_SITE
        elif not _live(row[3], now_us):
            outcome = Outcome.EXPIRED
        elif version is not None and row[2] != version:
            outcome = Outcome.CONFLICT
        else:
            c.execute(_EVICT, (session_id,))  # first: it does not count for the limit
            outcome = _insert_rows(c, params, site_id, limit, eviction, now_us)
            if until is not None:
                c.execute(_RECORD_ROTATION, (_hash(session_id), site_id, until))
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return outcome


def _apply_row(
    c: sqlite3.Connection,
    session_id: str,
    row: Row,
    changes: EncodedChanges,
    now: datetime,
    idle: timedelta | None,
    limit: int,
) -> Applied | Outcome:
    try:
        data = apply_to_data(row[11], changes, keyless=True)
    except (TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        if isinstance(exc, CorruptRecord):
            raise
        raise CorruptRecord(f"undecodable session row: {type(exc).__name__}") from exc
    if data is None:
        return Outcome.CONFLICT
    session = _session(session_id, (*row[:11], b"{}"))
    absolute = absolute_deadline(session)
    session.version += 1
    session.updated_at = session.last_accessed_at = now
    session.expires_at = idle_deadline(absolute, now, idle)
    session.absolute_expires_at = absolute
    if limit and (len(data) + header_bound(session) > limit and record_size(session, data) > limit):
        return Outcome.TOO_LARGE
    now_us = to_us(now)
    c.execute(
        _APPLY,
        (now_us, now_us, _us(session.expires_at), session.version, data, session_id),
    )
    return Applied(session.version, now, session.expires_at)


_ADOPT_MOVED = 1  # the row moved to its handle
_ADOPT_DROPPED = 2  # a row was already under the handle: the plain one was dropped
_ADOPT_GONE = 0  # no row under either id (deleted meanwhile)


def _adopt(c: sqlite3.Connection, session_id: str, handle: str) -> int:
    """Move the row of plain ``session_id`` to ``handle`` in one write transaction,
    unless a row is already there (then the plain one goes): one of ``_ADOPT_*``."""
    c.execute("BEGIN IMMEDIATE")
    try:
        at_handle = c.execute(_EXISTS, (handle,)).fetchone() is not None
        if at_handle:
            plain = c.execute(_EVICT, (session_id,)).rowcount
            outcome = _ADOPT_DROPPED if plain else _ADOPT_MOVED  # moved by another meanwhile
        else:
            moved = c.execute(_ADOPT, (handle, session_id)).rowcount
            outcome = _ADOPT_MOVED if moved else _ADOPT_GONE
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return outcome


def _truncate_wal(c: sqlite3.Connection) -> bool:
    """Checkpoint the WAL and truncate it to zero bytes; True if readers kept it
    from completing (within the busy timeout)."""
    busy, _, _ = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return bool(busy)


def _fetch_one(c: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> Row | None:
    row: Row | None = c.execute(sql, params).fetchone()
    return row


def _execute(c: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    c.execute(sql, params)


def _delete(c: sqlite3.Connection, session_id: str, site_id: str) -> Outcome:
    if c.execute(_DELETE, (session_id, site_id)).rowcount == 1:
        return Outcome.OK
    if c.execute(_EXISTS, (session_id,)).fetchone() is not None:
        return Outcome.OTHER_SITE
    return Outcome.MISSING


def _end(c: sqlite3.Connection, session_id: str, site_id: str, until: int) -> Outcome:
    """``_delete`` and, if it deleted, the logout's record (``until`` negated: see
    ``_RECORD_ROTATION``), in one transaction."""
    c.execute("BEGIN IMMEDIATE")
    try:
        outcome = _delete(c, session_id, site_id)
        if outcome is Outcome.OK:
            c.execute(_RECORD_ROTATION, (_hash(session_id), site_id, -until))
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return outcome


def _delete_by_user(
    c: sqlite3.Connection,
    site_id: str,
    user_id: str,
    keep: str | None,
    now_us: int,
    only: str | None = None,
) -> list[str]:
    c.execute("BEGIN IMMEDIATE")
    try:
        kept = (keep, site_id, user_id, now_us)
        if keep is not None and not c.execute(_USERS_SESSION, kept).fetchall():
            c.execute("ROLLBACK")
            return KeepGone()
        rows: Sequence[Row]
        if only is None:
            rows = c.execute(_DELETE_USER, (site_id, user_id, keep)).fetchall()
        else:
            rows = c.execute(_DELETE_USERS_ONE, (only, site_id, user_id, keep)).fetchall()
        c.execute("COMMIT")
    except BaseException:
        _rollback(c)
        raise
    return [r[1] for r in sorted(rows) if _live(r[2], now_us)]


def _held(c: sqlite3.Connection, fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn``, one write statement in autocommit (begin, write and commit all
    inside SQLite, which releases the GIL meanwhile, so other Python threads cannot
    stretch the hold); its result and its duration, an upper bound of the write-lock
    hold. The WAL checkpoint SQLite would run inside the commit runs after it
    instead: a checkpoint does not hold the write lock, other writers go on."""
    c.execute("PRAGMA wal_autocheckpoint = 0").fetchall()
    try:
        started = time.perf_counter()
        result = fn()
        held = time.perf_counter() - started
    finally:
        c.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}").fetchall()
    c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return result, held


def _purge_batch(c: sqlite3.Connection, now_us: int, batch: int) -> tuple[int, int, float]:
    """One purge batch: (rows deleted, rows deleted, seconds it held the write lock)."""
    count, held = _held(c, lambda: int(c.execute(_PURGE, (now_us, batch)).rowcount))
    return count, count, held


def _purge_report_batch(
    c: sqlite3.Connection, now_us: int, batch: int
) -> tuple[list[Row], int, float]:
    rows, held = _held(c, lambda: c.execute(_PURGE_REPORT, (now_us, batch)).fetchall())
    return rows, len(rows), held
