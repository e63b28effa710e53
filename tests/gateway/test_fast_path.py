"""The gateway's fast path (worker/gateway/fast_path.py), with a real gateway process, Redis,
a Celery worker and the simulator: the gateway runs a job itself when nothing of its priority
or higher waits, keeps every record a worker would write, and leaves the job to a worker when
it dies mid-call, is over the rate limit, or is told not to."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.support import (
    WorkerProcess,
    celery_worker_args,
    make_request,
    start_gateway_process,
    start_simulator,
    stop_process,
    terminals,
    wait_for,
    worker_env,
)
from worker import events as ev
from worker.client.core import prepare_submission
from worker.client.sync import Client, Job
from worker.gateway.app import JOB_ID_HEADER, PATH_HEADER, PRIORITY_HEADER
from worker.keys import TrafficKeys
from worker.runtime.job_store import claim_call, parse_claim
from worker.settings import settings_from_env

pytestmark = pytest.mark.integration

KEY = "fast-path-key-1"
TENANT = "fp"
MODEL = "deepseek-ai/DeepSeek-V3"
#: A stream slow enough to act on while it runs (about 6 s).
SLOW = "[[sim ttft_ms=0 tps=20 tokens=120]] slow"


def _env(redis_url: str, simulator_url: str, queue: str, **settings: Any) -> dict[str, str]:
    quick = {"lease_ttl_s": 2, "outbox_grace_s": 0.5, "concurrency": 20, "queue": queue}
    env = worker_env(redis_url, simulator_url, **{**quick, **settings})
    env["LLM_WORKER_GATEWAY_API_KEYS"] = f"{TENANT}:{KEY}"
    return env


@pytest.fixture(scope="module")
def queue() -> str:
    return f"fast-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def env(redis_url: str, simulator_url: str, queue: str) -> dict[str, str]:
    return _env(redis_url, simulator_url, queue)


@pytest.fixture(scope="module")
def fp_worker(env: dict[str, str], queue: str) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(celery_worker_args(concurrency=20, queue=queue), env)
    try:
        yield proc.ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(env: dict[str, str], fp_worker: WorkerProcess) -> Iterator[tuple[str, int]]:
    proc, url = start_gateway_process(env)
    yield url, proc.pid
    stop_process(proc)


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[Client]:
    with Client(settings_from_env(env)) as c:
        yield c


def _post(url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/messages",
        json=body,
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", **headers},
        timeout=60,
    )


def _job(client: Client, response: httpx.Response) -> Job:
    return client.get(response.headers[JOB_ID_HEADER], tenant=TENANT)


def _events(job: Job) -> list[dict[str, Any]]:
    return list(job.events(timeout=30))


def _runner_of(client: Client, job: Job) -> str:
    """Who runs ``job`` now (``host:pid``; the hash names it only while it runs)."""
    key = client.keys.job(job.job_id)
    name: bytes = wait_for(lambda: client.redis.hget(key, "worker"), 20, "the job to start")
    return name.decode()


def _outbox_empty(client: Client, queue: str, job: Job) -> bool:
    keys = client.keys
    return client.redis.zscore(keys.outbox(queue), job.job_id) is None and not client.redis.exists(
        keys.outbox_message(job.job_id)
    )


def test_the_gateway_runs_a_lone_request_and_keeps_every_record(
    gateway: tuple[str, int], client: Client, queue: str
) -> None:
    """With nothing waiting, the gateway answers from its own run: the response says so, and
    the job's status and events are a worker's (one attempt, usage, cost, answered_by, one
    terminal event); its kept message left the outbox with the end, before the answer."""
    url, _ = gateway
    response = _post(url, make_request("hello fast", model=MODEL, max_tokens=16, stream=False))
    assert response.status_code == 200, response.text
    assert response.headers[PATH_HEADER] == "gateway"
    assert response.json()["type"] == "message"
    job = _job(client, response)
    status = job.status()
    assert status["state"] == ev.COMPLETED
    assert status["attempts"] == 1
    assert status["answered_by"] == MODEL
    assert status["usage"]["output_tokens"] == response.json()["usage"]["output_tokens"]
    assert "cost_usd" in status
    events = _events(job)
    assert [e["type"] for e in events] == [ev.STARTED, ev.COMPLETED]
    assert events[-1]["message"]["content"] == response.json()["content"]
    assert _outbox_empty(client, queue, job)
    record = client.redis.hgetall(client.keys.job(job.job_id))
    assert b"held_in" not in record
    assert b"held_msg" not in record


def test_a_streamed_request_through_the_fast_path_streams_the_answer(
    gateway: tuple[str, int], client: Client
) -> None:
    """A streamed request the gateway runs: the client gets the upstream's events, ending in
    message_stop, and the job completes with the same text. The frames are relayed from the
    run as they are made, named by the events' places (``{job}/{attempt}.{seq}``), and a
    client that resumes from one gets the rest of the answer from Redis, nothing twice."""
    url, _ = gateway
    body = make_request("stream fast", model=MODEL, max_tokens=16, stream=True)
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", f"{url}/v1/messages", json=body, headers=headers, timeout=60
    ) as response:
        assert response.headers[PATH_HEADER] == "gateway"
        frames = _frames(response)
        job = _job(client, response)
    data = [d for _, d in frames]
    assert data[-1]["type"] == "message_stop"
    text = "".join(d["delta"].get("text", "") for d in data if d["type"] == "content_block_delta")
    assert job.result(timeout=10)["content"][0]["text"] == text
    plain = response.headers[JOB_ID_HEADER]
    chunks = [e for e in _events(job) if e["type"] == ev.CHUNK]
    assert [id_ for id_, _ in frames] == [f"{plain}/{e['attempt']}.{e['seq']}" for e in chunks]
    with httpx.stream(
        "POST",
        f"{url}/v1/messages",
        headers={**headers, "last-event-id": frames[1][0]},
        timeout=60,
    ) as response:
        assert [d for _, d in _frames(response)] == data[2:]


def _frames(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """``(id, data)`` of each SSE frame."""
    out, id_ = [], ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            id_ = line[4:]
        elif line.startswith("data: "):
            out.append((id_, orjson.loads(line[6:])))
    return out


def test_a_waiting_job_of_equal_or_higher_priority_sends_the_request_to_the_queue(
    env: dict[str, str], fp_worker: WorkerProcess
) -> None:
    """On a queue no worker takes from, with a job waiting at priority 5: a request at 5 or
    below goes behind it (the queue path), one at 9 too when a 9 waits; only once nothing of
    its priority or higher waits does the gateway take one."""
    idle = f"idle-{uuid.uuid4().hex[:8]}"
    idle_env = {**env, "LLM_WORKER_QUEUE": idle}
    proc, url = start_gateway_process(idle_env)
    try:
        with Client(settings_from_env(idle_env)) as producer:
            producer.submit(make_request("waiting", model=MODEL), priority=5)

            def path(priority: int) -> str:
                body = make_request(f"p{priority}", model=MODEL, stream=True)
                with httpx.stream(
                    "POST",
                    f"{url}/v1/messages",
                    json=body,
                    headers={
                        "x-api-key": KEY,
                        "anthropic-version": "2023-06-01",
                        PRIORITY_HEADER: str(priority),
                    },
                    timeout=30,
                ) as response:
                    return response.headers[PATH_HEADER]

            assert path(5) == "queue"
            assert path(2) == "queue"
            producer.redis.delete(idle)  # nothing waits any more
            assert path(5) == "gateway"
    finally:
        stop_process(proc)


def test_cancelling_a_job_the_gateway_runs_ends_it_cancelled(
    gateway: tuple[str, int], client: Client
) -> None:
    """A cancel reaches the gateway's run as a worker's: the streamed call stops, the stream
    ends with an error event, and the job has exactly one terminal event, cancelled."""
    url, pid = gateway
    body = make_request(SLOW, model=MODEL, max_tokens=200, stream=True)
    with httpx.stream(
        "POST",
        f"{url}/v1/messages",
        json=body,
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        timeout=60,
    ) as response:
        assert response.headers[PATH_HEADER] == "gateway"
        job = _job(client, response)
        lines = response.iter_lines()
        next(line for line in lines if '"content_block_delta"' in line)
        assert _runner_of(client, job).endswith(f":{pid}")
        assert job.cancel()
        rest = list(lines)
    assert "event: error" in rest
    assert not any('"message_stop"' in line for line in rest)
    assert terminals(_events(job)) == [ev.CANCELLED]


def test_a_gateway_killed_mid_call_leaves_the_job_to_a_worker(
    env: dict[str, str], fp_worker: WorkerProcess, client: Client, gateway: tuple[str, int]
) -> None:
    """SIGKILL the gateway while it streams a job's answer: its lease lapses, a worker's
    sweeper publishes the kept message and a worker runs the job to the end: completed, one
    terminal event, the dead run's chunks voided by a worker_lost retry. The client, resuming
    on another gateway from the last frame it got, is told its partial answer is void (an
    error event), never handed the new attempt's answer as the rest of the old one."""
    proc, url = start_gateway_process(env)
    last_id = ""
    try:
        body = make_request(SLOW, model=MODEL, max_tokens=200, stream=True)
        with httpx.stream(
            "POST",
            f"{url}/v1/messages",
            json=body,
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            timeout=60,
        ) as response:
            assert response.headers[PATH_HEADER] == "gateway"
            job = _job(client, response)
            for line in response.iter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                if '"content_block_delta"' in line:
                    break
            assert _runner_of(client, job).endswith(f":{proc.pid}")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    except httpx.HTTPError:
        pass  # the connection dies with the gateway
    finally:
        if proc.poll() is None:
            stop_process(proc)
    with httpx.stream(
        "POST",
        f"{gateway[0]}/v1/messages",
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", "last-event-id": last_id},
        timeout=60,
    ) as response:
        resumed = [d for _, d in _frames(response)]
    assert resumed[-1]["type"] == "error"
    assert "void" in resumed[-1]["error"]["message"]
    assert not any(d["type"] == "message_start" for d in resumed)
    message = job.result(timeout=60)
    assert message["stop_reason"] in {"end_turn", "max_tokens"}
    events = _events(job)
    assert terminals(events) == [ev.COMPLETED]
    assert any(e["type"] == ev.RETRY and e["reason"] == "worker_lost" for e in events)


