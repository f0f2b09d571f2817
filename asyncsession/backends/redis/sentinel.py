"""Sentinel: tell a store behind Sentinel the moment a sentinel promotes a new primary."""

from __future__ import annotations

import asyncio
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
    announcement may have been missed meanwhile)."""
    await asyncio.gather(*(_follow(client, service, switched) for client in sentinel.sentinels))


async def _follow(client: Redis, service: str, switched: Callable[[], Awaitable[None]]) -> None:
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": None}  # a quiet channel is fine
    listener = Redis(
        connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    name = service.encode()
    missed = False
    try:
        while True:
            pubsub = listener.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                if missed:
                    await switched()
                async for message in pubsub.listen():
                    data = message.get("data")
                    ours = isinstance(data, bytes) and data.split(b" ", 1)[0] == name
                    if message.get("type") == "message" and ours:
                        await switched()
            except (RedisError, OSError) as exc:
                logger.debug("asyncsession: sentinel subscription lost (%s); retrying", exc)
                missed = True
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        await listener.aclose()
