"""The read API's Prometheus metrics, on a registry of its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from collections.abc import Iterator

    from topology_store.query_api.snapshot import Snapshot
    from topology_store.service.admission import Admission


@dataclass
class ApiMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "topology_api_requests", "HTTP requests by route template and status", ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "topology_api_request_duration_seconds", "HTTP request latency by route template", ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.snapshot_version = Gauge(
            "topology_api_snapshot_version", "Topology version of the snapshot being served", registry=self.registry
        )
        self.snapshot_bytes = Gauge(
            "topology_api_snapshot_bytes", "Size of the newest snapshot serialized as JSON", registry=self.registry
        )
        self.snapshot_build_seconds = Histogram(
            "topology_api_snapshot_build_seconds", "Time to move to a new version (delta from the change log, or full load)", registry=self.registry
        )

        self.snapshot_namespaces = Gauge(
            "topology_api_snapshot_namespaces", "Namespaces in the snapshot being served", registry=self.registry
        )
        self.encodings_built = Counter(
            "topology_api_encodings_built",
            "Serializations and compressions done (once per version and representation, never per request)",
            ["kind", "format", "encoding"],
            registry=self.registry,
        )
        self.encoding_seconds = Histogram(
            "topology_api_encoding_seconds", "Time to serialize or compress one representation",
            ["kind", "format", "encoding"],
            buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.snapshot_encoded_bytes = Gauge(
            "topology_api_snapshot_encoded_bytes", "Size of the newest snapshot per format and content coding",
            ["format", "encoding"], registry=self.registry,
        )
        self.deltas = Counter(
            "topology_api_deltas", "Delta requests by source: cached, computed from the change log, gone (410)",
            ["result"], registry=self.registry,
        )
        self.long_polls_waiting = Gauge(
            "topology_api_long_polls_waiting", "Requests waiting for a newer version", registry=self.registry
        )
        self.auth_failures = Counter(
            "topology_api_auth_failures", "Requests refused for their bearer token, by error code", ["code"],
            registry=self.registry,
        )

        # At scrape time, from the snapshot being served (adr/0011): what X-Topology-Age-Seconds says.
        self._served: Snapshot | None = None
        self.snapshot_age = Gauge(
            "topology_api_snapshot_age_seconds",
            "Seconds since the projector last committed, as the snapshot being served knows it "
            "(X-Topology-Age-Seconds); NaN before the first snapshot is loaded",
            registry=self.registry,
        )
        self.snapshot_age.set_function(lambda: self._served.age_seconds() if self._served is not None else float("nan"))
        # Admission control of the claims door (adr/0018), read from its bookkeeping at scrape time.
        self.admission: Admission | None = None
        self.registry.register(_AdmissionCollector(self))

    def watch_admission(self, admission: Admission) -> None:
        self.admission = admission

    def observe_snapshot(self, snapshot: Snapshot) -> None:
        self._served = snapshot
        self.snapshot_version.set(snapshot.version)
        self.snapshot_namespaces.set(snapshot.namespace_count)
        self.snapshot_build_seconds.observe(snapshot.build_seconds)

    def observe_encoding(self, kind: str, fmt: str, encoding: str, seconds: float, size: int) -> None:
        short = "msgpack" if fmt.endswith("msgpack") else "json"
        self.encodings_built.labels(kind, short, encoding).inc()
        self.encoding_seconds.labels(kind, short, encoding).observe(seconds)
        if kind == "snapshot":
            self.snapshot_encoded_bytes.labels(short, encoding).set(size)
            if short == "json" and encoding == "identity":
                self.snapshot_bytes.set(size)


class _AdmissionCollector(Collector):
    """The claims door's admission bookkeeping as metrics: zeros until a door is watched."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        admission = self._metrics.admission
        admitted = CounterMetricFamily(
            "topology_api_claim_requests_admitted", "Claim requests admitted by admission control (commits and "
            "rollbacks always are)")
        admitted.add_metric([], admission.admitted if admission is not None else 0)
        yield admitted
        shed = CounterMetricFamily(
            "topology_api_claim_requests_shed", "Claim requests refused with 429 before anything was published, by "
            "the budget that was spent (in_flight, wait_age)", labels=["reason"])
        for reason, count in (admission.shed if admission is not None else {"in_flight": 0, "wait_age": 0}).items():
            shed.add_metric([reason], count)
        yield shed
        in_flight = GaugeMetricFamily("topology_api_claim_requests_in_flight",
                                      "Claim requests admitted and not yet answered")
        in_flight.add_metric([], admission.in_flight if admission is not None else 0)
        yield in_flight
        oldest = GaugeMetricFamily("topology_api_claim_oldest_wait_seconds",
                                   "How long the oldest claim request in flight has waited; 0 when none is")
        oldest.add_metric([], admission.oldest_wait_s() if admission is not None else 0.0)
        yield oldest
