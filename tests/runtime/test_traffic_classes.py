"""Traffic classes with real processes: priority, fair share between tenants, FIFO within a
tenant, a job's own deadline in the queue, and a batch that outlives JOB_DEADLINE_S."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support import (
    ROOT,
    WorkerProcess,
    celery_worker_args,
    make_request,
    start_simulator,
    stop_process,
    upstream_requests,
    wait_for,
    worker_env,
)
from worker.client import batch_file
from worker.client.sync import Client
from worker.settings import Settings, settings_from_env

pytestmark = pytest.mark.integration

#: One second of streaming in the simulator.
ONE_SECOND = "[[sim tokens=10 tps=10]]"
#: Requests per second the big batch may send (RATE_LIMIT_PERIOD_S=1), paced over 0.1 s
#: windows (20 each): 10,000 take at least 50 s, about what one worker process manages on a
#: small machine; the pacing makes the limiter hold back every burst of fetches.
BATCH_RATE = 200
#: A model with a limit of its own (the workers' canary jobs use another).
LIMITED_MODEL = "moonshotai/Kimi-K2-Instruct"


@pytest.fixture
def own_simulator() -> Iterator[str]:
    """A simulator of this test's own, so that its request count is this test's alone."""
    proc, url = start_simulator()
    yield url
    stop_process(proc)


@pytest.fixture
def four_slots(redis_url: str, own_simulator: str) -> Iterator[WorkerProcess]:
    """One worker with 4 slots on a queue of its own, at the default traffic settings."""
    env = worker_env(redis_url, own_simulator, queue=f"traffic-{uuid.uuid4().hex[:8]}")
    settings = settings_from_env(env)
    assert settings.priority_aging_s == Settings.model_fields["priority_aging_s"].default
    worker = WorkerProcess(celery_worker_args(concurrency=4, queue=settings.queue), env).ready()
    yield worker
    worker.stop()


def _statuses(client: Client, job_ids: list[str]) -> dict[str, dict[str, str]]:
    """Every job's hash, in one round trip."""
    pipe = client.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hgetall(client.keys.job(job_id))
    return {
        job_id: {k.decode(): v.decode() for k, v in raw.items()}
        for job_id, raw in zip(job_ids, pipe.execute(), strict=True)
    }


def _ended(client: Client, job_ids: list[str]) -> dict[str, dict[str, str]]:
    return {j: s for j, s in _statuses(client, job_ids).items() if s.get("finished_at")}


def _rank(finished: dict[str, dict[str, str]], job_ids: list[str]) -> list[float]:
    return sorted(float(finished[j]["finished_at"]) for j in job_ids if j in finished)


def test_priority_and_fair_share_overtake_a_backlog(
    four_slots: WorkerProcess, own_simulator: str
) -> None:
    """4 slots, 200 one-second batch jobs of one tenant queued: 8 jobs at priority 8 and 8
    jobs of a second tenant at the backlog's priority all end before the backlog's 40th job
    (not after the whole backlog); the backlog runs in its submission order; a job with
    deadline_s=3 behind the backlog ends expired without an upstream call."""
    with Client(four_slots.settings()) as client:
        backlog = client.submit_many(
            [make_request(f"bulk {i} {ONE_SECOND}") for i in range(200)],
            tenant="bulk",
            priority=2,
        )
        late = client.submit(
            make_request(f"late {ONE_SECOND}"), tenant="bulk", priority=2, deadline_s=3
        )
        urgent = client.submit_many(
            [make_request(f"urgent {i} {ONE_SECOND}") for i in range(8)], priority=8
        )
        other = client.submit_many(
            [make_request(f"other {i} {ONE_SECOND}") for i in range(8)],
            tenant="small",
            priority=2,
        )
        backlog_ids = [j.job_id for j in backlog]
        watched = [j.job_id for j in urgent + other]

        def fortieth_ended() -> dict[str, dict[str, str]] | None:
            finished = _ended(client, backlog_ids + watched)
            return finished if len(_rank(finished, backlog_ids)) >= 40 else None

        finished = wait_for(fortieth_ended, 120, "the backlog's 40th job to end")
        fortieth = _rank(finished, backlog_ids)[39]
        for job_id in watched:
            assert job_id in finished, f"{job_id} had not ended when the backlog's 40th did"
            assert finished[job_id]["state"] == "completed"
            assert float(finished[job_id]["finished_at"]) <= fortieth
        # FIFO within the tenant: the backlog started in the order it was submitted.
        statuses = _statuses(client, backlog_ids[:36])
        started = [float(statuses[j]["started_at"]) for j in backlog_ids[:36]]
        assert started == sorted(started)

        # The rest of the backlog is not needed to reach the late job: cancelled, it is skipped.
        for job in backlog[40:]:
            job.cancel()
        status = wait_for(
            lambda: (s := late.status())["state"] in {"expired", "completed"} and s,
            120,
            "the late job to end",
        )
        assert status["state"] == "expired"
        assert status["attempts"] == 0
        # Every upstream call is an attempt of another job (or the canary's): none is the
        # late job's.
        attempts = sum(
            int(s["attempts"]) for s in _statuses(client, backlog_ids + watched).values()
        )
        assert upstream_requests(own_simulator) == attempts + 1


