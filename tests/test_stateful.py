"""Stateful property test: a plain-Python model of the Store contract, checked against
every backend by random operation sequences (hypothesis ``RuleBasedStateMachine``).

The model holds what the store must contain (each record, field by field), which of
those are live at the injected clock, and the per-(site, user) index. Two sites with
independently drawn configs (per-user limit, eviction policy, idle timeout, default
TTL) share one raw backend through two ``ControlledStore``s. Every operation's answer
(return value, error class, violation events, eviction events) is compared with the
model, and after every step every stored record and every (site, user) listing is.

Where the contract leaves a choice open the model accepts any valid answer instead of
encoding one implementation's tie rule: which of several sessions with equal
``created_at`` (or ``last_accessed_at`` for ``lru``) is evicted, and the order of equal
``created_at`` in ``list_by_user``.

Examples per backend: ``ASYNCSESSION_STATEFUL_EXAMPLES`` (default 100, which keeps the
suite short on a 2-core machine; Redis Cluster gets a quarter), steps per example:
``ASYNCSESSION_STATEFUL_STEPS`` (default 40). The issue's 2,000 per backend, or more, by hand::

    ASYNCSESSION_STATEFUL_EXAMPLES=2000 python -m pytest tests/test_stateful.py -s

Each example runs on a fresh pair of site ids over one backend shared by the whole
run; it deletes what it stored, and the run ends by checking (admin scan) that the
backend is empty, so no example can hide state from the next.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from asyncsession import (
    Config,
    ControlledStore,
    InvalidSession,
    NotSerializable,
    Session,
    SessionConflict,
    SessionError,
    SessionEvent,
    SessionExpired,
    SessionLimitExceeded,
    SessionNotFound,
    SessionRotated,
    SessionTooLarge,
    Store,
    ViolationEvent,
    new_session,
    short_hash,
    with_controls,
)

from .backends import Backend, available
from .clock import FakeClock

T = TypeVar("T")

QUIET = logging.getLogger("tests.stateful")  # violations are asserted, not logged
QUIET.disabled = True

EXAMPLES = int(os.environ.get("ASYNCSESSION_STATEFUL_EXAMPLES", "100"))
STEPS = int(os.environ.get("ASYNCSESSION_STATEFUL_STEPS", "40"))
OP_TIMEOUT = 30.0  # seconds: an operation that takes longer is a hang, not slowness

SITES = ("a", "b")
USERS = ("alice", "bob", "carol")
MAX_SIZE = 4096
BIG = {"blob": "x" * (MAX_SIZE + 100)}  # always over the size limit
NOT_JSON = {"pair": (1, 2)}  # a tuple: orjson would silently turn it into a list
NEVER_ISSUED = "N" * 43  # well formed, never created
ADVANCES = (1e-6, 0.001, 1, 29, 30, 31, 59, 60, 61, 89, 90, 599, 600, 601, 3600)

# ------------------------------------------------------------------- strategies

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
small_data = st.dictionaries(
    st.text(max_size=8).filter(lambda key: key != "\x00enc"), _value, max_size=4
)  # ("\x00enc" is reserved: it marks encrypted data)
# ("ok", data) mostly; sometimes data the controls must refuse, leaving the store as it was
_ok = small_data.map(lambda d: ("ok", d))
payloads = st.one_of(_ok, _ok, _ok, _ok, st.just(("big", BIG)), st.just(("bad", NOT_JSON)))
site_configs = st.fixed_dictionaries(
    {
        "max_sessions_per_user": st.sampled_from([0, 1, 2, 3]),
        "eviction": st.sampled_from(["oldest", "lru", "reject"]),
        "idle_timeout": st.sampled_from([None, 30, 90]),
        "default_ttl": st.sampled_from([60, 600]),
    }
)
sites = st.sampled_from(SITES)
users = st.sampled_from(USERS)
maybe_users = st.one_of(users, st.none())
ttls = st.sampled_from([None, 30, 60, 600])
picks = st.integers(0, 63)  # index into the ids the machine has seen (modulo)
NO_METADATA: dict[str, Any] = {"organization_id": None, "ip_address": None, "user_agent": None}
metadata = st.fixed_dictionaries(
    {
        "organization_id": st.sampled_from([None, "org-1"]),
        "ip_address": st.sampled_from([None, "203.0.113.9", "::1"]),
        "user_agent": st.one_of(st.none(), st.text(max_size=20)),
    }
)

# ------------------------------------------------------------------------ model


@dataclass
class SiteModel:
    """One site's config, written out plainly so the model never calls library code."""

    site: str
    limit: int
    eviction: str
    idle: timedelta | None
    default_ttl: timedelta

    def config(self) -> Config:
        return Config(
            site_id=self.site,
            max_session_size=MAX_SIZE,
            max_sessions_per_user=self.limit,
            eviction=self.eviction,  # type: ignore[arg-type]
            idle_timeout=self.idle,
            default_ttl=self.default_ttl,
            cleanup_interval=0,
        )


