"""Batching on redis-py's public API: concurrent calls of one event-loop turn share a
round trip, and every caller gets its reply or a ``StoreUnavailable``, whatever
fails.

A request that finds nothing on the wire goes at once. Otherwise the first request
of a turn leads a batch: its task waits for one of ``max_in_flight`` slots while the
requests of this turn (and of the turns it waits) join, then the batch goes out as
one ``pipeline(transaction=False)`` (a lone request as one ``execute_command``) on a
connection the client's pool lends for that exchange only, with the client's own
timeouts, health checks, retry, TLS and credentials. A large batch that is most of
what is on the wire goes as two pipelines on two slots (``SPLIT_AT``), so that Redis
runs one half while the first half's callers go on. On one server the session reads
of a pipeline merge into one ``HMGET`` or one multi-key script call, and so do its
creates of anonymous sessions that expire (``MULTI_INSERT``), its creates of user
sessions (``MULTI_INSERT_USER``) and its common writes
(``MULTI_APPLY``: no idle timeout, nothing written since the caller loaded the
session; the others go as ``APPLY`` after). Whatever happens in a batch, of any
exception type, every waiter is resolved, and by the deadline set when its batch
began (``timeout`` after): waiting for a slot, redis-py's slot map, retries and
redirections, the reply, all count, and the deadline holds even if redis-py ignores
a cancellation (``_send``). A lone request runs in its caller's task where redis-py
does not swallow cancellations for good and no batch was opened since the last lone
one (``inline_safe``, ``_send_inline``: no loop turn to hand the reply over);
otherwise in a task of its own. Either way one watchdog timer keeps the deadlines of
all lone requests (``_check_deadlines``): it cancels an inline caller's task, again
until the call ends, or answers a lone task's caller and cancels the task. A caller
that set a request deadline (``_deadline.DEADLINE``, ``SessionMiddleware``) is
answered by it too, alone or in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeAlias, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from ..._deadline import DEADLINE
from ...errors import StoreUnavailable
from .scripts import (
    APPLY,
    INSERT,
    MULTI_APPLY,
    MULTI_GET,
    MULTI_INSERT,
    MULTI_INSERT_USER,
    _Script,
    source_of,
)

CLOSE_WAIT = 20.0
"""How long ``close()`` of a store without ``timeout`` waits for work still on the
wire before it cancels it (4 x the default timeout)."""

NEVER_DECODE = "NEVER_DECODE"
"""redis-py's option (``redis.client.NEVER_DECODE``) for raw bytes replies, so the
store reads bytes even from a client made with ``decode_responses=True``."""

_T = TypeVar("_T")
Command: TypeAlias = tuple[Any, ...]
Request: TypeAlias = tuple[bytes | None, Command | None]
"""``(session key, None)`` reads a session; ``(None, args)`` is one command."""
Raw: TypeAlias = tuple[bytes | None, bytes | None, bytes | None, bytes | None]
"""A read's reply: the record, accessed, expires, and the id a rotation gave the key
(field ``h``: the record keeps the id it was written under)."""
_Entry: TypeAlias = tuple[Request, "asyncio.Future[Any] | None"]
_Watched: TypeAlias = tuple[
    float, "asyncio.Future[Any] | _Inline", "asyncio.Task[Any] | None", list[bool] | None
]

RECANCEL = 0.02
"""Seconds after which the watchdog cancels an inline call's task again if it is still
in the call: a cancellation redis-py lost (Python 3.11's ``asyncio.wait_for``, which
redis-py 8 also uses to read pending push notifications) is sent again."""


class _Inline:
    """A lone call running in its caller's task, as the watchdog sees it: the task,
    how many cancellations the watchdog sent it, whether the call has ended."""

    __slots__ = ("cancels", "ended", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancels = 0
        self.ended = False

    def done(self) -> bool:
        return self.ended


WRONGTYPE: Raw = (b"WRONGTYPE", None, None, None)
READ_FIELDS = ("r", "a", "e", "h")

MAX_BATCH = 32
"""Requests one pipeline carries at most; more in the same turn start another. Small
enough that under load several batches are in flight and the client builds and
parses one while Redis runs another."""

SPLIT_AT = 12
"""A batch of at least this many requests that is more than two thirds of the requests
on the wire (of batches sent and not yet answered) goes as two pipelines, the second
on a slot of its own when one is free (``_deliver``): Redis runs the second while the
callers of the first already go on. Otherwise callers that arrive together (a burst,
clients in step) stay in one batch, and each round trip leaves the client idle while
Redis runs it and Redis idle while the client runs the callers."""


_RAW: dict[str, Any] = {NEVER_DECODE: True}


async def send_batch(
    client: Redis | RedisCluster, commands: Sequence[Command], **options: Any
) -> list[Any]:
    """``commands`` in one round trip (a cluster: one per primary); replies in order.

    Each reply is the command's value or its error reply (a ``ResponseError``); a
    connection failure raises. Only public redis-py calls: ``execute_command`` and
    ``pipeline(transaction=False)``, whose connection goes back to the pool after.
    ``options`` go to ``execute_command`` (default: raw bytes replies)."""
    options = options or _RAW
    if len(commands) == 1:
        try:
            return [await client.execute_command(*commands[0], **options)]
        except ResponseError as exc:
            return [exc]
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command, **options)
    return list(await pipe.execute(raise_on_error=False))


async def send_recovering(
    client: Redis | RedisCluster, commands: Sequence[Command], **options: Any
) -> list[Any]:
    """``send_batch``, with ``NOSCRIPT`` replies (server restarted, ``SCRIPT FLUSH``)
    sent again as ``EVAL`` with the source: it runs whatever the script cache holds
    by then (another flush cannot race it) and caches the script again."""
    replies = await send_batch(client, commands, **options)
    if len(replies) != len(commands):
        raise ResponseError(f"{len(replies)} replies to {len(commands)} commands")
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        again = [("EVAL", source_of(commands[i][1]), *commands[i][2:]) for i in missing]
        for i, reply in zip(missing, await send_batch(client, again, **options), strict=True):
            replies[i] = reply
    return replies


async def within(seconds: float | None, work: Coroutine[Any, Any, _T]) -> _T:
    """``work``'s result, or ``TimeoutError`` after ``seconds`` even if the work
    ignores its cancellation (see ``Transport._send``): it runs in a task, cancelled
    then and left to end on its own."""
    task = asyncio.ensure_future(work)
    _LEFT.add(task)
    task.add_done_callback(_forget)
    try:
        await asyncio.wait((task,), timeout=seconds)
    finally:
        if not task.done():
            task.cancel()
    if not task.done():
        raise TimeoutError(f"no reply within {seconds} s")
    return task.result()


_LEFT: set[asyncio.Task[Any]] = set()
"""Tasks ``within`` started and may have left running (the loop keeps only weak
references to tasks)."""


def inline_safe(client: Redis | RedisCluster) -> bool:
    """Whether a lone request may run in its caller's task, its deadline kept by
    cancelling that task (again every ``RECANCEL`` while the call goes on): on one
    server, unless ``asyncio.wait_for`` wraps every write (a client with a
    ``socket_timeout``): Python 3.11's can lose a cancellation that lands as its work
    completes, and a send that lost one there reads on until that timeout (on any
    version: the task path's deadline holds whatever the send does). A lost
    cancellation elsewhere (redis-py 8 reads pending push notifications under a
    ``wait_for``) is followed by the next. Otherwise the request gets a task of its
    own (``_send_alone``)."""
    if isinstance(client, RedisCluster):
        return False  # (slot maps, redirections: kept in a task of their own)
    return not client.connection_pool.connection_kwargs.get("socket_timeout")


def _forget(task: asyncio.Task[Any]) -> None:
    _LEFT.discard(task)
    if not task.cancelled():
        task.exception()  # (a late error has no one to tell: its caller timed out)


def _resolve(waiter: asyncio.Future[Any] | None, reply: Any) -> None:
    """Hand ``waiter`` its reply (an exception is raised to it), unless it is gone."""
    if waiter is not None and not waiter.done():
        if isinstance(reply, BaseException):
            waiter.set_exception(reply)
        else:
            waiter.set_result(reply)


def _common_create(args: Command) -> bool:
    """Whether ``args`` is an insert of an anonymous session that expires (two keys,
    a deadline in its list), which ``MULTI_INSERT`` runs too: several of one batch go
    as one script call."""
    if len(args) != 8 or args[1] != INSERT.sha or args[2] != 2:
        return False
    listed = args[7]
    return isinstance(listed, bytes) and listed.split(b",", 5)[4] != b""


def _user_create(args: Command) -> bool:
    """Whether ``args`` is an insert of a user's session (three keys: the user's
    index the third), which ``MULTI_INSERT_USER`` runs too."""
    return len(args) == 9 and args[1] == INSERT.sha and args[2] == 3


def _common_apply(args: Command) -> bool:
    """Whether ``args`` is an apply the store sends for the common write (no idle
    timeout, a base version: ``common_apply.lua``), which ``MULTI_APPLY`` runs too."""
    if len(args) < 7 or args[1] != APPLY.sha or args[2] != 2:
        return False
    header = args[5]
    if not isinstance(header, bytes):
        return False
    fields = header.split(b",", 9)
    return len(fields) == 10 and fields[2] == b"" and fields[8] != b""


_MERGED: tuple[tuple[Callable[[Command], bool], _Script, slice, slice], ...] = (
    (_common_create, MULTI_INSERT, slice(3, 5), slice(5, 8)),
    (_user_create, MULTI_INSERT_USER, slice(3, 6), slice(6, 9)),
    (_common_apply, MULTI_APPLY, slice(3, 4), slice(5, 7)),
)
"""The writes a batch merges on one server, in wire order: which requests a merged
call takes, its script, and the keys and arguments it sends of each (a common apply
sends its session key alone)."""


class UnexpectedReply(ValueError):
    """A reply of a shape the store never asks for (a server or proxy out of step, or
    garbage): its message names the shape only, never the reply's text, which may
    hold a session's record."""


