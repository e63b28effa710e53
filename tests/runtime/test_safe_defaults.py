"""What a user gets without a setting, with real processes: a killed worker's jobs come back
within a minute, an ended job never runs again whatever expired, the deadline ends a call
that keeps itself alive, and a Redis outage longer than the retry window fails nothing."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support import (
    WorkerProcess,
    celery_worker_args,
    events_so_far,
    make_request,
    start_simulator,
    stop_process,
    streaming,
    terminals,
    upstream_requests,
    wait_for,
    worker_env,
)
from worker import events as ev
from worker.client.sync import Client
from worker.dev.embedded import EmbeddedRedis
from worker.errors import JobExpired
from worker.settings import Settings, settings_from_env

pytestmark = pytest.mark.integration


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def own_simulator() -> Iterator[str]:
    """A simulator of this test's own, so that its request count is this test's alone."""
    proc, url = start_simulator()
    yield url
    stop_process(proc)


def _start(env: dict[str, str], concurrency: int = 100) -> WorkerProcess:
    settings = settings_from_env(env)
    return WorkerProcess(celery_worker_args(concurrency=concurrency, queue=settings.queue), env)


def test_sigkill_at_the_defaults_brings_jobs_back_within_a_minute(
    redis_url: str, simulator_url: str, workers: list[WorkerProcess]
) -> None:
    """At the default lease and visibility settings, a worker SIGKILLed with 40 jobs streaming:
    a fresh worker completes all of them within 60 s of its start, none run twice after it."""
    env = worker_env(redis_url, simulator_url, queue=f"defaults-{uuid.uuid4().hex[:8]}")
    settings = settings_from_env(env)
    defaults = Settings.model_fields
    assert settings.lease_ttl_s == defaults["lease_ttl_s"].default
    assert settings.visibility_timeout_s is None  # derived: 1.5 lease TTLs
    first = _start(env).ready()
    workers.append(first)
    tag = uuid.uuid4().hex
    with Client(settings) as client:
        jobs = client.submit_many(
            [make_request(f"defaults {tag} {i} [[sim tokens=60 tps=10]]") for i in range(40)]
        )
        wait_for(lambda: streaming(jobs) == 40, 60, "40 jobs streaming", interval_s=0.2)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        second = _start(env)
        workers.append(second)
        started_at = time.monotonic()
        try:
            wait_for(
                lambda: all(j.status()["state"] == "completed" for j in jobs),
                60,
                "every job completed within 60 s of the new worker's start",
                interval_s=0.5,
            )
        except TimeoutError:
            states = [j.status()["state"] for j in jobs]
            raise AssertionError(
                f"not completed: {len(states) - states.count('completed')} of 40; "
                f"unacked={client.redis.zcard('unacked_index')}\n{second.log()[-2000:]}"
            ) from None
        print(f"40 jobs back and completed {time.monotonic() - started_at:.1f} s after the start")
        histories = [list(j.events(timeout=10)) for j in jobs]
        statuses = [j.status() for j in jobs]
    for events, status in zip(histories, statuses, strict=True):
        assert terminals(events) == [ev.COMPLETED]
        assert [e["reason"] for e in events if e["type"] == ev.RETRY] == ["worker_lost"]
        assert [e["type"] for e in events].count(ev.STARTED) == status["deliveries"] == 2


def test_a_cancelled_and_a_lapsed_job_never_run_once_their_records_expired(
    redis_url: str, own_simulator: str, workers: list[WorkerProcess]
) -> None:
    """With no worker running, one queued job is cancelled and another passes its deadline;
    their records expire while both messages wait. A worker that then takes the messages ends
    both `expired` without sending either upstream (the message carries its deadline)."""
    env = worker_env(
        redis_url,
        own_simulator,
        queue=f"tombstone-{uuid.uuid4().hex[:8]}",
        lease_ttl_s=1,
        visibility_timeout_s=2,
        result_ttl_s=5,
        job_deadline_s=3,
    )
    settings = settings_from_env(env)
    with Client(settings) as client:
        cancelled = client.submit(make_request("cancelled while queued [[sim tokens=3]]"))
        lapsed = client.submit(make_request("left to lapse [[sim tokens=3]]"))
        assert cancelled.cancel() is True
        assert terminals(events_so_far(cancelled)) == [ev.CANCELLED]
        records = [client.keys.job(cancelled.job_id), client.keys.job(lapsed.job_id)]
        wait_for(lambda: client.redis.exists(*records) == 0, 30, "both records to expire")
        assert client.redis.llen(settings.queue) == 2  # the messages still wait
        worker = _start(env, concurrency=5).ready()  # its canary is one upstream request
        workers.append(worker)
        wait_for(
            lambda: [client.redis.hget(key, "state") for key in records] == [b"expired"] * 2,
            30,
            "both messages taken and judged",
        )
        for job in (cancelled, lapsed):
            with pytest.raises(JobExpired):
                job.result(timeout=10)
        assert client.redis.llen(settings.queue) == 0
    assert upstream_requests(own_simulator) == 1  # the canary alone


def test_a_stream_kept_alive_by_pings_ends_expired_at_its_deadline(
    redis_url: str, own_simulator: str, workers: list[WorkerProcess]
) -> None:
    """An upstream that answers with pings only (for 30 s: every per-read timeout is met)
    cannot hold a job past JOB_DEADLINE_S=4: it ends `expired`, and its connection is closed
    long before the pings would end."""
    env = worker_env(
        redis_url, own_simulator, queue=f"pings-{uuid.uuid4().hex[:8]}", job_deadline_s=4
    )
    workers.append(_start(env, concurrency=5).ready())
    with Client(settings_from_env(env)) as client:
        jobs = client.submit_many(
            [make_request(f"pings {i} {uuid.uuid4().hex} [[sim fault=pings]]") for i in range(3)]
        )
        for job in jobs:
            with pytest.raises(JobExpired) as expired:
                job.result(timeout=20)  # the pings go on for 30 s
            assert expired.value.error["type"] == "expired"
            events = events_so_far(job)
            assert terminals(events) == [ev.EXPIRED]
            assert [e["type"] for e in events].count(ev.STARTED) == 1
            assert any(e["type"] == ev.CHUNK for e in events)  # it was streaming

    def closed() -> bool:
        log = httpx.get(f"{own_simulator}/stats", timeout=5).json()["requests_log"]
        pinged = [r for r in log if r["fault"] == "pings"]
        return len(pinged) == 3 and all(r["end_ts"] is not None for r in pinged)

    wait_for(closed, 10, "the three ping streams closed by the worker")


def test_a_redis_outage_longer_than_the_retry_window_fails_and_loses_nothing(
    simulator_url: str, workers: list[WorkerProcess]
) -> None:
    """Redis stops while 10 jobs stream and stays away past REDIS_RETRY_S: the jobs go back to
    the queue instead of failing, and once Redis is back every one completes, exactly once."""
    with EmbeddedRedis(appendonly=True) as server:
        env = worker_env(
            server.url,
            simulator_url,
            queue=f"outage-{uuid.uuid4().hex[:8]}",
            lease_ttl_s=2,
            visibility_timeout_s=4,
            redis_retry_s=1,
        )
        worker = _start(env, concurrency=20).ready()
        workers.append(worker)
        tag = uuid.uuid4().hex
        with Client(settings_from_env(env)) as client:
            jobs = client.submit_many(
                [make_request(f"outage {tag} {i} [[sim tokens=80 tps=10]]") for i in range(10)]
            )
            wait_for(lambda: streaming(jobs) == 10, 30, "10 jobs streaming", interval_s=0.2)
            server.stop(keep_data=True)
            wait_for(
                lambda: "job_redis_unavailable" in worker.log(),
                60,
                "the worker to give a job back for want of Redis",
            )
            server.start()
            for job in jobs:
                job.result(timeout=120)
            histories = [list(job.events(timeout=10)) for job in jobs]
            dead = client.redis.xlen(client.keys.dead_letters)
    for events in histories:
        assert terminals(events) == [ev.COMPLETED]
    assert dead == 0
    assert "job_crashed" not in worker.log()
