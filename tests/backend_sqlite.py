"""SQLite backends for the conformance suite: a file database and ``:memory:``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from asyncsession import Config, Store

from .clock import FakeClock

_ROOT = tempfile.mkdtemp(prefix="asyncsession-sqlite-")
atexit.register(shutil.rmtree, _ROOT, True)


def skip_reason() -> str | None:
    try:
        import aiosqlite  # noqa: F401
    except ImportError:
        return "aiosqlite is not installed (pip install 'asyncsession[sqlite]')"
    return None


async def open_sqlite_file(config: Config, clock: FakeClock, namespace: str) -> Store:
    from asyncsession.backends.sqlite import SQLiteStore

    directory = os.path.join(_ROOT, namespace)
    os.makedirs(directory, exist_ok=True)
    store = SQLiteStore(os.path.join(directory, "sessions.db"), config, clock=clock)
    await store.__aenter__()
    return store


async def open_sqlite_memory(config: Config, clock: FakeClock, namespace: str) -> Store:
    from asyncsession.backends.sqlite import SQLiteStore

    store = SQLiteStore(":memory:", config, clock=clock)
    await store.__aenter__()
    return store
