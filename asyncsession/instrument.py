"""Optional metrics and tracing for a store: OpenTelemetry and Prometheus.

``instrumented = instrument(store, meter=..., tracer=..., registry=...)`` returns an
instrumented twin of a ``ControlledStore`` (what ``open_store`` and
``with_controls`` return): a controlled store over the same backend, with the same
config and handlers, whose operations are counted and timed. Use it in place of
``store``. Nothing else changes: ``asyncsession`` never imports this module,
OpenTelemetry is imported only when a meter or tracer is given,
``prometheus_client`` only when a registry is, and uninstrumented stores (``store``
itself included) run exactly the code they ran before.

Recorded per backend, site and operation (never per session or user):

- ``operations``: every call, by outcome (``ok``, or the error code such as
  ``session_not_found``);
- ``operation duration``: a latency histogram of the backend call;
- ``violations`` and lifecycle ``events`` by type;
- with a tracer, a client span around each backend call, by default only inside a
  trace that is being recorded (a sampled request), so other calls cost one check.

How it stays cheap. Counters live in the process (an integer increment per call)
and exporters read them when they collect, so no SDK is called per operation. A
controlled store hands each operation to its backend through one forwarding hook
(``_load``, ``_insert``...); the twin's forwarders count and time, so no call layer
is added. Outcomes and latency are those of the backend call (the part that waits
on Redis or SQLite), without id validation and encoding: calls refused before the
backend (an invalid id, an oversized session) are violations, not operations, and
a ``get`` that finds an expired session not yet purged counts as ``ok`` (expiry is
decided after the backend call; ``get`` raises ``SessionExpired``).
Timing costs two clock reads and a histogram update, about as much as a memory
``get`` costs in total, so under load it is sampled: every call is timed until an
operation exceeds ``latency_samples_per_second``, then every Nth call (N a power
of two, adapted as the rate changes). Counts stay exact; the histogram's count is
the number of timed calls, and averages and quantiles stay representative.
"""

from __future__ import annotations

import asyncio
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .codec import CorruptRecord
from .controls import ControlledStore
from .errors import ErrorCode, SessionError, short_hash
from .session import Session
from .store import Outcome

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
    from opentelemetry.trace import Tracer
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = [
    "DEFAULT_BUCKETS",
    "OPERATIONS",
    "OperationStats",
    "StoreMetrics",
    "instrument",
    "metrics",
]

HOOKS = {
    "create": "_insert",
    "get": "_load",
    "update": "_replace",
    "apply": "_apply",
    "touch": "_touch",
    "rotate": "_rotate",
    "rotate_into": "_rotate_into",
    "delete": "_delete",
    "delete_by_user": "_delete_by_user",
    "list_by_user": "_list_by_user",
}
"""Each operation and the backend hook a controlled store forwards it through."""
MORE_HOOKS = (("delete", "_end"),)
"""Other hooks, each counted as the operation it serves (a logout's delete)."""

OPERATIONS = (*HOOKS, "purge_expired")
"""The operations that are counted and timed."""