def _expiry(absolute: datetime | None, now: datetime, idle: timedelta | None) -> datetime | None:
    if idle is None:
        return absolute
    if absolute is None:
        return now + idle
    return min(absolute, now + idle)


@dataclass
class Model:
    """Every record the store holds (live or expired-not-yet-purged), by id."""

    sites: dict[str, SiteModel]
    records: dict[str, Session] = field(default_factory=dict)
    # rotated id -> (site, until): the rotation records (Config.rotation_grace, 60 s)
    rotated: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    def was_rotated(self, session_id: str, site: str, now: datetime) -> bool:
        record = self.rotated.get(session_id)
        return record is not None and record[0] == site and now < record[1]

    @staticmethod
    def live(rec: Session, now: datetime) -> bool:
        return rec.expires_at is None or now < rec.expires_at

    def of_user(self, site: str, user: str) -> list[Session]:
        return [r for r in self.records.values() if r.site_id == site and r.user_id == user]

    def live_of_user(self, site: str, user: str, now: datetime) -> list[Session]:
        return [r for r in self.of_user(site, user) if self.live(r, now)]

    def state(self, session_id: str, site: str, now: datetime) -> str:
        """``missing``, ``other_site``, ``expired`` or ``live``: the contract's order."""
        rec = self.records.get(session_id)
        if rec is None:
            return "missing"
        if rec.site_id != site:
            return "other_site"
        if not self.live(rec, now):
            return "expired"
        return "live"


# ---------------------------------------------------------------------- machine


class Outcome:
    """What an operation did: its value or its ``SessionError``."""

    def __init__(self, value: Any = None, error: SessionError | None = None) -> None:
        self.value = value
        self.error = error

    def __repr__(self) -> str:
        return f"Outcome(value={self.value!r}, error={self.error!r})"


