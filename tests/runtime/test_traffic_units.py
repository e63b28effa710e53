"""Traffic classes, the pure parts: a message's class headers, a postponed job's countdown
against its deadline, and the settings that shape the policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.broker import job_priority, traffic_headers
from worker.celery_app import celery_config
from worker.errors import SettingsError
from worker.runtime.task import DEADLINE_MARGIN_S, within_deadline
from worker.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LLM_WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_headers_carry_priority_tenant_and_submission() -> None:
    """A tenant's job names its priority, tenant and submission time in plain headers."""
    payload = {"priority": 8, "tenant": "acme", "submitted_at": 12.5}
    assert traffic_headers(payload) == {
        "llmw_priority": 8,
        "llmw_tenant": "acme",
        "llmw_submitted_at": 12.5,
    }


@pytest.mark.parametrize("priority", [None, -1, 10, "8", 2.5, True])
def test_a_priority_that_is_not_one_becomes_the_default(priority: object) -> None:
    """The queue is not trusted: anything but an int 0-9 is priority 5; no tenant, no header."""
    headers = traffic_headers({"priority": priority})
    assert headers["llmw_priority"] == 5
    assert "llmw_tenant" not in headers
    assert job_priority({"priority": priority}) == "5"


def test_a_postponed_countdown_ends_by_the_deadline() -> None:
    """A countdown past the job's deadline is cut to just after it; one before it is kept;
    a job already past its deadline comes back at once; no deadline, no change."""
    assert within_deadline(30.0, 110.0, 100.0) == pytest.approx(10.0 + DEADLINE_MARGIN_S)
    assert within_deadline(5.0, 110.0, 100.0) == 5.0
    assert within_deadline(5.0, 90.0, 100.0) == 0.0
    assert within_deadline(5.0, None, 100.0) == 5.0


def test_tenant_weights_and_aging_reach_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM_WORKER_TENANT_WEIGHTS (JSON) and PRIORITY_AGING_S are the fetch's transport options."""
    monkeypatch.setenv("LLM_WORKER_TENANT_WEIGHTS", '{"acme": 3, "globex": 0.5}')
    monkeypatch.setenv("LLM_WORKER_PRIORITY_AGING_S", "0")
    options = celery_config(load_settings())["broker_transport_options"]
    assert options["tenant_weights"] == {"acme": 3.0, "globex": 0.5}
    assert options["priority_aging_s"] == 0.0


@pytest.mark.parametrize(
    "value",
    ["not json", '{"a b": 1}', '{"acme": 0}', '{"acme": -1}', '{"acme": 1001}', '["acme"]'],
)
def test_bad_tenant_weights_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Weights that are not JSON, name no tenant, or are not in (0, 1000] stop the start."""
    monkeypatch.setenv("LLM_WORKER_TENANT_WEIGHTS", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "LLM_WORKER_TENANT_WEIGHTS" in str(info.value)


def test_negative_aging_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """PRIORITY_AGING_S below 0 stops the start, naming the variable."""
    monkeypatch.setenv("LLM_WORKER_PRIORITY_AGING_S", "-1")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "LLM_WORKER_PRIORITY_AGING_S" in str(info.value)
