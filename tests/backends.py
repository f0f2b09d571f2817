"""Registry of backends the conformance suite runs against.

Each backend lives in ``tests/backend_<name>.py`` and exposes::

    def skip_reason() -> str | None           # None when usable here
    async def open_raw(config, clock, namespace) -> Store   # a fresh, opened raw store

``namespace`` is unique per test (use it in key prefixes or file names) so tests never
see each other's data. The harness closes every store it opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from asyncsession import Config, Store

from .clock import FakeClock

NAMES = ("memory", "sqlite_file", "sqlite_memory", "redis", "redis_cluster")


@dataclass
class Backend:
    name: str
    skip_reason: Callable[[], str | None]
    open_raw: Callable[[Config, FakeClock, str], Awaitable[Store]]


def load(name: str) -> Backend | None:
    module_name = {"sqlite_file": "sqlite", "sqlite_memory": "sqlite"}.get(name, name)
    try:
        module: Any = importlib.import_module(f"tests.backend_{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"tests.backend_{module_name}":
            return None
        raise
    opener = getattr(module, f"open_{name}", None) or module.open_raw
    return Backend(name, module.skip_reason, opener)


def available() -> list[Backend]:
    return [b for b in map(load, NAMES) if b is not None]
