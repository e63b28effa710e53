"""A job flows from the producer through Redis and a real worker to the simulator and back."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.support import TEST_API_KEY, make_request, new_keys, written_keys
from worker import events as ev
from worker.client.sync import Client
from worker.errors import JobFailed, JobNotFound, RequestInvalid
from worker.runtime.accumulate import accumulate, final_message
from worker.runtime.sse import DONE, SSEDecoder, parse_event

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "amqp"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """A producer on a worker whose broker is the results Redis, or RabbitMQ."""
    worker = request.getfixturevalue("worker" if request.param == "redis" else "amqp_worker")
    with Client(worker.settings()) as c:
        yield c


def upstream_message(simulator_url: str, request: dict[str, Any]) -> dict[str, Any]:
    """What the upstream answers when called directly, without the queue."""
    response = httpx.post(
        f"{simulator_url}/messages",
        json={**request, "stream": False},
        headers={"authorization": f"Bearer {TEST_API_KEY}"},
        timeout=30,
    )
    response.raise_for_status()
    message: dict[str, Any] = response.json()
    return message


def upstream_stream(simulator_url: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The upstream's stream events when called directly."""
    decoder = SSEDecoder()
    out: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        f"{simulator_url}/messages",
        json={**request, "stream": True},
        headers={"authorization": f"Bearer {TEST_API_KEY}"},
        timeout=30,
    ) as response:
        for raw in response.iter_bytes():
            for sse in decoder.decode(raw):
                event = parse_event(sse)
                if isinstance(event, dict):
                    out.append(event)
                elif event is DONE:
                    return out
    return out


def _strip(message: dict[str, Any]) -> dict[str, Any]:
    # The simulator mints a fresh message id per call, and the SDK's accumulation (which we
    # mirror) adds ``stop_details: null``; everything else must match.
    return {
        k: v for k, v in message.items() if k != "id" and not (k == "stop_details" and v is None)
    }


