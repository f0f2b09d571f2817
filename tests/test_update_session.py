"""Key-level concurrency in the middleware, and ``update_session`` (in process)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asyncsession import (
    Applied,
    Changes,
    Config,
    ControlledStore,
    MemoryStore,
    Session,
    SessionConflict,
    SessionMiddleware,
    install_exception_handler,
    login,
    new_session,
    save_session,
    update_session,
)
from asyncsession.demo import create_app

BASE = "https://testserver"


class FlakyStore(ControlledStore):
    """A memory store whose next ``conflicts`` applies fail as if another process won."""

    def __init__(self) -> None:
        super().__init__(MemoryStore(Config(cleanup_interval=0)))
        self.conflicts = 0
        self.applies = 0

    async def apply(
        self, session_id: str, changes: Changes, *, base: Session | None = None
    ) -> Applied:
        self.applies += 1
        if self.conflicts:
            self.conflicts -= 1
            raise SessionConflict("another process won (test)")
        return await super().apply(session_id, changes, base=base)


CALLS: list[str] = []
GATE: dict[str, asyncio.Event] = {}


def bump(data: dict[str, Any]) -> int:
    CALLS.append("bump")
    data["n"] = data.get("n", 0) + 1
    return int(data["n"])


async def helper(request: Request) -> JSONResponse:
    if "pending" in request.query_params:
        request.session["pending"] = request.query_params["pending"]
    n = await update_session(request, bump)
    return JSONResponse({"n": n, "session": dict(request.session)})


async def helper_async(request: Request) -> JSONResponse:
    async def fn(data: dict[str, Any]) -> str:
        await asyncio.sleep(0)
        data.setdefault("cart", []).append("sku")
        return "added"

    return JSONResponse({"result": await update_session(request, fn)})


async def slow_rmw(request: Request) -> JSONResponse:
    """Reads n, waits for the test, writes n + 1 (dependent)."""
    n = request.session.get("n", 0)
    await GATE["go"].wait()
    request.session["n"] = n + 1
    return JSONResponse({"n": n + 1})


async def slow_blind(request: Request) -> JSONResponse:
    """Waits for the test, then writes color without reading it (blind)."""
    await GATE["go"].wait()
    request.session["color"] = "late"
    return JSONResponse({})


async def set_n(request: Request) -> JSONResponse:
    request.session["n"] = int(request.query_params["n"])
    request.session["color"] = "early"
    return JSONResponse({})


def make_app(store: ControlledStore) -> Starlette:
    app = Starlette(
        routes=[
            Route("/helper", helper, methods=["POST"]),
            Route("/helper-async", helper_async, methods=["POST"]),
            Route("/slow-rmw", slow_rmw, methods=["POST"]),
            Route("/slow-blind", slow_blind, methods=["POST"]),
            Route("/set-n", set_n, methods=["POST"]),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    install_exception_handler(app)
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


@pytest.fixture
async def store() -> Any:
    s = FlakyStore()
    async with s:
        yield s
    CALLS.clear()


async def _session(store: ControlledStore, **data: Any) -> dict[str, str]:
    session = await store.create(new_session(None, data=data))
    return {"cookie": f"sid={session.id}"}


async def test_dependent_write_changed_meanwhile_answers_409_and_saves_nothing(
    store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    headers = await _session(store, n=1)
    GATE["go"] = asyncio.Event()
    async with client(make_app(store)) as c:
        slow = asyncio.create_task(c.post("/slow-rmw", headers=headers))
        await asyncio.sleep(0.05)
        assert (await c.post("/set-n", params={"n": 100}, headers=headers)).status_code == 200
        GATE["go"].set()
        response = await slow
    assert response.status_code == 409
    # answered by the app's handler (install_exception_handler), as if raised inside it
    assert response.json()["error"]["code"] == "SESSION_CONFLICT"
    assert response.headers["cache-control"] == "no-store"
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 100, "color": "early"}
    # two tabs writing one key is normal browsing: logged at INFO, not WARNING (a
    # FastAPI app over uvicorn: every conflict woke whoever watches the warnings)
    assert [r.levelno for r in caplog.records if "409" in r.getMessage()] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_conflict_without_an_app_handler_is_a_plain_409(store: FlakyStore) -> None:
    headers = await _session(store, n=1)
    app = Starlette(routes=[Route("/slow-rmw", slow_rmw, methods=["POST"])])
    app.add_middleware(SessionMiddleware, store=store, cookie_name="sid")
    store.conflicts = 1
    GATE["go"] = asyncio.Event()
    GATE["go"].set()
    async with client(app) as c:
        response = await c.post("/slow-rmw", headers=headers)
    assert response.status_code == 409
    assert response.text == "Session conflict, please retry"


async def test_blind_write_is_last_writer_wins(store: FlakyStore) -> None:
    headers = await _session(store, n=1)
    GATE["go"] = asyncio.Event()
    async with client(make_app(store)) as c:
        slow = asyncio.create_task(c.post("/slow-blind", headers=headers))
        await asyncio.sleep(0.05)
        assert (await c.post("/set-n", params={"n": 7}, headers=headers)).status_code == 200
        GATE["go"].set()
        response = await slow
    assert response.status_code == 200
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 7, "color": "late"}


async def test_update_session_counts_300_concurrent_requests(store: FlakyStore) -> None:
    headers = await _session(store)
    async with client(make_app(store)) as c:
        responses = await asyncio.gather(*(c.post("/helper", headers=headers) for _ in range(300)))
    assert {r.status_code for r in responses} == {200}
    assert sorted(r.json()["n"] for r in responses) == list(range(1, 301))
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 300}


async def test_update_session_reruns_after_a_conflict(store: FlakyStore) -> None:
    headers = await _session(store, n=5)
    store.conflicts = 3
    async with client(make_app(store)) as c:
        response = await c.post("/helper", headers=headers)
    assert response.status_code == 200 and response.json()["n"] == 6
    assert CALLS == ["bump"] * 4 and store.applies == 4
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 6}


async def test_update_session_gives_up_after_its_attempts(store: FlakyStore) -> None:
    headers = await _session(store, n=5)
    store.conflicts = 1000
    async with client(make_app(store)) as c:
        response = await c.post("/helper", headers=headers)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "SESSION_CONFLICT"
    assert len(CALLS) == 10
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 5}


async def test_update_session_saves_pending_changes_first(store: FlakyStore) -> None:
    headers = await _session(store, n=1, other="x")
    async with client(make_app(store)) as c:
        response = await c.post("/helper", params={"pending": "yes"}, headers=headers)
    assert response.status_code == 200
    assert response.json() == {"n": 2, "session": {"n": 2, "other": "x", "pending": "yes"}}
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 2, "other": "x", "pending": "yes"}


async def test_update_session_without_a_session_creates_one(store: FlakyStore) -> None:
    async with client(make_app(store)) as c:
        response = await c.post("/helper")
        assert response.status_code == 200 and response.json()["n"] == 1
        sid = c.cookies["sid"]
        response = await c.post("/helper-async")
        assert response.json() == {"result": "added"}
    assert (await store.get(sid)).data == {"n": 1, "cart": ["sku"]}


async def test_update_session_whose_function_raises_changes_nothing(store: FlakyStore) -> None:
    """``fn`` raises after changing things (an ``HTTPException`` the app answers):
    nothing it changed is saved, with a stored session or without one (where it
    once ran on ``request.session`` itself and a half-done cart was stored)."""
    from starlette.exceptions import HTTPException

    def half_done(data: dict[str, Any]) -> None:
        data.setdefault("cart", []).append("raised")
        data["n"] = data.get("n", 0) + 100
        raise HTTPException(400, "out of stock")

    async def route(request: Request) -> JSONResponse:
        await update_session(request, half_done)
        return JSONResponse({})  # pragma: no cover - half_done raises

    app = make_app(store)
    app.router.routes.append(Route("/half", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/half")
        assert response.status_code == 400 and "set-cookie" not in response.headers
    assert len(store.store) == 0  # type: ignore[arg-type]
    headers = await _session(store, n=1)
    async with client(app) as c:
        response = await c.post("/half", headers=headers)
        assert response.status_code == 400
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 1}


async def test_update_session_rejects_zero_attempts(store: FlakyStore) -> None:
    with pytest.raises(ValueError):
        await update_session(None, bump, attempts=0)  # type: ignore[arg-type]


async def test_demo_counter_counts_every_concurrent_click() -> None:
    demo_store = MemoryStore.with_controls(Config(cleanup_interval=0))
    app = create_app(demo_store)
    async with demo_store:
        headers = await _session(demo_store)
        headers["cookie"] = headers["cookie"].replace("sid=", "asyncsession_demo=")
        headers["origin"] = BASE
        async with client(app) as c:
            responses = await asyncio.gather(
                *(c.post("/increment", headers=headers) for _ in range(100))
            )
        assert {r.status_code for r in responses} == {303}
        sid = headers["cookie"].split("=")[1]
        assert (await demo_store.get(sid)).data == {"counter": 100}


async def test_a_key_read_before_update_session_and_changed_meanwhile_still_conflicts(
    store: FlakyStore,
) -> None:
    """The request reads n, another request sets n, the request runs update_session
    on another key, then writes n from what it read: 409, the other request's n
    stays. update_session forgot what the request had read, so that write became a
    blind one and answered 200 over the other request's n (outside review)."""
    headers = await _session(store, n=1)
    GATE["go"] = asyncio.Event()

    async def read_update_write(request: Request) -> JSONResponse:
        n = request.session["n"]
        await GATE["go"].wait()
        await update_session(request, lambda d: d.update(other=1))
        assert request.session["n"] == n  # what this request read, still
        request.session["n"] = n + 1
        return JSONResponse({"n": n + 1})

    app = make_app(store)
    app.router.routes.append(Route("/ruw", read_update_write, methods=["POST"]))
    async with client(app) as c:
        slow = asyncio.create_task(c.post("/ruw", headers=headers))
        await asyncio.sleep(0.05)
        assert (await c.post("/set-n", params={"n": 100}, headers=headers)).status_code == 200
        GATE["go"].set()
        response = await slow
    assert response.status_code == 409, response.text
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"n": 100, "color": "early", "other": 1}


