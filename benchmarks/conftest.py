"""Shared pieces for every asyncsession benchmark suite (pytest-benchmark).

Run a suite with ``.venv/bin/pytest benchmarks/bench_memory.py --benchmark-only`` (see
docs/benchmarks.md). Files here are named ``bench_*.py`` so the normal test run
(``testpaths = ["tests"]``) never collects them; this conftest collects them when
``benchmarks/`` is given on the command line.

What a new suite (Redis, SQLite, ASGI) reuses from here:

``PAYLOAD`` / ``PAYLOAD_JSON``
    The realistic ~1 KB session data every row stores: user id, roles, CSRF token, a
    600-character access token, preferences and a 5-item cart.

``abench`` fixture (an ``AsyncBench``)
    Times async operations fairly. One long-lived event loop serves the whole run;
    each round is one ``loop.run_until_complete`` of a coroutine that awaits
    ``op(i)`` for ``ops`` consecutive ``i`` (default 1000), so loop start-up is never
    timed and the per-round cost of entering the loop (a few microseconds, see the
    ``harness`` row) is spread over the batch. Baseline and peer rows must be ``async
    def`` functions run through the same ``abench`` call, so every row pays the same
    harness cost. An optional ``setup(start, ops)`` runs untimed before each round to
    prepare that round's inputs or restore state (e.g. delete what the last round
    created, so the store stays at its size).

    Each row is described for ``benchmarks/ratios.py`` with ``suite`` (``"memory"``,
    ``"redis"``...), ``role`` (``"ours"``, ``"baseline"``, ``"peer"`` or ``"harness"``),
    ``op`` and, for our rows, ``compare`` (the ``op`` of the baseline/peer rows to divide
    by) and optional ``targets`` (minimum speed ratios). Rows pair up when ``suite``,
    ``stored`` and ``op``/``compare`` match.

``runner`` fixture (a ``Runner``)
    The event loop itself, for untimed async setup: ``runner.run(store.create(...))``.

``interleave(runner, variants, ops=, rounds=)`` and ``paired(times, ours, ref)``
    For targets on a busy machine: every variant runs one short batch in turn, round
    after round (CPU clock by default), and ``paired`` gives the median of the
    per-round speed ratios. pytest-benchmark's rows run one after another, so load
    from other processes lands on some rows and not others; use these for verdicts.

``stored`` argument
    A test that takes ``stored`` runs once per size in ``--bench-sizes`` (env
    ``ASYNCSESSION_BENCH_SIZES``, default ``10000,1000000``): how many sessions sit in
    the store while it is measured. ``largest_size`` is the biggest of them (used for
    the cleanup and memory benchmarks). ``--bench-sizes=10000`` gives a quick smoke run.

``ManualClock``
    An injectable clock the benchmark advances by hand (expiry without sleeping).

Times in the pytest-benchmark table are per round; with the default 1000 ops per
round, milliseconds per round read as microseconds per operation. ``ratios.py``
prints per-operation times and the ratios.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import string
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncsession import new_session

# ---------------------------------------------------------------------- payload


def _token(rng: random.Random, length: int) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(rng.choice(alphabet) for _ in range(length))


_rng = random.Random(2)
PAYLOAD: dict[str, Any] = {
    "user_id": "u-48213",
    "roles": ["member", "editor", "billing"],
    "csrf_token": _token(_rng, 43),
    "access_token": _token(_rng, 600),
    "preferences": {
        "theme": "dark",
        "locale": "en-GB",
        "timezone": "Europe/Berlin",
        "page_size": 50,
        "newsletter": False,
    },
    "cart": [
        {"sku": f"SKU-{10001 + i}", "qty": i % 3 + 1, "price_cents": 1299 + 250 * i}
        for i in range(5)
    ],
}
"""The session data every row stores (1089 bytes as compact JSON). Treat as read-only."""

PAYLOAD_JSON: bytes = orjson.dumps(PAYLOAD)


# ---------------------------------------------------------------------- options

DEFAULT_SIZES = "10000,1000000"
DEFAULT_OPS = 1000
DEFAULT_ROUNDS = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asyncsession benchmarks")
    group.addoption(
        "--bench-sizes",
        default=os.environ.get("ASYNCSESSION_BENCH_SIZES", DEFAULT_SIZES),
        help="comma-separated numbers of stored sessions to measure at "
        f"(env ASYNCSESSION_BENCH_SIZES, default {DEFAULT_SIZES}); the largest is also "
        "the size of the cleanup and memory benchmarks",
    )
    group.addoption(
        "--bench-ops",
        type=int,
        default=int(os.environ.get("ASYNCSESSION_BENCH_OPS", DEFAULT_OPS)),
        help=f"awaited operations per round (env ASYNCSESSION_BENCH_OPS, default {DEFAULT_OPS})",
    )
    group.addoption(
        "--bench-rounds",
        type=int,
        default=int(os.environ.get("ASYNCSESSION_BENCH_ROUNDS", DEFAULT_ROUNDS)),
        help=f"timed rounds per row (env ASYNCSESSION_BENCH_ROUNDS, default {DEFAULT_ROUNDS})",
    )


def bench_sizes(config: pytest.Config) -> list[int]:
    raw = str(config.getoption("--bench-sizes"))
    sizes = sorted({int(part.replace("_", "")) for part in raw.split(",") if part.strip()})
    if not sizes or sizes[0] < 0:
        raise pytest.UsageError(f"--bench-sizes needs non-negative integers, got {raw!r}")
    return sizes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "stored" in metafunc.fixturenames:
        sizes = bench_sizes(metafunc.config)
        # module scope: fixtures that fill a store per size are built once per size
        metafunc.parametrize("stored", sizes, ids=[f"stored={n}" for n in sizes], scope="module")


@pytest.fixture(scope="session")
def largest_size(pytestconfig: pytest.Config) -> int:
    return bench_sizes(pytestconfig)[-1]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` from a directory run (files named on the command line are
    collected by pytest itself)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ---------------------------------------------------------------------- harness


class Runner:
    """One event loop for the whole benchmark run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, awaitable: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(awaitable)

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@pytest.fixture(scope="session")
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


