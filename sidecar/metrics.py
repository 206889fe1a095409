"""Prometheus metrics, kept in a registry of the app's own.

Labels only ever take values from small fixed sets (canonical event types,
results, methods), never anything a sender chose, so a hostile sender cannot
grow the metrics without bound or plant text in them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from .events import CUSTOMER_EVENTS, SUBSCRIPTION_EVENTS

KNOWN_EVENT_TYPES = SUBSCRIPTION_EVENTS | CUSTOMER_EVENTS

# The *_created series only double the size of every scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]


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
        self.lookups = Counter(
            "sidecar_lookups",
            "Entitlement lookups answered, by result.",
            ["result"],
            registry=self.registry,
        )
        self.lookup_seconds = Histogram(
            "sidecar_lookup_duration_seconds",
            "Time spent answering an entitlement lookup.",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1),
            registry=self.registry,
        )
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

        # Label children resolved once: `labels()` costs more than the count.
        self._lookup_results: dict[str, Counter] = {}

    def note_applied(self, at: float) -> None:
        """Record when a delivery last changed the table (UNIX seconds)."""
        self.last_applied_at = at
        self.last_applied.set(at)

    def refresh_age(self, now: float) -> None:
        """Bring the seconds-since gauge up to `now`, before a scrape."""
        if self.last_applied_at is not None:
            self.seconds_since_applied.set(max(0.0, now - self.last_applied_at))

    def count_lookup(self, result: str) -> None:
        child = self._lookup_results.get(result)
        if child is None:
            child = self._lookup_results[result] = self.lookups.labels(result)
        child.inc()

    def count_delivery(self, event_type: str, result: str) -> None:
        label = event_type if event_type in KNOWN_EVENT_TYPES else "other"
        self.deliveries.labels(label, result).inc()