async def test_a_list_held_across_update_session_is_still_watched(store: FlakyStore) -> None:
    """A list the request took out before update_session (of another key) and
    changes afterwards is saved: update_session replaced it with a copy of the
    stored one, and the change was dropped with a 200. update_session's own keys
    show as it left them; the rest of the data as stored."""
    headers = await _session(store, cart=["a"], n=1)

    async def hold_update_append(request: Request) -> JSONResponse:
        cart = request.session["cart"]
        n = await update_session(request, bump)
        cart.append("b")
        return JSONResponse({"n": n, "session": dict(request.session)})

    app = make_app(store)
    app.router.routes.append(Route("/hua", hold_update_append, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/hua", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"n": 2, "session": {"cart": ["a", "b"], "n": 2}}
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"cart": ["a", "b"], "n": 2}


@pytest.mark.parametrize("how", ["setdefault", "getitem", "nested"])
async def test_a_list_held_across_update_session_of_the_same_key_conflicts(
    store: FlakyStore, how: str
) -> None:
    """The request holds the cart (or a list inside it); update_session's function
    changes the cart; the request then appends to what it holds. The function's
    cart replaced it, so the append answered 200 and was never stored (outside
    attacker, Redis and SQLite). It is no longer the session's: 409 (reason
    ``replaced``), and the function's write stays. Read again after the call, the
    key is the session's: a change to it is saved."""
    headers = await _session(store, cart={"items": ["a"]})

    def fn(data: dict[str, Any]) -> int:
        data["cart"]["items"].append("fn")
        data["count"] = data.get("count", 0) + 1
        return int(data["count"])

    async def hold_update_append(request: Request) -> JSONResponse:
        if how == "setdefault":
            held = request.session.setdefault("cart", {})["items"]
        elif how == "getitem":
            held = request.session["cart"]["items"]
        else:
            cart = request.session["cart"]
            held = cart["items"]
        await update_session(request, fn)
        if "again" in request.query_params:
            held = request.session["cart"]["items"]  # the session's, as fn left it
        held.append("b")
        return JSONResponse(request.session["cart"])

    app = make_app(store)
    app.router.routes.append(Route("/hold", hold_update_append, methods=["POST"]))
    sid = headers["cookie"].split("=")[1]
    async with client(app) as c:
        response = await c.post("/hold", headers=headers)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["reason"] == "replaced"
        stored = (await store.get(sid)).data
        assert stored == {"cart": {"items": ["a", "fn"]}, "count": 1}  # fn's write
        response = await c.post("/hold", params={"again": "1"}, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"items": ["a", "fn", "fn", "b"]}
    assert (await store.get(sid)).data == {"cart": {"items": ["a", "fn", "fn", "b"]}, "count": 2}


async def test_a_list_held_across_update_session_replacing_its_kind_conflicts(
    store: FlakyStore,
) -> None:
    """update_session's function turns the cart into another kind of value; the
    request then changes the list it still holds: 409, never a 200 for a change
    that cannot be stored. Left unchanged, it is no conflict."""
    headers = await _session(store, cart=["a"])

    async def hold_replace(request: Request) -> JSONResponse:
        cart = request.session["cart"]
        await update_session(request, lambda d: d.update(cart="emptied"))
        if "append" in request.query_params:
            cart.append("b")
        return JSONResponse(request.session["cart"])

    app = make_app(store)
    app.router.routes.append(Route("/replace", hold_replace, methods=["POST"]))
    sid = headers["cookie"].split("=")[1]
    async with client(app) as c:
        response = await c.post("/replace", params={"append": "1"}, headers=headers)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["reason"] == "replaced"
        assert (await store.get(sid)).data == {"cart": "emptied"}  # update_session's
        await store.apply(sid, Changes(set={"cart": ["a"]}))
        response = await c.post("/replace", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == "emptied"


async def test_update_session_never_rewrites_an_object_the_request_holds(
    store: FlakyStore,
) -> None:
    """One list under two keys of the request (``backup = cart``), then
    update_session appends to the cart: the backup, which no function touched, keeps
    what it held, in the request and in the store (review: rewriting the request's
    list in place changed the backup too, and Redis then stored it, though no save
    named it). A function that stores the request's own list under another key
    keeps it there."""
    headers = await _session(store, cart=["a"])

    async def alias_then_update(request: Request) -> JSONResponse:
        request.session["backup"] = request.session["cart"]
        await save_session(request)
        await update_session(request, lambda d: d["cart"].append("b"))
        request.session["n"] = 1  # a save after it (Redis: base= the session)
        return JSONResponse(dict(request.session))

    async def keep_own(request: Request) -> JSONResponse:
        cart = request.session["cart"]

        def fn(d: dict[str, Any]) -> None:
            d["saved"] = cart
            d["cart"] = []

        await update_session(request, fn)
        request.session["m"] = 1
        return JSONResponse(dict(request.session))

    app = make_app(store)
    app.router.routes.append(Route("/alias", alias_then_update, methods=["POST"]))
    app.router.routes.append(Route("/own", keep_own, methods=["POST"]))
    sid = headers["cookie"].split("=")[1]
    async with client(app) as c:
        response = await c.post("/alias", headers=headers)
        assert response.status_code == 200, response.text
        expected = {"cart": ["a", "b"], "backup": ["a"], "n": 1}
        assert response.json() == expected
        assert (await store.get(sid)).data == expected
        response = await c.post("/own", headers=headers)
        assert response.status_code == 200, response.text
    stored = (await store.get(sid)).data
    assert stored == {"cart": [], "backup": ["a"], "n": 1, "saved": ["a", "b"], "m": 1}


@pytest.mark.parametrize("fn_reads", ["key", "everything"])
async def test_a_list_held_across_update_session_that_only_read_it_is_saved(
    store: FlakyStore, fn_reads: str
) -> None:
    """The function only reads the cart (or iterates the whole session) and counts:
    the list the request holds is still the session's, and appending to it after
    the call is saved (review: it answered 409 'replaced', a conflict with nothing)."""
    headers = await _session(store, cart=["a"])

    def fn(data: dict[str, Any]) -> int:
        seen = len(data["cart"]) if fn_reads == "key" else len(list(data.items()))
        data["count"] = seen
        return seen

    async def hold_count_append(request: Request) -> JSONResponse:
        cart = request.session["cart"]
        await update_session(request, fn)
        cart.append("b")
        return JSONResponse(request.session["cart"])

    app = make_app(store)
    app.router.routes.append(Route("/count", hold_count_append, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/count", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == ["a", "b"]
    sid = headers["cookie"].split("=")[1]
    assert (await store.get(sid)).data == {"cart": ["a", "b"], "count": 1}


@pytest.mark.parametrize("reads", ["items", "values", "copy", "iterate"])
@pytest.mark.parametrize("meanwhile", ["changed", "added"])
async def test_a_function_that_read_every_key_reruns_when_any_changed(
    store: FlakyStore, reads: str, meanwhile: str
) -> None:
    """The function sums the session's quantities (through ``items()``, ``values()``,
    a copy or iteration) while another request changes one of them, or adds
    one: it runs again and the stored total is right (outside review: plain values
    read that way were no expectation, and a stale total was stored with a 200)."""
    headers = await _session(store, qty_a=1, qty_b=1)
    sid = headers["cookie"].split("=")[1]
    runs: list[int] = []

    async def total(data: dict[str, Any]) -> int:
        if reads == "items":
            qty = [v for k, v in data.items() if k.startswith("qty_")]
        elif reads == "values":
            qty = [v for v in data.values() if type(v) is int]
        elif reads == "copy":
            qty = [v for k, v in data.copy().items() if k.startswith("qty_")]
        else:
            qty = [data.get(k) for k in data if k.startswith("qty_")]
        if not runs:  # another request, between this load and this write
            change = {"qty_b": 10} if meanwhile == "changed" else {"qty_c": 1}
            await store.apply(sid, Changes(set=change))
        runs.append(1)
        data["total"] = sum(int(q or 0) for q in qty)
        return int(data["total"])

    async def route(request: Request) -> JSONResponse:
        return JSONResponse(await update_session(request, total))

    app = make_app(store)
    app.router.routes.append(Route("/total", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/total", headers=headers)
    assert response.status_code == 200, response.text
    stored = (await store.get(sid)).data
    assert len(runs) == 2
    quantities = [v for k, v in stored.items() if k.startswith("qty_")]
    expected = 11 if meanwhile == "changed" else 3
    assert stored["total"] == sum(quantities) == response.json() == expected, stored


async def test_the_list_update_session_returned_is_the_sessions(store: FlakyStore) -> None:
    """``cart = await update_session(request, lambda d: d.setdefault("cart", []))``,
    then ``cart.append(x)``: saved, whether or not the request read the cart before
    (outside review: when the session already had a cart, the request's own list
    stayed the value and the append to the returned one was dropped with a 200).
    Changing both the list held from before and the returned one is a conflict."""
    headers = await _session(store, cart=["book"])
    sid = headers["cookie"].split("=")[1]

    async def add(request: Request) -> JSONResponse:
        how = request.query_params["how"]
        held = request.session["cart"] if how != "untouched" else None
        cart = await update_session(request, lambda d: d.setdefault("cart", []))
        cart.append(request.query_params["sku"])
        if how == "both" and held is not None:
            held.append("other")
        return JSONResponse(request.session["cart"])

    app = make_app(store)
    app.router.routes.append(Route("/add", add, methods=["POST"]))
    async with client(app) as c:
        r = await c.post("/add", params={"how": "untouched", "sku": "pen"}, headers=headers)
        assert r.status_code == 200 and r.json() == ["book", "pen"], r.text
        r = await c.post("/add", params={"how": "held", "sku": "mug"}, headers=headers)
        assert r.status_code == 200 and r.json() == ["book", "pen", "mug"], r.text
        assert (await store.get(sid)).data == {"cart": ["book", "pen", "mug"]}
        r = await c.post("/add", params={"how": "both", "sku": "cup"}, headers=headers)
        assert r.status_code == 409 and r.json()["error"]["reason"] == "replaced", r.text
    assert (await store.get(sid)).data == {"cart": ["book", "pen", "mug"]}


@pytest.mark.parametrize("mode", ["returned", "orphan"])
async def test_lists_left_by_update_session_stay_watched_after_a_refused_save(
    store: FlakyStore, mode: str
) -> None:
    """A caught 409 from ``save_session`` reloads the session: a list the function
    returned is still the session's (its change saved), and a list the function
    replaced is still no longer the session's (its change a 409), never a 200 that
    drops it (review of the reload: both were forgotten)."""
    headers = await _session(store, cart=["a"], n=0)
    sid = headers["cookie"].split("=")[1]

    async def route(request: Request) -> JSONResponse:
        held = request.session["cart"]
        if mode == "returned":
            cart = await update_session(request, lambda d: d.setdefault("cart", []))
        else:  # the function changes the cart: the held list is not the session's
            await update_session(request, lambda d: d["cart"].append("u"))
            cart = held
        request.session["n"] = request.session["n"] + 1
        await store.apply(sid, Changes(set={"n": 100}))  # a parallel request
        with pytest.raises(SessionConflict):
            await save_session(request)
        cart.append("x")
        return JSONResponse(cart)

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
    stored = (await store.get(sid)).data
    if mode == "returned":
        assert response.status_code == 200, response.text
        assert stored == {"cart": ["a", "x"], "n": 100}
    else:
        assert response.status_code == 409 and response.json()["error"]["reason"] == "replaced"
        assert stored == {"cart": ["a", "u"], "n": 100}


async def test_a_key_read_before_a_refused_save_and_written_unread_still_conflicts(
    store: FlakyStore,
) -> None:
    """The handler reads n, writes n + 1, a parallel request sets n, the save is
    refused (409) and caught; the handler writes n + 1 again from what it read
    before: 409, not a blind write over the parallel one (review of the reload). Read
    again, the write goes through."""
    headers = await _session(store, n=0)
    sid = headers["cookie"].split("=")[1]

    async def route(request: Request) -> JSONResponse:
        n = request.session["n"]
        request.session["n"] = n + 1
        parallel = 100 if "again" in request.query_params else 50
        await store.apply(sid, Changes(set={"n": parallel}))  # a parallel request
        with pytest.raises(SessionConflict):
            await save_session(request)
        if "again" in request.query_params:
            n = request.session["n"]
        request.session["n"] = n + 1
        return JSONResponse(n + 1)

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        stale = await c.post("/r", headers=headers)
        assert stale.status_code == 409, stale.text
        assert (await store.get(sid)).data == {"n": 50}
        fresh = await c.post("/r?again=1", headers=headers)
        assert fresh.status_code == 200 and fresh.json() == 101, fresh.text
    assert (await store.get(sid)).data == {"n": 101}


@pytest.mark.parametrize("how", ["setdefault", "pop", "getitem"])
async def test_every_read_of_the_key_sees_the_list_update_session_returned(
    store: FlakyStore, how: str
) -> None:
    """The request looked at the cart, ``update_session`` returned the function's
    cart, the app appended to it: ``setdefault``, ``pop`` and ``[]`` all see the
    append (review: ``setdefault`` and ``pop`` handed out the stale list, and the
    request answered 409)."""
    headers = await _session(store, cart=["a"])
    sid = headers["cookie"].split("=")[1]

    async def route(request: Request) -> JSONResponse:
        assert "cart" in request.session
        cart = await update_session(request, lambda d: d.setdefault("cart", []))
        cart.append("b")
        if how == "pop":
            return JSONResponse(request.session.pop("cart"))
        seen = request.session.setdefault("cart", []) if how == "setdefault" else None
        seen = seen if seen is not None else request.session["cart"]
        seen.append("c")
        return JSONResponse(seen)

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
    assert response.status_code == 200, response.text
    stored = (await store.get(sid)).data
    if how == "pop":
        assert response.json() == ["a", "b"] and stored == {}
    else:
        assert response.json() == ["a", "b", "c"] and stored == {"cart": ["a", "b", "c"]}


async def test_repeated_update_session_calls_keep_no_pile_of_copies(store: FlakyStore) -> None:
    """A long-lived connection (a websocket, a loop) that holds a list and calls
    ``update_session`` again and again keeps at most one watched copy per key, and
    none for a function that returns nothing (review: one copy of the whole list
    per call, every read re-encoding them all)."""
    headers = await _session(store, cart=list(range(200)), n=0)

    async def route(request: Request) -> JSONResponse:
        request.session["cart"].append(-1)
        for _ in range(50):
            await update_session(request, lambda d: d.update(n=d["n"] + len(d["cart"])))
        quiet = len(request.session._orphans)
        for _ in range(50):
            cart = await update_session(request, lambda d: d.setdefault("cart", []))
        cart.append(-2)
        return JSONResponse([quiet, len(request.session._orphans), request.session["cart"][-2:]])

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()[0] == 0 and response.json()[1] <= 2  # (what the app may hold)
    assert response.json()[2] == [-1, -2]


@pytest.mark.parametrize("again", ["getitem", "copy", "items"])
async def test_a_key_read_again_in_any_way_after_a_refusal_is_a_fresh_read(
    store: FlakyStore, again: str
) -> None:
    """After a caught 409, reading the key again through ``copy()`` or ``items()``
    (which read every key) is as fresh a read as ``[]``: the write from it goes
    through (review: only ``[]`` cleared the read from before the refusal, so the
    others answered 409 for good)."""
    headers = await _session(store, n=0)
    sid = headers["cookie"].split("=")[1]

    async def route(request: Request) -> JSONResponse:
        request.session["n"] = request.session["n"] + 1
        await store.apply(sid, Changes(set={"n": 50}))  # a parallel request
        with pytest.raises(SessionConflict):
            await save_session(request)
        if again == "getitem":
            n = request.session["n"]
        elif again == "copy":
            n = request.session.copy()["n"]
        else:
            n = dict(request.session.items())["n"]
        request.session["n"] = n + 1
        return JSONResponse(n + 1)

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
    assert response.status_code == 200 and response.json() == 51, response.text
    assert (await store.get(sid)).data == {"n": 51}


async def test_reads_from_before_two_refusals_still_count(store: FlakyStore) -> None:
    """A read of ``n``, a refusal; a read of ``m``, a second refusal; then ``n``
    written from the first read: 409, never a blind write over the other request's
    ``n`` (review: the second refusal forgot the reads from before the first). And
    ``del`` of a key another request deleted meanwhile raises ``KeyError`` and
    records nothing (no 409 for a delete that deleted nothing)."""
    headers = await _session(store, n=0, m=0, flash="hi")
    sid = headers["cookie"].split("=")[1]

    async def route(request: Request) -> JSONResponse:
        session = request.session
        n = session["n"]
        session.get("flash")
        session["n"] = n + 1
        await store.apply(sid, Changes(set={"n": n + 50}, delete=["flash"]))
        with pytest.raises(SessionConflict):
            await save_session(request)
        with pytest.raises(KeyError):
            del session["flash"]
        if "n" not in request.query_params:
            return JSONResponse("only the delete")
        session["m"] = session["m"] + 1
        await store.apply(sid, Changes(set={"m": 7}))
        with pytest.raises(SessionConflict):
            await save_session(request)
        session["n"] = n + 1  # from the read before the first refusal
        return JSONResponse("written")

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
        assert response.status_code == 200, response.text
        response = await c.post("/r?n=1", headers=headers)
    assert response.status_code == 409, response.text
    assert (await store.get(sid)).data == {"n": 100, "m": 7}


async def test_every_list_update_session_returned_stays_the_sessions(store: FlakyStore) -> None:
    """Two calls that each return the cart, the app appending to the first one it got:
    saved (review: the second call stopped watching the first copy, and the append
    was dropped with a 200); and a loop of such calls keeps no pile of copies."""
    headers = await _session(store, cart=["a"])
    sid = headers["cookie"].split("=")[1]

    def get_cart(d: dict[str, Any]) -> list[Any]:
        return d.setdefault("cart", [])  # type: ignore[no-any-return]

    async def route(request: Request) -> JSONResponse:
        request.session["cart"]  # held from before
        first = await update_session(request, get_cart)
        await update_session(request, get_cart)
        first.append("x")
        for i in range(100):
            cart = await update_session(request, get_cart)
            cart.append(i)
            await save_session(request)
        return JSONResponse(len(request.session._orphans))

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() <= 3  # the copies the app may still hold (first, cart)
    assert (await store.get(sid)).data == {"cart": ["a", "x", *range(100)]}


async def test_the_reason_of_a_conflict_is_the_latest_sessions(
    store: FlakyStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A login elsewhere moves the session (409 ``rotated``, caught), the request logs
    in, that session is revoked: its later saves answer ``ended``, not the first
    session's ``rotated`` (review). And a list changed after ``update_session``
    replaced it (``replaced``, a bug in the app) logs at WARNING, where an ordinary
    conflict logs at INFO."""
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    headers = await _session(store, x=0, cart=["a"])
    sid = headers["cookie"].split("=")[1]
    reasons: list[str] = []

    async def route(request: Request) -> JSONResponse:
        request.session.get("x")
        await store.rotate(sid)  # a login elsewhere
        for step in ("write", "login", "write", "write"):
            if step == "login":
                session = await login(request, "alice")
                await store.delete(session.id)  # revoked at once
                continue
            request.session[f"k{len(reasons)}"] = 1
            try:
                await save_session(request)
            except SessionConflict as exc:
                reasons.append(exc.details["reason"])
        return JSONResponse(reasons)

    async def replaced(request: Request) -> JSONResponse:
        cart = request.session["cart"]
        await update_session(request, lambda d: d.update(cart=["b"]))
        cart.append("c")
        return JSONResponse("saved?")

    app = make_app(store)
    app.router.routes.append(Route("/r", route, methods=["POST"]))
    app.router.routes.append(Route("/replaced", replaced, methods=["POST"]))
    async with client(app) as c:
        response = await c.post("/r", headers=headers)
        assert reasons == ["rotated", "ended", "ended"]
        assert response.json()["error"]["reason"] == "ended"  # (its last write, refused)
        other = await _session(store, cart=["a"])
        assert (await c.post("/replaced", headers=other)).status_code == 409
    levels = {r.levelname for r in caplog.records if "409, replaced" in r.getMessage()}
    assert levels == {"WARNING"}


async def test_held_lists_nested_or_under_two_keys_or_assigned_back_are_saved(
    store: FlakyStore,
) -> None:
    """Third review of the reload: a list held only inside a returned dict
    (``cart["items"]``) across several ``update_session`` calls is still watched (it
    was let go and its append dropped with a 200); one list under two keys gets the
    change on both after a refusal (only the first did); a watched list changed and
    assigned back to its key is a write like any other (it answered 409); and after
    a refusal, ``if request.session:`` does not count as reading ``n`` again."""
    headers = await _session(store, n=0)
    sid = headers["cookie"].split("=")[1]

    async def nested(request: Request) -> JSONResponse:
        request.session.get("cart")
        got = await update_session(request, lambda d: d.setdefault("cart", {"items": []}))
        items = got["items"]
        del got
        for _ in range(2):
            await update_session(request, lambda d: d.update(n=d["n"] + 1))
        items.append("x")
        return JSONResponse(items)

    async def two_keys(request: Request) -> JSONResponse:
        shared: list[str] = []
        request.session["a"] = request.session["b"] = shared
        await save_session(request)  # stored: the list is what both keys hold
        request.session["n"] = request.session["n"] + 1
        await store.apply(sid, Changes(set={"n": 100}))
        with pytest.raises(SessionConflict):
            await save_session(request)
        shared.append("x")
        cart = await update_session(request, lambda d: d.setdefault("cart", {"items": []}))
        cart["items"].append("y")
        request.session["cart"] = cart  # assigned back
        return JSONResponse("ok")

    async def truthy(request: Request) -> JSONResponse:
        n = request.session["n"]
        request.session["n"] = n + 1
        await store.apply(sid, Changes(set={"n": n + 7}))
        with pytest.raises(SessionConflict):
            await save_session(request)
        if request.session:  # which keys there are: not a read of n's value
            request.session["n"] = n + 1
        return JSONResponse("written")

    app = make_app(store)
    for path, route in (("/nested", nested), ("/two", two_keys), ("/truthy", truthy)):
        app.router.routes.append(Route(path, route, methods=["POST"]))
    async with client(app) as c:
        assert (await c.post("/nested", headers=headers)).json() == ["x"]
        assert (await store.get(sid)).data == {"cart": {"items": ["x"]}, "n": 2}
        assert (await c.post("/two", headers=headers)).status_code == 200
        stored = (await store.get(sid)).data
        assert stored["a"] == stored["b"] == ["x"] and stored["n"] == 100
        assert stored["cart"] == {"items": ["x", "y"]}
        assert (await c.post("/truthy", headers=headers)).status_code == 409
    assert (await store.get(sid)).data["n"] == 107
