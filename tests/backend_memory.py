from __future__ import annotations

from asyncsession import Config, MemoryStore, Store

from .clock import FakeClock


def skip_reason() -> str | None:
    return None


async def open_raw(config: Config, clock: FakeClock, namespace: str) -> Store:
    return MemoryStore(config, clock=clock)
