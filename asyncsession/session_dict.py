"""The session data of one request (``request.session``): a real ``dict`` that
knows, per top-level key, whether the request read it before writing it, so the
middleware saves only what changed, as blind writes or as writes that depend on
what was read (``SessionDict.changes``)."""

from __future__ import annotations

import copy
import sys
from typing import Any

import orjson

from .changes import ABSENT, Changes
from .codec import not_serializable
from .errors import SessionConflict, SessionError

_MUTABLE = (list, dict)


class _Snapshot:
    """The JSON of a list or dict as it was when first read (it may be mutated in
    place afterwards)."""

    __slots__ = ("json",)

    def __init__(self, json: bytes | None) -> None:
        self.json = json  # None: not encodable, so always counted as changed


def _snapshot(value: Any) -> _Snapshot:
    try:
        return _Snapshot(orjson.dumps(value))
    except (TypeError, RecursionError):
        return _Snapshot(None)


def _same(before: Any, now: Any) -> bool:
    """Whether ``now`` encodes as ``before`` did (``before`` as recorded by _base)."""
    if type(before) is _Snapshot:
        return before.json is not None and _snapshot(now).json == before.json
    if before is ABSENT or type(now) is not type(before):
        return False
    if type(before) is float:  # -0.0 == 0.0, yet they are different JSON
        return bool(orjson.dumps(now) == orjson.dumps(before))
    return bool(now == before)


def _encodes_same(mine: Any, stored: Any) -> bool:
    """Whether a value (``ABSENT``: no such key) encodes as a stored one does."""
    if mine is ABSENT or stored is ABSENT:
        return mine is stored
    return _same(_snapshot(mine) if type(mine) in _MUTABLE else mine, stored)


_refcount = getattr(sys, "getrefcount", None)


def _referenced(entries: list[Any]) -> list[Any]:
    """The entries (object first) whose object, or a list or dict nested in it, something
    outside it still refers to (the app may hold ``cart["items"]`` alone): a structure
    nothing else can reach can never change again, so it is let go (a socket calling
    ``update_session`` in a loop keeps none of them). Where the interpreter cannot tell
    (no ``sys.getrefcount``), all of them."""
    if _refcount is None:
        return entries
    alone = _outside(([[]],))  # a root and a child that only the structure holds
    return [e for e in entries if any(n > a for n, a in zip(_outside(e), alone, strict=True))]


def _outside(entry: Any) -> tuple[int, int]:
    """(references to ``entry[0]`` from outside its structure, the most any list or
    dict nested in it has), each counted as ``sys.getrefcount`` counts them here."""
    assert _refcount is not None
    root = entry[0]
    nodes: dict[int, Any] = {id(root): root}
    inside: dict[int, int] = {id(root): 0}
    stack = [root]
    while stack:
        node = stack.pop()
        for child in node.values() if type(node) is dict else node:
            if type(child) in _MUTABLE:
                inside[id(child)] = inside.get(id(child), 0) + 1
                if id(child) not in nodes:
                    nodes[id(child)] = child
                    stack.append(child)
    node = child = None  # (no stray reference of this frame's)
    counts = {k: int(_refcount(v)) - inside[k] for k, v in nodes.items()}
    top = counts.pop(id(root))
    return top, max(counts.values(), default=0)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """A plain-dict copy that does not count as reading every key: ``dict(d)`` and
    ``dict.copy(d)`` go through ``keys()`` and ``[]`` once ``__iter__`` is overridden,
    iterating the items view does not."""
    return dict(dict.items(data))


