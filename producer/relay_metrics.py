"""The outbox relay's Prometheus metrics, on a registry of its own (no global state); adr/0008, adr/0011."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class RelayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.active = Gauge(
            "topology_relay_active",
            "1 while this relay holds the outbox lock and publishes, 0 while it stands by",
            registry=self.registry,
        )
        self.outbox_depth = Gauge(
            "topology_relay_outbox_depth",
            "Unpublished outbox rows, as last counted by the active relay (0 on a standby)",
            registry=self.registry,
        )
        self.oldest_unpublished_age = Gauge(
            "topology_relay_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished outbox row, as last measured by the active relay (0 when none)",
            registry=self.registry,
        )
        self.published = Counter(
            "topology_relay_published",
            "Outbox rows the broker acknowledged, by event type (a republished row counts again)",
            ["event_type"],
            registry=self.registry,
        )
        self.publish_errors = Counter(
            "topology_relay_publish_errors",
            "Outbox rows not acknowledged in a round; they stay unpublished and are retried",
            registry=self.registry,
        )
        self.invalid_rows = Counter(
            "topology_relay_invalid_rows",
            "JSON outbox rows found not to be a valid event; each is marked failed once and never retried",
            registry=self.registry,
        )
        self.failed_rows = Gauge(
            "topology_relay_failed_rows",
            "Unpublished outbox rows held with an error (failed_at set), as last counted by the active relay",
            registry=self.registry,
        )
        self.database_errors = Counter(
            "topology_relay_database_errors",
            "Lost or failed connections to the outbox database (the relay reconnects)",
            registry=self.registry,
        )
        self.round_seconds = Histogram(
            "topology_relay_round_seconds",
            "One round: read a batch of rows, publish, wait for every acknowledgement, mark",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.takeovers = Counter(
            "topology_relay_lock_acquired",
            "Times this relay acquired the outbox lock and became the active one",
            registry=self.registry,
        )
