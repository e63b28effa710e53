"""The runner treats a stream it cannot fold as the upstream's fault: retried, then failed."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import orjson
import pytest

from tests.support import MESSAGE_START, sse_body, wait_for
from worker import events as ev
from worker.keys import Keys
from worker.runtime.context import Runtime, redis_client
from worker.runtime.job_store import WorkerStore
from worker.runtime.leases import LeaseKeeper, new_token
from worker.runtime.runner import JobRunner
from worker.runtime.upstream import UpstreamClient
from worker.settings import load_settings

pytestmark = pytest.mark.integration

# A delta for a block that was never started, after message_start: nothing can fold it.
ORPHAN_DELTA = sse_body(
    MESSAGE_START,
    {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "x"}},
    {"type": "message_stop"},
)
# Opens with a ping, carries event types no SDK knows, before message_start and after.
ODD_BUT_FINE = sse_body(
    {"type": "ping"},
    {"type": "vendor_hello", "region": "eu"},
    MESSAGE_START,
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "vendor_usage_estimate", "tokens": 2},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
    {"type": "message_stop"},
)


def _runtime(redis_url: str, transport: httpx.BaseTransport | None, **settings: Any) -> Runtime:
    """A worker's runtime in this process: real Redis; the upstream is ``transport``."""
    defaults = {
        "api_key": "k",
        "api_base_url": "http://upstream.test",
        "max_attempts": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.01,
        "key_prefix": "llmw-boundary",
    }
    config = load_settings(redis_url=redis_url, **{**defaults, **settings})
    store = WorkerStore(redis_client(config), Keys(config.key_prefix), result_ttl_s=60)
    return Runtime(
        config,
        store,
        UpstreamClient(config, transport=transport),
        "test",
        LeaseKeeper(store, lease_ttl_s=config.lease_ttl_s),
    )


def _runner(rt: Runtime, job_id: str, request: dict[str, Any]) -> JobRunner:
    """The runner of a job claimed as a worker would (without starting its attempt)."""
    token = new_token("test")
    claim = rt.store.claim(
        job_id,
        worker="test",
        model=request["model"],
        ttl_s=60,
        token=token,
        lease_ttl_s=rt.settings.lease_ttl_s,
        max_deliveries=rt.settings.max_deliveries,
    )
    return JobRunner(rt, job_id, request, claim, rt.leases.register(job_id, token))


def _events(rt: Runtime, job_id: str) -> list[dict[str, Any]]:
    entries = rt.store.redis.xrange(rt.store.keys.events(job_id))
    return [ev.loads(fields[b"data"]) for _id, fields in entries]