def reply_shape(reply: Any) -> str:
    """A reply's type and size, never its text (it may hold a session's id or data)."""
    if isinstance(reply, list | tuple | bytes | str):
        return f"{type(reply).__name__} of {len(reply)}"
    return type(reply).__name__


def leading_ints(reply: Any, count: int, what: str) -> list[int]:
    """The first ``count`` items of a script's reply, each an integer (a counting
    reply of another shape, such as a proxy's ``+OK``, is an error, never a count)."""
    if not isinstance(reply, list) or len(reply) < count:
        raise UnexpectedReply(f"unexpected {reply_shape(reply)} reply to {what}")
    head = reply[:count]
    if not all(type(v) is int for v in head):
        raise UnexpectedReply(f"unexpected {reply_shape(reply)} reply to {what}: not counts")
    return head


def _each(reply: Any, count: int) -> Iterator[Any]:
    """The replies in a merged call's reply, one per request it merged. Anything but
    a list of exactly that many is an error for each of them (never a reply handed
    to every caller as its own: a one-item list is not each caller's session)."""
    if isinstance(reply, list) and len(reply) == count:
        return iter(reply)
    if isinstance(reply, ResponseError):  # the call's error, never one key's (WRONGTYPE)
        reply = ResponseError(f"a merged call failed: {reply}")
    else:  # (the reply itself may hold session data)
        reply = UnexpectedReply(f"unexpected {reply_shape(reply)} reply to a merged call")
    return iter([reply] * count)


