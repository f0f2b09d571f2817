"""RedisStore's rotation records: ``rotate`` and ``rotate_into`` (login) leave a
short-lived key for the old id, so a request still carrying it is told ``rotated``
rather than ``not found``.

The record is ``{prefix}r:{id}`` (on a cluster ``{prefix}r:{{tag}}{rest}``, the old
session's hash slot), a string ``"<until us>:<site>"`` that never names the new id,
with a native expiry (``PXAT``) at its deadline plus the store's expiry grace: the
deadline itself comes from the store's clock and is checked here, so Redis needs no
purge for them. The Lua bodies below get ``_PRELUDE`` (and for ``ROTATE_INTO`` the
index helpers and ``_INSERT`` as a function) prepended in ``redis.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from .. import codec
from ..config import Config
from ..errors import InvalidSession, SessionLimitExceeded
from ..session import Session, user_tag
from ..store import NO_EVICTIONS, InsertResult, Outcome, absolute_deadline
from ._redis_cluster import TAG_LENGTH, id_slot

if TYPE_CHECKING:
    from .redis import RedisStore

# KEYS: session, new session, expiry set, rotation record
# ARGV: site, now, id, new id, record value ('' = none), record PXAT
# The new id takes the old one's place (score) in the user index.
ROTATE_LUA = """
local skey, nkey, xkey, rkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, new = ARGV[3], ARGV[4]
local f = fields(skey, 's', 'i', 'e', 'c')
if not f or not f[1] or not f[3] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if not live(f[3], tonumber(ARGV[2])) then return 'expired' end
if redis.call('EXISTS', nkey) == 1 then return 'conflict' end
if ARGV[5] ~= '' then here(rkey) end
local score
if f[2] then
  here(f[2])
  score = redis.call('ZSCORE', f[2], id) or tonumber(f[4]) or 0
end
redis.call('RENAME', skey, nkey)
redis.call('ZREM', xkey, id)
if f[3] ~= '' then redis.call('ZADD', xkey, f[3], new) end
if f[2] then
  redis.call('ZREM', f[2], id)
  redis.call('ZADD', f[2], score, new)
end
if ARGV[5] ~= '' then redis.call('SET', rkey, ARGV[5], 'PXAT', ARGV[6]) end
return 'ok'
"""

# KEYS: old session, old expiry set, rotation record, new session, new expiry set,
#       [new user index]
# ARGV: site, now, old id, expected version ('' = any), record value ('' = none),
#       record PXAT, then INSERT's ARGV (record .. id)
# The old session leaves the new user's index before the insert (so it is not
# counted for the limit) and comes back if the insert refuses; then it is deleted.
ROTATE_INTO_LUA = """
local okey, oxkey, rkey = KEYS[1], KEYS[2], KEYS[3]
local site, oid = ARGV[1], ARGV[3]
local f = fields(okey, 's', 'i', 'e', 'n')
if not f or not f[1] or not f[3] then return {'missing'} end
if f[1] ~= site then return {'other_site'} end
if not live(f[3], tonumber(ARGV[2])) then return {'expired'} end
if ARGV[4] ~= '' and f[4] ~= ARGV[4] then return {'conflict'} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'exists'} end
if ARGV[5] ~= '' then here(rkey) end
if f[2] then here(f[2]) end
local ikey = KEYS[6]
local score
if f[2] and f[2] == ikey then
  score = redis.call('ZSCORE', ikey, oid)
  if score then redis.call('ZREM', ikey, oid) end
end
local iargv = {}
for j = 7, #ARGV do iargv[#iargv + 1] = ARGV[j] end
local reply = insert({KEYS[4], KEYS[5], KEYS[6]}, iargv)
if reply[1] ~= 'ok' then
  if score then redis.call('ZADD', ikey, score, oid) end
  return reply
