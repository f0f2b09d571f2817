"""The SQLite backend's schema (its migrations), its statements, and how a row
becomes a ``Session`` and back."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson

from ...codec import EPOCH, CorruptRecord, to_us
from ...config import Config
from ...errors import short_hash
from ...session import Session, is_handle

logger = logging.getLogger("asyncsession")

SCHEMA_VERSION = 3
"""Stored in ``PRAGMA user_version``; a database with a higher one is refused."""
PLAIN_SCHEMA_VERSION = 2
"""The version a store with ``Config(hash_ids=False)`` leaves a file at: the sessions
are keyed by plain ids, and releases before hashed ids can still open the file."""

# Each entry upgrades the schema from version ``i`` to ``i + 1`` in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE sessions (
            id       TEXT PRIMARY KEY NOT NULL,
            site_id  TEXT NOT NULL,
            user_id  TEXT,
            org_id   TEXT,
            created  INTEGER NOT NULL,
            updated  INTEGER NOT NULL,
            accessed INTEGER NOT NULL,
            expires  INTEGER,
            absolute INTEGER,
            ip       TEXT,
            ua       TEXT,
            version  INTEGER NOT NULL,
            data     BLOB NOT NULL
        )""",
        # Anonymous sessions are never looked up by user: keep them out of this index.
        "CREATE INDEX sessions_user ON sessions (site_id, user_id, created) "
        "WHERE user_id IS NOT NULL",
        "CREATE INDEX sessions_expires ON sessions (expires)",
    ),
    # 2: records of rotated ids (by SHA-256, never the new id), kept for a short while
    (
        """CREATE TABLE rotations (
            hash    BLOB PRIMARY KEY NOT NULL,
            site_id TEXT NOT NULL,
            until   INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 3: rows may be keyed by handles (Config.hash_ids), which a release before them
    # would not find: the version alone makes such a release refuse the file
    (),
)
assert len(MIGRATIONS) == SCHEMA_VERSION

_FIELDS = (
    "site_id, user_id, org_id, created, updated, accessed, expires, absolute, ip, ua, version, data"
)
# A number past ``?``; text or a blob (a damaged row: SQLite sorts them after every
# number) is never live, as the Redis backend treats a deadline it cannot read.
_LIVE = "(expires IS NULL OR (expires > ? AND expires < ''))"

_GET = f"SELECT id, {_FIELDS} FROM sessions WHERE id = ?"
_SELECT = f"SELECT {_FIELDS} FROM sessions WHERE id = ?"  # on the writer, in a transaction
_INSERT = f"INSERT INTO sessions (id, {_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_LIVE_OF_USER = (
    f"SELECT id FROM sessions WHERE site_id = ? AND user_id = ? AND id != ? AND {_LIVE} "
    "ORDER BY {order}, rowid"
)
_LIVE_BY_CREATED = _LIVE_OF_USER.format(order="created")
_LIVE_BY_ACCESS = _LIVE_OF_USER.format(order="accessed")
_EVICT = "DELETE FROM sessions WHERE id = ?"
_REPLACE = (
    "UPDATE sessions SET org_id = ?, created = ?, updated = ?, accessed = ?, "
    "expires = ?, absolute = ?, ip = ?, ua = ?, version = ?, data = ? "
    f"WHERE id = ? AND site_id = ? AND user_id IS ? AND version = ? AND {_LIVE}"
)
_RESEAL = (  # reencrypt: the data only; times and the rest stay as stored
    f"UPDATE sessions SET version = ?, data = ? WHERE id = ? AND site_id = ? AND version = ? "
    f"AND {_LIVE}"
)
_APPLY = (
    "UPDATE sessions SET updated = ?, accessed = ?, expires = ?, version = ?, data = ? WHERE id = ?"
)
_STATE = "SELECT site_id, user_id, version, expires FROM sessions WHERE id = ?"
_TOUCH = f"UPDATE sessions SET accessed = ? WHERE id = ? AND site_id = ? AND {_LIVE}"
# min(absolute deadline, now + idle); the absolute deadline of a row without one is its
# current expiry, as in the memory backend. Right-hand sides see the old row.
_TOUCH_IDLE = (
    "UPDATE sessions SET accessed = ?1, expires = CASE "
    "WHEN coalesce(absolute, expires) IS NULL OR ?2 < coalesce(absolute, expires) THEN ?2 "
    "ELSE coalesce(absolute, expires) END "
    "WHERE id = ?3 AND site_id = ?4 AND (expires IS NULL OR (expires > ?5 AND expires < ''))"
)
_ROTATE = (
    f"INSERT INTO sessions (id, {_FIELDS}) SELECT ?, {_FIELDS} FROM sessions "
    f"WHERE id = ? AND site_id = ? AND {_LIVE}"
)
_DELETE = "DELETE FROM sessions WHERE id = ? AND site_id = ?"
# A logout's record (Store.delete(..., leave_record=True)) is a row of the rotations
# table whose until is negated: -until. No schema change, and a release before these
# records takes it for a lapsed rotation (never rotated; purged).
_RECORD_ROTATION = "INSERT OR REPLACE INTO rotations (hash, site_id, until) VALUES (?, ?, ?)"
# 1: rotated, 0: ended by a logout, no row: neither (or lapsed). An until that is no
# integer (text, a blob: damaged, never written by a store) is no record, and purged
_RECORDED = (
    "SELECT until > 0 FROM rotations WHERE hash = ?1 AND site_id = ?2 "
    "AND typeof(until) = 'integer' AND (until > ?3 OR until < -?3)"
)
_PURGE_ROTATIONS = (
    "DELETE FROM rotations WHERE until BETWEEN -?1 AND ?1 OR typeof(until) != 'integer'"
)
_EXISTS = "SELECT 1 FROM sessions WHERE id = ?"
_ADOPTABLE = "SELECT id = ? FROM sessions WHERE id IN (?, ?)"  # on the reader: 1 = plain id
_ADOPT = "UPDATE sessions SET id = ? WHERE id = ?"  # the rowid, so the listing order, stays
_DELETE_USER = (
    "DELETE FROM sessions WHERE site_id = ? AND user_id = ? AND id IS NOT ? "
    "RETURNING rowid, id, expires"
)
_DELETE_USERS_ONE = (
    "DELETE FROM sessions WHERE id = ? AND site_id = ? AND user_id = ? AND id IS NOT ? "
    "RETURNING rowid, id, expires"
)
_USERS_SESSION = f"SELECT 1 FROM sessions WHERE id = ? AND site_id = ? AND user_id = ? AND {_LIVE}"
_LIST_USER = (
    f"SELECT id, {_FIELDS} FROM sessions WHERE site_id = ? AND user_id = ? AND {_LIVE} "
    "ORDER BY created, rowid"
)
_PURGE = (  # past, or not a number (a damaged row: never live, see _LIVE)
    "DELETE FROM sessions WHERE rowid IN "
    "(SELECT rowid FROM sessions WHERE expires <= ? OR expires >= '' LIMIT ?)"
)
_PURGE_REPORT = _PURGE + " RETURNING site_id, user_id, id"
_COUNT = "SELECT count(*) FROM sessions"
_SCAN = (
    "SELECT rowid, site_id, user_id, id, length(data), expires FROM sessions "
    "WHERE rowid > ? ORDER BY rowid LIMIT ?"
)

Row = tuple[Any, ...]


def _hash(session_id: str) -> bytes:
    """How a rotated id is kept: its SHA-256 (the id itself is never stored there).
    Given a handle, the SHA-256 of its id, which the handle carries: records made
    before ids were hashed (and with ``hash_ids=False``) keep matching."""
    if is_handle(session_id):
        return bytes.fromhex(session_id[5:])
    return hashlib.sha256(session_id.encode()).digest()


def _until(scope: Config, now: datetime) -> int | None:
    """When the rotation record of a rotation at ``now`` lapses (None: no record)."""
    return to_us(now + scope.rotation_grace) if scope.rotation_grace else None


def _us(when: datetime | None) -> int | None:
    return None if when is None else to_us(when)


def _at(us: int) -> datetime:
    return EPOCH + timedelta(0, 0, us)


def _dt(us: int | None) -> datetime | None:
    return None if us is None else EPOCH + timedelta(0, 0, us)


def _scanned_dt(us: object) -> datetime | None:
    """``_dt`` for an admin scan, which must get through every row: a deadline that is
    not a number (a damaged row, never live: see ``_LIVE``) reads as long past."""
    if us is None:
        return None
    if type(us) is int or type(us) is float:
        try:
            return EPOCH + timedelta(0, 0, us)
        except OverflowError:
            pass
    return EPOCH


def _row_params(session: Session, data: bytes) -> tuple[Any, ...]:
    """The ``_FIELDS`` values of ``session``."""
    return (
        session.site_id,
        session.user_id,
        session.organization_id,
        to_us(session.created_at),
        to_us(session.updated_at),
        to_us(session.last_accessed_at),
        _us(session.expires_at),
        _us(session.absolute_expires_at),
        session.ip_address,
        session.user_agent,
        session.version,
        data,
    )


def _session(session_id: str, row: Row) -> Session:
    """A ``Session`` from the ``_FIELDS`` columns of a row; ``CorruptRecord`` if they
    are not what this backend writes."""
    try:
        site, user, org, created, updated, accessed, expires, absolute, ip, ua, version, raw = row
        data = orjson.loads(raw)
        if type(data) is not dict:
            raise CorruptRecord("session data is not a JSON object")
        if type(version) is not int:
            raise CorruptRecord("version is not an integer")
        # Timestamps often coincide (a fresh session: all three; expiry and deadline
        # until the first idle slide): convert each distinct value once.
        created_at = _at(created)
        updated_at = created_at if updated == created else _at(updated)
        accessed_at = updated_at if accessed == updated else _at(accessed)
        expires_at = None if expires is None else _at(expires)
        absolute_at = expires_at if absolute == expires else _dt(absolute)
        return Session(
            id=session_id,
            user_id=user,
            site_id=site,
            organization_id=org,
            data=data,
            created_at=created_at,
            updated_at=updated_at,
            last_accessed_at=accessed_at,
            expires_at=expires_at,
            absolute_expires_at=absolute_at,
            ip_address=ip,
            user_agent=ua,
            version=version,
        )
    except CorruptRecord:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptRecord(f"undecodable session row: {type(exc).__name__}") from exc


class _Undecodable(NamedTuple):
    session_id: str
    error: CorruptRecord


_SESSION_ROW = 1 + len(_FIELDS.split(","))
"""Columns of a session row (``id``, then ``_FIELDS``: ``_GET``, ``_LIST_USER``); no other
statement the reader runs has as many."""


def _decode(cursor: sqlite3.Cursor | None, row: Row) -> Any:
    """The reader's row factory: a session row becomes its ``Session`` (or an
    ``_Undecodable``) on the reader's thread, about 12 us per get cheaper than on the
    event loop; other rows stay tuples. (``:memory:`` shares the writer's connection,
    whose functions want plain rows: ``_read`` applies it there.)"""
    if len(row) != _SESSION_ROW:
        return row
    try:
        return _session(row[0], row[1:])
    except CorruptRecord as exc:
        return _Undecodable(row[0], exc)


def _loaded(got: Session | _Undecodable) -> Session:
    if isinstance(got, _Undecodable):
        raise got.error
    return got


def _listed(rows: list[Session | _Undecodable]) -> list[Session]:
    """The sessions of ``_LIST_USER``; an undecodable row is skipped with a warning."""
    sessions = []
    for got in rows:
        if isinstance(got, _Undecodable):
            logger.warning(
                "asyncsession: skipping undecodable sqlite row %s: %s",
                short_hash(got.session_id),
                got.error,
            )
        else:
            sessions.append(got)
    return sessions


def _live(expires: object, now_us: int) -> bool:
    """As ``_LIVE``: a deadline that is not a number (a damaged row) is never live."""
    return expires is None or (
        (type(expires) is int or type(expires) is float) and expires > now_us
    )
