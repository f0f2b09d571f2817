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
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection as Connection
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError, TryAgainError

from .. import codec
from ..changes import Applied, EncodedChanges
from ..config import Config
from ..controls import ControlledStore, with_controls
from ..errors import InvalidSession, SessionLimitExceeded, StoreUnavailable, short_hash
from ..factory import redact
from ..session import Clock, Session, generate_session_id, is_valid_session_id, user_tag
from ..store import (
    NO_EVICTIONS,
    InsertResult,
    Outcome,
    PurgedSession,
    ScanEntry,
    Store,
    absolute_deadline,
)
from . import _redis_rotation as _rotation
from ._redis_apply import APPLY_FIRST, APPLY_LUA, apply_args, parse_reply
from ._redis_cluster import (
    TAG_LENGTH,
    ClusterRouter,
    command_slot,
    follow_sentinels,
    id_slot,
    parse_cluster_url,
    parse_sentinel_url,
    send_and_read,
    slot_tag,
)

logger = logging.getLogger("asyncsession")

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack_command

    _pack_command = _hiredis_pack_command
except ImportError:  # pragma: no cover - redis without the hiredis extra
    _pack_command = None

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
#
# A user index is a sorted set of session ids scored by creation order: a member's
# score is its created_at (us), or one more than the score before it when a session
# was created in the same microsecond as the newest one. Scores therefore sort the
# members by (created_at, insertion), so the oldest session is the first member and
# a create at the limit finds its victim without reading any session; which members
# are live it learns from the expiry set (ZMSCORE) and which keys still exist from
# one EXISTS over all of them. A session created with an older created_at than an
# indexed one, or an update that changes created_at, rescores the index from the
# sessions' own 'c' fields (rare; only with a per-user limit, which bounds the index).

_PRELUDE = """
-- Redis Cluster: while a slot migrates, a key of it that this node no longer holds
-- fails the command. A script reads every key it writes before its first write and
-- stops there with TRYAGAIN: nothing was written, and the client sends it again.
local function settle(err)
  if not string.find(err, 'WRONGTYPE', 1, true) then error({err = 'TRYAGAIN ' .. err}) end
end
local function fields(key, ...)
  local f = redis.pcall('HMGET', key, ...)
  if f.err then settle(f.err) return nil end
  return f
end
-- a key the script will write without having read it: make sure it is here; its
-- PEXPIRETIME (-2: no such key, -1: no expiry)
local function here(key)
  local t = redis.pcall('PEXPIRETIME', key)
  if type(t) == 'table' then settle(t.err) end
  return t
end
-- the key of a session id: prefix..'s:'..id, or in a cluster prefix..'s:{'..tag..'}'..rest
local function key_of(sprefix, id)
  if string.byte(sprefix, -1) == 123 then
    return sprefix .. string.sub(id, 1, 4) .. '}' .. string.sub(id, 5)
  end
  return sprefix .. id
end
local function live(e, now)
  if e == '' then return true end
  local t = tonumber(e)
  return t ~= nil and now < t  -- a damaged deadline is past, never a script error
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
-- the expiry set holds every session that can expire; it outlives the last of them
local function schedule(xkey, e, id, px)
  if e == '' then redis.call('ZREM', xkey, id) return end
  local t = redis.call('PEXPIRETIME', xkey)
  redis.call('ZADD', xkey, e, id)
  if t < tonumber(px) then redis.call('PEXPIREAT', xkey, px) end
end
"""

# Helpers of the scripts that order a user index (INSERT, REPLACE, ROTATE).
_INDEX_FNS = """
-- a command over a list of arguments, in chunks (Lua's unpack has a stack limit)
local function each(cmd, key, list)
  for j = 1, #list, 1000 do
    local k = math.min(j + 999, #list)
    if key then redis.call(cmd, key, unpack(list, j, k))
    else redis.call(cmd, unpack(list, j, k)) end
  end
end
-- how many of these keys exist (one EXISTS per chunk); like fields, never half a slot
local function count(keys)
  local n = 0
  for j = 1, #keys, 1000 do
    local r = redis.pcall('EXISTS', unpack(keys, j, math.min(j + 999, #keys)))
    if type(r) == 'table' then settle(r.err) return 0 end
    n = n + r
  end
  return n
end
local function exists(key)
  local r = redis.pcall('EXISTS', key)
  if type(r) == 'table' then settle(r.err) return 0 end
  return r
end
local function score_of(n) return string.format('%d', n) end
-- ZADD arguments that rescore the index `ids` (in index order, minus `skip`) by
-- (created_at, index order): each member's created_at read from its session (the
-- session `id` taken as created at `c`), or one more than the score before it when
-- that is not greater. Reads only; damaged created_at sorts first.
local function rescore(sprefix, ids, skip, id, c)
  local rows = {}
  for j, mid in ipairs(ids) do
    if not skip[mid] then
      local at = c
      if mid ~= id then
        local f = fields(key_of(sprefix, mid), 'c')
        at = tonumber(f and f[1]) or 0
      end
      rows[#rows + 1] = {at, j, mid}
    end
  end
  table.sort(rows, function(p, q)
    if p[1] ~= q[1] then return p[1] < q[1] end
    return p[2] < q[2]
  end)
  local out, prev = {}, nil
  for _, row in ipairs(rows) do
    local s = row[1]
    if prev and s <= prev then s = prev + 1 end
    out[#out + 1] = score_of(s)
    out[#out + 1] = row[3]
    prev = s
  end
  return out
end
"""