def _without_text_deltas(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Type and delta of every event but text deltas (message ids differ between calls)."""
    return [
        (e["type"], e.get("delta"))
        for e in events
        if (e.get("delta") or {}).get("type") != "text_delta"
    ]


def _text_by_block(events: list[dict[str, Any]]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events:
        if (e.get("delta") or {}).get("type") == "text_delta":
            texts[e["index"]] = texts.get(e["index"], "") + e["delta"]["text"]
    return texts


def test_streamed_job_completes_with_the_upstream_message(
    client: Client, simulator_url: str
) -> None:
    """A streamed job's result equals the upstream's own answer to the same request."""
    request = make_request("Tell me about queues")
    message = client.submit(request).result(timeout=30)
    assert _strip(message) == _strip(upstream_message(simulator_url, request))
    assert message["content"][0]["text"]
    assert message["stop_reason"] == "end_turn"


def test_non_streamed_job_completes_with_started_and_completed_only(
    client: Client, simulator_url: str
) -> None:
    """A non-streamed job publishes started then completed, and no chunks."""
    request = make_request("No stream please", stream=False)
    job = client.submit(request, metadata={"batch": 7})
    events = list(job.events(timeout=30))
    assert [e["type"] for e in events] == [ev.STARTED, ev.COMPLETED]
    assert _strip(events[-1]["message"]) == _strip(upstream_message(simulator_url, request))
    status = job.status()
    assert status["state"] == "completed"
    assert status["metadata"] == {"batch": 7}
    assert status["attempts"] == 1
    assert status["usage"] == events[-1]["message"]["usage"]


def test_chunks_are_the_upstream_events_in_order_with_rising_seq(
    client: Client, simulator_url: str
) -> None:
    """Each upstream stream event becomes one chunk, in order, except that text deltas of one
    block that arrived together may be one chunk (DESIGN); seq rises by one per event."""
    request = make_request("Count the chunks [[sim tokens=40]]")
    events = list(client.submit(request).events(timeout=30))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == ev.STARTED
    assert events[-1]["type"] == ev.COMPLETED
    chunks = [e["event"] for e in events if e["type"] == ev.CHUNK]
    direct = upstream_stream(simulator_url, request)
    assert _without_text_deltas(chunks) == _without_text_deltas(direct)
    assert _text_by_block(chunks) == _text_by_block(direct)
    snapshot = None
    for chunk in chunks:
        snapshot = accumulate(snapshot, chunk)
    assert snapshot is not None
    assert final_message(snapshot) == events[-1]["message"]


def test_tool_use_job_returns_the_parsed_tool_input(client: Client) -> None:
    """A job with tools completes with a tool_use block whose input satisfies the schema."""
    tool = {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    message = client.submit(make_request("Weather in Lisbon?", tools=[tool])).result(timeout=30)
    uses = [b for b in message["content"] if b["type"] == "tool_use"]
    assert message["stop_reason"] == "tool_use"
    assert uses
    assert uses[0]["name"] == "get_weather"
    assert isinstance(uses[0]["input"]["city"], str)


def test_consumers_attaching_before_during_and_after_see_the_same_events(client: Client) -> None:
    """Replay plus follow loses nothing whenever a consumer attaches."""
    job = client.submit(make_request("Slow one [[sim tokens=30 tps=100 ttft_ms=200]]"))
    early: list[dict[str, Any]] = []
    first_chunk = threading.Event()

    def follow() -> None:
        for event in job.events(timeout=30):
            early.append(event)
            if event["type"] == ev.CHUNK:
                first_chunk.set()

    thread = threading.Thread(target=follow)
    thread.start()
    assert first_chunk.wait(timeout=30)
    during = list(job.events(timeout=30))
    thread.join(timeout=30)
    after = list(job.events(timeout=30))
    assert early == during == after
    assert after[-1]["type"] == ev.COMPLETED


def test_stop_sequences_and_max_tokens_reach_the_upstream(client: Client) -> None:
    """max_tokens cuts the answer with stop_reason max_tokens."""
    message = client.submit(make_request("Long [[sim tokens=50]]", max_tokens=7)).result(timeout=30)
    assert message["stop_reason"] == "max_tokens"
    assert message["usage"]["output_tokens"] == 7


def test_submit_many_runs_two_hundred_jobs(client: Client) -> None:
    """200 jobs submitted in one pipeline all complete, each with its own answer."""
    requests = [
        make_request(f"Job number {i} [[sim tokens=5]]", stream=i % 2 == 0) for i in range(200)
    ]
    jobs = client.submit_many(requests)
    assert len({job.job_id for job in jobs}) == 200
    results = [job.result(timeout=120) for job in jobs]
    assert all(r["type"] == "message" for r in results)
    assert all(job.status()["state"] == "completed" for job in jobs)


def test_invalid_request_writes_nothing(client: Client) -> None:
    """An invalid request raises one error listing every bad field and writes nothing."""
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)
    with pytest.raises(RequestInvalid) as info:
        client.submit(
            {
                "model": "deepseek-ai/DeepSeek-V3",
                "max_tokens": 0,
                "messages": [],
                "temperature": 9,
                "surprise": True,
            },
            job_id="bad-job-1",
        )
    locs = {e["loc"] for e in info.value.errors}
    assert {"max_tokens", "messages", "temperature", "surprise"} <= locs
    assert new_keys(client, before, queued) == set()
    with pytest.raises(JobNotFound):
        client.get("bad-job-1")


def test_submit_many_with_one_bad_request_writes_nothing(client: Client) -> None:
    """One bad request among many refuses the whole batch, naming its index."""
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)
    requests = [make_request("fine"), make_request("also fine", max_tokens=-1)]
    with pytest.raises(RequestInvalid) as info:
        client.submit_many(requests)
    assert [e["loc"] for e in info.value.errors] == ["requests[1].max_tokens"]
    assert new_keys(client, before, queued) == set()


def test_events_of_an_unknown_job_raise_not_found(client: Client) -> None:
    """Following a job that does not exist fails fast instead of waiting forever."""
    with pytest.raises(JobNotFound):
        client.get("no-such-job")
    from worker.client.sync import Job

    with pytest.raises(JobNotFound):
        list(Job(client, "no-such-job").events(timeout=5))


def test_job_events_are_also_published_live(client: Client) -> None:
    """The pub/sub channel and the results channel carry the same events as the stream."""
    pubsub = client.redis.pubsub()
    job_id = f"live-channel-job-{uuid.uuid4().hex[:8]}"  # one per broker variant
    pubsub.subscribe(client.keys.channel(job_id), client.keys.results_channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    job = client.submit(make_request("live [[sim tokens=5]]"), job_id=job_id)
    stream_events = [
        {k: v for k, v in e.items() if k != "stream_id"} for e in job.events(timeout=30)
    ]
    live: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    while len(live) < len(stream_events) or not results:
        message = pubsub.get_message(timeout=5)
        assert message is not None, "a live event is missing"
        if message["type"] != "message":
            continue
        target = live if message["channel"].decode() == client.keys.channel(job_id) else results
        target.append(orjson.loads(message["data"]))
    pubsub.close()
    assert live == stream_events
    assert [r for r in results if r["job_id"] == job_id] == [stream_events[-1]]


def test_upstream_400_ends_the_job_failed_without_a_retry(
    client: Client, simulator_url: str
) -> None:
    """A 400 from the upstream is final: one attempt, failed with the upstream's error."""
    before = httpx.get(f"{simulator_url}/stats", params={"log": 0}, timeout=5).json()["by_status"]
    job = client.submit({**make_request("hi"), "model": "no-such/model"})
    events = list(job.events(timeout=30))
    assert [e["type"] for e in events] == [ev.STARTED, ev.FAILED]
    error = events[-1]["error"]
    assert error["status_code"] == 400
    assert error["type"] == "invalid_request_error"
    assert "does not exist" in error["message"]
    assert job.status()["attempts"] == 1
    with pytest.raises(JobFailed) as info:
        job.result(timeout=5)
    assert info.value.status_code == 400
    assert info.value.error_type == "invalid_request_error"
    after = httpx.get(f"{simulator_url}/stats", params={"log": 0}, timeout=5).json()["by_status"]
    assert after.get("400", 0) - before.get("400", 0) == 1
