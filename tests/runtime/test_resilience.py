"""Resilience on the session worker: non-streamed faults, idempotent ids, dead letters, expiry,
and cancelling a stream that has gone silent."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest

from tests.support import (
    WorkerProcess,
    celery_worker_args,
    make_request,
    upstream_requests,
    wait_for,
    worker_env,
)
from worker import AsyncClient
from worker import events as ev
from worker.client.sync import Client
from worker.errors import JobCancelled, JobConflict, JobFailed
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

# fault kind -> the retry reason a non-streamed call must report
NON_STREAMED_FAULTS = {
    "429": "http_429",
    "500": "http_500",
    "502": "http_502",
    "503": "http_503",
    "529": "http_529",
    "reset": "connection_lost",
    "cut": "connection_lost",
    "error_event": "http_529",
    "malformed": "malformed_response",
}


@pytest.mark.parametrize(("fault", "reason"), sorted(NON_STREAMED_FAULTS.items()))
def test_non_streamed_job_recovers_from_one_fault(client: Client, fault: str, reason: str) -> None:
    """A non-streamed call's fault costs one retry with its reason; the second call completes."""
    prompt = f"plain {uuid.uuid4().hex} [[sim tokens=7 fault={fault} fault_times=1]]"
    job = client.submit(make_request(prompt, stream=False))
    events = list(job.events(timeout=60))
    kinds = [e["type"] for e in events]
    assert kinds == [ev.STARTED, ev.RETRY, ev.STARTED, ev.COMPLETED], kinds
    assert events[1]["reason"] == reason
    assert events[-1]["message"]["usage"]["output_tokens"] == 7
    assert job.status()["attempts"] == 2


def test_resubmitting_the_same_job_id_and_request_returns_the_same_job(
    client: Client, simulator_url: str
) -> None:
    """Idempotency: the same id with the same request is one job and one upstream call."""
    job_id = f"idem-{uuid.uuid4().hex}"
    request = make_request(f"once {job_id} [[sim tokens=3]]")
    before = upstream_requests(simulator_url)
    first = client.submit(request, job_id=job_id)
    message = first.result(timeout=30)
    again = client.submit(request, job_id=job_id)
    assert again.job_id == job_id
    assert again.result(timeout=5) == message
    events = list(again.events(timeout=5))
    assert sum(e["type"] in ev.TERMINAL_TYPES for e in events) == 1
    # Also after the end: nothing is enqueued again (a queued copy would add an attempt).
    client.submit(make_request("drain [[sim tokens=1]]")).result(timeout=30)
    assert upstream_requests(simulator_url) - before == 2  # our job once, the drain job once
    assert client.get(job_id).status()["attempts"] == 1


def test_resubmitting_a_job_id_with_another_request_is_a_conflict(client: Client) -> None:
    """The same id with a different request fails clearly and leaves the first job alone."""
    job_id = f"conflict-{uuid.uuid4().hex}"
    client.submit(make_request("first [[sim tokens=2]]"), job_id=job_id).result(timeout=30)
    with pytest.raises(JobConflict, match=job_id):
        client.submit(make_request("second"), job_id=job_id)
    assert client.get(job_id).status()["state"] == "completed"


def _dead_letters(client: Client) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _id, fields in client.redis.xrange(client.keys.dead_letters)
    ]


def test_permanent_failure_is_dead_lettered_with_reason_and_payload(client: Client) -> None:
    """A 400 from the upstream fails the job and keeps its request in the dead-letter stream."""
    job_id = f"dead-{uuid.uuid4().hex}"
    request = make_request("rejected", model="no-such-model")
    job = client.submit(request, job_id=job_id)
    with pytest.raises(JobFailed):
        job.result(timeout=30)
    entry = next(e for e in _dead_letters(client) if e["job_id"] == job_id)
    assert entry["reason"] == "http_400"
    payload = orjson.loads(entry["payload"])
    assert payload["request"] == request
    assert payload["job_id"] == job_id


