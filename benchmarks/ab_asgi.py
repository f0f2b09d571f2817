"""Whole requests on Redis, this tree against another tree of asyncsession and against
starsessions, interleaved in one process (the same Starlette app as bench_asgi.py).

    git archive <commit> asyncsession | tar -x -C /tmp/old
    .venv/bin/python benchmarks/ab_asgi.py --old /tmp/old [--clients 32] [new write read]
    .venv/bin/python benchmarks/ab_asgi.py --floor [--clients 32] [new write read]

The other tree's ``asyncsession`` is imported under another name, so both run in one
event loop against one server: every variant runs a short batch in turn, round after
round, and each ratio is the median over rounds of the per-round ratio (robust on a
busy machine), with the ratio of the best batches beside it. Speed ratios: above 1
means faster than the reference. Rows: ``new`` (a request that creates a session),
``write`` (one key changed), ``read`` (read-only). Keys go under a random prefix in
``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) and are deleted after.

``--floor`` puts a ``floor`` variant in place of the other tree: ``bench_asgi.FloorMiddleware``,
the least any middleware of this design can do with redis-py: the same round trips
and scripts as ours (``HMGET`` to load; ``EVALSHA`` of the apply script with the
whole new record; ``EVALSHA`` of the insert script), sent as plain redis-py calls
with nothing else around them: no checks, hooks, events, deadlines, batching or
cookie attributes. Its ratio to starsessions is the best this design reaches on this
machine; ours to it is what the library costs on top.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_asgi as B
from conftest import PAYLOAD
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starsessions.serializers import JsonSerializer
from starsessions.stores.redis import RedisStore as StarRedisStore

import asyncsession

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")


def load_tree(root: str) -> ModuleType:
    """The ``asyncsession`` package under ``root`` as module ``asyncsession_other``
    (its imports are relative, so it runs beside this tree's)."""
    init = Path(root) / "asyncsession" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "asyncsession_other", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["asyncsession_other"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="root of the other tree")
    parser.add_argument("--floor", action="store_true", help="the floor instead of a tree")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--ops", type=int, default=0, help="requests per client per batch")
    parser.add_argument(
        "--noop-insert",
        action="store_true",
        help="row 'new' only: our insert script swapped for one that does nothing (the "
        "floor of one script call per new session: what Redis's work on it costs)",
    )
    parser.add_argument("rows", nargs="*", default=["new", "write", "read"])
    args = parser.parse_args()
    if args.noop_insert:
        if args.rows != ["new"]:
            parser.error("--noop-insert measures the row 'new' only")
        from asyncsession.backends.redis import scripts
        from asyncsession.backends.redis import store as redis_store

        redis_store.INSERT = scripts._Script("return {'ok'}", prelude=False)  # type: ignore[misc]
    ops = args.ops or (40 if args.clients == 1 else 10)
    if args.floor == bool(args.old):
        parser.error("give one of --old PATH and --floor")
    other = "floor" if args.floor else "old"
    mods = {"new": asyncsession, other: asyncsession if args.floor else load_tree(args.old)}
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    prefix = f"bench-ab-{uuid.uuid4().hex[:8]}:"
    conn = Redis.from_url(URL)
    star = StarRedisStore(connection=conn, prefix=f"{prefix}ss:")
    stores = {}
    for who, mod in mods.items():
        config = mod.Config(cleanup_interval=0, key_prefix=f"{prefix}{who}:")
        stores[who] = mod.open_store(URL, config)
        run(stores[who].__aenter__())

    def app(who: str) -> Starlette:
        if who == "star":
            return B.their_app(star)
        if who == "floor":
            return B.floor_app(stores[who])
        mw = Middleware(mods[who].SessionMiddleware, store=stores[who], cookie_name=B.COOKIE)
        return Starlette(routes=B.ROUTES, middleware=[mw])

    def cookie(who: str, row: str) -> str | None:
        if row == "new":
            return None
        if who == "star":
            session_id = secrets.token_hex(16)
            run(star.write(session_id, JsonSerializer().serialize(PAYLOAD), 0, 86_400))
            return session_id
        session = mods[who].new_session("u-1", data=dict(PAYLOAD))
        return str(run(stores[who].create(session)).id)

    variants: dict[tuple[str, str], tuple[list[Any], str]] = {}
    for row in args.rows:
        path = "/" if row == "read" else "/write"
        for who in ("new", other, "star"):
            clients = [B.Client(app(who), cookie(who, row)) for _ in range(args.clients)]
            for client in clients:
                run(client.get(path))
                assert client.status == 200, (who, row, client.status)
            variants[(row, who)] = (clients, path)

    async def batch(clients: list[Any], path: str) -> float:
        async def one(client: Any) -> None:
            for _ in range(ops):
                await client.get(path)

        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in clients))
        return (time.perf_counter() - started) / (ops * len(clients))

    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, (clients, path) in variants.items():
            times[key].append(run(batch(clients, path)))

    def ratio(ours: list[float], ref: list[float]) -> str:
        median = statistics.median(r / o for o, r in zip(ours, ref, strict=True))
        return f"{median:.2f}x (best {min(ref) / min(ours):.2f}x)"

    print(f"{args.clients} client(s), {args.rounds} rounds of {ops} requests per client")
    for row in args.rows:
        new, ref, peer = (times[(row, who)] for who in ("new", other, "star"))
        best = "  ".join(f"{w} {min(times[(row, w)]) * 1e6:.1f}" for w in ("new", other, "star"))
        print(f"{row:6s} best us: {best}")
        print(
            f"       new vs starsessions {ratio(new, peer)}   {other} vs starsessions "
            f"{ratio(ref, peer)}   new vs {other} {ratio(new, ref)}"
        )

    async def cleanup() -> None:
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        keys = [key async for key in conn.scan_iter(match=pattern, count=1000)]
        for start in range(0, len(keys), 1000):
            await conn.delete(*keys[start : start + 1000])
        for store in stores.values():
            await store.close()
        await conn.aclose()

    run(cleanup())
    loop.close()


if __name__ == "__main__":
    main()