def _run_stream(redis_url: str, job_id: str, body: bytes) -> list[dict[str, Any]]:
    """Run one streamed job against an upstream that answers ``body``; the job's events."""
    transport = httpx.MockTransport(
        lambda _request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=body
        )
    )
    rt = _runtime(redis_url, transport)
    request = {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    try:
        _runner(rt, job_id, request).run()
        return _events(rt, job_id)
    finally:
        rt.close()


def test_unfoldable_stream_is_retried_as_malformed_then_fails(redis_url: str) -> None:
    """An event sequence the accumulator rejects costs a retry (malformed_sse), not a crash."""
    events = _run_stream(redis_url, "orphan-job", ORPHAN_DELTA)
    ends = [e for e in events if e["type"] != ev.CHUNK]
    assert [e["type"] for e in ends] == [ev.STARTED, ev.RETRY, ev.STARTED, ev.FAILED]
    assert ends[1]["reason"] == "malformed_sse"
    assert ends[-1]["error"]["type"] == "api_error"


def test_pings_and_unknown_events_do_not_fail_a_job_and_pass_through_verbatim(
    redis_url: str,
) -> None:
    """A stream that opens with a ping and carries unknown event types completes on its first
    attempt; its chunks carry those events verbatim, in order, for readers that want them."""
    events = _run_stream(redis_url, "odd-but-fine", ODD_BUT_FINE)
    assert [e["type"] for e in events if e["type"] != ev.CHUNK] == [ev.STARTED, ev.COMPLETED]
    chunk_types = [e["event"]["type"] for e in events if e["type"] == ev.CHUNK]
    assert chunk_types[:3] == ["ping", "vendor_hello", "message_start"]
    assert "vendor_usage_estimate" in chunk_types
    assert events[-1]["message"]["content"] == [{"type": "text", "text": "ok"}]


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"type": "error"}'])
def test_a_200_with_a_body_that_is_not_a_message_counts_as_200_and_is_retried(
    redis_url: str, body: bytes
) -> None:
    """A non-streamed answer that arrived (200) but cannot be read is `malformed_response`,
    retried, and counted under status 200, not `network` (no response)."""
    from worker import metrics as m

    rt = _runtime(redis_url, httpx.MockTransport(lambda _r: httpx.Response(200, content=body)))
    job_id = f"malformed-{body[:4].hex()}"
    ok, network = (m.UPSTREAM_REQUESTS.labels("m-malformed", s) for s in ("200", "network"))
    before = ok._value.get(), network._value.get()
    request = {
        "model": "m-malformed",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    _runner(rt, job_id, request).run()
    events = _events(rt, job_id)
    assert [e["type"] for e in events] == [ev.STARTED, ev.RETRY, ev.STARTED, ev.FAILED]
    assert events[1]["reason"] == "malformed_response"
    assert events[-1]["error"]["status_code"] == 200
    assert (ok._value.get() - before[0], network._value.get() - before[1]) == (2, 0)
    rt.close()


def test_a_crash_of_ours_mid_job_ends_it_failed_where_readers_see_it(redis_url: str) -> None:
    """A bug that escapes the runner while its worker holds the lease ends the job failed with
    the next seq (readers skip a seq they have seen), and keeps the payload as a dead letter."""
    from worker.client.sync import Client
    from worker.errors import JobFailed
    from worker.runtime.task import INTERNAL_ERROR_MESSAGE, fail_unrunnable

    rt = _runtime(redis_url, None, key_prefix="llmw-crash-of-ours")
    job_id = "crashed-job"
    runner = _runner(rt, job_id, {"model": "m"})
    runner._publish([runner._event(ev.STARTED, 1)], attempts=1)
    runner._publish([runner._event(ev.CHUNK, 1, event={"type": "ping"})])

    fail_unrunnable(rt, job_id, "internal_error", INTERNAL_ERROR_MESSAGE, {"job_id": job_id})

    with Client(rt.settings) as client:
        events = list(client.get(job_id).events(timeout=5))
        assert [(e["seq"], e["type"]) for e in events] == [
            (1, ev.STARTED),
            (2, ev.CHUNK),
            (3, ev.FAILED),
        ]
        with pytest.raises(JobFailed, match="internal_error"):
            client.get(job_id).result(timeout=5)
    dead = [f for _id, f in rt.store.redis.xrange(rt.store.keys.dead_letters)]
    assert [d[b"reason"] for d in dead] == [b"internal_error"]
    rt.close()


def test_a_crash_of_ours_reaches_the_producer_as_a_type_and_a_short_message(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a bug of ours raised (which may quote paths, addresses, the request) stays in the
    worker's log: the job's error is internal_error with a fixed sentence."""
    from structlog.testing import capture_logs

    from worker.runtime import task

    rt = _runtime(redis_url, None, key_prefix="llmw-crash-message")
    job_id = "crash-message"
    _runner(rt, job_id, {"model": "m"})  # the job's record, as a claim leaves it

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("db password=hunter2 at /srv/worker/secret.py")

    monkeypatch.setattr(task, "_runtime", lambda: rt)
    monkeypatch.setattr(task, "_run", crash)
    with capture_logs() as logs:
        task.run_job.apply(args=[{"job_id": job_id}], task_id=job_id)

    error = _events(rt, job_id)[-1]["error"]
    assert error == {
        "type": "internal_error",
        "message": task.INTERNAL_ERROR_MESSAGE,
        "status_code": None,
    }
    assert "hunter2" not in orjson.dumps(error).decode()
    crashed = [entry for entry in logs if entry["event"] == "job_crashed"]
    assert crashed
    assert crashed[0]["log_level"] == "error"
    assert crashed[0]["exc_info"] is True  # the traceback is rendered into the log line
    rt.close()


LINGER_S = 15.0


def test_the_first_text_delta_is_stored_without_the_publishing_linger(redis_url: str) -> None:
    """With a linger of 15 s, the chunks up to the first text delta are stored while the
    upstream still holds the rest of the stream (well within the linger): they skip it (time
    to first token); the job then completes with every chunk, the later ones after it."""
    first = sse_body(
        MESSAGE_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}},
    )
    rest = sse_body(
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 1},
        },
        {"type": "message_stop"},
    )
    release = threading.Event()

    def body() -> Any:
        yield first
        release.wait(30)  # the upstream holds the rest until the test has seen the delta
        yield rest

    transport = httpx.MockTransport(
        lambda _request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=body()
        )
    )
    rt = _runtime(redis_url, transport)
    store = rt.store
    rt.store = WorkerStore(store.redis, store.keys, result_ttl_s=60, publish_linger_s=LINGER_S)
    job_id = f"urgent-{uuid.uuid4().hex[:8]}"
    request = {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    runner = _runner(rt, job_id, request)
    done = threading.Thread(target=runner.run, daemon=True)
    done.start()
    try:

        def delta_stored() -> bool:
            return any(
                e["type"] == ev.CHUNK and e["event"]["type"] == "content_block_delta"
                for e in _events(rt, job_id)
            )

        wait_for(delta_stored, LINGER_S / 2, "the first text delta in the job's stream")
    finally:
        release.set()
        done.join(LINGER_S * 4)
    assert not done.is_alive()
    events = _events(rt, job_id)
    assert events[-1]["type"] == ev.COMPLETED
    assert [e["event"]["type"] for e in events if e["type"] == ev.CHUNK][-1] == "message_stop"
    rt.close()