def wrong_type(exc: StoreUnavailable) -> bool:
    """Whether a command's failure is Redis's ``WRONGTYPE`` reply (a key of another
    type where it looked): the server and command worked."""
    cause = exc.__cause__
    return isinstance(cause, ResponseError) and str(cause).startswith("WRONGTYPE")


def _unwrap(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _is_raw(reply: Any) -> bool:
    """Whether ``reply`` is a read's fields (``READ_FIELDS``), each bytes or None."""
    if not isinstance(reply, list | tuple) or len(reply) != 4:
        return False
    r, a, e, h = reply
    return (
        (r is None or type(r) is bytes)
        and (a is None or type(a) is bytes)
        and (e is None or type(e) is bytes)
        and (h is None or type(h) is bytes)
    )


class Transport:
    """Batches the store's requests over one redis-py client (see the module doc)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout: float | None,
        max_in_flight: int,
        unavailable: Callable[[BaseException], StoreUnavailable],
        merge_reads: bool,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.max_in_flight = max(1, max_in_flight)
        self._unavailable = unavailable
        self._merge_reads = merge_reads
        self._by_node = isinstance(client, RedisCluster)
        self._open: list[_Entry] | None = None
        self._open_until: float | None = None  # the open batch's deadline
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._busy = 0  # batches holding a slot
        self._on_wire = 0  # requests of batches sent and not yet answered
        self._tasks: set[asyncio.Task[Any]] = set()
        # lone requests in flight (deadline, waiter, work, slot), in order of deadline
        self._watched: deque[_Watched] = deque()
        self._compact_at = 64  # drop answered entries from _watched past this length
        self._watch: asyncio.TimerHandle | None = None  # the timer of _check_deadlines
        self._watch_loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on
        self.inline = inline_safe(client)
        # a batch was opened since the last lone request went: callers are about, so
        # the next lone one goes in a task of its own (its caller resumes a turn later,
        # after the others: the way a caller that sends at once and calls again at once
        # would take every lone turn, one round trip each)
        self._crowded = False

    async def request(self, request: Request) -> Any:
        """Send ``request`` in this turn's batch; its reply (or its error, raised)."""
        loop = asyncio.get_running_loop()
        limit = DEADLINE.get()  # the caller's request's deadline, if it set one
        batch = self._open
        if batch is not None:
            waiter: asyncio.Future[Any] = loop.create_future()
            batch.append((request, waiter))
            if len(batch) >= MAX_BATCH:
                self._open = None
            until = self._open_until
            if limit is not None and (until is None or limit < until):
                # (the batch answers by its leader's deadline: watched if this is earlier)
                self._watch_until(loop, limit, waiter, None, None)
            return _unwrap(await waiter)
        deadline = None if self.timeout is None else loop.time() + self.timeout
        if limit is not None and (deadline is None or limit < deadline):
            deadline = limit
        if self._busy == 0:
            # Nothing on the wire: no one to batch with that is worth a loop turn. Go
            # now; requests arriving meanwhile batch up behind this one.
            await self._acquire(deadline)  # (a free slot: taken at once)
            crowded, self._crowded = self._crowded, False
            if self.inline and not crowded:
                return await self._send_inline(loop, request, deadline)
            return await self._send_alone(loop, request, loop.create_future(), deadline)
        # The first request of a turn leads a batch, sent from a task of its own (its
        # callers' replies must arrive even if the leader is cancelled) once that task
        # has a slot: the requests of this turn, and of the turns it waits, join.
        waiter = loop.create_future()
        batch = self._open = [(request, waiter)]
        self._open_until = deadline
        self._crowded = True
        task = self._spawn(self._run(batch, deadline))
        task.add_done_callback(functools.partial(self._never_ran, batch))
        return _unwrap(await waiter)

    async def _send_inline(
        self, loop: asyncio.AbstractEventLoop, request: Request, deadline: float | None
    ) -> Any:
        """A lone request's round trip in the caller's own task, on the slot it holds:
        no task, no loop turn to hand the reply over. Only where redis-py does not
        swallow cancellations for good (``inline_safe``). Past ``deadline`` the
        watchdog cancels the caller's task, as ``asyncio.timeout_at`` would (without
        a timer per call), and again every ``RECANCEL`` while the call goes on (one
        redis-py lost); every cancellation it sent is taken back here. The reply, or
        ``StoreUnavailable`` whatever fails; the caller's own cancellation is raised."""
        watched: _Inline | None = None
        try:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("a store call outside an asyncio task")
            cancelling = task.cancelling()
            if deadline is not None:
                watched = _Inline(task)
                self._watch_until(loop, deadline, watched, None, None)
            try:
                try:
                    reply = await self._one(request)
                finally:  # whatever the call did with them (raised, or lost one)
                    for _ in range(watched.cancels if watched is not None else 0):
                        task.uncancel()
            except asyncio.CancelledError:
                if watched is None or not watched.cancels or task.cancelling() > cancelling:
                    raise  # not the watchdog's, or the caller's own too
                reply = self._unavailable(TimeoutError(self._late()))
        except Exception as exc:  # any type: a bug or a garbled reply must not hang anyone
            reply = self._failed(exc)
        finally:
            if watched is not None:
                watched.ended = True  # no longer watched
            self._release()
        return _unwrap(reply)

    async def _send_alone(
        self,
        loop: asyncio.AbstractEventLoop,
        request: Request,
        waiter: asyncio.Future[Any],
        deadline: float | None,
    ) -> Any:
        """``_send`` for a batch of one, on the slot the caller holds, with less
        machinery per call (the common case at low load): the work's own ``finally``
        frees the slot and resolves the waiter, so no done callbacks run unless the
        work is cancelled (``_cancel_alone``)."""
        slot = [True]
        work = loop.create_task(self._alone(request, waiter, slot))
        self._tasks.add(work)
        if deadline is not None:
            self._watch_until(loop, deadline, waiter, work, slot)
        try:
            return _unwrap(await waiter)
        except asyncio.CancelledError:  # this caller gave up: its work is of no use
            self._cancel_alone(work, slot)
            raise

    def _watch_until(
        self,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        waiter: asyncio.Future[Any] | _Inline,
        work: asyncio.Task[Any] | None,
        slot: list[bool] | None,
    ) -> None:
        """Have the watchdog answer ``waiter`` at ``deadline`` if nothing did (and
        cancel ``work``, a lone request's, whose ``slot`` it holds)."""
        watched = self._watched
        while watched and watched[0][1].done():  # answered: no longer watched
            watched.popleft()
        if len(watched) > self._compact_at:  # answered ones behind a slow first one
            watched = self._watched = deque(e for e in watched if not e[1].done())
            self._compact_at = 2 * len(watched) + 64
        watched.append((deadline, waiter, work, slot))
        watch = self._watch
        # (re)armed for an earlier request deadline, or on another loop than the last
        if watch is None or deadline < watch.when() or self._watch_loop is not loop:
            if watch is not None:
                watch.cancel()
            self._watch = loop.call_at(deadline, self._check_deadlines)
            self._watch_loop = loop

    def _check_deadlines(self) -> None:
        """The watchdog of lone requests: one timer, at the earliest deadline of the
        requests still waiting (cheaper than a timer per request). A request past its
        deadline gets ``TimeoutError`` (as ``StoreUnavailable``) and its work is
        cancelled."""
        self._watch = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        left: deque[_Watched] = deque()
        first = None
        for entry in self._watched:
            deadline, waiter, work, slot = entry
            if waiter.done():
                continue
            if deadline <= now:
                if not isinstance(waiter, _Inline):
                    with contextlib.suppress(RuntimeError):  # a call of another, closed, loop
                        self._expire_alone(waiter, work, slot)
                    continue
                # an inline call: cancel its caller's task (again, until the call ends:
                # redis-py may lose one); _send_inline takes back every one it was sent
                waiter.cancels += 1
                waiter.task.cancel()
                deadline = now + RECANCEL
                entry = (deadline, waiter, None, None)
            left.append(entry)
            first = deadline if first is None else min(first, deadline)
        self._watched = left
        self._compact_at = 2 * len(left) + 64
        if first is not None:
            self._watch = loop.call_at(first, self._check_deadlines)
            self._watch_loop = loop

    async def _alone(self, request: Request, waiter: asyncio.Future[Any], slot: list[bool]) -> None:
        """A lone request's round trip; its waiter is resolved and the slot freed
        whatever happens (a cancellation included) before the work ends."""
        failure: BaseException = RuntimeError("the batch was cancelled")
        try:
            try:
                reply = await self._one(request)
            except Exception as exc:  # any type: a bug or a garbled reply must not hang anyone
                reply = self._failed(exc)
            failure = RuntimeError("a request was left unanswered")
            _resolve(waiter, reply)
        finally:
            if not waiter.done():
                waiter.set_exception(self._unavailable(failure))
            self._free(slot)
            self._tasks.discard(asyncio.current_task())

    async def _one(self, request: Request) -> Any:
        """A batch of one's round trip (``_exchange`` spelled out for one, cheaper):
        its reply, or a ``StoreUnavailable`` for an error reply."""
        key, args = request
        if args is None:  # (a read runs no script: no NOSCRIPT to recover from)
            return self._read((await send_batch(self.client, [("HMGET", key, *READ_FIELDS)]))[0])
        return self._reply((await send_recovering(self.client, [args]))[0])

    def _expire_alone(
        self,
        waiter: asyncio.Future[Any],
        work: asyncio.Task[Any] | None,
        slot: list[bool] | None,
    ) -> None:
        if not waiter.done():
            waiter.set_exception(self._unavailable(TimeoutError(self._late())))
        if work is not None and slot is not None:
            self._cancel_alone(work, slot)  # it may end when it can

    def _late(self) -> str:
        return f"no reply in time (timeout {self.timeout} s, or the request's deadline)"

    def _cancel_alone(self, work: asyncio.Task[None], slot: list[bool]) -> None:
        """Cancel a lone request's work. Work cancelled before its first step runs
        none of its code (nor its ``finally``): then the slot is freed here."""
        if work.cancel():
            work.add_done_callback(functools.partial(self._cancelled_alone, slot))

    def _cancelled_alone(self, slot: list[bool], work: asyncio.Task[None]) -> None:
        self._free(slot)
        self._tasks.discard(work)

    async def _acquire(self, deadline: float | None) -> None:
        """A slot, waited for until ``deadline`` at most (``TimeoutError``)."""
        if self._slots.locked():
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()  # (a free one: taken at once)
        self._busy += 1

    def _release(self) -> None:
        self._busy -= 1
        self._slots.release()

    def command(self, *args: Any) -> Coroutine[Any, Any, Any]:
        """One command through the batch; its reply (an error reply raised as
        ``StoreUnavailable``)."""
        return self.request((None, args))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, batch: list[_Entry], deadline: float | None) -> None:
        """Send a batch once it has a slot; a batch that gets none by ``deadline``
        fails. Every waiter is resolved whatever happens (an unexpected error or a
        cancellation included)."""
        failure: BaseException = RuntimeError("the batch was cancelled")
        try:
            try:
                await self._acquire(deadline)
            finally:
                if self._open is batch:
                    self._open = None
        except TimeoutError as exc:
            failure = exc
        except BaseException:
            self._fail(batch, failure)
            raise
        else:
            self._send(batch, deadline)
            return
        self._fail(batch, failure)

    def _never_ran(self, batch: list[_Entry], task: asyncio.Task[None]) -> None:
        """A batch task cancelled before its first step runs none of its code."""
        if not task.cancelled():
            return
        if self._open is batch:
            self._open = None
        self._fail(batch, RuntimeError("the batch was cancelled"))

    def _fail(self, batch: list[_Entry], failure: BaseException) -> None:
        """Every waiter of ``batch`` still waiting gets ``failure`` (as ``StoreUnavailable``)."""
        for _, waiter in batch:
            if waiter is not None and not waiter.done():
                waiter.set_exception(self._unavailable(failure))

    def _send(self, batch: list[_Entry], deadline: float | None) -> asyncio.Task[None]:
        """Start sending ``batch`` on the slot its caller holds; every waiter is
        resolved by ``deadline``, whatever happens.

        The work runs in a task of its own and a timer answers its waiters at the
        deadline, even if the work ignores its cancellation (redis-py can: on Python
        3.11 ``asyncio.wait_for``, which it uses to write, loses a cancellation that
        lands as the write completes, and its retries then read on until
        ``socket_timeout``). The cancelled work ends on its own and only then gives
        its slot (and so its pooled connection) back."""
        slot = [True]  # held until the work ends (or, never started, is done)
        self._on_wire += len(batch)
        work = self._spawn(self._deliver(batch, slot))
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_at(deadline, self._expire, batch, work)
        work.add_done_callback(functools.partial(self._finished, batch, timer, slot))
        return work

    def _expire(self, batch: list[_Entry], work: asyncio.Task[None]) -> None:
        self._fail(batch, TimeoutError(self._late()))
        work.cancel()  # it may end when it can

    def _finished(
        self,
        batch: list[_Entry],
        timer: asyncio.TimerHandle | None,
        slot: list[bool],
        work: asyncio.Task[None],
    ) -> None:
        """A batch's work is done (maybe long after its deadline)."""
        self._on_wire -= len(batch)
        if timer is not None:
            timer.cancel()
        failure: BaseException = RuntimeError("the batch was cancelled")
        if not work.cancelled():
            failure = work.exception() or RuntimeError("a request was left unanswered")
        self._fail(batch, failure)
        self._free(slot)

    def _free(self, slot: list[bool]) -> None:
        if slot:
            slot.clear()
            self._release()

    async def _deliver(self, batch: list[_Entry], slot: list[bool]) -> None:
        """Send a batch and hand each waiter its reply, then free the slot (before
        the callers run again: one that calls at once finds it free). On a cluster
        each primary's part goes on its own and its callers get their replies as
        soon as that primary answers, not when the slowest one does. A large batch
        on one server may go as two halves (``SPLIT_AT``), the second on a slot of
        its own."""
        spare: list[bool] = []
        try:
            parts = self._parts(batch)
            if (
                len(parts) == 1
                and len(batch) >= SPLIT_AT
                and 2 * self._on_wire < 3 * len(batch)  # the others: under half of it
                and not self._slots.locked()
            ):
                await self._acquire(None)  # (a free one: taken at once)
                spare.append(True)
                half = (len(batch) + 1) // 2
                parts = [parts[0][:half], parts[0][half:]]
            if len(parts) == 1:
                await self._send_part(batch, parts[0])
            else:
                # (return_exceptions: cancelled, the gather still waits for every part
                # to end, so no slot is freed while a part that ignored its
                # cancellation holds a pooled connection)
                await asyncio.gather(
                    *(self._send_part(batch, part) for part in parts), return_exceptions=True
                )
        finally:
            self._free(spare)
            self._free(slot)

    def _parts(self, batch: list[_Entry]) -> list[list[int]]:
        """The batch's positions grouped by the cluster node their key maps to (as the
        client's slot map says; one group on a single server)."""
        if not self._by_node:
            return [list(range(len(batch)))]
        client: Any = self.client
        parts: dict[Any, list[int]] = {}
        for i, ((key, args), _) in enumerate(batch):
            try:
                if args is not None:
                    key = args[3] if args[0] == "EVALSHA" else args[1]
                node = client.get_node_from_key(key).name
            except Exception:  # no slot map yet (the pipeline loads it) or no key
                node = None
            parts.setdefault(node, []).append(i)  # (by name: redis-py 5.0's nodes hash not)
        return list(parts.values())

    async def _send_part(self, batch: list[_Entry], part: list[int]) -> None:
        def early(j: int, reply: Any) -> None:
            _resolve(batch[part[j]][1], reply)

        replies = await self.roundtrip([batch[i][0] for i in part], early)
        for i, reply in zip(part, replies, strict=True):
            _resolve(batch[i][1], reply)

    async def roundtrip(
        self, requests: list[Request], early: Callable[[int, Any], None] | None = None
    ) -> list[Any]:
        """One round trip for ``requests``: per request its reply or a
        ``StoreUnavailable`` (never raises but ``CancelledError``). Its time bound
        is the caller's (``_send``): connect, slot map, retries, every reply. A merged
        write sent again (``MULTI_APPLY``'s ``again``) takes a second round trip;
        ``early(i, reply)`` gets each other reply as soon as it is known."""
        try:
            return await self._exchange(requests, early)
        except Exception as exc:  # any type: a bug or a garbled reply must not hang anyone
            return [self._failed(exc) for _ in requests]

    def _failed(self, exc: Exception) -> StoreUnavailable:
        """What a caller gets for ``exc`` raised by an exchange: itself if it is a
        ``StoreUnavailable``, else a new one caused by it."""
        if isinstance(exc, StoreUnavailable):
            return exc
        error = self._unavailable(exc)
        error.__cause__ = exc
        return error

    async def _exchange(
        self, requests: list[Request], early: Callable[[int, Any], None] | None = None
    ) -> list[Any]:
        reads = [key for key, args in requests if args is None]
        merged = self._merge_reads and len(reads) > 1
        # the writes merged per kind (_MERGED): two or more of a kind go as one call
        groups: list[list[Command]] = [[] for _ in _MERGED]
        if self._merge_reads:
            for _, args in requests:
                if args is not None:
                    for group, (takes, *_) in zip(groups, _MERGED, strict=True):
                        if takes(args):
                            group.append(args)
                            break
        groups = [group if len(group) > 1 else [] for group in groups]
        # the merged requests, by identity: their replies once the round trip is back
        done: dict[int, Any] = dict.fromkeys(id(args) for group in groups for args in group)
        wire: list[Command] = []
        if merged:
            wire.append(("EVALSHA", MULTI_GET.sha, len(reads), *reads))
        for group, (_, script, keys_at, argv_at) in zip(groups, _MERGED, strict=True):
            if group:
                keys = [key for args in group for key in args[keys_at]]
                argv = [arg for args in group for arg in args[argv_at]]
                wire.append(("EVALSHA", script.sha, len(keys), *keys, *argv))
        for key, args in requests:
            if args is None:
                if not merged:
                    wire.append(("HMGET", key, *READ_FIELDS))
            elif id(args) not in done:
                wire.append(args)
        replies = await send_recovering(self.client, wire)
        got = _each(replies.pop(0), len(reads)) if merged else iter(())
        for group in groups:
            if group:
                done.update(zip(map(id, group), _each(replies.pop(0), len(group)), strict=True))
        out: list[Any] = []
        again: list[tuple[int, Command]] = []  # the merged writes that go as APPLY
        position = 0
        for j, (_, args) in enumerate(requests):
            if args is None:
                if merged:
                    reply = self._read(next(got))
                else:
                    reply = self._read(replies[position])
                    position += 1
            elif id(args) in done:
                reply = done[id(args)]
                if reply == b"again":
                    again.append((j, args))
                    out.append(None)
                    continue
                reply = self._reply(reply)
            else:
                reply = self._reply(replies[position])
                position += 1
            out.append(reply)
            if early is not None:
                early(j, reply)  # done on the server: its caller need not wait for more
        if again:
            # writes that were not the common one there go as APPLY, whose full script
            # merges them or says why not: a second round trip, for those only, and
            # only they are in doubt if it fails
            try:
                more = await send_recovering(self.client, [args for _, args in again])
                settled = [self._reply(reply) for reply in more]
            except Exception as exc:  # any type: it must not hang anyone
                settled = [self._failed(exc)] * len(again)
            for (j, _), reply in zip(again, settled, strict=True):
                out[j] = reply
        return out

    def _reply(self, reply: Any) -> Any:
        if isinstance(reply, ResponseError | UnexpectedReply):
            return self._unavailable(reply)
        return reply

    def _read(self, reply: Any) -> Any:
        """A read's reply as ``Raw`` (four fields, each bytes or None), ``WRONGTYPE``,
        or ``StoreUnavailable`` for anything else."""
        if _is_raw(reply):  # (first: the common case)
            return tuple(reply)
        if isinstance(reply, ResponseError | UnexpectedReply):
            if str(reply).startswith("WRONGTYPE"):
                return WRONGTYPE
            return self._unavailable(reply)
        # (never its text: a record's would show a plain id, with hash_ids off)
        shape = reply_shape(reply)
        return self._unavailable(UnexpectedReply(f"unexpected {shape} reply to a read"))

    async def aclose(self) -> None:
        """Wait for batches still on the wire (their callers get their replies), for
        ``timeout`` at most (``CLOSE_WAIT`` without one: a server that never answers
        must not hang the close): work that ignored its cancellation is cancelled again and
        left to end when the client closes."""
        if self._tasks:
            wait = self.timeout if self.timeout is not None else CLOSE_WAIT
            _, late = await asyncio.wait(set(self._tasks), timeout=wait)
            for task in late:
                task.cancel()
