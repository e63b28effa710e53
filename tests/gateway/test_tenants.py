"""Tenants at the gateway, against a real gateway process, worker and Redis: each key's jobs
and batches are its own (every other tenant gets 404 and changes nothing), ids are per
tenant, keys rotate through the keys file, quotas and the gateway's bounds hold per tenant,
and usage is the caller's own."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support import (
    WorkerProcess,
    make_request,
    new_keys,
    start_gateway_process,
    stop_process,
    wait_for,
    written_keys,
)
from worker.client.sync import Client
from worker.errors import QuotaExceeded
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

TAG = uuid.uuid4().hex[:6]
#: Tenants and their keys (names unique to this run: usage counts are per name). The module's
#: gateway knows A, B and C; other tests start gateways of their own.
A, B, C, UA, UB = (f"{x}-{TAG}" for x in ("ta", "tb", "tc", "ua", "ub"))
KEYS = {name: f"key-{name}-secret" for name in (A, B, C, UA, UB)}
STALL = "held open [[sim tokens=10 fault=stall]]"


def key_specs(tenants: dict[str, str]) -> str:
    return ",".join(f"{name}:{key}" for name, key in tenants.items())


def start_gateway(
    worker: WorkerProcess, tenants: list[str], log_path: Path | None = None, **extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The gateway in its own process on the worker's Redis, with these tenants' keys (and
    ``extra`` settings; "" removes one); its log to ``log_path``."""
    env = {
        **worker.env,
        "LLM_WORKER_GATEWAY_API_KEYS": key_specs({name: KEYS[name] for name in tenants}),
        **extra,
    }
    return start_gateway_process({k: v for k, v in env.items() if v != ""}, log_path)


@pytest.fixture(scope="module")
def gateway(worker: WorkerProcess) -> Iterator[str]:
    proc, url = start_gateway(worker, [A, B, C])
    yield url
    stop_process(proc)


def call(url: str, tenant: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"x-api-key": KEYS[tenant], **kwargs.pop("headers", {})}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kwargs)


def test_every_job_route_is_404_to_other_tenants_and_changes_nothing(
    gateway: str, client: Client
) -> None:
    """A's job, by its id: B and C get 404 on its status, its events and a resume of its
    stream, exactly as for an id that never existed; A's job is as it was."""
    job_id = f"probe-{TAG}"
    made = call(
        gateway,
        A,
        "POST",
        "/v1/messages",
        json=make_request("probe", stream=False),
        headers={"llm-worker-job-id": job_id},
    )
    assert made.status_code == 200, made.text
    assert made.headers["llm-worker-job-id"] == job_id
    before = client.redis.hgetall(client.keys.job(f"{A}/{job_id}"))
    never = call(gateway, B, "GET", "/v1/jobs/no-such-job-ever")
    assert never.status_code == 404
    for other in (B, C):
        for method, path, headers in (
            ("GET", f"/v1/jobs/{job_id}", {}),
            ("GET", f"/v1/jobs/{job_id}/events", {}),
            ("POST", "/v1/messages", {"last-event-id": f"{job_id}/0-0"}),
        ):
            response = call(gateway, other, method, path, headers=headers)
            assert response.status_code == 404, (other, path)
            assert response.json()["error"]["type"] == "not_found_error"
            assert f"{A}" not in response.text
            assert response.json()["error"]["message"].replace(job_id, "X") == never.json()[
                "error"
            ]["message"].replace("no-such-job-ever", "X")
    assert client.redis.hgetall(client.keys.job(f"{A}/{job_id}")) == before
    mine = call(gateway, A, "GET", f"/v1/jobs/{job_id}")
    assert mine.status_code == 200
    assert mine.json()["job_id"] == job_id
    events = call(gateway, A, "GET", f"/v1/jobs/{job_id}/events")
    assert events.status_code == 200
    assert f'"job_id":"{job_id}"' in events.text
    assert f"{A}/" not in events.text


def test_the_status_shows_no_lease_worker_or_request_hash(gateway: str) -> None:
    """A producer's status has state, attempts, timestamps, model, usage, metadata, priority
    and tenant, but no lease token, worker host and pid, nor the request's sha256."""
    made = call(gateway, A, "POST", "/v1/messages", json=make_request("status", stream=False))
    assert made.status_code == 200
    status = call(gateway, A, "GET", f"/v1/jobs/{made.headers['llm-worker-job-id']}").json()
    assert status["state"] == "completed"
    assert status["tenant"] == A
    for field in ("attempts", "submitted_at", "started_at", "finished_at", "model", "usage"):
        assert field in status
    for hidden in ("request_sha", "worker", "lease", "lease_until", "claim_before"):
        assert hidden not in status


