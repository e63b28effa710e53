"""The queue is not trusted: whatever lands on it, the worker survives and the job ends once."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
import pytest

from tests.support import WorkerProcess, make_request
from worker import events as ev
from worker.broker import TASK_NAME, task_message, traffic_headers
from worker.celery_app import LLMWorkerCelery
from worker.client.sync import Client, Job
from worker.runtime.task import UNDECODABLE_MESSAGE

pytestmark = pytest.mark.integration


def _push(client: Client, raw: bytes) -> None:
    client.redis.lpush(client.settings.queue, raw)


def _dead_letters_for(client: Client, job_id: str) -> list[dict[bytes, bytes]]:
    entries = client.redis.xrange(client.keys.dead_letters)
    return [fields for _id, fields in entries if fields[b"job_id"] == job_id.encode()]


def _assert_worker_still_works(client: Client) -> None:
    message = client.submit(make_request("still alive? [[sim tokens=3]]")).result(timeout=30)
    assert message["type"] == "message"


def test_payload_that_is_not_a_job_ends_failed_and_is_dead_lettered(client: Client) -> None:
    """A well-formed task message whose argument is not a job payload ends that job failed."""
    job_id = f"bad-payload-{uuid.uuid4().hex[:8]}"
    envelope = orjson.loads(task_message(job_id, {}, queue=client.settings.queue))
    body = orjson.dumps([[{"not": "a job"}], {}, {}])
    envelope["body"] = base64.b64encode(body).decode()
    _push(client, orjson.dumps(envelope))
    events = list(Job(client, job_id).events(timeout=30))
    assert [e["type"] for e in events] == [ev.FAILED]
    assert events[0]["error"]["type"] == "invalid_payload"
    assert _dead_letters_for(client, job_id)
    _assert_worker_still_works(client)


def test_invalid_request_on_the_queue_is_validated_again(client: Client) -> None:
    """The worker re-validates: a request that skipped the producer's checks ends failed."""
    job_id = f"bad-request-{uuid.uuid4().hex[:8]}"
    payload = {"job_id": job_id, "request": {**make_request("x"), "max_tokens": 0, "bogus": 1}}
    _push(client, task_message(job_id, payload, queue=client.settings.queue))
    events = list(Job(client, job_id).events(timeout=30))
    assert [e["type"] for e in events] == [ev.FAILED]
    assert events[0]["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in events[0]["error"]["message"]
    assert "bogus" in events[0]["error"]["message"]
    dead = _dead_letters_for(client, job_id)
    assert orjson.loads(dead[0][b"payload"])["request"]["bogus"] == 1
    _assert_worker_still_works(client)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", True), ("max_tokens", "16"), ("stream", "yes"), ("max_tokens", 8193)],
)
def test_the_worker_validates_strictly_and_with_the_catalogue(
    client: Client, field: str, value: Any
) -> None:
    """A queued request that is lax where the producer is strict (a boolean or a string for a
    number, a string for a boolean), or over its model's maximum, ends failed at the worker."""
    job_id = f"lax-request-{uuid.uuid4().hex[:8]}"
    payload = {"job_id": job_id, "request": {**make_request("x"), field: value}}
    _push(client, task_message(job_id, payload, queue=client.settings.queue))
    events = list(Job(client, job_id).events(timeout=30))
    assert [e["type"] for e in events] == [ev.FAILED]
    assert events[0]["error"]["type"] == "invalid_request_error"
    assert field in events[0]["error"]["message"]


@pytest.mark.parametrize(
    "fallbacks", ["deepseek-ai/DeepSeek-V3.1", [1], ["bad name"], [f"m{i}" for i in range(9)]]
)
def test_malformed_fallbacks_on_the_queue_end_the_job_failed(
    client: Client, fallbacks: Any
) -> None:
    """A queued payload whose fallback_models is not a list of at most 8 model names ends its
    job failed (invalid_payload, dead-lettered) before any upstream call."""
    job_id = f"bad-fallbacks-{uuid.uuid4().hex[:8]}"
    payload = {"job_id": job_id, "request": make_request("x"), "fallback_models": fallbacks}
    _push(client, task_message(job_id, payload, queue=client.settings.queue))
    events = list(Job(client, job_id).events(timeout=30))
    assert [e["type"] for e in events] == [ev.FAILED]
    assert events[0]["error"]["type"] == "invalid_payload"
    assert "fallback_models" in events[0]["error"]["message"]
    assert _dead_letters_for(client, job_id)


