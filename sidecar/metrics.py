"""Prometheus metrics, kept in a registry of the app's own.

Labels only ever take values from small fixed sets (canonical event types,
results, methods), never anything a sender chose, so a hostile sender cannot
grow the metrics without bound or plant text in them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .events import CUSTOMER_EVENTS, SUBSCRIPTION_EVENTS

KNOWN_EVENT_TYPES = SUBSCRIPTION_EVENTS | CUSTOMER_EVENTS

# The *_created series only double the size of every scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]

LOOKUP_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1)
# The `le` labels of those buckets, written as prometheus_client writes them.
_BUCKET_LABELS = [
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*LOOKUP_BUCKETS_S, float("inf"))
]


class Metrics:
    """Every metric the sidecar exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.last_applied_at: float | None = None
        self.deliveries = Counter(
            "sidecar_deliveries",
            "Webhook deliveries answered, by event type and result.",
            ["event_type", "result"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "sidecar_auth_failures",
            "Webhook requests refused with 401, by the method that was tried.",
            ["method"],
            registry=self.registry,
        )
        self.lookups = LookupTally()
        self.registry.register(self.lookups)
        self.last_applied = Gauge(
            "sidecar_last_applied_delivery_timestamp_seconds",
            "When a delivery last changed the entitlement table (UNIX time).",
            registry=self.registry,
        )
        self.seconds_since_applied = Gauge(
            "sidecar_seconds_since_last_applied_delivery",
            "Seconds since a delivery last changed the entitlement table.",
            registry=self.registry,
        )
        self.database_bytes = Gauge(
            "sidecar_database_size_bytes",
            "Size of the SQLite database, WAL included.",
            registry=self.registry,
        )
        self.quarantined = Gauge(
            "sidecar_quarantine_deliveries",
            "Refused deliveries kept in quarantine.",
            registry=self.registry,
        )
        self.copied_rows = Gauge(
            "sidecar_lookup_copied_rows",
            "Rows of the entitlement table held in memory for lookups;"
            " 0 while that copy is loading, when lookups read SQLite.",
            registry=self.registry,
        )
        # Label children resolved once: `labels()` costs more than the count.
        self._delivery_counts: dict[tuple[str, str], Counter] = {}

    def note_applied(self, at: float) -> None:
        """Record when a delivery last changed the table (UNIX seconds)."""
        self.last_applied_at = at
        self.last_applied.set(at)

    def refresh_age(self, now: float) -> None:
        """Bring the seconds-since gauge up to `now`, before a scrape."""
        if self.last_applied_at is not None:
            self.seconds_since_applied.set(max(0.0, now - self.last_applied_at))

    def count_delivery(self, event_type: str, result: str) -> None:
        label = event_type if event_type in KNOWN_EVENT_TYPES else "other"
        child = self._delivery_counts.get((label, result))
        if child is None:
            child = self.deliveries.labels(label, result)
            self._delivery_counts[(label, result)] = child
        child.inc()


class LookupTally(Collector):
    """Lookups by result and by duration, kept as plain numbers.

    A prometheus_client Counter or Histogram takes a lock and checks its
    arguments on every call, which costs more than a cached lookup itself.
    Lookups are counted on the event loop, and /metrics reads the numbers on
    the same loop, so plain numbers need no lock.
    """

    def __init__(self) -> None:
        self._results: dict[str, int] = {}
        # One more than the bounds: the last counts lookups slower than all.
        self._durations = [0] * (len(LOOKUP_BUCKETS_S) + 1)
        self._total_s = 0.0

    def count(self, result: str, seconds: float | None = None) -> None:
        """Count one lookup, and its duration when it was answered."""
        self._results[result] = self._results.get(result, 0) + 1
        if seconds is not None:
            self._durations[bisect.bisect_left(LOOKUP_BUCKETS_S, seconds)] += 1
            self._total_s += seconds

    def collect(self) -> Iterator[Metric]:
        results = CounterMetricFamily(
            "sidecar_lookups",
            "Entitlement lookups answered, by result.",
            labels=["result"],
        )
        for result, count in self._results.items():
            results.add_metric([result], count)
        yield results

        cumulative = 0
        buckets = []
        for bound, count in zip(_BUCKET_LABELS, self._durations, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "sidecar_lookup_duration_seconds",
            "Time spent answering an entitlement lookup.",
            buckets=buckets,
            sum_value=self._total_s,
        )
