"""One Apache Kafka version everywhere: the broker the integration tests run on
(``deploy/kafka/pom.xml``, resolved by ``deploy/kafka/kafka-classpath.sh``) is the image
``deploy/compose.yaml`` deploys and the version docs/testing.md names (adr/0016)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def pinned_version() -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", (ROOT / "deploy/kafka/pom.xml").read_text())
    assert match, "deploy/kafka/pom.xml pins no <kafka.version>"
    return match.group(1)


def test_compose_deploys_the_kafka_version_the_tests_run_on() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{pinned_version()}"


def test_the_testing_docs_name_that_version() -> None:
    assert f"Apache Kafka {pinned_version()}" in (ROOT / "docs/testing.md").read_text()