Op = Callable[[int], Awaitable[Any]]


class AsyncBench:
    """``abench(op, ...)`` times ``await op(i)`` in batches; see the module docstring."""

    def __init__(self, benchmark: Any, runner: Runner, ops: int, rounds: int) -> None:
        self.benchmark = benchmark
        self.runner = runner
        self.ops = ops
        self.rounds = rounds

    def describe(
        self,
        *,
        suite: str,
        role: str,
        op: str,
        label: str,
        group: str | None = None,
        stored: int | None = None,
        compare: str | None = None,
        targets: dict[str, float] | None = None,
        **extra: Any,
    ) -> None:
        """Tag the row for the table (``group``) and for ``ratios.py`` (``extra_info``)."""
        if group is not None:
            self.benchmark.group = group if stored is None else f"{group} @ {stored:,} stored"
        info = self.benchmark.extra_info
        info.update(suite=suite, role=role, op=op, label=label, **extra)
        if stored is not None:
            info["stored"] = stored
        if compare is not None:
            info["compare"] = compare
        if targets:
            info["targets"] = targets

    def __call__(
        self,
        op: Op,
        *,
        setup: Callable[[int, int], Any] | None = None,
        ops: int | None = None,
        rounds: int | None = None,
        warmup_rounds: int = 1,
    ) -> None:
        """Run ``rounds`` timed rounds (after ``warmup_rounds`` untimed ones) of
        ``await op(i)`` for ``i`` in ``range(start, start + ops)``; ``start`` grows by
        ``ops`` every round, so ``op`` can use ``i`` to pick fresh inputs."""
        n = ops or self.ops
        starts = itertools.count(0, n)
        run = self.runner.loop.run_until_complete

        async def batch(start: int) -> None:
            for i in range(start, start + n):
                await op(i)

        def prepare() -> tuple[tuple[int], dict[str, Any]]:
            start = next(starts)
            if setup is not None:
                setup(start, n)
            return (start,), {}

        def one_round(start: int) -> None:
            run(batch(start))

        self.benchmark.extra_info["ops_per_round"] = n
        self.benchmark.pedantic(
            one_round,
            setup=prepare,
            rounds=rounds or self.rounds,
            warmup_rounds=warmup_rounds,
        )


@pytest.fixture
def abench(benchmark: Any, runner: Runner, pytestconfig: pytest.Config) -> AsyncBench:
    return AsyncBench(
        benchmark,
        runner,
        ops=int(pytestconfig.getoption("--bench-ops")),
        rounds=int(pytestconfig.getoption("--bench-rounds")),
    )


# ------------------------------------------------------------------ interleaved


Variant = tuple[Op, Callable[[int, int], Any] | None]
"""``(op, setup)`` for ``interleave``: ``setup(start, ops)`` runs untimed before each batch."""


