"""asyncsession: asyncio-native server-side sessions for ASGI apps.

Public API; nothing else should import from private modules. ``RedisStore``,
``SQLiteStore`` and the ASGI helpers load on first access so that
``pip install asyncsession`` alone imports and runs the memory backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.memory import MemoryStore
from .changes import ABSENT, Applied, Changes
from .config import EVICTION_POLICIES, Config, Eviction, default_config
from .controls import (
    EVENT_TYPES,
    VIOLATION_TYPES,
    ControlledStore,
    SessionEvent,
    ViolationEvent,
    with_controls,
)
from .crypto import generate_key
from .errors import (
    ErrorCode,
    InvalidSession,
    NotSerializable,
    SessionConflict,
    SessionCorrupt,
    SessionEnded,
    SessionError,
    SessionExpired,
    SessionLimitExceeded,
    SessionNotFound,
    SessionRotated,
    SessionTooLarge,
    SiteMismatch,
    StoreClosed,
    StoreUnavailable,
    http_status,
    short_hash,
)
from .factory import open_backend, open_store
from .session import (
    Session,
    generate_session_id,
    is_handle,
    is_valid_session_id,
    new_session,
    session_handle,
)
from .store import Store

if TYPE_CHECKING:
    from .asgi import (
        CurrentSessionDep,
        CurrentUserDep,
        SessionDep,
        SessionDict,
        SessionMiddleware,
        current_session,
        current_user_id,
        install_exception_handler,
        list_user_sessions,
        login,
        logout,
        logout_everywhere,
        require_user,
        revoke_session,
        rotate_session,
        save_session,
        session_data,
        session_error_handler,
        session_expires_at,
        update_session,
    )
    from .backends.redis import RedisStore
    from .backends.sqlite import SQLiteStore

__version__ = "0.1.0"

_LAZY = {
    "RedisStore": ".backends.redis",
    "SQLiteStore": ".backends.sqlite",
    "CurrentSessionDep": ".asgi",
    "CurrentUserDep": ".asgi",
    "SessionDep": ".asgi",
    "SessionDict": ".asgi",
    "SessionMiddleware": ".asgi",
    "current_session": ".asgi",
    "current_user_id": ".asgi",
    "install_exception_handler": ".asgi",
    "list_user_sessions": ".asgi",
    "login": ".asgi",
    "logout": ".asgi",
    "logout_everywhere": ".asgi",
    "require_user": ".asgi",
    "revoke_session": ".asgi",
    "rotate_session": ".asgi",
    "save_session": ".asgi",
    "session_data": ".asgi",
    "session_error_handler": ".asgi",
    "session_expires_at": ".asgi",
    "update_session": ".asgi",
}


_EXTRAS = {"starlette": "asgi", "redis": "redis", "hiredis": "redis", "aiosqlite": "sqlite"}
"""The extra that installs each optional library a lazy name needs."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncsession' has no attribute {name!r}")
    import importlib

    try:
        loaded = importlib.import_module(module, __name__)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        extra = _EXTRAS.get(missing)
        if extra is None:
            raise
        raise ModuleNotFoundError(
            f"asyncsession.{name} needs {missing}: pip install 'asyncsession[{extra}]'",
            name=exc.name,
        ) from exc
    return getattr(loaded, name)


__all__ = [
    "ABSENT",
    "EVENT_TYPES",
    "EVICTION_POLICIES",
    "VIOLATION_TYPES",
    "Applied",
    "Changes",
    "Config",
    "ControlledStore",
    "CurrentSessionDep",
    "CurrentUserDep",
    "ErrorCode",
    "Eviction",
    "InvalidSession",
    "MemoryStore",
    "NotSerializable",
    "RedisStore",
    "SQLiteStore",
    "Session",
    "SessionConflict",
    "SessionCorrupt",
    "SessionDep",
    "SessionDict",
    "SessionEnded",
    "SessionError",
    "SessionEvent",
    "SessionExpired",
    "SessionLimitExceeded",
    "SessionMiddleware",
    "SessionNotFound",
    "SessionRotated",
    "SessionTooLarge",
    "SiteMismatch",
    "Store",
    "StoreClosed",
    "StoreUnavailable",
    "ViolationEvent",
    "__version__",
    "current_session",
    "current_user_id",
    "default_config",
    "generate_key",
    "generate_session_id",
    "http_status",
    "install_exception_handler",
    "is_handle",
    "is_valid_session_id",
    "list_user_sessions",
    "login",
    "logout",
    "logout_everywhere",
    "new_session",
    "open_backend",
    "open_store",
    "require_user",
    "revoke_session",
    "rotate_session",
    "save_session",
    "session_data",
    "session_error_handler",
    "session_expires_at",
    "session_handle",
    "short_hash",
    "update_session",
    "with_controls",
]
