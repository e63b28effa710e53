"""The runner treats a stream it cannot fold as the upstream's fault: retried, then failed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from worker import events as ev
from worker.keys import Keys
from worker.runtime.context import Runtime, redis_client
from worker.runtime.job_store import WorkerStore
from worker.runtime.leases import LeaseKeeper, new_token
from worker.runtime.runner import JobRunner
from worker.runtime.upstream import UpstreamClient
from worker.settings import load_settings

pytestmark = pytest.mark.integration

# A delta with no message_start before it: valid SSE and JSON, but not a message stream.
ORPHAN_DELTA = (
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}\n\n'
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


def test_unfoldable_stream_is_retried_as_malformed_then_fails(redis_url: str) -> None:
    """An event sequence the accumulator rejects costs a retry (malformed_sse), not a crash."""
    transport = httpx.MockTransport(
        lambda _request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=ORPHAN_DELTA
        )
    )
    rt = _runtime(redis_url, transport)
    request = {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    _runner(rt, "orphan-job", request).run()
    events = _events(rt, "orphan-job")
    assert [e["type"] for e in events] == [ev.STARTED, ev.RETRY, ev.STARTED, ev.FAILED]
    assert events[1]["reason"] == "malformed_sse"
    assert events[-1]["error"]["type"] == "api_error"
    rt.close()


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
    from worker.runtime.task import fail_unrunnable

    rt = _runtime(redis_url, None, key_prefix="llmw-crash-of-ours")
    job_id = "crashed-job"
    runner = _runner(rt, job_id, {"model": "m"})
    runner._publish([runner._event(ev.STARTED, 1)], attempts=1)
    runner._publish([runner._event(ev.CHUNK, 1, event={"type": "ping"})])

    fail_unrunnable(rt, job_id, "internal_error", "KeyError: 'x'", {"job_id": job_id})

    with Client(rt.settings) as client:
        events = list(client.get(job_id).events(timeout=5))
        assert [(e["seq"], e["type"]) for e in events] == [
            (1, ev.STARTED),
            (2, ev.CHUNK),
            (3, ev.FAILED),
        ]
        with pytest.raises(JobFailed, match="KeyError"):
            client.get(job_id).result(timeout=5)
    dead = [f for _id, f in rt.store.redis.xrange(rt.store.keys.dead_letters)]
    assert [d[b"reason"] for d in dead] == [b"internal_error"]
    rt.close()