def test_the_setting_turns_the_fast_path_off(env: dict[str, str], fp_worker: WorkerProcess) -> None:
    """With LLM_WORKER_GATEWAY_FAST_PATH=false every request goes through the queue."""
    off_env = {**env, "LLM_WORKER_GATEWAY_FAST_PATH": "false"}
    proc, url = start_gateway_process(off_env)
    try:
        response = _post(
            url, make_request("via the queue", model=MODEL, max_tokens=8, stream=False)
        )
        assert response.status_code == 200, response.text
        assert response.headers[PATH_HEADER] == "queue"
    finally:
        stop_process(proc)


RL_PERIOD_S = 2.0
RL_RPM = 3  # per RL_PERIOD_S


@pytest.mark.slow
def test_the_fast_path_never_exceeds_the_rate_limit(redis_url: str) -> None:
    """A simulator enforcing 3 requests per 2 s, a gateway and a worker sharing that limit,
    9 requests at once: every one completes, the upstream never answers 429, some run in the
    gateway and the rest are handed to the queue, where the worker waits for the limiter."""
    sim, sim_url = start_simulator(
        "--rpm", str(RL_RPM), "--window-s", str(RL_PERIOD_S), "--faults", "{}"
    )
    queue = f"fast-rl-{uuid.uuid4().hex[:8]}"
    rl_env = _env(
        redis_url,
        sim_url,
        queue,
        key_prefix=f"fprl{uuid.uuid4().hex[:6]}",
        rate_limits=orjson.dumps({MODEL: {"rpm": RL_RPM}}).decode(),
        rate_limit_period_s=RL_PERIOD_S,
    )
    worker = WorkerProcess(celery_worker_args(concurrency=20, queue=queue), rl_env)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        worker.ready()
        gateway, url = start_gateway_process(rl_env)
        # An empty window: the canary's slot has expired.
        httpx.post(f"{sim_url}/stats/reset", timeout=10)
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            response = _post(url, make_request(f"rl {i}", model=MODEL, max_tokens=8, stream=False))
            with lock:
                answers.append(response)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3 * RL_RPM)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        stats = httpx.get(f"{sim_url}/stats", timeout=10).json()
    finally:
        if gateway is not None:
            stop_process(gateway)
        worker.stop()
        stop_process(sim)
    assert [a.status_code for a in answers] == [200] * (3 * RL_RPM)
    assert stats["rate_limited"] == 0
    assert "429" not in stats["by_status"]
    paths = sorted(a.headers[PATH_HEADER] for a in answers)
    assert "gateway" in paths
    assert "queue" in paths