end
redis.call('DEL', okey)
redis.call('ZREM', oxkey, oid)
if f[2] then redis.call('ZREM', f[2], oid) end
if ARGV[5] ~= '' then redis.call('SET', rkey, ARGV[5], 'PXAT', ARGV[6]) end
return reply
"""

# Redis Cluster, old and new ids in different slots: after the new session was
# created, retire the old one (delete, record the rotation) in its own slot.
# KEYS: old session, old expiry set, rotation record
# ARGV: site, id, record value ('' = none), record PXAT
RETIRE_LUA = """
local okey, oxkey, rkey = KEYS[1], KEYS[2], KEYS[3]
local f = fields(okey, 's', 'i')
if not f or not f[1] then return 'missing' end
if f[1] ~= ARGV[1] then return 'other_site' end
if ARGV[3] ~= '' then here(rkey) end
if f[2] then here(f[2]) end
redis.call('DEL', okey)
redis.call('ZREM', oxkey, ARGV[2])
if f[2] then redis.call('ZREM', f[2], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', rkey, ARGV[3], 'PXAT', ARGV[4]) end
return 'ok'
"""

_OUTCOMES = {
    b"ok": Outcome.OK,
    b"missing": Outcome.MISSING,
    b"expired": Outcome.EXPIRED,
    b"other_site": Outcome.OTHER_SITE,
    b"conflict": Outcome.CONFLICT,
}


def rotation_key(store: RedisStore, session_id: str) -> bytes:
    """``{prefix}r:{id}``; on a cluster ``{prefix}r:{{tag}}{rest}`` (the id's slot)."""
    prefix = store.config.key_prefix.encode() + b"r:"
    raw = session_id.encode()
    if store._router is None:
        return prefix + raw
    return prefix + b"{" + raw[:TAG_LENGTH] + b"}" + raw[TAG_LENGTH:]


def _record(store: RedisStore, scope: Config, now: datetime) -> tuple[bytes, int | bytes]:
    """The record's value and native expiry (ms), or ``(b"", b"")`` for none."""
    if not scope.rotation_grace:
        return b"", b""
    until = codec.to_us(now + scope.rotation_grace)
    value = b"%d:%s" % (until, scope.site_id.encode())
    return value, -(-until // 1000) + store.expiry_grace_ms


async def rotate(
    store: RedisStore, session_id: str, new_id: str, scope: Config, now: datetime
) -> Outcome:
    from .redis import ROTATE

    value, pxat = _record(store, scope, now)
    reply = await store._eval(
        ROTATE,
        (
            store.session_key(session_id),
            store.session_key(new_id),
            store.expiry_key_for(session_id),
            rotation_key(store, session_id),
        ),
        (scope.site_id, codec.to_us(now), session_id, new_id, value, pxat),
    )
    return _OUTCOMES[reply]


async def rotated(store: RedisStore, session_id: str, scope: Config, now: datetime) -> bool:
    reply = await store._call("GET", rotation_key(store, session_id))
    if not reply:
        return False
    until, _, site = bytes(reply).partition(b":")
    try:
        return site.decode() == scope.site_id and codec.to_us(now) < int(until)
    except (ValueError, UnicodeDecodeError):
        return False


def _insert_args(session: Session, record: bytes, scope: Config, now: datetime) -> list[Any]:
    return [
        record,
        scope.site_id,
        session.version,
        codec.to_us(session.created_at),
        codec.to_us(session.last_accessed_at),
        b"" if session.expires_at is None else codec.to_us(session.expires_at),
        b"" if (a := absolute_deadline(session)) is None else codec.to_us(a),
        b"",  # px: filled in by the caller
        codec.to_us(now),
        scope.max_sessions_per_user,
        scope.eviction,
        b"",  # session key prefix: filled in by the caller
        session.id,
    ]


async def rotate_into(
    store: RedisStore,
    session_id: str,
    version: int | None,
    session: Session,
    record: bytes,
    scope: Config,
    now: datetime,
) -> InsertResult | Outcome:
    from .redis import RETIRE, ROTATE_INTO

    cluster = store._router is not None
    user = session.user_id
    if cluster and user is not None and session.id[:TAG_LENGTH] != user_tag(user):
        raise InvalidSession(
            "on Redis Cluster a user session's id must start with its user's tag",
            details={"user_tag": user_tag(user)},
        )
    value, pxat = _record(store, scope, now)
    old_keys = [
        store.session_key(session_id),
        store.expiry_key_for(session_id),
        rotation_key(store, session_id),
    ]
    if cluster and id_slot(session_id) != id_slot(session.id):
        # No script can span two slots: check, create the new session, retire the old.
        try:
            old = await store._load(session_id)
        except codec.CorruptRecord:
            return Outcome.MISSING
        if old is None:
            return Outcome.MISSING
        if old.site_id != scope.site_id:
            return Outcome.OTHER_SITE
        if old.expires_at is not None and now >= old.expires_at:
            return Outcome.EXPIRED
        if version is not None and old.version != version:
            return Outcome.CONFLICT
        result = await store._insert(session, record, scope, now)
        await store._eval(RETIRE, old_keys, (scope.site_id, session_id, value, pxat))
        return result
    keys = [*old_keys, store.session_key(session.id), store.expiry_key_for(session.id)]
    if user is not None:
        keys.append(store.index_key(scope.site_id, user))
    args = _insert_args(session, record, scope, now)
    args[7] = store._px(session.expires_at)
    args[11] = store._sprefix
    reply = await store._eval(
        ROTATE_INTO,
        keys,
        (
            scope.site_id,
            codec.to_us(now),
            session_id,
            b"" if version is None else version,
            value,
            pxat,
            *args,
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
    if tag != b"ok":
        return _OUTCOMES[tag]
    if len(reply) == 1:
        return NO_EVICTIONS
    return InsertResult([victim.decode() for victim in reply[1:]])
