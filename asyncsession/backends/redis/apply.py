"""``Store.apply`` on Redis: one Lua script that edits the stored record in place.

The record (hash field ``r``) is compact orjson JSON whose last member is the data,
``"d":{...}``. The script splits the record and the data object into their top-level
members without decoding any value (it jumps between quotes, backslashes and
brackets with ``string.find``), compares each expected member's raw JSON with what
the client sent (``orjson.dumps`` of the value as read gives the same bytes), then
splices the set and deleted members and rewrites the header numbers (version,
update and access times, expiry). Values are never decoded in Lua, so they
round-trip exactly (Redis' cjson would lose integers above 2**53 and turn ``{}``
into ``[]``). One round trip, atomic on the server. The script is
``scripts/apply.lua`` (``apply_first.lua`` runs first: the common write).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson

from ... import codec
from ...changes import Applied, EncodedChanges
from ...config import Config
from ...crypto import KeyNotConfigured
from ...errors import SessionError
from ...session import Session
from ...store import Outcome, absolute_deadline, idle_deadline
from .transport import UnexpectedReply, reply_shape

_FAILED = {
    b"missing": Outcome.MISSING,
    b"expired": Outcome.EXPIRED,
    b"other_site": Outcome.OTHER_SITE,
    b"conflict": Outcome.CONFLICT,
}


def apply_args(
    session_id: str,
    changes: EncodedChanges,
    scope: Config,
    now: datetime,
    limit: int,
    grace_ms: int,
    base: Session | None = None,
) -> list[Any]:
    """The script's ARGV for ``changes``; with ``base`` (the session as the caller
    loaded it) also the whole new record, written as is if nothing changed since.

    Site, now, sliding deadline, grace, id, limit, the counts, the base version and
    the new record's expiry go in one argument, each followed by ``,`` (none can
    hold one; ``''`` = none), then the record, then the key and value JSON of the
    changes: redis-py encodes each argument in Python, and ``apply_first.lua``
    splits the first one back into the layout ``apply.lua`` documents."""
    idle = scope.idle_timeout
    version: Any = ""
    record = b""
    expires: Any = ""
    if base is not None:
        whole = _whole_record(base, changes, scope, now)
        if whole is not None:
            version, record, expires = whole
    n = codec.to_us(now)
    args: list[Any] = [
        (
            f"{scope.site_id},{n},{'' if idle is None else codec.to_us(now + idle)},"
            f"{grace_ms},{session_id},{limit},{len(changes.expect)},{len(changes.set)},"
            f"{version},{expires},"
        ).encode(),
        record,
    ]
    for key, value in changes.expect:
        args += (key, b"" if value is None else value)
    for key, value in changes.set:
        args += (key, value)
    args += changes.delete
    return args


_new_session = Session.__new__


def _whole_record(
    base: Session, changes: EncodedChanges, scope: Config, now: datetime
) -> tuple[int, bytes, str | int] | None:
    """(base version, the record after ``changes``, its expiry), or None if the data
    ``base`` holds does not encode (then the script merges on the server)."""
    data = dict(base.data)
    for key, value in changes.set:
        data[orjson.loads(key)] = orjson.Fragment(value)
    for key in changes.delete:
        data.pop(orjson.loads(key), None)
    try:
        raw = orjson.dumps(data, option=codec._STRICT)
    except (orjson.JSONEncodeError, TypeError, RecursionError):
        return None
    absolute = absolute_deadline(base)
    new = _new_session(Session)  # what encode reads, set as update() sets it
    new.id = base.id
    new.user_id = base.user_id
    new.site_id = scope.site_id
    new.organization_id = base.organization_id
    new.created_at = base.created_at
    new.updated_at = new.last_accessed_at = now
    new.expires_at = idle_deadline(absolute, now, scope.idle_timeout)
    new.absolute_expires_at = absolute
    new.ip_address = base.ip_address
    new.user_agent = base.user_agent
    new.version = base.version + 1
    try:
        record = codec.encode(new, raw)
    except SessionError:
        return None
    expires = "" if new.expires_at is None else codec.to_us(new.expires_at)
    return base.version, record, expires


def parse_reply(reply: Any, now: datetime, key: bytes) -> Applied | Outcome:
    """``Applied`` or the failed ``Outcome``; ``CorruptRecord`` when the script found
    the stored record damaged (``corrupt``). Any other reply is not the script's (a
    broken server or proxy): ``ValueError``, which the store reports as
    ``StoreUnavailable``, so a garbled reply never reads as a damaged session. An
    ``ok`` names the session key it wrote: another key's (a server or proxy out of
    step, one write handed another's reply) is ``UnexpectedReply``, never another
    write's version and expiry told as this one's."""
    if isinstance(reply, list) and len(reply) in (2, 4):
        if reply[0] == b"too_large" and len(reply) == 2:
            return Outcome.TOO_LARGE
        if reply[0] == b"ok" and len(reply) == 4:
            if reply[3] != key:
                raise UnexpectedReply("an apply's reply was for another key: connections reset")
            version, expires = int(reply[1]), reply[2]
            expires_at = codec.EPOCH + timedelta(microseconds=int(expires)) if expires else None
            return Applied(version, now, expires_at)
    elif reply == b"corrupt":
        raise codec.CorruptRecord("stored record is not a compact JSON session record")
    elif reply == b"sealed":
        raise KeyNotConfigured.no_keys()
    elif isinstance(reply, bytes) and reply in _FAILED:
        return _FAILED[reply]
    raise UnexpectedReply(f"unexpected {reply_shape(reply)} reply to the apply script")
