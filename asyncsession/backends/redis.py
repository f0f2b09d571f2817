"""RedisStore: sessions shared by many app servers, on ``redis.asyncio``.

Each session is one hash: the record exactly as ``codec.encode`` wrote it (field
``r``) plus the few fields the Lua scripts need (site, version, timestamps as
integer microseconds, the user index key), so ``touch`` updates two small fields
and never rewrites the data. Every hook is one Lua script (or one ``HMGET``), sent
by SHA on a pooled connection: one round trip, atomic on the server, with
transparent recovery from ``NOSCRIPT``. Concurrent ``get`` calls of one event-loop
turn are sent as one multi-key script call. Expiry decisions use the ``now``
passed in from the store's clock; native ``PEXPIREAT`` TTLs (a grace period after
the deadline) only garbage-collect what ``purge_expired()`` did not reach.
See ``docs/backends.md`` for the key layout.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, ClassVar, cast

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection as Connection
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .. import codec
from ..config import Config
from ..controls import ControlledStore, with_controls
from ..errors import InvalidSession, SessionLimitExceeded, StoreUnavailable, short_hash
from ..factory import redact
from ..session import Clock, Session, is_valid_session_id
from ..store import (
    NO_EVICTIONS,
    InsertResult,
    Outcome,
    PurgedSession,
    ScanEntry,
    Store,
    absolute_deadline,
)

logger = logging.getLogger("asyncsession")

PURGE_BATCH = 1_000
"""Expired sessions one purge script call removes (each call is atomic and short)."""

SCAN_KEYS = 100
"""Session keys one admin-scan script call reads (calls of a batch share a round trip)."""

DEFAULT_REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": None,
    "socket_connect_timeout": 5.0,
}
"""Options ``from_url`` passes to redis-py unless the URL or the caller sets them. No
per-socket-call timeout: the store bounds each whole round trip itself (``timeout``),
which costs one timer instead of a task per write and a timer per reply."""

DEFAULT_TIMEOUT = 5.0
"""Seconds one round trip (connect, write, all replies) may take before the store
gives up with ``StoreUnavailable``."""

# --------------------------------------------------------------------------- Lua
#
# Hash fields of a session key:
#   r  the record (codec.encode)          s  site id          n  version
#   c  created_at (us)                    a  last access (us) e  expires_at (us, '' = never)
#   x  absolute deadline (us, '' = never) i  user index key (absent: anonymous)
# Numbers cross into Lua as decimal strings and are only compared there (exact in
# a double up to 2**53 us, year 2255); values Lua writes back are the same strings.

_PRELUDE = """
local function fields(key, ...)
  local f = redis.pcall('HMGET', key, ...)
  if f.err then return nil end
  return f
end
local function live(e, now)
  return e == '' or now < tonumber(e)
end
local function expire(key, px)
  if px == '' then redis.call('PERSIST', key) else redis.call('PEXPIREAT', key, px) end
end
-- keep a user index alive at least as long as a session it holds; t is the index's
-- PEXPIRETIME before this write (-2: new, -1: holds a session that never expires)
local function outlive(ikey, px, t)
  if px == '' then
    if t >= 0 then redis.call('PERSIST', ikey) end
  elseif t ~= -1 and t < tonumber(px) then
    redis.call('PEXPIREAT', ikey, px)
  end
end
local function index_add(ikey, id)
  local last = redis.call('ZRANGE', ikey, -1, -1, 'WITHSCORES')
  local seq = 1
  if last[2] then seq = tonumber(last[2]) + 1 end
  redis.call('ZADD', ikey, string.format('%d', seq), id)
end
-- the expiry set holds every session that can expire; it outlives the last of them
local function schedule(xkey, e, id, px)
  if e == '' then redis.call('ZREM', xkey, id) return end
  local t = redis.call('PEXPIRETIME', xkey)
  redis.call('ZADD', xkey, e, id)
  if t < tonumber(px) then redis.call('PEXPIREAT', xkey, px) end
