"""The baselines: what a user would write instead of llm-worker, as a Celery app.

``celery -A bench.baseline_app worker -P gevent -c N -Q QUEUE`` with the same broker settings
as ours (late acks, prefetch 1, a broker pool above the concurrency), so the comparison is of
the task bodies, not of the Celery configuration:

- ``bench.plain_http``: one shared ``httpx.Client``, one ``POST /messages``, the JSON read
  and dropped: no validation, no events, no job state, no retries.
- ``bench.empty``: nothing at all; the ceiling of Celery on this broker.

Configured from ``BENCH_REDIS_URL``, ``BENCH_UPSTREAM_URL``, ``BENCH_API_KEY`` and
``LLM_WORKER_CONCURRENCY`` (set by :mod:`bench.stack`).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import httpx
from celery import Celery

PLAIN_TASK = "bench.plain_http"
EMPTY_TASK = "bench.empty"

app = Celery("llmw-bench-baseline")


def _configure() -> dict[str, Any]:
    concurrency = int(os.environ.get("LLM_WORKER_CONCURRENCY", "100"))
    return {
        "broker_url": os.environ.get("BENCH_REDIS_URL", "redis://localhost:6379/0"),
        "broker_transport_options": {
            "visibility_timeout": 3600,
            "max_connections": concurrency + 32,
        },
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


app.conf.update(_configure())


@cache
def _http() -> httpx.Client:
    concurrency = int(os.environ.get("LLM_WORKER_CONCURRENCY", "100"))
    return httpx.Client(
        base_url=os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8080"),
        headers={
            "authorization": f"Bearer {os.environ.get('BENCH_API_KEY', '')}",
            "anthropic-version": "2023-06-01",
        },
        timeout=60,
        limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=min(concurrency, 64)
        ),
    )


@app.task(name=PLAIN_TASK, ignore_result=True)
def plain_http(request: dict[str, Any]) -> None:
    response = _http().post("/messages", json=request)
    response.raise_for_status()
    response.json()


@app.task(name=EMPTY_TASK, ignore_result=True)
def empty(*_: Any) -> None:
    return None
