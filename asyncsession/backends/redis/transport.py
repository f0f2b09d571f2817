"""Batching on redis-py's public API: concurrent calls of one event-loop turn share a
round trip, and every caller gets its reply or a ``StoreUnavailable``, whatever fails.

A request that finds nothing on the wire goes at once. Otherwise the first request
of a turn leads a batch: it yields once (and waits for one of ``max_in_flight``
slots) while the requests of the same turn join, then the batch
goes out as one ``pipeline(transaction=False)`` (a lone request as one
``execute_command``) on a connection the client's pool lends for that exchange
only, with the client's own timeouts, health checks, retry, TLS and credentials.
On one server the session reads of a batch merge into one ``HMGET`` or one
multi-key script call. Whatever happens in a batch, of any exception type, every
waiter is resolved (``_run``'s ``finally``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from ...errors import StoreUnavailable
from .scripts import MULTI_GET, source_of

NEVER_DECODE = "NEVER_DECODE"
"""redis-py's option (``redis.client.NEVER_DECODE``) for raw bytes replies, so the
store reads bytes even from a client made with ``decode_responses=True``."""

Command: TypeAlias = tuple[Any, ...]
Request: TypeAlias = tuple[bytes | None, Command | None]
"""``(session key, None)`` reads a session; ``(None, args)`` is one command."""
Raw: TypeAlias = tuple[bytes | None, bytes | None, bytes | None]
_Entry: TypeAlias = tuple[Request, "asyncio.Future[Any] | None"]

WRONGTYPE: Raw = (b"WRONGTYPE", None, None)
READ_FIELDS = ("r", "a", "e")

MAX_BATCH = 32
"""Requests one pipeline carries at most; more in the same turn start another. Small
enough that under load several batches are in flight and the client builds and
parses one while Redis runs another."""


async def send_batch(
    client: Redis | RedisCluster, commands: Sequence[Command], **options: Any
) -> list[Any]:
    """``commands`` in one round trip (a cluster: one per primary); replies in order.

    Each reply is the command's value or its error reply (a ``ResponseError``); a
    connection failure raises. Only public redis-py calls: ``execute_command`` and
    ``pipeline(transaction=False)``, whose connection goes back to the pool after.
    ``options`` go to ``execute_command`` (default: raw bytes replies)."""
    options = options or {NEVER_DECODE: True}
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


def _resolve(waiter: asyncio.Future[Any] | None, reply: Any) -> None:
    """Hand ``waiter`` its reply (an exception is raised to it), unless it is gone."""
    if waiter is not None and not waiter.done():
        if isinstance(reply, BaseException):
            waiter.set_exception(reply)
        else:
            waiter.set_result(reply)


def _unwrap(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _is_raw(reply: Any) -> bool:
    return (
        isinstance(reply, list | tuple)
        and len(reply) == 3
        and all(v is None or isinstance(v, bytes) for v in reply)
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
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._busy = 0  # batches holding a slot
        self._tasks: set[asyncio.Task[Any]] = set()

    async def request(self, request: Request) -> Any:
        """Send ``request`` in this turn's batch; its reply (or its error, raised)."""
        batch = self._open
        if batch is not None:
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            batch.append((request, waiter))
            if len(batch) >= MAX_BATCH:
                self._open = None
            return _unwrap(await waiter)
        if self._busy == 0:
            # Nothing on the wire: no one to batch with that is worth a loop turn. Go
            # now; requests arriving meanwhile batch up behind this one.
            await self._acquire()
            try:
                return _unwrap((await self.roundtrip([request]))[0])
            finally:
                self._release()
        batch = self._open = [(request, None)]
        try:
            await asyncio.sleep(0)  # the requests of this turn join
            await self._acquire()
        except BaseException:
            if self._open is batch:
                self._open = None
            if len(batch) > 1:  # serve the requests that joined from a task of their own
                self._spawn(self._run(batch[1:], holding=False))
            raise
        if self._open is batch:
            self._open = None
        if len(batch) == 1:
            try:
                return _unwrap((await self.roundtrip([request]))[0])
            finally:
                self._release()
        # The others' replies must arrive even if this caller is cancelled: the batch
        # runs in a task of its own, and the leader waits for its reply like the others.
        leader: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch[0] = (request, leader)
        self._spawn(self._run(batch, holding=True))
        return _unwrap(await leader)

    async def _acquire(self) -> None:
        await self._slots.acquire()
        self._busy += 1

    def _release(self) -> None:
        self._busy -= 1
        self._slots.release()

    async def command(self, *args: Any) -> Any:
        """One command through the batch; its reply (an error reply raised as
        ``StoreUnavailable``)."""
        return await self.request((None, args))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Entry], *, holding: bool) -> None:
        """Send a batch and hand each waiter its reply; every waiter is resolved
        whatever happens (an unexpected error or a cancellation included). On a
        cluster each primary's part goes on its own and its callers get their
        replies as soon as that primary answers, not when the slowest one does."""
        failure: BaseException = RuntimeError("the batch was cancelled")
        try:
            if not holding:
                await self._acquire()
            try:
                parts = self._parts(batch)
                if len(parts) == 1:
                    await self._send_part(batch, parts[0])
                else:
                    await asyncio.gather(*(self._send_part(batch, part) for part in parts))
            finally:
                self._release()
        except Exception as exc:  # a bug of ours or a dependency's: its callers hear of it
            failure = exc
        finally:
            for _, waiter in batch:
                if waiter is not None and not waiter.done():
                    _resolve(waiter, self._unavailable(failure))

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
        replies = await self.roundtrip([batch[i][0] for i in part])
        for i, reply in zip(part, replies, strict=True):
            _resolve(batch[i][1], reply)

    async def roundtrip(self, requests: list[Request]) -> list[Any]:
        """One round trip for ``requests``: per request its reply or a
        ``StoreUnavailable`` (never raises but ``CancelledError``). Bounded by
        ``timeout`` as a whole: connect, write, every reply."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(requests)
        except Exception as exc:  # any type: a bug or a garbled reply must not hang anyone
            out = []
            for _ in requests:
                error = exc if isinstance(exc, StoreUnavailable) else self._unavailable(exc)
                error.__cause__ = exc.__cause__ if error is exc else exc
                out.append(error)
            return out

    async def _exchange(self, requests: list[Request]) -> list[Any]:
        reads = [key for key, args in requests if args is None]
        merged = self._merge_reads and len(reads) > 1
        wire: list[Command] = []
        if merged:
            wire.append(("EVALSHA", MULTI_GET.sha, len(reads), *reads))
        for key, args in requests:
            if args is not None:
                wire.append(args)
            elif not merged:
                wire.append(("HMGET", key, *READ_FIELDS))
        replies = await send_recovering(self.client, wire)
        if merged:
            multi = replies.pop(0)
            if not isinstance(multi, list) or len(multi) != len(reads):
                multi = [multi] * len(reads)  # an error reply (or garbage): each read's
            got = iter(multi)
        out: list[Any] = []
        position = 0
        for _, args in requests:
            if merged and args is None:
                out.append(self._read(next(got)))
                continue
            reply = replies[position]
            position += 1
            out.append(self._read(reply) if args is None else self._reply(reply))
        return out

    def _reply(self, reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            return self._unavailable(reply)
        return reply

    def _read(self, reply: Any) -> Any:
        if isinstance(reply, ResponseError):
            if str(reply).startswith("WRONGTYPE"):
                return WRONGTYPE
            return self._unavailable(reply)
        if not _is_raw(reply):
            return self._unavailable(ResponseError(f"unexpected reply to a read: {reply!r:.80}"))
        return tuple(reply)

    async def aclose(self) -> None:
        """Wait for batches still on the wire (their callers get their replies)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
