"""The baseline for ``bench.ratelimit``: a plain Celery task with Celery's own ``rate_limit``.

What a Celery user writes without a shared limiter: one httpx call per task, the provider's
limit as the task's ``rate_limit`` (which Celery enforces per worker process), and on a 429 a
retry after the ``retry-after`` the provider sent. Run as
``celery -A bench.ratelimit_baseline worker``; configured by ``BENCH_*`` variables only.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import redis
from celery import Celery

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://localhost:6379/0")
API_URL = os.environ.get("BENCH_API_URL", "http://127.0.0.1:8080")
API_KEY = os.environ.get("BENCH_API_KEY", "")
RATE_LIMIT = os.environ.get("BENCH_RATE_LIMIT") or None  # e.g. "4.0/s"
QUEUE = os.environ.get("BENCH_QUEUE", "baseline")
DONE_KEY = f"{QUEUE}:done"

app = Celery("baseline", broker=BROKER_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_transport_options={"max_connections": 200},
    worker_hijack_root_logger=False,
)
_http = httpx.Client(timeout=60)
_redis = redis.Redis.from_url(BROKER_URL)


@app.task(bind=True, name="baseline.call", rate_limit=RATE_LIMIT, max_retries=None)
def call(self: Any, request: dict[str, Any]) -> None:
    """One /messages call; a 429 is retried after its retry-after, as the SDK would."""
    response = _http.post(
        f"{API_URL}/messages", json=request, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    if response.status_code == 429:
        raise self.retry(countdown=float(response.headers.get("retry-after", "1")))
    response.raise_for_status()
    _redis.incr(DONE_KEY)