DEFAULT_BUCKETS = (
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
"""Latency bucket bounds in seconds: 50 µs (memory) to 2.5 s (a purge of millions)."""

MAX_STRIDE = 1 << 16
"""Under load, at least one call in this many is timed."""

_NOT_FOUND = ErrorCode.SESSION_NOT_FOUND.value.lower()
_OUTCOMES = {
    Outcome.OK: "ok",
    Outcome.MISSING: _NOT_FOUND,
    Outcome.EXPIRED: ErrorCode.SESSION_EXPIRED.value.lower(),
    Outcome.OTHER_SITE: _NOT_FOUND,  # what the caller sees; also a site_mismatch violation
    Outcome.CONFLICT: ErrorCode.SESSION_CONFLICT.value.lower(),
    Outcome.USER_CHANGED: ErrorCode.SESSION_INVALID.value.lower(),
    Outcome.TOO_LARGE: ErrorCode.SESSION_SIZE_EXCEEDED.value.lower(),
}


class OperationStats:
    """One operation's counters: exact calls and errors, and the latency histogram
    of the timed calls.

    ``calls``: every call; ``errors``: calls by failed outcome (an error code in
    lower case such as ``session_not_found``, ``cancelled`` or ``error``; ``ok`` is
    the rest, see ``outcomes()``); ``buckets``: timed calls per bound of
    ``StoreMetrics.bounds``, then one past the last (+Inf), not cumulative;
    ``total``: seconds over the timed calls; ``timed``: how many were timed."""

    __slots__ = ("buckets", "calls", "errors", "last_timed", "mask", "total")

    def __init__(self, bounds: int) -> None:
        self.calls = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (bounds + 1)  # per bound, then +Inf
        self.total = 0.0  # seconds, over the timed calls
        self.mask = 0  # calls whose number has none of these bits set are timed
        self.last_timed = 0.0

    @property
    def timed(self) -> int:
        """How many calls were timed (under load, a sample of ``calls``)."""
        return sum(self.buckets)

    def outcomes(self) -> dict[str, int]:
        """Calls by outcome: ``ok`` and each other outcome."""
        errors = dict(self.errors)
        return {"ok": self.calls - sum(errors.values()), **errors}

    def fail(self, outcome: str) -> None:
        """Count one call as failed with ``outcome``."""
        self.errors[outcome] = self.errors.get(outcome, 0) + 1


class StoreMetrics:
    """What one instrumented store recorded since ``instrument()``, as ``metrics(store)``
    returns it; exporters read it when they collect. Live counters, updated in place
    (copy what you want to keep); never a session id or user id.

    - ``backend``: the backend's name (``memory``, ``sqlite``, ``redis``);
    - ``site``: ``Config.site_id`` of the store;
    - ``bounds``: the latency histogram's bucket bounds in seconds (``buckets``);
    - ``operations``: an ``OperationStats`` per operation of ``OPERATIONS``
      (``create``, ``get``... ``purge_expired``), every one present, calls or not;
    - ``violations``: count by violation type (``size_exceeded``, ``conflict``...),
      only the types seen;
    - ``events``: count by lifecycle event type (``created``, ``expired``...), only
      the types seen.
    """

    def __init__(self, backend: str, site: str, bounds: Sequence[float]) -> None:
        self.backend = backend
        self.site = site
        self.bounds = tuple(bounds)
        self.operations = {op: OperationStats(len(self.bounds)) for op in OPERATIONS}
        self.violations: dict[str, int] = {}
        self.events: dict[str, int] = {}

    def __repr__(self) -> str:
        ops = list(self.operations.values())
        return (
            f"StoreMetrics(backend={self.backend!r}, site={self.site!r}, "
            f"calls={sum(st.calls for st in ops)}, "
            f"errors={sum(sum(st.errors.values()) for st in ops)}, "
            f"violations={sum(self.violations.values())}, events={sum(self.events.values())})"
        )


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, SessionError):
        return exc.code.value.lower()
    if isinstance(exc, CorruptRecord):
        return _NOT_FOUND  # what get() answers for an undecodable record
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def instrument(
    store: ControlledStore,
    *,
    meter: Meter | None = None,
    tracer: Tracer | None = None,
    registry: CollectorRegistry | None = None,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
    latency_samples_per_second: float | None = 200.0,
    root_spans: bool = False,
) -> ControlledStore:
    """An instrumented twin of ``store``: same backend, config and handlers.

    ``meter``: an OpenTelemetry ``Meter``; ``tracer``: an OpenTelemetry ``Tracer``;
    ``registry``: a ``prometheus_client.CollectorRegistry`` (e.g. ``REGISTRY``). Any
    combination; with none, counts are still kept and readable with ``metrics()``.
    ``latency_samples_per_second`` bounds the timed calls per operation (None: time
    every call). ``root_spans=True`` starts spans even outside a recorded trace.

    Use the twin in place of ``store``. From now on the twin, not ``store``, turns
    purges into ``expired`` events (so they are sent once, and counted); it lives at
    least as long as ``store``.
    """
    if not isinstance(store, ControlledStore):
        raise TypeError(
            "instrument() needs a controlled store (open_store(), with_controls() or "
            f"X.with_controls()), not {type(store).__name__}"
        )
    if store in _METRICS or store in _TWINS:
        raise ValueError("store is already instrumented (or has an instrumented twin)")
    bounds = tuple(sorted(float(b) for b in buckets))
    if not bounds or bounds[0] <= 0:
        raise ValueError("buckets must be positive bounds in seconds")
    if latency_samples_per_second is not None and latency_samples_per_second <= 0:
        raise ValueError("latency_samples_per_second must be > 0 or None")
    stats = StoreMetrics(store.backend_name, store.config.site_id, bounds)
    histogram = _otel_export(meter, bounds).add(stats) if meter is not None else None
    if registry is not None:
        _prometheus_collector(registry, bounds).sources.append(stats)
    interval = 1.0 / latency_samples_per_second if latency_samples_per_second else 0.0
    spans = _Spans(tracer, stats, root_spans) if tracer is not None else None
    base = type(store)
    backend = store.store
    namespace: dict[str, Any] = {"__module__": base.__module__, "__doc__": base.__doc__}
    for op, hook in (*HOOKS.items(), *MORE_HOOKS):
        method = _counted(op, getattr(backend, hook), stats, histogram, interval)
        namespace[hook] = spans.wrap(op, method) if spans is not None else method
    purge = _counted("purge_expired", base.purge_expired, stats, histogram, interval, own=True)
    namespace["purge_expired"] = spans.wrap("purge_expired", purge) if spans else purge
    namespace.update(_counting_hooks(base, stats))
    twin_class = type(f"Instrumented{base.__name__}", (base,), namespace)
    # A new instance, not a changed one: CPython specializes attribute access for an
    # object's class at creation, and a store keeps its full speed only that way.
    twin: ControlledStore = twin_class(
        backend,
        store.config,
        logger=store.logger,
        on_violation=store.on_violation,
        on_event=store.on_event,
    )
    backend._purge_watchers.discard(store)  # the twin reports expired sessions now
    _TWINS[store] = twin
    _METRICS[twin] = stats
    return twin