def test_two_tenants_using_one_job_id_get_two_jobs(gateway: str, client: Client) -> None:
    """The same llm-worker-job-id from A and from B makes two jobs (not a 409), each
    answering its own request."""
    job_id = f"same-{TAG}"
    answers = {}
    for tenant, prompt in ((A, "first question"), (B, "second, different question")):
        response = call(
            gateway,
            tenant,
            "POST",
            "/v1/messages",
            json=make_request(prompt, stream=False),
            headers={"llm-worker-job-id": job_id},
        )
        assert response.status_code == 200, response.text
        assert response.headers["llm-worker-job-id"] == job_id
        answers[tenant] = response.json()
    assert answers[A]["content"] != answers[B]["content"]
    assert client.get(job_id, tenant=A).status()["tenant"] == A
    assert client.get(job_id, tenant=B).status()["tenant"] == B


def test_every_batch_route_is_404_to_other_tenants_and_lists_are_filtered(
    gateway: str, client: Client
) -> None:
    """A's running batch: B and C get 404 on retrieve, cancel and results, their lists do not
    show it, and it is still running, uncancelled; A sees it and can cancel it."""
    body = {"requests": [{"custom_id": f"s{i}", "params": make_request(STALL)} for i in range(2)]}
    created = call(gateway, A, "POST", "/v1/messages/batches", json=body)
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    mine_b = call(
        gateway,
        B,
        "POST",
        "/v1/messages/batches",
        json={"requests": [{"custom_id": "one", "params": make_request("b's own", stream=False)}]},
    )
    assert mine_b.status_code == 200
    try:
        for other in (B, C):
            for method, path in (
                ("GET", f"/v1/messages/batches/{batch_id}"),
                ("POST", f"/v1/messages/batches/{batch_id}/cancel"),
                ("GET", f"/v1/messages/batches/{batch_id}/results"),
            ):
                response = call(gateway, other, method, path)
                assert response.status_code == 404, (other, path)
                assert response.json()["error"]["type"] == "not_found_error"
            listed = call(gateway, other, "GET", "/v1/messages/batches?limit=1000").json()
            assert batch_id not in [b["id"] for b in listed["data"]]
        assert [
            b["id"] for b in call(gateway, B, "GET", "/v1/messages/batches").json()["data"]
        ] == [mine_b.json()["id"]]
        assert call(gateway, C, "GET", "/v1/messages/batches").json()["data"] == []
        again = call(gateway, A, "GET", f"/v1/messages/batches/{batch_id}").json()
        assert again["processing_status"] == "in_progress"
        assert again["cancel_initiated_at"] is None
        for i in range(2):
            state = client.get(f"batch-{batch_id}-s{i}", tenant=A).status()["state"]
            assert state in {"queued", "running"}
        listed_a = call(gateway, A, "GET", "/v1/messages/batches").json()["data"]
        assert batch_id in [b["id"] for b in listed_a]
    finally:
        cancelled = call(gateway, A, "POST", f"/v1/messages/batches/{batch_id}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["processing_status"] in {"canceling", "ended"}


def test_usage_is_the_callers_own(worker: WorkerProcess) -> None:
    """GET /v1/usage counts the caller's jobs and tokens only: UA ran two, UB one."""
    tokens = {UA: [0, 0], UB: [0, 0]}
    proc, url = start_gateway(worker, [UA, UB])
    try:
        for tenant, count in ((UA, 2), (UB, 1)):
            for i in range(count):
                response = call(
                    url,
                    tenant,
                    "POST",
                    "/v1/messages",
                    json=make_request(f"usage {i}", stream=False),
                )
                assert response.status_code == 200
                job_id = response.headers["llm-worker-job-id"]
                usage = call(url, tenant, "GET", f"/v1/jobs/{job_id}").json()["usage"]
                tokens[tenant][0] += usage["input_tokens"]
                tokens[tenant][1] += usage["output_tokens"]
        for tenant, count in ((UA, 2), (UB, 1)):
            report = call(url, tenant, "GET", "/v1/usage").json()
            assert report["tenant"] == tenant
            assert {row["model"] for row in report["data"]} == {"deepseek-ai/DeepSeek-V3"}
            assert report["totals"]["jobs"] == count
            assert {row["day"] for row in report["data"]} == {report["end"]}
            assert report["totals"]["input_tokens"] == tokens[tenant][0]
            assert report["totals"]["output_tokens"] == tokens[tenant][1]
    finally:
        stop_process(proc)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("start=2026-13-01", "start"),
        ("end=yesterday", "end"),
        ("start=2026-02-30", "start"),
        ("start=2026-03-02&end=2026-03-01", "start must not be after end"),
        ("start=2020-01-01&end=2026-01-01", "at most 400"),
    ],
)
def test_bad_usage_queries_are_400_naming_the_parameter(
    gateway: str, query: str, problem: str
) -> None:
    """A malformed or backwards range, or one over 400 days, is a 400 that says why."""
    response = call(gateway, A, "GET", f"/v1/usage?{query}")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert problem in response.json()["error"]["message"]


