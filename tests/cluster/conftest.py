"""The three-broker cluster the fault tests run against: opt-in (``TOPOLOGY_CLUSTER=1``),
and skipped with the reason when this machine cannot host it (root for network
namespaces, ``ip netns``, a Java 17+ runtime and the Kafka jars)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator

import pytest

from tests.cluster.kafka_cluster import KafkaCluster
from tests.cluster.network import HostNetwork, remove_stale, why_unavailable
from topology_store.cli.apache_kafka import available

OPT_IN = "TOPOLOGY_CLUSTER"


@functools.cache
def skip_reason() -> str | None:
    if os.environ.get(OPT_IN) != "1":
        return f"three-broker cluster faults: opt-in, set {OPT_IN}=1"
    if (reason := why_unavailable()) is not None:
        return f"three-broker cluster faults: {reason}"
    if not available():
        return ("three-broker cluster faults: no Java 17+ runtime or Apache Kafka jars "
                "(deploy/kafka/kafka-classpath.sh, which needs Maven once)")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if "cluster" in item.keywords]
    if ours and (reason := skip_reason()) is not None:
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    """Three KRaft broker+controller nodes on hosts 10.77.0.11-13 of their own; the
    processes, namespaces, veths and bridge are removed however the module ends."""
    if removed := remove_stale():
        print(f"\nremoved leftovers of an earlier, killed run: {removed}")
    network = HostNetwork()
    try:
        network.create()
        kafka = KafkaCluster(network)
        try:
            began = time.monotonic()
            kafka.start()
            print(f"\nthree brokers serving on {kafka.bootstrap} in {time.monotonic() - began:.1f}s")
            yield kafka
        finally:
            kafka.stop()
    finally:
        network.destroy()


@pytest.fixture
def whole_cluster(cluster: KafkaCluster) -> KafkaCluster:
    """The cluster with every host reachable and every node running (a test that failed
    half-way through its fault may have left one cut off or down)."""
    for n in cluster.nodes:
        cluster.network.restore(n)
        if not cluster.running(n):
            cluster.start_node(n)
    return cluster