def test_retried_then_completed_job_is_not_dead_lettered(client: Client) -> None:
    """Only jobs that end failed reach the dead letters."""
    job_id = f"alive-{uuid.uuid4().hex}"
    prompt = f"{job_id} [[sim tokens=2 fault=500 fault_times=1]]"
    client.submit(make_request(prompt), job_id=job_id).result(timeout=30)
    assert all(e["job_id"] != job_id for e in _dead_letters(client))


def test_cancel_of_a_stalled_stream_ends_it_within_a_second(
    client: Client, simulator_url: str
) -> None:
    """A stream that has gone silent is closed on cancel, not at the idle timeout (60 s)."""
    job = client.submit(make_request(f"stall {uuid.uuid4().hex} [[sim tokens=20 fault=stall]]"))
    stream = client.keys.events(job.job_id)
    # The first half of the answer arrives at once (no pacing), then 30 s of silence: wait
    # until the job's stream has stopped growing, i.e. the worker is reading the stall.
    seen: list[int] = []

    def quiet() -> bool:
        seen.append(int(client.redis.xlen(stream)))
        return len(seen) > 6 and seen[-1] > 2 and seen[-1] == seen[-7]

    wait_for(quiet, 20, "the stream to go silent", interval_s=0.05)
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        job.result(timeout=10)  # the stall lasts 30 s: this wait ends only if it was cut
    upstream_types = [e["event"]["type"] for e in job.events(timeout=5) if e["type"] == ev.CHUNK]
    assert "content_block_delta" in upstream_types
    assert "message_stop" not in upstream_types  # cut in the stall, not waited out
    assert job.status()["state"] == "cancelled"


def test_job_queued_past_its_deadline_expires_without_an_upstream_call(
    redis_url: str, simulator_url: str
) -> None:
    """A job whose deadline passes in the queue ends expired; the upstream never sees it."""
    queue = f"llmw-expiry-{uuid.uuid4().hex[:6]}"
    env = worker_env(redis_url, simulator_url, queue=queue, job_deadline_s=1, concurrency=5)
    with Client(settings_from_env(env)) as producer:
        job = producer.submit(make_request(f"too late {uuid.uuid4().hex} [[sim tokens=2]]"))
        wait_for(lambda: time.time() > job.status()["deadline_at"] + 0.2, 10, "the deadline")
        before = upstream_requests(simulator_url)
        worker = WorkerProcess(celery_worker_args(concurrency=5, queue=queue), env)
        try:
            events = list(job.events(timeout=60))
        finally:
            worker.stop()
    assert [e["type"] for e in events] == [ev.EXPIRED]
    assert job.status()["state"] == "expired"
    assert upstream_requests(simulator_url) == before


def test_an_event_stored_twice_is_read_once(client: Client) -> None:
    """A write retried after a lost connection can store an event twice; readers skip the
    repeat by its seq, so consumers never see a chunk twice."""
    job_id = f"twice-{uuid.uuid4().hex}"
    stream = client.keys.events(job_id)
    client.redis.hset(client.keys.job(job_id), mapping={"state": "running"})
    events = [
        ev.make_event(job_id, 1, 1, ev.STARTED),
        ev.make_event(job_id, 2, 1, ev.CHUNK, event={"type": "ping"}),
        ev.make_event(job_id, 3, 1, ev.CANCELLED),
    ]
    for event in (events[0], events[1], events[1], events[2]):  # seq 2 stored twice
        client.redis.xadd(stream, {"data": ev.dumps(event)})
    assert [e["seq"] for e in client.get(job_id).events(timeout=5)] == [1, 2, 3]

    async def read() -> list[int]:
        async with AsyncClient(client.settings) as aclient:
            job = await aclient.get(job_id)
            return [e["seq"] async for e in job.events(timeout=5)]

    assert asyncio.run(read()) == [1, 2, 3]
