"""The official anthropic SDK, pointed at ``llm-worker gateway``, gets queued jobs' answers."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.support import (
    WorkerProcess,
    celery_worker_args,
    make_request,
    new_keys,
    start_gateway_process,
    stop_process,
    wait_for,
    worker_env,
    written_keys,
)
from worker.client.sync import Client
from worker.gateway.relay import message_events

pytestmark = pytest.mark.integration

GATEWAY_KEY = "gw-producer-key-1"
#: The tenant GATEWAY_KEY names (the gateway's jobs are ``<tenant>/<id>`` in Redis).
GATEWAY_TENANT = "gw-a"
MODEL = "deepseek-ai/DeepSeek-V3"
TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def start_gateway(worker: WorkerProcess, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """The gateway in its own process, on the worker's Redis, with two producer keys: one
    named (tenant GATEWAY_TENANT), one bare."""
    env = {
        **worker.env,
        "LLM_WORKER_GATEWAY_API_KEYS": f"{GATEWAY_TENANT}:{GATEWAY_KEY}, second-key",
        "LLM_WORKER_MAX_REQUEST_BYTES": "65536",
        "LLM_WORKER_GATEWAY_MAX_BODY_BYTES": "262144",
        **extra,
    }
    return start_gateway_process(env)


@pytest.fixture(scope="module")
def gateway_url(worker: WorkerProcess) -> Iterator[str]:
    proc, url = start_gateway(worker)
    yield url
    stop_process(proc)


@pytest.fixture
def sdk(gateway_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=gateway_url, api_key=GATEWAY_KEY, max_retries=0, timeout=60
    ) as client:
        yield client


def _clean(value: Any) -> Any:
    """Drop ids and nulls, so the SDK's model and our JSON compare field by field."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None and k != "id"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _sdk(message: Any) -> Any:
    return _clean(message.model_dump(mode="json"))


def test_create_equals_the_python_clients_result(sdk: anthropic.Anthropic, client: Client) -> None:
    """messages.create through the gateway returns what Client returns for the same request."""
    request = make_request("gateway create [[sim tokens=12]]", stream=False, max_tokens=100)
    message = sdk.messages.create(
        model=MODEL, max_tokens=100, messages=request["messages"], stream=False
    )
    assert message.stop_reason == "end_turn"
    assert _sdk(message) == _clean(client.submit(request).result(timeout=30))


