"""The chart's Grafana dashboard and PrometheusRule, checked with the real helm and promtool.

promtool comes from Debian's `prometheus` package (`make promtool`); without it these tests skip
locally and fail under CI=true. The alert unit tests (monitoring/alerts_test.yaml) run against
the rules as the chart renders them, objectives included.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from facefleet.consumer.metrics import WorkerMetrics
from facefleet.producer.gateway.metrics import GatewayMetrics
from facefleet.webhooks import WebhookMetrics
from tests.helm.chart import CHART, by_kind, missing, render

RULES = CHART / "files" / "prometheus" / "rules.yaml"
DASHBOARD = CHART / "files" / "dashboards" / "facefleet.json"
ALERT_TESTS = Path(__file__).parent / "monitoring" / "alerts_test.yaml"
ON = ["monitoring.prometheusRules.enabled=true", "monitoring.dashboards.enabled=true"]

EXPORTERS: dict[str, str] = {
    "rabbitmq_queue_messages_ready": "RabbitMQ rabbitmq_prometheus plugin (per-object)",
    "rabbitmq_queue_messages_unacked": "RabbitMQ rabbitmq_prometheus plugin (per-object)",
    "rabbitmq_queue_messages": "RabbitMQ rabbitmq_prometheus plugin (per-object)",
    "kube_deployment_status_replicas_ready": "kube-state-metrics",
    "kube_deployment_spec_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_status_desired_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA dcgm-exporter",
}
"""Series from other exporters the dashboard and rules may use, with the exporter named."""

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan"}
)


@pytest.fixture(scope="session")
def promtool() -> Path:
    found = shutil.which("promtool")
    if found is None:
        missing("promtool is not installed (Debian package `prometheus`: make promtool)")
    return Path(str(found))


def run_promtool(promtool: Path, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(promtool), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rendered_rules(helm: Path) -> dict[str, Any]:
    (rule,) = by_kind(render(helm, sets=ON), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus sees it once Grafana has filled in its variables."""
    return expr.replace("$__rate_interval", "5m").replace("$tier", "high|standard")


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression reads (strings, label matchers, grouping clauses,
    functions and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        if m.start() > 0 and text[m.start() - 1].isdigit():
            continue  # a duration or number suffix
        names.add(m.group())
    return names


def exported_series() -> set[str]:
    """Every series name our processes expose, from their real registries."""
    registries: list[CollectorRegistry] = [
        WorkerMetrics().registry,
        GatewayMetrics().registry,
        WebhookMetrics().registry,
    ]
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def test_rule_file_passes_promtool_check(promtool: Path) -> None:
    out = run_promtool(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_alert_unit_tests_pass_on_the_rendered_rules(
    helm: Path, promtool: Path, tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules(helm), sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yaml")
    run_promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    out = run_promtool(promtool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert "SUCCESS" in out


def test_every_alert_has_unit_tests() -> None:
    alerts = {
        r["alert"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    tested = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases: dict[str, list[bool]] = {}
    for case in tested:
        for check in case.get("alert_rule_test", []):
            cases.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
    assert set(cases) == alerts
    for alert, fires in cases.items():
        assert True in fires and False in fires, f"{alert}: needs a firing and a silent case"


def test_objectives_come_from_values(helm: Path) -> None:
    sets = [*ON, "monitoring.prometheusRules.waitObjectiveSeconds.high=42"]
    (rule,) = by_kind(render(helm, sets=sets), "PrometheusRule")
    objectives = {
        r["labels"]["tier"]: r["expr"]
        for r in rule["spec"]["groups"][0]["rules"]
        if r.get("record") == "facefleet:wait_objective_seconds"
    }
    assert objectives == {"high": "vector(42)", "standard": "vector(600)", "batch": "vector(3600)"}


def test_every_dashboard_query_parses(promtool: Path, tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs)} rules found" in run_promtool(
        promtool, "check", "rules", str(path)
    )


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        pytest.param(
            'sum by (tier, le) (rate(a_bucket{x=~"b.c"}[5m]))', {"a_bucket"}, id="grouping"
        ),
        pytest.param("x > on (tier) group_left y", {"x", "y"}, id="join"),
        pytest.param('label_replace(m, "t", "$1", "q", "(.+)") / 100', {"m"}, id="strings"),
    ],
)
def test_metric_names_are_found(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_queries_read_only_series_that_exist() -> None:
    """Each series is one our processes export, a documented exporter's, or a rule's record."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    records.add("facefleet:wait_objective_seconds")  # the chart's objectives group
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()]
    exprs += [r["expr"] for g in groups for r in g["rules"]]
    known = exported_series() | set(EXPORTERS) | records
    unknown = {name for e in exprs for name in metric_names(e)} - known
    assert not unknown, f"series nobody exports: {sorted(unknown)}"


def test_off_by_default(helm: Path) -> None:
    objs = render(helm)
    assert by_kind(objs, "PrometheusRule") == []
    assert not [
        o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("dashboard")
    ]


def test_dashboard_ships_as_a_sidecar_config_map(helm: Path) -> None:
    (cm,) = [
        o
        for o in by_kind(render(helm, sets=ON), "ConfigMap")
        if "dashboard" in o["metadata"]["name"]
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["facefleet.json"]) == json.loads(DASHBOARD.read_text())


def test_worker_series_carry_the_tier(helm: Path) -> None:
    objs = render(helm, sets=["serviceMonitor.enabled=true"])
    (worker,) = [
        o for o in by_kind(objs, "ServiceMonitor") if o["metadata"]["name"].endswith("-worker")
    ]
    assert worker["spec"]["podTargetLabels"] == ["facefleet.io/tier"]
