"""Memory backend at scale: memory per session, and the background cleanup.

Both use one store of the largest ``--bench-sizes`` number of sessions (default
1,000,000; users with 2 sessions each, ``PAYLOAD`` data, a controlled store with the
per-user limit 5 over ``MemoryStore``, an injected clock):

* ``test_memory_per_session`` fills it and reports the bytes each session costs
  beyond its encoded record (target <= 1 KB): the growth of the process's resident
  set over the whole fill, and ``tracemalloc`` over the last 10,000 sessions added
  at that scale plus each session's share of the store's big dict tables.
  tracemalloc is on for those 10,000 only: tracing a million-session fill takes
  many minutes. Run this file first in its process (docs/benchmarks.md does) so the
  RSS growth is not absorbed by memory an earlier benchmark freed.
* ``test_cleanup`` moves the clock past every expiry and lets the store's own
  background task (``cleanup_interval`` 10 ms) purge them while a probe task
  measures the event loop's longest stall (target < 20 ms); all must be gone
  after that one pass, and 1,000 live sessions must survive it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from conftest import PAYLOAD, PAYLOAD_JSON, ManualClock, Runner

from asyncsession import Config, ControlledStore, MemoryStore, codec, new_session, with_controls

SUITE = "memory"
SAMPLE = 10_000  # sessions added with tracemalloc on
LIVE = 1_000  # sessions that must survive the purge
TTL = timedelta(hours=1)


class PassRecordingStore(MemoryStore):
    """A MemoryStore that records each purge pass: (removed, left, seconds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes: list[tuple[int, int, float]] = []
        self.passed = asyncio.Event()

    async def purge_expired(self) -> int:
        started = time.perf_counter()
        removed = await super().purge_expired()
        self.passes.append((removed, len(self), time.perf_counter() - started))
        self.passed.set()
        return removed


@dataclass
class Big:
    raw: PassRecordingStore
    store: ControlledStore
    clock: ManualClock
    count: int
    made: int = 0

    @classmethod
    def new(cls, count: int) -> Big:
        clock = ManualClock()
        raw = PassRecordingStore(Config(cleanup_interval=0.01), clock=clock)
        store = with_controls(raw, Config(max_sessions_per_user=5, cleanup_interval=0.01))
        return cls(raw, store, clock, count)

    async def fill(self, n: int) -> None:
        """``n`` more sessions; over the whole fill, creation times spread over the 59
        minutes before the clock's start with a one-hour TTL, so the expiries spread
        over the hour after it (about 3,500 one-second buckets)."""
        start = self.clock.now
        step = timedelta(minutes=59) / max(self.count, 1)
        create = self.store.create
        for k in range(self.made, self.made + n):
            at = start - timedelta(minutes=59) + step * k
            await create(new_session(f"user-{k // 2}", ttl=TTL, data=PAYLOAD, now=at))
        self.made += n
        self.clock.now = start

    async def add_live(self) -> None:
        for n in range(LIVE):
            await self.store.create(new_session(f"live-{n}", ttl=timedelta(days=2), data=PAYLOAD))


_HANDOFF: dict[str, Big] = {}
"""The store test_memory_per_session filled, for test_cleanup (saves a second fill)."""


def _rss() -> int:
    """Resident set size in bytes (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


def _tables(raw: MemoryStore) -> int:
    """Bytes of the store's big dict tables (the per-user and per-bucket dicts are
    made per session, so tracemalloc sees them in the sample)."""
    return sum(sys.getsizeof(t) for t in (raw._entries, raw._users, raw._buckets, raw._bucket_keys))


def _record_size() -> float:
    """Mean encoded record size of a session like the stored ones (``len(encode())``:
    what the size limit measures)."""
    sample = [new_session(f"user-{n}", ttl=TTL, data=PAYLOAD) for n in range(1000)]
    return sum(len(codec.encode(s)) for s in sample) / len(sample)


def test_memory_per_session(benchmark: Any, runner: Runner, largest_size: int) -> None:
    count = largest_size
    sample = min(SAMPLE, count // 2)
    big = Big.new(count)
    gc.collect()
    rss_before = _rss()
    benchmark.pedantic(lambda: runner.run(big.fill(count - sample)), rounds=1, iterations=1)

    gc.collect()
    tables_before = _tables(big.raw)
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    runner.run(big.fill(sample))
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - traced_before
    tracer_bytes = tracemalloc.get_tracemalloc_memory()
    tables_growth = _tables(big.raw) - tables_before  # a table resize in the sample
    rss = _rss() - rss_before - tracer_bytes
    tracemalloc.stop()
    assert len(big.raw) == count

    record = _record_size()
    per_traced = (traced - tables_growth) / sample + _tables(big.raw) / count
    per_rss = rss / count
    _HANDOFF["big"] = big
    benchmark.group = f"memory footprint @ {count:,} sessions"
    benchmark.extra_info.update(
        suite=SUITE,
        role="ours",
        op="memory",
        label=f"fill {count - sample:,} sessions (controlled create)",
        sessions=count,
        record_bytes=record,
        data_bytes=len(PAYLOAD_JSON),
        tracemalloc_bytes_per_session=per_traced,
        rss_bytes_per_session=per_rss,
        rss_before_mb=rss_before / 2**20,
        overhead_tracemalloc=per_traced - record,
        overhead_rss=per_rss - record,
        targets={"overhead_tracemalloc": 1024.0, "overhead_rss": 1024.0},
    )


async def _probe(stop: asyncio.Event, stalls: list[float]) -> None:
    """Yield to the loop over and over; the longest gap between two turns is the
    longest time anything else held the event loop. Measured twice: wall-clock, and
    this thread's CPU time (which leaves out time the OS gave to other processes: on
    a busy 2-core machine the wall gap also counts being preempted)."""
    wall, cpu = time.perf_counter, time.thread_time
    last_wall, last_cpu = wall(), cpu()
    worst_wall = worst_cpu = 0.0
    while not stop.is_set():
        await asyncio.sleep(0)
        now_wall, now_cpu = wall(), cpu()
        worst_wall = max(worst_wall, now_wall - last_wall)
        worst_cpu = max(worst_cpu, now_cpu - last_cpu)
        last_wall, last_cpu = now_wall, now_cpu
    stalls.extend((worst_wall, worst_cpu))


def test_cleanup(benchmark: Any, runner: Runner, largest_size: int) -> None:
    big = _HANDOFF.pop("big", None)
    if big is None:  # run on its own (-k cleanup): fill here, untimed
        big = Big.new(largest_size)
        runner.run(big.fill(largest_size))
    runner.run(big.add_live())
    expired = big.count
    raw, clock = big.raw, big.clock
    gc.collect()
    stalls: list[float] = []

    async def one_pass() -> None:
        stop = asyncio.Event()
        probe = asyncio.ensure_future(_probe(stop, stalls))
        await asyncio.sleep(0.02)  # the probe is running before anything expires
        raw.passes.clear()
        raw.passed.clear()
        clock.advance(timedelta(hours=2))  # every session but the live ones has expired
        await raw.passed.wait()
        stop.set()
        await probe

    benchmark.pedantic(lambda: runner.run(one_pass()), rounds=1, iterations=1)
    removed, left, seconds = raw.passes[0]
    runner.run(big.store.close())
    benchmark.group = f"memory cleanup @ {expired:,} expired"
    benchmark.extra_info.update(
        suite=SUITE,
        role="ours",
        op="cleanup",
        label="background cleanup pass",
        expired=expired,
        removed=removed,
        left=left,
        pass_seconds=seconds,
        max_stall_ms=stalls[1] * 1000,
        max_stall_wall_ms=stalls[0] * 1000,
        targets={"max_stall_ms": 20.0},
    )
    assert removed == expired, "all expired sessions are gone after one pass"
    assert left == LIVE