class Shared:
    """What the examples of one test run share: the event loop, the clock and one raw
    backend. Each example gets site ids of its own and deletes everything it created in
    teardown; the test checks at the end (admin scan) that nothing was left behind.
    Opening a fresh backend per example would cost more than the example itself."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.namespace = "st" + uuid.uuid4().hex[:12]
        self.raw: Store | None = None
        self.examples = 0
        self.steps = 0
        self.ties = 0  # evictions where several sessions tied at the boundary

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, OP_TIMEOUT))

    def store(self) -> Store:
        if self.raw is None:
            config = Config(cleanup_interval=0, max_session_size=0)
            self.raw = self.run(self.backend.open_raw(config, self.clock, self.namespace))
        return self.raw

    def leftovers(self) -> list[Any]:
        raw = self.store()

        async def scan() -> list[Any]:
            return [entry async for batch in raw._scan(500) for entry in batch]

        return self.run(scan())

    def close(self) -> None:
        try:
            if self.raw is not None:
                self.run(self.raw.close())
                path = getattr(self.raw, "path", None)
                if isinstance(path, str) and self.namespace in path:
                    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


class StoreMachine(RuleBasedStateMachine):
    shared: Shared  # set by ``machine_for``

    def __init__(self) -> None:
        super().__init__()
        shared = self.shared
        shared.examples += 1
        self.loop = shared.loop
        self.clock = shared.clock
        self.raw: Store | None = None
        # site labels "a" and "b" (what rules draw) name sites of this example only
        self.site_ids = {label: f"{label}{shared.examples}" for label in SITES}
        self.stores: dict[str, ControlledStore] = {}
        self.violations: dict[str, list[ViolationEvent]] = {}
        self.events: dict[str, list[SessionEvent]] = {}
        self.model = Model({})
        self.ids: list[str] = [NEVER_ISSUED]
        self.recheck: set[str] = set()  # ids a step targeted that the model says are gone

    # ---------------------------------------------------------------- plumbing

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.shared.run(coro)

    def attempt(self, call: Callable[[], Awaitable[Any]]) -> Outcome:
        async def go() -> Any:
            return await call()

        self.shared.steps += 1
        for site in self.stores:
            self.violations[site].clear()
            self.events[site].clear()
        try:
            return Outcome(self.run(go()))
        except SessionError as exc:
            return Outcome(error=exc)

    def expect_error(
        self, out: Outcome, kind: type[SessionError], *, exact: bool = True
    ) -> SessionError:
        assert out.error is not None, f"expected {kind.__name__}, got {out.value!r}"
        if exact:
            assert type(out.error) is kind, f"expected {kind.__name__}, got {out.error!r}"
        else:
            assert isinstance(out.error, kind), f"expected {kind.__name__}, got {out.error!r}"
        return out.error

    def expect_ok(self, out: Outcome) -> Any:
        assert out.error is None, f"unexpected {out.error!r}"
        return out.value

    def expect_violations(self, site: str, *kinds: str) -> None:
        got = [v.type for v in self.violations[site]]
        assert got == list(kinds), f"site {site}: violations {got}, expected {list(kinds)}"
        other = [v.type for s, vs in self.violations.items() if s != site for v in vs]
        assert other == [], f"violations reported on the wrong site: {other}"

    def pick(self, i: int) -> str:
        return self.ids[i % len(self.ids)]

    @property
    def now(self) -> datetime:
        return self.clock()

    def load(self, session_id: str) -> Session | None:
        assert self.raw is not None
        return self.stored(self.run(self.raw._load(self.raw.handle(session_id))), session_id)

    @staticmethod
    def stored(got: Session | None, session_id: str) -> Session | None:
        """A record read from storage (under its handle), under the model's id."""
        return None if got is None else replace(got, id=session_id)

    # ------------------------------------------------------------------ set-up

    def site(self, label: str) -> str:
        return self.site_ids[label]

    @initialize(a=site_configs, b=site_configs)
    def open(self, a: dict[str, Any], b: dict[str, Any]) -> None:
        self.raw = self.shared.store()
        for label, drawn in (("a", a), ("b", b)):
            site = self.site(label)
            idle = drawn["idle_timeout"]
            model = SiteModel(
                site=site,
                limit=drawn["max_sessions_per_user"],
                eviction=drawn["eviction"],
                idle=None if idle is None else timedelta(seconds=idle),
                default_ttl=timedelta(seconds=drawn["default_ttl"]),
            )
            self.model.sites[site] = model
            self.violations[site] = []
            self.events[site] = []
            self.stores[site] = with_controls(
                self.raw,
                model.config(),
                logger=QUIET,
                on_violation=self.violations[site].append,
                on_event=self.events[site].append,
            )

    def teardown(self) -> None:
        """Delete what this example stored (the shared backend outlives it): every id
        it ever saw, on both its sites, so that even after a failure (when backend and
        model disagree) the next example starts from an empty store."""

        async def clean() -> None:
            for session_id in self.ids:
                for store in self.stores.values():
                    await store.delete(session_id)

        if self.stores:
            self.run(clean())

    # ------------------------------------------------------------------- rules

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(site=sites, user=maybe_users, ttl=ttls, payload=payloads, meta=metadata)
    def create(
        self,
        site: str,
        user: str | None,
        ttl: int | None,
        payload: tuple[str, dict[str, Any]],
        meta: dict[str, Any],
    ) -> None:
        self.create_one(self.site(site), user, ttl, payload, meta)

    @rule(
        site=sites,
        user=users,
        count=st.integers(2, 5),
        tick=st.sampled_from([0, 0, 1e-6, 1]),
        ttl=ttls,
        use_first=st.booleans(),
    )
    def create_burst(
        self, site: str, user: str, count: int, tick: float, ttl: int | None, use_first: bool
    ) -> None:
        """Several logins of one user, often at the same instant: limits, eviction
        order and ties. With ``use_first`` the first of them is used (touched) between
        the later logins, so ``lru`` and ``oldest`` must evict different sessions."""
        site = self.site(site)
        first = None
        for n in range(count):
            before = len(self.ids)
            self.create_one(site, user, ttl, ("ok", {}), NO_METADATA)
            self.clock.advance(tick)
            if n == 0:
                first = self.ids[before]
            elif use_first and first is not None:
                self.touch_one(site, first)
                self.clock.advance(tick)

    def create_one(
        self,
        site: str,
        user: str | None,
        ttl: int | None,
        payload: tuple[str, dict[str, Any]],
        meta: dict[str, Any],
    ) -> None:
        kind, data = payload
        now = self.now
        cfg = self.model.sites[site]
        s = new_session(user, ttl, now=now, data=copy.deepcopy(data), **meta)
        out = self.attempt(lambda: self.stores[site].create(s))
        self.ids.append(s.id)

        if kind == "bad":
            err = self.expect_error(out, NotSerializable)
            assert err.details.get("path") == 'data["pair"]'
            self.expect_violations(site, "not_serializable")
            self.recheck.add(s.id)
            return
        if kind == "big":
            self.expect_error(out, SessionTooLarge)
            self.expect_violations(site, "size_exceeded")
            self.recheck.add(s.id)
            return

        evict_sure: list[Session] = []
        evict_maybe: list[Session] = []
        evict_count = 0
        if user is not None and cfg.limit:
            live = self.model.live_of_user(site, user, now)
            excess = len(live) - cfg.limit + 1
            if excess > 0:
                if cfg.eviction == "reject":
                    err = self.expect_error(out, SessionLimitExceeded)
                    assert err.details.get("limit") == cfg.limit
                    self.expect_violations(site, "session_limit_exceeded")
                    self.recheck.add(s.id)
                    return
                key: Callable[[Session], datetime] = (
                    (lambda r: r.last_accessed_at)
                    if cfg.eviction == "lru"
                    else (lambda r: r.created_at)
                )
                live.sort(key=key)
                boundary = key(live[excess - 1])
                evict_sure = [r for r in live if key(r) < boundary]
                evict_maybe = [r for r in live if key(r) == boundary]
                evict_count = excess
                if len(evict_sure) + len(evict_maybe) > excess:
                    self.shared.ties += 1

        created = self.expect_ok(out)
        assert created is s
        absolute = now + (cfg.default_ttl if ttl is None else timedelta(seconds=ttl))
        expected = Session(
            id=s.id,
            user_id=user,
            site_id=site,
            organization_id=meta["organization_id"],
            data=data,
            created_at=now,
            updated_at=now,
            last_accessed_at=now,
            expires_at=_expiry(absolute, now, cfg.idle),
            absolute_expires_at=absolute,
            ip_address=meta["ip_address"],
            user_agent=meta["user_agent"],
            version=0,
        )
        assert created == expected, f"create returned {created!r}, model {expected!r}"
        self.expect_violations(site)

        # eviction: every strictly-older candidate goes; ties at the boundary are the
        # backend's choice, but exactly ``evict_count`` go in total
        evicted = {r.id for r in evict_sure}
        for r in evict_sure:
            del self.model.records[r.id]
        for r in evict_maybe:
            if self.load(r.id) is None:
                evicted.add(r.id)
                del self.model.records[r.id]
        assert len(evicted) == evict_count, (
            f"evicted {len(evicted)} sessions, expected {evict_count}"
        )
        reported = {e.session for e in self.events[site] if e.type == "evicted"}
        assert reported == {short_hash(i) for i in evicted}, "evicted events disagree"
        self.recheck.update(evicted)
        self.model.records[s.id] = copy.deepcopy(expected)

    @precondition(lambda self: bool(self.model.records))
    @rule(site=sites, i=picks)
    def create_existing_id(self, site: str, i: int) -> None:
        """Insert-if-absent: an id the store still holds (even expired, even another
        site's) is refused, never overwritten."""
        site = self.site(site)
        present = sorted(self.model.records)
        session_id = present[i % len(present)]
        s = new_session("alice", now=self.now, data={"dup": True})
        s.id = session_id
        out = self.attempt(lambda: self.stores[site].create(s))
        self.expect_error(out, InvalidSession)
        self.expect_violations(site, "invalid_session")

    @rule(site=sites, i=picks)
    def get(self, site: str, i: int) -> None:
        site = self.site(site)
        session_id = self.pick(i)
        state = self.model.state(session_id, site, self.now)
        out = self.attempt(lambda: self.stores[site].get(session_id))
        if state == "missing":
            self.expect_missing(out, site, session_id)
        elif state == "other_site":
            self.expect_error(out, SessionNotFound)
            self.expect_violations(site, "site_mismatch")
        elif state == "expired":
            self.expect_error(out, SessionExpired)
            self.expect_violations(site)
        else:
            got = self.expect_ok(out)
            assert got == self.model.records[session_id]
            # an independent copy: changing it changes nothing stored
            got.data["scribble"] = [1]
            self.expect_violations(site)

    @rule(
        site=sites,
        i=picks,
        payload=payloads,
        version_offset=st.sampled_from([0, 0, 0, -1, 1]),
        forge=st.sampled_from([None, None, None, "user", "site"]),
    )
    def update(
        self,
        site: str,
        i: int,
        payload: tuple[str, dict[str, Any]],
        version_offset: int,
        forge: str | None,
    ) -> None:
        site = self.site(site)
        session_id = self.pick(i)
        now = self.now
        state = self.model.state(session_id, site, now)
        rec = self.model.records.get(session_id)
        kind, data = payload
        if rec is not None:
            client = copy.deepcopy(rec)
        else:  # a client still holding a copy of a session that is gone
            client = new_session("alice", now=now)
            client.id = session_id
            client.site_id = site
        client.data = copy.deepcopy(data)
        client.version = max(0, client.version + version_offset)
        if forge == "user":
            client.user_id = "mallory"
        elif forge == "site":
            client.site_id = self.site("b") if site == self.site("a") else self.site("a")
        before = copy.deepcopy(client)
        out = self.attempt(lambda: self.stores[site].update(client))
        if out.error is not None:
            assert client == before, "a failed update changed the caller's copy"

        if kind == "bad":
            self.expect_error(out, NotSerializable)
            self.expect_violations(site, "not_serializable")
        elif kind == "big":
            self.expect_error(out, SessionTooLarge)
            self.expect_violations(site, "size_exceeded")
        elif state == "missing":
            self.expect_missing(out, site, session_id)
        elif state == "other_site":
            self.expect_error(out, SessionNotFound)
            self.expect_violations(site, "site_mismatch")
        elif state == "expired":
            self.expect_error(out, SessionNotFound, exact=False)
            self.expect_violations(site)
        elif forge == "user":
            self.expect_error(out, InvalidSession)
            self.expect_violations(site, "invalid_session")
        elif rec is not None and before.version != rec.version:
            err = self.expect_error(out, SessionConflict)
            assert err.details.get("expected_version") == before.version
            self.expect_violations(site, "conflict")
        else:
            assert rec is not None
            updated = self.expect_ok(out)
            assert updated is client
            cfg = self.model.sites[site]
            absolute = rec.absolute_expires_at or rec.expires_at
            expected = replace(
                copy.deepcopy(before),
                site_id=site,  # the store's site is authoritative, as in create
                version=rec.version + 1,
                updated_at=now,
                last_accessed_at=now,
                expires_at=_expiry(absolute, now, cfg.idle),
                absolute_expires_at=absolute,
            )
            assert client == expected, f"update left {client!r}, model {expected!r}"
            self.expect_violations(site)
            self.model.records[session_id] = expected

    @rule(site=sites, i=picks)
    def touch(self, site: str, i: int) -> None:
        self.touch_one(self.site(site), self.pick(i))

    def touch_one(self, site: str, session_id: str) -> None:
        now = self.now
        state = self.model.state(session_id, site, now)
        out = self.attempt(lambda: self.stores[site].touch(session_id))
        if self.expect_write_error(out, state, site, session_id):
            return
        assert out.value is None
        self.expect_violations(site)
        rec = self.model.records[session_id]
        rec.last_accessed_at = now
        idle = self.model.sites[site].idle
        if idle is not None:
            rec.expires_at = _expiry(rec.absolute_expires_at or rec.expires_at, now, idle)

    def expect_missing(
        self, out: Outcome, site: str, session_id: str, *, records: bool = True
    ) -> None:
        """No such session: ``SessionRotated`` while a rotation record of this site is
        fresh (get, update, touch), ``SessionNotFound`` otherwise."""
        if records and self.model.was_rotated(session_id, site, self.now):
            self.expect_error(out, SessionRotated)
            self.expect_violations(site, "rotated")
        else:
            self.expect_error(out, SessionNotFound)
            self.expect_violations(site)
        self.recheck.add(session_id)

    def expect_write_error(
        self, out: Outcome, state: str, site: str, session_id: str, *, records: bool = True
    ) -> bool:
        """Touch and rotate: the errors for anything but a live session of this site."""
        if state == "missing":
            self.expect_missing(out, site, session_id, records=records)
        elif state == "other_site":
            self.expect_error(out, SessionNotFound)
            self.expect_violations(site, "site_mismatch")
        elif state == "expired":
            self.expect_error(out, SessionNotFound, exact=False)
            self.expect_violations(site)
        else:
            return False
        return True

    @rule(site=sites, i=picks)
    def rotate(self, site: str, i: int) -> None:
        site = self.site(site)
        session_id = self.pick(i)
        state = self.model.state(session_id, site, self.now)
        out = self.attempt(lambda: self.stores[site].rotate(session_id))
        if self.expect_write_error(out, state, site, session_id, records=False):
            return
        new_id = self.expect_ok(out)
        assert isinstance(new_id, str) and new_id != session_id and new_id not in self.ids
        self.expect_violations(site)
        rec = self.model.records.pop(session_id)
        rec.id = new_id
        self.model.records[new_id] = rec
        self.model.rotated[session_id] = (site, self.now + timedelta(seconds=60))
        self.ids.append(new_id)
        self.recheck.add(session_id)

    @rule(site=sites, i=picks)
    def delete(self, site: str, i: int) -> None:
        site = self.site(site)
        session_id = self.pick(i)
        state = self.model.state(session_id, site, self.now)
        out = self.attempt(lambda: self.stores[site].delete(session_id))
        deleted = self.expect_ok(out)
        # True when this call deleted a record: always for a live one, never for a
        # missing or other-site one; an expired record may already be gone (lazily)
        if state == "live":
            assert deleted is True
        elif state in ("missing", "other_site"):
            assert deleted is False
        else:
            assert type(deleted) is bool
        if state == "other_site":  # a silent no-op, reported
            self.expect_violations(site, "site_mismatch")
            return
        self.expect_violations(site)
        self.model.records.pop(session_id, None)
        self.recheck.add(session_id)

    @rule(
        site=sites,
        user=users,
        keep=st.one_of(st.none(), picks),
        only=st.one_of(st.none(), st.none(), picks),
    )
    def delete_by_user(self, site: str, user: str, keep: int | None, only: int | None) -> None:
        site = self.site(site)
        now = self.now
        keep_id = None if keep is None else self.pick(keep)
        only_id = None if only is None else self.pick(only)
        out = self.attempt(
            lambda: self.stores[site].delete_by_user(user, keep=keep_id, only=only_id)
        )
        if only_id is not None and only_id == keep_id:  # refused before the backend is asked
            self.expect_error(out, InvalidSession)
            self.expect_violations(site, "invalid_session")
            return
        kept = self.model.records.get(keep_id) if keep_id is not None else None
        if keep_id is not None and not (
            kept is not None
            and (kept.site_id, kept.user_id) == (site, user)
            and self.model.live(kept, now)
        ):  # not one of the user's live sessions here: nothing deleted
            if self.model.was_rotated(keep_id, site, now):
                self.expect_error(out, SessionRotated)
                self.expect_violations(site, "rotated")
            else:
                self.expect_error(out, SessionNotFound)
                self.expect_violations(site)
            return
        count = self.expect_ok(out)
        doomed = [
            r
            for r in self.model.of_user(site, user)
            if r.id != keep_id and (only_id is None or r.id == only_id)
        ]
        assert count == sum(1 for r in doomed if self.model.live(r, now))
        self.expect_violations(site)
        for r in doomed:
            del self.model.records[r.id]
            self.recheck.add(r.id)

    @rule(site=sites, user=users)
    def list_by_user(self, site: str, user: str) -> None:
        site = self.site(site)
        out = self.attempt(lambda: self.stores[site].list_by_user(user))
        self.compare_listing(self.expect_ok(out), site, user)
        self.expect_violations(site)

    @rule(site=sites)
    def purge_expired(self, site: str) -> None:
        """Purge is global: it removes every site's expired sessions."""
        site = self.site(site)
        now = self.now
        out = self.attempt(lambda: self.stores[site].purge_expired())
        expired = [i for i, r in self.model.records.items() if not self.model.live(r, now)]
        assert self.expect_ok(out) == len(expired)
        for owner in self.stores:  # each site hears of its own expired sessions
            heard = sorted(e.session or "" for e in self.events[owner] if e.type == "expired")
            mine = [i for i in expired if self.model.records[i].site_id == owner]
            assert heard == sorted(short_hash(i) for i in mine), "expired events disagree"
        for session_id in expired:
            del self.model.records[session_id]
            self.recheck.add(session_id)

    # ------------------------------------------------------------------ checks

    def compare_listing(self, got: list[Session], site: str, user: str) -> None:
        # listed by handle (the store keeps no id): compare under the model's ids
        handle = self.stores[site].handle
        expected = {handle(r.id): r for r in self.model.live_of_user(site, user, self.now)}
        assert sorted(s.id for s in got) == sorted(expected), (
            f"list_by_user({site}, {user}) ids differ"
        )
        for s in got:
            model = expected[s.id]
            assert replace(s, id=model.id) == model
        created = [s.created_at for s in got]
        assert created == sorted(created), "list_by_user is not oldest first"

    @invariant()
    def store_matches_model(self) -> None:
        """Every record the model holds is stored exactly; every record a step removed
        is gone; every (site, user) listing matches. One event-loop run for all reads."""
        raw = self.raw
        if raw is None:
            return
        present = list(self.model.records)
        removed = [i for i in self.recheck if i not in self.model.records]
        self.recheck.clear()
        pairs = [(site, user) for site in self.stores for user in USERS]

        async def read() -> tuple[list[Session | None], list[Session | None], list[Any]]:
            # concurrently: the Redis backend batches reads of one event-loop turn
            stored = await asyncio.gather(*(raw._load(raw.handle(i)) for i in present))
            gone = await asyncio.gather(*(raw._load(raw.handle(i)) for i in removed))
            listed = await asyncio.gather(
                *(self.stores[site].list_by_user(user) for site, user in pairs)
            )
            return stored, gone, listed

        stored, gone, listed = self.run(read())
        for session_id, got in zip(present, stored, strict=True):
            rec = self.model.records[session_id]
            got = self.stored(got, session_id)
            assert got == rec, f"stored record differs: {got!r}, model {rec!r}"
        assert gone == [None] * len(removed), "a removed session is still stored"
        for (site, user), sessions in zip(pairs, listed, strict=True):
            self.compare_listing(sessions, site, user)


# ------------------------------------------------------------------------ tests

BACKENDS = [b for b in available() if b.name != "sqlite_memory"]  # same code as sqlite_file
# Redis Cluster runs the Redis backend's scripts (plus slot placement) at several
# times the cost per operation on a 3-node local cluster: a quarter of the examples.
SCALE = {"redis_cluster": 0.25}


def machine_for(shared: Shared) -> type[StoreMachine]:
    name = f"StoreMachine_{shared.backend.name}"
    return type(name, (StoreMachine,), {"shared": shared})


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
def test_store_matches_model(backend: Backend) -> None:
    reason = backend.skip_reason()
    if reason:
        pytest.skip(reason)
    shared = Shared(backend)
    try:
        run_state_machine_as_test(
            machine_for(shared),
            settings=settings(
                max_examples=max(1, int(EXAMPLES * SCALE.get(backend.name, 1.0))),
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                report_multiple_bugs=False,
            ),
        )
        # every example deleted what the model said it stored: nothing may remain
        assert shared.leftovers() == []
        print(
            f"\nstateful[{backend.name}]: {shared.examples} examples, "
            f"{shared.steps} operations, {shared.ties} tied evictions"
        )
    finally:
        shared.close()