def interleave(
    runner: Runner,
    variants: dict[str, Variant],
    *,
    ops: int,
    rounds: int,
    clock: Callable[[], float] = time.thread_time,
) -> dict[str, list[float]]:
    """Per-operation seconds of each variant, one batch each per round, round after round.

    pytest-benchmark runs rows one after another, so on a busy machine the neighbours'
    load lands on some rows and not others. Alternating short batches puts every
    variant under the same conditions, and ``paired`` compares batches of one round.
    The default clock is the thread's CPU time (blind to time the OS gives other
    processes): right for in-process work, wrong for anything that waits on a server.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    starts = dict.fromkeys(variants, 0)

    async def batch(op: Op, start: int) -> float:
        began = clock()
        for i in range(start, start + ops):
            await op(i)
        return clock() - began

    for _ in range(rounds):
        for name, (op, setup) in variants.items():
            start = starts[name]
            starts[name] += ops
            if setup is not None:
                setup(start, ops)
            times[name].append(runner.run(batch(op, start)) / ops)
    return times


def paired(times: dict[str, list[float]], ours: str, reference: str) -> tuple[float, float]:
    """Speed ratio of ``ours`` against ``reference`` (reference time / our time) as the
    median over rounds of the per-round ratio, and as the ratio of the best batches."""
    per_round = sorted(r / o for o, r in zip(times[ours], times[reference], strict=True))
    return statistics.median(per_round), min(times[reference]) / min(times[ours])


# ------------------------------------------------------------------------ clock


class ManualClock:
    """A clock the benchmark moves by hand: ``clock.advance(seconds)``."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | float) -> datetime:
        self.now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        return self.now


# ---------------------------------------------------- rows every backend suite has


def update_row(
    abench: AsyncBench,
    runner: Runner,
    store: Any,
    ids: list[str],
    *,
    suite: str,
    kind: str,
    stored: int,
) -> None:
    """``update`` of stored sessions (each op updates a fresh copy read in the setup)."""
    batch: list[Any] = []
    update = store.update

    async def op(i: int) -> Any:
        return await update(batch[i % len(batch)])

    async def load(start: int, n: int) -> None:
        batch[:] = [await store.get(ids[(start + k) % len(ids)]) for k in range(n)]

    abench.describe(
        suite=suite,
        role="ours",
        op="update",
        compare="write",
        label=f"{kind} update",
        group=f"{suite} write",
        stored=stored,
    )
    abench(op, setup=lambda start, n: runner.run(load(start, n)))


def touch_row(
    abench: AsyncBench, store: Any, ids: list[str], *, suite: str, kind: str, stored: int
) -> None:
    """``touch`` of stored sessions."""
    touch = store.touch

    async def op(i: int) -> None:
        await touch(ids[i % len(ids)])

    abench.describe(
        suite=suite,
        role="ours",
        op="touch",
        label=f"{kind} touch",
        group=f"{suite} touch",
        stored=stored,
    )
    abench(op)


def concurrently(op: Op, workers: int, per_worker: int) -> Op:
    """One round = ``workers`` tasks, each awaiting ``per_worker`` operations in a row
    (``workers`` requests in flight on one app server)."""

    async def worker(base: int) -> None:
        for k in range(per_worker):
            await op(base + k * workers)

    async def round_(i: int) -> None:
        start = i * workers * per_worker
        await asyncio.gather(*(worker(start + w) for w in range(workers)))

    return round_


def measure_concurrent(
    abench: AsyncBench,
    op: Op,
    *,
    workers: int,
    per_worker: int,
    setup: Callable[[int, int], Any] | None = None,
) -> None:
    """Time ``op`` as ``concurrently`` runs it; rows report time per operation."""
    per_round = workers * per_worker
    abench(
        concurrently(op, workers, per_worker),
        ops=1,
        setup=None if setup is None else lambda start, n: setup(start * per_round, per_round),
    )
    abench.benchmark.extra_info["ops_per_round"] = per_round  # times per operation
    abench.benchmark.extra_info["tasks"] = workers


async def fill_sessions(store: Any, limit_users: list[str], limit: int, total: int) -> list[str]:
    """``total`` sessions storing ``PAYLOAD``, created through ``store`` 500 at a time:
    ``limit`` for each of ``limit_users`` (users at their limit), the rest for users
    with 2 sessions each. Returns the ids of the latter (never evicted)."""
    for start in range(0, len(limit_users) * limit, 500):
        await asyncio.gather(
            *(
                store.create(new_session(limit_users[n % len(limit_users)], data=PAYLOAD))
                for n in range(start, start + 500)
            )
        )
    ids: list[str] = []
    rest = total - len(limit_users) * limit
    for start in range(0, rest, 500):
        batch = await asyncio.gather(
            *(
                store.create(new_session(f"user-{n // 2}", data=PAYLOAD))
                for n in range(start, min(start + 500, rest))
            )
        )
        ids += [s.id for s in batch]
    return ids
