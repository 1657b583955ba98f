"""Three Apache Kafka nodes, each a KRaft combined broker+controller on a host of its own
(``network.HostNetwork``), voters of one static controller quorum.

Every topic is replicated three times and needs two in-sync replicas to take an
``acks=all`` write (``default.replication.factor=3``, ``min.insync.replicas=2``; the
project creates its topics with ``replication_factor=3`` from its settings). The internal
topics are replicated the same way. Failure detection keeps Kafka's defaults (a broker
silent for ``broker.session.timeout.ms`` = 9 s is fenced and its partitions get new
leaders), so the recovery times the tests measure are those of a stock cluster.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.protocol.metadata import MetadataRequest

from tests.cluster.network import HostNetwork
from topology_store.cli.apache_kafka import ApacheKafka, new_cluster_id

BROKER_PORT = 9092
CONTROLLER_PORT = 9093
MIN_INSYNC_REPLICAS = 2

CLUSTER_CONFIG = {
    "default.replication.factor": "3",
    "min.insync.replicas": str(MIN_INSYNC_REPLICAS),
    "unclean.leader.election.enable": "false",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": str(MIN_INSYNC_REPLICAS),
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": str(MIN_INSYNC_REPLICAS),
}


@dataclass(frozen=True)
class PartitionState:
    topic: str
    partition: int
    leader: int  # -1: none
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass
class KafkaCluster:
    network: HostNetwork
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="topology-cluster-")))
    heap_mb: int = 512
    cluster_id: str = field(default_factory=new_cluster_id)
    nodes: dict[int, ApacheKafka] = field(default_factory=dict)

    def __post_init__(self) -> None:
        count = self.network.count
        voters = ",".join(f"{n}@{self.network.address(n)}:{CONTROLLER_PORT}" for n in range(1, count + 1))
        for n in range(1, count + 1):
            self.nodes[n] = ApacheKafka(
                port=BROKER_PORT, controller_port=CONTROLLER_PORT, work_dir=self.work_dir / f"node-{n}",
                heap_mb=self.heap_mb, broker_config=dict(CLUSTER_CONFIG), cluster_id=self.cluster_id,
                host=self.network.address(n), node_id=n, quorum_voters=voters,
                command_prefix=self.network.exec_prefix(n),
            )

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes.values())

    def log_path(self, n: int) -> Path:
        return self.work_dir / f"node-{n}" / "kafka.log"

    def start(self, timeout_s: float = 120) -> KafkaCluster:
        """Start every node at once: none serves before a quorum of them runs."""
        self._in_parallel([lambda node=node: node.start(timeout_s) for node in self.nodes.values()])
        return self

    def start_node(self, n: int, timeout_s: float = 120) -> None:
        self.nodes[n].start(timeout_s)

    def kill(self, n: int) -> None:
        self.nodes[n].kill()

    def running(self, n: int) -> bool:
        return self.nodes[n].pid is not None

    def stop(self) -> None:
        """The end of the run: every node killed (its data is thrown away; a controlled
        shutdown of the last voters would only wait for a quorum that is leaving)."""
        for node in self.nodes.values():
            node.kill()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    @staticmethod
    def _in_parallel(calls: list[Any]) -> None:
        errors: list[BaseException] = []

        def run(call: Any) -> None:
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(call,)) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    # --- what the cluster says -----------------------------------------------------------------

    def admin(self, bootstrap: str | None = None) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(bootstrap_servers=bootstrap or self.bootstrap, request_timeout_ms=10_000)

    async def partitions(self, topics: list[str], via: int | None = None) -> list[PartitionState]:
        """Leaders, replicas and ISRs as the metadata of one broker (``via``) or any says."""
        admin = self.admin(self.nodes[via].bootstrap if via else None)
        await admin.start()
        try:
            if via is None:
                described = await admin.describe_topics(topics)
            else:  # that node's answer, not a random one's (which may be the node cut off)
                described = (await admin._send_request(MetadataRequest(topics), node_id=via)).to_object()["topics"]
        finally:
            await admin.close()
        return sorted(
            (PartitionState(t["topic"], p["partition"], p["leader"], tuple(p["replicas"]), tuple(p["isr"]))
             for t in described for p in t["partitions"]),
            key=lambda s: (s.topic, s.partition),
        )

    def wait_leader_moved(self, topic: str, partition: int, away_from: int, timeout_s: float = 120) -> float:
        """Until the other nodes name a leader of ``topic[partition]`` other than ``away_from``;
        the seconds it took."""
        began = time.monotonic()
        others = [n for n in self.nodes if n != away_from]
        while time.monotonic() - began < timeout_s:
            for via in others:
                if self._leader(topic, partition, via) not in (away_from, -1, None):
                    return time.monotonic() - began
            time.sleep(0.1)
        raise AssertionError(f"{topic}[{partition}] still led by {away_from} after {timeout_s}s")

    def _leader(self, topic: str, partition: int, via: int) -> int | None:
        """The leader ``via`` names, or None when it does not answer within 2 s."""
        try:
            states = asyncio.run(asyncio.wait_for(self.partitions([topic], via=via), 2))
        except Exception:  # noqa: BLE001 - that node down or cut off too
            return None
        return next((s.leader for s in states if s.partition == partition), None)

    async def min_insync_replicas(self, topic: str) -> int:
        admin = self.admin()
        await admin.start()
        try:
            [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                                      {"min.insync.replicas": None})])
        finally:
            await admin.close()
        for resource in response.resources:
            for entry in resource[4]:
                if entry[0] == "min.insync.replicas":
                    return int(entry[1])
        raise AssertionError(f"no min.insync.replicas for {topic}: {response}")

    async def coordinator(self, group: str) -> int:
        admin = self.admin()
        await admin.start()
        try:
            return await admin.find_coordinator(group)
        finally:
            await admin.close()

    def active_controller(self) -> int | None:
        """The KRaft leader, as the nodes' own logs last said (clients are told a random
        broker instead, so the protocol cannot say)."""
        latest: tuple[str, int] | None = None
        for n in self.nodes:
            try:
                text = self.log_path(n).read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if "Becoming the active controller" in line or "becoming the active controller" in line.lower():
                    stamp = line[1:24]
                    if latest is None or stamp > latest[0]:
                        latest = (stamp, n)
        return latest[1] if latest else None

    def wait_all_in_sync(self, topics: list[str], timeout_s: float = 90) -> float:
        """Until every partition of ``topics`` has all three replicas in sync again; the seconds it took."""
        began = time.monotonic()
        deadline = began + timeout_s
        last: list[PartitionState] = []
        while time.monotonic() < deadline:
            try:
                last = asyncio.run(self.partitions(topics))
            except Exception:  # noqa: BLE001 - a broker still finding its feet
                time.sleep(0.5)
                continue
            if last and all(len(p.isr) == len(self.nodes) and p.leader >= 0 for p in last):
                return time.monotonic() - began
            time.sleep(0.5)
        raise AssertionError(f"replicas not all in sync after {timeout_s}s: {last}")
