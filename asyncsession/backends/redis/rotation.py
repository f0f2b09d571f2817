"""RedisStore's rotation records: ``rotate`` and ``rotate_into`` (login) leave a
short-lived key for the old id, so a request still carrying it is told ``rotated``
rather than ``not found``.

The record is ``{prefix}r:{id}`` (on a cluster ``{prefix}r:{{tag}}{rest}``, the old
session's hash slot), a string ``"<until us>:<site>"`` that never names the new id,
with a native expiry (``PXAT``) at its deadline plus the store's expiry grace: the
deadline itself comes from the store's clock and is checked here, so Redis needs no
purge for them. The scripts (``scripts/rotate.lua``, ``rotate_into.lua``,
``retire.lua``) get the prelude (and ``ROTATE_INTO`` the index helpers and the
insert as a function) prepended in ``scripts.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ... import codec
from ..._deadline import DEADLINE
from ...config import Config
from ...errors import StoreUnavailable, short_hash
from ...session import Session
from ...store import InsertResult, Miss, Outcome
from .layout import id_slot
from .scripts import DELETE, RETIRE, ROTATE, ROTATE_INTO
from .transport import wrong_type

if TYPE_CHECKING:
    from .store import RedisStore

logger = logging.getLogger("asyncsession")

_OUTCOMES = {
    b"ok": Outcome.OK,
    b"missing": Outcome.MISSING,
    b"expired": Outcome.EXPIRED,
    b"other_site": Outcome.OTHER_SITE,
    b"conflict": Outcome.CONFLICT,
}


def rotation_key(store: RedisStore, session_id: str) -> bytes:
    """``{prefix}r:{id}``; on a cluster ``{prefix}r:{{tag}}{rest}`` (the id's slot)."""
    return store._layout.rotation_key(session_id)


def _record(
    store: RedisStore, scope: Config, now: datetime, *, ended: bool = False
) -> tuple[bytes, int | bytes]:
    """The record's value and native expiry (ms), or ``(b"", b"")`` for none;
    ``ended``: a logout's record (``kind``)."""
    grace = scope.logout_grace if ended else scope.rotation_grace
    if not grace:
        return b"", b""
    until = codec.to_us(now + grace)
    value = b"%s%d:%s" % (b"e" if ended else b"", until, scope.site_id.encode())
    return value, -(-until // 1000) + store.expiry_grace_ms


async def end(store: RedisStore, session_id: str, scope: Config, now: datetime) -> Outcome:
    """Delete the session and, if it was there, leave the logout's record: one script
    (``scripts/delete.lua`` given the record's key)."""
    value, pxat = _record(store, scope, now, ended=True)
    reply = await store._eval(
        DELETE,
        (
            store.session_key(session_id),
            store.expiry_key_for(session_id),
            rotation_key(store, session_id),
        ),
        (scope.site_id, session_id, value, pxat),
    )
    return _OUTCOMES[reply]


async def rotate(
    store: RedisStore, session_id: str, new_id: str, scope: Config, now: datetime
) -> Outcome:
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


async def recorded(store: RedisStore, session_id: str, scope: Config, now: datetime) -> Miss:
    try:
        record = await store._call("GET", rotation_key(store, session_id))
    except StoreUnavailable as exc:
        if not wrong_type(exc):
            raise
        return Miss.UNKNOWN  # a key of another type in a record's place: damaged, as kind()
    return kind(record, scope, now)


def kind(record: Any, scope: Config, now: datetime) -> Miss:
    """What a record (``GET`` of its key: None if there is none) of ``scope``'s site,
    not past its deadline, says: ``ROTATED``, or ``ENDED`` for a logout's (its
    deadline marked ``e``: a release before these records reads it as damaged, so
    as no record); else ``UNKNOWN`` (a damaged one too)."""
    if type(record) is not bytes:  # (None: no record; anything else is garbage)
        return Miss.UNKNOWN
    until, _, site = record.partition(b":")
    ended = until[:1] == b"e"
    if ended:
        until = until[1:]
    try:
        if site.decode() != scope.site_id or codec.to_us(now) >= int(until):
            return Miss.UNKNOWN
    except (ValueError, UnicodeDecodeError, TypeError):
        return Miss.UNKNOWN
    return Miss.ENDED if ended else Miss.ROTATED


async def rotate_into(
    store: RedisStore,
    session_id: str,
    version: int | None,
    session: Session,
    record: bytes,
    scope: Config,
    now: datetime,
) -> InsertResult | Outcome:
    store._check_user_tag(session)
    cluster = store._layout.cluster
    user = session.user_id
    old_keys = [
        store.session_key(session_id),
        store.expiry_key_for(session_id),
        rotation_key(store, session_id),
    ]
    if cluster and id_slot(session_id) != id_slot(session.id):
        # Once the new session is created, the old one must be retired or the new one
        # removed: a caller cancelled in between (a client gone, a timeout) must not
        # stop halfway and leave both live.
        return await _to_the_end(
            store,
            functools.partial(
                _across_slots, store, session_id, version, session, record, scope, now, old_keys
            ),
        )
    value, pxat = _record(store, scope, now)
    keys = [*old_keys, store.session_key(session.id), store.expiry_key_for(session.id)]
    if user is not None:
        keys.append(store.index_key(scope.site_id, user))
    args = store._insert_args(session, record, scope, now)
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
    inserted = store._inserted(reply, scope)
    return _OUTCOMES[reply[0]] if inserted is None else inserted


async def _to_the_end(
    store: RedisStore,
    work: Callable[[_Caller], Coroutine[Any, Any, InsertResult | Outcome]],
) -> InsertResult | Outcome:
    """``work(caller)`` in a task of its own, which a caller that gives up does not stop
    halfway: the caller gets its ``CancelledError``, or ``StoreUnavailable`` at the
    request's deadline, while the task goes on. The task keeps no request deadline
    (each round trip has the store's timeout). Before its last step it calls
    ``caller.commit()``: False if its caller stopped waiting (the task then undoes its first
    step rather than complete a login nobody was told of); True binds the caller to
    the outcome, so a deadline that passes later waits for the last step's answer
    (one round trip, within the store's timeout) instead of reporting a failure that
    did not happen. ``close()`` waits for the task."""
    loop = asyncio.get_running_loop()
    deadline = DEADLINE.get()
    caller = _Caller(loop, deadline)

    context = contextvars.copy_context()
    context.run(DEADLINE.set, None)
    task = loop.create_task(work(caller), context=context)
    store._finishing.add(task)
    task.add_done_callback(functools.partial(_finished, store._finishing))
    try:
        async with asyncio.timeout_at(deadline) as bound:
            return await asyncio.shield(task)
    except TimeoutError as exc:
        if not bound.expired():
            raise
        if caller.committed:  # the last step is on its way: its answer is the caller's
            return await asyncio.shield(task)
        caller.left = True
        raise store._unavailable(TimeoutError("no reply in time (the request's deadline)")) from exc
    except asyncio.CancelledError:
        caller.left = True
        raise


class _Caller:
    """What a task of ``_to_the_end`` knows of the caller waiting for it."""

    __slots__ = ("committed", "deadline", "left", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> None:
        self.loop = loop
        self.deadline = deadline
        self.left = False  # cancelled, or told the deadline passed
        self.committed = False

    def gone(self) -> bool:
        """Whether the caller stopped waiting (or will, its deadline being past)."""
        return self.left or (self.deadline is not None and self.loop.time() >= self.deadline)

    def commit(self) -> bool:
        """Before the last step: False if the caller is gone; else the caller now waits
        for that step's answer, even past its deadline."""
        if self.gone():
            return False
        self.committed = True
        return True


def _finished(
    tasks: set[asyncio.Task[InsertResult | Outcome]], task: asyncio.Task[InsertResult | Outcome]
) -> None:
    tasks.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a caller that left is not told, nor is asyncio


async def _across_slots(
    store: RedisStore,
    session_id: str,
    version: int | None,
    session: Session,
    record: bytes,
    scope: Config,
    now: datetime,
    old_keys: list[bytes],
    caller: _Caller,
) -> InsertResult | Outcome:
    """``rotate_into`` on a cluster when the old and new ids are in different slots: no
    script can span both. A read settles the common refusals without writing; then the
    new session is created, and one script in the old id's slot retires the old one
    only if it is still live (and, with ``version``, at that version: ``RETIRE``, the
    same checks the single-slot script makes). If it is not (a write or another login
    got there first), or the caller stopped waiting meanwhile (``caller.commit()``), the
    new session is deleted: nothing moved, and the old cookie still works. A create
    whose reply is lost is deleted too (it may have run). A retire whose reply is lost
    leaves both sessions (in doubt, ``StoreUnavailable``): the new one is known to
    nobody and expires; deleting it could leave the user with none. A caller cancelled
    while the retire is on its way (its client gone) is logged out as by any write in
    flight."""
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
    if caller.gone():
        return Outcome.CONFLICT  # nobody waits for it: write nothing
    value, pxat = _record(store, scope, now)
    try:
        result = await store._insert(session, record, scope, now)
    except StoreUnavailable:
        await _undo(store, session.id, scope)  # it may have run: leave no second session
        raise
    if not caller.commit():
        outcome = Outcome.CONFLICT  # the caller was told it failed: keep its old session
    else:
        expected = b"" if version is None else version
        reply = await store._eval(
            RETIRE,
            old_keys,
            (scope.site_id, session_id, value, pxat, expected, codec.to_us(now)),
        )
        outcome = _OUTCOMES[reply]
        if outcome is Outcome.OK:
            return result
    await _undo(store, session.id, scope)
    return InsertResult(result.evicted, undone=outcome) if result.evicted else outcome


async def _undo(store: RedisStore, session_id: str, scope: Config) -> None:
    """Delete a session the login created and must not keep; tried twice (a lost
    reply), then left to expire: the error the caller gets is the first one's."""
    for attempt in range(2):
        try:
            await store._delete(session_id, scope)
            return
        except StoreUnavailable:
            if attempt:
                logger.warning(
                    "asyncsession: a login undone across cluster slots left session %s "
                    "(unknown to any client) to expire",
                    short_hash(session_id),
                )
