"""The alert rules and the dashboard name only metrics the processes export; every
alert has a runbook; every exported metric is documented (adr/0011)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from topology_store.producer.relay_metrics import RelayMetrics
from topology_store.projector.metrics import PartitionProgress, ProjectorMetrics
from topology_store.query_api.metrics import ApiMetrics
from topology_store.router.client import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "topology.json"
OPERATIONS = ROOT / "docs" / "operations.md"

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "gauge": ("",), "unknown": ("",)}

# PromQL words that are not metric names: functions, keywords, and the labels the
# metrics carry (plus those Prometheus adds when scraping).
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta", "changes", "absent",
    "histogram_quantile", "scalar", "vector", "time", "clamp_min", "clamp_max", "topk", "bottomk", "abs",
    "instance", "job", "le",
}


def registries() -> dict[str, CollectorRegistry]:
    projector = ProjectorMetrics()
    projector.watch_partitions(lambda: [PartitionProgress("topic", 0, 1, 2)])
    return {"projector": projector.registry, "api": ApiMetrics().registry, "relay": RelayMetrics().registry,
            "router": RouterMetrics().registry}


def exported() -> dict[str, set[str]]:
    """Metric name -> label names, for every series name a scrape can show
    (prometheus_client adds _total, _bucket, _sum, _count and _created)."""
    names: dict[str, set[str]] = {}
    for registry in registries().values():
        for family in registry.collect():
            labels: set[str] = set()
            for sample in family.samples:
                labels |= set(sample.labels)
            for suffix in _SUFFIXES[family.type]:
                names.setdefault(family.name + suffix, set()).update(labels)
        for collector in list(registry._collector_to_names):  # noqa: SLF001 - label names of unused children
            for name in registry._collector_to_names[collector]:  # noqa: SLF001
                names.setdefault(name, set()).update(getattr(collector, "_labelnames", ()))
    return names


def words(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    return set(re.findall(r"\b[A-Za-z_][A-Za-z0-9_:]*\b", without_ranges))


def check_expr(expr: str, metrics: dict[str, set[str]], where: str) -> set[str]:
    labels = set().union(*metrics.values()) | {"instance", "job", "le"}
    used = set()
    for word in words(expr):
        if word in metrics:
            used.add(word)
        else:
            assert word in PROMQL_WORDS or word in labels, f"{where}: {word!r} is neither an exported metric nor a label"
    assert used, f"{where}: names no metric"
    return used


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_metric_names_follow_prometheus_conventions() -> None:
    for name in exported():
        assert re.fullmatch(r"topology_[a-z0-9_]+", name), name
        assert not name.endswith("_total_total")
    for registry in registries().values():
        for family in registry.collect():
            assert family.documentation, family.name
            if family.type == "histogram":  # a unit in the name
                assert family.name.endswith(("_seconds", "_events", "_bytes")), family.name
            if "timestamp" in family.name or "time" in family.name.split("_"):
                assert family.name.endswith("_seconds"), family.name


def test_the_issues_metrics_are_exported() -> None:
    metrics = exported()
    for name in (
        "topology_projector_events_total", "topology_projector_batch_events_bucket",
        "topology_projector_commit_seconds_bucket", "topology_projector_consumer_lag_records",
        "topology_version", "topology_projector_seconds_since_last_commit",
        "topology_api_requests_total", "topology_api_request_duration_seconds_bucket",
        "topology_api_snapshot_build_seconds_bucket", "topology_api_snapshot_bytes",
        "topology_api_long_polls_waiting", "topology_router_lag_versions",
    ):
        assert name in metrics, name
    assert metrics["topology_projector_events_total"] == {"event_type", "outcome"}
    assert metrics["topology_projector_consumer_lag_records"] == {"topic", "partition"}
    assert metrics["topology_api_requests_total"] == {"route", "status"}


def test_alert_rules_parse_name_exported_metrics_and_link_runbooks() -> None:
    metrics = exported()
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in rules:
        where = f"alert {rule['alert']}"
        used |= check_expr(str(rule["expr"]), metrics, where)
        assert rule["labels"]["severity"] in ("warning", "critical"), where  # type: ignore[index]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], where  # type: ignore[index]
        runbook = ROOT / annotations["runbook_url"]  # type: ignore[index]
        assert runbook.is_file(), f"{where}: no runbook {runbook}"
        text = runbook.read_text(encoding="utf-8")
        assert rule["alert"] in text and "## Diagnose" in text and "## Fix" in text, f"{where}: {runbook.name}"
    # The alerts the issue asks for.
    for name in ("TopologyProjectorLagging", "TopologySnapshotStale", "TopologyDeadLetters", "TopologyApiErrors",
                 "TopologyApiLatency"):
        assert name in names
    assert {"topology_projector_consumer_lag_records", "topology_api_snapshot_age_seconds",
            "topology_api_request_duration_seconds_bucket"} <= used


def test_every_runbook_is_indexed() -> None:
    index = (ROOT / "docs" / "runbooks" / "README.md").read_text(encoding="utf-8")
    for runbook in (ROOT / "docs" / "runbooks").glob("*.md"):
        if runbook.name != "README.md":
            assert f"({runbook.name})" in index, runbook.name
    for topic in ("projector-lagging", "projector-stuck", "snapshot-stale", "rebuilding-a-projection",
                  "broker-outage", "database-failover", "rotating-tokens"):
        assert (ROOT / "docs" / "runbooks" / f"{topic}.md").is_file(), topic


def test_the_dashboard_parses_and_names_exported_metrics() -> None:
    metrics = exported()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used |= check_expr(target["expr"].replace("$__rate_interval", "5m"), metrics, f"panel {panel['title']}")
    assert "topology_projector_consumer_lag_records" in used and "topology_router_lag_versions" in used


def test_every_exported_metric_is_documented() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    for registry in registries().values():
        for family in registry.collect():
            shown = family.name + ("_total" if family.type == "counter" else "")
            assert f"`{shown}`" in text, f"{shown} is not in docs/operations.md"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_their_unit_tests(tmp_path: Path) -> None:
    check = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=ALERTS.parent,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    # deploy/prometheus.yml, with the rules at their path in this checkout.
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