def test_undecodable_body_ends_the_job_failed(client: Client) -> None:
    """A message whose JSON body cannot be decoded ends its job failed, worker unharmed; the
    job's error is a fixed sentence (the decoder's words are in the worker's log)."""
    job_id = f"undecodable-{uuid.uuid4().hex[:8]}"
    envelope = orjson.loads(task_message(job_id, {}, queue=client.settings.queue))
    envelope["body"] = base64.b64encode(b"{this is not json").decode()
    _push(client, orjson.dumps(envelope))
    events = list(Job(client, job_id).events(timeout=30))
    assert [e["type"] for e in events] == [ev.FAILED]
    assert events[0]["error"]["type"] == "undecodable_message"
    assert events[0]["error"]["message"] == UNDECODABLE_MESSAGE
    _assert_worker_still_works(client)


@pytest.mark.parametrize(
    "raw", [b"garbage that is not json", b'{"json": "but not a message"}', b"[]"]
)
def test_raw_garbage_on_the_queue_does_not_stop_the_worker(
    client: Client, worker: WorkerProcess, raw: bytes
) -> None:
    """Bytes that are not a broker message at all are dropped and the worker keeps consuming."""
    _push(client, raw)
    _assert_worker_still_works(client)
    assert worker.proc.poll() is None
    # Dropped for good: not left in the worker's inbox, to come back when it is given back.
    inboxes = client.redis.smembers("_kombu.inboxes")
    assert inboxes
    assert all(client.redis.llen(inbox) == 0 for inbox in inboxes)


def test_our_envelope_matches_what_celery_publishes(redis_url: str) -> None:
    """The hand-built broker envelope has the shape kombu's Redis transport writes, and
    Celery's publish given the traffic headers (as a rate-limit requeue is) carries them."""
    queue = f"envelope-check-{uuid.uuid4().hex[:8]}"
    app = LLMWorkerCelery("envelope-check")
    from worker.settings import load_settings

    app.use_settings(load_settings(redis_url=redis_url, queue=queue))
    payload: dict[str, Any] = {
        "job_id": "j1",
        "request": make_request("hi"),
        "priority": 8,
        "tenant": "acme",
        "submitted_at": 1.5,
    }
    app.send_task(
        TASK_NAME, args=[payload], task_id="j1", queue=queue, headers=traffic_headers(payload)
    )
    import redis

    r = redis.Redis.from_url(redis_url)
    theirs = orjson.loads(r.rpop(queue))  # type: ignore[arg-type]
    ours = orjson.loads(task_message("j1", payload, queue=queue))
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    assert set(ours["properties"]) == set(theirs["properties"])
    assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
    for key in ("content-type", "content-encoding"):
        assert ours[key] == theirs[key]
    assert orjson.loads(base64.b64decode(ours["body"])) == orjson.loads(
        base64.b64decode(theirs["body"])
    )
    for key in ("task", "id", "root_id", "retries", "lang", "llmw_priority", "llmw_tenant"):
        assert ours["headers"][key] == theirs["headers"][key]
    r.close()


def test_garbage_fetched_with_jobs_is_dropped_and_the_jobs_run(
    client: Client, worker: WorkerProcess
) -> None:
    """One fetch takes several messages at once; an item among them that is not a message is
    dead-lettered and dropped, and the jobs beside it run (none is left in the inbox)."""
    from worker.client.sync import Client as SyncClient

    staging = client.settings.queue + "-held"
    held = SyncClient(client.settings.model_copy(update={"queue": staging}))
    try:
        first, second = held.submit_many(
            [make_request("one [[sim tokens=3]]"), make_request("two [[sim tokens=3]]")]
        )
        raw_first, raw_second = held.redis.rpop(staging), held.redis.rpop(staging)
    finally:
        held.close()
    assert raw_first
    assert raw_second
    dead_before = client.redis.xlen(client.keys.dead_letters)
    # One LPUSH: the idle worker's blocking fetch takes the first, its next fetch the others.
    client.redis.lpush(client.settings.queue, raw_first, b"not a message", raw_second)
    for job_id in (first.job_id, second.job_id):
        assert Job(client, job_id).result(timeout=30)["type"] == "message"
    assert worker.proc.poll() is None
    assert client.redis.xlen(client.keys.dead_letters) == dead_before + 1
    inboxes = client.redis.smembers("_kombu.inboxes")
    assert all(client.redis.llen(inbox) == 0 for inbox in inboxes)
