"""worker.AsyncClient passes the sync client's behaviour tests, against the same real worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from tests.support import WorkerProcess, make_request, new_keys, written_keys
from worker import AsyncClient, AsyncJob
from worker import events as ev
from worker.client.sync import Client
from worker.errors import JobCancelled, JobConflict, JobFailed, JobNotFound, RequestInvalid
from worker.runtime.accumulate import accumulate, final_message

pytestmark = pytest.mark.integration

T = TypeVar("T")


@pytest.fixture
def run(worker: WorkerProcess) -> Callable[[Callable[[AsyncClient], Awaitable[T]]], T]:
    """Runs ``body(async_client)`` in a fresh event loop, closing the client after."""

    def runner(body: Callable[[AsyncClient], Awaitable[T]]) -> T:
        async def main() -> T:
            async with AsyncClient(worker.settings()) as client:
                return await body(client)

        return asyncio.run(main())

    return runner


async def _collect(job: AsyncJob, wait_s: float = 30) -> list[dict[str, Any]]:
    return [event async for event in job.events(timeout=wait_s)]


def _strip(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "id"}


def test_streamed_job_result_equals_the_sync_clients(run: Any, client: Client) -> None:
    """The same request through both clients ends in the same final message."""
    request = make_request("Tell me about async queues")

    async def body(ac: AsyncClient) -> dict[str, Any]:
        return await (await ac.submit(request)).result(timeout=30)

    message = run(body)
    assert message["stop_reason"] == "end_turn"
    assert _strip(message) == _strip(client.submit(request).result(timeout=30))


def test_non_streamed_job_has_started_and_completed_only(run: Any) -> None:
    """A non-streamed job publishes started then completed; status carries the metadata."""

    async def body(ac: AsyncClient) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        job = await ac.submit(make_request("No stream", stream=False), metadata={"batch": 7})
        return await _collect(job), await job.status()

    events, status = run(body)
    assert [e["type"] for e in events] == [ev.STARTED, ev.COMPLETED]
    assert status["state"] == "completed"
    assert status["metadata"] == {"batch": 7}
    assert status["attempts"] == 1
    assert status["usage"] == events[-1]["message"]["usage"]


def test_chunks_fold_into_the_final_message_with_rising_seq(run: Any) -> None:
    """Events come in seq order, with stream ids, and the chunks fold into the message."""

    async def body(ac: AsyncClient) -> list[dict[str, Any]]:
        return await _collect(await ac.submit(make_request("Count [[sim tokens=40]]")))

    events = run(body)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["stream_id"] for e in events)
    snapshot = None
    for event in events:
        if event["type"] == ev.CHUNK:
            snapshot = accumulate(snapshot, event["event"])
    assert snapshot is not None
    assert final_message(snapshot) == events[-1]["message"]


def test_async_and_sync_readers_see_the_same_events(run: Any, client: Client) -> None:
    """One job read through both clients gives identical event lists."""

    async def body(ac: AsyncClient) -> tuple[str, list[dict[str, Any]]]:
        job = await ac.submit(make_request("Both readers [[sim tokens=10]]"))
        return job.job_id, await _collect(job)

    job_id, events = run(body)
    assert events == list(client.get(job_id).events(timeout=30))


def test_event_batches_are_the_events_as_read_and_end_at_the_terminal(run: Any) -> None:
    """event_batches gives what each read returned: flattened, exactly events(); read after
    the job ended, one batch holding every event, the terminal last; read again from a
    stream id, only what came after it."""

    async def body(
        ac: AsyncClient,
    ) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
        job = await ac.submit(make_request("Batches [[sim tokens=12]]"))
        events = await _collect(job)
        batches = [b async for b in job.event_batches(timeout=30)]
        after = events[2]["stream_id"]
        rest = [b async for b in job.event_batches(timeout=30, after=after)]
        return events, batches, rest

    events, batches, rest = run(body)
    assert len(batches) == 1
    assert batches[0] == events
    assert ev.is_terminal(batches[0][-1])
    assert [e for b in rest for e in b] == events[3:]


def test_tool_use_job_returns_the_parsed_tool_input(run: Any) -> None:
    """A job with tools completes with a tool_use block holding the parsed input."""
    tool = {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }

    async def body(ac: AsyncClient) -> dict[str, Any]:
        return await (await ac.submit(make_request("Lisbon?", tools=[tool]))).result(timeout=30)

    message = run(body)
    assert message["stop_reason"] == "tool_use"
    uses = [b for b in message["content"] if b["type"] == "tool_use"]
    assert uses[0]["name"] == "get_weather"
    assert isinstance(uses[0]["input"], dict)


def test_consumers_attaching_before_during_and_after_agree(run: Any) -> None:
    """Replay plus follow loses nothing whenever an async consumer attaches."""

    async def body(ac: AsyncClient) -> list[list[dict[str, Any]]]:
        job = await ac.submit(make_request("Slow [[sim tokens=30 tps=100 ttft_ms=200]]"))
        first_chunk = asyncio.Event()
        early: list[dict[str, Any]] = []

        async def follow() -> None:
            async for event in job.events(timeout=30):
                early.append(event)
                if event["type"] == ev.CHUNK:
                    first_chunk.set()

        task = asyncio.create_task(follow())
        await asyncio.wait_for(first_chunk.wait(), timeout=30)
        during = await _collect(job)
        await asyncio.wait_for(task, timeout=30)
        return [early, during, await _collect(job)]

    early, during, after = run(body)
    assert early == during == after
    assert after[-1]["type"] == ev.COMPLETED


def test_submit_many_runs_a_hundred_jobs_concurrently(run: Any) -> None:
    """100 jobs in one pipeline all complete; results are awaited together."""

    async def body(ac: AsyncClient) -> list[dict[str, Any]]:
        jobs = await ac.submit_many(
            [make_request(f"async job {i} [[sim tokens=3]]", stream=i % 2 == 0) for i in range(100)]
        )
        assert len({job.job_id for job in jobs}) == 100
        return list(await asyncio.gather(*(job.result(timeout=120) for job in jobs)))

    assert all(message["type"] == "message" for message in run(body))


def test_invalid_requests_write_nothing(run: Any, client: Client) -> None:
    """A bad request (alone or among many) raises one error naming each field; nothing written."""
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)

    async def body(ac: AsyncClient) -> tuple[RequestInvalid, RequestInvalid]:
        with pytest.raises(RequestInvalid) as one:
            await ac.submit(
                {"model": "deepseek-ai/DeepSeek-V3", "max_tokens": 0, "messages": [], "x": 1},
                job_id="async-bad-1",
            )
        with pytest.raises(RequestInvalid) as many:
            await ac.submit_many([make_request("fine"), make_request("bad", max_tokens=-1)])
        with pytest.raises(JobNotFound):
            await ac.get("async-bad-1")
        return one.value, many.value

    one, many = run(body)
    assert {"max_tokens", "messages", "x"} <= {e["loc"] for e in one.errors}
    assert [e["loc"] for e in many.errors] == ["requests[1].max_tokens"]
    assert new_keys(client, before, queued) == set()


def test_unknown_jobs_raise_not_found(run: Any) -> None:
    """get, events, result and cancel of an id that never existed fail fast."""

    async def body(ac: AsyncClient) -> None:
        with pytest.raises(JobNotFound):
            await ac.get("no-such-async-job")
        with pytest.raises(JobNotFound):
            await ac.get("not a valid id!")
        ghost = AsyncJob(ac, "no-such-async-job")
        with pytest.raises(JobNotFound):
            await _collect(ghost, wait_s=5)
        with pytest.raises(JobNotFound):
            await ghost.result(timeout=5)
        with pytest.raises(JobNotFound):
            await ghost.cancel()

    run(body)


def test_upstream_400_raises_job_failed_with_its_status(run: Any) -> None:
    """A 400 from the upstream ends the job failed; result() raises JobFailed with the status."""

    async def body(ac: AsyncClient) -> JobFailed:
        job = await ac.submit({**make_request("hi"), "model": "no-such/model"})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=30)
        assert (await job.status())["attempts"] == 1
        return info.value

    failed = run(body)
    assert failed.status_code == 400
    assert failed.error_type == "invalid_request_error"


def test_cancel_mid_stream_ends_cancelled_once(run: Any) -> None:
    """cancel() of a streaming job ends it cancelled; a second cancel() says it had ended."""

    async def body(ac: AsyncClient) -> list[dict[str, Any]]:
        job = await ac.submit(make_request("Long [[sim tokens=400 tps=40]]"))
        async for event in job.events(timeout=30):
            if event["type"] == ev.CHUNK:
                break
        assert await job.cancel() is True
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)
        assert await job.cancel() is False
        return await _collect(job, wait_s=5)

    events = run(body)
    assert [e["type"] for e in events].count(ev.CANCELLED) == 1
    assert len([e for e in events if e["type"] == ev.CHUNK]) < 400


def test_job_id_is_the_idempotency_key(run: Any) -> None:
    """The same job_id and request returns the one job; a different request conflicts."""
    job_id = f"async-idem-{uuid.uuid4().hex[:8]}"

    async def body(ac: AsyncClient) -> None:
        first = await ac.submit(make_request("once [[sim tokens=2]]"), job_id=job_id)
        again = await ac.submit(make_request("once [[sim tokens=2]]"), job_id=job_id)
        assert first.job_id == again.job_id
        await first.result(timeout=30)
        events = await _collect(again)
        assert [e["type"] for e in events].count(ev.STARTED) == 1
        with pytest.raises(JobConflict):
            await ac.submit(make_request("something else"), job_id=job_id)

    run(body)


def test_events_timeout_raises_timeout_error(run: Any) -> None:
    """events(timeout=…) bounds the whole wait with TimeoutError."""

    async def body(ac: AsyncClient) -> None:
        job = await ac.submit(make_request("Slow [[sim tokens=200 tps=20]]"))
        with pytest.raises(TimeoutError):
            await _collect(job, wait_s=0.5)
        await job.cancel()

    run(body)


def test_a_submit_after_redis_lost_its_scripts_loads_them_and_succeeds(run: Any) -> None:
    """The submit pipeline calls its scripts by SHA (no SCRIPT EXISTS round trip first): after
    a SCRIPT FLUSH (as after a Redis restart or failover) it loads them and the job runs."""

    async def body(ac: AsyncClient) -> tuple[bool, dict[str, Any]]:
        await ac.redis.script_flush()  # type: ignore[no-untyped-call]
        job = await ac.submit(make_request("after a flush", stream=False, max_tokens=8))
        loaded = await ac.redis.script_exists(getattr(ac._submit, "sha"))  # noqa: B009
        return bool(loaded[0]), await job.result(timeout=30)

    loaded, message = run(body)
    assert loaded
    assert message["type"] == "message"


def test_the_sync_client_also_loads_lost_scripts_and_succeeds(client: Client) -> None:
    """The sync client's submit calls its scripts by SHA as well: after a SCRIPT FLUSH the
    submit loads them, runs once more, and the job is created once and runs."""
    client.redis.script_flush()  # type: ignore[no-untyped-call]
    job_id = f"flush-{uuid.uuid4().hex[:8]}"
    job = client.submit(make_request("after a flush", stream=False, max_tokens=8), job_id=job_id)
    assert client.redis.script_exists(getattr(client.store.submit_script(), "sha"))[0]  # noqa: B009
    assert job.result(timeout=30)["type"] == "message"
    assert client.get(job_id).status()["attempts"] == 1
