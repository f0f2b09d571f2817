"""The store's Lua scripts, read from the ``scripts/*.lua`` package data.

Each script is the prelude (shared helpers) plus the pieces it needs, sent by SHA;
every ``_Script`` registers its source so ``NOSCRIPT`` can be recovered from by SHA
alone (``source_of``), including scripts other modules build from a Lua body.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

_SOURCES: dict[str, bytes] = {}


def lua(name: str) -> str:
    """The text of ``scripts/{name}.lua``."""
    return (files(__package__) / "scripts" / f"{name}.lua").read_text(encoding="utf-8")


class _Script:
    """A Lua script and its SHA1, computed locally (no round trip to learn it)."""

    __slots__ = ("sha", "source")

    def __init__(self, body: str, *, prelude: bool = True, first: str = "") -> None:
        self.source = (first + (PRELUDE if prelude else "") + body).encode()
        self.sha = hashlib.sha1(self.source).hexdigest()
        _SOURCES[self.sha] = self.source


def source_of(sha: str | bytes) -> bytes:
    """The source of a script by its SHA (``KeyError`` for one never built here)."""
    return _SOURCES[sha.decode() if isinstance(sha, bytes) else sha]


PRELUDE = lua("prelude")
_PRELUDE = PRELUDE  # the name the single-module backend used
_PURGE_FN = lua("purge_fn")
_INDEX_FNS = lua("index")

# (batch.lua: the merged creates' shared state; `batch` is nil in a create of its own)
_BATCH = lua("batch")
_COMMON_CREATE = _BATCH + lua("common_create")
INSERT = _Script(
    _PURGE_FN + _INDEX_FNS + "local batch = nil\n" + lua("insert"),
    first=_COMMON_CREATE + lua("insert_first"),
)
MULTI_INSERT = _Script(_PURGE_FN + _COMMON_CREATE + lua("multi_insert"))
_INSERT_FN = _BATCH + "local function insert(KEYS, ARGV, batch)\n" + lua("insert") + "\nend\n"
MULTI_INSERT_USER = _Script(_PURGE_FN + _INDEX_FNS + _INSERT_FN + lua("multi_insert_user"))
REPLACE = _Script(_PURGE_FN + _INDEX_FNS + lua("replace"), first=lua("replace_first"))
RESEAL = _Script(lua("reseal"))
TOUCH = _Script(_PURGE_FN + lua("touch"))
ROTATE = _Script(lua("rotate"))
ROTATE_INTO = _Script(_PURGE_FN + _INDEX_FNS + _INSERT_FN + lua("rotate_into"))
RETIRE = _Script(lua("retire"))
_COMMON_APPLY = lua("common_apply")
APPLY = _Script(lua("apply"), first=_COMMON_APPLY + lua("apply_first"))
MULTI_APPLY = _Script(_COMMON_APPLY + lua("multi_apply"), prelude=False)
DELETE = _Script(lua("delete"))
DELETE_BY_USER = _Script(lua("delete_by_user"))
LIST = _Script(lua("list"))
PURGE = _Script(_PURGE_FN + lua("purge"))
PURGE_SLOTS = _Script(_PURGE_FN + lua("purge_slots"))
COUNT_SLOTS = _Script(lua("count_slots"), prelude=False)
MULTI_GET = _Script(lua("multi_get"), prelude=False)
SCAN = _Script(lua("scan"), prelude=False)
ADOPT_READ = _Script(lua("adopt_read"), prelude=False)
VERIFY_READ = _Script(lua("verify_read"), prelude=False)
ADOPT = _Script(lua("adopt"))
PROBE_SCRIPT = _Script("return redis.call('EXISTS', KEYS[1])", prelude=False)
"""Run once at open on the probe key: the server lets this user run scripts."""
SCRIPTS = (
    PROBE_SCRIPT,
    APPLY,
    INSERT,
    REPLACE,
    RESEAL,
    TOUCH,
    ROTATE,
    DELETE,
    DELETE_BY_USER,
    LIST,
    PURGE,
    PURGE_SLOTS,
    COUNT_SLOTS,
    MULTI_GET,
    MULTI_INSERT,
    MULTI_INSERT_USER,
    MULTI_APPLY,
    SCAN,
    ROTATE_INTO,
    RETIRE,
    ADOPT_READ,
    VERIFY_READ,
    ADOPT,
)
"""Loaded at open (``SCRIPT LOAD``), so first calls need no ``NOSCRIPT`` recovery."""
