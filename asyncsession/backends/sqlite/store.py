"""SQLiteStore: one database file shared safely by several worker processes (aiosqlite).

A session is one row: its metadata in columns (timestamps as integer microseconds,
so they round-trip exactly and expiry is plain integer comparison in SQL) and its
data as the encoded JSON bytes. ``touch`` is then a two-column ``UPDATE`` that never
rewrites data, and a ``get`` builds the same ``Session`` the memory backend returns.

Two connections, each on its own aiosqlite thread. Writes go to the writer: every
write hook is one call there, a function that runs its statements back to back, so no
other coroutine's statement can land inside a transaction. Writes that read before they
write (create with a per-user limit, rotate, delete_by_user, apply) run in ``BEGIN IMMEDIATE``,
which takes the database write lock up front, so they are atomic across processes
too; ``update`` and ``touch`` are single compare-and-set ``UPDATE`` statements. Reads
(get, list_by_user, the admin scan and its estimate) are one ``SELECT`` each on the
reader, a read-only connection: in WAL mode it sees the last commit and never waits
for a writer, this process's (queued behind a busy write) or another's. With
``read_on_loop`` the point reads (get and the rotation check) run on the event loop
itself, on a third, plain connection that never waits (``_read``): a lookup by
primary key takes microseconds, a thread hop tens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import aiosqlite

from ..._deadline import DEADLINE
from ...changes import Applied, EncodedChanges
from ...codec import CorruptRecord, to_us
from ...config import Config
from ...controls import ControlledStore, with_controls
from ...errors import StoreClosed, StoreUnavailable
from ...session import Clock, Session
from ...store import (
    NO_EVICTIONS,
    InsertResult,
    Miss,
    Outcome,
    PurgedSession,
    ScanEntry,
    Store,
)
from . import writes
from .schema import (
    _ADOPTABLE,
    _COUNT,
    _GET,
    _LIST_USER,
    _PURGE_ROTATIONS,
    _RECORDED,
    _SCAN,
    _TOUCH,
    _TOUCH_IDLE,
    MIGRATIONS,
    PLAIN_SCHEMA_VERSION,
    SCHEMA_VERSION,
    _decode,
    _hash,
    _listed,
    _loaded,
    _row_params,
    _scanned_dt,
    _until,
)

logger = logging.getLogger("asyncsession")

T = TypeVar("T")
_B = TypeVar("_B")

PURGE_BATCH = 1_000
"""Most rows ``purge_expired`` deletes per statement (one write-lock hold)."""
PURGE_FIRST_BATCH = 250
"""Rows in the first purge statement, before its timing sizes the next ones."""
PURGE_MIN_BATCH = 10
PURGE_HOLD = 0.01
"""Seconds of write-lock hold each purge batch aims at (the issue allows 50 ms)."""
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
"""Bytes of WAL file kept after a checkpoint empties it (SQLite's default: all of it)."""
BUSY_SLACK_MS = 10
"""How far the writer's busy timeout may be from a write's remaining budget unchanged."""

MEMORY = ":memory:"


class _Gone(sqlite3.OperationalError):
    """The database file was deleted or replaced while this store had it open."""


DEADLINE_MARGIN = 0.05
"""Seconds before a request's deadline by which a write must have started, and its
wait for another process's lock ends (the request gives up at the deadline itself);
half of what is left when that is less."""


class _Hidden(tuple[Any, ...]):
    """Statement parameters whose repr hides them: aiosqlite logs each queued call,
    with its arguments, at DEBUG, and parameters hold full session ids."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<parameters>"


class _Call:
    """A hook's function for the connection thread. Its repr names only the function:
    aiosqlite logs queued calls at DEBUG, and arguments hold full session ids."""

    __slots__ = ("args", "deadline", "fn", "start_by", "store")

    def __init__(self, store: SQLiteStore, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.store = store
        self.fn = fn
        self.args = args
        # for the lock, queue included; within a request's deadline if one is set
        # (SessionMiddleware's, which also cancels the call's await at it: its load,
        # touch and writes share one budget, and a wait for the lock ends by then)
        self.deadline = time.monotonic() + store.busy_timeout
        self.start_by: float | None = None
        limit = DEADLINE.get()
        if limit is not None:
            # the request gives up at its deadline: a call still queued by then must
            # not run behind its back (a login committed after its 503, the browser
            # left on the rotated id); one that runs ends its wait for the lock a
            # little before, so it answers, rather than being cut in doubt
            left = limit - asyncio.get_running_loop().time()
            # (a small budget keeps half of itself: never refused with the lock free)
            self.start_by = time.monotonic() + left - min(DEADLINE_MARGIN, max(left, 0) / 2)
            self.deadline = min(self.deadline, self.start_by)

    def __call__(self) -> Any:
        store = self.store
        conn = store._sqlite
        if conn is None:  # pragma: no cover - closed between queueing and running
            raise sqlite3.OperationalError("connection is closed")
        if self.start_by is not None and time.monotonic() >= self.start_by:
            raise sqlite3.OperationalError("not started before the request's deadline")
        if store._identity is not None:
            store._check_file_due()
        store._wait_at_most(conn, self.deadline)
        return self.fn(conn, *self.args)

    def __repr__(self) -> str:
        return f"<asyncsession sqlite {getattr(self.fn, '__name__', 'call')}>"


class SQLiteStore(Store):
    """SQLite store on aiosqlite (WAL, ``synchronous=NORMAL``, a busy timeout).

    ``path`` is a file path (its directory must exist) or ``":memory:"``. The
    connections (a writer and a reader; one for ``":memory:"``) open on first use or
    ``async with`` and ``close()`` closes them. ``busy_timeout`` is how long (seconds)
    a write waits for another process's write lock before failing with
    ``StoreUnavailable``; reads never wait for it. ``read_on_loop=True`` runs
    ``get`` on the event loop (no thread hop, about half the time; see ``_read``),
    for a database on a local disk: a disk that stalls then stalls the whole worker,
    which no deadline can cut. ``busy_timeout`` is also the store's ``timeout``,
    so ``SessionMiddleware`` bounds a whole request's session work by it (one budget
    for its touch, ``update_session``, ``login`` and the final save), and a write's
    wait for the lock ends within what is left of that budget.
    """

    backend_name = "sqlite"
    stores_header = False  # metadata lives in columns; ``record`` is the data
    file_check_interval = 0.1
    """Seconds between checks that the file is still the one opened (one ``stat``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        busy_timeout: float = 5.0,
        read_on_loop: bool = False,
    ) -> None:
        super().__init__(config, clock=clock)
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise ValueError(f"SQLiteStore needs a file path or ':memory:', got {path!r}")
        if busy_timeout < 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        self.path = path if path == MEMORY else os.path.abspath(path)
        self.busy_timeout = float(busy_timeout)
        self.timeout = self.busy_timeout or None
        self._conn: aiosqlite.Connection | None = None  # the writer
        self._reader: aiosqlite.Connection | None = None  # the writer itself for :memory:
        self._sqlite: sqlite3.Connection | None = None  # used on the connection thread only
        # point reads (get, the rotation check) on the event loop: see _read
        self.read_on_loop = bool(read_on_loop)
        self._inline: sqlite3.Connection | None = None
        self._busy_ms = 0  # the writer's current busy timeout (connection thread only)
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._next_file_check = 0.0  # time.monotonic() of the next _check_file
        self._open_lock = asyncio.Lock()

    @classmethod
    def with_controls(
        cls,
        path: str | os.PathLike[str],
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        busy_timeout: float = 5.0,
        read_on_loop: bool = False,
        **options: Any,
    ) -> ControlledStore:
        """A controlled SQLite store: ``with_controls(SQLiteStore(path, config, ...), config)``."""
        store = cls(path, config, clock=clock, busy_timeout=busy_timeout, read_on_loop=read_on_loop)
        return with_controls(store, config, **options)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -------------------------------------------------------------- connection

    async def _open(self) -> None:
        if self._conn is None:
            await self._connect()

    async def _connect(self) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
        """Open the writer (pragmas, WAL, schema), then the reader; (writer, reader)."""
        async with self._open_lock:
            if self._conn is not None and self._reader is not None:
                return self._conn, self._reader
            if self._closed:
                raise StoreClosed("sqlite store is closed")
            self._check_directory()
            opened: list[aiosqlite.Connection] = []
            try:
                conn = await self._connection()
                opened.append(conn)
                await conn._execute(self._setup, conn._conn)  # type: ignore[no-untyped-call]
                reader = conn  # a private in-memory database exists on one connection only
                if self.path != MEMORY:
                    # after the writer's setup: the file is in WAL mode and has its schema
                    reader = await self._connection()
                    opened.append(reader)
                    await reader.execute_fetchall("PRAGMA query_only = 1")
                    reader.row_factory = _decode  # type: ignore[assignment,unused-ignore]
                    if self.read_on_loop:
                        self._inline = _inline_reader(self.path)
            except BaseException as exc:
                self._sqlite = None
                self._identity = None
                self._close_inline()
                for c in reversed(opened):
                    try:
                        await c.close()
                    except Exception:  # pragma: no cover - already failing
                        logger.debug("asyncsession: closing a failed sqlite connection raised")
                if isinstance(exc, sqlite3.Error):
                    raise self._unavailable(exc) from exc
                raise
            self._conn, self._reader = conn, reader
            return conn, reader

    async def _connection(self) -> aiosqlite.Connection:
        """A connection in autocommit mode whose busy handler waits ``busy_timeout``."""
        return await _daemon(
            aiosqlite.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        )

    def _check_directory(self) -> None:
        """sqlite3 would say only "unable to open database file"; say what is wrong."""
        if self.path == MEMORY:
            return
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise StoreUnavailable(
                f"sqlite database {self.path!r}: directory {directory!r} does not exist",
                details={"path": self.path},
            )

    def _setup(self, c: sqlite3.Connection) -> None:
        """Connection thread: pragmas, then create or migrate the schema."""
        self._busy_ms = int(self.busy_timeout * 1000)
        c.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        # Refuse a newer schema before anything writes to the file (even the WAL switch).
        version = c.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version)
        if version == 0:  # refuse another program's table before switching its file to WAL
            self._check_foreign(c)
        if self.path != MEMORY:
            mode = self._switch_to_wal(c)
            if mode.lower() != "wal":
                logger.warning(
                    "asyncsession: sqlite database %r cannot use WAL (journal_mode=%s); "
                    "writers will block readers",
                    self.path,
                    mode,
                )
        c.execute("PRAGMA synchronous = NORMAL")
        # A WAL that a long reader let grow (nothing can be checkpointed past it) is
        # cut back to this size at the next checkpoint that empties it, not kept
        c.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        # Deleted and moved rows (a delete, an update that grows a row, a plain id moved
        # to its handle) are overwritten with zeros, not left in free space: the
        # default of some SQLite builds (Debian's), not of others.
        c.execute("PRAGMA secure_delete = ON")
        # hash_ids=False leaves a file of plain ids where releases before hashing open it
        target = SCHEMA_VERSION if self._hash_ids else max(version, PLAIN_SCHEMA_VERSION)
        if version < target:
            c.execute("BEGIN IMMEDIATE")
            try:
                version = c.execute("PRAGMA user_version").fetchone()[0]  # another process?
                self._check_version(version)
                if version == 0:
                    self._check_foreign(c)
                if version < target:
                    for step in MIGRATIONS[version:target]:
                        for statement in step:
                            c.execute(statement)
                    c.execute(f"PRAGMA user_version = {target}")
                c.execute("COMMIT")
            except BaseException:
                writes._rollback(c)
                raise
        self._sqlite = c
        if self.path != MEMORY:
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._next_file_check = 0.0

    def _check_foreign(self, c: sqlite3.Connection) -> None:
        """Refuse a file with a ``sessions`` table that this library did not create
        (``user_version`` 0). Another store creating the schema commits the table and the
        version together, so a version read after seeing the table tells them apart."""
        if c.execute("SELECT 1 FROM sqlite_master WHERE name = 'sessions'").fetchone() and (
            c.execute("PRAGMA user_version").fetchone()[0] == 0
        ):
            raise StoreUnavailable(
                f"sqlite database {self.path!r} already has a 'sessions' table that "
                "asyncsession did not create; use a dedicated database file",
                details={"path": self.path},
            )

    def _switch_to_wal(self, c: sqlite3.Connection) -> str:
        """``PRAGMA journal_mode = WAL``, retried within the busy timeout.

        Switching a file to WAL takes an exclusive lock, and SQLite answers SQLITE_BUSY
        at once, without its busy handler, when another connection holds the file
        meanwhile (two stores or processes opening a new file together: about one
        open in ten on 2 loaded cores). Once the file is in WAL mode, the pragma is a
        no-op that cannot be busy. Connection thread: sleeping here blocks no loop."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            try:
                return str(c.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"sqlite database {self.path!r} has schema version {version}, newer than this "
                f"version of asyncsession supports ({SCHEMA_VERSION}); upgrade asyncsession "
                "(the database was left untouched)",
                details={"path": self.path, "schema_version": version},
            )

    def _wait_at_most(self, c: sqlite3.Connection, deadline: float) -> None:
        """Writer's thread: let the next call wait for the write lock only until
        ``deadline``, ``busy_timeout`` after it was made. Writes queued behind one that
        waits out another process's lock then answer at their own deadline (one try
        without waiting) instead of each waiting a full ``busy_timeout`` in turn."""
        ms = max(0, round((deadline - time.monotonic()) * 1000))
        if ms != self._busy_ms and (ms == 0 or abs(ms - self._busy_ms) > BUSY_SLACK_MS):
            c.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_ms = ms

    def _check_file_due(self) -> None:
        """``_check_file`` if ``file_check_interval`` has passed since the last one."""
        tick = time.monotonic()
        if tick >= self._next_file_check:
            self._check_file()
            self._next_file_check = tick + self.file_check_interval

    def _check_file(self) -> None:
        """Connection thread: fail if the file was deleted or replaced under us. SQLite
        keeps using the unlinked inode in WAL mode, silently diverging from every
        process that opens the path afterwards."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise _Gone("database file was deleted while open") from None
        except OSError as exc:  # (a directory made unsearchable: never a raw OSError)
            raise sqlite3.OperationalError(
                f"cannot check the database file: {type(exc).__name__}"
            ) from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise _Gone("database file was replaced while open")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(sqlite3_connection, *args)`` on the writer's thread."""
        conn = self._conn
        if conn is None:
            conn, _ = await self._connect()
        try:
            # aiosqlite's own queue: one thread hop per hook, whatever the statement count
            result: T = await conn._execute(_Call(self, fn, args))  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        except ValueError as exc:  # aiosqlite: "Connection closed"
            if isinstance(exc, CorruptRecord):
                raise
            raise self._lost(exc) from exc
        return result

    async def _read(self, sql: str, params: tuple[Any, ...], *, point: bool = False) -> list[Any]:
        """Every row of one ``SELECT`` on the reader, session rows decoded (``_decode``):
        one thread hop, one read transaction of its own (a snapshot of the last commit).

        A ``point`` read (one row by its primary key: ``get``, the rotation check)
        runs on the event loop instead, on a read-only connection of its own that
        never waits (busy timeout 0): in WAL mode a reader takes no lock a writer
        holds, so it answers in microseconds, where the thread hop costs tens. In
        the rare case SQLite says busy (a WAL recovery, another connection in
        exclusive locking mode) it goes to the reader's thread as any read."""
        inline = self._inline
        if point and inline is not None:
            try:
                if self._identity is not None:
                    self._check_file_due()
                return inline.execute(sql, _Hidden(params)).fetchall()
            except sqlite3.Error as exc:
                if not _busy(exc):
                    raise self._unavailable(exc) from exc
        reader = self._reader
        if reader is None:
            _, reader = await self._connect()
        try:
            if self._identity is not None:
                self._check_file_due()  # a stat at most every file_check_interval
            rows: list[Any] = list(await reader.execute_fetchall(sql, _Hidden(params)))
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        except ValueError as exc:  # aiosqlite: "Connection closed"
            raise self._lost(exc) from exc
        if self.path == MEMORY:  # the writer's connection: its functions want plain rows
            return [_decode(None, row) for row in rows]
        return rows

    def _lost(self, exc: ValueError) -> StoreClosed | StoreUnavailable:
        """The error for a call on a connection that was closed meanwhile."""
        if self._closed:
            return StoreClosed("sqlite store is closed")
        return StoreUnavailable(
            f"sqlite database {self.path!r} is unavailable: {exc}", details={"path": self.path}
        )

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) and "locked" in str(exc):
            why = f"database is locked (busy timeout of {self.busy_timeout:g}s exceeded)"
        elif name.startswith("SQLITE_READONLY"):
            why = "database is read-only"
        elif name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or name.startswith("SQLITE_CORRUPT"):
            why = "file is corrupt or not a database"
        elif name.startswith("SQLITE_CANTOPEN"):
            why = "cannot open the database file"
        else:
            why = str(exc)
        return StoreUnavailable(
            f"sqlite database {self.path!r} is unavailable: {why} ({name}: {exc})",
            details={"path": self.path, "sqlite_error": name},
        )

    def _close_inline(self) -> None:
        inline, self._inline = self._inline, None
        if inline is not None:
            try:
                inline.close()
            except sqlite3.Error as exc:  # pragma: no cover - a read-only connection
                logger.warning("asyncsession: closing sqlite reader %r failed: %s", self.path, exc)

    async def _close(self) -> None:
        async with self._open_lock:
            self._close_inline()
            conn, reader = self._conn, self._reader
            self._conn = self._reader = None
            # the reader first: the writer, closed last, checkpoints the WAL into the file
            for c in dict.fromkeys((reader, conn)):
                if c is None:
                    continue
                try:
                    await c.close()
                except Exception as exc:
                    logger.warning(
                        "asyncsession: closing sqlite database %r failed: %s", self.path, exc
                    )
            self._sqlite = None

    # ------------------------------------------------------------------ hooks

    async def _insert(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> InsertResult:
        params = (session.id, *_row_params(session, record))
        limit = scope.max_sessions_per_user if session.user_id is not None else 0
        evicted = await self._run(
            writes._insert, params, scope.site_id, limit, scope.eviction, to_us(now)
        )
        return InsertResult(evicted) if evicted else NO_EVICTIONS

    async def _load(self, session_id: str) -> Session | None:
        rows = await self._read(_GET, (session_id,), point=True)
        return _loaded(rows[0]) if rows else None

    async def _replace(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        # The row's site never changes: it is matched against the scope, not taken
        # from the caller's (possibly edited) copy.
        params = (
            *_row_params(session, record)[2:],  # org_id .. data: not site, user
            session.id,
            scope.site_id,
            session.user_id,
            session.version - 1,
            to_us(now),
        )
        return await self._run(writes._replace, params, session.user_id, session.version - 1)

    async def _reseal_write(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        expected = session.version - 1
        params = (session.version, record, session.id, scope.site_id, expected, to_us(now))
        return await self._run(writes._reseal, params, session.user_id, expected)

    async def _touch(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        now_us = to_us(now)
        params: tuple[Any, ...]
        if scope.idle_timeout is None:
            sql, params = _TOUCH, (now_us, session_id, scope.site_id, now_us)
        else:
            sliding = to_us(now + scope.idle_timeout)
            sql, params = _TOUCH_IDLE, (now_us, sliding, session_id, scope.site_id, now_us)
        return await self._run(writes._touch, sql, params, session_id, scope.site_id, now_us)

    async def _rotate(self, session_id: str, new_id: str, scope: Config, now: datetime) -> Outcome:
        return await self._run(
            writes._rotate, session_id, new_id, scope.site_id, to_us(now), _until(scope, now)
        )

    async def _recorded(self, session_id: str, scope: Config, now: datetime) -> Miss:
        # on the reader: every unknown id asks this, and must not wait behind a write
        params = (_hash(session_id), scope.site_id, to_us(now))
        rows = await self._read(_RECORDED, params, point=True)
        if not rows:
            return Miss.UNKNOWN
        return Miss.ROTATED if rows[0][0] else Miss.ENDED

    async def _adopt(self, session_id: str, handle: str) -> bool:
        """Move the row of ``session_id`` (written before hashed ids) to ``handle``: one
        ``UPDATE`` of its primary key, so the rowid, and with it the order among the
        user's sessions, stays; user and expiry live in columns and their indexes
        follow. First one read on the reader: nothing to move costs no write lock.
        True also when another task or process moved it since the caller looked."""
        rows = await self._read(_ADOPTABLE, (session_id, session_id, handle), point=True)
        if not rows:
            return False
        if not any(plain for (plain,) in rows):
            return True  # already under the handle: moved meanwhile
        return await self._run(writes._adopt, session_id, handle) != writes._ADOPT_GONE

    async def _migrated(self, moved: int) -> None:
        """After ``migrate_ids``: ``VACUUM`` rebuilds the file (always: first touches
        move rows too), so no free page or free space in a page still holds a plain
        id (rows deleted or rotated before the upgrade included); then the WAL, which
        holds old page images, is checkpointed and truncated to zero bytes."""
        # always: rows moved by first touches (or an earlier run) leave plain ids in
        # free pages of a file the release before wrote without secure_delete
        await self._run(writes._execute, "VACUUM", ())
        busy = await self._run(writes._truncate_wal)
        if busy:
            logger.warning(
                "asyncsession: sqlite database %r: readers kept the WAL from being "
                "truncated; it may still hold ids from before hashing until the next "
                "'asyncsession migrate' or checkpoint",
                self.path,
            )

    async def _rotate_into(
        self,
        session_id: str,
        version: int | None,
        session: Session,
        record: bytes,
        scope: Config,
        now: datetime,
    ) -> InsertResult | Outcome:
        params = (session.id, *_row_params(session, record))
        limit = scope.max_sessions_per_user if session.user_id is not None else 0
        result = await self._run(
            writes._rotate_into,
            session_id,
            version,
            params,
            scope.site_id,
            limit,
            scope.eviction,
            to_us(now),
            _until(scope, now),
        )
        if isinstance(result, Outcome):
            return result
        return InsertResult(result) if result else NO_EVICTIONS

    async def _apply(
        self,
        session_id: str,
        changes: EncodedChanges,
        scope: Config,
        now: datetime,
        limit: int,
        base: Session | None = None,
    ) -> Applied | Outcome:
        idle = scope.idle_timeout
        return await self._run(writes._apply, session_id, changes, scope.site_id, now, idle, limit)

    async def _delete(self, session_id: str, scope: Config) -> Outcome:
        return await self._run(writes._delete, session_id, scope.site_id)

    async def _end(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        if not scope.logout_grace:
            return await self._delete(session_id, scope)
        until = to_us(now + scope.logout_grace)
        return await self._run(writes._end, session_id, scope.site_id, until)

    async def _delete_by_user(
        self,
        user_id: str,
        keep: str | None,
        scope: Config,
        now: datetime,
        only: str | None = None,
    ) -> list[str]:
        return await self._run(
            writes._delete_by_user, scope.site_id, user_id, keep, to_us(now), only
        )

    async def _list_by_user(self, user_id: str, scope: Config, now: datetime) -> list[Session]:
        return _listed(await self._read(_LIST_USER, (scope.site_id, user_id, to_us(now))))

    async def _purge(self, now: datetime) -> int:
        removed = 0
        async for count in self._purge_batches(writes._purge_batch, to_us(now)):
            removed += count
        await self._run(writes._execute, _PURGE_ROTATIONS, (to_us(now),))
        return removed

    async def _purge_report(self, now: datetime) -> list[PurgedSession]:
        """``_purge`` returning what it removed (only used when expired events are wanted)."""
        removed: list[PurgedSession] = []
        async for rows in self._purge_batches(writes._purge_report_batch, to_us(now)):
            removed.extend(PurgedSession(*row) for row in rows)
        await self._run(writes._execute, _PURGE_ROTATIONS, (to_us(now),))
        return removed

    async def _purge_batches(
        self, fn: Callable[[sqlite3.Connection, int, int], tuple[_B, int, float]], now_us: int
    ) -> AsyncIterator[_B]:
        """Delete expired rows in batches, each one short write transaction (one
        ``DELETE``), followed by a WAL checkpoint outside the lock. The batch size
        adapts to keep each write-lock hold near ``PURGE_HOLD`` seconds (at most
        ``PURGE_BATCH`` rows), and after each batch the purge pauses as long as the
        batch held the lock: this process's queued operations run in between, and
        other processes, whose SQLite busy handler polls, find the lock free at least
        half of the time. (Timing here paces the purge; expiry uses only ``now``.)"""
        size = PURGE_FIRST_BATCH
        while True:
            result, count, seconds = await self._run(fn, now_us, size)
            yield result
            if count < size:
                return
            if seconds > 0:
                size = max(PURGE_MIN_BATCH, min(PURGE_BATCH, int(size * PURGE_HOLD / seconds)))
            await asyncio.sleep(min(seconds, PURGE_HOLD * 2))

    async def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """Every row in rowid order, ``batch`` rows per read (keyset pagination)."""
        after = 0
        while True:
            rows = await self._read(_SCAN, (after, batch))
            if not rows:
                return
            after = rows[-1][0]
            yield [ScanEntry(r[1], r[2], r[3], r[4], _scanned_dt(r[5])) for r in rows]

    async def _scan_estimate(self) -> int | None:
        count: int = (await self._read(_COUNT, ()))[0][0]
        return count


def _inline_reader(path: str) -> sqlite3.Connection:
    """The event loop's read-only connection (``_read``'s point reads): autocommit, a
    busy timeout of 0 (it never waits), session rows decoded by ``_decode``. Opened
    after the writer's setup (WAL, schema); used from the loop's thread (allowed
    from others, as SQLite serializes a connection's calls)."""
    c = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    try:
        c.execute("PRAGMA query_only = 1")
        c.row_factory = _decode
    except BaseException:
        c.close()
        raise
    return c


def _busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, extended codes included: the read must wait."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _daemon(conn: aiosqlite.Connection) -> aiosqlite.Connection:
    """``conn`` (not yet started) with its worker thread made a daemon.

    aiosqlite 0.22 made that thread non-daemon, so a store nobody closed kept the
    interpreter from exiting, forever (0.20 and 0.21 ran it as a daemon). Closing the
    store is still the way to end it cleanly; an exit without it is what a crash is to
    SQLite: a write in progress is rolled back from the WAL, committed ones stay."""
    thread = getattr(conn, "_thread", conn)  # 0.22 owns a Thread; before, it was one
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True
    return conn