# KEYS: session, expiry set, [user index]
# ARGV: record, site, version, created, accessed, expires, absolute, px, now, limit,
#       eviction, session key prefix, id
# At the limit: the index (ZRANGE), the members' deadlines (ZMSCORE on the expiry
# set), whether their keys exist (one EXISTS), then each victim's 'i' (is it still
# this user's session?) before it is deleted; no other session is read ('lru' and
# 'reject' read each live member's 'a' and 'i': last access, exact count).
_INSERT = """
local skey, xkey, ikey = KEYS[1], KEYS[2], KEYS[3]
local site, e, px, now = ARGV[2], ARGV[6], ARGV[8], tonumber(ARGV[9])
local limit, eviction, sprefix, id = tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13]
if redis.call('EXISTS', skey) == 1 then return {'exists'} end
local evicted = {'ok'}
local drop, victims, skip = {}, {}, {}  -- index members to remove; sessions to delete
local zadd, kept, t  -- the new member's ZADD arguments; members the index keeps
if ikey and limit > 0 then
  -- with a limit the index stays small: read it whole, in eviction order
  local m = redis.call('ZRANGE', ikey, 0, -1, 'WITHSCORES')
  local ids = {}
  for j = 1, #m, 2 do ids[#ids + 1] = m[j] end
  if #ids >= limit then
    local keys = {}
    for j, mid in ipairs(ids) do keys[j] = key_of(sprefix, mid) end
    if eviction == 'lru' or eviction == 'reject' then
      -- each session read: live, still this user's, last access (lru), exact count
      local alive = {}
      for j, mid in ipairs(ids) do
        local f = fields(keys[j], 'e', 'a', 'i')
        if not f or not f[1] or f[3] ~= ikey then
          drop[#drop + 1] = mid  -- gone (native expiry, DEL, maxmemory) or not ours
        elseif live(f[1], now) then
          alive[#alive + 1] = {mid, tonumber(f[2]) or 0}  -- damaged access: least recent
        end
      end
      local excess = #alive - limit + 1
      if excess > 0 and eviction == 'reject' then
        if #drop > 0 then each('ZREM', ikey, drop) end
        return {'limit', #alive}
      end
      -- least recently used first (a selection pass per victim); among equals the
      -- first in index order
      for _ = 1, excess do
        local best
        for q, cand in ipairs(alive) do
          if not cand[3] and (not best or cand[2] < alive[best][2]) then best = q end
        end
        alive[best][3] = true
        victims[#victims + 1] = alive[best][1]
      end
    else
      -- oldest first: no session is read but the victims. Live: by the deadline in
      -- the expiry set (expired ones stay indexed until purged, uncounted); gone
      -- (native expiry, DEL, maxmemory): one EXISTS over all of them, then per key
      -- only when one is missing
      local due = {}
      for j = 1, #ids, 1000 do
        local part = redis.call('ZMSCORE', xkey, unpack(ids, j, math.min(j + 999, #ids)))
        for q = 1, #part do due[j + q - 1] = part[q] end
      end
      local gone = count(keys) < #ids
      local live_at = {}
      for j, mid in ipairs(ids) do
        if gone and exists(keys[j]) == 0 then
          drop[#drop + 1] = mid
        elseif not due[j] or now < tonumber(due[j]) then
          live_at[#live_at + 1] = j
        end
      end
      -- the first live members go; one that is no longer this user's session is
      -- dropped from the index instead, which lowers the count as much
      for q = 1, #live_at - limit + 1 do
        local j = live_at[q]
        local f = fields(keys[j], 'i')
        if f and f[1] == ikey then victims[#victims + 1] = ids[j] else drop[#drop + 1] = ids[j] end
      end
    end
  end
  for _, mid in ipairs(drop) do skip[mid] = true end
  for _, mid in ipairs(victims) do skip[mid] = true end
  kept = #ids - #drop - #victims
  -- the new member's score: its created_at when that sorts it after every member
  local c, last = tonumber(ARGV[4]), tonumber(m[#m])
  if not last or c > last then
    zadd = {score_of(c), id}
  else
    local f = fields(key_of(sprefix, ids[#ids]), 'c')
    local lc = tonumber(f and f[1])
    if not lc or c >= lc then
      zadd = {score_of(last + 1), id}  -- created in the newest one's microsecond
    else
      ids[#ids + 1] = id  -- created before an indexed session: rescore them all
      zadd = rescore(sprefix, ids, skip, id, c)
    end
  end
elseif ikey then
  -- no limit: the index may be long; drop up to two gone members from the old end
  local m = redis.call('ZRANGE', ikey, 0, 1)
  for j = 1, #m do
    local f = fields(key_of(sprefix, m[j]), 'i')
    if not f or f[1] ~= ikey then drop[#drop + 1] = m[j] end
  end
  local top = redis.call('ZRANGE', ikey, -1, -1, 'WITHSCORES')
  local c, last = tonumber(ARGV[4]), tonumber(top[2])
  if last and c <= last then c = last + 1 end
  zadd = {score_of(c), id}
end
-- every key read: the writes begin
if #drop > 0 then each('ZREM', ikey, drop) end
if #victims > 0 then
  local vkeys = {}
  for j, victim in ipairs(victims) do
    vkeys[j] = key_of(sprefix, victim)
    evicted[#evicted + 1] = victim
  end
  each('DEL', nil, vkeys)
  each('ZREM', ikey, victims)
  each('ZREM', xkey, victims)
end
if ikey then
  redis.call('HSET', skey, 'r', ARGV[1], 's', site, 'n', ARGV[3], 'c', ARGV[4], 'a', ARGV[5],
    'e', e, 'x', ARGV[7], 'i', ikey)
  if not kept then t = redis.call('PEXPIRETIME', ikey) end
  each('ZADD', ikey, zadd)
  -- the index outlives its sessions; persistent while it holds one that never expires
  if not kept then
    outlive(ikey, px, t)
  elseif px == '' then
    redis.call('PERSIST', ikey)
  elseif kept == 0 then
    redis.call('PEXPIREAT', ikey, px)
  else
    redis.call('PEXPIREAT', ikey, px, 'GT')
  end
else
  redis.call('HSET', skey, 'r', ARGV[1], 's', site, 'n', ARGV[3], 'c', ARGV[4], 'a', ARGV[5],
    'e', e, 'x', ARGV[7])
end
if e == '' then
  redis.call('ZREM', xkey, id)
else
  redis.call('PEXPIREAT', skey, px)
  redis.call('ZADD', xkey, e, id)
  -- the expiry set outlives its sessions (GT leaves a new, persistent set alone)
  if redis.call('PEXPIREAT', xkey, px, 'GT') == 0 and redis.call('PEXPIRETIME', xkey) == -1 then
    redis.call('PEXPIREAT', xkey, px)
  end
end
return evicted
"""

