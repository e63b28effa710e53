"""No single request can lock a rate-limit key, with a real worker and the simulator."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest

from tests.support import WorkerProcess, celery_worker_args, make_request, worker_env
from worker import events as ev
from worker.client.sync import Client
from worker.errors import JobFailed
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

BUCKET = 8000  # output tokens per period


@pytest.fixture
def limited(redis_url: str, simulator_url: str) -> Iterator[dict[str, str]]:
    """A worker whose every key may spend 8,000 output tokens a minute and never waits (a
    job that would is sent back to the queue with a `retry` event instead)."""
    env = worker_env(
        redis_url,
        simulator_url,
        queue=f"capacity-{uuid.uuid4().hex[:8]}",
        key_prefix=f"llmw-cap-{uuid.uuid4().hex[:6]}",
        rate_limits=orjson.dumps({"default": {"output_tpm": BUCKET}}).decode(),
        rate_limit_max_wait_s=0,
    )
    settings = settings_from_env(env)
    worker = WorkerProcess(celery_worker_args(concurrency=8, queue=settings.queue), env)
    try:
        yield env
    finally:
        worker.stop()


def test_a_huge_and_a_rejected_request_leave_the_bucket_to_the_next_jobs(
    limited: dict[str, str],
) -> None:
    """max_tokens 900,000 ends failed (rate_limit_capacity) without taking the bucket into debt;
    a request the upstream rejects gives its whole 8,000-token reservation back; then a
    bucket's worth of normal jobs (4 x 2,000) all run at once, none sent back to the queue."""
    # A producer that does not know the limit (it would refuse the huge request at submit).
    producer = {k: v for k, v in limited.items() if k != "LLM_WORKER_RATE_LIMITS"}
    with Client(settings_from_env(producer)) as client:
        huge = client.submit(
            make_request("huge", stream=False, max_tokens=900_000, model="unlisted-model-a")
        )
        with pytest.raises(JobFailed) as refused:
            huge.result(timeout=60)
        assert refused.value.error_type == "rate_limit_capacity"
        assert "exceeds the output_tpm limit of 8000" in str(refused.value)
        # The simulator serves only the seed's models: a 400 before any output.
        rejected = client.submit(
            make_request("rejected", stream=False, max_tokens=BUCKET, model="unlisted-model-b")
        )
        with pytest.raises(JobFailed) as failed:
            rejected.result(timeout=60)
        assert failed.value.status_code == 400
        tag = uuid.uuid4().hex
        jobs = client.submit_many(
            [make_request(f"normal {tag} {i} [[sim tokens=5]]", max_tokens=2000) for i in range(4)]
        )
        for job in jobs:
            job.result(timeout=60)
        histories = [list(job.events(timeout=10)) for job in jobs]
    for events in histories:
        assert [e["type"] for e in events if e["type"] == ev.RETRY] == []
        assert [e["type"] for e in events].count(ev.STARTED) == 1
