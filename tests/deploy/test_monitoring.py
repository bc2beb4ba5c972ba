"""The Grafana dashboard and the Prometheus config name only what the workers really export
(streamrec/metrics.py) and reach the workers where they serve /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    DEPLOY,
    OPERATOR_ENV,
    REPO,
    container_environment,
    metric_labels,
    metric_samples,
    settings_from_env,
)

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
PROMETHEUS: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions() -> list[str]:
    return [node["expr"] for node in walk(dashboard()["panels"]) if "expr" in node]


def test_dashboard_has_queries() -> None:
    titles = " ".join(p["title"].lower() for p in dashboard()["panels"])
    topics = ("events consumed", "recommendations", "freshness", "lag", "model in service")
    online = ("gate decisions", "adapter promoted", "feedback examples", "increment duration", "event loop lag")
    for topic in topics + online:
        assert topic in titles
    assert len(expressions()) >= 10


@pytest.mark.parametrize("expr", expressions())
def test_queries_name_exported_metrics_and_labels(expr: str) -> None:
    exported = metric_labels()
    used = re.findall(r"\bstreamrec_\w+", expr)
    assert used, "every panel query is about streamrec"
    unknown = [m for m in used if m not in exported]
    assert not unknown, f"not exported by streamrec/metrics.py: {unknown}"
    allowed = TARGET_LABELS.union(*(exported[m] for m in used))
    grouped = [
        label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr) for label in group.split(",")
    ]
    matched = re.findall(r"[{,]\s*(\w+)\s*[=!]~?\s*\"", expr)
    labels = [label for label in grouped + matched if label]
    assert set(labels) <= allowed, f"labels not on these metrics: {set(labels) - allowed}"


def test_bucket_matchers_name_real_bucket_bounds() -> None:
    from prometheus_client.utils import floatToGoString

    import streamrec.metrics as metrics

    bounds = {floatToGoString(b) for b in metrics.FRESHNESS_SECONDS._upper_bounds}  # type: ignore[no-untyped-call]
    for expr in expressions():
        for le in re.findall(r'streamrec_freshness_seconds_bucket\{le="([^"]+)"\}', expr):
            assert le in bounds, f"le={le} is no bucket bound of streamrec_freshness_seconds"


def test_legends_use_labels_the_series_have() -> None:
    exported = metric_labels()
    for node in walk(dashboard()["panels"]):
        if "expr" in node and node.get("legendFormat"):
            by = {lbl.strip() for g in re.findall(r"\bby\s*\(([^)]*)\)", node["expr"]) for lbl in g.split(",")}
            names = set(re.findall(r"\{\{(\w+)\}\}", node["legendFormat"]))
            available = by or TARGET_LABELS.union(*(exported[m] for m in re.findall(r"\bstreamrec_\w+", node["expr"])))
            assert names <= available, f"{node['legendFormat']!r} on {node['expr']!r}"


def test_panels_are_well_formed() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    used = {n["datasource"]["uid"] for n in walk(dashboard()["panels"]) if isinstance(n.get("datasource"), dict)}
    assert used and used <= uids
    urls = {d["url"] for d in provisioned["datasources"]}
    assert "http://prometheus:9090" in urls and "prometheus" in COMPOSE["services"]


def test_grafana_mounts_where_the_provider_looks() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamrec.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(str(v).split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    assert mounts.get("./deploy/grafana/dashboards") == path
    assert mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"


def test_prometheus_scrapes_every_worker_on_its_web_port() -> None:
    scraped: dict[str, int] = {}
    for job in PROMETHEUS["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert job.get("metrics_path", "/metrics") == "/metrics"
            for name in sd["names"]:
                scraped[name] = sd["port"]
    services = COMPOSE["services"]
    for name, service in services.items():
        if service.get("command", [None])[0] == "worker":
            env = container_environment(service, OPERATOR_ENV)
            assert scraped.get(name) == settings_from_env(env).web_port, f"{name} is not scraped on its web port"
    mounts = dict(str(v).split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_every_metric_family_is_known() -> None:
    # Guards the helper itself: histograms export _bucket/_sum/_count, counters _total.
    samples = metric_samples()
    assert "streamrec_freshness_seconds_bucket" in samples["streamrec_freshness_seconds"]
    assert "streamrec_events_consumed_total" in samples["streamrec_events_consumed"]
    assert samples["streamrec_model"] == {"streamrec_model_info"}
    # An Info's labels are the keys the code sets it with.
    labels = metric_labels()
    assert labels["streamrec_model_info"] == {"base", "adapter"}
    assert labels["streamrec_adapter_promoted_info"] == {"version", "parent"}
