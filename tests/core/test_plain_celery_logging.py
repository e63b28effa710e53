"""A worker started with plain `celery -A worker.celery_app worker` logs as `llm-worker run`
does: LLM_WORKER_LOG_LEVEL and LOG_FORMAT hold (and with them our processors, redaction
among them, which tests/core/test_logs.py covers)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support import WorkerProcess, celery_worker_args, make_request, worker_env
from worker.client.sync import Client
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_plain_celery_worker_uses_our_log_settings(
    redis_url: str, simulator_url: str, level: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    env = worker_env(
        redis_url,
        simulator_url,
        queue=f"plainlog-{tag}",
        key_prefix=f"plainlog{tag}",
        log_level=level,
        log_format="json",
    )
    worker = WorkerProcess(celery_worker_args(concurrency=4, queue=f"plainlog-{tag}"), env)
    try:
        worker.ready()
        with Client(settings_from_env(env)) as client:
            job = client.submit(make_request(f"{tag} [[sim tokens=3]]"))
            job.result(timeout=60)
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    ours = [line for line in log.splitlines() if '"event"' in line]
    finished = [json.loads(line) for line in ours if "job_finished" in line]
    if level == "INFO":
        assert len(finished) == 2  # the canary and the job, as JSON objects
        assert {f["level"] for f in finished} == {"info"}
    else:
        assert "job_finished" not in log
