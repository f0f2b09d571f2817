"""Sentinel: tell a store behind Sentinel the moment a sentinel promotes a new primary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

logger = logging.getLogger("asyncsession")


async def follow_sentinels(
    sentinel: Sentinel, service: str, switched: Callable[[], Awaitable[None]]
) -> None:
    """Until cancelled: await ``switched()`` whenever a sentinel publishes
    ``+switch-master`` for ``service`` (and after reconnecting to a sentinel, since an
    announcement may have been missed meanwhile). Each sentinel is followed on its own,
    and no failure of one (a lost connection, a malformed reply that redis-py answers
    with an ``AttributeError`` or ``TypeError``) stops following it: once the follower
    ended, the store would keep writing to a demoted primary."""
    await asyncio.gather(*(_follow(client, service, switched) for client in sentinel.sentinels))


async def _follow(client: Redis, service: str, switched: Callable[[], Awaitable[None]]) -> None:
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": None}  # a quiet channel is fine
    listener = Redis(
        connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    name = service.encode()
    missed = False
    failures = 0  # in a row: the wait before the next try grows to RETRY_MAX
    try:
        while True:
            pubsub = listener.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                if missed:
                    await switched()
                async for message in pubsub.listen():
                    failures = 0  # (the subscription's confirmation is a message too)
                    data = message.get("data")
                    ours = isinstance(data, bytes) and data.split(b" ", 1)[0] == name
                    if message.get("type") == "message" and ours:
                        await switched()
            except Exception as exc:  # (cancellation is no Exception: it ends the loop)
                expected = isinstance(exc, (RedisError, OSError))
                logger.log(
                    logging.DEBUG if expected or failures else logging.WARNING,
                    "asyncsession: sentinel subscription lost (%s: %s); retrying",
                    type(exc).__name__,
                    exc,
                )
                missed = True
                failures += 1
                await asyncio.sleep(min(RETRY_MAX, 0.5 * failures))
            finally:
                with contextlib.suppress(Exception):  # (a broken connection's close)
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        with contextlib.suppress(Exception):
            await listener.aclose()


RETRY_MAX = 5.0
"""Seconds at most between two tries to subscribe to a sentinel again."""
