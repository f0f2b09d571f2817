"""Bugs the stateful model test (tests/test_stateful.py) found, each kept as the short
sequence it shrank to, run against every backend."""

from __future__ import annotations

from typing import Any

import pytest

from asyncsession import Config, SessionNotFound, ViolationEvent, new_session, with_controls

from .conftest import Harness


def cfg(site: str, **changes: Any) -> Config:
    return Config(site_id=site, cleanup_interval=0, **changes)


async def test_update_cannot_move_a_session_to_another_site(harness: Harness, clock: Any) -> None:
    """Shrunk sequence: create on site b; update through site b a copy whose ``site_id``
    says "a". The update wrote the copy's site, so the session left site b's view (but
    not its user index) and site a could read it. The store's site is authoritative on
    update exactly as on create."""
    backend = await harness.raw(cfg(""))
    a_events: list[ViolationEvent] = []
    a = with_controls(backend, cfg("a"), on_violation=a_events.append)
    b = with_controls(backend, cfg("b"))
    s = await b.create(new_session("alice", now=clock()))
    s.site_id = "a"
    await b.update(s)
    assert s.site_id == "b" and s.version == 1
    got = await b.get(s.id)
    assert got.site_id == "b" and got.version == 1
    assert [x.id for x in await b.list_by_user("alice")] == [b.handle(s.id)]
    with pytest.raises(SessionNotFound):
        await a.get(s.id)
    assert [e.type for e in a_events] == ["site_mismatch"]
    assert await a.list_by_user("alice") == []


@pytest.mark.parametrize(
    ("name", "library", "extra"),
    [
        ("SessionMiddleware", "starlette", "asgi"),
        ("RedisStore", "redis", "redis"),
        ("SQLiteStore", "aiosqlite", "sqlite"),
    ],
)
def test_a_name_whose_extra_is_missing_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, name: str, library: str, extra: str
) -> None:
    """``from asyncsession import SessionMiddleware`` without the ``asgi`` extra named
    the extra, as ``open_store`` does, not a bare "No module named 'starlette'"
    (outside newcomer)."""
    import sys

    import asyncsession

    module = asyncsession._LAZY[name][1:]
    for loaded in [
        m
        for m in sys.modules
        if m == f"asyncsession.{module}" or m.startswith(f"asyncsession.{module}.")
    ]:
        monkeypatch.delitem(sys.modules, loaded)
    for loaded in [m for m in sys.modules if m == library or m.startswith(library + ".")]:
        monkeypatch.setitem(sys.modules, loaded, None)  # (an import of it fails)
    monkeypatch.setitem(sys.modules, library, None)
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'asyncsession\[{extra}\]'"):
        getattr(asyncsession, name)