def test_a_tenant_over_its_queued_quota_gets_429_while_another_submits(
    worker: WorkerProcess,
) -> None:
    """With a quota of 2 queued jobs for A (on a queue no worker takes from): a batch of 3 is
    refused whole, one of 2 fits, then A's next submit is a 429 rate_limit_error naming the
    quota, and the Python client's a QuotaExceeded; B still submits. Cancelling A's batch
    gives the places back."""
    queue = f"unconsumed-{TAG}"
    quota = orjson.dumps({"default": 100, A: 2}).decode()
    proc, url = start_gateway(
        worker, [A, B], LLM_WORKER_QUEUE=queue, LLM_WORKER_TENANT_MAX_QUEUED=quota
    )
    settings = settings_from_env(
        {**worker.env, "LLM_WORKER_QUEUE": queue, "LLM_WORKER_TENANT_MAX_QUEUED": quota}
    )
    try:
        with Client(settings) as client:

            def batch(tenant: str, n: int) -> httpx.Response:
                body = {
                    "requests": [
                        {"custom_id": f"q{i}", "params": make_request(f"q {i}", stream=False)}
                        for i in range(n)
                    ]
                }
                return call(url, tenant, "POST", "/v1/messages/batches", json=body)

            before, queued = written_keys(client), client.redis.llen(queue)
            too_big = batch(A, 3)
            assert too_big.status_code == 429
            assert too_big.json()["error"]["type"] == "rate_limit_error"
            assert new_keys(client, before, queued) == set()
            fits = batch(A, 2)
            assert fits.status_code == 200, fits.text
            refused = call(url, A, "POST", "/v1/messages", json=make_request("one more"))
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error"
            assert "2 queued jobs" in error["message"]
            assert "TENANT_MAX_QUEUED" in error["message"]
            with pytest.raises(QuotaExceeded) as info:
                client.submit(make_request("direct"), tenant=A)
            assert info.value.tenant == A
            assert info.value.limit == 2
            assert batch(B, 2).status_code == 200
            assert client.submit(make_request("b direct"), tenant=B).job_id.startswith(f"{B}/")
            cancelled = call(url, A, "POST", f"/v1/messages/batches/{fits.json()['id']}/cancel")
            assert cancelled.json()["processing_status"] == "ended"
            assert batch(A, 2).status_code == 200
    finally:
        stop_process(proc)


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_key_rotates_through_the_keys_file_without_a_restart(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """Keys from a file of name:sha256 lines: a new key works and the old one is refused once
    the file changes; a SIGHUP rereads it too; a file that no longer parses keeps the keys in
    force. The tenant stays the same, so the job made with the old key is still its own."""
    keys_file = tmp_path / "keys.txt"
    old, new, newer = (f"rotating-{TAG}-{n}" for n in ("old", "new", "newer"))
    keys_file.write_text(f"# tenant rot\nrot-{TAG}:{_sha(old)}\n")
    proc, url = start_gateway(
        worker, [], LLM_WORKER_GATEWAY_API_KEYS="", LLM_WORKER_GATEWAY_API_KEYS_FILE=str(keys_file)
    )

    def status(key: str, path: str = "/v1/messages/batches") -> int:
        return httpx.get(f"{url}{path}", headers={"x-api-key": key}, timeout=10).status_code

    try:
        made = httpx.post(
            f"{url}/v1/messages",
            json=make_request("before rotation", stream=False),
            headers={"x-api-key": old},
            timeout=60,
        )
        assert made.status_code == 200
        job_path = f"/v1/jobs/{made.headers['llm-worker-job-id']}"
        assert status(new) == 401
        keys_file.write_text(f"rot-{TAG}:{_sha(new)}\n")
        wait_for(lambda: status(new) == 200, 10, "the new key")
        assert status(old) == 401
        assert status(new, job_path) == 200
        keys_file.write_text(f"rot-{TAG}:{_sha(newer)}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status(newer) == 200, 10, "the key read on SIGHUP")
        keys_file.write_text("rot:not-a-digest\n")
        proc.send_signal(signal.SIGHUP)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: status(newer) != 200, 2, "a lockout (must not come)")
        assert status(newer) == 200
    finally:
        stop_process(proc)


def test_streams_and_requests_are_bounded_per_tenant_and_overall(
    worker: WorkerProcess, client: Client
) -> None:
    """One open stream per tenant, two overall: A's second is a 429, C's (the third) a 503,
    both with retry-after, B's goes through; a closed stream frees its place. With one
    request at a time per tenant, A's status call during its stream is a 429."""
    proc, url = start_gateway(
        worker,
        [A, B, C],
        LLM_WORKER_GATEWAY_TENANT_MAX_STREAMS="1",
        LLM_WORKER_GATEWAY_MAX_STREAMS="2",
        LLM_WORKER_GATEWAY_TENANT_MAX_REQUESTS="1",
    )
    jobs = {t: client.submit(make_request(STALL), tenant=t, job_id=f"held-{TAG}") for t in KEYS}
    path = f"/v1/jobs/held-{TAG}/events"

    held: list[Iterator[str]] = []  # a dropped line iterator would close its stream

    def open_stream(stack: contextlib.ExitStack, tenant: str) -> int:
        headers = {"x-api-key": KEYS[tenant]}
        response = stack.enter_context(
            httpx.stream("GET", f"{url}{path}", headers=headers, timeout=10)
        )
        if response.status_code == 200:
            held.append(response.iter_lines())
            next(held[-1])
        return response.status_code

    try:
        with contextlib.ExitStack() as streams:
            assert open_stream(streams, A) == 200
            second = call(url, A, "GET", path)
            assert second.status_code == 429
            assert second.headers["retry-after"] == "1"
            busy = call(url, A, "GET", f"/v1/jobs/held-{TAG}")
            assert busy.status_code == 429
            assert open_stream(streams, B) == 200
            third = call(url, C, "GET", path)
            assert third.status_code == 503
            assert third.headers["retry-after"] == "1"
            assert third.json()["error"]["type"] == "overloaded_error"
            held.clear()
        wait_for(
            lambda: call(url, A, "GET", f"/v1/jobs/held-{TAG}").status_code == 200,
            10,
            "the places given back",
        )
        with contextlib.ExitStack() as streams:
            assert open_stream(streams, A) == 200
            held.clear()
    finally:
        for job in jobs.values():
            job.cancel()
        stop_process(proc)


def test_each_request_is_logged_with_its_tenant_never_the_key_or_prompt(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """One JSON line per request: tenant, route, method, status, job id and duration; the
    key and the prompt appear nowhere in the log, also for a refused key."""
    log_path = tmp_path / "gateway.log"
    proc, url = start_gateway(worker, [A], log_path, LLM_WORKER_LOG_LEVEL="INFO")
    prompt = f"a secret prompt {TAG}"
    try:
        made = call(url, A, "POST", "/v1/messages", json=make_request(prompt, stream=False))
        assert made.status_code == 200
        job_id = made.headers["llm-worker-job-id"]
        assert call(url, A, "GET", "/v1/jobs/nope").status_code == 404
        wrong = httpx.get(f"{url}/v1/jobs/x", headers={"x-api-key": "wrong-key-123"}, timeout=10)
        assert wrong.status_code == 401
    finally:
        stop_process(proc)
    text = log_path.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if "gateway_request" in line]
    by_route = {(line["route"], line["status"]): line for line in lines}
    made_line = by_route[("messages", 200)]
    assert made_line["tenant"] == A
    assert made_line["job_id"] == job_id
    assert made_line["method"] == "POST"
    assert made_line["duration_s"] >= 0
    assert by_route[("job_status", 404)]["job_id"] == "nope"
    assert by_route[("unmatched", 401)]["tenant"] is None
    for secret in (KEYS[A], "wrong-key-123", prompt):
        assert secret not in text


def test_a_tenant_at_its_budget_is_a_429_while_another_still_submits(
    worker: WorkerProcess, client: Client
) -> None:
    """With UA's spend today at its daily budget, the gateway refuses UA's submit with a 429
    rate_limit_error that names the budget (streamed or not: the fast path's thread finds
    it, the request answers it), writes nothing, and still runs UB's request."""
    budgets = json.dumps({UA: {"usd_per_day": 1}, UB: {"usd_per_day": 1}})
    proc, url = start_gateway(worker, [UA, UB], LLM_WORKER_BUDGETS=budgets)
    try:
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        client.redis.set(client.keys.spend(UA, today), 10**12)  # 1 USD in pico-dollars
        before, queued = written_keys(client), client.redis.llen(client.settings.queue)
        refused = call(url, UA, "POST", "/v1/messages", json=make_request("over", stream=False))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert "budget" in refused.json()["error"]["message"]
        streamed = call(url, UA, "POST", "/v1/messages", json=make_request("over", stream=True))
        assert streamed.status_code == 429, streamed.text
        assert "budget" in streamed.json()["error"]["message"]
        assert new_keys(client, before, queued) == set()
        served = call(url, UB, "POST", "/v1/messages", json=make_request("fine", stream=False))
        assert served.status_code == 200, served.text
    finally:
        stop_process(proc)
