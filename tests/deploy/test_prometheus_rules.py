"""deploy/prometheus: the scrape config, the alerting rules and their promtool unit tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

EXPECTED_ALERTS = {
    "LLMWorkerHighFailureRatio",
    "LLMWorkerBacklogGrowing",
    "LLMWorkerNoCompletions",
    "LLMWorkerUpstream429Storm",
    "LLMWorkerDeadLettersGrowing",
    "LLMWorkerDown",
    "LLMWorkerNotReady",
    "LLMWorkerTenantBudgetNearlySpent",
    "LLMWorkerTenantBudgetReached",
    "LLMWorkerTenantWaiting",
    "LLMWorkerGatewayErrors",
}


def _load(name: str) -> Any:
    return yaml.safe_load((PROMETHEUS_DIR / name).read_text())


def _rules() -> list[dict[str, Any]]:
    (group,) = _load("alerts.yml")["groups"]
    assert group["name"] == "llm-worker"
    return list(group["rules"])


def _promtool(promtool: str, *args: str) -> None:
    done = subprocess.run(
        [promtool, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}{done.stderr}"


def test_promtool_accepts_the_config(promtool: str) -> None:
    """`promtool check config prometheus.yml` passes, including the alerts.yml it loads."""
    _promtool(promtool, "check", "config", "prometheus.yml")


def test_promtool_accepts_the_rules(promtool: str) -> None:
    """`promtool check rules alerts.yml` passes."""
    _promtool(promtool, "check", "rules", "alerts.yml")


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    """`promtool test rules alerts_test.yml` passes: every alert fires and stays quiet as meant."""
    _promtool(promtool, "test", "rules", "alerts_test.yml")


def test_config_scrapes_the_worker_and_loads_the_alerts() -> None:
    """The llm-worker job scrapes worker:9464/metrics every 15 s and loads alerts.yml beside it."""
    config = _load("prometheus.yml")
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llm-worker"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["worker:9464"]}]


def test_config_scrapes_the_gateway_as_its_own_job() -> None:
    """The gateway's /metrics (gateway:9465) is a job of its own: `up{job="llm-worker"}`
    still counts workers only."""
    config = _load("prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llm-worker-gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["gateway:9465"]}]


def test_alert_group_holds_the_expected_alerts() -> None:
    """alerts.yml defines exactly the documented alerts, each once."""
    names = [rule["alert"] for rule in _rules()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_has_for_severity_and_annotations(name: str) -> None:
    """Each alert waits with `for:`, has a severity and summary/description/runbook text."""
    (rule,) = [r for r in _rules() if r["alert"] == name]
    assert rule.get("for"), "every alert needs a `for:` so one bad scrape does not page"
    assert rule["labels"]["severity"] in {"warning", "critical"}
    for key in ("summary", "description", "runbook"):
        assert rule["annotations"].get(key, "").strip(), f"{name} lacks annotation {key}"


def test_alerts_use_only_exported_metrics(
    exported_series: dict[str, tuple[str, ...]],
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    """Every metric an alert selects is exported by worker/metrics.py (or is `up`)."""
    for rule in _rules():
        used = promql_metric_names(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in its expr"
        unknown = used - exported_series.keys()
        assert not unknown, f"{rule['alert']} uses metrics worker/metrics.py lacks: {unknown}"


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    """alerts_test.yml has, per alert, a case expecting it to fire and one expecting silence."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load("alerts_test.yml")["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_metric_name_reader_sees_through_promql_syntax(
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    """The reader keeps metric names and drops functions, labels, strings, durations, keywords."""
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model",x="y z"}'
        "[$__rate_interval]))) > 1e3 and on () sum(b_total offset 15m) or vector(0) "
        '== bool 2 unless absent(up{job="w"}) / c:recorded'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "up", "c:recorded"}