end
"""

# KEYS: session, expiry set, [user index]
# ARGV: record, site, version, created, accessed, expires, absolute, px, now, limit,
#       eviction, session key prefix, id
_INSERT = """
local skey, xkey, ikey = KEYS[1], KEYS[2], KEYS[3]
local site, e, px, now = ARGV[2], ARGV[6], ARGV[8], tonumber(ARGV[9])
local limit, eviction, sprefix, id = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
if redis.call('EXISTS', skey) == 1 then return {'exists'} end
local evicted = {'ok'}
if ikey and limit > 0 and redis.call('ZCARD', ikey) >= limit then
  local m = redis.call('ZRANGE', ikey, 0, -1, 'WITHSCORES')
  local alive = {}
  for j = 1, #m, 2 do
    local f = fields(sprefix .. m[j], 'c', 'a', 'e', 'i')
    if not f or not f[3] or f[4] ~= ikey then
      redis.call('ZREM', ikey, m[j])
    elseif live(f[3], now) then
      alive[#alive + 1] = {m[j], tonumber(f[1]), tonumber(f[2]), tonumber(m[j + 1])}
    end
  end
  local excess = #alive - limit + 1
  if excess > 0 then
    if eviction == 'reject' then return {'limit', #alive} end
    local k = 2
    if eviction == 'lru' then k = 3 end
    table.sort(alive, function(p, q)
      if p[k] ~= q[k] then return p[k] < q[k] end
      return p[4] < q[4]
    end)
    for j = 1, excess do
      local victim = alive[j][1]
      redis.call('DEL', sprefix .. victim)
      redis.call('ZREM', ikey, victim)
      redis.call('ZREM', xkey, victim)
      evicted[#evicted + 1] = victim
    end
  end
elseif ikey then
  -- amortized pruning: drop up to two stale members from the old end
  local m = redis.call('ZRANGE', ikey, 0, 1)
  for j = 1, #m do
    local f = fields(sprefix .. m[j], 'i')
    if not f or f[1] ~= ikey then redis.call('ZREM', ikey, m[j]) end
  end
end
if ikey then
  redis.call('HSET', skey, 'r', ARGV[1], 's', site, 'n', ARGV[3], 'c', ARGV[4], 'a', ARGV[5],
    'e', e, 'x', ARGV[7], 'i', ikey)
  local t = redis.call('PEXPIRETIME', ikey)
  index_add(ikey, id)
  outlive(ikey, px, t)
else
  redis.call('HSET', skey, 'r', ARGV[1], 's', site, 'n', ARGV[3], 'c', ARGV[4], 'a', ARGV[5],
    'e', e, 'x', ARGV[7])
end
if px ~= '' then redis.call('PEXPIREAT', skey, px) end
schedule(xkey, e, id, px)
return evicted
"""

# KEYS: session, expiry set
# ARGV: record, site, index key ('' anonymous), expected version, new version,
#       created, accessed, expires, absolute, px, now, id
_REPLACE = """
local skey, xkey = KEYS[1], KEYS[2]
local e, px = ARGV[8], ARGV[10]
local f = fields(skey, 's', 'i', 'n', 'e')
if not f or not f[1] or not f[3] or not f[4] then return 'missing' end
if f[1] ~= ARGV[2] then return 'other_site' end
if not live(f[4], tonumber(ARGV[11])) then return 'expired' end
if (f[2] or '') ~= ARGV[3] then return 'user_changed' end
if f[3] ~= ARGV[4] then return 'conflict' end
redis.call('HSET', skey, 'r', ARGV[1], 'n', ARGV[5], 'c', ARGV[6], 'a', ARGV[7], 'e', e,
  'x', ARGV[9])
expire(skey, px)
schedule(xkey, e, ARGV[12], px)
if f[2] then outlive(f[2], px, redis.call('PEXPIRETIME', f[2])) end
return 'ok'
"""

# KEYS: session, expiry set
# ARGV: site, now, sliding deadline ('' = no idle timeout), grace ms, id
_TOUCH = """
local skey, xkey = KEYS[1], KEYS[2]
local now, sliding = ARGV[2], ARGV[3]
local f = fields(skey, 's', 'i', 'e', 'x')
if not f or not f[1] or not f[3] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[3], tonumber(now)) then return 'expired' end
if sliding == '' then
  redis.call('HSET', skey, 'a', now)
  return 'ok'
end
local e = sliding
if f[4] and f[4] ~= '' and tonumber(f[4]) < tonumber(sliding) then e = f[4] end
redis.call('HSET', skey, 'a', now, 'e', e)
local px = string.format('%d', math.floor((tonumber(e) + 999) / 1000) + tonumber(ARGV[4]))
redis.call('PEXPIREAT', skey, px)
schedule(xkey, e, ARGV[5], px)
if f[2] then outlive(f[2], px, redis.call('PEXPIRETIME', f[2])) end
return 'ok'
"""

# KEYS: session, new session, expiry set
# ARGV: site, now, id, new id
_ROTATE = """
local skey, nkey, xkey = KEYS[1], KEYS[2], KEYS[3]
local id, new = ARGV[3], ARGV[4]
local f = fields(skey, 's', 'i', 'e')
if not f or not f[1] or not f[3] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[3], tonumber(ARGV[2])) then return 'expired' end
if redis.call('EXISTS', nkey) == 1 then return 'conflict' end
redis.call('RENAME', skey, nkey)
redis.call('ZREM', xkey, id)
if f[3] ~= '' then redis.call('ZADD', xkey, f[3], new) end
if f[2] then
  redis.call('ZREM', f[2], id)
  index_add(f[2], new)
end
return 'ok'
"""

# KEYS: session, expiry set
# ARGV: site, id
_DELETE = """
local skey, xkey = KEYS[1], KEYS[2]
local f = fields(skey, 's', 'i')
if not f or not f[1] then
  -- nothing, or something that is not a session of this library: remove it
  if redis.call('DEL', skey) == 1 then redis.call('ZREM', xkey, ARGV[2]) end
  return 'missing'
end
if f[1] ~= ARGV[1] then return 'other_site' end
redis.call('DEL', skey)
redis.call('ZREM', xkey, ARGV[2])
if f[2] then redis.call('ZREM', f[2], ARGV[2]) end
return 'ok'
"""

# KEYS: user index, expiry set
# ARGV: keep ('' = none), now, session key prefix, site
_DELETE_BY_USER = """
local ikey, xkey = KEYS[1], KEYS[2]
local keep, now, sprefix, site = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local deleted = {}
for _, id in ipairs(redis.call('ZRANGE', ikey, 0, -1)) do
  if id ~= keep then
    local skey = sprefix .. id
    local f = fields(skey, 's', 'e', 'i')
    if f and f[1] == site and f[3] == ikey then
      redis.call('DEL', skey)
      redis.call('ZREM', xkey, id)
      if f[2] and live(f[2], now) then deleted[#deleted + 1] = id end
    end
    redis.call('ZREM', ikey, id)
  end
end
return deleted
"""

# KEYS: user index
# ARGV: session key prefix
# Returns id, record, accessed, expires for each indexed session, in index order.
_LIST = """
local ikey, sprefix = KEYS[1], ARGV[1]
local out = {}
for _, id in ipairs(redis.call('ZRANGE', ikey, 0, -1)) do
  local f = fields(sprefix .. id, 'r', 'a', 'e', 'i')
  if not f or not f[1] or f[4] ~= ikey then
    redis.call('ZREM', ikey, id)
  else
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2] or ''
    out[#out + 1] = f[3] or ''
  end
end
return out
"""

# KEYS: expiry set
# ARGV: now, batch size, session key prefix, [report: '1']
# Returns {sessions removed, expiry entries examined}, then with report the id,
# site and index key ('' anonymous) of each removed session.
_PURGE = """
local xkey, now, sprefix = KEYS[1], ARGV[1], ARGV[3]
local ids = redis.call('ZRANGEBYSCORE', xkey, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local removed = 0
local out = {0, #ids}
for _, id in ipairs(ids) do
  local skey = sprefix .. id
  local f = fields(skey, 'e', 'i', 's')
  if f and f[1] and f[1] ~= '' and not live(f[1], tonumber(now)) then
    redis.call('DEL', skey)
    if f[2] then redis.call('ZREM', f[2], id) end
    redis.call('ZREM', xkey, id)
    removed = removed + 1
    if ARGV[4] == '1' then
      out[#out + 1] = id
      out[#out + 1] = f[3] or ''
      out[#out + 1] = f[2] or ''
    end
  elseif f and f[1] and f[1] ~= '' then
    redis.call('ZADD', xkey, f[1], id)
  else
    redis.call('ZREM', xkey, id)
  end
end
out[1] = removed
return out
"""

# KEYS: session keys (one SCAN batch)
# Returns site, index key, expires, record length per key (false for a key that is
# gone or not a session hash).
_SCAN = """
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.pcall('HMGET', key, 's', 'i', 'e')
  if f.err or not f[1] then
    out[i] = false
  else
    out[i] = {f[1], f[2] or '', f[3] or '', redis.call('HSTRLEN', key, 'r')}
  end
end
return out
"""

# KEYS: session keys. Returns record, accessed, expires per key ('WRONGTYPE' as the
# record for a key that is not a hash).
_MULTI_GET = """
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.pcall('HMGET', key, 'r', 'a', 'e')
  if f.err then f = {'WRONGTYPE', false, false} end
  out[i] = f
end
return out
"""


class _Script:
    """A Lua script and its SHA1, computed locally (no round trip to learn it)."""

    __slots__ = ("sha", "source")

    def __init__(self, body: str, *, prelude: bool = True) -> None:
        self.source = ((_PRELUDE if prelude else "") + body).encode()
        self.sha = hashlib.sha1(self.source).hexdigest()


INSERT = _Script(_INSERT)
REPLACE = _Script(_REPLACE)
TOUCH = _Script(_TOUCH)
ROTATE = _Script(_ROTATE)
DELETE = _Script(_DELETE)
DELETE_BY_USER = _Script(_DELETE_BY_USER)
LIST = _Script(_LIST)
PURGE = _Script(_PURGE)
MULTI_GET = _Script(_MULTI_GET, prelude=False)
SCAN = _Script(_SCAN, prelude=False)
SCRIPTS = (INSERT, REPLACE, TOUCH, ROTATE, DELETE, DELETE_BY_USER, LIST, PURGE, MULTI_GET, SCAN)

_OUTCOMES = {
    b"ok": Outcome.OK,
    b"missing": Outcome.MISSING,
    b"expired": Outcome.EXPIRED,
    b"other_site": Outcome.OTHER_SITE,
    b"conflict": Outcome.CONFLICT,
    b"user_changed": Outcome.USER_CHANGED,
}

_SOURCES = {script.sha: script.source for script in SCRIPTS}

_Raw = tuple[bytes | None, bytes | None, bytes | None]
_Request = tuple[bytes | None, tuple[Any, ...] | None]
"""``(session key, None)`` reads a session; ``(None, args)`` is one command."""
_Entry = tuple[_Request, "asyncio.Future[Any] | None"]
_WRONGTYPE: _Raw = (b"WRONGTYPE", None, None)

MAX_BATCH = 512
"""Requests one pipeline carries at most; more in the same turn start another."""


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands in RESP, as one buffer (our arguments are only bytes, str and int)."""
    out: list[bytes] = []
    add = out.append
    for command in commands:
        add(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is bytes:
                add(b"$%d\r\n" % len(arg))
                add(arg)
            elif type(arg) is str:
                raw = arg.encode()
                add(b"$%d\r\n" % len(raw))
                add(raw)
            elif type(arg) is int:
                raw = b"%d" % arg
                add(b"$%d\r\n" % len(raw))
                add(raw)
            else:
                raise TypeError(f"cannot send {type(arg).__name__} to Redis")
            add(b"\r\n")
    return b"".join(out)


def _reusable(conn: Connection) -> bool:
    """Connected, nothing unread, no end-of-stream from the server (checked without
    I/O on the asyncio stream redis-py reads from; False if that is not available)."""
    reader = getattr(conn, "_reader", None)
    if reader is None or not isinstance(reader, asyncio.StreamReader):
        return False
    return not reader.at_eof() and not getattr(reader, "_buffer", True)


def _loop_idle() -> bool:
    """True when no other callback is ready to run in this event-loop turn.

    Reads asyncio's ready queue; on loops without one (uvloop) it answers False and
    every request takes the batching path, which costs one extra loop iteration.
    """
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is not None and not ready


def _unwrap(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _us(when: datetime | None) -> int | bytes:
    return b"" if when is None else codec.to_us(when)


def _escape_user(user_id: str) -> bytes:
    """The user id as key bytes: no brace (hash tags stay ours), still injective."""
    raw = user_id.encode("utf-8", "surrogatepass")
    if b"%" in raw or b"{" in raw or b"}" in raw:
        raw = raw.replace(b"%", b"%25").replace(b"{", b"%7B").replace(b"}", b"%7D")
    return raw


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal ``SCAN MATCH`` pattern."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        raw = raw.replace(special, b"\\" + special)
    return raw


def _describe(pool: ConnectionPool) -> str:
    """Where a client connects, for error messages (never with its password)."""
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisStore(Store):
    """Redis backend (the seed's production backend). Needs Redis >= 7.0."""

    backend_name = "redis"

    expiry_grace_ms: ClassVar[int] = 60_000
    """How long after its logical deadline Redis itself drops a session key: a
    backstop for when ``purge_expired`` does not run, with room for clock skew
    between app servers and Redis."""

    max_in_flight: ClassVar[int] = 8
    """Batches on the wire at once; more requests wait and join the next batch."""

    def __init__(
        self,
        client: Redis,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(config, clock=clock)
        self.timeout = timeout
        if not isinstance(client, Redis):
            raise TypeError(f"RedisStore needs a redis.asyncio.Redis, not {type(client).__name__}")
        self.client = client
        self._pool: ConnectionPool = client.connection_pool
        self._owns_client = False
        self._where = _describe(self._pool)
        self._password: str | None = self._pool.connection_kwargs.get("password")
        prefix = self.config.key_prefix.encode()
        self._sprefix = prefix + b"s:"
        self._iprefix = prefix + b"u:"
        self._xkey = prefix + b"expiry"
        self._batch: list[_Entry] | None = None
        self._max_in_flight = max(1, min(self.max_in_flight, self._pool.max_connections))
        self._in_flight = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle: list[Connection] = []

    @classmethod
    def from_url(
        cls,
        url: str,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on its own connection pool (closed by ``close()``).

        ``redis://``, ``rediss://`` and ``unix://`` URLs as redis-py reads them; extra
        keyword arguments go to ``redis.asyncio.Redis.from_url``. ``timeout`` bounds each
        round trip (``None``: no bound).
        """
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"RedisStore does not support {scheme}:// yet (got {redact(url)!r}); "
                "use redis://, rediss:// or unix://"
            )
        options = {**DEFAULT_REDIS_OPTIONS, **redis_options}
        client = Redis.from_url(url, **options)
        store = cls(client, config, clock=clock, timeout=timeout)
        store._owns_client = True
        store._where = redact(url)
        return store

    @classmethod
    def with_controls(
        cls,
        client: Redis,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        **options: Any,
    ) -> ControlledStore:
        """A controlled store over ``client``: the seed's ``NewWithControls``."""
        return with_controls(cls(client, config, clock=clock), config, **options)

    # ------------------------------------------------------------------ keys

    def session_key(self, session_id: str) -> bytes:
        """``{prefix}s:{session_id}`` (ids are validated: [A-Za-z0-9_-] only)."""
        return self._sprefix + session_id.encode()

    def index_key(self, site_id: str, user_id: str) -> bytes:
        """``{prefix}u:{len(site)}:{site}:{user}``: injective in (site, user)."""
        site = site_id.encode()
        return b"%s%d:%s:%s" % (self._iprefix, len(site), site, _escape_user(user_id))

    @property
    def expiry_key(self) -> bytes:
        """``{prefix}expiry``: sorted set of session ids by deadline (us), for purging."""
        return self._xkey

    # ------------------------------------------------------------ transport
    #
    # Auto-pipelining: the first request of an event-loop turn leads a batch. It
    # yields once (and, when ``max_in_flight`` batches are already on the wire,
    # waits for one to finish) while the requests of the same turn join; then it
    # sends them all in one write on one pooled connection, the session reads
    # merged into one ``HMGET`` or one multi-key script call. A lone request on
    # an idle loop goes out after that single yield, with no timer.

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, "***")
        if len(text) > 300:
            text = text[:300] + "..."
        return StoreUnavailable(
            f"Redis at {self._where} is unavailable ({text})",
            details={"backend": "redis", "url": self._where, "error": type(exc).__name__},
        )

    async def _request(self, request: _Request) -> Any:
        """Send ``request`` in this turn's batch; its reply (or its error, raised)."""
        batch = self._batch
        if batch is not None:
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            batch.append((request, waiter))
            if len(batch) >= MAX_BATCH:
                self._batch = None
            return _unwrap(await waiter)
        if self._in_flight < self._max_in_flight and _loop_idle():
            # Nothing else can run in this turn, so nothing could join: send now.
            self._in_flight += 1
            try:
                return _unwrap((await self._roundtrip([request]))[0])
            finally:
                self._release()
        batch = self._batch = [(request, None)]
        try:
            await asyncio.sleep(0)
            await self._acquire()
        except asyncio.CancelledError:
            if self._batch is batch:
                self._batch = None
            if len(batch) > 1:  # serve the requests that joined from a task of their own
                task = asyncio.ensure_future(self._run(batch[1:], holding=False))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            raise
        if self._batch is batch:
            self._batch = None
        if len(batch) == 1:
            try:
                return _unwrap((await self._roundtrip([request]))[0])
            finally:
                self._release()
        # The replies of the others must arrive even if this caller is cancelled.
        task = asyncio.ensure_future(self._run(batch, holding=True))
        return _unwrap((await asyncio.shield(task))[0])

    async def _acquire(self) -> None:
        """Take one of the ``max_in_flight`` slots, waiting (in order) if none is free."""
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            return
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()  # handed a slot while being cancelled: pass it on
            else:
                self._slot_waiters.remove(slot)
            raise

    def _release(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes straight to the next batch
                return
        self._in_flight -= 1

    async def _run(self, batch: list[_Entry], *, holding: bool) -> list[Any]:
        """Send a batch, hand each waiter its reply; never raises (errors are replies)."""
        requests = [request for request, _ in batch]
        try:
            if not holding:
                await self._acquire()
            try:
                replies = await self._roundtrip(requests)
            finally:
                self._release()
        except StoreUnavailable as exc:
            replies = [exc] * len(batch)
        for (_, waiter), reply in zip(batch, replies, strict=True):
            if waiter is not None and not waiter.done():
                if isinstance(reply, BaseException):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        return replies

    async def _roundtrip(self, requests: list[_Request]) -> list[Any]:
        """One write, one read of all replies; a reply is a value or a ``StoreUnavailable``."""
        gets = [key for key, args in requests if args is None]
        wire: list[tuple[Any, ...]] = []
        if len(gets) == 1:
            wire.append(("HMGET", gets[0], "r", "a", "e"))
        elif gets:
            wire.append(("EVALSHA", MULTI_GET.sha, len(gets), *gets))
        wire.extend(args for _, args in requests if args is not None)
        replies = await self._exchange(wire)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Server restarted or SCRIPT FLUSH: those did not run. Resend them as EVAL
            # with the source, which runs whatever the cache holds by then (another
            # flush cannot race it) and caches the script for the next EVALSHA.
            retry = [("EVAL", _SOURCES[wire[i][1]], *wire[i][2:]) for i in missing]
            for i, reply in zip(missing, await self._exchange(retry), strict=True):
                replies[i] = reply
        out: list[Any] = []
        position = 1 if gets else 0
        read = replies[0] if gets else None
        nth_get = 0
        for _, args in requests:
            if args is not None:
                out.append(self._reply(replies[position]))
                position += 1
            elif len(gets) == 1:
                out.append(self._read_reply(read))
            else:
                out.append(self._multi_reply(read, nth_get))
                nth_get += 1
        return out

    def _reply(self, reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            return self._unavailable(reply)
        return reply

    def _read_reply(self, reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            if str(reply).startswith("WRONGTYPE"):
                return _WRONGTYPE
            return self._unavailable(reply)
        return tuple(reply)

    def _multi_reply(self, reply: Any, index: int) -> Any:
        if isinstance(reply, ResponseError):
            return self._unavailable(reply)
        return tuple(reply[index])

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` at once on a connection and read every reply.

        Error replies come back in place; a transport failure or the ``timeout`` is
        ``StoreUnavailable``. No client-side retry, so a write is never applied twice.
        A connection that failed is closed and handed back to the pool, which opens a
        new one next time: once Redis is back, the store works again by itself.
        """
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._checkout()
                try:
                    await conn.send_packed_command(_pack(commands), check_health=False)
                    replies: list[Any] = []
                    for _ in commands:
                        try:
                            replies.append(await conn.read_response(disable_decoding=True))
                        except ResponseError as exc:
                            replies.append(exc)
                except BaseException:
                    await conn.disconnect()  # replies may be pending: never reuse it
                    await self._pool.release(conn)
                    raise
                self._idle.append(conn)
                return replies
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _checkout(self) -> Connection:
        """A connection for one exchange.

        The store keeps the (at most ``max_in_flight``) connections it used checked
        out of the pool and reuses them directly: the pool's per-command checkout
        (a lock and a probing read that costs a loop iteration) would double the
        client-side cost of a read. An idle connection the server has closed or
        written to meanwhile (restart, timeout, kill) goes back to the pool instead.
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            if _reusable(conn):
                return conn
            await conn.disconnect()
            await self._pool.release(conn)
        return cast(Connection, await self._pool.get_connection())  # type: ignore[no-untyped-call]

    async def _call(self, *args: Any) -> Any:
        return await self._request((None, args))

    async def _eval(self, script: _Script, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """``EVALSHA`` by the script's SHA (``NOSCRIPT`` is recovered from in ``_roundtrip``)."""
        return await self._request((None, ("EVALSHA", script.sha, len(keys), *keys, *args)))

    async def _open(self) -> None:
        """Load the scripts in one round trip, so first calls need no ``NOSCRIPT`` retry."""
        await asyncio.gather(*(self._call("SCRIPT", "LOAD", s.source) for s in SCRIPTS))

    async def _close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._pool.release(conn)
        if self._owns_client:
            await self.client.aclose()

    # ------------------------------------------------------------ reads

    async def _load(self, session_id: str) -> Session | None:
        raw = await self._request((self.session_key(session_id), None))
        return self._decode(session_id, raw)

    def _decode(self, session_id: str, raw: _Raw) -> Session | None:
        record, accessed, expires = raw
        if record is None:
            if accessed is None and expires is None:
                return None
            raise codec.CorruptRecord("session hash has no record")
        if record == b"WRONGTYPE":
            raise codec.CorruptRecord("session key is not a hash")
        session = codec.decode(record)
        try:
            session.last_accessed_at = codec.from_us(int(accessed))  # type: ignore[arg-type]
            session.expires_at = codec.from_us(int(expires)) if expires else None
        except (TypeError, ValueError, OverflowError) as exc:
            raise codec.CorruptRecord(f"bad timestamp field: {exc}") from exc
        session.id = session_id
        return session

    async def _list_by_user(self, user_id: str, scope: Config, now: datetime) -> list[Session]:
        ikey = self.index_key(scope.site_id, user_id)
        flat = await self._eval(LIST, (ikey,), (self._sprefix,))
        sessions = []
        for j in range(0, len(flat), 4):
            session_id = flat[j].decode()
            try:
                session = self._decode(session_id, (flat[j + 1], flat[j + 2], flat[j + 3]))
            except codec.CorruptRecord as exc:  # invisible, as to get()
                logger.warning(
                    "asyncsession: skipped a stored record that is not a valid session: %s",
                    exc,
                    extra={"backend": "redis", "session": short_hash(session_id)},
                )
                continue
            if session is None or session.site_id != scope.site_id:
                continue
            if session.expires_at is None or now < session.expires_at:
                sessions.append(session)
        sessions.sort(key=lambda s: s.created_at)
        return sessions

    # ------------------------------------------------------------ writes

    def _px(self, expires_at: datetime | None) -> int | bytes:
        """Native expiry (ms since the epoch) for a deadline: rounded up, plus the grace."""
        if expires_at is None:
            return b""
        return -(-codec.to_us(expires_at) // 1000) + self.expiry_grace_ms

    async def _insert(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> InsertResult:
        keys = [self.session_key(session.id), self._xkey]
        if session.user_id is not None:
            keys.append(self.index_key(scope.site_id, session.user_id))
        reply = await self._eval(
            INSERT,
            keys,
            (
                record,
                scope.site_id,
                session.version,
                codec.to_us(session.created_at),
                codec.to_us(session.last_accessed_at),
                _us(session.expires_at),
                _us(absolute_deadline(session)),
                self._px(session.expires_at),
                codec.to_us(now),
                scope.max_sessions_per_user,
                scope.eviction,
                self._sprefix,
                session.id,
            ),
        )
        tag = reply[0]
        if tag == b"exists":
            raise InvalidSession("a session with this id already exists")
        if tag == b"limit":
            limit = scope.max_sessions_per_user
            raise SessionLimitExceeded(
                f"user already has {reply[1]} sessions (limit {limit})",
                details={"limit": limit, "count": int(reply[1])},
            )
        if len(reply) == 1:
            return NO_EVICTIONS
        return InsertResult([victim.decode() for victim in reply[1:]])

    async def _replace(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        user = session.user_id
        reply = await self._eval(
            REPLACE,
            (self.session_key(session.id), self._xkey),
            (
                record,
                scope.site_id,
                b"" if user is None else self.index_key(scope.site_id, user),
                session.version - 1,
                session.version,
                codec.to_us(session.created_at),
                codec.to_us(session.last_accessed_at),
                _us(session.expires_at),
                _us(absolute_deadline(session)),
                self._px(session.expires_at),
                codec.to_us(now),
                session.id,
            ),
        )
        return _OUTCOMES[reply]

    async def _touch(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        idle = scope.idle_timeout
        reply = await self._eval(
            TOUCH,
            (self.session_key(session_id), self._xkey),
            (
                scope.site_id,
                codec.to_us(now),
                b"" if idle is None else codec.to_us(now + idle),
                self.expiry_grace_ms,
                session_id,
            ),
        )
        return _OUTCOMES[reply]

    async def _rotate(self, session_id: str, new_id: str, scope: Config, now: datetime) -> Outcome:
        reply = await self._eval(
            ROTATE,
            (self.session_key(session_id), self.session_key(new_id), self._xkey),
            (scope.site_id, codec.to_us(now), session_id, new_id),
        )
        return _OUTCOMES[reply]

    async def _delete(self, session_id: str, scope: Config) -> Outcome:
        reply = await self._eval(
            DELETE, (self.session_key(session_id), self._xkey), (scope.site_id, session_id)
        )
        return _OUTCOMES[reply]

    async def _delete_by_user(
        self, user_id: str, keep: str | None, scope: Config, now: datetime
    ) -> list[str]:
        reply = await self._eval(
            DELETE_BY_USER,
            (self.index_key(scope.site_id, user_id), self._xkey),
            (keep or b"", codec.to_us(now), self._sprefix, scope.site_id),
        )
        return [session_id.decode() for session_id in reply]

    async def _purge(self, now: datetime) -> int:
        """Remove expired sessions ``PURGE_BATCH`` at a time (each batch one script call)."""
        removed = 0
        cutoff = codec.to_us(now)
        while True:
            count, seen = await self._eval(
                PURGE, (self._xkey,), (cutoff, PURGE_BATCH, self._sprefix)
            )
            removed += int(count)
            if int(seen) < PURGE_BATCH:
                return removed

    async def _purge_report(self, now: datetime) -> list[PurgedSession]:
        """``_purge`` that also returns what it removed (for ``expired`` events)."""
        removed: list[PurgedSession] = []
        cutoff = codec.to_us(now)
        while True:
            reply = await self._eval(
                PURGE, (self._xkey,), (cutoff, PURGE_BATCH, self._sprefix, b"1")
            )
            for j in range(2, len(reply), 3):
                site, ikey = reply[j + 1].decode(), reply[j + 2]
                removed.append(PurgedSession(site, self._user_of(ikey), reply[j].decode()))
            if int(reply[1]) < PURGE_BATCH:
                return removed

    def _user_of(self, index_key: bytes) -> str | None:
        """The user id an ``index_key`` was made from (None for '' = anonymous)."""
        if not index_key.startswith(self._iprefix):
            return None
        length, _, rest = index_key[len(self._iprefix) :].partition(b":")
        raw = rest[int(length) + 1 :]
        if b"%" in raw:
            raw = raw.replace(b"%7B", b"{").replace(b"%7D", b"}").replace(b"%25", b"%")
        return raw.decode("utf-8", "surrogatepass")

    async def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """``SCAN`` over the session keys with ``COUNT batch`` (never ``KEYS``), then short
        scripts (``SCAN_KEYS`` keys each, one round trip) read the fields of each batch.
        ``size`` is the stored record (data plus its metadata header)."""
        pattern = _glob_escape(self._sprefix) + b"*"
        skip = len(self._sprefix)
        cursor: int | bytes = 0
        while True:
            cursor, keys = await self._call("SCAN", cursor, "MATCH", pattern, "COUNT", batch)
            if keys:
                chunks = [keys[i : i + SCAN_KEYS] for i in range(0, len(keys), SCAN_KEYS)]
                replies = await asyncio.gather(*(self._eval(SCAN, c, ()) for c in chunks))
                rows = [row for reply in replies for row in reply]
                out = []
                for key, row in zip(keys, rows, strict=True):
                    if not row or not is_valid_session_id(key[skip:].decode()):
                        continue  # not a session, or a longer prefix's key
                    site, ikey, expires, size = row
                    out.append(
                        ScanEntry(
                            site.decode(),
                            self._user_of(ikey) if ikey else None,
                            key[skip:].decode(),
                            int(size),
                            codec.from_us(int(expires)) if expires else None,
                        )
                    )
                yield out
            if int(cursor) == 0:
                return

    async def _scan_estimate(self) -> int | None:
        """Sessions with a deadline (the expiry set); sessions that never expire are not
        counted, so this can be low."""
        return int(await self._call("ZCARD", self._xkey))
