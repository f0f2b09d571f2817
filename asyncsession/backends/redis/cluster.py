"""Redis Cluster work that is not one key's: per-slot purging, counting and scanning,
node by node, on ``RedisCluster``'s public API (``get_node_from_key``,
``get_primaries``, ``execute_command(..., target_nodes=node)``).

Keyed commands need nothing here: redis-py routes them by key and follows ``MOVED``,
``ASK`` and ``TRYAGAIN`` itself (the transport sends them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError, TryAgainError

from ...errors import StoreUnavailable
from .layout import SLOTS, slot_tag
from .scripts import COUNT_SLOTS, PURGE_SLOTS
from .transport import NEVER_DECODE, leading_ints, send_recovering, within

RESHARD_ATTEMPTS = 6
"""Rounds a purge retries slots that moved while it ran before giving up."""


class ClusterOps:
    """Whole-cluster operations of a ``RedisStore`` on a ``RedisCluster`` client."""

    def __init__(
        self,
        client: RedisCluster,
        xprefix: bytes,
        *,
        timeout: float | None,
        unavailable: Callable[[BaseException], StoreUnavailable],
    ) -> None:
        self.client = client
        self.xprefix = xprefix
        self.timeout = timeout
        self._unavailable = unavailable

    async def ready(self) -> None:
        """Load the slot map (once; redis-py keeps it current from ``MOVED`` replies)."""
        try:
            await within(self.timeout, self.client.initialize())
        except Exception as exc:
            raise self._unavailable(exc) from exc

    def primaries(self) -> list[ClusterNode]:
        return list(self.client.get_primaries())

    def slots_by_primary(
        self, slots: list[int] | None = None
    ) -> list[tuple[ClusterNode, list[int]]]:
        """The primary that serves each slot (every slot by default), as redis-py's
        slot map says: the node of each slot's expiry-set hash tag."""
        out: dict[str, tuple[ClusterNode, list[int]]] = {}  # by name: 5.0's nodes hash not
        for slot in range(SLOTS) if slots is None else slots:
            node = self.client.get_node_from_key(slot_tag(slot).decode())
            if node is None:
                raise self._unavailable(RuntimeError(f"no primary serves slot {slot}"))
            out.setdefault(node.name, (node, []))[1].append(slot)
        return list(out.values())

    async def call(self, node: ClusterNode, *command: Any) -> Any:
        """One command on ``node`` (``NOSCRIPT`` recovered), its reply as bytes (but
        the replies redis-py's cluster client merges: ``SCRIPT``, ``INFO``); errors
        raise as ``StoreUnavailable``."""
        options: dict[str, Any] = {"target_nodes": node}
        if command[0] not in ("SCRIPT", "INFO"):  # (replies redis-py merges by node)
            options[NEVER_DECODE] = True
        try:
            (reply,) = await within(
                self.timeout, send_recovering(self.client, [command], **options)
            )
        except Exception as exc:
            raise self._unavailable(exc) from exc
        if isinstance(reply, ResponseError):
            raise self._unavailable(reply)
        return reply

    async def purge(self, head: tuple[Any, ...], on_rows: Callable[[list[Any], int], None]) -> None:
        """``PURGE_SLOTS`` (``head``: now, budget, session prefix, report) over every
        slot: one call per primary covers its slots (a budget of entries per call),
        the primaries at once. Slots a node skipped
        (moved, or migrating) go to their owners once redis-py has learnt the move."""
        await self.ready()
        head = (*head, self.xprefix)
        pending = self.slots_by_primary()
        for attempt in range(RESHARD_ATTEMPTS):
            parts = await asyncio.gather(
                *(self._purge_node(node, slots, head, on_rows) for node, slots in pending)
            )
            skipped = [slot for part in parts for slot in part]
            if not skipped:
                return
            await asyncio.sleep(0.05 * attempt)
            for slot in skipped:  # a keyed command: redis-py follows MOVED, updates its map
                key = self.xprefix + slot_tag(slot) + b"}"
                try:
                    await within(self.timeout, self.client.execute_command("EXISTS", key))
                except Exception as exc:
                    raise self._unavailable(exc) from exc
            pending = self.slots_by_primary(skipped)
        raise self._unavailable(
            TryAgainError(f"{len(skipped)} slots could not be purged (resharding in progress)")
        )

    async def _purge_node(
        self,
        node: ClusterNode,
        slots: list[int],
        head: tuple[Any, ...],
        on_rows: Callable[[list[Any], int], None],
    ) -> list[int]:
        """``PURGE_SLOTS`` over ``slots`` on ``node`` until done; the slots it skipped."""
        tags = [slot_tag(slot) for slot in slots]
        skipped: list[int] = []
        start = 0
        while start < len(tags):
            reply = await self.call(node, "EVALSHA", PURGE_SLOTS.sha, 0, *head, *tags[start:])
            count, resume, n = leading_ints(reply, 3, "purge")
            skipped += [slots[start + int(position) - 1] for position in reply[3 : 3 + n]]
            on_rows(list(reply[3 + n :]), count)
            if not resume:
                break
            start += resume - 1
        return skipped

    async def count(self) -> int:
        """Sessions scheduled in every slot's expiry set."""
        await self.ready()
        counts = await asyncio.gather(
            *(
                self.call(node, "EVALSHA", COUNT_SLOTS.sha, 0, self.xprefix, *map(slot_tag, slots))
                for node, slots in self.slots_by_primary()
            )
        )
        return sum(int(c) for c in counts)

    async def scan(self, node: ClusterNode, cursor: int, pattern: bytes, batch: int) -> Any:
        """One ``SCAN`` step on ``node``: ``(next cursor, keys)``."""
        reply = await self.call(node, "SCAN", cursor, "MATCH", pattern, "COUNT", batch)
        cursor, keys = reply
        if isinstance(cursor, dict):  # redis-py merges per-node cursors: ours is the one
            (cursor,) = cursor.values()
        return int(cursor), keys