def test_stream_text_equals_the_python_clients_result(
    sdk: anthropic.Anthropic, client: Client
) -> None:
    """messages.stream yields the text as it streams and the same final message."""
    request = make_request("gateway stream [[sim tokens=30]]", max_tokens=100)
    with sdk.messages.stream(model=MODEL, max_tokens=100, messages=request["messages"]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    expected = client.submit(request).result(timeout=30)
    assert text == expected["content"][0]["text"]
    assert _sdk(final) == _clean(expected)


def test_stream_tool_use_equals_the_python_clients_result(
    sdk: anthropic.Anthropic, client: Client
) -> None:
    """A streamed tool call accumulates in the SDK to the same tool_use input."""
    request = make_request("Weather in Paris?", max_tokens=200, tools=[TOOL])
    with sdk.messages.stream(
        model=MODEL, max_tokens=200, messages=request["messages"], tools=[TOOL]
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use"
    assert _sdk(final) == _clean(client.submit(request).result(timeout=30))


def test_batch_create_retrieve_results_match_the_python_client(
    sdk: anthropic.Anthropic, client: Client
) -> None:
    """A batch runs to ended; its results are one per custom_id and equal Client's."""
    requests = [
        {
            "custom_id": f"gw-{i}",
            "params": make_request(f"batch {i} [[sim tokens=4]]", stream=False),
        }
        for i in range(5)
    ]
    requests.append(
        {"custom_id": "gw-bad-model", "params": {**make_request("x"), "model": "no-such/model"}}
    )
    batch = sdk.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.processing_status in {"in_progress", "ended"}
    assert batch.id.startswith("msgbatch_")
    wait_for(
        lambda: sdk.messages.batches.retrieve(batch.id).processing_status == "ended",
        60,
        "the batch to end",
        interval_s=0.2,
    )
    ended = sdk.messages.batches.retrieve(batch.id)
    assert ended.request_counts.succeeded == 5
    assert ended.request_counts.errored == 1
    assert ended.ended_at is not None
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(batch.id)}
    assert set(results) == {r["custom_id"] for r in requests}
    for line in requests[:5]:
        result = results[line["custom_id"]]
        assert result.type == "succeeded"
        expected = client.submit(line["params"]).result(timeout=30)
        assert _sdk(result.message) == _clean(expected)  # type: ignore[union-attr]
    bad = results["gw-bad-model"]
    assert bad.type == "errored"
    assert bad.error.error.type == "invalid_request_error"  # type: ignore[union-attr]
    listed = [b.id for b in sdk.messages.batches.list(limit=100)]
    assert batch.id in listed


def test_batch_cancel_ends_with_canceled_results(sdk: anthropic.Anthropic) -> None:
    """Cancelling a batch of long requests ends it, each request canceled."""
    requests = [
        {"custom_id": f"slow-{i}", "params": make_request(f"slow {i} [[sim tokens=2000 tps=20]]")}
        for i in range(3)
    ]
    batch = sdk.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    canceling = sdk.messages.batches.cancel(batch.id)
    assert canceling.processing_status in {"canceling", "ended"}
    assert canceling.cancel_initiated_at is not None
    wait_for(
        lambda: sdk.messages.batches.retrieve(batch.id).processing_status == "ended",
        30,
        "the cancelled batch to end",
        interval_s=0.2,
    )
    assert sdk.messages.batches.retrieve(batch.id).request_counts.canceled == 3
    assert {r.result.type for r in sdk.messages.batches.results(batch.id)} == {"canceled"}


def test_results_of_a_running_batch_are_refused(sdk: anthropic.Anthropic) -> None:
    """The SDK refuses results before the batch ends (no results_url), like Anthropic's API."""
    batch = sdk.messages.batches.create(
        requests=[{"custom_id": "r", "params": make_request("r [[sim tokens=2000 tps=20]]")}]  # type: ignore[list-item]
    )
    with pytest.raises(anthropic.AnthropicError):
        sdk.messages.batches.results(batch.id)
    sdk.messages.batches.cancel(batch.id)


def test_unauthenticated_requests_are_refused(gateway_url: str) -> None:
    """No key, or a wrong one, is 401 for every API route; health and OpenAPI are public."""
    with anthropic.Anthropic(base_url=gateway_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.batches.list()
    for path in ("/v1/messages", "/v1/messages/batches", "/v1/jobs/x", "/v1/jobs/x/events"):
        response = httpx.request(
            "POST" if path.endswith(("messages", "batches")) else "GET",
            f"{gateway_url}{path}",
            json={},
        )
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"
    headers = {"authorization": "Bearer second-key"}
    assert httpx.get(f"{gateway_url}/v1/messages/batches", headers=headers).status_code == 200
    document = httpx.get(f"{gateway_url}/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert "/v1/messages/batches/{batch_id}/results" in document["paths"]


def test_oversized_and_invalid_requests_are_refused(
    sdk: anthropic.Anthropic, gateway_url: str, client: Client
) -> None:
    """Over the body limit is 413; a bad body is 400 naming each field; nothing is enqueued."""
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)
    headers = {"x-api-key": GATEWAY_KEY}
    big = make_request("x" * 70_000)
    response = httpx.post(f"{gateway_url}/v1/messages", json=big, headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    chunked = httpx.post(
        f"{gateway_url}/v1/messages/batches",
        content=iter([b"x" * 100_000] * 3),  # no content-length: counted as it is read
        headers=headers,
    )
    assert chunked.status_code == 413
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(
            model=MODEL,
            max_tokens=0,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"surprise": 1},
        )
    assert "max_tokens" in str(info.value)
    assert "surprise" in str(info.value)
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.batches.create(
            requests=[{"custom_id": "bad id!", "params": make_request("x")}]  # type: ignore[list-item]
        )
    assert "requests[0].custom_id" in str(info.value)
    not_json = httpx.post(f"{gateway_url}/v1/messages", content=b"{nope", headers=headers)
    assert not_json.status_code == 400
    assert new_keys(client, before, queued) == set()


def test_upstream_error_reaches_the_sdk_with_its_status(sdk: anthropic.Anthropic) -> None:
    """A job that failed on the upstream's 400 is the SDK's BadRequestError."""
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(
            model="no-such/model", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert "does not exist" in str(info.value)


def _sse_ids_and_events(response: httpx.Response) -> list[tuple[str, str]]:
    out, current_id = [], ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            current_id = line[4:]
        elif line.startswith("event: "):
            out.append((current_id, line[7:]))
    return out


def test_streams_resume_with_last_event_id(gateway_url: str, client: Client) -> None:
    """Messages and job streams carry ids; Last-Event-ID replays only what came after. A
    stream the gateway relays from its own run names its frames by the events' places
    (``{job}/{attempt}.{seq}``, sent before Redis stored them); a resumed stream, read from
    Redis, by stream ids; both resume alike, on both routes."""
    headers = {"x-api-key": GATEWAY_KEY}
    body = make_request("resume me [[sim tokens=10]]", max_tokens=50)
    with httpx.stream("POST", f"{gateway_url}/v1/messages", json=body, headers=headers) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        job_id = r.headers["llm-worker-job-id"]
        full = _sse_ids_and_events(r)
    assert full[0][1] == "message_start"
    assert full[-1][1] == "message_stop"
    cut = full[2][0]
    assert cut.startswith(f"{job_id}/")

    def resume(last_event_id: str) -> list[tuple[str, str]]:
        with httpx.stream(
            "POST",
            f"{gateway_url}/v1/messages",
            headers={**headers, "last-event-id": last_event_id},
        ) as r:
            return _sse_ids_and_events(r)

    resumed = resume(cut)
    assert [kind for _, kind in resumed] == [kind for _, kind in full[3:]]
    assert all(id_.startswith(f"{job_id}/") for id_, _ in resumed)
    assert resume(resumed[0][0]) == resumed[1:]  # the resumed stream's own ids resume too
    status = httpx.get(f"{gateway_url}/v1/jobs/{job_id}", headers=headers).json()
    assert status["state"] == "completed"
    with httpx.stream("GET", f"{gateway_url}/v1/jobs/{job_id}/events", headers=headers) as r:
        events = _sse_ids_and_events(r)
    assert events[0][1] == "started"
    assert events[-1][1] == "completed"
    assert len(events) == len(list(client.get(job_id, tenant=GATEWAY_TENANT).events(timeout=5)))
    # The job's own events after the messages-route cut: one chunk per frame after it, and
    # the end.
    with httpx.stream(
        "GET", f"{gateway_url}/v1/jobs/{job_id}/events", headers={**headers, "last-event-id": cut}
    ) as r:
        after_cut = [kind for _, kind in _sse_ids_and_events(r)]
    assert after_cut == ["chunk"] * len(full[3:]) + ["completed"]
    with httpx.stream(
        "GET",
        f"{gateway_url}/v1/jobs/{job_id}/events",
        headers={**headers, "last-event-id": events[-2][0]},
    ) as r:
        assert _sse_ids_and_events(r) == events[-1:]
    missing = httpx.get(f"{gateway_url}/v1/jobs/no-such-job", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_message_events_rebuild_a_non_streamed_message() -> None:
    """The stream synthesised for a job that did not stream accumulates to its message."""
    from worker.runtime.accumulate import accumulate, final_message

    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": [1, 2]}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    snapshot = None
    for event in message_events(message):
        snapshot = accumulate(snapshot, event)
    assert snapshot is not None
    assert _clean(final_message(snapshot)) == _clean(message)


def test_a_job_that_passes_its_deadline_is_a_504_the_sdk_does_not_retry(
    worker: WorkerProcess,
) -> None:
    """A request whose job expires (JOB_DEADLINE_S=3 at the gateway, an upstream that holds
    the answer 30 s) is answered 504 timeout_error with x-should-retry: false, never 500."""
    proc, url = start_gateway(worker, LLM_WORKER_JOB_DEADLINE_S="3")
    try:
        body = make_request("held [[sim fault=pings]]", stream=False)
        response = httpx.post(
            f"{url}/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}, timeout=30
        )
    finally:
        stop_process(proc)
    assert response.status_code == 504
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["type"] == "timeout_error"
    assert response.headers["llm-worker-job-id"]


def test_an_upstream_that_refuses_our_key_is_a_502_never_a_401(
    redis_url: str, simulator_url: str
) -> None:
    """A worker whose LLM_WORKER_API_KEY the upstream refuses (401): the gateway's client, whose
    own key was accepted, gets a 502 api_error naming the upstream, non-streamed and streamed;
    never an AuthenticationError that looks like its own key failed."""
    queue = "llmw-wrong-upstream-key"
    env = worker_env(redis_url, simulator_url, api_key="sk-not-the-simulators", queue=queue)
    worker = WorkerProcess(celery_worker_args(concurrency=5, queue=queue), env)
    proc, url = start_gateway(worker)
    host = httpx.URL(simulator_url).host
    try:
        with anthropic.Anthropic(
            base_url=url, api_key=GATEWAY_KEY, max_retries=0, timeout=60
        ) as sdk:
            with pytest.raises(anthropic.APIStatusError) as created:
                sdk.messages.create(
                    model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]
                )
            with (
                pytest.raises(anthropic.APIStatusError) as streamed,
                sdk.messages.stream(
                    model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "y"}]
                ) as stream,
            ):
                stream.get_final_message()
    finally:
        stop_process(proc)
        worker.stop()
    assert created.value.status_code == 502
    for error in (created.value, streamed.value):
        assert not isinstance(
            error, anthropic.AuthenticationError | anthropic.PermissionDeniedError
        )
        body: Any = error.body
        assert body["error"]["type"] == "api_error", body
        assert f"upstream {host}" in body["error"]["message"]
        assert "your key was accepted" in body["error"]["message"]


def test_a_client_that_disconnects_gives_its_redis_connection_back(
    worker: WorkerProcess, client: Client
) -> None:
    """With 4 Redis connections for the whole gateway, 10 event streams opened one after the
    other and dropped by their client all get served: each drop released its connection (a
    leak would leave the 5th waiting, then a 503). Then the pool serves a plain request."""
    proc, url = start_gateway(
        worker, LLM_WORKER_GATEWAY_REDIS_CONNECTIONS="4", LLM_WORKER_GATEWAY_REDIS_WAIT_S="0.5"
    )
    headers = {"x-api-key": GATEWAY_KEY}
    job = client.submit(
        make_request("held open [[sim tokens=10 fault=stall]]"), tenant=GATEWAY_TENANT
    )
    plain_id = job.job_id.split("/")[1]
    try:
        for _ in range(10):
            with httpx.stream(
                "GET", f"{url}/v1/jobs/{plain_id}/events", headers=headers, timeout=10
            ) as response:
                assert response.status_code == 200
                first = next(response.iter_lines())
                assert first.startswith(("event:", "data:", "id:"))
        status = httpx.get(f"{url}/v1/jobs/{plain_id}", headers=headers, timeout=10)
        assert status.status_code == 200
        # Ten streams open at once share the 4 connections (each wait is a bounded block).
        with contextlib.ExitStack() as streams:
            for _ in range(10):
                response = streams.enter_context(
                    httpx.stream(
                        "GET", f"{url}/v1/jobs/{plain_id}/events", headers=headers, timeout=10
                    )
                )
                assert response.status_code == 200
                next(response.iter_lines())
            named = [c for c in client.redis.client_list() if c.get("name") == "llmw-gateway"]
            assert 1 <= len(named) <= 4
    finally:
        job.cancel()
        stop_process(proc)


def test_priority_and_deadline_headers_reach_the_job(gateway_url: str, client: Client) -> None:
    """`llm-worker-priority` and `llm-worker-deadline` set the job's options; a batch's jobs
    default to priority 2 and the batch's 24 h; a header that is not a number, or out of
    range, is a 400 naming it, and nothing is enqueued."""
    headers = {"x-api-key": GATEWAY_KEY, "llm-worker-job-id": "gw-opts-1"}
    options = {"llm-worker-priority": "8", "llm-worker-deadline": "120"}
    response = httpx.post(
        f"{gateway_url}/v1/messages",
        json=make_request("opts", stream=False),
        headers={**headers, **options},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    status = client.get("gw-opts-1", tenant=GATEWAY_TENANT).status()
    assert status["priority"] == 8
    assert status["deadline_at"] == pytest.approx(status["submitted_at"] + 120)
    created = httpx.post(
        f"{gateway_url}/v1/messages/batches",
        json={"requests": [{"custom_id": "one", "params": make_request("b", stream=False)}]},
        headers={"x-api-key": GATEWAY_KEY},
    ).json()
    job = client.get(f"batch-{created['id']}-one", tenant=GATEWAY_TENANT)
    assert job.status()["priority"] == 2
    assert job.status()["deadline_at"] == pytest.approx(job.status()["submitted_at"] + 86_400)
    job.result(timeout=60)
    before, queued = written_keys(client), client.redis.llen(client.settings.queue)
    for name, value in [("llm-worker-priority", "high"), ("llm-worker-priority", "12")]:
        bad = httpx.post(
            f"{gateway_url}/v1/messages",
            json=make_request("x"),
            headers={"x-api-key": GATEWAY_KEY, name: value},
        )
        assert bad.status_code == 400, bad.text
        assert "priority" in bad.json()["error"]["message"]
    bad_deadline = httpx.post(
        f"{gateway_url}/v1/messages",
        json=make_request("x"),
        headers={"x-api-key": GATEWAY_KEY, "llm-worker-deadline": "0"},
    )
    assert bad_deadline.status_code == 400
    assert "deadline_s" in bad_deadline.json()["error"]["message"]
    assert new_keys(client, before, queued) == set()
