"""Every transient upstream fault is retried and the job still completes, once."""

from __future__ import annotations

import uuid

import pytest

from tests.support import make_request
from worker import events as ev
from worker.client.sync import Client

pytestmark = pytest.mark.integration

# fault kind -> the retry reason the worker must report
FAULTS = {
    "429": "http_429",
    "500": "http_500",
    "502": "http_502",
    "503": "http_503",
    "529": "http_529",
    "reset": "connection_lost",
    "cut": "connection_lost",
    "error_event": "stream_error_event",
    "malformed": "malformed_sse",
}


@pytest.mark.parametrize(("fault", "reason"), sorted(FAULTS.items()))
def test_streamed_job_recovers_from_one_fault(client: Client, fault: str, reason: str) -> None:
    """One injected fault costs one retry event with its reason; the second attempt completes."""
    prompt = f"recover {uuid.uuid4().hex} [[sim tokens=12 fault={fault} fault_times=1]]"
    job = client.submit(make_request(prompt))
    events = list(job.events(timeout=60))
    kinds = [e["type"] for e in events]
    assert kinds.count(ev.RETRY) == 1, kinds
    retry = next(e for e in events if e["type"] == ev.RETRY)
    assert retry["reason"] == reason
    assert retry["attempt"] == 1
    assert kinds[-1] == ev.COMPLETED
    assert sum(k in ev.TERMINAL_TYPES for k in kinds) == 1
    assert events[-1]["attempt"] == 2
    assert events[-1]["message"]["usage"]["output_tokens"] == 12
    assert job.status()["attempts"] == 2


def test_slow_drip_completes_without_a_retry(client: Client) -> None:
    """A slow but steady stream is not an idle stall: no retry."""
    job = client.submit(make_request(f"drip {uuid.uuid4().hex} [[sim tokens=4 fault=slow]]"))
    kinds = [e["type"] for e in job.events(timeout=60)]
    assert ev.RETRY not in kinds
    assert kinds[-1] == ev.COMPLETED


def test_persistent_fault_fails_after_max_attempts(client: Client) -> None:
    """A fault on every attempt ends the job failed after MAX_ATTEMPTS, with the last error."""
    job = client.submit(make_request(f"doomed {uuid.uuid4().hex} [[sim tokens=3 fault=503]]"))
    events = list(job.events(timeout=60))
    kinds = [e["type"] for e in events]
    attempts = client.settings.max_attempts
    assert kinds.count(ev.STARTED) == attempts
    assert kinds.count(ev.RETRY) == attempts - 1
    assert kinds[-1] == ev.FAILED
    assert events[-1]["error"]["status_code"] == 503


def test_stalled_stream_is_cut_at_the_idle_timeout_and_retried(
    redis_url: str, simulator_url: str
) -> None:
    """A stream that goes silent longer than IDLE_TIMEOUT_S is cut and the retry completes."""
    from tests.support import WorkerProcess, celery_worker_args, worker_env

    env = worker_env(redis_url, simulator_url, queue="llmw-idle", idle_timeout_s=1, concurrency=5)
    worker = WorkerProcess(celery_worker_args(concurrency=5, queue="llmw-idle"), env)
    try:
        worker.ready()
        with Client(worker.settings()) as client:
            prompt = f"stall {uuid.uuid4().hex} [[sim tokens=10 fault=stall fault_times=1]]"
            events = list(client.submit(make_request(prompt)).events(timeout=60))
    finally:
        worker.stop()
    retries = [e for e in events if e["type"] == ev.RETRY]
    assert [r["reason"] for r in retries] == ["idle_timeout"]
    assert events[-1]["type"] == ev.COMPLETED
