"""Broker faults on a real three-broker Apache Kafka cluster (replication factor 3,
``min.insync.replicas=2``, ``acks=all``), with the projector, the decision relay and the
read API running as child processes, as in production, and never restarted:

(a) the leader of the cells partition is SIGKILLed while events and claims flow, and
    brought back later;
(b) the leader of the cells partition is cut off the network for longer than the
    cluster takes to fence it, then reconnected.

After each: nothing acknowledged is lost, nothing is applied twice, the tables equal a
replay of the log, the read API's snapshot equals what the log implies, every claim race
has exactly one winner, and the recovery times are measured (docs/cluster-tests.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.cluster import checks
from tests.cluster.kafka_cluster import MIN_INSYNC_REPLICAS, KafkaCluster, PartitionState
from tests.cluster.traffic import Traffic
from tests.integration.processes import read_api, start, stop, wait_until
from tests.integration.workload import build_workload
from topology_store.cli.devstack import free_port
from topology_store.runtime.settings import Settings
from topology_store.runtime.topics import ensure_topics

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

WORKLOAD_EVENTS = 8_000  # about 15,000 records with the probe, the redeliveries and the claim races
RATE = 150.0  # workload events a second until the fault is over; the rest goes at full speed
CUT_S = 20.0  # how long a host stays cut off at least: over broker.session.timeout.ms (9 s), so it is fenced
REPORT = Path(os.environ.get("TOPOLOGY_CLUSTER_REPORT", "")) if os.environ.get("TOPOLOGY_CLUSTER_REPORT") else None


@dataclass
class Stack:
    settings: Settings
    api: str
    projector: subprocess.Popen[bytes]
    relay: subprocess.Popen[bytes]
    projector_port: int
    logs: Path


@pytest.fixture
def stack(whole_cluster: KafkaCluster, settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """This test's topics on the cluster (replication factor 3, two in-sync replicas needed),
    and the projector, the relay of its decision outbox and the read API against them."""
    projector_port = free_port()
    own = settings.model_copy(update={
        "kafka_bootstrap": whole_cluster.bootstrap, "replication_factor": 3, "projector_metrics_port": projector_port,
        "projector_probe_interval_s": 0.5, "relay_metrics_port": 0, "relay_poll_interval_s": 0.2,
    })
    asyncio.run(ensure_topics(own))
    topics = [*own.topics, own.claim_decisions_topic]
    for state in asyncio.run(whole_cluster.partitions(topics)):
        assert len(state.replicas) == 3 and len(state.isr) == 3, state
    for topic in topics:
        assert asyncio.run(whole_cluster.min_insync_replicas(topic)) == MIN_INSYNC_REPLICAS
    with ExitStack() as stack:
        projector = start(["project"], own, tmp_path / "projector.log")
        stack.callback(stop, projector)
        relay = start(["relay", "--source", own.database_url], own, tmp_path / "relay.log")
        stack.callback(stop, relay)
        api = stack.enter_context(read_api(own, tmp_path / "api.log"))
        wait_until(lambda: readiness(projector_port) == 200 or projector.poll() is not None, timeout_s=60,
                   what="the projector ready")
        assert projector.poll() is None, (tmp_path / "projector.log").read_text()[-3000:]
        try:
            yield Stack(own, api, projector, relay, projector_port, tmp_path)
        finally:
            for n in whole_cluster.nodes:  # the brokers' logs, beside the services', for a failed run
                if whole_cluster.log_path(n).exists():
                    shutil.copy(whole_cluster.log_path(n), tmp_path / f"kafka-{n}.log")


def readiness(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_sigkill_of_the_partition_leader_loses_nothing_and_everything_recovers(
    whole_cluster: KafkaCluster, stack: Stack
) -> None:
    figures = run_fault(
        whole_cluster, stack, seed=41, name="kill -9",
        fault=whole_cluster.kill,
        heal=whole_cluster.start_node,
        hold_s=0.0,
    )
    assert figures["probe_publish_recovered_s"] < 60


def test_a_broker_cut_off_the_network_loses_nothing_and_everything_recovers(
    whole_cluster: KafkaCluster, stack: Stack
) -> None:
    figures = run_fault(
        whole_cluster, stack, seed=43, name="network cut",
        fault=whole_cluster.network.cut,
        heal=whole_cluster.network.restore,
        hold_s=CUT_S,
    )
    # A bound on "recovers at all", not on how fast: a client's request to the host cut off
    # waits out its request timeout (30 s), and aiokafka may ask the stale leader again
    # once more before it refreshes its metadata (docs/cluster-tests.md).
    assert figures["probe_publish_recovered_s"] < 150


def run_fault(cluster: KafkaCluster, stack: Stack, seed: int, name: str, fault: Callable[[int], None],
              heal: Callable[[int], None], hold_s: float) -> dict[str, Any]:
    settings = stack.settings
    topics = [*settings.topics, settings.claim_decisions_topic]
    work = build_workload(WORKLOAD_EVENTS, seed=seed)
    began = time.monotonic()
    traffic = Traffic(settings, stack.api, work, rate=RATE).start()
    pids = (stack.projector.pid, stack.relay.pid)
    try:
        # Steady state first: events acknowledged, decided, relayed and served.
        wait_until(lambda: traffic.acknowledged() >= 800 or traffic.errors, timeout_s=60, what="traffic flowing")
        assert not traffic.errors, traffic.errors
        wait_until(lambda: any(w.acked_at for w in traffic.probes) and traffic.served, timeout_s=30,
                   what="the probe served")
        before = asyncio.run(cluster.partitions(topics))
        victim = next(p.leader for p in before if p.topic == settings.cells_topic)
        roles = roles_of(victim, before, cluster, settings)

        fault_at, fault_wall = time.monotonic(), time.time()
        fault(victim)
        print(f"\n{name}: broker {victim} at +0.0s ({roles})")
        leader_moved_s = cluster.wait_leader_moved(settings.cells_topic, 0, away_from=victim)
        probe_back = wait_until(lambda: next((w.acked_at for w in traffic.probes
                                              if w.sent_at > fault_at and w.acked_at), None),
                                timeout_s=180, interval_s=0.05, what="a publish acknowledged after the fault")
        time.sleep(max(0.0, fault_at + hold_s - time.monotonic()))
        time.sleep(3)  # a little traffic with the node still away
        healed_at = time.monotonic()
        heal(victim)
        in_sync_s = cluster.wait_all_in_sync(topics, timeout_s=120)
        print(f"{name}: healed at +{healed_at - fault_at:.1f}s; all replicas in sync {in_sync_s:.1f}s later")

        traffic.finish()
        finished = time.monotonic()
        wait_until(lambda: caught_up(settings, traffic), timeout_s=120, interval_s=0.2,
                   what="the projector and the relay caught up")
        caught_up_s = time.monotonic() - finished
        version = checks.stored_version(settings)
        wait_until(lambda: checks.served_snapshot(stack.api)["version"] == version, timeout_s=30,
                   what="the read API at the stored version")

        # The same processes throughout, every one still serving.
        assert (stack.projector.pid, stack.relay.pid) == pids
        assert stack.projector.poll() is None and stack.relay.poll() is None
        assert readiness(stack.projector_port) == 200
        assert httpx.get(f"{stack.api}/readyz", timeout=5).status_code == 200

        checks_began = time.monotonic()
        log = asyncio.run(checks.read_log(settings, topics))
        checks.assert_nothing_acknowledged_lost(log, traffic)
        checks.assert_applied_exactly_once(settings, log)
        outcomes = checks.assert_outcomes(settings, work, traffic)
        checks.assert_decisions_relayed(settings, log)
        implied = checks.assert_tables_equal_replays(settings)
        served = checks.served_snapshot(stack.api)
        assert {k: served[k] for k in ("cells", "namespaces")} == implied
        checks.assert_claims_unique(settings, traffic)
        checks_s = time.monotonic() - checks_began
    finally:
        traffic.wind_down()  # a failed test must not leave the thread publishing at its pace
    for process, log_name in ((stack.projector, "projector.log"), (stack.relay, "relay.log")):
        assert stop(process, signal.SIGTERM, timeout_s=30) == 0, (stack.logs / log_name).read_text()[-3000:]

    figures = recovery_figures(settings, traffic, fault_at, fault_wall, probe_back)
    figures.update(
        fault=name, broker=victim, roles=roles, hold_s=hold_s, healed_after_s=round(healed_at - fault_at, 2),
        replicas_in_sync_after_heal_s=round(in_sync_s, 2), caught_up_after_traffic_s=round(caught_up_s, 2),
        traffic_s=round(finished - began, 1), checks_s=round(checks_s, 1),
        cells_leader_moved_s=round(leader_moved_s, 2), records=len(log), acknowledged=len(traffic.acks),
        publish_failures=len(traffic.failures), races=len(traffic.races), outcomes=dict(outcomes),
    )
    print(f"{name}: {json.dumps(figures, indent=1, default=str)}")
    if REPORT is not None:
        with open(REPORT, "a") as out:
            out.write(json.dumps(figures, default=str) + "\n")
    return figures


def roles_of(node: int, states: list[PartitionState], cluster: KafkaCluster, settings: Settings) -> dict[str, Any]:
    return {
        "leads": [f"{p.topic.rsplit('.', 1)[-1]}[{p.partition}]" for p in states if p.leader == node],
        "group_coordinator": asyncio.run(cluster.coordinator(settings.consumer_group)) == node,
        "active_controller": cluster.active_controller() == node,
    }


def caught_up(settings: Settings, traffic: Traffic) -> bool:
    decided = {a.event_id for a in traffic.acks}
    decided |= {a.request_id for pair in traffic.races for a in pair}
    with psycopg.connect(settings.libpq_url) as conn:
        processed = conn.execute("SELECT count(*) FROM processed_events").fetchone()
        unpublished = conn.execute("SELECT count(*) FROM topology_outbox WHERE published_at IS NULL").fetchone()
    return processed == (len(decided),) and unpublished == (0,)


def longest_pause(settings: Settings, fault_wall: float) -> float:
    """The longest time after the fault in which the projector committed nothing (batch
    commit times, from processed_events)."""
    with psycopg.connect(settings.libpq_url) as conn:
        moments = [float(row[0]) for row in conn.execute(
            "SELECT DISTINCT extract(epoch FROM processed_at) FROM processed_events WHERE processed_at >= "
            "to_timestamp(%s) - interval '5 seconds' ORDER BY 1", (fault_wall,))]
    return round(max((b - a for a, b in itertools.pairwise(moments) if b > fault_wall), default=0.0), 2)


def recovery_figures(settings: Settings, traffic: Traffic, fault_at: float, fault_wall: float,
                     probe_back: float) -> dict[str, Any]:
    """Seconds from the fault until each part of the system did its work again."""
    after = [w for w in traffic.probes if w.sent_at > fault_at and w.acked_at]
    weights_after = {w.event.weight for w in after}
    served = next((t for t, weight in traffic.served if t > fault_at and weight in weights_after), None)
    with psycopg.connect(settings.libpq_url) as conn:
        applied = conn.execute(
            "SELECT extract(epoch FROM min(processed_at)) FROM processed_events WHERE event_id = ANY(%s)",
            ([w.event.event_id for w in after],)).fetchone()
        relayed = conn.execute(
            "SELECT extract(epoch FROM min(published_at)) FROM topology_outbox WHERE created_at > to_timestamp(%s)",
            (fault_wall,)).fetchone()
    races = [a for pair in traffic.races for a in pair if a.decided_at]
    first_race = min((a.decided_at for a in races if a.sent_at > fault_at), default=None)
    longest_race = max((a.decided_at - a.sent_at for a in races if a.decided_at), default=0.0)
    workload_acks = sorted(a.at for a in traffic.acks)
    stall = max((b - a for a, b in itertools.pairwise(workload_acks) if b > fault_at), default=0.0)

    def since(moment: float | None) -> float | None:
        return None if moment is None else round(moment - fault_at, 2)

    def since_wall(epoch: Any) -> float | None:
        return None if epoch is None or epoch[0] is None else round(float(epoch[0]) - fault_wall, 2)

    return {
        "probe_publish_recovered_s": since(probe_back),
        "longest_gap_between_acks_s": round(stall, 2),
        "projector_applied_post_fault_event_s": since_wall(applied),
        "api_served_post_fault_event_s": since(served),
        "relay_published_post_fault_decision_s": since_wall(relayed),
        "http_claim_decided_s": since(first_race),
        "http_claim_longest_s": round(longest_race, 2),
        "http_answers": dict(Counter(str(answer) for a in races for answer in a.answers)),
        "projector_longest_pause_s": longest_pause(settings, fault_wall),
        "at": datetime.fromtimestamp(fault_wall).isoformat(timespec="seconds"),
    }
