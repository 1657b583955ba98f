"""The projector's Prometheus metrics, on a registry of its own (no global state)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class ProjectorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.events = Counter(
            "topology_projector_events",
            "Events consumed, by event type and the projector's decision "
            "(applied, unchanged, duplicate, rejected, dead_lettered)",
            ["event_type", "outcome"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "topology_projector_batch_events",
            "Records per committed batch",
            buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "topology_projector_commit_seconds",
            "Time of one batch transaction, from BEGIN to COMMIT",
            registry=self.registry,
        )
        self.fenced = Counter(
            "topology_projector_fenced",
            "Batches discarded because another member had advanced a partition",
            registry=self.registry,
        )
        self.database_errors = Counter(
            "topology_projector_database_errors",
            "Batches that failed on a database error and will be retried",
            registry=self.registry,
        )
        self.version = Gauge("topology_version", "Topology version of the last commit", registry=self.registry)
        self.last_commit = Gauge(
            "topology_projector_last_commit_timestamp_seconds",
            "Unix time of the last committed batch",
            registry=self.registry,
        )
        self.assigned_partitions = Gauge(
            "topology_projector_assigned_partitions", "Partitions this member owns", registry=self.registry
        )
        # Readiness of the dependencies (projector/health.py), also served as /readyz.
        self.broker_up = Gauge(
            "topology_projector_broker_up", "1 when the broker answered the last probe or fetch", registry=self.registry
        )
        self.database_up = Gauge(
            "topology_projector_database_up", "1 when PostgreSQL answered the last probe or commit",
            registry=self.registry,
        )
        self.isolated = Counter(
            "topology_projector_isolated_records",
            "Readable records dead-lettered because applying them failed for good (projector/poison.py); "
            "also counted as dead_lettered in topology_projector_events",
            registry=self.registry,
        )
        # Retention (adr/0020, projector/compaction.py): the tables' sizes, refreshed
        # every minute from the catalog; label `table` is one of the projection's tables.
        self.table_rows = Gauge(
            "topology_database_table_rows",
            "Rows per projection table, PostgreSQL's estimate (pg_class.reltuples; 0 before the first ANALYZE)",
            ["table"],
            registry=self.registry,
        )
        self.table_bytes = Gauge(
            "topology_database_table_bytes",
            "Size of each projection table with its indexes and TOAST (pg_total_relation_size)",
            ["table"],
            registry=self.registry,
        )
        self.compacted_rows = Counter(
            "topology_compaction_deleted_rows",
            "Rows this member's scheduled compaction deleted, by table (TOPOLOGY_COMPACT_INTERVAL_S)",
            ["table"],
            registry=self.registry,
        )
        # Absent, not 0, until a run finishes: with compaction off, no alert may see a stale time.
        self.compaction_last_success = _UnsetUntilSet(
            "topology_compaction_last_success_timestamp_seconds",
            "Unix time this member last finished a scheduled compaction (absent until it does)",
        )
        self.registry.register(self.compaction_last_success)
        # Stored offsets and the log disagree (adr/0019).
        self.reread = Counter(
            "topology_projector_reread_records",
            "Records read again after the stored offsets moved backwards, identical to the archived ones: "
            "skipped, since they were applied already",
            registry=self.registry,
        )
        self.refused_partitions = Gauge(
            "topology_projector_refused_partitions",
            "Partitions this member does not project because the log does not continue as the stored offset and "
            "the archive say it must (records deleted, or a different record at an archived offset); /readyz "
            "names them and the fix",
            registry=self.registry,
        )
        # Computed at scrape time (adr/0011): alerts need the age of the last commit
        # even while the event loop is blocked or the database is away.
        self._started_at = time.time()
        self._last_commit_at: float | None = None
        self.seconds_since_last_commit = Gauge(
            "topology_projector_seconds_since_last_commit",
            "Seconds since this member last committed a batch (since it started, before its first commit)",
            registry=self.registry,
        )
        self.seconds_since_last_commit.set_function(
            lambda: time.time() - (self._last_commit_at if self._last_commit_at is not None else self._started_at)
        )
        self._partitions = _PartitionProgress()
        self.registry.register(self._partitions)

    def mark_commit(self) -> None:
        """A batch was committed just now."""
        self._last_commit_at = time.time()
        self.last_commit.set(self._last_commit_at)

    def watch_partitions(self, source: Callable[[], Iterable[PartitionProgress]]) -> None:
        """Report offsets and lag from ``source`` at every scrape (the consumer's assigned partitions)."""
        self._partitions.source = source


class _UnsetUntilSet(Collector):
    """A gauge with no sample until :meth:`set` is called (prometheus_client's shows 0)."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name, self._documentation = name, documentation
        self._value: float | None = None

    def set(self, value: float) -> None:
        self._value = value

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation)
        if self._value is not None:
            family.add_metric([], self._value)
        return [family]


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    topic: str
    partition: int
    next_offset: int  # the next offset to read, as committed in PostgreSQL
    log_end_offset: int | None  # the high watermark of the last fetch response; None before the first


class _PartitionProgress(Collector):
    """Per assigned partition: committed next offset, log end offset, and their
    difference, the consumer lag. The log end offset is the high watermark carried
    by every fetch response (aiokafka ``highwater``), never a ListOffsets or a
    consumer-group offset request (adr/0006, adr/0011). Labels: topic and
    partition, both bounded by the topics' layout."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[PartitionProgress]] | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("topology_projector_next_offset",
                              "Next offset to read per assigned partition, as committed in PostgreSQL",
                              labels=["topic", "partition"]),
            GaugeMetricFamily("topology_projector_log_end_offset",
                              "Log end offset (high watermark of the last fetch response) per assigned partition",
                              labels=["topic", "partition"]),
            GaugeMetricFamily("topology_projector_consumer_lag_records",
                              "Records in the log not yet committed to PostgreSQL: log end offset minus next offset",
                              labels=["topic", "partition"]),
        ]

    def collect(self) -> Iterable[Metric]:
        next_offset, log_end, lag = families = self._families()
        source = self.source
        if source is not None:
            for item in source():
                labels = [item.topic, str(item.partition)]
                next_offset.add_metric(labels, item.next_offset)
                if item.log_end_offset is not None:
                    log_end.add_metric(labels, item.log_end_offset)
                    lag.add_metric(labels, max(0, item.log_end_offset - item.next_offset))
        return families
