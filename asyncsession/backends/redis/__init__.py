"""Redis backend: ``RedisStore`` on one server, behind Sentinel, or on a Redis Cluster.

The package, one job per module: ``store`` (the ``Store`` hooks), ``layout`` (key
names: one server or a cluster), ``transport`` (batching on redis-py's public API),
``cluster`` (whole-cluster purge, count and scan), ``sentinel`` (following
failovers), ``server`` (the version check at open), ``urls`` (URL parsing) and
``scripts`` (the Lua scripts, shipped as ``scripts/*.lua``).

For scripts written elsewhere against the same layout: build them with
``_Script(lua_body)`` (the prelude's helpers ``fields``, ``here``, ``key_of``,
``live``... come first; ``_INDEX_FNS`` and ``_PURGE_FN`` can be prepended) and run
them with ``RedisStore._eval(script, keys, args)``: batched, ``NOSCRIPT`` recovered,
routed by the first key on a cluster, errors as ``StoreUnavailable``.
"""

from __future__ import annotations

from . import transport
from .scripts import (
    _INDEX_FNS,
    _PRELUDE,
    _PURGE_FN,
    APPLY,
    COUNT_SLOTS,
    DELETE,
    DELETE_BY_USER,
    INSERT,
    LIST,
    MULTI_APPLY,
    MULTI_GET,
    MULTI_INSERT,
    MULTI_INSERT_USER,
    PURGE,
    PURGE_SLOTS,
    REPLACE,
    RETIRE,
    ROTATE,
    ROTATE_INTO,
    SCAN,
    SCRIPTS,
    TOUCH,
    _Script,
    source_of,
)
from .store import (
    _OUTCOMES,
    DEFAULT_REDIS_OPTIONS,
    DEFAULT_TIMEOUT,
    PURGE_BATCH,
    SCAN_KEYS,
    SENTINEL_TIMEOUT,
    USER_BATCH,
    RedisStore,
    _us,
)
from .transport import MAX_BATCH, send_batch

__all__ = [
    "APPLY",
    "COUNT_SLOTS",
    "DEFAULT_REDIS_OPTIONS",
    "DEFAULT_TIMEOUT",
    "DELETE",
    "DELETE_BY_USER",
    "INSERT",
    "LIST",
    "MAX_BATCH",
    "MULTI_APPLY",
    "MULTI_GET",
    "MULTI_INSERT",
    "MULTI_INSERT_USER",
    "PURGE",
    "PURGE_BATCH",
    "PURGE_SLOTS",
    "REPLACE",
    "RETIRE",
    "ROTATE",
    "ROTATE_INTO",
    "SCAN",
    "SCAN_KEYS",
    "SCRIPTS",
    "SENTINEL_TIMEOUT",
    "TOUCH",
    "USER_BATCH",
    "_INDEX_FNS",
    "_OUTCOMES",
    "_PRELUDE",
    "_PURGE_FN",
    "RedisStore",
    "_Script",
    "_us",
    "send_batch",
    "source_of",
    "transport",
]
