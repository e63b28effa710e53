"""The gateway's own /metrics (LLM_WORKER_GATEWAY_METRICS_PORT), with a real gateway process,
Redis, a Celery worker and the simulator: its requests by route, status and tenant, the jobs
its fast path runs counted as a worker counts them, its open streams, and none of the
workers' own series."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ROOT,
    WorkerProcess,
    celery_worker_args,
    free_port,
    make_request,
    start_gateway_process,
    stop_process,
    wait_for,
    worker_env,
)
from worker.gateway.app import JOB_ID_HEADER, PATH_HEADER

pytestmark = pytest.mark.integration

KEY = "metrics-key-1"
TENANT = "gm"
MODEL = "deepseek-ai/DeepSeek-V3"


@pytest.fixture(scope="module")
def env(redis_url: str, simulator_url: str) -> dict[str, str]:
    queue = f"gm-{uuid.uuid4().hex[:8]}"
    env = worker_env(redis_url, simulator_url, queue=queue, concurrency=10)
    env["LLM_WORKER_GATEWAY_API_KEYS"] = f"{TENANT}:{KEY}"
    return env


@pytest.fixture(scope="module")
def gateway(env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """The gateway and its metrics URL, with a worker on its queue."""
    worker = WorkerProcess(celery_worker_args(concurrency=10, queue=env["LLM_WORKER_QUEUE"]), env)
    metrics_port = free_port()
    try:
        worker.ready()
        proc, url = start_gateway_process(env, metrics_port=metrics_port)
        try:
            yield url, f"http://127.0.0.1:{metrics_port}/metrics"
        finally:
            stop_process(proc)
    finally:
        worker.stop()


def _scrape(metrics_url: str) -> str:
    response = httpx.get(metrics_url, timeout=10)
    assert response.status_code == 200
    return response.text


def _value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name`` with (at least) ``labels``, or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _post(url: str, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/messages",
        json=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        timeout=60,
    )


def test_a_request_the_gateway_runs_is_counted_there(gateway: tuple[str, str]) -> None:
    """A fast-path request: the request by route, status and tenant, its duration, the path
    it took, and the job itself (finished, tokens) as a worker would count it."""
    url, metrics_url = gateway
    before = _scrape(metrics_url)
    response = _post(url, make_request("count me", model=MODEL, max_tokens=8, stream=False))
    assert response.status_code == 200, response.text
    assert response.headers[PATH_HEADER] == "gateway"
    after = _scrape(metrics_url)

    def grew(name: str, **labels: str) -> float:
        return (_value(after, name, **labels) or 0) - (_value(before, name, **labels) or 0)

    requests = "llm_worker_gateway_requests_total"
    assert grew(requests, route="messages", status="200", tenant=TENANT) == 1
    assert grew("llm_worker_gateway_request_duration_seconds_count", route="messages") == 1
    assert grew("llm_worker_gateway_jobs_total", path="gateway") == 1
    finished = "llm_worker_jobs_finished_total"
    assert grew(finished, model=MODEL, outcome="completed", tenant=TENANT) == 1
    output = response.json()["usage"]["output_tokens"]
    assert grew("llm_worker_output_tokens_total", model=MODEL, tenant=TENANT) == output


def test_refusals_and_unknown_routes_are_counted(gateway: tuple[str, str]) -> None:
    """A wrong key is a 401 of no tenant; an unknown path a 404 of the route "unmatched"."""
    url, metrics_url = gateway
    before = _scrape(metrics_url)
    assert _post(url, make_request("who?"), key="not-a-key").status_code == 401
    missing = httpx.get(f"{url}/v1/nowhere", headers={"x-api-key": KEY}, timeout=10)
    assert missing.status_code == 404
    after = _scrape(metrics_url)
    name = "llm_worker_gateway_requests_total"
    for labels in (
        {"route": "unmatched", "status": "401", "tenant": "none"},
        {"route": "unmatched", "status": "404", "tenant": TENANT},
    ):
        assert (_value(after, name, **labels) or 0) - (_value(before, name, **labels) or 0) == 1


def test_open_event_streams_show_while_open(gateway: tuple[str, str]) -> None:
    """An event stream held open counts in llm_worker_gateway_open{what="streams"} until it
    closes."""
    url, metrics_url = gateway
    slow = make_request("[[sim ttft_ms=0 tps=10 tokens=100]] slow", model=MODEL)
    job_id = _post_queued(url, slow)

    def streams() -> float | None:
        return _value(_scrape(metrics_url), "llm_worker_gateway_open", what="streams")

    with httpx.stream(
        "GET", f"{url}/v1/jobs/{job_id}/events", headers={"x-api-key": KEY}, timeout=60
    ) as response:
        assert response.status_code == 200
        wait_for(lambda: streams() == 1, 20, "the open stream to show")
    wait_for(lambda: streams() == 0, 20, "the closed stream to go")


def _post_queued(url: str, body: dict[str, Any]) -> str:
    """Submit without waiting for the answer: a streamed request, closed after its headers."""
    with httpx.stream(
        "POST",
        f"{url}/v1/messages",
        json={**body, "stream": True},
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        return response.headers[JOB_ID_HEADER]


def test_no_worker_series_no_key_and_not_on_the_public_port(gateway: tuple[str, str]) -> None:
    """What workers read from Redis or their supervisor sets is not the gateway's to export
    (its llm_worker_ready would read 0); the producers' key never shows; the public port does
    not serve the metrics to a producer."""
    url, metrics_url = gateway
    text = _scrape(metrics_url)
    names = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert "llm_worker_gateway_open" in names
    for worker_only in (
        "llm_worker_ready",
        "llm_worker_dead_letters",
        "llm_worker_process_restarts_total",
    ):
        assert worker_only not in names
    assert KEY not in text
    assert httpx.get(f"{url}/metrics", headers={"x-api-key": KEY}, timeout=10).status_code == 404


def test_a_taken_metrics_port_is_a_clear_error(env: dict[str, str]) -> None:
    """A metrics port another process holds: the gateway exits with status 2, naming the
    setting and the port."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "gateway", "--port", str(free_port())],
            cwd=ROOT,
            env={**env, "LLM_WORKER_GATEWAY_METRICS_PORT": str(port)},
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr.decode()
    assert f"LLM_WORKER_GATEWAY_METRICS_PORT {port}" in result.stderr.decode()