# KEYS: session, expiry set
# ARGV: record, site, index key ('' anonymous), expected version, new version,
#       created, accessed, expires, absolute, px, now, id, per-user limit, key prefix
#
# The common update (same site, user and version, live, same deadline and creation
# time: no idle timeout moved it) needs only the hash written. It runs first, before
# the helpers below are defined, which is 2-3 us less Redis time per update (20-25%
# of the script; measured with INFO commandstats). Anything else (a missing or
# damaged field, a read error, another outcome) falls through to the full script,
# which reads the fields again and decides.
_REPLACE_FIRST = """
local f0 = redis.pcall('HMGET', KEYS[1], 's', 'i', 'n', 'e', 'c')
if f0[1] == ARGV[2] and (f0[2] or '') == ARGV[3] and f0[3] == ARGV[4]
    and f0[4] == ARGV[8] and f0[5] == ARGV[6]
    and (f0[4] == '' or tonumber(ARGV[11]) < (tonumber(f0[4]) or 0)) then
  redis.call('HSET', KEYS[1], 'r', ARGV[1], 'n', ARGV[5], 'a', ARGV[7], 'x', ARGV[9])
  return 'ok'
end
"""

_REPLACE = """
local skey, xkey = KEYS[1], KEYS[2]
local e, px = ARGV[8], ARGV[10]
local f = fields(skey, 's', 'i', 'n', 'e', 'c')
if not f or not f[1] or not f[3] or not f[4] then return 'missing' end
if f[1] ~= ARGV[2] then return 'other_site' end
if not live(f[4], tonumber(ARGV[11])) then return 'expired' end
if (f[2] or '') ~= ARGV[3] then return 'user_changed' end
if f[3] ~= ARGV[4] then return 'conflict' end
local t, zadd
if f[2] then
  t = here(f[2])
  if f[5] ~= ARGV[6] and tonumber(ARGV[13]) > 0 then
    -- created_at changed: the index order follows (the limit keeps the index small)
    local ids = redis.call('ZRANGE', f[2], 0, -1)
    zadd = rescore(ARGV[14], ids, {}, ARGV[12], tonumber(ARGV[6]) or 0)
  end
end
redis.call('HSET', skey, 'r', ARGV[1], 'n', ARGV[5], 'c', ARGV[6], 'a', ARGV[7], 'e', e,
  'x', ARGV[9])
expire(skey, px)
schedule(xkey, e, ARGV[12], px)
if f[2] then
  if zadd and #zadd > 0 then each('ZADD', f[2], zadd) end
  outlive(f[2], px, t)
end
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
if f[4] and f[4] ~= '' then
  local x = tonumber(f[4])
  if not x then return 'missing' end  -- a damaged absolute deadline is never extended
  if x < tonumber(sliding) then e = f[4] end
end
local t
if f[2] then t = here(f[2]) end
redis.call('HSET', skey, 'a', now, 'e', e)
local px = string.format('%d', math.floor((tonumber(e) + 999) / 1000) + tonumber(ARGV[4]))
redis.call('PEXPIREAT', skey, px)
schedule(xkey, e, ARGV[5], px)
if f[2] then outlive(f[2], px, t) end
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
if f[2] then here(f[2]) end
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
local ids = redis.call('ZRANGE', ikey, 0, -1)
local found = {}
for j, id in ipairs(ids) do
  if id ~= keep then found[j] = fields(key_of(sprefix, id), 's', 'e', 'i') or false end
end
local deleted = {}
for j, id in ipairs(ids) do
  if id ~= keep then
    local f = found[j]
    if f and f[1] == site and f[3] == ikey then
      redis.call('DEL', key_of(sprefix, id))
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
local out, stale = {}, {}
for _, id in ipairs(redis.call('ZRANGE', ikey, 0, -1)) do
  local f = fields(key_of(sprefix, id), 'r', 'a', 'e', 'i')
  if not f or not f[1] or f[4] ~= ikey then
    stale[#stale + 1] = id
  else
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2] or ''
    out[#out + 1] = f[3] or ''
  end
end
for _, id in ipairs(stale) do redis.call('ZREM', ikey, id) end
return out
"""

# Purge one expiry set: up to `limit` due entries (reads first, then writes). Returns
# sessions removed and entries examined; with `report`, appends the id, site and index
# key ('' anonymous) of each removed session to `rows`.
_PURGE_FN = """
local function purge(xkey, now, limit, sprefix, report, rows)
  local ids = redis.call('ZRANGEBYSCORE', xkey, '-inf', now, 'LIMIT', 0, limit)
  local found = {}
  for j, id in ipairs(ids) do
    local f = fields(key_of(sprefix, id), 'e', 'i', 's')
    if f and f[2] then here(f[2]) end
    found[j] = f or false
  end
  local removed = 0
  for j, id in ipairs(ids) do
    local f = found[j]
    if f and f[1] and f[1] ~= '' and not live(f[1], tonumber(now)) then
      redis.call('DEL', key_of(sprefix, id))
      if f[2] then redis.call('ZREM', f[2], id) end
      redis.call('ZREM', xkey, id)
      removed = removed + 1
      if report then
        rows[#rows + 1] = id
        rows[#rows + 1] = f[3] or ''
        rows[#rows + 1] = f[2] or ''
      end
    elseif f and f[1] and f[1] ~= '' then
      redis.call('ZADD', xkey, f[1], id)
    else
      redis.call('ZREM', xkey, id)
    end
  end
  return removed, #ids
end
"""