def metrics(store: ControlledStore) -> StoreMetrics | None:
    """The counters of an instrumented store (None if it is not instrumented).

    Pass the twin ``instrument()`` returned, not the store it was made from. The
    ``StoreMetrics`` is live: read it when you need the numbers, with or without
    an exporter, e.g. ``metrics(twin).operations["get"].outcomes()``."""
    return _METRICS.get(store)


_METRICS: weakref.WeakKeyDictionary[ControlledStore, StoreMetrics] = weakref.WeakKeyDictionary()
_TWINS: weakref.WeakKeyDictionary[ControlledStore, ControlledStore] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------- hot path


def _counted(
    op: str,
    call: Callable[..., Awaitable[Any]],
    stats: StoreMetrics,
    histogram: Histogram | None,
    interval: float,
    *,
    own: bool = False,
) -> Callable[..., Awaitable[Any]]:
    """A method that forwards to the backend's hook ``call`` (``own``: to the store's
    own method ``call(self)``), counting every call and timing the sampled ones."""
    st = stats.operations[op]
    bounds = stats.bounds
    site = stats.site
    attributes = {"backend": stats.backend, "site": stats.site, "operation": op}
    with_outcome: dict[str, dict[str, str]] = {}

    def observe(t0: float, outcome: str | None) -> None:
        took = perf_counter() - t0
        st.buckets[bisect_left(bounds, took)] += 1
        st.total += took
        if interval:  # keep timed calls near the budget: widen or narrow the stride
            gap, st.last_timed = t0 - st.last_timed, t0
            if gap < interval:
                if st.mask < MAX_STRIDE - 1:
                    st.mask = st.mask * 2 + 1
            elif gap > 4 * interval:
                st.mask >>= 1
        if histogram is not None:
            attrs = attributes
            if outcome is not None:
                attrs = with_outcome.get(outcome) or with_outcome.setdefault(
                    outcome, {**attributes, "outcome": outcome}
                )
            histogram.record(took, attrs)

    method: Callable[..., Awaitable[Any]]
    if own:

        async def own_method(self: ControlledStore) -> Any:
            st.calls += 1
            t0 = perf_counter()
            try:
                result = await call(self)
            except BaseException as exc:
                outcome = _outcome(exc)
                st.fail(outcome)
                observe(t0, outcome)
                raise
            observe(t0, None)
            return result

        method = own_method
    elif op == "get":  # the hot one: one argument; a miss is None or another site's

        async def get_method(self: ControlledStore, session_id: str) -> Any:
            st.calls = n = st.calls + 1
            if n & st.mask:
                try:
                    result = await call(session_id)
                except BaseException as exc:
                    st.fail(_outcome(exc))
                    raise
                if result is None or result.site_id != site:
                    st.fail(_NOT_FOUND)
                return result
            t0 = perf_counter()
            try:
                result = await call(session_id)
            except BaseException as exc:
                outcome = _outcome(exc)
                st.fail(outcome)
                observe(t0, outcome)
                raise
            if result is None or result.site_id != site:
                st.fail(_NOT_FOUND)
                observe(t0, _NOT_FOUND)
            else:
                observe(t0, None)
            return result

        method = get_method
    else:

        async def hook_method(self: ControlledStore, *args: Any) -> Any:
            st.calls = n = st.calls + 1
            timed = not n & st.mask
            t0 = perf_counter() if timed else 0.0
            try:
                result = await call(*args)
            except BaseException as exc:
                outcome = _outcome(exc)
                st.fail(outcome)
                if timed:
                    observe(t0, outcome)
                raise
            if result.__class__ is Outcome and result is not Outcome.OK:
                outcome = _OUTCOMES[result]
                st.fail(outcome)
                if timed:
                    observe(t0, outcome)
            elif timed:
                observe(t0, None)
            return result

        method = hook_method

    method.__name__ = method.__qualname__ = op
    return method


