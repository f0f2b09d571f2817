"""asyncsession: asyncio-native server-side sessions for ASGI apps.

Public API; nothing else should import from private modules. ``RedisStore``,
``SQLiteStore`` and the ASGI helpers load on first access so that
``pip install asyncsession`` alone imports and runs the memory backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.memory import MemoryStore
from .config import EVICTION_POLICIES, Config, Eviction, default_config
from .controls import (
    EVENT_TYPES,
    VIOLATION_TYPES,
    ControlledStore,
    SessionEvent,
    ViolationEvent,
    with_controls,
)
from .errors import (
    ErrorCode,
    InvalidSession,
    NotSerializable,
    SessionConflict,
    SessionError,
    SessionExpired,
    SessionLimitExceeded,
    SessionNotFound,
    SessionTooLarge,
    SiteMismatch,
    StoreClosed,
    StoreUnavailable,
    http_status,
    short_hash,
)
from .factory import open_backend, open_store
from .session import Session, generate_session_id, is_valid_session_id, new_session
from .store import Store

if TYPE_CHECKING:
    from .backends.redis import RedisStore
    from .backends.sqlite import SQLiteStore

__version__ = "0.1.0"

_LAZY = {
    "RedisStore": ".backends.redis",
    "SQLiteStore": ".backends.sqlite",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncsession' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


__all__ = [
    "EVENT_TYPES",
    "EVICTION_POLICIES",
    "VIOLATION_TYPES",
    "Config",
    "ControlledStore",
    "ErrorCode",
    "Eviction",
    "InvalidSession",
    "MemoryStore",
    "NotSerializable",
    "RedisStore",
    "SQLiteStore",
    "Session",
    "SessionConflict",
    "SessionError",
    "SessionEvent",
    "SessionExpired",
    "SessionLimitExceeded",
    "SessionNotFound",
    "SessionTooLarge",
    "SiteMismatch",
    "Store",
    "StoreClosed",
    "StoreUnavailable",
    "ViolationEvent",
    "__version__",
    "default_config",
    "generate_session_id",
    "http_status",
    "is_valid_session_id",
    "new_session",
    "open_backend",
    "open_store",
    "short_hash",
    "with_controls",
]