class SessionDict(dict[str, Any]):
    """The session data of one request: a real ``dict`` (``request.session``).

    It remembers, per top-level key, what the key held when the request first
    touched it, and whether that first touch was a read (``[]``, ``get``, ``in``,
    ``setdefault``, ``pop``; iterating, ``len``, ``keys``/``values``/``items``,
    ``copy`` and ``==`` read every key) or a write. When the response starts only
    keys whose JSON differs are saved: a key written without being read is a blind
    write (last writer wins); a key read and then written depends on what was read,
    and if another request changed it meanwhile nothing of this request is saved and
    it answers 409. Nested mutations (``session["cart"].append(x)``) are seen (the
    key was read); setting a key to the value it already has is not a write; a
    read-only request encodes nothing unless it read a list or dict. A value reached
    around the session's own methods is not seen: call ``mark_changed(key)``.

    ``clear()`` ends the session like ``logout``: the stored record is deleted when
    the response starts, and anything written afterwards goes into a new session
    with a new id.
    """

    __slots__ = (
        "_accessed",
        "_base",
        "_blind",
        "_cleared",
        "_dirty",
        "_forced",
        "_orphans",
        "_read_all",
        "_stale",
    )

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        dict.__init__(self, data or ())
        self._base: dict[str, Any] = {}  # key -> ABSENT, a scalar, or a _Snapshot
        self._blind: set[str] = set()  # keys written before any read
        self._forced: set[str] = set()  # mark_changed
        self._read_all = False  # every key was read (iteration, len, ...)
        self._dirty = False  # written, or a list/dict handed out: commit must look
        self._cleared = False
        self._accessed = False  # handed to the app as request.session (Vary: Cookie)
        # lists and dicts the app may still hold that are no longer the value of their
        # key (update_session replaced it): (object, its JSON then, key). A change to
        # one is a conflict, unless it held what is stored for the key and the key's
        # value is unchanged: then it becomes the value (_claim_orphans)
        self._orphans: list[tuple[Any, _Snapshot, str]] = []
        # after a refused save (_refused): what the request had read of each key, so a
        # write of one not read again still depends on that read (a conflict), never
        # a blind write of a value computed from what was refused
        self._stale: dict[str, Any] = {}

    def mark_accessed(self) -> None:
        """Starlette's ``request.session`` calls this: the response may depend on the
        session however it is then used (``repr``, ``orjson.dumps``, a template), so
        it gets ``Vary: Cookie``."""
        self._accessed = True

    # -- reads

    def _read(self, key: str, value: Any) -> None:
        if type(value) in _MUTABLE:
            self._base[key] = _snapshot(value)
            self._dirty = True
        else:
            self._base[key] = value

    def __getitem__(self, key: str) -> Any:
        if self._orphans:
            self._claim_orphans(key, strict=False)
        value = dict.get(self, key, ABSENT)
        base = self._base
        if key not in base:
            if type(value) in _MUTABLE:
                self._read(key, value)
            else:  # a scalar is recorded as is: no encoding on the read path
                base[key] = value
        if value is ABSENT:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if self._orphans:
            self._claim_orphans(key, strict=False)
        value = dict.get(self, key, ABSENT)
        base = self._base
        if key not in base:
            if type(value) in _MUTABLE:
                self._read(key, value)
            else:
                base[key] = value
        return default if value is ABSENT else value

    def __contains__(self, key: object) -> bool:
        if key not in self._base and type(key) is str:
            self._read(key, dict.get(self, key, ABSENT))
        return dict.__contains__(self, key)

    def _see_all(self, values: bool = True) -> None:
        """Every key counts as read; lists and dicts are snapshotted now (they may be
        mutated through what is handed out), scalars when first written. ``values``:
        the values were read too (``items()``, ``copy()``...), not only which keys
        there are (``len``, ``in``, iterating the keys): reads kept from before a
        refused save (``_stale``) are then read again."""
        if self._orphans:
            self._claim_orphans(strict=False)
        if values and self._stale:
            self._stale = {}
        if self._read_all:
            return
        self._read_all = True
        base = self._base
        for key, value in dict.items(self):
            if key not in base and type(value) in _MUTABLE:
                base[key] = _snapshot(value)
                self._dirty = True

    def __iter__(self) -> Any:
        self._see_all(values=False)
        return dict.__iter__(self)

    def __reversed__(self) -> Any:
        self._see_all(values=False)
        return dict.__reversed__(self)

    def __len__(self) -> int:
        self._see_all(values=False)
        return dict.__len__(self)

    def __eq__(self, other: object) -> bool:
        self._see_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._see_all()
        return dict.__ne__(self, other)

    __hash__ = None

    def __or__(self, other: Any) -> Any:
        self._see_all()
        return dict.__or__(self, other)

    def __ror__(self, other: Any) -> Any:
        self._see_all()
        return dict.__ror__(self, other)

    def keys(self) -> Any:
        self._see_all(values=False)
        return dict.keys(self)

    def values(self) -> Any:
        self._see_all()
        return dict.values(self)

    def items(self) -> Any:
        self._see_all()
        return dict.items(self)

    def copy(self) -> dict[str, Any]:
        self._see_all()
        return _plain(self)

    # copy.copy, copy.deepcopy and pickle: a plain dict, as of Starlette's session (the
    # default protocol would rebuild a SessionDict through __setitem__, sharing and
    # corrupting this one's record of what the request read and wrote)
    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(self.copy(), memo)

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return (dict, (self.copy(),))

    def __reduce_ex__(self, protocol: Any) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        return self.__reduce__()

    # -- writes: remember the old value first

    def _kept_read(self, key: str) -> bool:
        """Make a read of ``key`` from before a refused save (``_stale``) its baseline,
        so a write of it depends on that read; False if there is none."""
        stale = self._stale
        if stale and key in stale:
            self._base[key] = stale.pop(key)
            return True
        return False

    def _before(self, key: str, *, kept: bool = True) -> None:
        """Before a write of ``key``: its first touch is recorded (a kept read, with
        ``kept``, or else a blind write unless every key was read)."""
        if key not in self._base and not (kept and self._kept_read(key)):
            value = dict.get(self, key, ABSENT)
            self._base[key] = _snapshot(value) if type(value) in _MUTABLE else value
            if not self._read_all:
                self._blind.add(key)
        self._dirty = True

    def __setitem__(self, key: str, value: Any) -> None:
        if self._orphans:  # the app's own write of the key wins over a watched copy
            self._drop_orphans(key)
        self._before(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        if not dict.__contains__(self, key):  # nothing deleted: a blind touch of its
            self._before(key, kept=False)  # absence, never a kept read's expectation
            raise KeyError(key)
        if self._orphans:
            self._drop_orphans(key)
        self._before(key)
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:
        if self._orphans:
            self._claim_orphans(key, strict=False)
        if key not in self._base:
            self._read(key, dict.get(self, key, ABSENT))
        self._dirty = True
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[str, Any]:
        self._see_all()
        key, value = dict.popitem(self)
        if key not in self._base:
            self._read(key, value)
        self._dirty = True
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if self._orphans:
            self._claim_orphans(key, strict=False)
        value = dict.get(self, key, ABSENT)
        if key not in self._base:
            self._read(key, value)
        if value is not ABSENT:
            return value
        self._dirty = True
        dict.__setitem__(self, key, default)
        return default

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> SessionDict:  # type: ignore[override]
        self.update(other)
        return self

    def clear(self) -> None:
        dict.clear(self)
        self._forget()
        self._cleared = True

    def mark_changed(self, key: str) -> None:
        """Save ``key`` even if no change was seen (e.g. a nested value mutated
        through a reference obtained around this dict). Unless the request read
        ``key`` first, it is a blind write."""
        if key not in self._base and not self._kept_read(key):
            self._base[key] = _Snapshot(None)
            self._blind.add(key)
        self._forced.add(key)
        self._dirty = True

    # -- for the middleware

    def changes(self, *, all_reads: bool = False) -> Changes | None:
        """What this request changed since load (or the last save), with the values
        it read of the changed keys it read first (with ``all_reads``: of every key
        it read) as expectations; None if nothing changed."""
        if not self._dirty:
            return None
        if self._orphans:
            self._claim_orphans()
        sets: dict[str, Any] = {}
        deletes: list[str] = []
        expect: dict[str, Any] = {}
        blind = self._blind
        forced = self._forced
        for key, before in self._base.items():
            if dict.__contains__(self, key):
                now = dict.__getitem__(self, key)
                if key in forced or not _same(before, now):
                    sets[key] = now
                elif not all_reads:
                    continue
            elif before is not ABSENT:
                deletes.append(key)
            elif not all_reads:
                continue
            if key not in blind:
                if type(before) is _Snapshot:
                    if before.json is not None:
                        expect[key] = orjson.Fragment(before.json)
                else:
                    expect[key] = before
        if not sets and not deletes:
            return None
        for key in sets:
            if type(key) is not str:  # (request.session[1] = ...: as for a new session)
                raise not_serializable({k: None for k in sets})
        return Changes(sets, deletes, expect)

    def _drop_orphans(self, key: str) -> None:
        """The app writes or deletes ``key`` itself: its watched copies are no longer
        the key's concern (one changed and then assigned back is the write itself)."""
        self._orphans = [entry for entry in self._orphans if entry[2] != key]

    def _claim_orphans(self, only: str | None = None, *, strict: bool = True) -> None:
        """A changed orphan that held what is stored for its key (``update_session``'s
        function returned its own copy of a list the request also holds) becomes the
        key's value while that value is unchanged; the value it displaces becomes an
        orphan. Any other changed orphan is a conflict (``strict``: raised), as its
        change cannot be saved. ``only``: the orphans of that key (a read of it)."""
        base = self._base
        for index, (obj, before, key) in enumerate(self._orphans):
            if (only is not None and key != only) or _same(before, obj):
                continue
            value = dict.get(self, key, ABSENT)
            if value is obj:  # (the key's value again: a write like any other)
                continue
            stored = base.get(key, ABSENT)
            if (
                type(stored) is _Snapshot
                and stored.json == before.json
                and type(value) in _MUTABLE
                and _same(stored, value)
            ):
                dict.__setitem__(self, key, obj)
                self._orphans[index] = (value, stored, key)
                continue
            if not strict:
                continue
            raise SessionConflict(
                "a list or dict taken from the session before update_session() "
                "replaced its key was changed afterwards (read the key again after "
                "update_session): not saved",
                details={"reason": "replaced"},
            )

    @property
    def modified(self) -> bool:
        """Whether the request changed the session (what the middleware would save
        now, or ``clear()``), as Starlette's session's ``modified``; unlike it, setting
        a key to the value it holds is no change."""
        if self._cleared:
            return True
        try:
            return self.changes() is not None
        except SessionError:  # (a value that cannot be saved: changed all the same)
            return True

    @modified.setter
    def modified(self, value: bool) -> None:
        """Accepted and ignored (Flask's ``session.modified = True``): every change
        made through the session is seen, nested ones included. Forcing a save of
        keys the request did not change would write back what it loaded over other
        requests' changes; for a value changed around the session's methods, call
        ``mark_changed(key)``."""

    def mark_modified(self) -> None:
        """Accepted and ignored, as ``modified = True`` (Starlette 1.x's session has
        this method): every change made through the session is seen already, and
        saving keys the request did not change would write back what it loaded over
        other requests' changes. For a value changed around the session's methods,
        call ``mark_changed(key)``."""

    @property
    def accessed(self) -> bool:
        """Whether the request used the session (``request.session``, a read or a
        write), as Starlette's session's ``accessed``."""
        return bool(self._accessed or self._base or self._read_all or self._cleared)

    @accessed.setter
    def accessed(self, value: bool) -> None:
        if value:
            self.mark_accessed()

    def _forget(self) -> None:
        self._orphans = []
        self._stale = {}
        self._base = {}
        self._blind = set()
        self._forced = set()
        self._read_all = False
        self._dirty = False

    def _reset(self, data: dict[str, Any]) -> None:
        """A new baseline: the stored data as loaded, created or saved."""
        dict.clear(self)
        dict.update(self, data)
        self._forget()
        self._cleared = False

    def _refused(self, stored: dict[str, Any]) -> None:
        """A save of this request was refused (a conflict the app was told of): its
        pending changes are dropped and ``stored`` is the new baseline. Every list or
        dict the app may still hold (the values of keys it touched, the orphans of
        before) is watched as an orphan from its state now: one that holds what is
        stored takes its key's place if changed (the key counts as read), any other
        one changed is a conflict. A key the request had read keeps that read for a
        write made without reading it again (``_stale``)."""
        base, blind = self._base, self._blind
        # (reads from before an earlier refusal that were not read again count too)
        reads = {**self._stale, **{k: v for k, v in base.items() if k not in blind}}
        if self._read_all:  # (a scalar it read but never wrote is not in _base)
            for key, value in dict.items(self):
                if key not in base:
                    reads[key] = _snapshot(value) if type(value) in _MUTABLE else value
        held = [(obj, key) for obj, _, key in self._orphans]
        held += [(v, k) for k in self._touched() if type(v := dict.get(self, k)) in _MUTABLE]
        self._reset(stored)
        held = _referenced(held)
        seen: set[tuple[int, str]] = set()  # (one list under two keys: watched for each)
        for obj, key in held:
            before = _snapshot(obj)
            if before.json is None or (id(obj), key) in seen:
                continue
            seen.add((id(obj), key))
            self._orphans.append((obj, before, key))
            if key not in self._base:
                self._read(key, dict.get(self, key, ABSENT))
        self._stale = {k: v for k, v in reads.items() if k not in self._base}
        self._dirty = bool(self._orphans)

    def _touched(self) -> Any:
        """The keys this request read or wrote (every key it holds, once it read all)."""
        if self._read_all:
            return self._base.keys() | dict.keys(self)
        return self._base.keys()

    def _moved(self, stored: dict[str, Any], *, taken: Any = (), returned: Any = None) -> bool:
        """The stored data is now ``stored``: a login or rotation moved it under a new
        id, or ``update_session`` wrote it (its function touched the keys in
        ``taken``), and it may hold other requests' writes made since this request's
        view. Each other key this request touched keeps its value here and what it
        read, so a write that depends on a key changed meanwhile still conflicts and
        a list or dict the app holds stays watched; the rest are the stored values.
        A key in ``taken`` counts as read at its stored value. A list or dict the app
        may still hold from before for it (a key this request touched) stays the
        value while it holds what is stored (the function only read it), and the
        function's own copy, if it ``returned`` it (or holds it in a list or dict it
        returned), takes its place if only that copy is changed later
        (``_claim_orphans``; one such copy per key, the latest); otherwise the app's object is no
        longer the session's, and a change to it (nested values included) is a
        conflict at the next save (``cart = session["cart"]``, ``update_session``
        changing the cart, ``cart.append(x)``: 409, never a 200 that drops it). A key
        this request never touched takes the function's value. True if this
        request's view of its keys is what is stored."""
        handed: Any = self._touched()  # what the app may hold
        touched = handed | stored.keys() if self._read_all else handed  # (absent ones too)
        mine = {k: dict.get(self, k, ABSENT) for k in touched if k not in taken}
        exact = all(_encodes_same(v, stored.get(k, ABSENT)) for k, v in mine.items())
        held = {k: v for k in taken if k in handed and type(v := dict.get(self, k)) in _MUTABLE}
        out = {id(returned)}  # what the function handed back to the app
        if type(returned) in (list, tuple):
            out.update(id(v) for v in returned)
        elif type(returned) is dict:
            out.update(id(v) for v in returned.values())
        order = list(dict.keys(self))
        dict.clear(self)
        dict.update(self, stored)
        for key in order:  # (the stored order; keys only this request has go last)
            value = mine.get(key, ABSENT)
            if value is not ABSENT:
                dict.__setitem__(self, key, value)
        for key, value in mine.items():
            if value is ABSENT:
                dict.pop(self, key, None)
        for key, obj in held.items():
            new = dict.get(self, key, ABSENT)
            if new is obj:
                continue
            if _encodes_same(obj, new):  # what is stored: the app's object stays the value
                dict.__setitem__(self, key, obj)
                if type(new) in _MUTABLE and id(new) in out:  # the function's own
                    self._orphans.append((new, _snapshot(new), key))
                continue
            before = _snapshot(obj)  # no longer the session's
            if before.json is not None:
                self._orphans.append((obj, before, key))
        self._orphans = _referenced(self._orphans)
        for key in taken:  # read (by the function) at what is stored now
            self._base[key] = ABSENT  # (the baseline _saved sets)
            self._blind.discard(key)
        self._saved()
        self._cleared = False
        return exact

    def _saved(self) -> None:
        """What is stored now is what this dict holds: each key the request touched
        keeps its kind (read or blind) with its current value as the new baseline.
        Lists and dicts are snapshotted again, since the app may still hold them and
        change them in place (``cart = session["cart"]``, save, ``cart.append(x)``):
        a later commit sees that."""
        base: dict[str, Any] = {}
        dirty = False
        keys = dict.keys(self) if self._read_all else self._base.keys()
        for key in keys:
            value = dict.get(self, key, ABSENT)
            if type(value) in _MUTABLE:
                base[key] = _snapshot(value)
                dirty = True
            else:
                base[key] = value
        for key in self._base:  # keys read (or deleted) as absent stay so
            base.setdefault(key, ABSENT)
        self._base = base
        self._blind = {key for key in self._blind if key in base}
        self._forced = set()
        self._dirty = dirty or bool(self._orphans)
