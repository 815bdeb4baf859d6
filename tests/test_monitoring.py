"""The worker's own alerts and dashboard: promtool accepts and unit-tests the rules, and every
metric (and every label grouped by) that the rules and the dashboard query is one the worker
exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

import eventpulse.metrics  # noqa: F401  (registers the worker's metrics)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "eventpulse.json"
#: labels Prometheus adds to every scraped series
TARGET_LABELS = {"instance", "job"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",)}


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, for every eventpulse metric in the registry."""
    out: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("eventpulse_"):
            continue
        collector = REGISTRY._names_to_collectors[  # the registry's own index of its metrics
            family.name + ("_total" if family.type == "counter" else "")]
        labels = set(getattr(collector, "_labelnames", ()))
        for suffix in SUFFIXES[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_queries() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def check_query(expr: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    names = set(re.findall(r"\beventpulse_[a-z_]+\b", expr))
    problems += [f"{expr!r}: {name} is not exported" for name in sorted(names - known.keys())]
    labels = set().union(*(known.get(name, set()) for name in names), TARGET_LABELS)
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        for label in (part.strip() for part in group.split(",")):
            if label not in labels:
                problems.append(f"{expr!r}: no metric in it has the label {label!r}")
    for label in re.findall(r"(\w+)=~?\"", expr):
        if label not in labels:
            problems.append(f"{expr!r}: no metric in it has the label {label!r}")
    return problems


def test_every_dashboard_and_rule_query_uses_exported_metrics_and_labels() -> None:
    known = exported()
    assert "eventpulse_feature_freshness_seconds" in known
    assert known["eventpulse_consumer_lag_records"] == {"topic", "partition"}
    queries = dashboard_queries() + rule_queries()
    problems = [p for expr in queries for p in check_query(expr, known)]
    assert not problems, "\n".join(problems)
    # and the check itself refuses what it should
    assert check_query("sum by (nope) (eventpulse_ready)", known)
    assert check_query("rate(eventpulse_records_consumed[5m])", known)


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = " ".join(dashboard_queries())
    for metric in ("eventpulse_records_consumed_total", "eventpulse_consumer_lag_records",
                   "eventpulse_feature_freshness_seconds", "eventpulse_dead_letters_total",
                   "eventpulse_batch_seconds_bucket", "eventpulse_alerts",
                   "eventpulse_notification_delivery_seconds_bucket"):
        assert metric in queries, metric
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["templating"]["list"][0]["type"] == "datasource"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: run ./scripts/bootstrap.sh (Debian package prometheus)"
    return subprocess.run([binary, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=120)


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {rule["alert"] for q in [yaml.safe_load((PROMETHEUS / "rules.yml").read_text())]
              for group in q["groups"] for rule in group["rules"]}
    tests = (PROMETHEUS / "rules.test.yml").read_text()
    untested = [alert for alert in alerts if f"alertname: {alert}\n" not in tests]
    assert not untested, untested


def test_promtool_unit_tests_fail_when_a_rule_breaks(tmp_path: Path) -> None:
    """The unit tests are not vacuous: loosen the dead-letter rule and they fail."""
    rules = (PROMETHEUS / "rules.yml").read_text()
    assert "> 0.01" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("> 0.01", "> 0.5"))
    shutil.copy(PROMETHEUS / "rules.test.yml", tmp_path)
    broken = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules",
                             "rules.test.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert broken.returncode != 0 and "EventpulseDeadLettersRising" in broken.stdout + broken.stderr


def test_prometheus_config_loads_the_rules() -> None:
    path = "prometheus.yml"
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS / path).read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    checked = subprocess.run([shutil.which("promtool") or "promtool", "check", "config",
                              "--syntax-only", path], cwd=PROMETHEUS, capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
