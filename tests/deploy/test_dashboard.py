"""deploy/grafana: the llm-worker dashboard and the provisioning that loads it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

GRAFANA_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "llm-worker.json"
DATASOURCE_UID = "prometheus"

# One panel per question an operator asks; matched as a case-insensitive title prefix.
REQUIRED_PANELS = (
    "Throughput (completions/s)",
    "Outcomes",
    "Job duration p50 / p95 / p99",
    "Time to first token p50 / p95 / p99",
    "Upstream requests by status",
    "Retries by reason",
    "Rate-limit wait p50 / p95 / p99",
    "Rate-limit cooldowns",
    "Tokens per second (input / output)",
    "Backlog (queue depth waiting + unacked)",
    "Jobs in flight",
    "Dead letters",
    "Worker readiness",
    "Spend against budget",
    "Cost (USD per hour",
    "Fallbacks",
    "Gateway requests by status",
    "Gateway /v1/messages duration",
)


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def _exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def test_dashboard_loads_with_a_stable_uid() -> None:
    """The JSON parses, has a fixed uid and title, and a schemaVersion Grafana 10/11 reads."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "llm-worker"
    assert dashboard["title"] == "llm-worker"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"


def test_dashboard_has_the_required_panels() -> None:
    """Every required panel is there, each with at least one query."""
    panels = {p["title"]: p for p in _panels(_dashboard()["panels"]) if p["type"] != "row"}
    for wanted in REQUIRED_PANELS:
        found = [p for t, p in panels.items() if t.lower().startswith(wanted.lower())]
        assert found, f"no panel titled {wanted!r}; have {sorted(panels)}"
        assert found[0]["targets"], f"panel {wanted!r} has no query"


def test_panel_ids_are_unique() -> None:
    """No two panels share an id (Grafana would merge their state)."""
    ids = [p["id"] for p in _panels(_dashboard()["panels"])]
    assert len(ids) == len(set(ids))


def test_every_panel_has_a_numeric_place_on_the_grid() -> None:
    """Each panel's gridPos is four whole numbers (Grafana cannot lay out anything else)."""
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert {k: type(grid.get(k)) for k in "hwxy"} == dict.fromkeys("hwxy", int), panel["title"]


def test_dashboard_queries_use_only_exported_metrics(
    exported_series: dict[str, tuple[str, ...]],
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    """Every metric a panel queries is exported by worker/metrics.py (or is `up`)."""
    for title, expr in _exprs():
        used = promql_metric_names(expr)
        assert used, f"{title}: no metric found in {expr!r}"
        unknown = used - exported_series.keys()
        assert not unknown, f"panel {title!r} uses metrics worker/metrics.py lacks: {unknown}"


def test_model_variable_filters_every_model_labelled_query(
    exported_series: dict[str, tuple[str, ...]],
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    """A multi-value `model` variable exists and each query on a model-labelled metric uses it."""
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    assert model["multi"]
    assert model["includeAll"]
    for title, expr in _exprs():
        if any("model" in exported_series[name] for name in promql_metric_names(expr)):
            assert 'model=~"$model"' in expr, f"panel {title!r} ignores $model: {expr}"


def test_queries_and_variables_use_the_provisioned_datasource() -> None:
    """Panels query through a datasource variable whose default is the provisioned uid."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == DATASOURCE_UID
    expected = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["model"]["datasource"] == expected
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]


def test_datasource_provisioning_points_at_prometheus() -> None:
    """Grafana provisions Prometheus at http://prometheus:9090 under uid `prometheus`."""
    config = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_provisioning_reads_the_mounted_folder() -> None:
    """The file provider loads dashboards from /var/lib/grafana/dashboards, the compose mount."""
    config = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/llm-worker.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_queries_parse_as_promql(promtool: str, tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables filled in, is PromQL that promtool accepts."""
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$model", ".*"),
        }
        for i, (_, expr) in enumerate(_exprs())
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