# KEYS: expiry set
# ARGV: now, batch size, session key prefix, [report: '1']
# Returns {sessions removed, expiry entries examined}, then with report the id,
# site and index key ('' anonymous) of each removed session.
_PURGE = (
    _PURGE_FN
    + """
local rows = {}
local removed, seen = purge(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4] == '1', rows)
local out = {removed, seen}
for _, r in ipairs(rows) do out[#out + 1] = r end
return out
"""
)

# Redis Cluster, no KEYS: the expiry sets of many slots of the node it is sent to, in
# one call (keys of several slots, all local: allowed to scripts without flags).
# ARGV: now, budget (entries examined), session key prefix, report ('1' or ''),
#       expiry key prefix, slot tags...
# Each slot is purged as by PURGE; a slot the node does not hold, or holds half of (a
# migration), fails inside pcall before any write of it and is skipped. Returns
# {removed, resume (position of the slot tag to start again from, 0 = done),
# skipped count, skipped positions..., then with report id, site, index key...}.
_PURGE_SLOTS = (
    _PURGE_FN
    + """
local now, budget, sprefix, xprefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[5]
local report = ARGV[4] == '1'
local removed, resume, skipped, rows = 0, 0, {}, {}
for i = 6, #ARGV do
  local ok, n, seen = pcall(purge, xprefix .. ARGV[i] .. '}', now, budget, sprefix, report, rows)
  if not ok then
    skipped[#skipped + 1] = i - 5
  else
    removed = removed + n
    if seen >= budget then
      resume = i - 5
      break
    end
    budget = budget - seen
  end
end
local out = {removed, resume, #skipped}
for _, position in ipairs(skipped) do out[#out + 1] = position end
for _, r in ipairs(rows) do out[#out + 1] = r end
return out
"""
)

# Redis Cluster, no KEYS: sessions scheduled in the expiry sets of the given slots of
# this node (those it does not hold count 0). ARGV: expiry key prefix, slot tags...
_COUNT_SLOTS = """
local n = 0
for i = 2, #ARGV do
  local c = redis.pcall('ZCARD', ARGV[1] .. ARGV[i] .. '}')
  if type(c) == 'number' then n = n + c end
end
return n
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

    def __init__(self, body: str, *, prelude: bool = True, first: str = "") -> None:
        self.source = (first + (_PRELUDE if prelude else "") + body).encode()
        self.sha = hashlib.sha1(self.source).hexdigest()


INSERT = _Script(_INDEX_FNS + _INSERT)
REPLACE = _Script(_INDEX_FNS + _REPLACE, first=_REPLACE_FIRST)
TOUCH = _Script(_TOUCH)
ROTATE = _Script(_rotation.ROTATE_LUA)  # _ROTATE plus the rotation record
ROTATE_INTO = _Script(
    _INDEX_FNS
    + "local function insert(KEYS, ARGV)\n"
    + _INSERT
    + "\nend\n"
    + _rotation.ROTATE_INTO_LUA
)
RETIRE = _Script(_rotation.RETIRE_LUA)
DELETE = _Script(_DELETE)
DELETE_BY_USER = _Script(_DELETE_BY_USER)
LIST = _Script(_LIST)
PURGE = _Script(_PURGE)
PURGE_SLOTS = _Script(_PURGE_SLOTS)
COUNT_SLOTS = _Script(_COUNT_SLOTS, prelude=False)
MULTI_GET = _Script(_MULTI_GET, prelude=False)
SCAN = _Script(_SCAN, prelude=False)
APPLY = _Script(APPLY_LUA, first=APPLY_FIRST)
SCRIPTS = (
    APPLY,
    INSERT,
    REPLACE,
    TOUCH,
    ROTATE,
    DELETE,
    DELETE_BY_USER,
    LIST,
    PURGE,
    PURGE_SLOTS,
    COUNT_SLOTS,
    MULTI_GET,
    SCAN,
    ROTATE_INTO,
    RETIRE,
)

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
_PURGED = PurgedSession("", None, "")  # counted, not reported

MAX_BATCH = 32
"""Requests one pipeline carries at most; more in the same turn start another. Small
enough that under load several batches are in flight (up to ``max_in_flight``) and
the client builds and parses one while Redis runs another: at 64 concurrent tasks a
cap of 32 instead of 512 made creates 1.4x and reads 1.4x faster on 2 cores (both
sides were idle half the time, taking turns on one big batch)."""


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands in RESP, as one buffer (our arguments are only bytes, str and int).

    hiredis's ``pack_command`` (C; hiredis comes with ``redis[hiredis]``) when it is
    installed: the same bytes in half the time (2.1 vs 4.4 us for an update)."""
    if _pack_command is not None:
        if len(commands) == 1:
            return _pack_command(commands[0])
        return b"".join([_pack_command(command) for command in commands])
    return _pack_python(commands)