def test_only_waiting_jobs_of_equal_or_higher_priority_stop_the_fast_path(
    redis_url: str,
) -> None:
    """``submit.lua``'s fast form: jobs filed at priority 2 leave a priority-5 job held for
    the gateway (its message in the outbox, not on the queue); once one is filed at 9, the
    next job at 5 is queued; an unfiled message on the kombu list (its class unknown) queues
    one too."""
    queue = f"fp-lua-{uuid.uuid4().hex[:8]}"
    settings = settings_from_env(
        worker_env(redis_url, "http://127.0.0.1:9", queue=queue, key_prefix=f"fl{queue[-8:]}")
    )
    traffic = TrafficKeys(queue)
    body = make_request("held?", model=MODEL, stream=False)

    held = []
    with Client(settings) as producer:
        r = producer.redis

        def claim_with(job_id: str, payload: dict[str, Any]) -> tuple[list[str], list[Any]]:
            return claim_call(
                producer.keys,
                job_id,
                worker="test:1",
                model=MODEL,
                ttl_s=60,
                token=uuid.uuid4().hex,
                lease_ttl_s=2,
                max_deliveries=5,
                start_attempt=True,
                result_ttl_s=60,
                held_in=producer.keys.outbox(queue),
            )

        def taken(priority: int) -> bool:
            submission = prepare_submission(settings, [body], None, None, priority=priority)
            _id, _payload, raw = producer.submit_held(submission, claim_with)
            return parse_claim(raw).state_before == "queued"

        r.zadd(traffic.turns(2), {"": 0})
        held.append(taken(5))
        r.zadd(traffic.turns(9), {"": 0})
        held.append(taken(5))
        queued = r.llen(queue)  # the job just queued; a worker takes it:
        r.delete(traffic.turns(9), queue)
        held.append(taken(5))
        r.delete(traffic.turns(2))
        r.lpush(queue, b"{}")
        held.append(taken(0))
        held.append(queued == 1 and r.zcard(producer.keys.outbox(queue)) == 2)
        r.delete(queue, producer.keys.outbox(queue))
    assert held == [True, False, True, False, True]
