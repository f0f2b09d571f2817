"""asyncsession.instrument: the values OpenTelemetry and Prometheus actually receive."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from asyncsession import (
    Config,
    ControlledStore,
    MemoryStore,
    SessionConflict,
    SessionEvent,
    SessionNotFound,
    StoreUnavailable,
    new_session,
    short_hash,
    with_controls,
)
from asyncsession.instrument import DEFAULT_BUCKETS, instrument, metrics

from .clock import FakeClock

pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from prometheus_client import CollectorRegistry

CFG = Config(site_id="shop", max_sessions_per_user=5, cleanup_interval=0)


def controlled(clock: FakeClock, **options: Any) -> ControlledStore:
    return MemoryStore.with_controls(CFG, clock=clock, **options)


async def workload(store: ControlledStore, clock: FakeClock) -> dict[str, str]:
    """A fixed mix of operations; returns the ids it used (to check they never leak)."""
    a = await store.create(new_session("alice", 60, now=clock()))
    b = await store.create(new_session("alice", 5, now=clock()))
    await store.get(a.id)
    loaded = await store.get(a.id)
    with pytest.raises(SessionNotFound):
        await store.get("missing-session-id-0000")
    loaded.data["n"] = 1
    stale = await store.get(a.id)
    await store.update(loaded)
    with pytest.raises(SessionConflict):
        await store.update(stale)
    await store.touch(a.id)
    new_a = await store.rotate(a.id)
    await store.list_by_user("alice")
    clock.advance(10)
    assert await store.purge_expired() == 1  # b
    await store.delete(new_a, leave_record=True)  # a logout (its own hook): counted too
    await store.delete(new_a)  # idempotent: a miss
    assert await store.delete_by_user("alice") == 0
    return {"a": a.id, "b": b.id, "new_a": new_a}


EXPECTED_CALLS = {
    ("create", "ok"): 2,
    ("get", "ok"): 3,
    ("get", "session_not_found"): 1,
    ("update", "ok"): 1,
    ("update", "session_conflict"): 1,
    ("touch", "ok"): 1,
    ("rotate", "ok"): 1,
    ("list_by_user", "ok"): 1,
    ("purge_expired", "ok"): 1,
    ("delete", "ok"): 1,
    ("delete", "session_not_found"): 1,
    ("delete_by_user", "ok"): 1,
}
EXPECTED_EVENTS = {"created": 2, "updated": 1, "rotated": 1, "expired": 1, "deleted": 1}


async def test_prometheus_values(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    store = instrument(controlled(clock), registry=registry, latency_samples_per_second=None)
    ids = await workload(store, clock)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"backend": "memory", "site": "shop", **labels})

    for (op, outcome), n in EXPECTED_CALLS.items():
        assert value("asyncsession_operations_total", operation=op, outcome=outcome) == n, op
    calls = {
        (s.labels["operation"], s.labels["outcome"]): s.value
        for family in registry.collect()
        if family.name == "asyncsession_operations"
        for s in family.samples
    }
    assert calls == EXPECTED_CALLS  # nothing else
    for op in ("get", "update", "delete"):
        total = sum(n for (o, _), n in EXPECTED_CALLS.items() if o == op)
        assert value("asyncsession_operation_duration_seconds_count", operation=op) == total
        assert value("asyncsession_operation_duration_seconds_bucket", operation=op, le="+Inf") == (
            total
        )
        fast = value("asyncsession_operation_duration_seconds_bucket", operation=op, le="0.25")
        assert fast == total  # memory calls take microseconds
        took = value("asyncsession_operation_duration_seconds_sum", operation=op)
        assert took is not None and 0 < took < 0.25 * total
    for kind, n in EXPECTED_EVENTS.items():
        assert value("asyncsession_events_total", type=kind) == n, kind
    assert value("asyncsession_violations_total", type="conflict") == 1
    # Labels are backend, site, operation, outcome, type: never a session or user id.
    for family in registry.collect():
        for sample in family.samples:
            text = repr(sample.labels)
            assert "alice" not in text
            for sid in ids.values():
                assert sid not in text and short_hash(sid) not in text


async def test_prometheus_buckets_are_cumulative(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    store = instrument(
        controlled(clock), registry=registry, buckets=(1e-9, 10.0), latency_samples_per_second=None
    )
    s = await store.create(new_session("bob", now=clock()))
    for _ in range(3):
        await store.get(s.id)

    def bucket(le: str) -> float | None:
        return registry.get_sample_value(
            "asyncsession_operation_duration_seconds_bucket",
            {"backend": "memory", "site": "shop", "operation": "get", "le": le},
        )

    assert (bucket("1e-09"), bucket("10.0"), bucket("+Inf")) == (0, 3, 3)


def otel_metrics(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }


async def test_opentelemetry_values(clock: FakeClock) -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    store = instrument(controlled(clock), meter=meter, latency_samples_per_second=None)
    await workload(store, clock)
    got = otel_metrics(reader)
    calls = {
        (p.attributes["operation"], p.attributes["outcome"]): p.value
        for p in got["asyncsession.operations"].data.data_points
    }
    assert calls == EXPECTED_CALLS
    assert all(
        p.attributes["backend"] == "memory" and p.attributes["site"] == "shop"
        for p in got["asyncsession.operations"].data.data_points
    )
    events = {p.attributes["type"]: p.value for p in got["asyncsession.events"].data.data_points}
    assert events == EXPECTED_EVENTS
    violations = {
        p.attributes["type"]: p.value for p in got["asyncsession.violations"].data.data_points
    }
    assert violations == {"conflict": 1}
    duration = got["asyncsession.operation.duration"]
    assert duration.unit == "s"
    points = {
        (p.attributes["operation"], p.attributes.get("outcome", "ok")): p
        for p in duration.data.data_points
    }
    assert {key: p.count for key, p in points.items()} == EXPECTED_CALLS
    get = points[("get", "ok")]
    assert tuple(get.explicit_bounds) == DEFAULT_BUCKETS
    assert sum(get.bucket_counts) == 3 and 0 < get.sum < 0.75


async def test_latency_is_sampled_under_load_counts_stay_exact(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    store = instrument(controlled(clock), registry=registry, latency_samples_per_second=50)
    s = await store.create(new_session("carol", now=clock()))
    for _ in range(5_000):
        await store.get(s.id)
    labels = {"backend": "memory", "site": "shop", "operation": "get"}
    assert (
        registry.get_sample_value("asyncsession_operations_total", {**labels, "outcome": "ok"})
        == 5_000
    )
    timed = registry.get_sample_value("asyncsession_operation_duration_seconds_count", labels)
    assert timed is not None and 0 < timed < 1_000
    stats = metrics(store)
    assert stats is not None and stats.operations["get"].calls == 5_000


async def test_spans_inside_a_recorded_trace(clock: FakeClock) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    store = instrument(controlled(clock), tracer=tracer)
    s = await store.create(new_session("dave", now=clock()))
    assert exporter.get_finished_spans() == ()  # no recording parent: no span
    with tracer.start_as_current_span("request"):
        await store.get(s.id)
        stale = await store.get(s.id)
        await store.update(await store.get(s.id))
        with pytest.raises(SessionConflict):
            await store.update(stale)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    get = spans["asyncsession.get"]
    request = spans["request"]
    assert get.parent is not None and get.parent.span_id == request.context.span_id
    assert get.attributes is not None
    assert get.attributes["asyncsession.session"] == short_hash(s.id)
    assert get.attributes["asyncsession.backend"] == "memory"
    assert get.attributes["asyncsession.operation"] == "get"
    updates = [x for x in exporter.get_finished_spans() if x.name == "asyncsession.update"]
    assert [x.attributes["asyncsession.outcome"] for x in updates if x.attributes] == [
        "ok",
        "session_conflict",
    ]
    for span in exporter.get_finished_spans():
        assert s.id not in repr(span.attributes)


async def test_root_spans(clock: FakeClock) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = instrument(controlled(clock), tracer=provider.get_tracer("test"), root_spans=True)
    s = await store.create(new_session("erin", now=clock()))
    await store.get(s.id)
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["asyncsession.create", "asyncsession.get"]
    assert all(span.parent is None for span in spans)


async def test_backend_errors_are_outcomes_and_span_errors(clock: FakeClock) -> None:
    class Flaky(MemoryStore):
        async def _load(self, session_id: str) -> Any:
            raise StoreUnavailable("backend down")

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    store = instrument(
        with_controls(Flaky(CFG, clock=clock), CFG),
        registry=registry,
        tracer=provider.get_tracer("test"),
        root_spans=True,
    )
    with pytest.raises(StoreUnavailable):
        await store.get("some-session-id-00000")
    labels = {"backend": "memory", "site": "shop", "operation": "get"}
    assert (
        registry.get_sample_value(
            "asyncsession_operations_total", {**labels, "outcome": "store_unavailable"}
        )
        == 1
    )
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes["error.type"] == "store_unavailable"
    assert not span.status.is_ok


async def test_twin_shares_the_backend_and_sends_expired_once(clock: FakeClock) -> None:
    events: list[SessionEvent] = []
    original = controlled(clock, on_event=events.append)
    twin = instrument(original)
    assert twin is not original and twin.store is original.store
    assert type(original) is ControlledStore and "_load" not in vars(original)
    assert isinstance(twin, ControlledStore) and twin.config is original.config
    s = await original.create(new_session("fay", 5, now=clock()))  # not counted
    t = await twin.create(new_session("fay", 5, now=clock()))
    assert (await twin.get(s.id)).id == s.id  # same backend
    clock.advance(10)
    assert await original.purge_expired() == 2  # through either, or the backend
    expired = [e.session for e in events if e.type == "expired"]
    assert sorted(expired) == sorted([short_hash(s.id), short_hash(t.id)])  # once each
    stats = metrics(twin)
    assert stats is not None and stats.events == {"created": 1, "expired": 2}
    assert metrics(original) is None
    with pytest.raises(ValueError, match="already instrumented"):
        instrument(original)
    with pytest.raises(ValueError, match="already instrumented"):
        instrument(twin)
    with pytest.raises(TypeError, match="controlled store"):
        instrument(MemoryStore(CFG))  # type: ignore[arg-type]


async def test_shared_registry_sums_per_site(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    backend = MemoryStore(CFG, clock=clock)
    shop = instrument(with_controls(backend, CFG), registry=registry)
    blog_cfg = Config(site_id="blog", cleanup_interval=0)
    blog = instrument(with_controls(backend, blog_cfg), registry=registry)
    shop2 = instrument(with_controls(backend, CFG), registry=registry)
    for store in (shop, blog, shop2):
        await store.create(new_session("gus", now=clock()))

    def created(site: str) -> float | None:
        return registry.get_sample_value(
            "asyncsession_events_total", {"backend": "memory", "site": site, "type": "created"}
        )

    assert (created("shop"), created("blog")) == (2, 1)
    with pytest.raises(ValueError, match="same buckets"):
        instrument(with_controls(backend, CFG), registry=registry, buckets=(1.0,))


def test_nothing_imported_when_unused() -> None:
    optional = "('opentelemetry', 'prometheus_client')"
    code = (
        "import sys, asyncio, asyncsession\n"
        "from asyncsession import open_store\n"
        "async def main():\n"
        "    async with open_store('memory://') as s:\n"
        "        await s.create(asyncsession.new_session('u'))\n"
        "asyncio.run(main())\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {optional}"
        " or m == 'asyncsession.instrument']\n"
        "assert not bad, bad\n"
        "import asyncsession.instrument\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {optional}]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
