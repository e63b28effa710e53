"""Cancellation: a queued job never reaches the upstream; a streaming one stops promptly."""

from __future__ import annotations

import time

import pytest

from tests.support import make_request, upstream_requests
from worker import events as ev
from worker.client.sync import Client
from worker.errors import JobCancelled, JobNotFound

pytestmark = pytest.mark.integration


def test_cancel_mid_stream_closes_the_upstream_and_ends_cancelled(client: Client) -> None:
    """A running streamed job stops soon after cancel() (the answer is cut: the simulator
    would stream 400 tokens for 10 s) and ends cancelled, once."""
    job = client.submit(make_request("A long answer [[sim tokens=400 tps=40]]"))
    for event in job.events(timeout=30):
        if event["type"] == ev.CHUNK:
            break
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        job.result(timeout=10)
    events = list(job.events(timeout=5))
    assert [e["type"] for e in events].count(ev.CANCELLED) == 1
    assert events[-1]["type"] == ev.CANCELLED
    chunks = [e for e in events if e["type"] == ev.CHUNK]
    assert len(chunks) < 400  # the answer was cut, not waited out
    assert job.cancel() is False  # already ended


def test_cancel_of_a_queued_job_means_it_never_reaches_the_upstream(
    client: Client, simulator_url: str
) -> None:
    """A job cancelled while queued ends cancelled at once and the worker skips it."""
    from worker.broker import task_message

    job_id = f"queued-cancel-{time.monotonic_ns()}"
    request = make_request(f"never sent {job_id}")
    # Create the job without enqueuing it, cancel it, then deliver its message.
    script = client.store.submit_script()
    script(
        keys=[client.keys.job(job_id)],
        args=["sha", time.time(), request["model"], "{}", 3600, "", time.time() + 900],
    )
    assert client.get(job_id).cancel() is True
    before = upstream_requests(simulator_url)
    payload = {"job_id": job_id, "request": request, "submitted_at": time.time()}
    client.redis.lpush(
        client.settings.queue, task_message(job_id, payload, queue=client.settings.queue)
    )
    client.submit(make_request("after [[sim tokens=2]]")).result(timeout=30)  # the queue drained
    events = list(client.get(job_id).events(timeout=5))
    assert [e["type"] for e in events] == [ev.CANCELLED]
    after = upstream_requests(simulator_url)
    assert after - before == 1  # only the second job reached the upstream


def test_cancel_of_an_unknown_job_raises_not_found(client: Client) -> None:
    """Cancelling an id that never existed is an error, not a silent no-op."""
    with pytest.raises(JobNotFound):
        client.get("never-existed-job").cancel()
