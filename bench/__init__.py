"""Opt-in benchmark harnesses: ``python -m bench.<name>``; none is part of the test run.

Shared here: the Kafka-protocol broker a harness runs its workload on (``--broker``).
``tansu`` is the embedded in-memory broker (cli/devstack.py); ``apache`` a real Apache
Kafka on the local JVM (cli/apache_kafka.py), the broker production runs; ``both`` runs
the same workload on each in turn, so a reader sees which costs are the broker's and
which are ours. The pure parts (``brokers_for``, ``broker_table``) are unit-tested in
tests/unit/test_bench_harness.py; imports of the servers stay inside the functions, so
importing a harness for its helpers starts nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BROKERS = ("tansu", "apache")
BROKER_CHOICES = ("tansu", "apache", "both")


def brokers_for(choice: str | None, apache_available: bool) -> list[str]:
    """The brokers to run on, in order: ``None`` (not given) means both when Apache Kafka
    can start here, else Tansu alone. Asking for Apache Kafka where it cannot start is an
    error, not a silent fallback."""
    if choice is None:
        choice = "both" if apache_available else "tansu"
    if choice not in BROKER_CHOICES:
        raise ValueError(f"--broker must be one of {', '.join(BROKER_CHOICES)}, not {choice!r}")
    wanted = list(BROKERS) if choice == "both" else [choice]
    if "apache" in wanted and not apache_available:
        raise ValueError("--broker apache needs Apache Kafka (a Java 17+ runtime and the cached jars: "
                         "deploy/kafka/kafka-classpath.sh); see topology_store.cli.apache_kafka.available()")
    return wanted


def add_broker_argument(parser: object) -> None:
    parser.add_argument(  # type: ignore[attr-defined]
        "--broker", choices=BROKER_CHOICES, default=None,
        help="which Kafka-protocol broker to run on: tansu (embedded, in memory), apache (Apache Kafka on the "
             "local JVM) or both in turn (the default when Apache Kafka is available, else tansu)")
    parser.add_argument(  # type: ignore[attr-defined]
        "--rounds", type=int, default=1,
        help="run the brokers in turn this many times (tansu, apache, tansu, ...) and report each broker's best "
             "round: on a machine whose load drifts, alternating keeps one broker from getting all the quiet")


def interleaved(brokers: Sequence[str], rounds: int) -> list[str]:
    """The order of the runs: every broker once per round, in the same order each round."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, not {rounds}")
    return [broker for _ in range(rounds) for broker in brokers]


def best_per_broker(results: Sequence[T], broker_of: Callable[[T], str], score: Callable[[T], float]) -> list[T]:
    """Each broker's best run (highest ``score``; the first of equals), in the brokers' first order."""
    best: dict[str, T] = {}
    for result in results:
        name = broker_of(result)
        if name not in best or score(result) > score(best[name]):
            best[name] = result
    return list(best.values())


def selected_brokers(choice: str | None) -> list[str]:
    from topology_store.cli.apache_kafka import available

    return brokers_for(choice, available() if choice != "tansu" else False)


@dataclass(frozen=True)
class RunningBroker:
    name: str
    bootstrap: str
    pid: int | None


@contextlib.contextmanager
def running_broker(name: str, log_path: Path | None = None) -> Iterator[RunningBroker]:
    """A fresh broker of kind ``name`` for the length of the block, stopped afterwards."""
    if name == "tansu":
        from topology_store.cli.devstack import EmbeddedKafka

        tansu = EmbeddedKafka(log_path=log_path).start()
        try:
            process = tansu._process  # the pid, for its CPU time
            yield RunningBroker(name, tansu.bootstrap, process.pid if process is not None else None)
        finally:
            tansu.stop()
    elif name == "apache":
        from topology_store.cli.apache_kafka import ApacheKafka

        apache = ApacheKafka(log_path=log_path).start()
        try:
            yield RunningBroker(name, apache.bootstrap, apache.pid)
        finally:
            apache.stop()
    else:
        raise ValueError(f"unknown broker {name!r}")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def broker_ratio(apache: float | None, tansu: float | None) -> str:
    """Apache Kafka's figure as a multiple of Tansu's, or an empty cell."""
    if apache is None or tansu is None or not (math.isfinite(apache) and math.isfinite(tansu)) or tansu <= 0:
        return ""
    ratio = apache / tansu
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


Row = tuple[str, Mapping[str, float | None]] | tuple[str, Mapping[str, float | None], Callable[[float], str]]


def broker_table(rows: Sequence[Row], brokers: Sequence[str], fmt: Callable[[float], str],
                 ratio_rows: Sequence[str] | None = None) -> list[str]:
    """A Markdown table: one row per figure (label, {broker: value}[, its own format]), one
    column per broker and, with both brokers, the ratio Apache/Tansu (on the rows named in
    ``ratio_rows``; all by default). A missing figure is an empty cell."""
    both = "tansu" in brokers and "apache" in brokers
    names = {"tansu": "Tansu", "apache": "Apache Kafka"}
    header = ["", *(names.get(b, b) for b in brokers)] + (["Apache/Tansu"] if both else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, values, *own in rows:
        show = own[0] if own else fmt
        cells = [label, *(show(v) if (v := values.get(b)) is not None else "" for b in brokers)]
        if both:
            wanted = ratio_rows is None or label in ratio_rows
            cells.append(broker_ratio(values.get("apache"), values.get("tansu")) if wanted else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