@pytest.mark.slow
def test_a_batch_longer_than_the_job_deadline_runs_to_the_end(
    redis_url: str, own_simulator: str, tmp_path: Path
) -> None:
    """A 10,000-line batch file behind a tight rate limit runs well past JOB_DEADLINE_S (5 s
    here) and ends without a single expired line: its jobs live BATCH_DEADLINE_S, at its
    default, and the limiter's waits and requeues keep it."""
    env = worker_env(
        redis_url,
        own_simulator,
        queue=f"big-batch-{uuid.uuid4().hex[:8]}",
        key_prefix=f"bigb{uuid.uuid4().hex[:8]}",  # a limiter of its own
        job_deadline_s=5,
        rate_limits=orjson.dumps({"default": {"rpm": BATCH_RATE}}).decode(),
        rate_limit_period_s=1,
        rate_limit_burst_s=0.1,
    )
    settings = settings_from_env(env)
    assert settings.batch_deadline_s == Settings.model_fields["batch_deadline_s"].default
    lines = [
        {"custom_id": f"r{i}", "params": make_request(f"b{i} [[sim tokens=1]]", stream=False)}
        for i in range(10_000)
    ]
    path, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    # `llm-worker run` at its default concurrency, for its /metrics.
    run = [sys.executable, "-m", "worker.cli", "run", "--pool", "gevent"]
    worker = WorkerProcess(run, env)
    try:
        # Not ready(): its canary job would live JOB_DEADLINE_S only, less than a start.
        wait_for(lambda: _ready(worker), 60, "the worker's /readyz")
        batch = subprocess.run(
            [sys.executable, "-m", "worker.cli", "batch", str(path), "--out", str(out)],
            cwd=ROOT,
            env=worker.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert batch.returncode == 0, batch.stderr.decode(errors="replace")[-2000:]
        metrics = worker.http_get("/metrics").text
        waited = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("llm_worker_rate_limit_wait_seconds_sum")
        ]
        assert sum(waited) > 0  # the limiter did hold jobs back
    finally:
        worker.stop()
    results = [orjson.loads(line) for line in out.read_bytes().splitlines() if line.strip()]
    assert len(results) == 10_000
    assert Counter(r["result"]["type"] for r in results) == {"succeeded": 10_000}
    with Client(settings) as client:
        batch_id = batch_file.file_batch_id(path.read_bytes())
        last = _statuses(client, [batch_file.job_id_for(batch_id, "r9999")])
        record = next(iter(last.values()))
        # The tail really did outlive the interactive deadline.
        assert float(record["finished_at"]) - float(record["submitted_at"]) > 5
        assert int(record["priority"]) == 2


def _ready(worker: WorkerProcess) -> bool:
    try:
        return worker.http_get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_a_postponed_job_keeps_its_priority_and_tenant(redis_url: str, own_simulator: str) -> None:
    """A job the limiter postpones (no wait in the worker) is requeued with its class: the
    message that holds it until its countdown carries its priority and tenant."""
    env = worker_env(
        redis_url,
        own_simulator,
        queue=f"postpone-{uuid.uuid4().hex[:8]}",
        key_prefix=f"postp{uuid.uuid4().hex[:8]}",  # a limiter of its own
        rate_limits=orjson.dumps({LIMITED_MODEL: {"rpm": 1}}).decode(),
        rate_limit_period_s=60,
        rate_limit_max_wait_s=0,
    )
    settings = settings_from_env(env)
    worker = WorkerProcess(celery_worker_args(concurrency=4, queue=settings.queue), env).ready()
    try:
        with Client(settings) as client:
            first = client.submit(make_request("first [[sim tokens=1]]", model=LIMITED_MODEL))
            first.result(timeout=30)
            second = client.submit(
                make_request("second [[sim tokens=1]]", model=LIMITED_MODEL),
                priority=8,
                tenant="acme",
            )

            def requeued() -> dict[str, Any] | None:
                for raw in client.redis.hvals("unacked"):
                    message = orjson.loads(raw)[0]
                    headers = message["headers"]
                    if headers.get("id") == second.job_id and headers.get("eta"):
                        return dict(headers)
                return None

            headers = wait_for(requeued, 30, "the postponed job's message")
            assert headers["llmw_priority"] == 8
            assert headers["llmw_tenant"] == "acme"
            assert second.status()["state"] == "queued"
            second.cancel()
    finally:
        worker.stop()


def test_a_deadline_reached_while_waiting_for_the_limiter_ends_expired(
    redis_url: str, own_simulator: str
) -> None:
    """At the default RATE_LIMIT_MAX_WAIT_S (60 s), a job with deadline_s=3 behind a spent
    limit waits at most until its deadline, then ends expired without an upstream call."""
    env = worker_env(
        redis_url,
        own_simulator,
        queue=f"limit-deadline-{uuid.uuid4().hex[:8]}",
        key_prefix=f"limdl{uuid.uuid4().hex[:8]}",  # a limiter of its own
        rate_limits=orjson.dumps({LIMITED_MODEL: {"rpm": 1}}).decode(),
    )
    settings = settings_from_env(env)
    assert settings.rate_limit_max_wait_s == Settings.model_fields["rate_limit_max_wait_s"].default
    worker = WorkerProcess(celery_worker_args(concurrency=4, queue=settings.queue), env).ready()
    try:
        with Client(settings) as client:
            client.submit(make_request("spends the limit", model=LIMITED_MODEL)).result(timeout=30)
            calls = upstream_requests(own_simulator)
            job = client.submit(make_request("short-lived", model=LIMITED_MODEL), deadline_s=3)
            status = wait_for(
                lambda: (s := job.status())["state"] in {"expired", "completed", "failed"} and s,
                30,
                "the short-lived job to end",
            )
            assert status["state"] == "expired"
            assert upstream_requests(own_simulator) == calls
    finally:
        worker.stop()