def _pack_python(commands: list[tuple[Any, ...]]) -> bytes:
    """``_pack`` without hiredis."""
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
    if isinstance(pool, SentinelConnectionPool):
        return f"redis+sentinel://.../{pool.service_name}"
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisStore(Store):
    """Redis backend (the seed's production backend). Needs Redis >= 7.0.

    One server (``redis.asyncio.Redis``, also behind Sentinel: ``from_sentinel``) or a
    Redis Cluster (``redis.asyncio.cluster.RedisCluster``, ``redis+cluster://`` URLs),
    with the same atomicity: on a cluster every script's keys share one hash slot.
    """

    backend_name = "redis"

    expiry_grace_ms: ClassVar[int] = 60_000
    """How long after its logical deadline Redis itself drops a session key: a
    backstop for when ``purge_expired`` does not run, with room for clock skew
    between app servers and Redis."""

    max_in_flight: ClassVar[int] = 8
    """Batches on the wire at once; more requests wait and join the next batch."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(config, clock=clock)
        self.timeout = timeout
        self.client = client
        self._owns_client = False
        self._sentinel: Sentinel | None = None
        self._service = ""
        prefix = self.config.key_prefix.encode()
        self._router: ClusterRouter | None = None
        if isinstance(client, RedisCluster):  # (Config refuses braces in key_prefix)
            self._router = ClusterRouter(
                client, _SOURCES, self._unavailable, timeout=timeout, pack=_pack
            )
            nodes = client.nodes_manager
            self._where = "redis+cluster://" + ",".join(nodes.startup_nodes)
            self._password: str | None = nodes.connection_kwargs.get("password")
            # {prefix}s:{tag}rest, {prefix}u:{tag}:..., {prefix}x:{slot tag}
            self._sprefix = prefix + b"s:{"
            self._iprefix = prefix + b"u:{"
            self._xprefix = prefix + b"x:{"
            self._max_in_flight = max(1, self.max_in_flight)
        elif isinstance(client, Redis):
            self._pool: ConnectionPool = client.connection_pool
            self._where = _describe(self._pool)
            self._password = self._pool.connection_kwargs.get("password")
            self._sprefix = prefix + b"s:"
            self._iprefix = prefix + b"u:"
            self._xkey = prefix + b"expiry"
            self._max_in_flight = max(1, min(self.max_in_flight, self._pool.max_connections))
        else:
            raise TypeError(
                "RedisStore needs a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster, "
                f"not {type(client).__name__}"
            )
        self._batch: list[_Entry] | None = None
        self._in_flight = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle: list[Connection] = []
        # exchanges on open connections and their deadlines (see _exchange_watched)
        self._deadlines: dict[Connection, float] = {}
        self._timed_out: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_loop: asyncio.AbstractEventLoop | None = None

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
        keyword arguments go to ``redis.asyncio.Redis.from_url``.
        ``redis+cluster://[[user]:password@]host:port[,host:port...]`` opens a Redis
        Cluster client on those startup nodes;
        ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` asks
        those sentinels for the primary of ``service`` (see ``from_sentinel``). Both
        accept ``?socket_timeout=``, ``socket_connect_timeout=``, ``max_connections=``,
        ``ssl=true``. ``timeout`` bounds each round trip (``None``: no bound).
        """
        scheme = url.split(":", 1)[0].lower()
        if scheme == "redis+sentinel":
            try:
                sentinels, service, parsed = parse_sentinel_url(url)
            except ValueError as exc:
                raise ValueError(f"{exc} (got {redact(url)!r})") from None
            store = cls.from_sentinel(
                sentinels, service, config, clock=clock, timeout=timeout, **parsed, **redis_options
            )
            store._where = redact(url)
            return store
        if scheme not in ("redis", "rediss", "unix", "redis+cluster"):
            raise ValueError(
                f"RedisStore does not support {scheme}:// (got {redact(url)!r}); use redis://, "
                "rediss://, unix://, redis+cluster:// or redis+sentinel://"
            )
        if scheme == "redis+cluster":
            try:
                nodes, parsed = parse_cluster_url(url)
            except ValueError as exc:
                raise ValueError(f"{exc} (got {redact(url)!r})") from None
            options = {**DEFAULT_REDIS_OPTIONS, **parsed, **redis_options}
            startup = [ClusterNode(host, port) for host, port in nodes]
            cluster = cls(
                RedisCluster(startup_nodes=startup, **options), config, clock=clock, timeout=timeout
            )
            cluster._owns_client = True
            cluster._where = redact(url)
            return cluster
        options = {**DEFAULT_REDIS_OPTIONS, **redis_options}
        client = Redis.from_url(url, **options)
        store = cls(client, config, clock=clock, timeout=timeout)
        store._owns_client = True
        store._where = redact(url)
        return store

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        sentinel_kwargs: dict[str, Any] | None = None,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on the primary that ``sentinels`` name for ``service_name``.

        Every connection asks the sentinels for the current primary, and once the store
        is open (``async with``) it listens for the sentinels' ``+switch-master`` and drops
        its connections to a demoted primary at once, so after a failover it follows the
        new primary. Reads go to the primary too (sessions need read-your-writes).
        ``redis_options`` configure the connections to the primary (``password``,
        ``db``...); ``sentinel_kwargs`` those to the sentinels (default: the ``socket_*``
        options of ``redis_options``).
        """
        if not sentinels:
            raise ValueError("from_sentinel needs at least one (host, port) sentinel")
        options = {**DEFAULT_REDIS_OPTIONS, **redis_options}
        if sentinel_kwargs is None:
            sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(sentinels), sentinel_kwargs=sentinel_kwargs, **options
        )
        store = cls(sentinel.master_for(service_name), config, clock=clock, timeout=timeout)
        store._owns_client = True
        store._sentinel = sentinel
        store._service = service_name
        hosts = ",".join(f"{host}:{port}" for host, port in sentinels)
        store._where = f"redis+sentinel://{hosts}/{service_name}"
        return store

    @classmethod
    def with_controls(
        cls,
        client: Redis | RedisCluster,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        **options: Any,
    ) -> ControlledStore:
        """A controlled store over ``client``: the seed's ``NewWithControls``."""
        return with_controls(cls(client, config, clock=clock), config, **options)

    # ------------------------------------------------------------------ keys

    def session_key(self, session_id: str) -> bytes:
        """``{prefix}s:{session_id}`` (ids are validated: [A-Za-z0-9_-] only); on a
        cluster ``{prefix}s:{{tag}}{rest}``, the id's first 4 characters as hash tag."""
        if self._router is None:
            return self._sprefix + session_id.encode()
        raw = session_id.encode()
        return self._sprefix + raw[:TAG_LENGTH] + b"}" + raw[TAG_LENGTH:]

    def index_key(self, site_id: str, user_id: str) -> bytes:
        """``{prefix}u:{len(site)}:{site}:{user}``: injective in (site, user). On a
        cluster ``{prefix}u:{{user_tag}}:{len(site)}:{site}:{user}``: the slot of the
        user's sessions."""
        site = site_id.encode()
        if self._router is None:
            return b"%s%d:%s:%s" % (self._iprefix, len(site), site, _escape_user(user_id))
        return b"%s%s}:%d:%s:%s" % (
            self._iprefix,
            user_tag(user_id).encode(),
            len(site),
            site,
            _escape_user(user_id),
        )

    @property
    def expiry_key(self) -> bytes:
        """``{prefix}expiry``: sorted set of session ids by deadline (us), for purging.
        A cluster has one per hash slot: ``expiry_key_for``."""
        if self._router is not None:
            raise AttributeError("on Redis Cluster the expiry set is per slot: expiry_key_for(id)")
        return self._xkey

    def expiry_key_for(self, session_id: str) -> bytes:
        """The expiry set ``session_id`` is scheduled in: ``expiry_key`` on one server,
        ``{prefix}x:{{slot tag}}`` (the session's hash slot) on a cluster."""
        if self._router is None:
            return self._xkey
        return self._xprefix + slot_tag(id_slot(session_id)) + b"}"

    def _id_of(self, session_key: bytes) -> str | None:
        """The session id a key under the session prefix names (None: not an id)."""
        rest = session_key[len(self._sprefix) :].decode("utf-8", "replace")
        if self._router is not None:
            tag, brace, tail = rest.partition("}")
            if not brace or len(tag) != TAG_LENGTH:
                return None
            rest = tag + tail
        return rest if is_valid_session_id(rest) else None

    def _rotated_id(self, session_id: str) -> str:
        """On a cluster the new id keeps the hash tag (the slot of the session and of
        its user's index) and gets 43 fresh random characters."""
        if self._router is None:
            return super()._rotated_id(session_id)
        return session_id[:TAG_LENGTH] + generate_session_id()

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
        if self._router is not None:
            # A cluster answers each primary's part of the batch as soon as that primary
            # replies; the leader waits for its own part only, like the others.
            leader: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            batch[0] = (request, leader)
            task = asyncio.ensure_future(self._run(batch, holding=True))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return _unwrap(await leader)
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
                if self._router is None:
                    replies = await self._roundtrip(requests)
                else:
                    replies = await self._cluster_run(batch)
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
        if self._router is not None:
            return await self._cluster_roundtrip(requests)
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

    async def _cluster_run(self, batch: list[_Entry]) -> list[Any]:
        """A batch split by primary: each part goes on its own, and its callers get their
        replies as soon as that primary answers, not when the slowest one does."""
        assert self._router is not None
        nodes = self._router.nodes
        parts: dict[Any, list[int]] = {}
        for i, ((key, args), _) in enumerate(batch):
            try:
                slot = command_slot(args) if args is not None else key_slot(key or b"")
                node = nodes.get_node_from_slot(slot)
            except Exception:
                node = None  # no slot map yet: the router learns it
            parts.setdefault(node, []).append(i)
        if len(parts) == 1:
            return await self._cluster_roundtrip([request for request, _ in batch])
        replies: list[Any] = [None] * len(batch)

        async def part(indexes: list[int]) -> None:
            got = await self._cluster_roundtrip([batch[i][0] for i in indexes])
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply
                waiter = batch[i][1]
                if waiter is not None and not waiter.done():
                    if isinstance(reply, BaseException):
                        waiter.set_exception(reply)
                    else:
                        waiter.set_result(reply)

        await asyncio.gather(*(part(indexes) for indexes in parts.values()))
        return replies

    async def _cluster_roundtrip(self, requests: list[_Request]) -> list[Any]:
        """One pipeline per primary (all at once); reads are ``HMGET`` each, as a
        multi-key script cannot span slots."""
        assert self._router is not None
        wire = [("HMGET", key, "r", "a", "e") if args is None else args for key, args in requests]
        replies = await self._router.exchange(wire)
        out: list[Any] = []
        for (_, args), reply in zip(requests, replies, strict=True):
            if isinstance(reply, StoreUnavailable):
                out.append(reply)
            elif args is None:
                out.append(self._read_reply(reply))
            else:
                out.append(self._reply(reply))
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
        idle = self._idle
        if idle and self.timeout is not None and _reusable(idle[-1]):
            return await self._exchange_watched(idle.pop(), commands)
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._checkout()
                return await self._talk(conn, commands)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _talk(self, conn: Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` on ``conn`` and read every reply; ``conn`` goes back to the
        idle list after, or is closed and handed back to the pool on any failure."""
        try:
            replies = await send_and_read(conn, _pack(commands), len(commands))
        except BaseException:
            await conn.disconnect()  # replies may be pending: never reuse it
            await self._pool.release(conn)
            raise
        self._idle.append(conn)
        return replies

    async def _exchange_watched(
        self, conn: Connection, commands: list[tuple[Any, ...]]
    ) -> list[Any]:
        """``_exchange`` on an open connection, bounded by the store's watchdog instead
        of an ``asyncio.timeout`` (which costs a timer per exchange: about 10 us of CPU
        per round trip here). Past its deadline the watchdog aborts the connection,
        which ends the exchange with ``StoreUnavailable`` as a timeout would."""
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        deadlines[conn] = loop.time() + cast(float, self.timeout)
        if self._watchdog is None or self._watchdog_loop is not loop:
            self._watchdog = loop.call_at(deadlines[conn], self._watch)
            self._watchdog_loop = loop
        try:
            return await self._talk(conn, commands)
        except (RedisError, OSError) as exc:
            if conn not in self._timed_out:
                raise self._unavailable(exc) from exc
            self._timed_out.discard(conn)
            timeout = TimeoutError(f"no reply within {self.timeout} s")
            timeout.__cause__ = exc  # the aborted connection
            raise self._unavailable(timeout) from timeout
        finally:
            deadlines.pop(conn, None)

    def _watch(self) -> None:
        """Abort every watched exchange past its deadline; re-arm for the next one.
        Deadlines are in start order (one ``timeout`` for all), so the first is due
        first."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        self._watchdog = None
        for conn, deadline in list(deadlines.items()):
            if deadline > now:
                self._watchdog = loop.call_at(deadline, self._watch)
                return
            del deadlines[conn]
            self._timed_out.add(conn)
            writer = getattr(conn, "_writer", None)
            if writer is not None:
                writer.transport.abort()

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
        """Load the scripts in one round trip (on a cluster: the slot map, then the
        scripts on every primary), so first calls need no ``NOSCRIPT`` retry. Behind
        Sentinel, start following ``+switch-master``."""
        if self._router is None:
            await asyncio.gather(*(self._call("SCRIPT", "LOAD", s.source) for s in SCRIPTS))
        else:
            router = self._router
            await router.initialize()
            load = [("SCRIPT", "LOAD", s.source) for s in SCRIPTS]
            await asyncio.gather(*(router.on_node(node, load) for node in router.primaries()))
        if self._sentinel is not None and not any(
            t.get_name() == "asyncsession-sentinel" for t in self._tasks
        ):
            follow = asyncio.ensure_future(
                follow_sentinels(self._sentinel, self._service, self._switched)
            )
            follow.set_name("asyncsession-sentinel")
            self._tasks.add(follow)
            follow.add_done_callback(self._tasks.discard)

    async def _switched(self) -> None:
        """A sentinel promoted a new primary: drop every connection (in use or not) to
        the old one; the next request connects to the new primary."""
        await self._pool.disconnect(inuse_connections=True)

    async def _close(self) -> None:
        for task in self._tasks:
            if task.get_name() == "asyncsession-sentinel":
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._pool.release(conn)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._router is not None:
            await self._router.aclose()
        if self._owns_client:
            await self.client.aclose()
        if self._sentinel is not None and self._owns_client:
            for client in self._sentinel.sentinels:
                await client.aclose()

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
        try:
            a = int(accessed)  # type: ignore[arg-type]
            e = int(expires) if expires else None
        except (TypeError, ValueError) as exc:
            raise codec.CorruptRecord(f"bad timestamp field: {exc}") from exc
        session = codec.decode(record, a, e)
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
        user = session.user_id
        if (
            self._router is not None
            and user is not None
            and session.id[:TAG_LENGTH] != user_tag(user)
        ):
            raise InvalidSession(
                "on Redis Cluster a user session's id must start with its user's tag (the "
                "hash slot of the user's index): mint it with new_session(user_id, ...) or "
                "generate_session_id(user_id)",
                details={"user_tag": user_tag(user)},
            )
        keys = [self.session_key(session.id), self.expiry_key_for(session.id)]
        if user is not None:
            keys.append(self.index_key(scope.site_id, user))
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
            (self.session_key(session.id), self.expiry_key_for(session.id)),
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
                scope.max_sessions_per_user,
                self._sprefix,
            ),
        )
        return _OUTCOMES[reply]

    async def _touch(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        idle = scope.idle_timeout
        reply = await self._eval(
            TOUCH,
            (self.session_key(session_id), self.expiry_key_for(session_id)),
            (
                scope.site_id,
                codec.to_us(now),
                b"" if idle is None else codec.to_us(now + idle),
                self.expiry_grace_ms,
                session_id,
            ),
        )
        return _OUTCOMES[reply]

    async def _apply(
        self,
        session_id: str,
        changes: EncodedChanges,
        scope: Config,
        now: datetime,
        limit: int,
        base: Session | None = None,
    ) -> Applied | Outcome:
        """One script edits the record in place (see ``_redis_apply``)."""
        keys = (self.session_key(session_id), self.expiry_key_for(session_id))
        args = apply_args(session_id, changes, scope, now, limit, self.expiry_grace_ms, base)
        return parse_reply(await self._eval(APPLY, keys, args), now)

    async def _rotate(self, session_id: str, new_id: str, scope: Config, now: datetime) -> Outcome:
        return await _rotation.rotate(self, session_id, new_id, scope, now)

    async def _rotated(self, session_id: str, scope: Config, now: datetime) -> bool:
        return await _rotation.rotated(self, session_id, scope, now)

    async def _rotate_into(
        self,
        session_id: str,
        version: int | None,
        session: Session,
        record: bytes,
        scope: Config,
        now: datetime,
    ) -> InsertResult | Outcome:
        return await _rotation.rotate_into(self, session_id, version, session, record, scope, now)

    async def _delete(self, session_id: str, scope: Config) -> Outcome:
        reply = await self._eval(
            DELETE,
            (self.session_key(session_id), self.expiry_key_for(session_id)),
            (scope.site_id, session_id),
        )
        return _OUTCOMES[reply]

    async def _delete_by_user(
        self, user_id: str, keep: str | None, scope: Config, now: datetime
    ) -> list[str]:
        reply = await self._eval(
            DELETE_BY_USER,
            (
                self.index_key(scope.site_id, user_id),
                self._xkey if self._router is None else self.expiry_key_for(user_tag(user_id)),
            ),
            (keep or b"", codec.to_us(now), self._sprefix, scope.site_id),
        )
        return [session_id.decode() for session_id in reply]

    async def _purge(self, now: datetime) -> int:
        """Remove expired sessions ``PURGE_BATCH`` at a time (each batch one script call).
        On a cluster every slot's expiry set, on every primary, batched per node."""
        if self._router is None:
            removed = 0
            cutoff = codec.to_us(now)
            while True:
                count, seen = await self._eval(
                    PURGE, (self._xkey,), (cutoff, PURGE_BATCH, self._sprefix)
                )
                removed += int(count)
                if int(seen) < PURGE_BATCH:
                    return removed
        return len(await self._purge_slots(now, report=False))

    async def _purge_report(self, now: datetime) -> list[PurgedSession]:
        """``_purge`` that also returns what it removed (for ``expired`` events)."""
        if self._router is not None:
            return await self._purge_slots(now, report=True)
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

    async def _purge_slots(self, now: datetime, *, report: bool) -> list[PurgedSession]:
        """Purge every slot's expiry set: one script call per primary covers all of its
        slots (``PURGE_BATCH`` entries per call), the primaries at once. Slots skipped
        (moved, or migrating) are retried on their owners after a slot map refresh."""
        assert self._router is not None
        router = self._router
        head = (
            codec.to_us(now),
            PURGE_BATCH,
            self._sprefix,
            b"1" if report else b"",
            self._xprefix,
        )
        removed: list[PurgedSession] = []
        await router.ready()
        pending = router.slots_by_primary()
        for attempt in range(6):
            results = await asyncio.gather(
                *(self._purge_node(node, slots, head, removed) for node, slots in pending.items()),
                return_exceptions=True,
            )
            skipped: list[int] = []
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                skipped += result
            if not skipped:
                return removed
            await asyncio.sleep(0.05 * attempt)
            await router.initialize()
            pending = {}
            for slot in skipped:
                pending.setdefault(router.nodes.get_node_from_slot(slot), []).append(slot)
        raise self._unavailable(
            TryAgainError(f"{len(skipped)} slots could not be purged (resharding in progress)")
        )

    async def _purge_node(
        self,
        node: ClusterNode,
        slots: list[int],
        head: tuple[Any, ...],
        removed: list[PurgedSession],
    ) -> list[int]:
        """``PURGE_SLOTS`` over ``slots`` on ``node`` until done; the slots it skipped."""
        assert self._router is not None
        tags = [slot_tag(slot) for slot in slots]
        skipped: list[int] = []
        start = 0
        while start < len(tags):
            reply = await self._router.call(
                node, ("EVALSHA", PURGE_SLOTS.sha, 0, *head, *tags[start:])
            )
            if isinstance(reply, ResponseError):
                raise self._unavailable(reply)
            count, resume, n = int(reply[0]), int(reply[1]), int(reply[2])
            skipped += [slots[start + int(position) - 1] for position in reply[3 : 3 + n]]
            rows = reply[3 + n :]
            if head[3]:
                for j in range(0, len(rows), 3):
                    site, ikey = rows[j + 1].decode(), rows[j + 2]
                    removed.append(PurgedSession(site, self._user_of(ikey), rows[j].decode()))
            else:
                removed.extend([_PURGED] * count)
            if not resume:
                break
            start += resume - 1
        return skipped

    def _user_of(self, index_key: bytes) -> str | None:
        """The user id an ``index_key`` was made from (None for '' = anonymous)."""
        if not index_key.startswith(self._iprefix):
            return None
        start = len(self._iprefix) + (0 if self._router is None else TAG_LENGTH + 2)  # "tag}:"
        length, _, rest = index_key[start:].partition(b":")
        raw = rest[int(length) + 1 :]
        if b"%" in raw:
            raw = raw.replace(b"%7B", b"{").replace(b"%7D", b"}").replace(b"%25", b"%")
        return raw.decode("utf-8", "surrogatepass")

    async def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """``SCAN`` over the session keys with ``COUNT batch`` (never ``KEYS``), then short
        scripts (``SCAN_KEYS`` keys each, one round trip) read the fields of each batch.
        ``size`` is the stored record (data plus its metadata header). On a cluster:
        each primary in turn, the fields read per key."""
        if self._router is not None:
            async for chunk in self._cluster_scan(batch):
                yield chunk
            return
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

    async def _cluster_scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """``SCAN`` each primary in turn; the fields of each batch in one pipeline."""
        assert self._router is not None
        router = self._router
        pattern = _glob_escape(self._sprefix) + b"*"
        await router.ready()
        for node in router.primaries():
            cursor: int | bytes = 0
            while True:
                (reply,) = await router.on_node(
                    node, [("SCAN", cursor, "MATCH", pattern, "COUNT", batch)]
                )
                if isinstance(reply, ResponseError):
                    raise self._unavailable(reply)
                cursor, keys = reply
                pairs = [(key, sid) for key in keys if (sid := self._id_of(key)) is not None]
                wire: list[tuple[Any, ...]] = []
                for key, _ in pairs:
                    wire += [("HMGET", key, "s", "i", "e"), ("HSTRLEN", key, "r")]
                replies = await router.exchange(wire) if wire else []
                out = []
                for n, (_, session_id) in enumerate(pairs):
                    row, size = replies[2 * n], replies[2 * n + 1]
                    for part in (row, size):
                        if isinstance(part, StoreUnavailable):
                            raise part
                    if isinstance(row, ResponseError) or not row[0]:
                        continue  # gone, or not a session hash
                    site, ikey, expires = row
                    out.append(
                        ScanEntry(
                            site.decode(),
                            self._user_of(ikey) if ikey else None,
                            session_id,
                            int(size),
                            codec.from_us(int(expires)) if expires else None,
                        )
                    )
                if out:
                    yield out
                if int(cursor) == 0:
                    break

    async def _scan_estimate(self) -> int | None:
        """Sessions with a deadline (the expiry set); sessions that never expire are not
        counted, so this can be low. On a cluster: the sum over every slot's set."""
        if self._router is None:
            return int(await self._call("ZCARD", self._xkey))
        router = self._router
        await router.ready()
        counts = await asyncio.gather(
            *(
                router.call(
                    node,
                    ("EVALSHA", COUNT_SLOTS.sha, 0, self._xprefix, *map(slot_tag, slots)),
                )
                for node, slots in router.slots_by_primary().items()
            )
        )
        for count in counts:
            if isinstance(count, ResponseError):
                raise self._unavailable(count)
        return sum(int(c) for c in counts)