class _Spans:
    """Wraps backend calls in OpenTelemetry client spans (``asyncsession.get`` ...)."""

    def __init__(self, tracer: Tracer, stats: StoreMetrics, root_spans: bool) -> None:
        from opentelemetry import trace

        self.tracer = tracer
        self.root_spans = root_spans
        self.current = trace.get_current_span
        self.kind = trace.SpanKind.CLIENT
        self.attributes = {"asyncsession.backend": stats.backend, "asyncsession.site": stats.site}

    def wrap(self, op: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        tracer, current, kind, root = self.tracer, self.current, self.kind, self.root_spans
        name = f"asyncsession.{op}"
        attributes = {**self.attributes, "asyncsession.operation": op}
        by_id = op not in ("delete_by_user", "list_by_user", "purge_expired")

        async def traced(self: ControlledStore, *args: Any) -> Any:
            if not root and not current().is_recording():
                return await fn(self, *args)
            with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
                if by_id and args:
                    target = args[0]
                    session_id = target.id if isinstance(target, Session) else target
                    if isinstance(session_id, str):  # a short hash, never the id
                        span.set_attribute("asyncsession.session", short_hash(session_id))
                try:
                    result = await fn(self, *args)
                except BaseException as exc:
                    span.set_attribute("error.type", _outcome(exc))
                    raise
                if result.__class__ is Outcome:
                    span.set_attribute("asyncsession.outcome", _OUTCOMES[result])
                return result

        traced.__name__ = traced.__qualname__ = op
        return traced


def _counting_hooks(base: type[ControlledStore], stats: StoreMetrics) -> dict[str, Any]:
    """Methods that count the events and violations passing through the store's hooks."""
    event, violation = base._event, base._violation
    events, violations = stats.events, stats.violations

    def _event(self: ControlledStore, kind: str, session: Session | None, **extra: Any) -> None:
        events[kind] = events.get(kind, 0) + 1
        event(self, kind, session, **extra)

    def _violation(
        self: ControlledStore, kind: str, error: SessionError, session: Session | None, **extra: Any
    ) -> None:
        violations[kind] = violations.get(kind, 0) + 1
        violation(self, kind, error, session, **extra)

    def _wants_expired(self: ControlledStore) -> bool:
        return True  # purges report what they removed, so expired events are counted

    return {
        "_event": _event,
        "_violation": _violation,
        "_wants_expired": _wants_expired,
    }


# ------------------------------------------------------------------- exporters


def _merge(
    sources: Iterable[StoreMetrics],
) -> tuple[
    dict[tuple[str, str, str, str], int],
    dict[tuple[str, str, str], tuple[list[int], float]],
    dict[tuple[str, str, str], int],
    dict[tuple[str, str, str], int],
]:
    """Totals over stores by label values: calls by outcome, histograms, violations,
    events. Stores with the same backend and site add up."""
    calls: dict[tuple[str, str, str, str], int] = {}
    hists: dict[tuple[str, str, str], tuple[list[int], float]] = {}
    violations: dict[tuple[str, str, str], int] = {}
    events: dict[tuple[str, str, str], int] = {}
    for s in list(sources):
        for op, st in s.operations.items():
            if not st.calls:
                continue
            for outcome, n in st.outcomes().items():
                if n:
                    key = (s.backend, s.site, op, outcome)
                    calls[key] = calls.get(key, 0) + n
            buckets = list(st.buckets)
            old, total = hists.get((s.backend, s.site, op), ([0] * len(buckets), 0.0))
            merged = [a + b for a, b in zip(old, buckets, strict=True)]
            hists[(s.backend, s.site, op)] = (merged, total + st.total)
        for table, totals in ((s.violations, violations), (s.events, events)):
            for kind, n in dict(table).items():
                tkey = (s.backend, s.site, kind)
                totals[tkey] = totals.get(tkey, 0) + n
    return calls, hists, violations, events


class _OtelExport:
    """One per meter: the instruments, fed by every store instrumented with it."""

    def __init__(self, meter: Meter, bounds: tuple[float, ...]) -> None:
        from opentelemetry.metrics import Observation

        self.observation = Observation
        self.bounds = bounds
        self.sources: list[StoreMetrics] = []
        meter.create_observable_counter(
            "asyncsession.operations",
            callbacks=[self._operations],
            unit="{operation}",
            description="Session store operations by outcome",
        )
        self.histogram = meter.create_histogram(
            "asyncsession.operation.duration",
            unit="s",
            description="Latency of session store backend calls (sampled under load)",
            explicit_bucket_boundaries_advisory=list(bounds),
        )
        meter.create_observable_counter(
            "asyncsession.violations",
            callbacks=[self._violations],
            unit="{violation}",
            description="Session policy violations by type",
        )
        meter.create_observable_counter(
            "asyncsession.events",
            callbacks=[self._events],
            unit="{event}",
            description="Session lifecycle events by type",
        )

    def add(self, stats: StoreMetrics) -> Histogram:
        self.sources.append(stats)
        return self.histogram

    def _operations(self, options: CallbackOptions) -> Iterable[Observation]:
        calls = _merge(self.sources)[0]
        for (backend, site, op, outcome), n in calls.items():
            attributes = {"backend": backend, "site": site, "operation": op, "outcome": outcome}
            yield self.observation(n, attributes)

    def _typed(self, totals: dict[tuple[str, str, str], int]) -> Iterator[Observation]:
        for (backend, site, kind), n in totals.items():
            yield self.observation(n, {"backend": backend, "site": site, "type": kind})

    def _violations(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._typed(_merge(self.sources)[2])

    def _events(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._typed(_merge(self.sources)[3])


_OTEL: weakref.WeakKeyDictionary[Any, _OtelExport] = weakref.WeakKeyDictionary()


def _otel_export(meter: Meter, bounds: tuple[float, ...]) -> _OtelExport:
    export = _OTEL.get(meter)
    if export is None:
        export = _OTEL[meter] = _OtelExport(meter, bounds)
    elif export.bounds != bounds:
        raise ValueError("every store instrumented with one meter must use the same buckets")
    return export


class _PrometheusCollector:
    """One per registry: exports every store instrumented with it."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.sources: list[StoreMetrics] = []

    def describe(self) -> list[Metric]:
        return self._families([])

    def collect(self) -> list[Metric]:
        return self._families(self.sources)

    def _families(self, sources: Iterable[StoreMetrics]) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        calls, hists, violations, events = _merge(sources)
        ops = CounterMetricFamily(
            "asyncsession_operations",
            "Session store operations by outcome",
            labels=["backend", "site", "operation", "outcome"],
        )
        for key, n in calls.items():
            ops.add_metric(list(key), n)
        duration = HistogramMetricFamily(
            "asyncsession_operation_duration_seconds",
            "Latency of session store backend calls (sampled under load)",
            labels=["backend", "site", "operation"],
        )
        les = (*(repr(b) for b in self.bounds), "+Inf")
        for hkey, (buckets, total) in hists.items():
            cumulative: list[tuple[str, float]] = []
            running = 0
            for le, n in zip(les, buckets, strict=True):
                running += n
                cumulative.append((le, float(running)))
            duration.add_metric(list(hkey), cumulative, total)
        typed = []
        for name, doc, totals in (
            ("asyncsession_violations", "Session policy violations by type", violations),
            ("asyncsession_events", "Session lifecycle events by type", events),
        ):
            family = CounterMetricFamily(name, doc, labels=["backend", "site", "type"])
            for tkey, n in totals.items():
                family.add_metric(list(tkey), n)
            typed.append(family)
        return [ops, duration, *typed]


_PROMETHEUS: weakref.WeakKeyDictionary[Any, _PrometheusCollector] = weakref.WeakKeyDictionary()


def _prometheus_collector(
    registry: CollectorRegistry, bounds: tuple[float, ...]
) -> _PrometheusCollector:
    collector = _PROMETHEUS.get(registry)
    if collector is None:
        collector = _PrometheusCollector(bounds)
        registry.register(collector)
        _PROMETHEUS[registry] = collector
    elif collector.bounds != bounds:
        raise ValueError("every store instrumented with one registry must use the same buckets")
    return collector
